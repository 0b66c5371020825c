"""Sending reminders: link tokens, clinic templates, and the indexes the scheduler scans.

Revision ID: 2db5b9256892
Revises: 283a01192c69
Create Date: 2026-11-22 21:30:11.488721
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

import reminders.db
from alembic import op

revision: str = "2db5b9256892"
down_revision: str | None = "283a01192c69"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "templates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("clinic_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("language", sa.String(length=8), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            reminders.db.UTCDateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            reminders.db.UTCDateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["clinic_id"],
            ["clinics.id"],
            name=op.f("fk_templates_clinic_id_clinics"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_templates")),
        sa.UniqueConstraint(
            "clinic_id", "kind", "language", name=op.f("uq_templates_clinic_id_kind_language")
        ),
    )
    with op.batch_alter_table("appointments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("link_token", sa.String(length=32), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_appointments_link_token"), ["link_token"])

    with op.batch_alter_table("reminders", schema=None) as batch_op:
        batch_op.create_index("ix_reminders_appointment_id", ["appointment_id"], unique=False)
        batch_op.create_index(
            "ix_reminders_in_flight",
            ["status", "claimed_at"],
            unique=False,
            postgresql_where=sa.text("status IN ('queued', 'sending', 'unknown')"),
            sqlite_where=sa.text("status IN ('queued', 'sending', 'unknown')"),
        )
        batch_op.create_index(
            "ix_reminders_planned_due",
            ["due_at"],
            unique=False,
            postgresql_where=sa.text("status = 'planned'"),
            sqlite_where=sa.text("status = 'planned'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("reminders", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_reminders_planned_due",
            postgresql_where=sa.text("status = 'planned'"),
            sqlite_where=sa.text("status = 'planned'"),
        )
        batch_op.drop_index(
            "ix_reminders_in_flight",
            postgresql_where=sa.text("status IN ('queued', 'sending', 'unknown')"),
            sqlite_where=sa.text("status IN ('queued', 'sending', 'unknown')"),
        )
        batch_op.drop_index("ix_reminders_appointment_id")

    with op.batch_alter_table("appointments", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_appointments_link_token"), type_="unique")
        batch_op.drop_column("link_token")

    op.drop_table("templates")
