"""Patients answer by SMS; Vonage reports deliveries; the clinic reads events and gets webhooks.

Webhooks are signed the way Vonage signs them (the stand-in's `sign`, checked by the SDK).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import dramatiq
import pytest
import sqlalchemy as sa
import time_machine
from dramatiq.brokers.stub import StubBroker
from fastapi.testclient import TestClient
from sqlalchemy import select

from reminders import db, events, replies, scheduler
from reminders.api import create_app
from reminders.broker import QUEUE, REPLIES_QUEUE
from reminders.models import (
    Appointment,
    Clinic,
    DeliveryReceipt,
    Event,
    InboundMessage,
    OptOut,
    Reminder,
)
from tests.conftest import (
    TEST_SECRET,
    Cast,
    appointment_body,
    replies_worker,
    statements,
    use_vonage_provider,
)
from tests.vonage_standin import sign

SIGNATURE_SECRET = "vonage-signature-secret"
CLINIC_NUMBER = "33939000000"
PATIENT = "33612345678"


@dataclass
class Vonage:
    """A client posting webhooks as Vonage would, to an app on the vonage provider, with a
    worker applying the replies it stores (answers stay queued: nothing is sent)."""

    client: TestClient
    cast: Cast
    broker: StubBroker
    worker: dramatiq.Worker
    counter: int = 0

    @contextmanager
    def worker_paused(self) -> Iterator[None]:
        """Replies posted meanwhile are stored, then applied together (in one batch)."""
        self.worker.pause()
        try:
            yield
        finally:
            self.worker.resume()

    def reply(self, text: str, **options: Any) -> str:
        """Posts an inbound SMS, waits until the worker applied it and returns its result."""
        message_id = options.pop("message_id", None) or f"in-{self.counter + 1}"
        response = self.inbound(text, message_id=message_id, **options)
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "result": "received"}
        self.applied()
        return result_of(message_id)

    def applied(self) -> None:
        """Waits until the worker applied every reply stored so far."""
        self.broker.join(REPLIES_QUEUE, fail_fast=True)

    def inbound(
        self,
        text: str,
        *,
        msisdn: str = PATIENT,
        signed: bool = True,
        when: dt.datetime | None = None,
        message_id: str | None = None,
        method: str = "POST",
        as_json: bool = False,
        extra: dict[str, str] | None = None,
    ) -> Any:
        self.counter += 1
        params = {
            "msisdn": msisdn,
            "to": CLINIC_NUMBER,
            "text": text,
            "type": "text",
            "messageId": message_id or f"in-{self.counter}",
            "message-timestamp": "2026-11-22 10:00:00",
            "timestamp": str(int((when or dt.datetime.now(dt.UTC)).timestamp())),
            "nonce": f"n{self.counter}",
            **(extra or {}),
        }
        if signed:
            params["sig"] = sign(params, SIGNATURE_SECRET)
        return self._send("/webhooks/vonage/inbound", params, method, as_json)

    def receipt(self, **fields: str) -> Any:
        params = {
            "msisdn": PATIENT,
            "to": CLINIC_NUMBER,
            "network-code": "20810",
            "message-timestamp": "2026-11-22 10:00:00",
            "timestamp": str(int(dt.datetime.now(dt.UTC).timestamp())),
            **fields,
        }
        params["sig"] = sign(params, SIGNATURE_SECRET)
        return self._send("/webhooks/vonage/status", params, "POST", False)

    def _send(self, path: str, params: dict[str, str], method: str, as_json: bool) -> Any:
        if method == "GET":
            return self.client.get(path, params=params)
        if as_json:
            return self.client.post(path, json=params)
        return self.client.post(path, data=params)


@pytest.fixture
def vonage(cast: Cast, monkeypatch: pytest.MonkeyPatch) -> Iterator[Vonage]:
    use_vonage_provider(monkeypatch, SIGNATURE_SECRET)
    stub = dramatiq.get_broker()
    assert isinstance(stub, StubBroker)
    with replies_worker() as worker, TestClient(create_app()) as client:
        yield Vonage(client, cast, stub, worker)


def remind(
    vonage: Vonage, external_id: str = "A1", phone: str = "06 12 34 56 78", days: int = 10
) -> int:
    """An appointment whose first reminder went out (as if sent): replies apply to it."""
    start = (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).isoformat()
    body = appointment_body(
        starts_at=start, patient={"external_id": f"P-{external_id}", "phone": phone}
    )
    response = vonage.client.put(
        f"/v1/appointments/{external_id}", json=body, headers=vonage.cast.auth
    )
    assert response.status_code == 201
    with db.session_scope() as session:
        row = session.scalars(
            select(Reminder)
            .join(Appointment)
            .where(Appointment.external_id == external_id)
            .order_by(Reminder.id)
        ).first()
        assert row is not None
        row.status, row.sent_at = "sent", dt.datetime.now(dt.UTC)
        return row.id


def appointment(external_id: str = "A1") -> dict[str, Any]:
    with db.session_scope() as session:
        found = session.scalars(
            select(Appointment).where(Appointment.external_id == external_id)
        ).one()
        return {"confirmation": found.confirmation, "status": found.status}


def event_types() -> list[str]:
    with db.session_scope() as session:
        return list(session.scalars(select(Event.type).order_by(Event.id)))


def stored_result(message_id: str) -> str | None:
    with db.session_scope() as session:
        return session.scalar(
            select(InboundMessage.result).where(InboundMessage.provider_message_id == message_id)
        )


def result_of(message_id: str) -> str:
    found = stored_result(message_id)
    assert found is not None, f"{message_id} was not applied"
    return found


def queued_sends(broker: StubBroker) -> list[list[int]]:
    """The ids of each `send_reminders` message waiting in the SMS queue."""
    messages = map(dramatiq.Message.decode, broker.queues[QUEUE].queue)
    return [list(m.args[0]) for m in messages if m.actor_name == "send_reminders"]


def answers() -> list[tuple[str, str]]:
    with db.session_scope() as session:
        rows = session.execute(
            select(Reminder.kind, Reminder.rule)
            .where(Reminder.kind.in_(("ack", "opted_out", "opted_in", "unclear")))
            .order_by(Reminder.id)
        )
        return [(kind, rule.split(":")[0] if kind != "ack" else rule) for kind, rule in rows]


# --- inbound SMS -------------------------------------------------------------------------------


def test_reply_1_confirms_and_is_acknowledged(vonage: Vonage) -> None:
    remind(vonage)
    assert vonage.reply("1") == "confirm:applied"
    assert appointment()["confirmation"] == "confirmed"
    assert event_types() == ["appointment.confirmed"]
    assert answers() == [("ack", "ack:confirmed")]
    with db.session_scope() as session:
        [row] = session.scalars(select(InboundMessage))
        assert row.applied_at is not None
        assert row.applied_at >= row.received_at
        assert (row.clinic_id, row.appointment_id) == (vonage.cast.clinic_id, 1)
        [answer] = session.scalars(select(Reminder.id).where(Reminder.kind == "ack"))
    assert queued_sends(vonage.broker) == [[answer]]  # sent at once, in a batch message


@pytest.mark.parametrize("text", ["2", "Annuler", "ANNULÉ !", "отмена", "取消", "２"])
def test_local_cancel_words_cancel_and_free_the_slot(vonage: Vonage, text: str) -> None:
    remind(vonage)
    assert vonage.reply(text) == "cancel:applied"
    assert appointment() == {"confirmation": "cancelled_by_patient", "status": "cancelled"}
    with db.session_scope() as session:
        [event] = session.scalars(select(Event))
        assert event.type == "appointment.cancelled"
        assert event.appointment_external_id == "A1"
        assert {"practitioner", "location", "starts_at", "duration_minutes"} <= set(event.data)
        pending = session.scalars(select(Reminder.status).where(Reminder.kind == "reminder"))
        assert "planned" not in set(pending)


@pytest.mark.parametrize("text", ["STOP", "cancel", "Stop SMS", "СТОП", "退订", "unsubscribe"])
def test_carrier_words_opt_out_and_never_cancel(vonage: Vonage, text: str) -> None:
    remind(vonage)
    assert vonage.reply(text) == "opt_out:applied"
    assert appointment()["confirmation"] == "unconfirmed"
    with db.session_scope() as session:
        [opt_out] = session.scalars(select(OptOut))
        assert (opt_out.phone_e164, opt_out.sender) == ("+33612345678", "+33939000000")
    assert event_types() == ["patient.opted_out"]
    assert answers() == [("opted_out", "opted_out")]
    assert vonage.reply("STOP") == "opt_out:unchanged"
    assert answers() == [("opted_out", "opted_out")]  # one final message, not one per STOP


def test_start_opts_back_in_and_yes_confirms_when_not_opted_out(vonage: Vonage) -> None:
    remind(vonage)
    vonage.reply("STOP")
    assert vonage.reply("YES") == "opt_in:applied"
    assert appointment()["confirmation"] == "unconfirmed"
    assert vonage.reply("YES") == "confirm:applied"
    assert appointment()["confirmation"] == "confirmed"
    vonage.reply("STOP")
    assert vonage.reply("START") == "opt_in:applied"


def test_a_reply_applies_to_the_latest_reminded_appointment(vonage: Vonage) -> None:
    remind(vonage, "A1", days=10)
    remind(vonage, "A2", days=5)  # reminded later, same family phone
    vonage.reply("2")
    assert appointment("A1")["confirmation"] == "unconfirmed"
    assert appointment("A2")["confirmation"] == "cancelled_by_patient"


@pytest.mark.parametrize("text", ["Can I come at 10 instead?", "1 2", "", "😀👍", "x" * 10_000])
def test_anything_else_needs_attention_with_one_answer_a_day(vonage: Vonage, text: str) -> None:
    remind(vonage)
    assert vonage.reply(text) == "needs_attention"
    vonage.reply("hello?")
    assert appointment()["confirmation"] == "unconfirmed"
    assert event_types() == ["reply.needs_attention", "reply.needs_attention"]
    with db.session_scope() as session:
        first = session.scalars(select(Event).order_by(Event.id)).first()
        assert first is not None
        assert first.data["text"] == text[:1600]
    assert answers() == [("unclear", "unclear")]


def test_the_same_message_id_is_applied_once(vonage: Vonage) -> None:
    remind(vonage)
    assert vonage.reply("1", message_id="same-id") == "confirm:applied"
    for _ in range(2):
        response = vonage.inbound("1", message_id="same-id")
        assert response.json() == {"status": "ok", "result": "duplicate"}
    vonage.applied()
    assert event_types() == ["appointment.confirmed"]
    with db.session_scope() as session:
        assert len(list(session.scalars(select(InboundMessage)))) == 1


def test_concurrent_retries_of_one_message_are_applied_once(vonage: Vonage) -> None:
    remind(vonage)
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(
            pool.map(lambda _: vonage.inbound("2", message_id="dup").json()["result"], range(12))
        )
    assert sorted(set(results)) == ["duplicate", "received"]
    assert results.count("received") == 1
    vonage.applied()
    assert result_of("dup") == "cancel:applied"
    assert event_types() == ["appointment.cancelled"]


def test_a_numbers_replies_apply_in_the_order_they_came(vonage: Vonage) -> None:
    """Stored before any is applied (no worker ran meanwhile): "1" then "2" from one number
    ends cancelled, "2" then "1" from another ends cancelled too (a patient's cancellation is
    final), and each reply's own result is kept."""
    remind(vonage, "A1", phone="06 12 34 56 78")
    remind(vonage, "A2", phone="06 12 34 56 79")
    with vonage.worker_paused():
        for text, message_id, msisdn in [
            ("1", "a-1", PATIENT),
            ("2", "b-1", "33612345679"),
            ("2", "a-2", PATIENT),
            ("1", "b-2", "33612345679"),
        ]:
            assert vonage.inbound(text, message_id=message_id, msisdn=msisdn).status_code == 200
    vonage.applied()
    assert [result_of(m) for m in ("a-1", "a-2", "b-1", "b-2")] == [
        "confirm:applied",
        "cancel:applied",
        "cancel:applied",
        "confirm:unchanged",
    ]
    assert (
        appointment("A1")
        == appointment("A2")
        == {
            "confirmation": "cancelled_by_patient",
            "status": "cancelled",
        }
    )
    assert event_types() == [
        "appointment.confirmed",
        "appointment.cancelled",
        "appointment.cancelled",
    ]


