"""Sending with real processes: `reminders run` and `tick` on embedded defaults, and two
schedulers with two workers on PostgreSQL + Redis sending every SMS exactly once."""

from __future__ import annotations

import collections
import datetime as dt
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from reminders import db
from reminders.clinics import ClinicOptions, create_clinic
from reminders.models import Clinic, Reminder
from reminders.planning import Intake
from reminders.schemas import AppointmentIn
from tests import vonage_standin as standin
from tests.conftest import REDIS_ENV, TEST_SECRET, need
from tests.test_processes import REMINDERS, clean_env, free_port

TOMORROW = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)


def book_many(
    clinic_id: int, count: int, now: dt.datetime, secret: bytes, starts_at: dt.datetime = TOMORROW
) -> None:
    """`count` appointments (by default tomorrow, so each gets one late reminder, due at once)."""
    with db.session_scope() as session:
        clinic = session.get(Clinic, clinic_id)
        assert clinic is not None
        intake = Intake(session, clinic, now, secret)
        for i in range(count):
            body = AppointmentIn.model_validate(
                {
                    "starts_at": starts_at.isoformat(),
                    "duration_minutes": 15,
                    "patient": {"external_id": f"P{i}", "phone": f"+3361234{i:04d}"},
                }
            )
            intake.put(f"A{i}", body)


def new_clinic(quiet_hours: str | None = "none") -> int:
    with db.session_scope() as session:
        clinic, _ = create_clinic(
            session,
            ClinicOptions(
                name="Clinique du Parc",
                timezone="Europe/Paris",
                country="FR",
                language="fr",
                sender="+33939000000",
                quiet_hours=quiet_hours,
            ),
        )
        return clinic.id


def test_run_sends_due_reminders_on_embedded_defaults(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'reminders.db'}"
    subprocess.run(
        [*REMINDERS, "migrate"],
        env=clean_env(REMINDERS_DATABASE_URL=url),
        check=True,
        capture_output=True,
        timeout=60,
    )
    db.reset()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REMINDERS_DATABASE_URL", url)
        db.reset()
        clinic_id = new_clinic()
        from reminders.config import get_settings
        from reminders.security import secret_key

        with db.session_scope() as session:
            secret = secret_key(session, get_settings())
        book_many(clinic_id, 3, dt.datetime.now(dt.UTC), secret)
        db.reset()
    process = subprocess.Popen(
        [*REMINDERS, "run", "--port", str(free_port())],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while len(lines) < 3 and time.monotonic() < deadline:
            line = process.stderr.readline()
            if line.startswith("SMS console-"):
                lines.append(line)
        assert len(lines) == 3, lines
        assert all("to +33*******" in line for line in lines)
        assert not any("+3361234" in line for line in lines)  # numbers are masked
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
    assert process.returncode == 0


def test_tick_with_now_sends_what_is_due_then_and_prints_one_json_object(
    database: str, tmp_path: Path
) -> None:
    clinic_id = new_clinic(quiet_hours="20:00-08:00")
    starts = dt.datetime(2030, 1, 15, 9, 30, tzinfo=dt.UTC)
    book_many(clinic_id, 2, dt.datetime.now(dt.UTC), TEST_SECRET.encode(), starts)
    env = clean_env(REMINDERS_DATABASE_URL=database, REMINDERS_SECRET_KEY=TEST_SECRET)
    early = subprocess.run(
        [*REMINDERS, "tick", "--now", "2030-01-12T10:29:00+01:00", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(early.stdout) == {"queued": 0, "outcomes": {}}
    later = "2030-01-12T10:30:00+01:00"  # the 72h reminders' time
    result = subprocess.run(
        [*REMINDERS, "tick", "--now", later, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["queued"] == 2
    assert summary["outcomes"] == {"sent": 2}
    assert result.stderr.count("SMS console-") == 2
    again = subprocess.run(
        [*REMINDERS, "tick", "--now", later, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(again.stdout) == {"queued": 0, "outcomes": {}}


def test_tick_refuses_a_now_without_offset(database: str) -> None:
    result = subprocess.run(
        [*REMINDERS, "tick", "--now", "2026-11-23T08:00:00"],
        env=clean_env(REMINDERS_DATABASE_URL=database, REMINDERS_SECRET_KEY=TEST_SECRET),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--now: must carry a UTC offset" in result.stderr


@pytest.mark.redis
@pytest.mark.postgres
def test_two_schedulers_and_two_workers_send_every_sms_exactly_once(
    request: pytest.FixtureRequest, pg_database: str
) -> None:
    database = pg_database
    redis_url = need(request.config, REDIS_ENV)
    redis.Redis.from_url(redis_url).flushdb()
    count = 300
    clinic_id = new_clinic()
    book_many(clinic_id, count, dt.datetime.now(dt.UTC), TEST_SECRET.encode())
    with standin.VonageStandIn() as server:
        env = clean_env(
            REMINDERS_DATABASE_URL=database,
            REMINDERS_REDIS_URL=redis_url,
            REMINDERS_SECRET_KEY=TEST_SECRET,
            REMINDERS_SMS_PROVIDER="vonage",
            REMINDERS_VONAGE_API_KEY="key",
            REMINDERS_VONAGE_API_SECRET="secret",
            REMINDERS_VONAGE_SIGNATURE_SECRET="signature-secret",
            REMINDERS_VONAGE_REST_HOST=server.rest_host,
            REMINDERS_SEND_RATE="10000",
            REQUESTS_CA_BUNDLE=str(server.ca_bundle),
        )
        commands = [
            ["scheduler"],
            ["scheduler"],
            ["worker", "--threads", "4"],
            ["worker", "--threads", "4"],
        ]
        processes = [
            subprocess.Popen(
                [*REMINDERS, *c],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for c in commands
        ]
        try:
            done = wait_for(lambda: final_count() == count, seconds=90)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            outputs = [p.communicate(timeout=60)[1] for p in processes]
        assert done, f"only {final_count()} of {count} finished"
        assert [p.returncode for p in processes] == [0, 0, 0, 0], outputs
        refs = collections.Counter(r.form["client-ref"] for r in server.requests)
    assert len(refs) == count
    assert set(refs.values()) == {1}, [ref for ref, n in refs.items() if n > 1]
    with db.session_scope() as session:
        statuses = dict(
            session.execute(select(Reminder.status, func.count()).group_by(Reminder.status)).all()
        )
    assert statuses == {"sent": count}


def final_count() -> int:
    with db.session_scope() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(Reminder)
                .where(Reminder.status.in_(("sent", "skipped", "failed")))
            )
            or 0
        )


def wait_for(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)  # polling other processes' progress in the database
    return False
