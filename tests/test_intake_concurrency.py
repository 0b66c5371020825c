"""Intake under concurrency and the promise that an identical push writes nothing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from reminders import db
from reminders.config import get_settings
from reminders.models import Appointment, AppSetting, Patient
from reminders.security import secret_key
from tests.conftest import Cast, appointment_body, statements


def test_an_identical_push_runs_no_write_statement(client: TestClient, cast: Cast) -> None:
    body = appointment_body(source_updated_at="2026-11-20T10:00:00Z")
    assert client.put("/v1/appointments/A1", json=body, headers=cast.auth).status_code == 201
    with statements() as seen:
        again = client.put("/v1/appointments/A1", json=body, headers=cast.auth)
    assert again.json()["result"] == "unchanged"
    assert "SELECT" in seen
    assert not {"INSERT", "UPDATE", "DELETE"} & set(seen), seen


def test_an_identical_batch_runs_no_write_statement(client: TestClient, cast: Cast) -> None:
    items = [{**appointment_body(), "external_id": f"B{i}"} for i in range(20)]
    client.post("/v1/appointments/batch", json={"appointments": items}, headers=cast.auth)
    with statements() as seen:
        client.post("/v1/appointments/batch", json={"appointments": items}, headers=cast.auth)
    assert not {"INSERT", "UPDATE", "DELETE"} & set(seen), seen


def test_concurrent_first_pushes_of_one_appointment_make_one_row(
    client: TestClient, cast: Cast
) -> None:
    def push(i: int) -> int:
        body = appointment_body(location=f"Cabinet {i % 2}")
        response = client.put("/v1/appointments/SAME", json=body, headers=cast.auth)
        code: int = response.status_code
        return code

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(push, range(16)))
    assert set(codes) <= {200, 201}
    assert codes.count(201) == 1
    with db.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Appointment)) == 1
        assert session.scalar(select(func.count()).select_from(Patient)) == 1


def test_concurrent_batches_sharing_new_patients_all_land(client: TestClient, cast: Cast) -> None:
    def batch(n: int) -> list[str]:
        items = [
            {
                **appointment_body(patient={"external_id": f"P{i}", "phone": "0612345678"}),
                "external_id": f"N{n}-{i}",
            }
            for i in range(30)
        ]
        response = client.post(
            "/v1/appointments/batch", json={"appointments": items}, headers=cast.auth
        )
        return [r["result"] for r in response.json()["results"]]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [r for rs in pool.map(batch, range(4)) for r in rs]
    assert results == ["created"] * 120
    with db.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Patient)) == 30


def test_embedded_sqlite_keeps_one_generated_secret_key(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMINDERS_DATABASE_URL", f"sqlite:///{tmp_path / 'e.db'}")
    db.reset()
    db.migrate(db.get_engine())
    with db.session_scope() as session:
        first = secret_key(session, get_settings())
    with db.session_scope() as session:
        assert secret_key(session, get_settings()) == first
        assert session.scalar(select(func.count()).select_from(AppSetting)) == 1
    assert len(first) >= 48
