"""Claiming, re-checking and sending reminders: every SMS once, on time, or a recorded reason.

The clock is passed in; the broker is dramatiq's in-process one with a real worker; the
provider is the console one (or the real Vonage SDK against the local stand-in).
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import pytest
import redis
import time_machine
from dramatiq.brokers.stub import StubBroker
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from reminders import actors, db, dispatch, scheduler
from reminders.api import create_app
from reminders.broker import QUEUE, RateLimiter
from reminders.config import Settings, get_settings
from reminders.models import Appointment, Clinic, Event, OptOut, Reminder
from reminders.planning import Intake
from reminders.schemas import AppointmentIn
from reminders.sms import ConsoleProvider, Provider, VonageProvider
from tests import vonage_standin as standin
from tests.conftest import REDIS_ENV, TEST_SECRET, Cast, need, statements

# A Monday: the appointment is on Thursday 12 November 2026 at 09:30 Paris (08:30 UTC).
BOOKED = dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.UTC)
STARTS = dt.datetime(2026, 11, 12, 8, 30, tzinfo=dt.UTC)
DUE_72H = STARTS - dt.timedelta(hours=72)
DUE_24H = STARTS - dt.timedelta(hours=24)


@dataclass
class Clock:
    now: dt.datetime

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class Sending:
    """The cast plus a running in-process worker, a settable clock and what the console printed."""

    cast: Cast
    clock: Clock
    broker: StubBroker
    out: io.StringIO = field(default_factory=io.StringIO)

    def tick(self, now: dt.datetime) -> list[int]:
        self.clock.now = now
        ids = scheduler.tick(self.clock)
        self.broker.join(QUEUE, fail_fast=False)
        return ids

    def rows(self) -> list[tuple[str, str, str | None]]:
        with db.session_scope() as session:
            found = session.execute(
                select(Reminder.rule, Reminder.status, Reminder.skip_reason).order_by(Reminder.id)
            )
            return [tuple(r) for r in found]  # type: ignore[misc]

    def printed(self) -> list[str]:
        return [line for line in self.out.getvalue().splitlines() if line.startswith("SMS ")]


def book(cast: Cast, external_id: str = "A1", now: dt.datetime = BOOKED, **extra: Any) -> None:
    data: dict[str, Any] = {
        "starts_at": STARTS.isoformat(),
        "duration_minutes": 20,
        "patient": {
            "external_id": extra.pop("patient_id", "P1"),
            "phone": "06 12 34 56 78",
            "language": "fr",
        },
    }
    data.update(extra)
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        Intake(session, clinic, now, TEST_SECRET.encode()).put(
            external_id, AppointmentIn.model_validate(data)
        )


def start_worker(
    settings: Settings, clock: Clock, provider: Provider, limit: bool = False
) -> tuple[StubBroker, dramatiq.Worker]:
    broker = StubBroker()
    actors.configure(settings, clock=clock, provider=provider, broker=broker, rate_limit=limit)
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=50)
    worker.start()
    return broker, worker


@pytest.fixture
def sending(cast: Cast) -> Iterator[Sending]:
    clock = Clock(BOOKED)
    out = io.StringIO()
    broker, worker = start_worker(get_settings(), clock, ConsoleProvider(stream=out))
    yield Sending(cast, clock, broker, out)
    worker.stop()


def set_clinic(cast: Cast, **values: Any) -> None:
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        for key, value in values.items():
            setattr(clinic, key, value)


def set_appointment(**values: Any) -> None:
    with db.session_scope() as session:
        appointment = session.scalars(select(Appointment)).one()
        for key, value in values.items():
            setattr(appointment, key, value)


def test_nothing_is_sent_before_its_time(sending: Sending) -> None:
    book(sending.cast)
    assert sending.tick(DUE_72H - dt.timedelta(minutes=1)) == []
    assert sending.printed() == []


def test_a_due_reminder_is_sent_once_with_its_text_and_segments(sending: Sending) -> None:
    book(sending.cast)
    [queued] = sending.tick(DUE_72H)
    assert sending.tick(DUE_72H + dt.timedelta(minutes=1)) == []
    [line] = sending.printed()
    assert "to +33*******78 from +33939000000 (GSM-7, 1 part)" in line
    assert "jeudi 12 novembre à 09:30" in line
    assert "/c/" in line
    with db.session_scope() as session:
        row = session.get(Reminder, queued)
        assert row is not None
        assert (row.status, row.segments, row.encoding, row.attempts) == ("sent", 1, "GSM-7", 1)
        assert row.provider_message_id is not None
        assert row.provider_message_id.startswith("console-")
        assert row.sent_at == DUE_72H


def test_both_rules_go_out_at_their_times(sending: Sending) -> None:
    book(sending.cast)
    sending.tick(DUE_72H)
    sending.tick(DUE_24H)
    assert sending.rows() == [("72h", "sent", None), ("24h:unconfirmed", "sent", None)]
    assert len(sending.printed()) == 2


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"status": "cancelled"}, "cancelled"),
        ({"confirmation": "cancelled_by_patient"}, "cancelled"),
        ({"starts_at": STARTS + dt.timedelta(days=1)}, "moved"),
        ({"confirmation": "confirmed"}, "confirmed"),
    ],
)
def test_the_worker_rechecks_the_appointment_at_send_time(
    sending: Sending, change: dict[str, Any], reason: str
) -> None:
    book(sending.cast)
    sending.tick(DUE_72H)
    set_appointment(**change)  # changed behind the planner's back, e.g. by another process
    sending.tick(DUE_24H)
    assert sending.rows()[1] == ("24h:unconfirmed", "skipped", reason)
    assert len(sending.printed()) == 1


def test_an_opted_out_number_is_skipped(sending: Sending) -> None:
    book(sending.cast)
    with db.session_scope() as session:
        session.add(OptOut(phone_e164="+33612345678", sender="+33939000000", source="sms"))
    sending.tick(DUE_72H)
    assert sending.rows()[0] == ("72h", "skipped", "opted_out")
    assert sending.printed() == []


def test_a_reminder_claimed_but_sent_after_its_deadline_is_skipped(sending: Sending) -> None:
    book(sending.cast)
    with db.session_scope() as session:
        dispatch.claim_due(session, DUE_72H)
    sending.clock.now = STARTS - dt.timedelta(hours=1)
    with db.session_scope() as session:
        [row_id] = session.scalars(select(Reminder.id).where(Reminder.status == "queued"))
    dispatch.send_one(row_id, sending.clock, ConsoleProvider(stream=sending.out), get_settings())
    assert sending.rows()[0] == ("72h", "skipped", "deadline")


def test_a_paused_clinic_sends_nothing_and_its_reminders_wait(sending: Sending) -> None:
    book(sending.cast)
    set_clinic(sending.cast, paused=True)
    assert sending.tick(DUE_72H) == []
    set_clinic(sending.cast, paused=False)
    sending.tick(DUE_72H + dt.timedelta(hours=1))
    assert sending.rows()[0] == ("72h", "sent", None)


def test_reminders_of_a_paused_clinic_expire_at_their_deadline(sending: Sending) -> None:
    book(sending.cast)
    set_clinic(sending.cast, paused=True)
    sending.tick(STARTS - dt.timedelta(hours=1))
    assert sending.rows() == [
        ("72h", "skipped", "deadline"),
        ("24h:unconfirmed", "skipped", "deadline"),
    ]


def test_the_daily_cap_holds_and_the_rest_waits_for_the_next_day(sending: Sending) -> None:
    set_clinic(sending.cast, daily_cap=2)
    for i in range(5):
        book(sending.cast, f"A{i}", patient_id=f"P{i}")
    assert len(sending.tick(DUE_72H)) == 2
    assert sending.tick(DUE_72H + dt.timedelta(hours=2)) == []
    next_morning = dt.datetime(2026, 11, 10, 7, 0, tzinfo=dt.UTC)  # 08:00 Paris
    assert len(sending.tick(next_morning)) == 2


def test_an_idle_tick_costs_the_same_statements_with_capped_clinics(sending: Sending) -> None:
    book(sending.cast)

    def idle_tick() -> list[str]:
        with statements() as seen:
            assert sending.tick(BOOKED) == []
        return list(seen)

    uncapped = idle_tick()
    set_clinic(sending.cast, daily_cap=10)
    assert idle_tick() == uncapped  # no per-clinic count or claim when nothing is due
    assert sending.tick(DUE_72H) != []  # the cap does not stop what is due


def test_a_reminder_that_reaches_the_worker_at_night_waits_for_the_morning(
    sending: Sending,
) -> None:
    book(sending.cast)
    with db.session_scope() as session:
        [row_id] = dispatch.claim_due(session, DUE_72H)
    night = dt.datetime(2026, 11, 9, 21, 30, tzinfo=dt.UTC)  # 22:30 Paris
    sending.clock.now = night
    result = dispatch.send_one(
        row_id, sending.clock, ConsoleProvider(stream=sending.out), get_settings()
    )
    assert result == "quiet_hours"
    with db.session_scope() as session:
        row = session.get(Reminder, row_id)
        assert row is not None
        assert (row.status, row.due_at) == (
            "planned",
            dt.datetime(2026, 11, 10, 7, 0, tzinfo=dt.UTC),
        )


def test_when_two_rules_are_due_at_once_only_the_latest_goes(sending: Sending) -> None:
    book(sending.cast)
    sending.tick(DUE_24H)  # down since before the 72h reminder was due
    assert sending.rows() == [("72h", "skipped", "superseded"), ("24h:unconfirmed", "sent", None)]
    assert len(sending.printed()) == 1


def test_an_earlier_rule_reaching_a_worker_after_the_later_one_went_out_is_superseded(
    sending: Sending,
) -> None:
    book(sending.cast)
    with db.session_scope() as session:
        early, late = dispatch.claim_due(session, DUE_24H)  # two messages, two worker threads
    provider, settings = ConsoleProvider(stream=sending.out), get_settings()
    assert dispatch.send_batch([late], Clock(DUE_24H), provider, settings) == {late: "sent"}
    assert dispatch.send_batch([early], Clock(DUE_24H), provider, settings) == {early: "superseded"}
    assert len(sending.printed()) == 1


def test_concurrent_claims_never_share_a_reminder(cast: Cast) -> None:
    for i in range(60):
        book(cast, f"A{i}", patient_id=f"P{i}")

    def claim(_: int) -> list[int]:
        with db.session_scope() as session:
            return dispatch.claim_due(session, DUE_72H, limit=7)

    with ThreadPoolExecutor(max_workers=4) as pool:
        batches = list(pool.map(claim, range(20)))
    claimed = [i for batch in batches for i in batch]
    assert len(claimed) == len(set(claimed)) == 60


def test_a_claim_takes_no_more_than_its_limit(sending: Sending) -> None:
    """The daily cap and the scheduler's batches rest on it. (On PostgreSQL, `id IN (SELECT ...
    LIMIT n FOR UPDATE SKIP LOCKED)` may be planned as a nested loop that runs the subquery again
    for each row, each run skipping the rows the previous ones locked: more than n rows.)"""
    for i in range(40):
        book(sending.cast, f"A{i}", patient_id=f"P{i}")
    with db.session_scope() as session:
        assert [len(dispatch.claim_due(session, DUE_72H, limit=7)) for _ in range(7)] == [
            7,
            7,
            7,
            7,
            7,
            5,
            0,
        ]


def test_a_reminder_is_sent_once_however_often_its_id_is_queued(sending: Sending) -> None:
    book(sending.cast)
    with db.session_scope() as session:
        [row_id] = dispatch.claim_due(session, DUE_72H)
    sending.clock.now = DUE_72H
    for _ in range(5):
        actors.send_reminder.send(row_id)
    sending.broker.join(QUEUE, fail_fast=False)
    assert len(sending.printed()) == 1


def test_a_batch_of_25_costs_a_few_statements_not_a_few_per_sms(sending: Sending) -> None:
    for i in range(dispatch.SEND_BATCH):
        book(sending.cast, f"A{i}", patient_id=f"P{i}")
    with db.session_scope() as session:
        ids = dispatch.claim_due(session, DUE_72H)
    with statements() as seen:
        results = dispatch.send_batch(
            ids, Clock(DUE_72H), ConsoleProvider(stream=sending.out), get_settings()
        )
    assert set(results.values()) == {"sent"}
    assert len(sending.printed()) == dispatch.SEND_BATCH
    # claim, load (reminders, templates, opt-outs, siblings, stop switch), mark, record, receipts
    assert len(seen) <= 10, seen


def test_the_sweep_requeues_lost_claims_and_marks_dead_sends_unknown(sending: Sending) -> None:
    book(sending.cast)
    with db.session_scope() as session:
        lost = dispatch.claim_due(session, DUE_72H)  # claimed, then the broker lost it
    later = DUE_72H + dispatch.CLAIM_STALE + dt.timedelta(minutes=1)
    with db.session_scope() as session:
        assert dispatch.sweep(session, later) == lost
    with db.session_scope() as session:
        row = session.get(Reminder, lost[0])
        assert row is not None
        row.status, row.claimed_at = "sending", later  # a worker died mid-send
    with db.session_scope() as session:
        dispatch.sweep(session, later + dispatch.SENDING_STALE + dt.timedelta(seconds=1))
    with db.session_scope() as session:
        row = session.get(Reminder, lost[0])
        assert row is not None
        assert row.status == "unknown"


# --- through the real Vonage SDK against the local stand-in ------------------------------------


@pytest.fixture
def vonage(
    cast: Cast, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[standin.VonageStandIn, Sending]]:
    with standin.VonageStandIn() as server:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.ca_bundle))
        settings = get_settings().model_copy(
            update={
                "sms_provider": "vonage",
                "vonage_api_key": "key",
                "vonage_api_secret": SecretStr("secret"),
                "vonage_rest_host": server.rest_host,
            }
        )
        clock = Clock(BOOKED)
        broker, worker = start_worker(settings, clock, VonageProvider(settings, timeout=1))
        yield server, Sending(cast, clock, broker)
        worker.stop()


def statuses(*fields: str) -> list[tuple[Any, ...]]:
    """The given fields of each appointment's 72h reminder, in booking order."""
    with db.session_scope() as session:
        columns = [getattr(Reminder, f) for f in fields]
        query = select(*columns).where(Reminder.rule == "72h").order_by(Reminder.id)
        return [tuple(r) for r in session.execute(query)]


def test_vonage_success_records_id_price_and_segments(
    vonage: tuple[standin.VonageStandIn, Sending],
) -> None:
    server, sending = vonage
    book(sending.cast)
    sending.tick(DUE_72H)
    [request] = server.requests
    assert request.form["client-ref"].startswith("r")
    assert request.form["to"] == "33612345678"
    assert statuses("status", "segments", "price")[0] == ("sent", 1, pytest.approx(0.0333))


def test_vonage_throttling_is_retried_briefly_then_sent(
    vonage: tuple[standin.VonageStandIn, Sending],
) -> None:
    server, sending = vonage
    server.queue(standin.status(1), standin.status(1))
    book(sending.cast)
    sending.tick(DUE_72H)
    assert server.posts == 3
    assert statuses("status", "attempts")[0] == ("sent", 3)


def test_vonage_errors_past_the_brief_retries_go_back_to_the_row(
    vonage: tuple[standin.VonageStandIn, Sending],
) -> None:
    server, sending = vonage
    server.behaviour = lambda request: standin.http_error(500)
    book(sending.cast)
    sending.tick(DUE_72H)
    status, attempts, due_at = statuses("status", "attempts", "due_at")[0]
    assert (status, attempts) == ("planned", dispatch.BRIEF_RETRIES)
    assert due_at > DUE_72H  # tried again later by the scheduler, not parked in the broker


def test_in_a_batch_a_throttled_sms_is_retried_alone_and_the_others_recorded(
    vonage: tuple[standin.VonageStandIn, Sending],
) -> None:
    server, sending = vonage
    server.queue(standin.ok(), standin.status(1), standin.ok())
    for i in range(3):
        book(sending.cast, f"A{i}", patient_id=f"P{i}")
    sending.tick(DUE_72H)  # one message of three ids; its retry takes only the throttled one
    assert server.posts == 4
    assert [r.form["client-ref"] for r in server.requests].count(
        server.requests[1].form["client-ref"]
    ) == 2
    assert statuses("status", "attempts") == [("sent", 1), ("sent", 2), ("sent", 1)]


def test_a_slow_batch_renews_its_claim_so_the_sweep_never_takes_a_send_in_progress(
    cast: Cast,
) -> None:
    for i in range(3):
        book(cast, f"A{i}", patient_id=f"P{i}")
    with db.session_scope() as session:
        ids = dispatch.claim_due(session, DUE_72H)
    clock = Clock(DUE_72H)

    class SlowLimiter:
        """A low send rate: each turn comes 50 s later, while a scheduler sweeps meanwhile."""

        def wait(self, until: dt.datetime) -> bool:
            clock.now += dt.timedelta(seconds=50)
            with db.session_scope() as session:
                dispatch.sweep(session, clock.now)
            return True

    out = io.StringIO()
    results = dispatch.send_batch(
        ids, clock, ConsoleProvider(stream=out), get_settings(), SlowLimiter()
    )
    assert clock.now - DUE_72H > dispatch.SENDING_STALE  # the batch outlived a claim
    assert list(results.values()) == ["sent"] * 3
    assert statuses("status") == [("sent",)] * 3
    assert out.getvalue().count("SMS ") == 3


def test_rows_the_sweep_took_from_a_stalled_batch_are_sent_once_by_the_sweep_not_the_batch(
    sending: Sending,
) -> None:
    for i in range(2):
        book(sending.cast, f"A{i}", patient_id=f"P{i}")
    with db.session_scope() as session:
        ids = dispatch.claim_due(session, DUE_72H)
    clock = Clock(DUE_72H)

    class Stalled:
        """The worker froze past the sweep's patience (a long GC pause, a stuck socket)."""

        def wait(self, until: dt.datetime) -> bool:
            clock.now += dispatch.SENDING_STALE + dt.timedelta(seconds=1)
            with db.session_scope() as session:
                dispatch.sweep(session, clock.now)  # takes the rows for a dead worker's
            return True

    results = dispatch.send_batch(
        ids, clock, ConsoleProvider(stream=sending.out), get_settings(), Stalled()
    )
    assert list(results.values()) == ["swept", "swept"]
    assert sending.printed() == []
    sending.tick(clock.now + dispatch.UNKNOWN_GRACE + dt.timedelta(minutes=1))
    assert len(sending.printed()) == 2  # each sent once, by the sweep's resend
    assert statuses("status") == [("sent",)] * 2


def test_a_permanent_vonage_error_fails_with_an_event(
    vonage: tuple[standin.VonageStandIn, Sending],
) -> None:
    server, sending = vonage
    server.queue(standin.status(3, "Invalid to number"))
    book(sending.cast)
    sending.tick(DUE_72H)
    assert server.posts == 1
    assert statuses("status")[0] == ("failed",)
    with db.session_scope() as session:
        [event] = session.scalars(select(Event))
        assert event.type == "message.failed"
        assert event.appointment_external_id == "A1"


@pytest.mark.parametrize("code", [4, 9])
def test_credentials_or_credit_errors_stop_all_sending_and_keep_reminders_pending(
    vonage: tuple[standin.VonageStandIn, Sending], code: int
) -> None:
    server, sending = vonage
    server.queue(standin.status(code), standin.status(code))
    book(sending.cast)
    book(sending.cast, "A2", patient_id="P2")
    sending.tick(DUE_72H)
    # Both went in one batch: the stop put the second back before it was sent.
    assert server.posts == 1
    assert {s for (s,) in statuses("status")} == {"planned"}
    with db.session_scope() as session:
        assert dispatch.sending_stopped(session, DUE_72H) is not None
    with (
        time_machine.travel(DUE_72H + dt.timedelta(minutes=1), tick=False),
        TestClient(create_app()) as client,
    ):
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["errors"][0]["field"] == "sms"
    assert sending.tick(DUE_72H + dt.timedelta(minutes=1)) == []
    server.reset()  # the account is fixed; forget any error reply left unused
    sending.tick(DUE_72H + dispatch.STOP_PAUSE)  # tried again once the pause is over
    assert [s for (s,) in statuses("status")] == ["sent", "sent"]


def receipt(row_id: int, status: str, now: dt.datetime) -> str:
    with db.session_scope() as session:
        return dispatch.apply_receipt(
            session,
            message_id=f"m{row_id}",
            client_ref=f"r{row_id}",
            status=status,
            err_code="0",
            price=None,
            now=now,
        )


def test_a_receipt_beating_the_record_of_its_send_settles_it_and_nothing_is_resent(
    sending: Sending,
) -> None:
    book(sending.cast)
    with db.session_scope() as session:
        [row_id] = dispatch.claim_due(session, DUE_72H)
    with db.session_scope() as session:  # the worker took it and sent it...
        prepared, _ = dispatch.prepare_batch(session, [row_id], DUE_72H, get_settings())
        assert [p.reminder_id for p in prepared] == [row_id]
    # ...and died (or lost the database) before recording it; the receipt came anyway.
    assert receipt(row_id, "delivered", DUE_72H + dt.timedelta(seconds=5)) == "applied"
    later = DUE_72H + dispatch.SENDING_STALE + dispatch.UNKNOWN_GRACE + dt.timedelta(minutes=1)
    assert sending.tick(later) == []
    assert statuses("status", "delivery_status") == [("sent", "delivered")]
    assert sending.printed() == []  # never sent again


def test_an_unknown_send_without_a_receipt_by_its_deadline_fails_and_a_late_receipt_settles_it(
    sending: Sending,
) -> None:
    book(sending.cast)
    with db.session_scope() as session:
        [row_id] = dispatch.claim_due(session, DUE_72H)
        row = session.get(Reminder, row_id)
        assert row is not None
        row.status, row.claimed_at = "unknown", DUE_72H  # the answer of its send was lost
        row.next_attempt_at = STARTS  # and no resend came before the deadline
    sending.tick(STARTS - dt.timedelta(hours=1))  # past the 2 h deadline
    assert statuses("status", "error") == [("failed", dispatch.NO_RECEIPT)]
    with db.session_scope() as session:
        [event] = session.scalars(select(Event))
        assert (event.type, event.data["error"]) == ("message.failed", dispatch.NO_RECEIPT)
    assert receipt(row_id, "delivered", STARTS) == "applied"  # it did arrive after all
    assert statuses("status", "delivery_status") == [("sent", "delivered")]


def test_less_than_vonages_shortest_ttl_before_the_deadline_is_a_skip_not_a_failure(
    sending: Sending,
) -> None:
    book(sending.cast)
    deadline = STARTS - dt.timedelta(hours=2)
    with db.session_scope() as session:
        ids = dispatch.claim_due(session, DUE_72H)
    too_late = deadline - dt.timedelta(seconds=10)
    results = dispatch.send_batch(
        ids, Clock(too_late), ConsoleProvider(stream=sending.out), get_settings()
    )
    assert list(results.values()) == ["deadline"]
    assert statuses("status", "skip_reason") == [("skipped", "deadline")]


def test_a_dropped_connection_is_an_unknown_outcome_resent_only_without_a_receipt(
    vonage: tuple[standin.VonageStandIn, Sending],
) -> None:
    server, sending = vonage
    server.queue(standin.drop(), standin.drop())
    book(sending.cast)
    book(sending.cast, "A2", patient_id="P2")
    sending.tick(DUE_72H)
    assert server.posts == 2  # one POST each: the SDK did not re-POST
    assert [s for (s,) in statuses("status")] == ["unknown", "unknown"]
    with db.session_scope() as session:
        first = session.scalars(select(Reminder).order_by(Reminder.id).limit(1)).one()
        first.delivery_status = "delivered"  # its receipt came: it did go out
    after_grace = DUE_72H + dispatch.UNKNOWN_GRACE + dt.timedelta(minutes=1)
    sending.tick(after_grace)
    assert server.posts == 3  # only the one without a receipt was resent
    assert [s for (s,) in statuses("status")] == ["unknown", "sent"]


def test_an_unknown_outcome_is_never_resent_after_its_deadline(
    vonage: tuple[standin.VonageStandIn, Sending],
) -> None:
    server, sending = vonage
    book(sending.cast)
    sending.tick(DUE_72H)
    server.queue(standin.drop())
    sending.tick(DUE_24H)
    assert statuses("status") == [("sent",)]
    sending.tick(STARTS - dt.timedelta(hours=1))  # grace long over, but so is the deadline
    assert server.posts == 2


# --- the send rate ---------------------------------------------------------------------------


def test_the_send_rate_caps_sends_per_second(database: str) -> None:
    settings = get_settings().model_copy(update={"send_rate": 3.0})
    clock = Clock(BOOKED)
    limiter = RateLimiter(settings, clock)
    with time_machine.travel(dt.datetime(2026, 11, 2, 9, 0, 0, 500_000, tzinfo=dt.UTC), tick=False):
        assert [limiter.wait(BOOKED + dt.timedelta(hours=1)) for _ in range(3)] == [True] * 3
        assert limiter.wait(BOOKED) is False  # a fourth this second would wait past `until`


@pytest.mark.redis
def test_workers_sharing_redis_take_the_rate_in_blocks_and_never_exceed_it(
    request: pytest.FixtureRequest, database: str
) -> None:
    redis_url = need(request.config, REDIS_ENV)
    settings = get_settings().model_copy(update={"send_rate": 45.0, "redis_url": redis_url})
    clock = Clock(BOOKED)
    second = dt.datetime(2026, 11, 2, 9, 0, 7, 100_000, tzinfo=dt.UTC)
    redis.Redis.from_url(redis_url).delete(f"reminders-sms:1:{int(second.timestamp())}")
    workers = [RateLimiter(settings, clock) for _ in range(3)]  # three worker processes
    with time_machine.travel(second, tick=False):
        turns = [0, 0, 0]
        for _ in range(30):
            for i, limiter in enumerate(workers):
                turns[i] += limiter.wait(BOOKED)  # `until` passed: False once throttled
    assert sum(turns) == 45  # exactly the rate, across all of them
    assert all(t > 0 for t in turns)


# --- answers to patients -----------------------------------------------------------------------


def test_answers_go_out_at_once_at_night_even_for_a_paused_clinic(sending: Sending) -> None:
    from reminders import replies

    book(sending.cast)
    set_clinic(sending.cast, paused=True)
    night = dt.datetime(2026, 11, 3, 23, 30, tzinfo=dt.UTC)  # 00:30 Paris
    with db.session_scope() as session:
        appointment = session.scalars(select(Appointment)).one()
        decision = replies.decide(session, appointment, "confirm", "sms", night)
        answer = decision.answer_id
        stop = replies.queue_answer(
            session, sending.cast.clinic_id, "+33612345678", "opted_out", "opted_out:1", night
        )
        session.add(OptOut(phone_e164="+33612345678", sender="+33939000000", source="sms"))
    sending.clock.now = night
    assert answer is not None
    assert stop is not None
    actors.send_reminder.send(answer)
    actors.send_reminder.send(stop)
    sending.broker.join(QUEUE, fail_fast=False)
    with db.session_scope() as session:
        rows = {
            r.kind: (r.status, r.skip_reason)
            for r in session.scalars(select(Reminder))
            if r.kind in ("ack", "opted_out")
        }
    # The opt-out confirmation goes even though the number just opted out; the ack does not.
    assert rows == {"ack": ("skipped", "opted_out"), "opted_out": ("sent", None)}
    [line] = sending.printed()
    assert "START" in line  # how to opt back in


def test_an_acknowledgement_names_the_appointment(sending: Sending) -> None:
    from reminders import replies

    book(sending.cast)
    with db.session_scope() as session:
        appointment = session.scalars(select(Appointment)).one()
        answer = replies.decide(session, appointment, "cancel", "link", BOOKED).answer_id
    assert answer is not None
    sending.clock.now = BOOKED
    actors.send_reminder.send(answer)
    sending.broker.join(QUEUE, fail_fast=False)
    [line] = sending.printed()
    assert "jeudi 12 novembre" in line
    assert "09:30" in line
