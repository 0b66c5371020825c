"""Hostile input (issue 7): generated requests against every operation of /openapi.json (with a
clinic's key and without), fuzzed webhooks, and the OWASP API checks not already covered by
test_api, test_links, test_texts, test_grammar and test_normalize (which fuzz the reply parser,
phone parsing and template rendering, and check oversized bodies, rotated keys, tokens for another
appointment and clinic names with newlines and URLs)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from reminders import db, dispatch
from reminders.api import create_app
from reminders.models import Appointment, Clinic, InboundMessage, Reminder, Template
from reminders.texts import single_line
from tests.conftest import Cast, apply_stored_replies, appointment_body, use_vonage_provider
from tests.vonage_standin import sign

SIGNATURE_SECRET = "hostile-signature-secret"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MAX_EXAMPLES = 25  # per operation and per key: the whole run stays well under two minutes


@pytest.fixture
def vonage_app(database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The API on the vonage provider (webhooks must be signed)."""
    use_vonage_provider(monkeypatch, SIGNATURE_SECRET)
    with TestClient(create_app()) as client:
        yield client


# -- every operation of the schema, generated -------------------------------------------------


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("keyed", [True, False], ids=["with-key", "without-key"])
def test_no_generated_request_gets_a_5xx_or_an_answer_outside_the_schema(
    cast: Cast, keyed: bool, mode: GenerationMode
) -> None:
    """Valid requests (positive) and requests breaking the schema (negative), for every
    operation: never a 5xx, never a status, content type or body the schema does not give."""
    app = create_app()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = cast.auth if keyed else {}
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 10  # appointments, batch, events, FHIR, webhooks, health
    for operation in operations:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            response = case.call(headers=headers)
            case.validate_response(response, checks=CHECKS, headers=headers)

        try:
            run()
        except Unsatisfiable:
            # Nothing the schema constrains to break (GET /healthz; FHIR reads its body itself).
            assert mode is GenerationMode.NEGATIVE, operation.label


def test_an_events_cursor_beyond_any_id_is_a_422_not_a_database_error(
    client: TestClient, cast: Cast
) -> None:
    """Found by the run above: `after=2147483648` overflowed PostgreSQL's integer (a 500)."""
    response = client.get("/v1/events?after=2147483648", headers=cast.auth)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "after"
    assert client.get("/v1/events?after=2147483647", headers=cast.auth).status_code == 200


# -- webhooks, fuzzed ---------------------------------------------------------------------------

FIELD = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
WEBHOOK_FIELDS = st.dictionaries(
    st.sampled_from(
        [
            "msisdn", "to", "text", "type", "messageId", "message-id", "concat", "concat-ref",
            "concat-total", "concat-part", "status", "err-code", "price", "client-ref",
            "keyword", "nonce",
        ]
    )
    | FIELD,
    FIELD,
    max_size=12,
)  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(["/webhooks/vonage/inbound", "/webhooks/vonage/status"]),
    fields=WEBHOOK_FIELDS,
    signed=st.booleans(),
    how=st.sampled_from(["form", "json", "query"]),
)
def test_any_webhook_gets_200_or_401_and_never_a_server_error(
    vonage_app: TestClient, path: str, fields: dict[str, str], signed: bool, how: str
) -> None:
    params = {k: v for k, v in fields.items() if k not in ("sig", "timestamp")}
    if signed:
        params["timestamp"] = str(int(dt.datetime.now(dt.UTC).timestamp()))
        params["sig"] = sign(params, SIGNATURE_SECRET)
    if how == "form":
        response = vonage_app.post(path, data=params)
    elif how == "json":
        response = vonage_app.post(path, json=params)
    else:
        response = vonage_app.get(path, params=params)
    # NUL is dropped before the check (PostgreSQL refuses it), so it breaks a signature.
    valid = signed and not any("\x00" in k + v for k, v in params.items())
    assert response.status_code == (200 if valid else 401), response.text
    assert isinstance(response.json(), dict)
    apply_stored_replies()  # whatever was stored applies without an error
    with db.session_scope() as session:
        results = set(session.scalars(select(InboundMessage.result)))
    assert None not in results
    assert "error" not in results


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.binary(max_size=300), kind=st.sampled_from(["application/json", "text/plain", ""]))
def test_a_webhook_body_of_random_bytes_is_refused_cleanly(
    vonage_app: TestClient, body: bytes, kind: str
) -> None:
    response = vonage_app.post(
        "/webhooks/vonage/inbound", content=body, headers={"Content-Type": kind}
    )
    assert response.status_code in (400, 401, 422), response.text