def test_concatenated_parts_are_assembled_before_parsing(vonage: Vonage) -> None:
    remind(vonage)
    parts = {"concat": "true", "concat-ref": "77", "concat-total": "2"}
    assert vonage.reply("STO", message_id="p2", extra={**parts, "concat-part": "2"}) == "part"
    assert event_types() == []
    assert vonage.reply("P", message_id="p1", extra={**parts, "concat-part": "1"}) == (
        "needs_attention"
    )
    assert event_types() == ["reply.needs_attention"]  # "PSTO": the parts in their order
    with db.session_scope() as session:
        [event] = session.scalars(select(Event))
        assert event.data["text"] == "PSTO"
        rows = session.scalars(select(InboundMessage).order_by(InboundMessage.id))
        assert all(row.applied_at is not None for row in rows)
    # The same concat-ref again (it is short, so it comes back): a new message, on its own.
    assert vonage.reply("2", message_id="p3", extra={**parts, "concat-part": "1"}) == "part"
    assert vonage.reply("", message_id="p4", extra={**parts, "concat-part": "2"}) == (
        "cancel:applied"
    )


def test_parts_stored_together_are_applied_once(vonage: Vonage) -> None:
    remind(vonage)
    parts = {"concat": "true", "concat-ref": "9", "concat-total": "2"}
    with vonage.worker_paused():
        vonage.inbound("AN", message_id="q1", extra={**parts, "concat-part": "1"})
        vonage.inbound("NULER", message_id="q2", extra={**parts, "concat-part": "2"})
    vonage.applied()
    assert [result_of("q1"), result_of("q2")] == ["part", "cancel:applied"]
    assert event_types() == ["appointment.cancelled"]


