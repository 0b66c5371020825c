"""FHIR R4 intake (`/fhir`): realistic resources under tests/data/fhir/, mapped onto the same
upsert as /v1, read back with the patient's answer, and every bad input as an OperationOutcome."""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.appointment import Appointment as FhirAppointment
from fhir.resources.R4B.operationoutcome import OperationOutcome
from sqlalchemy import select

from reminders import db, fhir, replies
from reminders.api import create_app
from reminders.models import Appointment
from tests.conftest import STARTS_AT, Cast

DATA = Path(__file__).parent / "data" / "fhir"
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def load(name: str, start: str | None = None) -> dict[str, Any]:
    """A resource from tests/data/fhir; `start` moves it (keeping its length)."""
    resource: dict[str, Any] = json.loads((DATA / name).read_text())
    if start is not None:
        old = dt.datetime.fromisoformat(resource["start"])
        new = dt.datetime.fromisoformat(start)
        resource["start"] = new.isoformat()
        if "end" in resource:
            resource["end"] = (new + (dt.datetime.fromisoformat(resource["end"]) - old)).isoformat()
    return resource


def past(days: int = 2) -> str:
    return (dt.datetime.now(dt.UTC) - dt.timedelta(days=days)).replace(microsecond=0).isoformat()


@pytest.fixture
def api(database: str) -> Iterator[TestClient]:
    app = create_app()
    if not any(str(getattr(r, "path", "")).startswith("/fhir") for r in app.routes):
        app.include_router(fhir.router)
    with TestClient(app) as test_client:
        yield test_client


def put(
    api: TestClient, cast: Cast, resource: dict[str, Any], external_id: str
) -> Any:  # httpx.Response
    return api.put(
        f"/fhir/Appointment/{external_id}",
        content=json.dumps(resource),
        headers={**cast.auth, **FHIR_JSON},
    )


