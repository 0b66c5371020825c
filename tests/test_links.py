"""The patient link /c/{token}: GET shows, POST acts once, tokens are guarded and rate limited."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from zoneinfo import ZoneInfo

import dramatiq
import dramatiq.broker
import httpx
import pytest
import time_machine
from babel.dates import format_date
from dramatiq.brokers.stub import StubBroker
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.requests import Request

from reminders import db, links
from reminders.api import create_app
from reminders.broker import QUEUE
from reminders.config import get_settings
from reminders.models import Appointment, Event, Reminder
from tests.conftest import STARTS_AT, Cast, appointment_body, statements

FRENCH = appointment_body()
RUSSIAN = appointment_body(
    patient={"external_id": "P2", "phone": "06 22 33 44 55", "language": "ru"}
)
CHINESE = appointment_body(
    patient={"external_id": "P3", "phone": "06 33 44 55 66", "language": "zh"}
)
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-robots-tag": "noindex, nofollow",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
}


@pytest.fixture(autouse=True)
def fresh_limiter() -> Iterator[None]:
    links.limiter.reset()
    yield
    links.limiter.reset()


@pytest.fixture(autouse=True)
def stub_broker(monkeypatch: pytest.MonkeyPatch) -> StubBroker:
    """An in-process broker whose `sms` queue the tests read."""
    broker = StubBroker()
    broker.declare_queue(QUEUE)
    monkeypatch.setattr(dramatiq.broker, "global_broker", broker)
    return broker


def book(client: TestClient, cast: Cast, external_id: str, body: dict[str, object]) -> str:
    """Books through the API; returns the appointment's link token."""
    response = client.put(f"/v1/appointments/{external_id}", json=body, headers=cast.auth)
    assert response.status_code == 201, response.text
    token = stored(external_id).link_token
    assert token is not None
    return token


def stored(external_id: str) -> Appointment:
    with db.session_scope() as session:
        query = select(Appointment).where(Appointment.external_id == external_id)
        return session.scalars(query).one()


def events(kind: str) -> list[Event]:
    with db.session_scope() as session:
        return list(session.scalars(select(Event).where(Event.type == kind).order_by(Event.id)))


def acks(external_id: str) -> list[Reminder]:
    appointment_id = stored(external_id).id
    with db.session_scope() as session:
        query = select(Reminder).where(
            Reminder.appointment_id == appointment_id, Reminder.kind == "ack"
        )
        return list(session.scalars(query))


