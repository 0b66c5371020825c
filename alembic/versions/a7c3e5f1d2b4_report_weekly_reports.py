"""Weekly reports (one row per clinic and ISO week); the (clinic, start) index of appointments
also carries the columns the report reads, so it reads the index alone (PostgreSQL).

Branch: report.

Revision ID: a7c3e5f1d2b4
Revises: 664cde27787e
Create Date: 2026-11-23 00:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

import reminders.db
from alembic import op

revision: str = "a7c3e5f1d2b4"
down_revision: str | None = "664cde27787e"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "weekly_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("clinic_id", sa.Integer(), nullable=False),
        sa.Column("week", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("queued_at", reminders.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("built_at", reminders.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["clinic_id"],
            ["clinics.id"],
            name=op.f("fk_weekly_reports_clinic_id_clinics"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_weekly_reports")),
        sa.UniqueConstraint("clinic_id", "week", name=op.f("uq_weekly_reports_clinic_id_week")),
    )
    with op.batch_alter_table("appointments", schema=None) as batch_op:
        batch_op.drop_index("ix_appointments_clinic_starts")
        batch_op.create_index(
            "ix_appointments_clinic_starts",
            ["clinic_id", "starts_at"],
            unique=False,
            postgresql_include=["patient_id", "holdout", "outcome", "confirmation", "booked_at"],
        )


def downgrade() -> None:
    with op.batch_alter_table("appointments", schema=None) as batch_op:
        batch_op.drop_index("ix_appointments_clinic_starts")
        batch_op.create_index(
            "ix_appointments_clinic_starts", ["clinic_id", "starts_at"], unique=False
        )
    op.drop_table("weekly_reports")