def v1(api: TestClient, cast: Cast, external_id: str) -> dict[str, Any]:
    response = api.get(f"/v1/appointments/{external_id}", headers=cast.auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def read(api: TestClient, cast: Cast, external_id: str) -> dict[str, Any]:
    response = api.get(f"/fhir/Appointment/{external_id}", headers=cast.auth)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    FhirAppointment.model_validate(body)  # valid R4
    return body


def patient_participant(resource: dict[str, Any]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        p for p in resource["participant"] if p["actor"].get("type") == "Patient"
    ]
    assert len(found) == 1
    return found[0]


def decide(external_id: str, action: replies.Action) -> None:
    with db.session_scope() as session:
        appointment = session.scalar(
            select(Appointment).where(Appointment.external_id == external_id)
        )
        assert appointment is not None
        replies.decide(session, appointment, action, "link", dt.datetime.now(dt.UTC))


def test_contained_patient_created_updated_unchanged(api: TestClient, cast: Cast) -> None:
    resource = load("appointment_contained.json", STARTS_AT)
    created = put(api, cast, resource, "EPIC-CSN-8812")
    assert created.status_code == 201, created.text
    assert created.headers["x-reminders-result"] == "created"
    assert created.headers["content-type"].startswith("application/fhir+json")
    assert created.headers["location"] == "/fhir/Appointment/EPIC-CSN-8812"
    FhirAppointment.model_validate(created.json())

    stored = v1(api, cast, "EPIC-CSN-8812")
    assert stored["patient"]["external_id"] == "E4012"  # the first identifier
    assert stored["patient"]["name"] == "Marie Curie"  # given + family
    assert stored["patient"]["phone_e164"] == "+33612345678"  # the mobile, not the home line
    assert stored["patient"]["language_requested"] == "fr-FR"  # the preferred one
    assert stored["language"] == "fr"
    assert stored["kind"] == "Consultation de suivi"  # serviceType before appointmentType
    assert stored["practitioner"] == "Dr Martin"
    assert stored["location"] == "Cabinet 2"
    assert stored["duration_minutes"] == 20  # end - start
    assert stored["status"] == "booked"
    assert stored["source_updated_at"] == "2026-11-20T10:00:00Z"

    again = put(api, cast, resource, "EPIC-CSN-8812")
    assert again.status_code == 200
    assert again.headers["x-reminders-result"] == "unchanged"

    moved = copy.deepcopy(resource)
    moved["meta"]["lastUpdated"] = "2026-11-21T09:00:00Z"
    moved["participant"][1]["actor"]["display"] = "Dr Bernard"
    updated = put(api, cast, moved, "EPIC-CSN-8812")
    assert updated.status_code == 200
    assert updated.headers["x-reminders-result"] == "updated"
    assert v1(api, cast, "EPIC-CSN-8812")["practitioner"] == "Dr Bernard"

    # Plain JSON is accepted too.
    plain = api.put(
        "/fhir/Appointment/EPIC-CSN-8812",
        json=moved,
        headers=cast.auth,
    )
    assert plain.headers["x-reminders-result"] == "unchanged"


def test_referenced_patient_put_first(api: TestClient, cast: Cast) -> None:
    patient = load("patient.json")
    headers = {**cast.auth, **FHIR_JSON}
    first = api.put("/fhir/Patient/pat-42", content=json.dumps(patient), headers=headers)
    assert first.status_code == 201, first.text
    assert first.json()["resourceType"] == "Patient"
    assert api.put("/fhir/Patient/pat-42", json=patient, headers=cast.auth).status_code == 200

    posted = api.post(
        "/fhir/Appointment",
        content=json.dumps(load("appointment_referenced.json", STARTS_AT)),
        headers=headers,
    )
    assert posted.status_code == 201, posted.text
    assert posted.headers["location"] == "/fhir/Appointment/HAPI-1203"  # the identifier value

    stored = v1(api, cast, "HAPI-1203")
    assert stored["patient"]["external_id"] == "pat-42"
    assert stored["patient"]["name"] == "Ivan Petrov"
    assert stored["patient"]["phone_e164"] == "+33781234567"  # system sms beats the work phone
    assert stored["patient"]["language_requested"] == "ru"
    assert stored["kind"] == "Follow-up encounter"  # appointmentType's display
    assert stored["duration_minutes"] == 30  # minutesDuration wins over end - start
    assert stored["practitioner"] == "Dr Nguyen"  # an absolute Practitioner URL
    assert stored["location"] == "Radiologie"
    assert stored["status"] == "booked"  # pending

    body = read(api, cast, "HAPI-1203")
    assert body["id"] == "HAPI-1203"
    assert body["identifier"] == [{"value": "HAPI-1203"}]
    assert patient_participant(body)["actor"]["reference"] == "Patient/pat-42"


def test_get_shows_the_patients_confirmation(api: TestClient, cast: Cast) -> None:
    assert put(api, cast, load("appointment_contained.json", STARTS_AT), "A1").status_code == 201
    body = read(api, cast, "A1")
    assert body["status"] == "booked"
    assert body["minutesDuration"] == 20
    assert body["start"] == dt.datetime.fromisoformat(STARTS_AT).astimezone(dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert patient_participant(body)["status"] == "needs-action"
    others = {p["actor"]["type"]: p["actor"]["display"] for p in body["participant"]}
    assert others == {
        "Patient": "Marie Curie",
        "Practitioner": "Dr Martin",
        "Location": "Cabinet 2",
    }

    decide("A1", "confirm")
    body = read(api, cast, "A1")
    assert patient_participant(body)["status"] == "accepted"
    assert body["status"] == "booked"
    assert "cancelationReason" not in body


def test_get_shows_the_patients_cancellation(api: TestClient, cast: Cast) -> None:
    resource = load("appointment_contained.json", STARTS_AT)
    assert put(api, cast, resource, "A1").status_code == 201
    decide("A1", "cancel")
    body = read(api, cast, "A1")
    assert body["status"] == "cancelled"
    assert patient_participant(body)["status"] == "declined"
    assert body["cancelationReason"]["text"] == fhir.PATIENT_CANCELLED

    # The clinic system pushing the same booking again does not undo it.
    resource["meta"]["lastUpdated"] = "2026-11-22T09:00:00Z"
    put(api, cast, resource, "A1")
    assert read(api, cast, "A1")["status"] == "cancelled"


def test_cancelled_by_the_clinic(api: TestClient, cast: Cast) -> None:
    assert put(api, cast, load("appointment_contained.json", STARTS_AT), "EPIC-CSN-8812").is_success
    cancelled = put(api, cast, load("appointment_cancelled.json", STARTS_AT), "EPIC-CSN-8812")
    assert cancelled.headers["x-reminders-result"] == "updated"
    assert v1(api, cast, "EPIC-CSN-8812")["status"] == "cancelled"
    body = read(api, cast, "EPIC-CSN-8812")
    assert body["status"] == "cancelled"
    assert patient_participant(body)["status"] == "needs-action"  # not the patient's doing
    assert "cancelationReason" not in body


def test_noshow_and_arrived(api: TestClient, cast: Cast) -> None:
    noshow = put(api, cast, load("appointment_noshow.json", past()), "NS-1")
    assert noshow.status_code == 201, noshow.text
    stored = v1(api, cast, "NS-1")
    assert (stored["status"], stored["outcome"]) == ("booked", "no_show")
    # No identifier on the contained Patient: keyed by its number in E.164.
    assert stored["patient"]["external_id"] == "+33781234567"
    assert stored["kind"] == "vaccination"  # a coding's code when it has no display
    assert read(api, cast, "NS-1")["status"] == "noshow"

    arrived = put(api, cast, load("appointment_arrived.json", past()), "AR-1")
    assert arrived.status_code == 201, arrived.text
    stored = v1(api, cast, "AR-1")
    assert (stored["status"], stored["outcome"]) == ("booked", "attended")
    assert stored["patient"]["name"] == "Oliver Smith"
    assert stored["patient"]["phone_e164"] == "+447911123456"
    assert stored["language"] == "en"
    assert stored["duration_minutes"] == 30
    assert read(api, cast, "AR-1")["status"] == "fulfilled"


def test_an_older_version_is_stale(api: TestClient, cast: Cast) -> None:
    resource = load("appointment_contained.json", STARTS_AT)
    assert put(api, cast, resource, "A1").status_code == 201
    older = copy.deepcopy(resource)
    older["meta"]["lastUpdated"] = "2026-11-19T10:00:00Z"
    older["participant"][2]["actor"]["display"] = "Cabinet 9"
    answer = put(api, cast, older, "A1")
    assert answer.status_code == 200
    assert answer.headers["x-reminders-result"] == "stale"
    assert v1(api, cast, "A1")["location"] == "Cabinet 2"


def _outcome(response: Any, status: int, code: str, where: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    OperationOutcome.model_validate(body)
    issue: dict[str, Any] = body["issue"][0]
    assert issue["severity"] == "error"
    assert issue["code"] == code
    assert issue["diagnostics"]
    if where is not None:
        assert any(where in e for e in issue["expression"]), issue
    return issue


BAD = [
    ("bad_patient_as_appointment.json", 400, "invalid", "resourceType"),
    ("bad_date.json", 422, "invalid", "Appointment.start"),
    ("bad_no_patient.json", 422, "invalid", "Appointment.participant"),
    ("bad_no_start.json", 422, "invalid", "Appointment.start"),
    ("bad_waitlist.json", 422, "invalid", "Appointment.status"),
    ("bad_unknown_patient.json", 422, "not-found", "Appointment.participant[0].actor"),
    ("bad_phone.json", 422, "invalid", "Patient.telecom"),
]


@pytest.mark.parametrize(("name", "status", "code", "where"), BAD)
def test_bad_resources(
    api: TestClient, cast: Cast, name: str, status: int, code: str, where: str
) -> None:
    response = put(api, cast, load(name), "BAD-1")
    _outcome(response, status, code, where)
    missing = api.get("/fhir/Appointment/BAD-1", headers=cast.auth)
    _outcome(missing, 404, "not-found", "Appointment.id")  # nothing was written


def test_other_bad_requests(api: TestClient, cast: Cast) -> None:
    headers = {**cast.auth, **FHIR_JSON}
    url = "/fhir/Appointment/A1"
    _outcome(
        api.put(url, content=b'{"resourceType": "Appoint', headers=headers), 400, "structure", None
    )
    _outcome(api.put(url, content=b"", headers=headers), 400, "structure", None)
    _outcome(api.put(url, content=b"[1, 2]", headers=headers), 400, "structure", None)
    _outcome(api.put(url, content=b"\xff\xfe", headers=headers), 400, "structure", None)
    _outcome(
        api.put(url, content=b"<Appointment/>", headers={**cast.auth, "Content-Type": "text/xml"}),
        415,
        "not-supported",
        None,
    )
    # POST without an identifier: nothing to key it by.
    _outcome(
        api.post("/fhir/Appointment", json=load("bad_no_identifier.json"), headers=cast.auth),
        422,
        "invalid",
        "Appointment.identifier",
    )
    # A body whose id is not the URL's.
    resource = {**load("appointment_contained.json", STARTS_AT), "id": "A1"}
    _outcome(put(api, cast, resource, "OTHER"), 400, "invalid", "Appointment.id")
    # An outcome before the appointment started.
    noshow = load("appointment_noshow.json", STARTS_AT)
    _outcome(put(api, cast, noshow, "NS-1"), 422, "invalid", "Appointment.status")
    # An Appointment sent as a Patient.
    _outcome(
        api.put("/fhir/Patient/p1", json=resource, headers=cast.auth),
        400,
        "invalid",
        "resourceType",
    )
    # A Patient with a bad date (R4B validation).
    _outcome(
        api.put(
            "/fhir/Patient/p1",
            json={"resourceType": "Patient", "birthDate": "1967-13-45"},
            headers=cast.auth,
        ),
        422,
        "invalid",
        "Patient.birthDate",
    )
    # Over the size limit: refused before it is read.
    big = api.put(url, content=b" " * (3 * 1024 * 1024), headers=headers)
    assert big.status_code == 413


def test_another_clinics_appointment_is_not_found(api: TestClient, cast: Cast) -> None:
    assert put(api, cast, load("appointment_contained.json", STARTS_AT), "A1").status_code == 201
    response = api.get("/fhir/Appointment/A1", headers=cast.other_auth)
    _outcome(response, 404, "not-found", "Appointment.id")


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic dXNlcjpwYXNz"}]
)
def test_auth(api: TestClient, cast: Cast, headers: dict[str, str]) -> None:
    resource = json.dumps(load("appointment_contained.json", STARTS_AT))
    for response in (
        api.put("/fhir/Appointment/A1", content=resource, headers={**headers, **FHIR_JSON}),
        api.get("/fhir/Appointment/A1", headers=headers),
    ):
        _outcome(response, 401, "security", "Authorization")
        assert response.headers["www-authenticate"].startswith("Bearer")