def test_a_reply_whose_queue_message_was_lost_is_applied_by_the_sweep(vonage: Vonage) -> None:
    remind(vonage)
    with vonage.worker_paused():
        assert vonage.inbound("STOP", message_id="lost").json()["result"] == "received"
        vonage.broker.flush(REPLIES_QUEUE)  # Redis lost it
    vonage.applied()
    assert stored_result("lost") is None
    now = dt.datetime.now(dt.UTC)
    scheduler.tick(lambda: now + dt.timedelta(seconds=5))  # a moment ago: not lost yet
    vonage.applied()
    assert stored_result("lost") is None
    scheduler.tick(lambda: now + replies.PENDING_STALE + dt.timedelta(seconds=1))
    vonage.applied()
    assert stored_result("lost") == "opt_out:applied"
    assert event_types() == ["patient.opted_out"]
    assert answers() == [("opted_out", "opted_out")]


def test_a_reply_that_cannot_be_applied_is_recorded_and_holds_up_nothing(
    vonage: Vonage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    remind(vonage, "A1", phone="06 12 34 56 78")
    remind(vonage, "A2", phone="06 12 34 56 79")
    applying = replies.apply_reply

    def failing(session: Any, phone: str, to: str, text: str, *args: Any) -> Any:
        if text == "boom":
            raise RuntimeError("a bug")
        return applying(session, phone, to, text, *args)

    monkeypatch.setattr(replies, "apply_reply", failing)
    with vonage.worker_paused():
        vonage.inbound("boom", message_id="x", msisdn=PATIENT)
        vonage.inbound("1", message_id="y", msisdn=PATIENT)
        vonage.inbound("2", message_id="z", msisdn="33612345679")
    vonage.applied()
    assert [result_of(m) for m in "xyz"] == ["error", "confirm:applied", "cancel:applied"]
    assert event_types() == ["appointment.confirmed", "appointment.cancelled"]
    assert "inbound SMS 1 could not be applied; recorded as `error`" in caplog.text
    assert "612345678" not in caplog.text


def test_concurrent_workers_apply_each_numbers_replies_once_and_in_order(vonage: Vonage) -> None:
    """Five numbers each send STOP, START, STOP... (every one changes something only if the
    one before it was applied first); four workers apply them at once."""
    for n in range(5):
        remind(vonage, f"A{n}", phone=f"06 12 34 56 7{n}")
    with vonage.worker_paused():
        for i in range(8):
            for n in range(5):
                text = "STOP" if i % 2 == 0 else "START"
                vonage.inbound(text, message_id=f"{n}-{i}", msisdn=f"3361234567{n}")
        vonage.broker.flush(REPLIES_QUEUE)
        answered: list[int] = []

        def work(_: int) -> bool:  # as four worker processes would
            return replies.drain(lambda: dt.datetime.now(dt.UTC), answered.extend)

        with ThreadPoolExecutor(max_workers=4) as pool:
            assert all(pool.map(work, range(4)))
    expected = ["opt_out:applied", "opt_in:applied"] * 4
    for n in range(5):
        assert [result_of(f"{n}-{i}") for i in range(8)] == expected
    assert len(event_types()) == 40
    assert len(answered) == len(set(answered)) == 40


def test_a_message_that_comes_while_replies_are_being_applied_costs_no_query(
    vonage: Vonage,
) -> None:
    """One thread of a process applies; a message that comes meanwhile only makes it look
    once more before it stops, and that look applies the message's reply."""
    remind(vonage)
    applier = replies._APPLIER
    assert applier.enter()  # as if a thread of this process were applying
    try:
        with statements() as kinds:
            assert vonage.inbound("1", message_id="meanwhile").json()["result"] == "received"
            vonage.applied()  # the message was taken: it only marked that it came
        assert kinds == ["INSERT"]  # the webhook's; none for the message
        assert stored_result("meanwhile") is None
        assert not applier.leave(unless_called=True)  # so the applying thread looks again
        applier.forget_calls()
        assert replies.drain(lambda: dt.datetime.now(dt.UTC), lambda ids: None, applier=applier)
    finally:
        applier.leave()
    assert result_of("meanwhile") == "confirm:applied"


def test_get_form_and_json_webhooks_are_all_accepted(vonage: Vonage) -> None:
    remind(vonage)
    assert vonage.reply("hello", method="GET") == "needs_attention"
    assert vonage.reply("1", as_json=True) == "confirm:applied"


def test_a_signed_form_with_empty_fields_and_encoded_text_is_read_as_signed(
    vonage: Vonage,
) -> None:
    """Vonage signs every field it posts, empty ones included (`keyword` of an empty SMS)."""
    remind(vonage)
    text = "Rappelez-moi svp: 100% + à demain & merci"
    assert vonage.reply(text, extra={"keyword": ""}) == "needs_attention"
    with db.session_scope() as session:
        stored = session.scalars(select(InboundMessage)).one()
        assert stored.text == text


@pytest.mark.parametrize(
    "tamper",
    ["unsigned", "forged", "wrong-secret", "stale", "future"],
)
def test_bad_signatures_and_stale_webhooks_are_401_and_change_nothing(
    vonage: Vonage, tamper: str
) -> None:
    remind(vonage)
    now = dt.datetime.now(dt.UTC)
    if tamper == "unsigned":
        response = vonage.inbound("2", signed=False)
    elif tamper == "stale":
        response = vonage.inbound("2", when=now - dt.timedelta(hours=25))
    elif tamper == "future":
        response = vonage.inbound("2", when=now + dt.timedelta(hours=1))
    else:
        params = {
            "msisdn": PATIENT,
            "to": CLINIC_NUMBER,
            "text": "2",
            "messageId": "x1",
            "timestamp": str(int(now.timestamp())),
        }
        secret = "not-the-secret" if tamper == "wrong-secret" else SIGNATURE_SECRET
        params["sig"] = sign(params, secret)
        if tamper == "forged":
            params["text"] = "1"  # changed after signing
        response = vonage.client.post("/webhooks/vonage/inbound", data=params)
    assert response.status_code == 401
    assert response.json() == {"status": "unauthorized"}
    vonage.applied()
    assert appointment()["confirmation"] == "unconfirmed"
    assert event_types() == []
    with db.session_scope() as session:
        assert session.scalars(select(InboundMessage)).first() is None


def test_a_webhook_without_its_fields_is_ignored(vonage: Vonage) -> None:
    params = {"msisdn": PATIENT, "text": "2", "timestamp": str(int(time.time()))}
    params["sig"] = sign(params, SIGNATURE_SECRET)
    response = vonage.client.post("/webhooks/vonage/inbound", data=params)
    assert response.json() == {"status": "ignored", "reason": "msisdn, to and messageId needed"}


def test_an_unknown_receiving_number_gets_200_and_changes_nothing(vonage: Vonage) -> None:
    remind(vonage)
    params = {
        "msisdn": PATIENT,
        "to": "33100000000",
        "text": "2",
        "messageId": "z",
        "timestamp": str(int(dt.datetime.now(dt.UTC).timestamp())),
    }
    params["sig"] = sign(params, SIGNATURE_SECRET)
    response = vonage.client.post("/webhooks/vonage/inbound", data=params)
    assert response.status_code == 200
    assert response.json()["result"] == "received"
    vonage.applied()
    assert result_of("z") == "unknown_number"
    assert appointment()["confirmation"] == "unconfirmed"


def test_unsigned_webhooks_are_accepted_with_the_console_provider(
    cast: Cast, client: TestClient
) -> None:
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
    params = {"msisdn": PATIENT, "to": CLINIC_NUMBER, "text": "hi", "messageId": "c1"}
    assert client.post("/webhooks/vonage/inbound", data=params).status_code == 200


# --- delivery receipts -------------------------------------------------------------------------


def sent_row(vonage: Vonage, message_id: str = "m-1") -> int:
    row_id = remind(vonage)
    with db.session_scope() as session:
        row = session.get(Reminder, row_id)
        assert row is not None
        row.provider_message_id = message_id
    return row_id


def delivery(row_id: int) -> tuple[str, str | None, str | None]:
    with db.session_scope() as session:
        row = session.get(Reminder, row_id)
        assert row is not None
        return row.status, row.delivery_status, row.delivery_error


def test_out_of_range_fields_are_ignored_or_cut_never_a_server_error(vonage: Vonage) -> None:
    """Found by the schema fuzzer on PostgreSQL, which refuses a value longer than its column."""
    remind(vonage)
    long_number = vonage.inbound("1", msisdn="3" * 30)
    assert long_number.status_code == 200
    assert long_number.json() == {
        "status": "ignored",
        "reason": "msisdn and to must have at most 15 digits (E.164)",
    }
    concat = {"concat": "true", "concat-ref": "r" * 50, "concat-total": "9" * 14}
    assert vonage.reply("1", extra={**concat, "concat-part": "1" * 12}) == "confirm:applied"
    receipt = vonage.receipt(
        **{"messageId": "m" * 70, "status": "delivered", "err-code": "9" * 30, "price": "nan"}
    )
    assert receipt.status_code == 200
    with db.session_scope() as session:
        kept = session.scalars(select(DeliveryReceipt)).one()
        assert (kept.provider_message_id, kept.err_code, kept.price) == ("m" * 64, "9" * 8, None)


def test_receipts_move_delivery_forward_and_repeats_change_nothing(vonage: Vonage) -> None:
    row_id = sent_row(vonage)
    assert vonage.receipt(messageId="m-1", status="accepted").json()["result"] == "applied"
    assert delivery(row_id) == ("sent", "accepted", None)
    assert (
        vonage.receipt(messageId="m-1", status="delivered", **{"err-code": "0"}).json()["result"]
        == "applied"
    )
    assert vonage.receipt(messageId="m-1", status="delivered").json()["result"] == "unchanged"
    assert vonage.receipt(messageId="m-1", status="accepted").json()["result"] == "unchanged"
    assert delivery(row_id) == ("sent", "delivered", None)
    got = vonage.client.get("/v1/appointments/A1", headers=vonage.cast.auth).json()
    assert got["messages"][0]["delivery_status"] == "delivered"


def test_a_receipt_matches_by_client_ref_and_settles_an_unknown_send(vonage: Vonage) -> None:
    row_id = sent_row(vonage)
    with db.session_scope() as session:
        row = session.get(Reminder, row_id)
        assert row is not None
        row.status, row.provider_message_id = "unknown", None
    vonage.receipt(messageId="m-9", status="delivered", **{"client-ref": f"r{row_id}"})
    with db.session_scope() as session:
        row = session.get(Reminder, row_id)
        assert row is not None
        assert (row.status, row.delivery_status, row.provider_message_id) == (
            "sent",
            "delivered",
            "m-9",
        )


def test_a_receipt_with_err_code_9_records_an_opt_out(vonage: Vonage) -> None:
    row_id = sent_row(vonage)
    vonage.receipt(messageId="m-1", status="failed", **{"err-code": "9"})
    assert delivery(row_id) == ("sent", "failed", "9")
    with db.session_scope() as session:
        [opt_out] = session.scalars(select(OptOut))
        assert opt_out.source == "receipt"


def test_unknown_receipts_get_200_and_are_kept_for_a_later_send(vonage: Vonage) -> None:
    response = vonage.receipt(messageId="never-seen", status="delivered")
    assert response.status_code == 200
    assert response.json()["result"] == "unmatched"
    from reminders import dispatch

    row_id = sent_row(vonage, message_id="never-seen")
    with db.session_scope() as session:
        dispatch.apply_waiting_receipts(session, {row_id: ["never-seen"]}, dt.datetime.now(dt.UTC))
    assert delivery(row_id) == ("sent", "delivered", None)


# --- the event feed ----------------------------------------------------------------------------


def test_the_feed_pages_with_next_and_shows_only_the_clinics_own(vonage: Vonage) -> None:
    cast = vonage.cast
    now = dt.datetime.now(dt.UTC)
    with db.session_scope() as session:
        for i in range(5):
            events.record(
                session, cast.clinic_id, "reply.needs_attention", now, data={"text": str(i)}
            )
        events.record(session, cast.other_clinic_id, "reply.needs_attention", now)
    page = vonage.client.get("/v1/events?limit=3", headers=cast.auth).json()
    assert [e["data"]["text"] for e in page["events"]] == ["0", "1", "2"]
    rest = vonage.client.get(f"/v1/events?after={page['next']}", headers=cast.auth).json()
    assert [e["data"]["text"] for e in rest["events"]] == ["3", "4"]
    empty = vonage.client.get(f"/v1/events?after={rest['next']}", headers=cast.auth).json()
    assert empty == {"events": [], "next": rest["next"]}
    other = vonage.client.get("/v1/events", headers=cast.other_auth).json()
    assert len(other["events"]) == 1
    assert set(page["events"][0]) == {"id", "type", "at", "appointment", "data"}


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "after=-1", "limit=x"])
def test_bad_feed_parameters_are_422(vonage: Vonage, query: str) -> None:
    response = vonage.client.get(f"/v1/events?{query}", headers=vonage.cast.auth)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")


