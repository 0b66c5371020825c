"""Patients answer: delivery receipts, webhook delivery state of events, inbound lookups.

Revision ID: eb97cb0a66b6
Revises: 2db5b9256892
Create Date: 2026-11-22 21:56:32.062710
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

import reminders.db
from alembic import op

revision: str = "eb97cb0a66b6"
down_revision: str | None = "2db5b9256892"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "delivery_receipts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("provider_message_id", sa.String(length=64), nullable=True),
        sa.Column("client_ref", sa.String(length=40), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("err_code", sa.String(length=8), nullable=True),
        sa.Column("price", sa.Float(), nullable=True),
        sa.Column("received_at", reminders.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("reminder_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["reminder_id"],
            ["reminders.id"],
            name=op.f("fk_delivery_receipts_reminder_id_reminders"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_receipts")),
    )
    with op.batch_alter_table("delivery_receipts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_delivery_receipts_client_ref"), ["client_ref"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_delivery_receipts_provider_message_id"),
            ["provider_message_id"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_delivery_receipts_reminder_id"), ["reminder_id"], unique=False
        )

    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("webhook_status", sa.String(length=16), nullable=False, server_default="none")
        )
        batch_op.add_column(
            sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("webhook_next_at", reminders.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("webhook_error", sa.String(length=300), nullable=True))
        batch_op.add_column(
            sa.Column(
                "webhook_delivered_at", reminders.db.UTCDateTime(timezone=True), nullable=True
            )
        )
        batch_op.create_index(
            "ix_events_webhook_pending",
            ["webhook_next_at"],
            unique=False,
            postgresql_where=sa.text("webhook_status IN ('pending', 'sending')"),
            sqlite_where=sa.text("webhook_status IN ('pending', 'sending')"),
        )

    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.create_index("ix_inbound_messages_concat", ["msisdn", "concat_ref"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_inbound_messages_concat")

    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_events_webhook_pending",
            postgresql_where=sa.text("webhook_status IN ('pending', 'sending')"),
            sqlite_where=sa.text("webhook_status IN ('pending', 'sending')"),
        )
        batch_op.drop_column("webhook_delivered_at")
        batch_op.drop_column("webhook_error")
        batch_op.drop_column("webhook_next_at")
        batch_op.drop_column("webhook_attempts")
        batch_op.drop_column("webhook_status")

    with op.batch_alter_table("delivery_receipts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_delivery_receipts_reminder_id"))
        batch_op.drop_index(batch_op.f("ix_delivery_receipts_provider_message_id"))
        batch_op.drop_index(batch_op.f("ix_delivery_receipts_client_ref"))

    op.drop_table("delivery_receipts")