# -- OWASP API checks ---------------------------------------------------------------------------


def book(client: TestClient, cast: Cast, **overrides: Any) -> None:
    response = client.put(
        "/v1/appointments/A1", json=appointment_body(**overrides), headers=cast.auth
    )
    assert response.status_code == 201, response.text


ROUTES = [
    ("GET", "/v1/appointments/A1"),
    ("POST", "/v1/appointments/A1/cancel"),
    ("POST", "/v1/appointments/A1/confirm"),
    ("GET", "/fhir/Appointment/A1"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_another_clinics_appointment_is_a_404_on_every_route_and_stays_untouched(
    client: TestClient, cast: Cast, method: str, path: str
) -> None:
    book(client, cast)
    assert client.request(method, path, headers=cast.auth).status_code in (200, 201)
    before = stored()
    response = client.request(method, path, headers=cast.other_auth)
    assert response.status_code == 404, response.text
    assert "Marie" not in response.text
    assert "A1" not in response.headers.get("location", "")
    assert stored() == before
    feed = client.get("/v1/events", headers=cast.other_auth)
    assert feed.status_code == 200
    assert feed.json()["events"] == []


def stored() -> tuple[Any, ...]:
    with db.session_scope() as session:
        table = Appointment.__table__
        return tuple(session.execute(select(table)).one())


@pytest.mark.parametrize(
    ("method", "path"), [*ROUTES, ("PUT", "/v1/appointments/A2"), ("GET", "/v1/events")]
)
def test_a_rotated_away_key_is_a_401_on_every_route(
    client: TestClient, cast: Cast, method: str, path: str
) -> None:
    from reminders.clinics import rotate_key

    book(client, cast)
    with db.session_scope() as session:
        rotate_key(session, cast.clinic_id)
    body = appointment_body() if method == "PUT" else None
    response = client.request(method, path, json=body, headers=cast.auth)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "path", ["/v1/appointments/batch", "/fhir/Appointment", "/webhooks/vonage/inbound"]
)
def test_an_oversized_body_is_a_413_on_every_writing_route(
    client: TestClient, cast: Cast, path: str
) -> None:
    big = b'{"padding": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    response = client.post(
        path, content=big, headers={**cast.auth, "Content-Type": "application/json"}
    )
    assert response.status_code == 413, response.text
    with db.session_scope() as session:
        assert session.scalar(select(Appointment.id)) is None


@pytest.mark.parametrize(
    "external_id", ["A1%0D%0ASet-Cookie:%20stolen=1", "A1%0ALocation:%20https://evil.example"]
)
def test_a_crlf_in_an_id_never_becomes_a_header(
    client: TestClient, cast: Cast, external_id: str
) -> None:
    response = client.put(
        f"/v1/appointments/{external_id}", json=appointment_body(), headers=cast.auth
    )
    assert response.status_code in (404, 422), response.text  # no route, or a refused id
    assert "set-cookie" not in response.headers
    assert "evil.example" not in str(response.headers)


def test_patient_and_clinic_values_cannot_change_the_sms_beyond_their_slot(
    client: TestClient, cast: Cast
) -> None:
    """Values a clinic system sends with newlines, a URL and a fake instruction: the patient's
    name never reaches the SMS (it has no slot); the practitioner and location stay in their
    slots (one line, 40 characters at most) and the rest of the SMS is the same as with plain
    values."""
    with db.session_scope() as session:
        session.add(
            Template(
                clinic_id=cast.clinic_id,
                kind="reminder",
                language="fr",
                source="RDV {{ date }} {{ time }} {{ practitioner }}, {{ location }}. {{ link }}",
            )
        )
    book(client, cast, practitioner="XQXQ", location="ZKZK")
    plain = rendered()
    practitioner = "Dr Martin\nhttps://evil.example/pay Reply PAY to 0800 000 000 now"
    location = "Cabinet 2\r\n\u2028Call https://evil.example\x1b[2J"
    name = "Marie\nCURIE https://evil.example/login"
    book_again = appointment_body(
        practitioner=practitioner,
        location=location,
        patient={"external_id": "P1", "name": name, "phone": "06 12 34 56 78"},
    )
    response = client.put("/v1/appointments/A1", json=book_again, headers=cast.auth)
    assert response.status_code == 200, response.text
    text = rendered()
    assert "\n" not in text
    assert "CURIE" not in text  # the name has no slot at all
    assert "0800" not in text  # cut at 40 characters
    slots = (single_line(practitioner), single_line(location))
    assert all(len(slot) <= 40 for slot in slots)
    assert text == plain.replace("XQXQ", slots[0]).replace("ZKZK", slots[1])