def test_staff_confirmation_is_recorded_without_an_sms(vonage: Vonage) -> None:
    remind(vonage)
    response = vonage.client.post("/v1/appointments/A1/confirm", headers=vonage.cast.auth)
    assert response.status_code == 200
    assert response.json()["confirmation"] == "confirmed"
    assert response.json()["result"] == "updated"
    again = vonage.client.post("/v1/appointments/A1/confirm", headers=vonage.cast.auth)
    assert again.json()["result"] == "unchanged"
    assert event_types() == ["appointment.confirmed"]
    assert answers() == []
    missing = vonage.client.post("/v1/appointments/nope/confirm", headers=vonage.cast.auth)
    assert missing.status_code == 404


# --- webhooks to the clinic ----------------------------------------------------------------------


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    answers: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append((dict(self.headers), body))
        code = _Hook.answers.pop(0) if _Hook.answers else 200
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[str]:
    _Hook.received, _Hook.answers = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def test_events_are_posted_signed_in_order_and_retried_through_the_database(
    cast: Cast, hook: str
) -> None:
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        clinic.webhook_url, clinic.webhook_secret = hook, "whsec_test"
    now = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC)
    with db.session_scope() as session:
        for text in ("first", "second"):
            events.record(
                session,
                cast.clinic_id,
                "appointment.confirmed",
                now,
                appointment="A1",
                data={"text": text},
            )
    _Hook.answers = [500]

    def run(at: dt.datetime) -> list[int]:
        with db.session_scope() as session:
            ids = events.claim_webhooks(session, at)
        for event_id in ids:
            events.deliver(event_id, lambda: at)
        return ids

    assert len(run(now)) == 1  # the second waits for the first (same appointment)
    assert len(_Hook.received) == 1  # answered 500
    assert run(now + dt.timedelta(seconds=1)) == []  # backing off, and still blocking
    later = now + dt.timedelta(minutes=5)
    run(later)
    run(later + dt.timedelta(seconds=1))
    bodies = [json.loads(body) for _, body in _Hook.received]
    assert [b["data"]["text"] for b in bodies] == ["first", "first", "second"]
    headers, body = _Hook.received[-1]
    expected = "sha256=" + hmac.new(b"whsec_test", body, hashlib.sha256).hexdigest()
    assert headers["X-Reminders-Signature"] == expected
    with db.session_scope() as session:
        states = list(
            session.execute(select(Event.webhook_status, Event.webhook_attempts).order_by(Event.id))
        )
        assert [tuple(s) for s in states] == [("delivered", 2), ("delivered", 1)]


