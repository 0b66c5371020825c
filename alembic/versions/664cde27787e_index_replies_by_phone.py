"""Index reminders by phone and send time: each reply looks up the latest one sent to its number.

Revision ID: 664cde27787e
Revises: 1bac5a4c9559
Create Date: 2026-11-22 23:40:30.287164
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "664cde27787e"
down_revision: str | None = "1bac5a4c9559"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reminders", schema=None) as batch_op:
        batch_op.create_index("ix_reminders_phone_sent", ["phone_e164", "sent_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("reminders", schema=None) as batch_op:
        batch_op.drop_index("ix_reminders_phone_sent")
