"""Claim due reminders, send one, record the result.

The database is the truth and the queue only carries ids (DESIGN rules 1-3, 6). A reminder moves:

    planned --claim--> queued --worker--> sending --> sent | failed | unknown | planned (later)
                          \\--re-check--> skipped (cancelled, moved, confirmed, opted out, ...)

Every move is a guarded UPDATE whose row count is checked, so any number of schedulers and workers
may run. A row left `queued` (Redis lost it) is queued again by the sweep; a row left `sending`
(a worker died mid-send) becomes `unknown`, and an unknown send is resent only after a grace
period with no delivery receipt, and only before its deadline.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from reminders import events, schedule, texts
from reminders.config import Settings
from reminders.db import session_scope
from reminders.models import (
    ANSWER_KINDS,
    Appointment,
    AppSetting,
    Clinic,
    DeliveryReceipt,
    OptOut,
    Reminder,
    Template,
)
from reminders.planning import WENT_OUT, clinic_timing
from reminders.sms import OutcomeUnknown, Provider, SmsError, mask_phone

log = logging.getLogger(__name__)

BRIEF_RETRIES = 3  # transient errors retried within seconds by dramatiq; later ones via the row
UNKNOWN_GRACE = dt.timedelta(minutes=15)  # wait this long for a receipt before resending
CLAIM_STALE = dt.timedelta(minutes=10)  # queued this long: the broker lost it, queue it again
SENDING_STALE = dt.timedelta(minutes=2)  # sending this long: the worker died mid-send
STOP_PAUSE = dt.timedelta(minutes=5)  # after credentials/credit errors, try again this late
DEFAULT_SENDER = "Reminders"
_STOP_KEY = "sending_stopped"
_PENDING_OUTCOMES = ("queued", "sending", "sent", "unknown")

Clock = Callable[[], dt.datetime]


class TransientSendError(Exception):
    """A send failed in a way worth retrying within seconds (the row stays queued)."""


class Limiter(Protocol):
    def wait(self, until: dt.datetime) -> bool:
        """Blocks until a send is allowed; False if that would be after `until`."""


# --- claiming (the scheduler) ------------------------------------------------------------------


def _claim(session: Session, query: Select[Any], now: dt.datetime) -> list[int]:
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=Reminder)
    statement = (
        update(Reminder)
        .where(Reminder.id.in_(query.scalar_subquery()))
        .values(status="queued", claimed_at=now)
        .returning(Reminder.id)
        .execution_options(synchronize_session=False)
    )
    return list(session.scalars(statement))


def _due(now: dt.datetime, limit: int) -> Select[Any]:
    return (
        select(Reminder.id)
        .join(Clinic, Clinic.id == Reminder.clinic_id)
        .where(
            Reminder.status == "planned",
            Reminder.due_at <= now,
            or_(Clinic.paused.is_(False), Reminder.kind.in_(ANSWER_KINDS)),
        )
        .order_by(Reminder.due_at)
        .limit(limit)
    )


def local_day_start(now: dt.datetime, timezone: str) -> dt.datetime:
    zone = ZoneInfo(timezone)
    local = now.astimezone(zone)
    return dt.datetime.combine(local.date(), dt.time(), tzinfo=zone).astimezone(dt.UTC)


def used_today(session: Session, clinic: Clinic, now: dt.datetime) -> int:
    """SMS a clinic has sent (or has in flight) since its local midnight: the daily cap."""
    count = session.scalar(
        select(func.count())
        .select_from(Reminder)
        .where(
            Reminder.clinic_id == clinic.id,
            Reminder.claimed_at >= local_day_start(now, clinic.timezone),
            Reminder.status.in_(_PENDING_OUTCOMES),
        )
    )
    return count or 0


def claim_due(session: Session, now: dt.datetime, limit: int = 1000) -> list[int]:
    """Claims up to `limit` due reminders of unpaused clinics, within each clinic's daily cap."""
    if sending_stopped(session, now) is not None:
        return []
    # Answers to patients are not reminders: no cap holds them back.
    uncapped = or_(Clinic.daily_cap.is_(None), Reminder.kind.in_(ANSWER_KINDS))
    claimed = _claim(session, _due(now, limit).where(uncapped), now)
    capped = session.scalars(
        select(Clinic).where(Clinic.daily_cap.is_not(None), Clinic.paused.is_(False))
    )
    for clinic in capped:
        assert clinic.daily_cap is not None
        room = min(clinic.daily_cap - used_today(session, clinic, now), limit - len(claimed))
        if room > 0:
            capped_due = _due(now, room).where(
                Clinic.id == clinic.id, Reminder.kind.not_in(ANSWER_KINDS)
            )
            claimed += _claim(session, capped_due, now)
    return claimed