def test_a_webhook_failing_for_24_hours_is_given_up(cast: Cast, hook: str) -> None:
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        clinic.webhook_url, clinic.webhook_secret = hook, "whsec_test"
    now = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC)
    with db.session_scope() as session:
        events.record(session, cast.clinic_id, "message.failed", now)
    at = now
    while at < now + dt.timedelta(hours=25):
        _Hook.answers = [503]
        with db.session_scope() as session:
            claimed = events.claim_webhooks(session, at)
        for event_id in claimed:
            events.deliver(event_id, lambda at=at: at)  # type: ignore[misc]
        at += dt.timedelta(minutes=30)
    with db.session_scope() as session:
        [event] = session.scalars(select(Event))
        assert event.webhook_status == "failed"
        assert event.webhook_error == "HTTP 503"
        assert 5 <= event.webhook_attempts <= 40


def test_a_hanging_clinic_webhook_times_out_and_blocks_nothing_else(
    cast: Cast, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)  # accepts connections, never answers
    monkeypatch.setattr(events, "WEBHOOK_TIMEOUT", 0.5)
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        clinic.webhook_url = f"http://127.0.0.1:{listener.getsockname()[1]}/hang"
        clinic.webhook_secret = "whsec_test"
    now = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC)
    with db.session_scope() as session:
        events.record(session, cast.clinic_id, "appointment.confirmed", now, appointment="A1")
        events.record(session, cast.clinic_id, "appointment.confirmed", now, appointment="A2")
        ids = events.claim_webhooks(session, now)
    assert len(ids) == 2  # another appointment's event is not held up
    assert events.deliver(ids[0], lambda: now) == "retry"
    listener.close()
    with db.session_scope() as session:
        event = session.get(Event, ids[0])
        assert event is not None
        assert event.webhook_status == "pending"
        assert event.webhook_error is not None
        assert "Timeout" in event.webhook_error


