"""The intake API as a clinic system sees it, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from reminders import db
from reminders.clinics import rotate_key
from reminders.models import Appointment, Patient
from tests.conftest import STARTS_AT, STARTS_AT_UTC, Cast, appointment_body, day


def put(client: TestClient, cast: Cast, external_id: str = "A1", **overrides: Any) -> Any:
    return client.put(
        f"/v1/appointments/{external_id}", json=appointment_body(**overrides), headers=cast.auth
    )


def assert_problem(response: Any, status: int, field: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert field in [e["field"] for e in problem["errors"]], problem
    assert problem["detail"]
    return problem


def count(model: type[db.Base]) -> int:
    with db.session_scope() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def test_a_new_appointment_is_created_with_the_patient_normalised(
    client: TestClient, cast: Cast
) -> None:
    response = put(client, cast)
    assert response.status_code == 201
    body = response.json()
    assert body["result"] == "created"
    assert body["external_id"] == "A1"
    assert body["starts_at"] == STARTS_AT_UTC
    assert body["status"] == "booked"
    assert body["confirmation"] == "unconfirmed"
    assert body["outcome"] is None
    assert body["patient"]["phone_e164"] == "+33612345678"
    assert body["patient"]["sms_capable"] is True
    assert body["language"] == "fr"
    assert body["language_fallback"] is False
    assert [(m["kind"], m["rule"], m["status"]) for m in body["messages"]] == [
        ("reminder", "72h", "planned"),
        ("reminder", "24h:unconfirmed", "planned"),
    ]


def test_the_same_body_twice_is_unchanged_and_writes_nothing(
    client: TestClient, cast: Cast
) -> None:
    put(client, cast)
    with db.session_scope() as session:
        before = session.scalars(select(Appointment.updated_at)).one()
        patient_before = session.scalars(select(Patient.updated_at)).one()
    response = put(client, cast)
    assert response.status_code == 200
    assert response.json()["result"] == "unchanged"
    with db.session_scope() as session:
        assert session.scalars(select(Appointment.updated_at)).one() == before
        assert session.scalars(select(Patient.updated_at)).one() == patient_before
    assert count(Appointment) == 1


def test_a_changed_field_is_an_update(client: TestClient, cast: Cast) -> None:
    put(client, cast)
    response = put(client, cast, location="Cabinet 3")
    assert response.status_code == 200
    assert response.json()["result"] == "updated"
    assert response.json()["location"] == "Cabinet 3"


def test_a_changed_patient_phone_is_an_update(client: TestClient, cast: Cast) -> None:
    put(client, cast)
    patient = {"external_id": "P1", "name": "Marie Curie", "phone": "+33 7 81 23 45 67"}
    response = put(client, cast, patient=patient)
    assert response.json()["result"] == "updated"
    assert response.json()["patient"]["phone_e164"] == "+33781234567"


def test_an_older_source_update_is_stale_and_ignored(client: TestClient, cast: Cast) -> None:
    put(client, cast, source_updated_at="2026-11-20T10:00:00+00:00")
    response = put(client, cast, location="Elsewhere", source_updated_at="2026-11-20T09:59:59Z")
    assert response.status_code == 200
    assert response.json()["result"] == "stale"
    assert response.json()["location"] == "Cabinet 2"
    assert response.json()["source_updated_at"] == "2026-11-20T10:00:00Z"
    newer = put(client, cast, location="Elsewhere", source_updated_at="2026-11-20T10:00:01Z")
    assert newer.json()["result"] == "updated"
    assert newer.json()["location"] == "Elsewhere"


def test_the_same_start_written_with_another_offset_is_unchanged(
    client: TestClient, cast: Cast
) -> None:
    put(client, cast)
    response = put(client, cast, starts_at=STARTS_AT_UTC)
    assert response.json()["result"] == "unchanged"


def test_a_patients_cancellation_survives_a_push_with_the_same_start(
    client: TestClient, cast: Cast
) -> None:
    put(client, cast)
    with db.session_scope() as session:
        appointment = session.scalars(select(Appointment)).one()
        appointment.confirmation = "cancelled_by_patient"
        appointment.status = "cancelled"
    response = put(client, cast, status="booked")
    assert response.json()["confirmation"] == "cancelled_by_patient"
    assert response.json()["status"] == "cancelled"


def test_a_new_start_time_is_a_new_booking(client: TestClient, cast: Cast) -> None:
    put(client, cast)
    with db.session_scope() as session:
        appointment = session.scalars(select(Appointment)).one()
        appointment.confirmation = "cancelled_by_patient"
        appointment.status = "cancelled"
    response = put(client, cast, starts_at=day(1, "14:00:00+01:00"), status="booked")
    assert response.json()["result"] == "updated"
    assert response.json()["confirmation"] == "unconfirmed"
    assert response.json()["status"] == "booked"


def test_a_move_skips_the_reminders_planned_for_the_old_time(
    client: TestClient, cast: Cast
) -> None:
    put(client, cast)
    response = put(client, cast, starts_at=day(2))
    messages = [(m["rule"], m["status"], m["skip_reason"]) for m in response.json()["messages"]]
    assert messages == [
        ("72h", "skipped", "moved"),
        ("24h:unconfirmed", "skipped", "moved"),
        ("72h", "planned", None),
        ("24h:unconfirmed", "planned", None),
    ]


def test_another_clinics_appointment_is_a_404(client: TestClient, cast: Cast) -> None:
    put(client, cast)
    response = client.get("/v1/appointments/A1", headers=cast.other_auth)
    assert_problem(response, 404, "external_id")
    assert_problem(
        client.post("/v1/appointments/A1/cancel", headers=cast.other_auth), 404, "external_id"
    )
    # The neighbour's PUT with the same id makes its own appointment; ours is untouched.
    neighbour = {"external_id": "P1", "phone": "+33 6 12 34 56 78"}
    other = client.put(
        "/v1/appointments/A1",
        json=appointment_body(location="London", patient=neighbour),
        headers=cast.other_auth,
    )
    assert other.status_code == 201
    assert client.get("/v1/appointments/A1", headers=cast.auth).json()["location"] == "Cabinet 2"


def test_get_returns_the_appointment(client: TestClient, cast: Cast) -> None:
    put(client, cast)
    response = client.get("/v1/appointments/A1", headers=cast.auth)
    assert response.status_code == 200
    assert response.json()["external_id"] == "A1"
    assert response.json()["result"] is None


def test_an_unknown_appointment_is_a_404(client: TestClient, cast: Cast) -> None:
    assert_problem(client.get("/v1/appointments/nope", headers=cast.auth), 404, "external_id")


def test_the_clinic_cancels_once(client: TestClient, cast: Cast) -> None:
    put(client, cast)
    first = client.post("/v1/appointments/A1/cancel", headers=cast.auth)
    assert first.status_code == 200
    assert first.json()["result"] == "cancelled"
    assert first.json()["status"] == "cancelled"
    again = client.post("/v1/appointments/A1/cancel", headers=cast.auth)
    assert again.json()["result"] == "unchanged"


def test_ids_with_spaces_and_unicode_round_trip(client: TestClient, cast: Cast) -> None:
    response = put(client, cast, external_id="RDV 2026/été")
    assert response.status_code == 201
    got = client.get("/v1/appointments/RDV%202026%2F%C3%A9t%C3%A9", headers=cast.auth)
    assert got.status_code == 200
    assert got.json()["external_id"] == "RDV 2026/été"


# --- authentication -------------------------------------------------------------------------


def test_a_missing_key_is_401(client: TestClient, cast: Cast) -> None:
    response = client.put("/v1/appointments/A1", json=appointment_body())
    assert_problem(response, 401, "Authorization")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert count(Appointment) == 0


def test_a_wrong_key_is_401(client: TestClient, cast: Cast) -> None:
    response = client.get("/v1/appointments/A1", headers={"Authorization": "Bearer rk_wrong"})
    assert_problem(response, 401, "Authorization")
    basic = client.get("/v1/appointments/A1", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert_problem(basic, 401, "Authorization")


def test_a_rotated_key_stops_working_at_once(client: TestClient, cast: Cast) -> None:
    assert put(client, cast).status_code == 201
    with db.session_scope() as session:
        new_key = rotate_key(session, cast.clinic_id)
    assert_problem(client.get("/v1/appointments/A1", headers=cast.auth), 401, "Authorization")
    fresh = client.get("/v1/appointments/A1", headers={"Authorization": f"Bearer {new_key}"})
    assert fresh.status_code == 200


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"starts_at": day(time="09:30:00")}, "starts_at"),
        ({"starts_at": "next tuesday"}, "starts_at"),
        ({"duration_minutes": 0}, "duration_minutes"),
        ({"duration_minutes": -5}, "duration_minutes"),
        ({"duration_minutes": 1441}, "duration_minutes"),
        ({"status": "postponed"}, "status"),
        ({"outcome": "maybe"}, "outcome"),
        ({"patient": {"external_id": "P1", "phone": "06 12", "language": "fr"}}, "patient.phone"),
        ({"patient": {"external_id": "P1", "phone": "not a number"}}, "patient.phone"),
        ({"patient": {"external_id": "P1", "language": "xx-invalid!"}}, "patient.language"),
        ({"patient": {"external_id": "", "phone": "0612345678"}}, "patient.external_id"),
        ({"patient": {"name": "No id"}}, "patient.external_id"),
        ({"source_updated_at": "2026-11-20T10:00:00"}, "source_updated_at"),
        ({"practitioner": "x" * 201}, "practitioner"),
    ],
)
def test_a_bad_field_is_a_422_naming_it_and_writes_nothing(
    client: TestClient, cast: Cast, overrides: dict[str, Any], field: str
) -> None:
    assert_problem(put(client, cast, **overrides), 422, field)
    assert count(Appointment) == 0
    assert count(Patient) == 0


def test_a_missing_start_is_named(client: TestClient, cast: Cast) -> None:
    body = appointment_body()
    del body["starts_at"]
    problem = assert_problem(
        client.put("/v1/appointments/A1", json=body, headers=cast.auth), 422, "starts_at"
    )
    assert "required" in problem["detail"]


def test_an_outcome_for_a_future_appointment_is_refused(client: TestClient, cast: Cast) -> None:
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).isoformat()
    assert_problem(put(client, cast, starts_at=future, outcome="attended"), 422, "outcome")
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(days=3)).isoformat()
    response = put(client, cast, starts_at=past, outcome="attended")
    assert response.status_code == 201
    assert response.json()["outcome"] == "attended"


def test_an_appointment_in_the_past_is_accepted(client: TestClient, cast: Cast) -> None:
    response = put(client, cast, starts_at="2020-01-06T09:00:00+01:00")
    assert response.status_code == 201
    assert response.json()["messages"] == []


@pytest.mark.parametrize(
    ("external_id", "reason"),
    [("", "empty"), ("x" * 201, "200"), ("%FF%FE", "UTF-8"), ("a%00b", "control")],
)
def test_a_bad_external_id_is_a_422(
    client: TestClient, cast: Cast, external_id: str, reason: str
) -> None:
    response = client.put(
        f"/v1/appointments/{external_id}", json=appointment_body(), headers=cast.auth
    )
    problem = assert_problem(response, 422, "external_id")
    assert reason in problem["detail"]
    assert count(Appointment) == 0


def test_invalid_json_is_a_400(client: TestClient, cast: Cast) -> None:
    response = client.put(
        "/v1/appointments/A1",
        content=b'{"starts_at": ',
        headers={**cast.auth, "Content-Type": "application/json"},
    )
    problem = assert_problem(response, 400, "body")
    assert "invalid JSON" in problem["detail"]


def test_an_empty_body_is_a_422(client: TestClient, cast: Cast) -> None:
    response = client.put(
        "/v1/appointments/A1",
        content=b"",
        headers={**cast.auth, "Content-Type": "application/json"},
    )
    assert_problem(response, 422, "body")


def test_a_five_megabyte_body_is_a_413(client: TestClient, cast: Cast) -> None:
    big = json.dumps({**appointment_body(), "padding": "x" * (5 * 1024 * 1024)}).encode()
    response = client.put(
        "/v1/appointments/A1",
        content=big,
        headers={**cast.auth, "Content-Type": "application/json"},
    )
    assert_problem(response, 413, "body")
    assert count(Appointment) == 0


def test_a_streamed_body_without_length_is_limited_too(client: TestClient, cast: Cast) -> None:
    def chunks() -> Any:
        for _ in range(5):
            yield b"x" * (1024 * 1024)

    response = client.put(
        "/v1/appointments/A1",
        content=chunks(),
        headers={**cast.auth, "Content-Type": "application/json"},
    )
    assert_problem(response, 413, "body")


def test_unknown_fields_are_ignored(client: TestClient, cast: Cast) -> None:
    response = put(client, cast, room_colour="blue")
    assert response.status_code == 201
    assert "room_colour" not in response.json()


# --- languages ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "used", "fallback"),
    [
        ("fr", "fr", False),
        ("fr-FR", "fr", False),
        ("fre", "fr", False),
        ("zh-Hans", "zh", False),
        ("zh-CN", "zh", False),
        ("ru", "ru", False),
        ("en_GB", "en", False),
        ("de", "fr", True),
        (None, "fr", False),
    ],
)
def test_languages_are_normalised_with_a_fallback_to_the_clinics(
    client: TestClient, cast: Cast, tag: str | None, used: str, fallback: bool
) -> None:
    patient = {"external_id": "P1", "phone": "0612345678", "language": tag}
    body = put(client, cast, patient=patient).json()
    assert body["language"] == used
    assert body["language_fallback"] is fallback


# --- phone numbers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phone", "e164", "sms_capable"),
    [
        ("06 12 34 56 78", "+33612345678", True),
        ("+33 6 12 34 56 78", "+33612345678", True),
        ("0033612345678", "+33612345678", True),
        ("01 42 68 53 00", "+33142685300", False),
        ("+44 7911 123456", "+447911123456", True),
        ("+7 912 345-67-89", "+79123456789", True),
    ],
)
def test_phones_are_stored_as_e164_and_fixed_lines_marked(
    client: TestClient, cast: Cast, phone: str, e164: str, sms_capable: bool
) -> None:
    body = put(client, cast, patient={"external_id": "P1", "phone": phone}).json()
    assert body["patient"]["phone_e164"] == e164
    assert body["patient"]["sms_capable"] is sms_capable


def test_a_patient_without_phone_is_accepted_but_not_sms_capable(
    client: TestClient, cast: Cast
) -> None:
    body = put(client, cast, patient={"external_id": "P1", "name": "No Phone"}).json()
    assert body["patient"]["phone_e164"] is None
    assert body["patient"]["sms_capable"] is False


# --- batch ----------------------------------------------------------------------------------


def batch_item(external_id: str, **overrides: Any) -> dict[str, Any]:
    return {**appointment_body(**overrides), "external_id": external_id}


def test_a_batch_applies_good_items_and_names_the_bad_ones(client: TestClient, cast: Cast) -> None:
    items = [
        batch_item("B1"),
        batch_item("B2", duration_minutes=0),
        batch_item("B3", patient={"external_id": "P3", "phone": "123"}),
        {"starts_at": STARTS_AT},
        batch_item("B4", patient={"external_id": "P4", "phone": "07 81 23 45 67"}),
    ]
    response = client.post(
        "/v1/appointments/batch", json={"appointments": items}, headers=cast.auth
    )
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["external_id"] for r in results] == ["B1", "B2", "B3", None, "B4"]
    assert [r["result"] for r in results] == ["created", "error", "error", "error", "created"]
    assert results[1]["error"]["errors"][0]["field"] == "duration_minutes"
    assert results[2]["error"]["errors"][0]["field"] == "patient.phone"
    assert results[1]["error"]["status"] == 422
    assert count(Appointment) == 2


def test_a_batch_twice_is_all_unchanged(client: TestClient, cast: Cast) -> None:
    items = [
        batch_item(f"B{i}", patient={"external_id": f"P{i % 3}", "phone": "0612345678"})
        for i in range(10)
    ]
    first = client.post("/v1/appointments/batch", json={"appointments": items}, headers=cast.auth)
    assert {r["result"] for r in first.json()["results"]} == {"created"}
    second = client.post("/v1/appointments/batch", json={"appointments": items}, headers=cast.auth)
    assert {r["result"] for r in second.json()["results"]} == {"unchanged"}
    assert count(Patient) == 3


def test_the_same_id_twice_in_a_batch_applies_in_order(client: TestClient, cast: Cast) -> None:
    items = [batch_item("B1"), batch_item("B1", location="Cabinet 9")]
    results = client.post(
        "/v1/appointments/batch", json={"appointments": items}, headers=cast.auth
    ).json()["results"]
    assert [r["result"] for r in results] == ["created", "updated"]
    assert client.get("/v1/appointments/B1", headers=cast.auth).json()["location"] == "Cabinet 9"


def test_a_batch_of_1001_is_refused(client: TestClient, cast: Cast) -> None:
    items = [batch_item(f"B{i}") for i in range(1001)]
    response = client.post(
        "/v1/appointments/batch", json={"appointments": items}, headers=cast.auth
    )
    problem = assert_problem(response, 422, "appointments")
    assert "1000" in problem["detail"]
    assert count(Appointment) == 0


def test_a_batch_of_1000_is_accepted(client: TestClient, cast: Cast) -> None:
    items = [
        batch_item(f"B{i}", patient={"external_id": f"P{i}", "phone": "0612345678"})
        for i in range(1000)
    ]
    response = client.post(
        "/v1/appointments/batch", json={"appointments": items}, headers=cast.auth
    )
    assert response.status_code == 200
    assert len(response.json()["results"]) == 1000
    assert count(Appointment) == 1000


def test_a_batch_item_with_an_invalid_unicode_id_is_an_error(
    client: TestClient, cast: Cast
) -> None:
    raw = (
        '{"appointments": ['
        + json.dumps(batch_item("ok"))[:-1]
        + ', "external_id": "bad\\ud800"}]}'
    ).encode()
    response = client.post(
        "/v1/appointments/batch",
        content=raw,
        headers={**cast.auth, "Content-Type": "application/json"},
    )
    assert response.status_code == 200
    [result] = response.json()["results"]
    assert result["result"] == "error"
    assert result["error"]["errors"][0]["field"] == "external_id"
    assert count(Appointment) == 0


def test_a_batch_needs_a_key(client: TestClient, cast: Cast) -> None:
    response = client.post("/v1/appointments/batch", json={"appointments": []})
    assert_problem(response, 401, "Authorization")


# --- service endpoints ----------------------------------------------------------------------


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["database"] == "ok"


def test_openapi_and_docs_are_served(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/v1/appointments/{external_id}" in spec["paths"]
    assert "/v1/appointments/batch" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_an_unknown_route_is_a_problem(client: TestClient) -> None:
    assert_problem(client.get("/v2/nothing"), 404, "path")


def test_the_same_body_after_a_clinic_cancellation_books_again(
    client: TestClient, cast: Cast
) -> None:
    put(client, cast)
    client.post("/v1/appointments/A1/cancel", headers=cast.auth)
    again = put(client, cast)
    assert again.json()["result"] == "updated"
    assert again.json()["status"] == "booked"
    assert {m["status"] for m in again.json()["messages"]} == {"planned"}


def test_an_older_clock_on_an_identical_body_is_stale(client: TestClient, cast: Cast) -> None:
    put(client, cast, source_updated_at="2026-11-20T10:00:00Z")
    older = put(client, cast, source_updated_at="2026-11-19T10:00:00Z")
    assert older.json()["result"] == "stale"
    newer = put(client, cast, source_updated_at="2026-11-21T10:00:00Z")
    assert newer.json()["result"] == "unchanged"
    assert newer.json()["source_updated_at"] == "2026-11-21T10:00:00Z"
