"""The schema comes from alembic alone, and the migrations build exactly the models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from alembic import command
from reminders import db
from tests.conftest import PG_ENV, need, pg_url

SCHEMA = f"reminders_migrations_test_{os.getpid()}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """An engine on an empty database (a private schema on PostgreSQL)."""
    if request.param == "sqlite":
        engine = db.make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    else:
        url = sa.make_url(pg_url(need(request.config, PG_ENV)))
        url = url.update_query_dict({"options": f"-csearch_path={SCHEMA}"})
        admin = sa.create_engine(url)
        with admin.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
            connection.execute(sa.text(f"CREATE SCHEMA {SCHEMA}"))
        admin.dispose()
        engine = db.make_engine(url.render_as_string(hide_password=False))
    yield engine
    engine.dispose()
    if request.param == "postgresql":
        with admin.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        admin.dispose()


def differences(engine: sa.Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, db.Base.metadata))


def test_the_migrations_build_exactly_the_models(empty_engine: sa.Engine) -> None:
    assert differences(empty_engine), "an empty database must differ from the models"
    db.migrate(empty_engine)
    assert differences(empty_engine) == []
    assert db.schema_is_current(empty_engine)


def test_the_migrations_go_down_and_up_again(empty_engine: sa.Engine) -> None:
    db.migrate(empty_engine)
    with empty_engine.begin() as connection:
        command.downgrade(db.alembic_config(connection), "base")
    assert not db.schema_is_current(empty_engine)
    assert set(sa.inspect(empty_engine).get_table_names()) <= {"alembic_version"}
    db.migrate(empty_engine)
    assert differences(empty_engine) == []


def test_the_schema_head_the_daemons_check_is_the_newest_migration(
    empty_engine: sa.Engine,
) -> None:
    """Daemons compare the database with db.SCHEMA_HEAD (no alembic import at start): a new
    migration must update it, or every daemon would refuse the migrated database."""
    heads = ScriptDirectory.from_config(db.alembic_config()).get_heads()
    assert heads == [db.SCHEMA_HEAD]
    assert not db.schema_is_current(empty_engine)  # no alembic_version table yet
    db.migrate(empty_engine)
    with empty_engine.connect() as connection:
        stamped = MigrationContext.configure(connection).get_current_revision()
    assert stamped == db.SCHEMA_HEAD
    assert db.schema_is_current(empty_engine)


def test_migrating_twice_is_harmless(empty_engine: sa.Engine) -> None:
    db.migrate(empty_engine)
    db.migrate(empty_engine)
    assert db.schema_is_current(empty_engine)