def rendered() -> str:
    from reminders.config import get_settings

    with db.session_scope() as session:
        first = session.scalars(select(Reminder.id).order_by(Reminder.id)).first()
        assert first is not None
        (due,) = dispatch.load_due(session, [first])
        assert due.appointment_id is not None
        clinic = session.get(Clinic, due.clinic_id)
        assert clinic is not None
        now = dt.datetime.now(dt.UTC)
        return dispatch.render(session, due, clinic, get_settings(), now, None)


# -- nothing identifying in the logs ------------------------------------------------------------


def test_no_log_record_of_intake_replies_or_links_carries_a_number_or_a_name(
    vonage_app: TestClient, cast: Cast, caplog: pytest.LogCaptureFixture
) -> None:
    """Every logger at DEBUG (ours, the SDK's, uvicorn's, SQLAlchemy's) while a booking comes in,
    the patient answers by SMS and by link, and Vonage reports a delivery. (test_sms checks the
    SDK's records while sending; the fault suite reads the logs of the real processes.)"""
    caplog.set_level(logging.DEBUG)
    body = appointment_body(
        patient={"external_id": "P1", "name": "Zoé Quenouille", "phone": "06 12 34 56 78"}
    )
    response = vonage_app.put("/v1/appointments/A1", json=body, headers=cast.auth)
    assert response.status_code == 201
    with db.session_scope() as session:
        reminder = session.scalars(select(Reminder).order_by(Reminder.id)).first()
        assert reminder is not None
        reminder.status, reminder.sent_at = "sent", dt.datetime.now(dt.UTC)
        reminder_id = reminder.id
        token = session.scalars(select(Appointment.link_token)).one()
    now = str(int(dt.datetime.now(dt.UTC).timestamp()))
    for path, params in [
        ("/webhooks/vonage/inbound", {"msisdn": "33612345678", "to": "33939000000",
                                      "text": "hello? Zoé", "messageId": "m1"}),
        ("/webhooks/vonage/inbound", {"msisdn": "33612345678", "to": "33939000000",
                                      "text": "1", "messageId": "m2"}),
        ("/webhooks/vonage/status", {"msisdn": "33612345678", "to": "33939000000",
                                     "status": "delivered", "client-ref": f"r{reminder_id}",
                                     "messageId": "X1"}),
        ("/webhooks/vonage/inbound", {"msisdn": "33699999999", "to": "33939000000",
                                      "text": "STOP", "messageId": "m3"}),
    ]:  # fmt: skip
        params = {**params, "timestamp": now}
        params["sig"] = sign(params, SIGNATURE_SECRET)
        assert vonage_app.post(path, data=params).status_code == 200
    apply_stored_replies()
    with db.session_scope() as session:
        assert "needs_attention" in set(session.scalars(select(InboundMessage.result)))
    assert vonage_app.get(f"/c/{token}").status_code == 200
    assert vonage_app.post(f"/c/{token}", data={"action": "cancel"}).status_code == 200
    assert caplog.records  # something was logged
    for record in caplog.records:
        message = record.getMessage()
        for secret in ("612345678", "699999999", "Zoé", "Quenouille"):
            assert secret not in message, (record.name, message)


def test_a_database_error_never_carries_the_statements_values(database: str) -> None:
    """Found by the fault suite: a worker whose database restarted logged the failed query's
    parameters, a patient's number among them."""
    with pytest.raises(SQLAlchemyError) as caught, db.session_scope() as session:
        session.execute(
            text("SELECT id FROM no_such_table WHERE phone = :phone"), {"phone": "+33612345678"}
        )
    assert "no_such_table" in str(caught.value)
    assert "612345678" not in str(caught.value)


def test_a_nul_in_a_signed_webhook_is_refused_not_a_database_error(vonage_app: TestClient) -> None:
    """Found by the fuzzing above on PostgreSQL, which refuses NUL in text (a 500)."""
    params = {"messageId": "\x00", "status": "delivered", "timestamp": str(int(time.time()))}
    params["sig"] = sign(params, SIGNATURE_SECRET)
    response = vonage_app.post("/webhooks/vonage/status", data=params)
    assert response.status_code == 401, response.text  # signed over what was dropped
