"""Leaner reminder indexes: fewer to maintain on every insert, and one for the daily cap.

Revision ID: 1bac5a4c9559
Revises: 1e71c1de7869
Create Date: 2026-11-22 22:43:04.330302
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "1bac5a4c9559"
down_revision: str | None = "1e71c1de7869"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reminders", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reminders_appointment_id"))
        batch_op.drop_index(batch_op.f("ix_reminders_clinic_id"))
        batch_op.drop_index(batch_op.f("ix_reminders_status_due"))
        batch_op.create_index(
            "ix_reminders_clinic_claimed", ["clinic_id", "claimed_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("reminders", schema=None) as batch_op:
        batch_op.drop_index("ix_reminders_clinic_claimed")
        batch_op.create_index(
            batch_op.f("ix_reminders_status_due"), ["status", "due_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_reminders_clinic_id"), ["clinic_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_reminders_appointment_id"), ["appointment_id"], unique=False
        )