def test_time_machine_is_importable() -> None:
    with time_machine.travel(dt.datetime(2026, 1, 1, tzinfo=dt.UTC), tick=False):
        assert dt.datetime.now(dt.UTC).year == 2026
    assert TEST_SECRET


def test_the_feed_never_skips_an_event_that_commits_late(cast: Cast) -> None:
    """Event writers of one clinic are serialised, so a poller never sees id N+1 before N."""
    started, release = threading.Event(), threading.Event()
    now = dt.datetime.now(dt.UTC)

    def slow_writer() -> None:
        with db.session_scope() as session:
            events.record(session, cast.clinic_id, "message.failed", now, data={"n": 1})
            started.set()
            release.wait(10)  # holds its transaction open, as a slow request would

    def quick_writer() -> None:
        with db.session_scope() as session:
            events.record(session, cast.clinic_id, "message.failed", now, data={"n": 2})

    def seen() -> list[int]:
        with db.session_scope() as session:
            rows, _ = events.feed(session, cast.clinic_id, 0, 100)
            return [e.data["n"] for e in rows]

    slow = threading.Thread(target=slow_writer)
    slow.start()
    assert started.wait(10)
    quick = threading.Thread(target=quick_writer)
    quick.start()
    quick.join(0.5)  # it must wait for the slow one, not commit a later id first
    assert seen() == []
    release.set()
    slow.join(10)
    quick.join(10)
    assert seen() == [1, 2]