def snapshot() -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a link could touch."""
    with db.session_scope() as session:
        return {
            model.__tablename__: [tuple(r) for r in session.execute(select(model.__table__)).all()]
            for model in (Appointment, Reminder, Event)
        }


def state(response: httpx.Response) -> str:
    found = re.search(r'data-state="([a-z_]+)"', response.text)
    assert found is not None, response.text
    return found.group(1)


def buttons(response: httpx.Response) -> list[str]:
    return re.findall(r'name="action" value="([a-z]+)"', response.text)


def secured(response: httpx.Response) -> bool:
    return all(response.headers.get(k) == v for k, v in SECURITY_HEADERS.items())


def post(client: TestClient, token: str, action: str) -> httpx.Response:
    response: httpx.Response = client.post(f"/c/{token}", data={"action": action})
    return response


def test_the_page_shows_a_french_patient_the_date_time_place_and_two_buttons(
    client: TestClient, cast: Cast
) -> None:
    token = book(client, cast, "A1", FRENCH)
    page = client.get(f"/c/{token}")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    starts = dt.datetime.fromisoformat(STARTS_AT).astimezone(ZoneInfo("Europe/Paris"))
    date = format_date(starts, "full", locale="fr")  # "lundi 23 novembre 2026"
    html = page.text
    assert '<html lang="fr">' in html
    assert '<meta name="viewport"' in html
    assert "<main>" in html
    assert "<h1>Votre rendez-vous</h1>" in html
    for text in ("Clinique Paris", date, "09:30", "Cabinet 2", "Dr Martin", "Pas encore confirmé"):
        assert text in html
    assert html.count('<form method="post">') == 2
    assert buttons(page) == ["confirm", "cancel"]
    assert "Confirmer mon rendez-vous</button>" in html
    assert "Annuler mon rendez-vous</button>" in html
    assert "<script" not in html
    assert "http" not in html  # no external asset, no absolute link
    assert secured(page)


@pytest.mark.parametrize(
    ("body", "lang", "texts"),
    [
        (RUSSIAN, "ru", ("Ваш приём", "Подтвердить приём", "Отменить приём", "Ещё не подтверждён")),
        (CHINESE, "zh", ("您的预约", "确认预约", "取消预约", "尚未确认")),
    ],
)
def test_russian_and_chinese_patients_read_the_page_in_their_language(
    client: TestClient, cast: Cast, body: dict[str, object], lang: str, texts: tuple[str, ...]
) -> None:
    token = book(client, cast, "A1", body)
    page = client.get(f"/c/{token}")
    starts = dt.datetime.fromisoformat(STARTS_AT).astimezone(ZoneInfo("Europe/Paris"))
    assert page.status_code == 200
    assert f'<html lang="{lang}">' in page.text
    assert format_date(starts, "full", locale=lang) in page.text
    for text in texts:
        assert text in page.text
    assert buttons(page) == ["confirm", "cancel"]


def test_get_and_head_change_nothing_however_often_they_come(
    client: TestClient, cast: Cast
) -> None:
    token = book(client, cast, "A1", FRENCH)
    before = snapshot()
    with statements() as seen:
        for _ in range(3):
            assert client.get(f"/c/{token}").status_code == 200
            assert client.head(f"/c/{token}").status_code == 200
    assert snapshot() == before
    assert "SELECT" in seen
    assert not {"INSERT", "UPDATE", "DELETE"} & set(seen), seen


def test_a_confirm_applies_once_and_queues_one_acknowledgement(
    client: TestClient, cast: Cast, stub_broker: StubBroker
) -> None:
    token = book(client, cast, "A1", FRENCH)
    page = post(client, token, "confirm")
    assert page.status_code == 200
    assert state(page) == "confirmed"
    assert "votre rendez-vous est confirmé" in page.text
    assert buttons(page) == ["cancel"]  # a confirmed appointment may still be cancelled
    assert secured(page)
    assert stored("A1").confirmation == "confirmed"
    assert [e.appointment_external_id for e in events("appointment.confirmed")] == ["A1"]
    (ack,) = acks("A1")
    assert (ack.kind, ack.status, ack.rule) == ("ack", "queued", "ack:confirmed")
    assert stub_broker.queues[QUEUE].qsize() == 1
    message = dramatiq.Message.decode(stub_broker.queues[QUEUE].get())
    assert (message.actor_name, message.args) == ("send_reminders", ([ack.id],))

    again = post(client, token, "confirm")
    assert again.status_code == 200
    assert state(again) == "confirmed"
    assert "Aucun changement" in again.text
    assert len(events("appointment.confirmed")) == 1
    assert len(acks("A1")) == 1
    assert stub_broker.queues[QUEUE].qsize() == 0


def test_a_cancel_after_a_confirm_frees_the_slot_and_tells_the_clinic(
    client: TestClient, cast: Cast
) -> None:
    token = book(client, cast, "A1", FRENCH)
    post(client, token, "confirm")
    page = post(client, token, "cancel")
    assert page.status_code == 200
    assert state(page) == "cancelled_by_patient"
    assert "votre rendez-vous est annulé" in page.text.lower()
    assert buttons(page) == []
    appointment = stored("A1")
    assert (appointment.status, appointment.confirmation) == ("cancelled", "cancelled_by_patient")
    (cancelled,) = events("appointment.cancelled")
    assert cancelled.appointment_external_id == "A1"
    assert cancelled.data["practitioner"] == "Dr Martin"
    assert cancelled.data["location"] == "Cabinet 2"
    assert cancelled.data["duration_minutes"] == 20
    assert dt.datetime.fromisoformat(cancelled.data["starts_at"]) == dt.datetime.fromisoformat(
        STARTS_AT
    )
    assert sorted(a.rule for a in acks("A1")) == ["ack:cancelled", "ack:confirmed"]
    with db.session_scope() as session:
        pending = session.scalars(
            select(Reminder).where(
                Reminder.appointment_id == appointment.id, Reminder.kind != "ack"
            )
        ).all()
    assert pending
    assert {r.status for r in pending} == {"skipped"}
    assert client.get(f"/c/{token}").text.count("<form") == 0


def test_a_confirm_after_a_cancellation_leaves_it_cancelled(client: TestClient, cast: Cast) -> None:
    token = book(client, cast, "A1", FRENCH)
    post(client, token, "cancel")
    page = post(client, token, "confirm")
    assert page.status_code == 200
    assert state(page) == "cancelled_by_patient"
    assert "Ce rendez-vous est annulé et le reste." in page.text
    assert stored("A1").confirmation == "cancelled_by_patient"
    assert events("appointment.confirmed") == []
    assert [a.rule for a in acks("A1")] == ["ack:cancelled"]


def test_an_appointment_the_clinic_cancelled_offers_nothing_and_ignores_a_confirm(
    client: TestClient, cast: Cast
) -> None:
    token = book(client, cast, "A1", FRENCH)
    assert client.post("/v1/appointments/A1/cancel", headers=cast.auth).status_code == 200
    page = client.get(f"/c/{token}")
    assert state(page) == "cancelled_by_clinic"
    assert "Annulé par l'établissement" in page.text.replace("&#39;", "'")
    assert "<form" not in page.text
    before = snapshot()
    answer = post(client, token, "confirm")
    assert answer.status_code == 200
    assert state(answer) == "cancelled_by_clinic"
    assert snapshot() == before


def test_unknown_truncated_and_malformed_tokens_all_get_the_same_404_page(
    client: TestClient, cast: Cast
) -> None:
    token = book(client, cast, "A1", FRENCH)
    unknown = ("A" if token[0] != "A" else "B") + token[1:]
    pages = [
        client.get(f"/c/{bad}")
        for bad in (unknown, token[:11], token + "x", "abc%24def!ghi.", "%20" + token[1:], "")
        if bad
    ] + [client.post(f"/c/{token[:11]}", data={"action": "cancel"})]
    assert {p.status_code for p in pages} == {404}
    assert len({p.text for p in pages}) == 1
    assert all(secured(p) for p in pages)
    html = pages[0].text
    assert "Link not found" in html
    assert "Lien introuvable" in html  # the patient is unknown: every language is shown
    assert "<form" not in html
    assert stored("A1").confirmation == "unconfirmed"


def test_the_link_expires_when_the_appointment_starts(client: TestClient, cast: Cast) -> None:
    token = book(client, cast, "A1", FRENCH)
    before = snapshot()
    started = dt.datetime.fromisoformat(STARTS_AT) + dt.timedelta(minutes=1)
    with time_machine.travel(started):
        shown = client.get(f"/c/{token}")
        acted = post(client, token, "cancel")
    for page in (shown, acted):
        assert page.status_code == 410
        assert '<html lang="fr">' in page.text
        assert "Ce lien a expiré" in page.text
        assert "This link has expired" in page.text
        assert secured(page)
    assert snapshot() == before


def test_a_token_acts_only_on_its_own_appointment(client: TestClient, cast: Cast) -> None:
    token = book(client, cast, "A1", FRENCH)
    other = appointment_body(patient={"external_id": "P9", "phone": "06 98 76 54 32"})
    other_token = book(client, cast, "A2", other)
    neighbour = appointment_body(patient={"external_id": "PX", "phone": "+44 7911 123456"})
    response = client.put("/v1/appointments/L1", json=neighbour, headers=cast.other_auth)
    assert response.status_code == 201, response.text
    untouched = (row("A2"), row("L1"))
    assert post(client, token, "cancel").status_code == 200
    assert (row("A2"), row("L1")) == untouched
    assert stored("A1").confirmation == "cancelled_by_patient"
    assert [e.appointment_external_id for e in events("appointment.cancelled")] == ["A1"]
    assert state(client.get(f"/c/{other_token}")) == "unconfirmed"


def row(external_id: str) -> tuple[Any, ...]:
    with db.session_scope() as session:
        table = Appointment.__table__
        return tuple(session.execute(select(table).where(table.c.external_id == external_id)).one())


def test_the_rate_limit_stops_one_address_and_not_another(
    client: TestClient, cast: Cast, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = book(client, cast, "A1", FRENCH)
    monkeypatch.setattr(links, "limiter", links.RateLimiter(limit=3))
    for _ in range(3):
        assert client.get(f"/c/{token[:11]}").status_code == 404
    refused = [client.get(f"/c/{token}"), post(client, token, "cancel")]
    for page in refused:
        assert page.status_code == 429
        assert 1 <= int(page.headers["retry-after"]) <= 120  # at most two windows
        assert "Too many requests" in page.text
        assert secured(page)
    assert stored("A1").confirmation == "unconfirmed"
    with TestClient(create_app(), client=("198.51.100.7", 50000)) as elsewhere:
        assert elsewhere.get(f"/c/{token}").status_code == 200


def test_the_limiter_slides_and_forgets_the_least_recent_clients() -> None:
    limiter = links.RateLimiter(limit=3, window=60, max_clients=2)
    assert [limiter.hit("a", 100.0 + i) for i in range(3)] == [None, None, None]
    wait = limiter.hit("a", 103.0)
    assert wait is not None
    # The window 60-120 holds 3; they weigh fully until 120, then fade over 120-180.
    assert limiter.hit("a", 103.0 + wait - 1) is not None
    assert limiter.hit("a", 103.0 + wait) is None
    assert limiter.hit("b", 200.0) is None
    assert limiter.hit("c", 200.0) is None  # "a" is forgotten: at most two clients are kept
    assert list(limiter._clients) == ["b", "c"]


def request_from(peer: str, forwarded: list[str]) -> Request:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    scope = {"type": "http", "client": (peer, 1234), "headers": headers}
    return Request(scope)


def test_forwarded_for_is_read_only_from_trusted_proxies() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    cases = [
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),  # untrusted peer: header ignored
        ("testclient", ["198.51.100.1"], "testclient"),
        ("10.0.0.2", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.2", ["6.6.6.6, 198.51.100.1, 10.0.0.3"], "198.51.100.1"),  # spoofed left part
        ("10.0.0.2", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),  # two header lines
        ("10.0.0.2", ["198.51.100.1, bogus, "], "198.51.100.1"),  # malformed entries skipped
        ("10.0.0.2", ["bogus"], "10.0.0.2"),
        ("10.0.0.2", [], "10.0.0.2"),
        ("::1", ["2001:db8::5"], "2001:db8::5"),
    ]
    for peer, forwarded, expected in cases:
        assert links.client_address(request_from(peer, forwarded), trusted) == expected
    assert links.limit_key("2001:db8::5") == links.limit_key("2001:db8::ffff") == "2001:db8::/64"
    assert links.limit_key("198.51.100.1") == "198.51.100.1"


def test_forwarded_for_counts_behind_a_trusted_proxy_and_not_otherwise(
    client: TestClient, cast: Cast, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = book(client, cast, "A1", FRENCH)
    monkeypatch.setattr(links, "limiter", links.RateLimiter(limit=2))
    url = f"/c/{token}"
    # From an untrusted peer, a varying X-Forwarded-For does not escape the limit.
    codes = [client.get(url, headers={"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(3)]
    assert [c.status_code for c in codes] == [200, 200, 429]

    monkeypatch.setenv("REMINDERS_TRUSTED_PROXIES", "127.0.0.1")
    db.reset()
    assert get_settings().trusted_proxies
    with TestClient(create_app(), client=("127.0.0.1", 123)) as proxied:

        def get(forwarded: str) -> int:
            status: int = proxied.get(url, headers={"X-Forwarded-For": forwarded}).status_code
            return status

        assert [get("198.51.100.1") for _ in range(3)] == [200, 200, 429]
        assert get("6.6.6.6, 198.51.100.2") == 200  # the rightmost untrusted address counts
        assert get("198.51.100.1, 198.51.100.2") == 200
        assert get("198.51.100.2, 127.0.0.1") == 429
        assert get("198.51.100.3") == 200


def test_concurrent_confirms_and_cancels_end_in_one_cancellation(
    client: TestClient, cast: Cast
) -> None:
    token = book(client, cast, "A1", FRENCH)
    actions = ["confirm", "cancel"] * 10
    with ThreadPoolExecutor(max_workers=8) as pool:
        pages = list(pool.map(lambda action: post(client, token, action), actions))
    appointment = stored("A1")
    assert (appointment.status, appointment.confirmation) == ("cancelled", "cancelled_by_patient")
    assert len(events("appointment.cancelled")) == 1
    confirmed = events("appointment.confirmed")
    assert len(confirmed) <= 1
    assert sorted(a.rule for a in acks("A1")) == sorted(
        ["ack:cancelled"] + ["ack:confirmed"] * len(confirmed)
    )
    # A cancel always ends cancelled; a confirm shows the state of its time.
    possible = {
        "cancel": {"cancelled_by_patient"},
        "confirm": {"confirmed", "cancelled_by_patient"},
    }
    for action, page in zip(actions, pages, strict=True):
        assert page.status_code == 200
        assert state(page) in possible[action]
    if any(state(page) == "confirmed" for page in pages):
        assert len(confirmed) == 1


def test_every_page_carries_the_security_headers(
    client: TestClient, cast: Cast, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = book(client, cast, "A1", FRENCH)
    pages = [
        client.get(f"/c/{token}"),
        client.head(f"/c/{token}"),
        post(client, token, "confirm"),
        post(client, token, "delete"),
        client.get("/c/nothing-here"),
    ]
    monkeypatch.setattr(links, "limiter", links.RateLimiter(limit=1))
    client.get(f"/c/{token}")
    pages.append(client.get(f"/c/{token}"))
    assert [p.status_code for p in pages] == [200, 200, 200, 400, 404, 429]
    assert all(secured(p) for p in pages)


def test_an_unknown_or_missing_action_gets_a_400_page_in_the_patients_language(
    client: TestClient, cast: Cast
) -> None:
    token = book(client, cast, "A1", FRENCH)
    before = snapshot()
    for data in ({"action": "delete"}, {"action": "CONFIRM"}, {"other": "confirm"}, {}):
        page = client.post(f"/c/{token}", data=data)
        assert page.status_code == 400
        assert '<html lang="fr">' in page.text
        assert "Demande incomprise" in page.text
        assert "Request not understood" in page.text
    assert snapshot() == before


def test_a_10_kb_body_is_refused_cleanly_and_json_is_accepted(
    client: TestClient, cast: Cast
) -> None:
    token = book(client, cast, "A1", FRENCH)
    before = snapshot()
    padded = client.post(
        f"/c/{token}",
        content=b"action=confirm&pad=" + b"x" * 10_240,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert 400 <= padded.status_code < 500
    assert "Request not understood" in padded.text
    assert snapshot() == before
    assert (
        client.post(
            f"/c/{token}", content=b"{not json", headers={"Content-Type": "application/json"}
        ).status_code
        == 400
    )
    page = client.post(f"/c/{token}", json={"action": "confirm"})
    assert page.status_code == 200
    assert state(page) == "confirmed"
    assert stored("A1").confirmation == "confirmed"


def test_every_language_has_every_text() -> None:
    keys = set(links.TEXTS["en"])
    for lang, texts in links.TEXTS.items():
        assert set(texts) == keys, lang
        for kind in ("not_found", "expired", "too_many", "bad_request"):
            assert texts[kind].count("|") == 1


def test_a_link_page_costs_one_statement(client: TestClient, cast: Cast) -> None:
    """The busiest read: one indexed SELECT (on an autocommit connection: no BEGIN, no COMMIT)."""
    token = book(client, cast, "A1", FRENCH)
    with statements() as seen:
        assert client.get(f"/c/{token}").status_code == 200
        assert client.get("/c/AAAAAAAAAAAA").status_code == 404
        assert client.get("/c/short").status_code == 404  # malformed: no query at all
    assert seen == ["SELECT", "SELECT"]
