"""Index the inbound SMS not yet applied: the webhook stores them, a worker applies them.

Revision ID: b3d9f0c2a871
Revises: a7c3e5f1d2b4
Create Date: 2026-11-23 03:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "b3d9f0c2a871"
down_revision: str | None = "a7c3e5f1d2b4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_inbound_messages_pending",
            ["id"],
            unique=False,
            postgresql_where=sa.text("result IS NULL"),
            sqlite_where=sa.text("result IS NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_inbound_messages_pending")
