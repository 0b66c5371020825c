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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Table, bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from reminders import events, schedule, texts
from reminders.config import Settings
from reminders.db import session_scope
from reminders.models import (
    ANSWER_KINDS,
    WENT_OUT,
    Appointment,
    AppSetting,
    Clinic,
    DeliveryReceipt,
    OptOut,
    Patient,
    Reminder,
    Template,
)
from reminders.sms import MIN_TTL_MS, OutcomeUnknown, Provider, Sent, SmsError, mask_phone

log = logging.getLogger(__name__)

BRIEF_RETRIES = 3  # transient errors retried within seconds by dramatiq; later ones via the row
UNKNOWN_GRACE = dt.timedelta(minutes=15)  # wait this long for a receipt before resending
CLAIM_STALE = dt.timedelta(minutes=10)  # queued this long: the broker lost it, queue it again
SENDING_STALE = dt.timedelta(minutes=2)  # sending this long: the worker died mid-send
STOP_PAUSE = dt.timedelta(minutes=5)  # after credentials/credit errors, try again this late
DEFAULT_SENDER = "Reminders"
#: Less time than this before the deadline: too late to send (Vonage refuses a shorter ttl).
MIN_TTL = dt.timedelta(milliseconds=MIN_TTL_MS)
#: The error of a send whose outcome stayed unknown, with no receipt, until its deadline.
NO_RECEIPT = "outcome unknown: no delivery receipt before the deadline"
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
    """Marks the rows `query` picks `queued`, no more than its LIMIT (the daily cap rests on it).

    On PostgreSQL the pick is a MATERIALIZED CTE, run exactly once: as `id IN (SELECT ... LIMIT n
    FOR UPDATE SKIP LOCKED)` the planner may put the subquery inside a nested loop and run it
    again for each row, each run skipping the rows the earlier runs locked, so taking more.
    """
    picked: Any = query.scalar_subquery()
    if session.get_bind().dialect.name == "postgresql":
        cte = query.with_for_update(skip_locked=True, of=Reminder).cte("picked")
        picked = select(cte.prefix_with("MATERIALIZED").c.id)
    statement = (
        update(Reminder)
        .where(Reminder.id.in_(picked))
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
    # Only the capped clinics with something due: for each capped clinic, the first due
    # reminder in the order of the small index of planned rows (ORDER BY due_at LIMIT 1), so
    # an idle tick is an empty index range per capped clinic, whatever the table size. (A
    # DISTINCT over the due rows cost 5-9 ms idle at 1M appointments: PostgreSQL, which cannot
    # know that past rows are no longer planned, expected 200,000 due rows and started
    # parallel workers to find none.)
    first_due = (
        select(Reminder.id)
        .where(
            Reminder.clinic_id == Clinic.id,
            Reminder.status == "planned",
            Reminder.due_at <= now,
            Reminder.kind.not_in(ANSWER_KINDS),
        )
        .order_by(Reminder.due_at)
        .limit(1)
        .scalar_subquery()
    )
    capped = session.scalars(
        select(Clinic).where(
            Clinic.daily_cap.is_not(None), Clinic.paused.is_(False), first_due.is_not(None)
        )
    ).all()
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
    # An unknown outcome with no receipt by its deadline will not be resent: it ends `failed`
    # (a receipt arriving later still settles it as sent).
    given_up = session.execute(
        update(Reminder)
        .where(
            Reminder.status == "unknown",
            Reminder.delivery_status.is_(None),
            Reminder.send_by <= now,
        )
        .values(status="failed", error=NO_RECEIPT)
        .returning(Reminder.id)
        .execution_options(synchronize_session=False)
    )
    for (reminder_id,) in given_up:
        _failed_event(session, reminder_id, now, NO_RECEIPT, None)
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


# --- sending a batch (the worker) ----------------------------------------------------------------

#: Ids per queued message: one message, one claim, a few statements for up to this many SMS.
SEND_BATCH = 25
_table = cast(Table, Reminder.__table__)


def batch_size(settings: Settings) -> int:
    """Ids per message: fewer when the send rate is low, so that a batch never waits long."""
    return max(1, min(SEND_BATCH, int(settings.send_rate)))


@dataclass(frozen=True)
class Prepared:
    reminder_id: int
    to: str
    sender: str
    text: str
    send_by: dt.datetime


@dataclass(frozen=True, slots=True)
class Due:
    """A claimed reminder with what its re-check and rendering read of its appointment and
    patient: plain values from one join (building ORM objects for them cost more than all the
    rest of the batch's database work). The appointment's and patient's fields are None for an
    answer sent without an appointment."""

    id: int
    kind: str
    rule: str
    phone_e164: str
    due_at: dt.datetime
    send_by: dt.datetime
    clinic_id: int
    appointment_id: int | None
    appointment_starts_at: dt.datetime | None
    status: str | None
    confirmation: str | None
    starts_at: dt.datetime | None
    link_token: str | None
    practitioner: str | None
    location: str | None
    patient_phone: str | None
    sms_capable: bool | None
    language: str | None

    @property
    def target_phone(self) -> str:
        """Where it goes: the patient's number as of now for reminders, the asker's for answers."""
        if self.appointment_id is not None and self.kind not in ANSWER_KINDS:
            return self.patient_phone or self.phone_e164
        return self.phone_e164


_appointments = cast(Table, Appointment.__table__)
_patients = cast(Table, Patient.__table__)
#: The claimed rows, in the order of Due's fields.
_DUE = (
    select(
        *(
            _table.c[name]
            for name in (
                "id",
                "kind",
                "rule",
                "phone_e164",
                "due_at",
                "send_by",
                "clinic_id",
                "appointment_id",
                "appointment_starts_at",
            )
        ),
        *(
            _appointments.c[name]
            for name in (
                "status",
                "confirmation",
                "starts_at",
                "link_token",
                "practitioner",
                "location",
            )
        ),
        _patients.c.phone_e164.label("patient_phone"),
        _patients.c.sms_capable,
        _patients.c.language,
    )
    .select_from(
        _table.outerjoin(_appointments, _appointments.c.id == _table.c.appointment_id).outerjoin(
            _patients, _patients.c.id == _appointments.c.patient_id
        )
    )
    .where(_table.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(_table.c.id)
)


@dataclass
class _Loaded:
    """What one batch needs to re-check and render its reminders, read in a few queries."""

    reminders: list[tuple[Due, Clinic]]
    templates: dict[tuple[int, str, str], str]
    opted_out: set[tuple[str, str]]
    # (appointment id, start) -> due times of the sends still due, in flight or gone out
    pending_due: dict[tuple[int | None, dt.datetime | None], list[dt.datetime]]
    stopped: bool


def sender_of(clinic: Clinic) -> str:
    return clinic.sender or DEFAULT_SENDER


def opted_out(session: Session, phone: str, sender: str) -> bool:
    found = session.scalar(
        select(OptOut.id).where(OptOut.phone_e164 == phone, OptOut.sender == sender).limit(1)
    )
    return found is not None


def load_due(session: Session, ids: Sequence[int]) -> list[Due]:
    """The reminders `ids` with their appointment and patient, by id."""
    rows: Iterable[tuple[Any, ...]] = session.execute(_DUE, {"ids": list(ids)})
    return [Due(*row) for row in rows]


def _load(session: Session, ids: list[int], now: dt.datetime) -> _Loaded:
    due = load_due(session, ids)
    clinics = {
        c.id: c
        for c in session.scalars(select(Clinic).where(Clinic.id.in_({d.clinic_id for d in due})))
    }
    reminders = [(d, clinics[d.clinic_id]) for d in due]
    templates = {
        (clinic_id, kind, language): source
        for clinic_id, kind, language, source in session.execute(
            select(Template.clinic_id, Template.kind, Template.language, Template.source).where(
                Template.clinic_id.in_(clinics)
            )
        )
    }
    opted = {
        (phone, sender)
        for phone, sender in session.execute(
            select(OptOut.phone_e164, OptOut.sender).where(
                OptOut.phone_e164.in_({d.target_phone for d in due})
            )
        )
    }
    appointment_ids = {d.appointment_id for d in due if d.kind not in ANSWER_KINDS}
    pending: dict[tuple[int | None, dt.datetime | None], list[dt.datetime]] = {}
    if appointment_ids:
        siblings = session.execute(
            select(Reminder.appointment_id, Reminder.appointment_starts_at, Reminder.due_at).where(
                Reminder.appointment_id.in_(appointment_ids),
                Reminder.due_at <= now,
                # due or on its way: a worker thread on another batch may be ahead of us
                Reminder.status.in_(("planned", "queued", *WENT_OUT)),
            )
        )
        for appointment_id, starts_at, due_at in siblings:
            pending.setdefault((appointment_id, starts_at), []).append(due_at)
    return _Loaded(reminders, templates, opted, pending, sending_stopped(session, now) is not None)


def _skip_reason(loaded: _Loaded, due: Due, clinic: Clinic, now: dt.datetime) -> str | None:
    """Why this reminder must not go out now, re-checked at send time (DESIGN rule 3)."""
    sender = sender_of(clinic)
    if due.kind in ANSWER_KINDS:
        # The patient wrote to us: answer at any hour, but not late, and not after a STOP
        # (the opt-out confirmation itself excepted).
        if due.send_by - now < MIN_TTL:
            return "deadline"
        if due.kind != "opted_out" and (due.phone_e164, sender) in loaded.opted_out:
            return "opted_out"
        return None
    assert due.appointment_id is not None
    if due.status != "booked" or due.confirmation == "cancelled_by_patient":
        return "cancelled"
    if due.appointment_starts_at != due.starts_at:
        return "moved"
    if due.rule.endswith(":unconfirmed") and due.confirmation != "unconfirmed":
        return "confirmed"
    if not due.sms_capable or due.patient_phone is None:
        return "not_sms_capable"
    if due.send_by - now < MIN_TTL:
        return "deadline"
    # A later send for the same booking is due too (we were down, or paused): only the latest
    # goes, never a burst.
    others = loaded.pending_due.get((due.appointment_id, due.appointment_starts_at), [])
    if any(other > due.due_at for other in others):
        return "superseded"
    if (due.patient_phone, sender) in loaded.opted_out:
        return "opted_out"
    return None


def _check(loaded: _Loaded, due: Due, clinic: Clinic, now: dt.datetime) -> str | dt.datetime | None:
    """None to send now; a reason to skip; or the time to wait for (quiet hours)."""
    reason = _skip_reason(loaded, due, clinic, now)
    if reason is not None or due.kind in ANSWER_KINDS:
        return reason
    timing = schedule.clinic_timing(clinic)
    if schedule.in_quiet_hours(now, timing.zone, timing.quiet):
        later = schedule.quiet_end_after(now, timing.zone, timing.quiet)
        return "quiet_hours" if later > due.send_by else later
    return None


def _language(due: Due, clinic: Clinic) -> str:
    return due.language if due.language is not None else clinic.language


def render(
    session: Session,
    due: Due,
    clinic: Clinic,
    settings: Settings,
    now: dt.datetime,
    source: str | None,
) -> str:
    """The SMS text: the clinic's own template `source` for this kind and language, else the
    built-in one."""
    old_start = None
    if due.kind == "moved" and due.appointment_id is not None:
        old_start = session.scalar(
            select(Reminder.appointment_starts_at)
            .where(
                Reminder.appointment_id == due.appointment_id,
                Reminder.appointment_starts_at != due.starts_at,
                Reminder.status.in_(WENT_OUT),
            )
            .order_by(Reminder.id.desc())
            .limit(1)
        )
    token = due.link_token
    context = texts.MessageContext(
        clinic=clinic.name,
        timezone=clinic.timezone,
        language=_language(due, clinic),
        starts_at=due.starts_at or now,
        link=f"{settings.public_url}/c/{token}" if token else settings.public_url,
        two_way=sender_of(clinic).startswith("+"),
        practitioner=due.practitioner,
        location=due.location,
        old_starts_at=old_start,
        decision=due.rule.partition(":")[2] if due.kind == "ack" else None,
    )
    text: str = texts.render(due.kind, context, source)
    return text


def _template(loaded: _Loaded, due: Due, clinic: Clinic) -> str | None:
    if due.kind not in texts.TEMPLATE_KINDS:
        return None
    return loaded.templates.get((clinic.id, due.kind, _language(due, clinic)))


def _update_each(session: Session, rows: list[dict[str, Any]], **values: Any) -> None:
    """One executemany UPDATE of `sending` rows by id (`b_id` in each row); `values` are
    constants, SQL expressions, or `bindparam`s of the rows' other keys."""
    if not rows:
        return
    session.execute(
        update(_table)
        .where(_table.c.id == bindparam("b_id"), _table.c.status == "sending")
        .values(**values),
        rows,
    )


def prepare_batch(
    session: Session, ids: Sequence[int], now: dt.datetime, settings: Settings
) -> tuple[list[Prepared], dict[int, str]]:
    """Takes the still-`queued` reminders among `ids`, re-checks and renders them, and marks the
    ones to send `sending`. Returns them, and why each of the others does not go now."""
    taken = set(
        session.scalars(
            update(Reminder)
            .where(Reminder.id.in_(ids), Reminder.status == "queued")
            .values(status="sending", claimed_at=now)
            .returning(Reminder.id)
            .execution_options(synchronize_session=False)
        )
    )
    results = {i: "not_queued" for i in ids if i not in taken}  # someone else has it, or done
    if not taken:
        return [], results
    loaded = _load(session, sorted(taken), now)
    prepared: list[Prepared] = []
    skipped: list[dict[str, Any]] = []
    waiting: list[dict[str, Any]] = []
    marked: list[dict[str, Any]] = []
    for due, clinic in loaded.reminders:
        check = _check(loaded, due, clinic, now)
        if isinstance(check, str):
            skipped.append({"b_id": due.id, "b_reason": check})
            results[due.id] = check
            continue
        paused = clinic.paused and due.kind not in ANSWER_KINDS
        if paused or loaded.stopped or check is not None:
            # It waits (within its deadline): for the clinic, the provider, or the morning.
            waiting.append({"b_id": due.id, "b_due": check or due.due_at})
            results[due.id] = "quiet_hours" if check is not None else "waiting"
            continue
        text = render(session, due, clinic, settings, now, _template(loaded, due, clinic))
        segments = texts.count_segments(text)
        phone = due.target_phone
        marked.append(
            {
                "b_id": due.id,
                "b_text": text,
                "b_encoding": segments.encoding,
                "b_segments": segments.count,
                "b_phone": phone,
            }
        )
        prepared.append(Prepared(due.id, phone, sender_of(clinic), text, due.send_by))
    _update_each(session, skipped, status="skipped", skip_reason=bindparam("b_reason"))
    _update_each(session, waiting, status="planned", due_at=bindparam("b_due"))
    _update_each(
        session,
        marked,
        attempts=_table.c.attempts + 1,
        text=bindparam("b_text"),
        encoding=bindparam("b_encoding"),
        segments=bindparam("b_segments"),
        phone_e164=bindparam("b_phone"),
    )
    return prepared, results


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
    if _record(session, reminder_id, now, status="failed", error=error[:500]):
        _failed_event(session, reminder_id, now, error, status)


def _failed_event(
    session: Session, reminder_id: int, now: dt.datetime, error: str, status: str | None
) -> None:
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


def _put_back(reminder_ids: Sequence[int], clock: Clock, reason: str) -> None:
    """Sends that never left (all sending stopped): back to `planned`, due at once."""
    if not reminder_ids:
        return
    with session_scope() as session:
        session.execute(
            update(Reminder)
            .where(Reminder.id.in_(reminder_ids), Reminder.status == "sending")
            .values(status="planned", attempts=Reminder.attempts - 1, due_at=clock(), error=reason)
            .execution_options(synchronize_session=False)
        )


def _renew_claims(reminder_ids: Sequence[int], now: dt.datetime) -> set[int]:
    """Renews the claim on rows still `sending`; returns them (the others the sweep took)."""
    with session_scope() as session:
        return set(
            session.scalars(
                update(Reminder)
                .where(Reminder.id.in_(reminder_ids), Reminder.status == "sending")
                .values(claimed_at=now)
                .returning(Reminder.id)
                .execution_options(synchronize_session=False)
            )
        )


@dataclass
class _Accepted:
    reminder_id: int
    sent: Sent
    at: dt.datetime


def _record_sent(accepted: list[_Accepted], clock: Clock) -> None:
    """Records accepted sends in one statement, and applies receipts that came first."""
    if not accepted:
        return
    with session_scope() as session:
        _update_each(
            session,
            [
                {
                    "b_id": a.reminder_id,
                    "b_sent_at": a.at,
                    "b_message": a.sent.message_id,
                    "b_price": a.sent.price,
                }
                for a in accepted
            ],
            status="sent",
            sent_at=bindparam("b_sent_at"),
            provider_message_id=bindparam("b_message"),
            price=bindparam("b_price"),
            error=None,
        )
        apply_waiting_receipts(
            session, {a.reminder_id: a.sent.message_ids for a in accepted}, clock()
        )


def send_batch(
    reminder_ids: Sequence[int],
    clock: Clock,
    provider: Provider,
    settings: Settings,
    limiter: Limiter | None = None,
) -> dict[int, str]:
    """Sends the still-queued reminders among `reminder_ids` and records each outcome; returns
    what happened to each.

    Raises TransientSendError, once every other outcome is recorded, when some sends deserve a
    brief retry (those rows are back in `queued`: retrying the same message takes only them).
    """
    with session_scope() as session:
        prepared, results = prepare_batch(session, reminder_ids, clock(), settings)
    accepted: list[_Accepted] = []
    retry: list[int] = []
    claimed_at = clock()
    held = {p.reminder_id for p in prepared}
    try:
        for index, item in enumerate(prepared):
            if limiter is not None and not limiter.wait(item.send_by):
                with session_scope() as session:
                    _record(
                        session, item.reminder_id, clock(), status="skipped", skip_reason="deadline"
                    )
                results[item.reminder_id] = "deadline"
                continue
            # A slow batch (a low send rate, sends timing out): record what went and renew the
            # claim on the rest well before the sweep would take them for a dead worker's.
            if clock() - claimed_at > SENDING_STALE / 4:
                claimed_at = clock()
                _record_sent(accepted, clock)
                accepted.clear()
                held = _renew_claims([p.reminder_id for p in prepared[index:]], claimed_at)
            if item.reminder_id not in held:
                results[item.reminder_id] = "swept"  # the sweep has it: never sent from here
                continue
            outcome = _send(item, clock, provider, accepted)
            results[item.reminder_id] = outcome
            if outcome == "stopped":
                rest = [p.reminder_id for p in prepared[index + 1 :]]
                _put_back(rest, clock, "all sending stopped")
                results.update(dict.fromkeys(rest, "stopped"))
                break
            if outcome == "retry":
                retry.append(item.reminder_id)
    finally:
        _record_sent(accepted, clock)
    if retry:
        raise TransientSendError(f"brief retry for {len(retry)} SMS")
    return results


def _send(item: Prepared, clock: Clock, provider: Provider, accepted: list[_Accepted]) -> str:
    now = clock()
    try:
        sent = provider.send(
            to=item.to,
            sender=item.sender,
            text=item.text,
            client_ref=f"r{item.reminder_id}",
            ttl=item.send_by - now,
        )
    except OutcomeUnknown as exc:
        log.warning(
            "SMS %s to %s: outcome unknown (%s); waiting for a receipt",
            item.reminder_id,
            mask_phone(item.to),
            exc,
        )
        with session_scope() as session:
            _record(
                session,
                item.reminder_id,
                clock(),
                status="unknown",
                next_attempt_at=clock() + UNKNOWN_GRACE,
                error=str(exc)[:500],
            )
        return "unknown"
    except SmsError as exc:
        return _on_error(item.reminder_id, clock, exc, item)
    accepted.append(_Accepted(item.reminder_id, sent, clock()))
    return "sent"


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
    return send_batch([reminder_id], clock, provider, settings, limiter)[reminder_id]


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
            return "retry"
        _retry_later(session, reminder_id, now, attempts, prepared.send_by, exc.reason)
    return "retry_later"


def tick(session: Session, now: dt.datetime, limit: int = 1000) -> list[int]:
    """One scheduling pass: expire, sweep, claim. Returns the ids to queue (after commit)."""
    expire(session, now)
    return sweep(session, now) + claim_due(session, now, limit)


def queue_all(ids: Sequence[int], enqueue: Callable[[int], object]) -> None:
    for reminder_id in ids:
        enqueue(reminder_id)


def queue_batches(ids: Sequence[int], size: int, enqueue: Callable[[list[int]], object]) -> None:
    """Queues `ids` in messages of at most `size` ids each."""
    for start in range(0, len(ids), size):
        enqueue(list(ids[start : start + size]))


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
    # A receipt proves the send reached Vonage: it settles a send whose outcome we do not know
    # yet (its answer lost, its worker gone, or still being recorded), or gave up on.
    open_outcome = reminder.status in ("unknown", "sending") or (
        reminder.status == "failed" and reminder.error == NO_RECEIPT
    )
    if rank <= current and not open_outcome:
        return "unchanged"
    if rank > current:
        reminder.delivery_status = status
        reminder.delivery_error = err_code if err_code not in (None, "0") else None
        if status == "delivered":
            reminder.delivered_at = now
    if open_outcome:
        # The send did reach Vonage: settle it, never resend it.
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
    session: Session, message_ids: dict[int, Sequence[str]], now: dt.datetime
) -> None:
    """Receipts that arrived (by message id alone) before their sends were recorded; the sends
    are given as reminder id -> the message ids Vonage gave its parts."""
    owner = {m: reminder_id for reminder_id, ids in message_ids.items() for m in ids}
    if not owner:
        return
    waiting = list(
        session.scalars(
            select(DeliveryReceipt)
            .where(
                DeliveryReceipt.provider_message_id.in_(owner),
                DeliveryReceipt.reminder_id.is_(None),
            )
            .order_by(DeliveryReceipt.id)
        )
    )
    for receipt in waiting:
        assert receipt.provider_message_id is not None
        reminder = session.get(Reminder, owner[receipt.provider_message_id])
        assert reminder is not None
        receipt.reminder_id = reminder.id
        _settle(
            session,
            reminder,
            receipt.status,
            receipt.err_code,
            receipt.price,
            receipt.provider_message_id,
            now,
        )