def expire(session: Session, now: dt.datetime) -> int:
    """Planned reminders whose deadline passed unsent (a paused clinic, a cap) are skipped."""
    result = session.execute(
        update(Reminder)
        .where(Reminder.status == "planned", Reminder.due_at <= now, Reminder.send_by < now)
        .values(status="skipped", skip_reason="deadline")
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def sweep(session: Session, now: dt.datetime) -> list[int]:
    """Recovers what a lost broker or a dead worker left behind; returns ids to queue again."""
    session.execute(
        update(Reminder)
        .where(Reminder.status == "sending", Reminder.claimed_at < now - SENDING_STALE)
        .values(status="unknown", next_attempt_at=now + UNKNOWN_GRACE)
        .execution_options(synchronize_session=False)
    )
    requeued = list(
        session.scalars(
            update(Reminder)
            .where(Reminder.status == "queued", Reminder.claimed_at < now - CLAIM_STALE)
            .values(claimed_at=now)
            .returning(Reminder.id)
            .execution_options(synchronize_session=False)
        )
    )
    # An unknown outcome with no receipt after the grace period is resent, before the deadline.
    resend = (
        select(Reminder.id)
        .where(
            Reminder.status == "unknown",
            Reminder.next_attempt_at <= now,
            Reminder.delivery_status.is_(None),
            Reminder.send_by > now,
        )
        .limit(1000)
    )
    return requeued + _claim(session, resend, now)


# --- the provider's stop switch ----------------------------------------------------------------


def sending_stopped(session: Session, now: dt.datetime) -> str | None:
    """The reason all sending is stopped (credentials or credit), while it holds."""
    raw = session.scalar(select(AppSetting.value).where(AppSetting.key == _STOP_KEY))
    if raw is None:
        return None
    state = json.loads(raw)
    if dt.datetime.fromisoformat(state["until"]) <= now:
        return None
    return str(state["reason"])


def stop_sending(session: Session, now: dt.datetime, reason: str) -> None:
    value = json.dumps(
        {"reason": reason, "since": now.isoformat(), "until": (now + STOP_PAUSE).isoformat()}
    )
    # Several workers may hit the same error at once: an upsert, not a read-then-write.
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(
        insert(AppSetting)
        .values(key=_STOP_KEY, value=value)
        .on_conflict_do_update(index_elements=["key"], set_={"value": value})
    )
    log.critical(
        "ALL SMS SENDING STOPPED: %s; reminders stay pending, retrying at %s",
        reason,
        (now + STOP_PAUSE).isoformat(),
    )


# --- sending one (the worker) ------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    reminder_id: int
    to: str
    sender: str
    text: str
    send_by: dt.datetime


def skip_reason(
    session: Session,
    reminder: Reminder,
    appointment: Appointment,
    clinic: Clinic,
    now: dt.datetime,
) -> str | None:
    """Why this reminder must not go out now, re-checked at send time (DESIGN rule 3)."""
    patient = appointment.patient
    if appointment.status != "booked" or appointment.confirmation == "cancelled_by_patient":
        return "cancelled"
    if reminder.appointment_starts_at != appointment.starts_at:
        return "moved"
    if reminder.rule.endswith(":unconfirmed") and appointment.confirmation != "unconfirmed":
        return "confirmed"
    if not patient.sms_capable or patient.phone_e164 is None:
        return "not_sms_capable"
    if now > reminder.send_by:
        return "deadline"
    if superseded(session, reminder, now):
        return "superseded"
    if opted_out(session, patient.phone_e164, sender_of(clinic)):
        return "opted_out"
    return None


def superseded(session: Session, reminder: Reminder, now: dt.datetime) -> bool:
    """A later send for the same booking is due too (we were down, or paused): only the latest
    goes, never a burst."""
    later = session.scalar(
        select(Reminder.id)
        .where(
            Reminder.appointment_id == reminder.appointment_id,
            Reminder.appointment_starts_at == reminder.appointment_starts_at,
            Reminder.id != reminder.id,
            Reminder.due_at > reminder.due_at,
            Reminder.due_at <= now,
            Reminder.status.in_(("planned", "queued")),
        )
        .limit(1)
    )
    return later is not None


def sender_of(clinic: Clinic) -> str:
    return clinic.sender or DEFAULT_SENDER


def opted_out(session: Session, phone: str, sender: str) -> bool:
    found = session.scalar(
        select(OptOut.id).where(OptOut.phone_e164 == phone, OptOut.sender == sender).limit(1)
    )
    return found is not None


def render(
    session: Session,
    reminder: Reminder,
    appointment: Appointment | None,
    clinic: Clinic,
    settings: Settings,
    now: dt.datetime,
) -> str:
    """The SMS text: the clinic's own template for this kind and language, else the built-in."""
    language = appointment.patient.language if appointment is not None else clinic.language
    source = None
    if reminder.kind in texts.TEMPLATE_KINDS:
        source = session.scalar(
            select(Template.source).where(
                Template.clinic_id == clinic.id,
                Template.kind == reminder.kind,
                Template.language == language,
            )
        )
    old_start = None
    if reminder.kind == "moved" and appointment is not None:
        old_start = session.scalar(
            select(Reminder.appointment_starts_at)
            .where(
                Reminder.appointment_id == appointment.id,
                Reminder.appointment_starts_at != appointment.starts_at,
                Reminder.status.in_(WENT_OUT),
            )
            .order_by(Reminder.id.desc())
            .limit(1)
        )
    token = appointment.link_token if appointment is not None else None
    context = texts.MessageContext(
        clinic=clinic.name,
        timezone=clinic.timezone,
        language=language,
        starts_at=appointment.starts_at if appointment is not None else now,
        link=f"{settings.public_url}/c/{token}" if token else settings.public_url,
        two_way=sender_of(clinic).startswith("+"),
        practitioner=appointment.practitioner if appointment is not None else None,
        location=appointment.location if appointment is not None else None,
        old_starts_at=old_start,
        decision=reminder.rule.partition(":")[2] if reminder.kind == "ack" else None,
    )
    text: str = texts.render(reminder.kind, context, source)
    return text


def _check(
    session: Session, reminder: Reminder, clinic: Clinic, now: dt.datetime
) -> str | dt.datetime | None:
    """None to send now; a reason to skip; or the time to wait for (quiet hours)."""
    if reminder.kind in ANSWER_KINDS:
        # The patient wrote to us: answer at any hour, but not late, and not after a STOP
        # (the opt-out confirmation itself excepted).
        if now > reminder.send_by:
            return "deadline"
        if reminder.kind != "opted_out" and opted_out(
            session, reminder.phone_e164, sender_of(clinic)
        ):
            return "opted_out"
        return None
    appointment = reminder.appointment
    assert appointment is not None
    reason = skip_reason(session, reminder, appointment, clinic, now)
    if reason is not None:
        return reason
    timing = clinic_timing(clinic)
    if schedule.in_quiet_hours(now, timing.zone, timing.quiet):
        later = schedule.quiet_end_after(now, timing.zone, timing.quiet)
        return "quiet_hours" if later > reminder.send_by else later
    return None


def prepare(
    session: Session, reminder_id: int, now: dt.datetime, settings: Settings
) -> Prepared | str:
    """Re-checks a queued reminder and marks it `sending`; or says why not (a reason string)."""
    reminder = session.get(Reminder, reminder_id)
    if reminder is None or reminder.status != "queued":
        return "not_queued"  # someone else has it, or it is done
    clinic = session.get(Clinic, reminder.clinic_id)
    assert clinic is not None
    check = _check(session, reminder, clinic, now)
    if isinstance(check, str):
        reminder.status, reminder.skip_reason = "skipped", check
        return check
    paused = clinic.paused and reminder.kind not in ANSWER_KINDS
    if paused or sending_stopped(session, now) is not None:
        reminder.status = "planned"  # waits, within its deadline
        return "waiting"
    if check is not None:
        reminder.status, reminder.due_at = "planned", check
        return "quiet_hours"
    appointment = reminder.appointment
    text = render(session, reminder, appointment, clinic, settings, now)
    segments = texts.count_segments(text)
    phone = reminder.phone_e164
    if appointment is not None and reminder.kind not in ANSWER_KINDS:
        phone = appointment.patient.phone_e164 or phone  # the patient's number as of now
    marked = session.execute(
        update(Reminder)
        .where(Reminder.id == reminder_id, Reminder.status == "queued")
        .values(
            status="sending",
            claimed_at=now,
            attempts=Reminder.attempts + 1,
            text=text,
            encoding=segments.encoding,
            segments=segments.count,
            phone_e164=phone,
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(marked, "rowcount", 0) != 1:
        return "not_queued"
    return Prepared(reminder_id, phone, sender_of(clinic), text, reminder.send_by)


def _record(session: Session, reminder_id: int, now: dt.datetime, **values: Any) -> int:
    """Moves a `sending` row to its outcome (only if it is still `sending`)."""
    result = session.execute(
        update(Reminder)
        .where(Reminder.id == reminder_id, Reminder.status == "sending")
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _failed(
    session: Session, reminder_id: int, now: dt.datetime, error: str, status: str | None
) -> None:
    if not _record(session, reminder_id, now, status="failed", error=error[:500]):
        return
    reminder = session.get(Reminder, reminder_id)
    assert reminder is not None
    appointment = reminder.appointment
    events.record(
        session,
        reminder.clinic_id,
        "message.failed",
        now,
        appointment=appointment.external_id if appointment else None,
        data={
            "message": reminder.id,
            "kind": reminder.kind,
            "rule": reminder.rule,
            "error": error,
            "status": status,
        },
    )


def _retry_later(
    session: Session,
    reminder_id: int,
    now: dt.datetime,
    attempts: int,
    send_by: dt.datetime,
    error: str,
) -> None:
    later = now + min(dt.timedelta(seconds=30 * 2**attempts), dt.timedelta(minutes=30))
    if later > send_by:
        _failed(session, reminder_id, now, f"deadline reached after: {error}", None)
    else:
        _record(
            session,
            reminder_id,
            now,
            status="planned",
            due_at=later,
            next_attempt_at=later,
            error=error[:500],
        )


def send_one(
    reminder_id: int,
    clock: Clock,
    provider: Provider,
    settings: Settings,
    limiter: Limiter | None = None,
) -> str:
    """Sends one queued reminder and records the outcome; returns what happened.

    Raises TransientSendError when a brief dramatiq retry is the right answer (the row is back
    in `queued`).
    """
    with session_scope() as session:
        prepared = prepare(session, reminder_id, clock(), settings)
    if isinstance(prepared, str):
        return prepared
    if limiter is not None and not limiter.wait(prepared.send_by):
        with session_scope() as session:
            _record(session, reminder_id, clock(), status="skipped", skip_reason="deadline")
        return "deadline"
    now = clock()
    try:
        sent = provider.send(
            to=prepared.to,
            sender=prepared.sender,
            text=prepared.text,
            client_ref=f"r{reminder_id}",
            ttl=prepared.send_by - now,
        )
    except OutcomeUnknown as exc:
        log.warning(
            "SMS %s to %s: outcome unknown (%s); waiting for a receipt",
            reminder_id,
            mask_phone(prepared.to),
            exc,
        )
        with session_scope() as session:
            _record(
                session,
                reminder_id,
                clock(),
                status="unknown",
                next_attempt_at=clock() + UNKNOWN_GRACE,
                error=str(exc)[:500],
            )
        return "unknown"
    except SmsError as exc:
        return _on_error(reminder_id, clock, exc, prepared)
    with session_scope() as session:
        _record(
            session,
            reminder_id,
            clock(),
            status="sent",
            sent_at=clock(),
            provider_message_id=sent.message_id,
            price=sent.price,
            error=None,
        )
        apply_waiting_receipts(session, reminder_id, sent.message_ids, clock())
    return "sent"


def _on_error(reminder_id: int, clock: Clock, exc: SmsError, prepared: Prepared) -> str:
    with session_scope() as session:
        now = clock()
        if exc.stop_all:
            stop_sending(session, now, exc.reason)
            _record(
                session,
                reminder_id,
                now,
                status="planned",
                attempts=Reminder.attempts - 1,
                due_at=now,
                error=exc.reason[:500],
            )
            return "stopped"
        if exc.permanent:
            log.info(
                "SMS %s to %s failed for good: %s", reminder_id, mask_phone(prepared.to), exc.reason
            )
            _failed(session, reminder_id, now, exc.reason, exc.status)
            return "failed"
        attempts = session.scalar(select(Reminder.attempts).where(Reminder.id == reminder_id)) or 0
        if attempts < BRIEF_RETRIES and now < prepared.send_by:
            _record(session, reminder_id, now, status="queued", error=exc.reason[:500])
            retry = True
        else:
            _retry_later(session, reminder_id, now, attempts, prepared.send_by, exc.reason)
            retry = False
    if retry:
        raise TransientSendError(exc.reason)
    return "retry_later"


def tick(session: Session, now: dt.datetime, limit: int = 1000) -> list[int]:
    """One scheduling pass: expire, sweep, claim. Returns the ids to queue (after commit)."""
    expire(session, now)
    return sweep(session, now) + claim_due(session, now, limit)


def queue_all(ids: Sequence[int], enqueue: Callable[[int], object]) -> None:
    for reminder_id in ids:
        enqueue(reminder_id)


def outcomes(ids: Sequence[int]) -> dict[str, int]:
    """How the given reminders ended up: `sent: 3`, `skipped (opted_out): 1`..."""
    counts: dict[str, int] = {}
    with session_scope() as session:
        for start in range(0, len(ids), 500):
            rows = session.execute(
                select(Reminder.status, Reminder.skip_reason).where(
                    Reminder.id.in_(ids[start : start + 500])
                )
            )
            for status, reason in rows:
                key = f"{status} ({reason})" if reason else status
                counts[key] = counts.get(key, 0) + 1
    return counts


# --- delivery receipts ---------------------------------------------------------------------------

# How far along a receipt status is: a receipt only ever moves a message forward.
_RECEIPT_RANK = {
    "unknown": 0,
    "accepted": 1,
    "buffered": 1,
    "delivered": 2,
    "expired": 2,
    "failed": 2,
    "rejected": 2,
}
_RECEIPT_OPT_OUT = "9"  # err-code recorded as the recipient's opt-out (issue 4)


def _reminder_for(
    session: Session, message_id: str | None, client_ref: str | None
) -> Reminder | None:
    if client_ref and client_ref.startswith("r") and client_ref[1:].isdigit():
        found = session.get(Reminder, int(client_ref[1:]))
        if found is not None:
            return found
    if message_id:
        return session.scalar(
            select(Reminder).where(Reminder.provider_message_id == message_id).limit(1)
        )
    return None


def apply_receipt(
    session: Session,
    *,
    message_id: str | None,
    client_ref: str | None,
    status: str,
    err_code: str | None,
    price: float | None,
    now: dt.datetime,
) -> str:
    """Records a delivery receipt and moves its message's delivery status forward (a repeat or
    an older status changes nothing). Returns what happened."""
    status = status.lower()
    reminder = _reminder_for(session, message_id, client_ref)
    session.add(
        DeliveryReceipt(
            provider_message_id=message_id,
            client_ref=client_ref,
            status=status[:16],
            err_code=err_code,
            price=price,
            received_at=now,
            reminder_id=reminder.id if reminder is not None else None,
        )
    )
    if reminder is None:
        return "unmatched"  # kept: applied when a send with this message id is recorded
    return _settle(session, reminder, status, err_code, price, message_id, now)


def _settle(
    session: Session,
    reminder: Reminder,
    status: str,
    err_code: str | None,
    price: float | None,
    message_id: str | None,
    now: dt.datetime,
) -> str:
    current = _RECEIPT_RANK.get(reminder.delivery_status or "", -1)
    rank = _RECEIPT_RANK.get(status, 0)
    if rank <= current and reminder.status != "unknown":
        return "unchanged"
    if rank > current:
        reminder.delivery_status = status
        reminder.delivery_error = err_code if err_code not in (None, "0") else None
        if status == "delivered":
            reminder.delivered_at = now
    if reminder.status == "unknown":
        # The send whose answer we lost did reach Vonage: settle it, never resend it.
        reminder.status = "failed" if status in ("failed", "rejected", "expired") else "sent"
        reminder.sent_at = reminder.sent_at or now
        reminder.provider_message_id = reminder.provider_message_id or message_id
    if reminder.price is None and price is not None:
        reminder.price = price
    if err_code == _RECEIPT_OPT_OUT:
        clinic = session.get(Clinic, reminder.clinic_id)
        assert clinic is not None
        sender = sender_of(clinic)
        if not opted_out(session, reminder.phone_e164, sender):
            session.add(OptOut(phone_e164=reminder.phone_e164, sender=sender, source="receipt"))
    return "applied"


def apply_waiting_receipts(
    session: Session, reminder_id: int, message_ids: Sequence[str], now: dt.datetime
) -> None:
    """Receipts that arrived (by message id alone) before the send was recorded."""
    if not message_ids:
        return
    waiting = list(
        session.scalars(
            select(DeliveryReceipt)
            .where(
                DeliveryReceipt.provider_message_id.in_(message_ids),
                DeliveryReceipt.reminder_id.is_(None),
            )
            .order_by(DeliveryReceipt.id)
        )
    )
    if not waiting:
        return
    reminder = session.get(Reminder, reminder_id)
    assert reminder is not None
    for receipt in waiting:
        receipt.reminder_id = reminder_id
        _settle(
            session,
            reminder,
            receipt.status,
            receipt.err_code,
            receipt.price,
            receipt.provider_message_id,
            now,
        )