def test_events_written_at_commit_never_hold_up_other_writers_before_it(cast: Cast) -> None:
    """`record_at_commit` takes the clinic's lock only at COMMIT: a writer still busy does not
    block another, whose event then gets the lower id; a poller that read in between never
    skips the late one, and a rolled-back transaction writes none."""
    started, release = threading.Event(), threading.Event()
    now = dt.datetime.now(dt.UTC)

    def slow_writer() -> None:
        with db.session_scope() as session:
            events.record_at_commit(session, cast.clinic_id, "message.failed", now, data={"n": 1})
            started.set()
            release.wait(10)  # still busy with its request

    def rolled_back() -> None:
        with db.session_scope() as session:
            events.record_at_commit(session, cast.clinic_id, "message.failed", now, data={"n": 0})
            raise RuntimeError("rolled back")

    def page(after: int) -> tuple[list[int], int]:
        with db.session_scope() as session:
            rows, cursor = events.feed(session, cast.clinic_id, after, 100)
            return [e.data["n"] for e in rows], cursor

    slow = threading.Thread(target=slow_writer)
    slow.start()
    assert started.wait(10)
    with pytest.raises(RuntimeError):
        rolled_back()
    with db.session_scope() as session:  # not held up by the busy writer
        events.record_at_commit(session, cast.clinic_id, "message.failed", now, data={"n": 2})
    first, cursor = page(0)
    assert first == [2]
    release.set()
    slow.join(10)
    assert page(cursor)[0] == [1]  # committed later, with a later id: not skipped
    assert page(0)[0] == [2, 1]


