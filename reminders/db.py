"""Engine, sessions and the declarative base.

The caller owns the transaction: feature modules take a Session and never commit; each entrypoint
opens one with `session_scope()` (or `Session.begin()`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, DateTime, Engine, MetaData, create_engine, event, inspect, text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.types import TypeDecorator

from reminders.config import get_settings

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores UTC, returns aware UTC datetimes, refuses naive ones (they hide bugs)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; pass an aware one")
        value = value.astimezone(dt.UTC)
        # SQLite has no time zones: store naive UTC so that text comparisons order correctly.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine with the settings each backend needs for a multi-threaded service.

    `hide_parameters`: a database error's text (logged, e.g. by dramatiq for a failed message)
    never carries the statement's values, which are patients' numbers and names."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 10}, hide_parameters=True
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # Multi-row INSERTs of 100 rows: psycopg rewrites each statement's placeholders in Python, at
    # a cost that grows faster than the statement, so 1000-row statements cost far more per row.
    # No server-side prepared statements: psycopg prepares a query after 5 runs and PostgreSQL
    # may then keep a generic plan made while a table was empty (seen: 1 s per lookup at 100k).
    return create_engine(
        url,
        # At most 20 connections, all kept: overflow connections would be opened and closed
        # again under a steady load (seen: 9% of the API's CPU in connecting).
        pool_size=20,
        max_overflow=0,
        pool_pre_ping=True,
        hide_parameters=True,
        insertmanyvalues_page_size=100,
        connect_args={"prepare_threshold": None},
    )


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


@lru_cache(maxsize=1)
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commits on success, rolls back on error."""
    with get_sessionmaker().begin() as session:
        yield session


@contextmanager
def autocommit() -> Iterator[Connection]:
    """A connection on which each statement commits alone: for a write that is one statement
    (one round trip to the database instead of BEGIN, the statement and COMMIT)."""
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        yield connection


def reset() -> None:
    """Forgets the cached settings, engine and sessions (tests, and after a fork)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()
    get_settings.cache_clear()


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """Alembic configured in code: the scripts ship in the wheel, or sit beside the package.
    (Alembic is imported here, not above: workers never migrate, and start faster without it.)"""
    from alembic.config import Config as AlembicConfig

    packaged = Path(__file__).parent / "_alembic"
    script_dir = packaged if packaged.is_dir() else Path(__file__).parent.parent / "alembic"
    config = AlembicConfig()
    config.set_main_option("script_location", str(script_dir))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migrate(engine: Engine) -> None:
    """Upgrades the schema to the newest revision."""
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "head")


#: The newest migration's revision, where `reminders migrate` brings a database. Kept here so
#: that every daemon checks the schema with one query at start, without importing alembic (a
#: sixth of a worker's start-up); tests/test_migrations.py fails if a migration is added
#: without updating it.
SCHEMA_HEAD = "b3d9f0c2a871"


def schema_is_current(engine: Engine) -> bool:
    """True when the database is at the newest revision the code knows."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return False
        found = connection.execute(text("SELECT version_num FROM alembic_version")).scalars()
        return set(found) == {SCHEMA_HEAD}
