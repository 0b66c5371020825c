"""The cast: a database (SQLite always; PostgreSQL when REMINDERS_TEST_DATABASE_URL is set), a
clinic with its API key, and an API client.

`--require-services` (CI) turns every skip for a missing PostgreSQL or Redis into a failure.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import sqlalchemy as sa
from dramatiq.brokers.stub import StubBroker
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from reminders import actors, db
from reminders.api import create_app
from reminders.broker import QUEUES, REPLIES_QUEUE
from reminders.clinics import ClinicOptions, create_clinic
from reminders.config import get_settings

# Appointments in tests start ten days from today (the API reads the real clock), at 09:30 Paris
# winter time; `day(n)` gives other days relative to it.
START_DAY = dt.date.today() + dt.timedelta(days=10)


def day(offset: int = 0, time: str = "09:30:00+01:00") -> str:
    return f"{(START_DAY + dt.timedelta(days=offset)).isoformat()}T{time}"


STARTS_AT = day()
STARTS_AT_UTC = day(time="08:30:00Z")
PG_ENV = "REMINDERS_TEST_DATABASE_URL"
REDIS_ENV = "REMINDERS_TEST_REDIS_URL"
# One schema per test process: two test runs on one database never touch each other's rows.
PG_SCHEMA = f"reminders_test_{os.getpid()}"
TEST_SECRET = "test-secret-key-0123456789"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-services",
        action="store_true",
        help="fail (instead of skip) tests whose PostgreSQL or Redis URL is not set",
    )


def need(config: pytest.Config, env: str) -> str:
    """The URL in `env`, or a skip (a failure with --require-services)."""
    url = os.environ.get(env)
    if url:
        return url
    message = f"{env} is not set"
    if config.getoption("--require-services"):
        pytest.fail(f"{message} (--require-services)")
    pytest.skip(message)


def pg_url(base: str) -> str:
    """The test URL with our own schema first in the search path (nothing else is touched)."""
    url = make_url(base)
    if url.drivername in ("postgresql", "postgresql+psycopg2"):
        url = url.set(drivername="postgresql+psycopg")
    return url.update_query_dict({"options": f"-csearch_path={PG_SCHEMA}"}).render_as_string(
        hide_password=False
    )


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No REMINDERS_* variable of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("REMINDERS_") and not name.startswith("REMINDERS_TEST_"):
            monkeypatch.delenv(name)
    db.reset()
    # What webhooks and links queue goes to an in-process broker, never a real Redis.
    stub = StubBroker()
    for queue in QUEUES:
        stub.declare_queue(queue)
    dramatiq.set_broker(stub)
    yield
    db.reset()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (migrating each time would be slow)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.migrate(engine)
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def postgres_base(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated schema in the test PostgreSQL database, once per session."""
    url = pg_url(need(request.config, PG_ENV))
    admin = sa.create_engine(url)
    with admin.begin() as connection:
        connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE"))
        connection.execute(sa.text(f"CREATE SCHEMA {PG_SCHEMA}"))
    engine = db.make_engine(url)
    db.migrate(engine)
    engine.dispose()
    yield url
    with admin.begin() as connection:
        connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE"))
    admin.dispose()


def _truncate(url: str) -> None:
    engine = sa.create_engine(url)
    tables = ", ".join(t.name for t in db.Base.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


def _use_database(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    if kind == "sqlite":
        path = tmp_path / "reminders.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("postgres_base")
    monkeypatch.setenv("REMINDERS_DATABASE_URL", url)
    monkeypatch.setenv("REMINDERS_SECRET_KEY", TEST_SECRET)
    db.reset()
    yield url
    db.reset()
    if kind == "postgresql":
        _truncate(url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """A migrated, empty database for this test, set as REMINDERS_DATABASE_URL."""
    yield from _use_database(request.param, request, monkeypatch, tmp_path)


@pytest.fixture
def pg_database(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """The same, on PostgreSQL only (tests of production set-ups)."""
    yield from _use_database("postgresql", request, monkeypatch, tmp_path)


@dataclass(frozen=True)
class Cast:
    clinic_id: int
    api_key: str
    other_clinic_id: int
    other_api_key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def other_auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.other_api_key}"}


@pytest.fixture
def cast(database: str) -> Cast:
    """Two clinics: a French one (the one under test) and a British one (the neighbour)."""
    with db.session_scope() as session:
        paris, key = create_clinic(
            session,
            ClinicOptions(
                name="Clinique Paris",
                timezone="Europe/Paris",
                country="FR",
                language="fr",
                sender="+33939000000",
            ),
        )
        london, other_key = create_clinic(
            session,
            ClinicOptions(
                name="London Surgery", timezone="Europe/London", country="GB", language="en"
            ),
        )
        return Cast(paris.id, key, london.id, other_key)


@pytest.fixture
def client(database: str) -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client


def use_vonage_provider(monkeypatch: pytest.MonkeyPatch, signature_secret: str) -> None:
    """Settings for the vonage provider (webhooks must then be signed with `signature_secret`),
    read afresh by the next engine and settings."""
    for name, value in {
        "REMINDERS_SMS_PROVIDER": "vonage",
        "REMINDERS_VONAGE_API_KEY": "key",
        "REMINDERS_VONAGE_API_SECRET": "secret",
        "REMINDERS_VONAGE_SIGNATURE_SECRET": signature_secret,
    }.items():
        monkeypatch.setenv(name, value)
    db.reset()


def appointment_body(**overrides: object) -> dict[str, object]:
    """A valid appointment body, as a clinic system would send it."""
    body: dict[str, object] = {
        "starts_at": STARTS_AT,
        "duration_minutes": 20,
        "patient": {
            "external_id": "P1",
            "name": "Marie Curie",
            "phone": "06 12 34 56 78",
            "language": "fr",
        },
        "practitioner": "Dr Martin",
        "location": "Cabinet 2",
        "kind": "consultation",
        "status": "booked",
    }
    body.update(overrides)
    return body


@contextmanager
def statements() -> Iterator[list[str]]:
    """The first word (SELECT, INSERT...) of every SQL statement the application runs meanwhile."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement.strip().split()[0].upper())

    engine = db.get_engine()
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


@contextmanager
def replies_worker() -> Iterator[dramatiq.Worker]:
    """A worker running `apply_replies` on what the webhooks queue in the in-process broker, as
    `reminders worker` would; the answers it queues stay in the SMS queue (nothing is sent)."""
    stub = dramatiq.get_broker()
    actors.configure(get_settings(), broker=stub, rate_limit=False)
    worker = dramatiq.Worker(stub, queues={REPLIES_QUEUE}, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def apply_stored_replies() -> None:
    """Applies every reply the webhooks stored so far, as the worker would."""
    stub = dramatiq.get_broker()
    assert isinstance(stub, StubBroker)
    with replies_worker():
        stub.join(REPLIES_QUEUE, fail_fast=True)