def test_events_written_at_commit_wait_for_a_writer_holding_the_lock(cast: Cast) -> None:
    """The commit-time write takes the same per-clinic lock as `record`, before its id is drawn,
    so ids still commit in order (on SQLite the database's single writer does the same): here
    the holder draws its id after the waiting writer asked for the lock, and commits first."""
    started, release = threading.Event(), threading.Event()
    now = dt.datetime.now(dt.UTC)

    def holder() -> None:
        with db.session_scope() as session:
            events._lock(session, [cast.clinic_id])
            clinic = session.get(Clinic, cast.clinic_id)
            assert clinic is not None
            clinic.name = "Clinique Paris (renamed)"  # SQLite: takes the write lock
            session.flush()
            started.set()
            release.wait(10)
            events.record(session, cast.clinic_id, "message.failed", now, data={"n": 1})

    def late() -> None:
        with db.session_scope() as session:
            events.record_at_commit(session, cast.clinic_id, "message.failed", now, data={"n": 2})

    first = threading.Thread(target=holder)
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=late)
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting at its COMMIT for the lock
    release.set()
    first.join(10)
    second.join(10)
    with db.session_scope() as session:
        rows, _ = events.feed(session, cast.clinic_id, 0, 100)
        assert [e.data["n"] for e in rows] == [1, 2]


@contextmanager
def sql_seen() -> Iterator[list[str]]:
    """Every SQL statement the application runs meanwhile, on one line each."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(" ".join(statement.split()))

    engine = db.get_engine()
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def test_the_webhook_costs_one_statement_and_a_batch_few_per_reply(vonage: Vonage) -> None:
    """Each statement is a round trip and CPU. The webhook only stores the reply. The worker
    applies a batch in one transaction: one claim, a few statements per reply, one UPDATE for
    every row's result, and the clinic's event lock taken last, by the one event INSERT
    itself, just before the COMMIT, so other writers of the clinic wait for nothing else."""
    texts = {"1": "confirm:applied", "2": "cancel:applied", "STOP": "opt_out:applied"}
    texts |= {"hello?": "needs_attention"}
    for n in range(len(texts)):
        remind(vonage, f"A{n}", phone=f"06 12 34 56 7{n}")
    postgres = db.get_engine().dialect.name == "postgresql"
    with vonage.worker_paused():
        for n, text in enumerate(texts):
            with statements() as kinds:
                vonage.inbound(text, message_id=f"m{n}", msisdn=f"3361234567{n}")
            assert kinds == ["INSERT"]
        with sql_seen() as seen:
            vonage.worker.resume()
            vonage.applied()
    assert [result_of(f"m{n}") for n in range(len(texts))] == list(texts.values())
    last = max(i for i, s in enumerate(seen) if "INSERT INTO events" in s)
    batch, rest = seen[: last + 1], seen[last + 1 :]
    # Then each of the 4 messages looked once more and found nothing left.
    assert len(rest) == 4, seen
    claim = "SELECT inbound_messages.id" if postgres else "UPDATE inbound_messages SET applied_at"
    assert batch[0].startswith(claim), seen
    assert all(s.startswith(claim) for s in rest), seen
    # A claim (PostgreSQL: the oldest waiting ids, then the picked rows locked); the latest
    # reminded appointment of every number, in one query; then confirm 2, cancel 3 (pending
    # reminders dropped), opt-out 3 (the clinics sending from the number), unclear 2 (one a
    # day); the results, in one UPDATE; the events.
    claim_statements = 2 if postgres else 1
    assert len(batch) <= claim_statements + 1 + 2 + 3 + 3 + 2 + 1 + 1, batch
    assert batch[-1].startswith("WITH event_lock AS" if postgres else "INSERT INTO events"), seen
    locks = [i for i, s in enumerate(batch) if "pg_advisory_xact_lock" in s]
    assert locks == ([len(batch) - 1] if postgres else [])
