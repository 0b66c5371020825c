"""Alembic environment: runs on the connection `reminders.db.migrate` passes, else on the
database of REMINDERS_DATABASE_URL."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from alembic import context
from reminders import models  # noqa: F401  (registers the tables)
from reminders.config import get_settings
from reminders.db import Base, make_engine

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(get_settings().database_url)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported: run `reminders migrate`")
run_migrations_online()
