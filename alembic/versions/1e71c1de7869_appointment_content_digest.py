"""Appointments keep a digest of the last body applied, so identical pushes are cheap.

Revision ID: 1e71c1de7869
Revises: eb97cb0a66b6
Create Date: 2026-11-22 22:29:42.561036
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "1e71c1de7869"
down_revision: str | None = "eb97cb0a66b6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("appointments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("content_hash", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("appointments", schema=None) as batch_op:
        batch_op.drop_column("content_hash")
