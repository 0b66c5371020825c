"""Patients' answers: one decision per appointment, opt-outs, and the SMS we send back.

Whichever way a decision comes (link, SMS, staff through the API), it is applied by a guarded
UPDATE, so concurrent answers serialise: the same decision again changes nothing, a confirmation
may still become a cancellation, and a patient's cancellation is final.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from typing import Any, Literal, cast

from sqlalchemy import (
    Connection,
    Row,
    Table,
    Update,
    bindparam,
    delete,
    exists,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql import Select
from sqlalchemy.sql.dml import ReturningInsert, ReturningUpdate

from reminders import events, grammar
from reminders.db import Base, UTCDateTime, session_scope
from reminders.models import Appointment, Clinic, InboundMessage, OptOut, Reminder
from reminders.sms import mask_phone

log = logging.getLogger(__name__)

Action = Literal["confirm", "cancel"]
Source = Literal["link", "sms", "staff"]
ANSWER_WINDOW = dt.timedelta(hours=6)  # an answer not sent by then is no longer worth sending


@dataclass(frozen=True)
class Decision:
    changed: bool
    confirmation: str  # the appointment's state after the attempt
    answer_id: int | None = None  # the acknowledgement SMS queued, if any


def decide(
    session: Session, appointment: Appointment, action: Action, source: Source, now: dt.datetime
) -> Decision:
    """Applies a patient's (or staff's) decision once; writes its event and queues one
    acknowledgement SMS (none for staff, who spoke to the patient)."""
    if action == "confirm":
        changed = _guarded(session, appointment, "confirmed", ("unconfirmed",), now)
    else:
        changed = _guarded(
            session, appointment, "cancelled_by_patient", ("unconfirmed", "confirmed"), now
        )
    if not changed:
        session.refresh(appointment)  # the state someone else decided
        return Decision(False, appointment.confirmation)
    data: dict[str, object] = {"source": source, "starts_at": appointment.starts_at.isoformat()}
    if action == "cancel":
        # Imported here: the intake (pydantic schemas, phone and language tables) stays out of
        # a worker's start.
        from reminders.planning import drop_pending

        drop_pending(session, appointment, "cancelled")
        data |= {
            "practitioner": appointment.practitioner,
            "location": appointment.location,
            "kind": appointment.kind,
            "duration_minutes": appointment.duration_minutes,
        }
    kind = "appointment.confirmed" if action == "confirm" else "appointment.cancelled"
    events.record_at_commit(
        session, appointment.clinic_id, kind, now, appointment=appointment.external_id, data=data
    )
    answer = None
    if source != "staff" and appointment.patient.phone_e164 is not None:
        state = "confirmed" if action == "confirm" else "cancelled"
        answer = queue_answer(
            session,
            appointment.clinic_id,
            appointment.patient.phone_e164,
            "ack",
            f"ack:{state}",
            now,
            appointment=appointment,
        )
    return Decision(True, appointment.confirmation, answer)


def _guarded(
    session: Session,
    appointment: Appointment,
    to: str,
    allowed: tuple[str, ...],
    now: dt.datetime,
) -> bool:
    """One UPDATE ... RETURNING: when it applies, the appointment object takes the values of
    the row it locked (a clinic push may have changed it since it was loaded)."""
    row = session.execute(
        _decision_update(to, allowed), {"appointment_id": appointment.id, "now": now}
    ).first()
    if row is None:
        return False
    for column, value in zip(inspect(Appointment).column_attrs, row, strict=True):
        set_committed_value(appointment, column.key, value)
    return True


# The statements of the busy paths are built once (building one costs more CPU than running it)
# and run as Core statements with their parameters.


@cache
def _decision_update(to: str, allowed: tuple[str, ...]) -> Update:
    table = _table(Appointment)
    # The clinic's next push must be read in full, not answered from its digest.
    values: dict[str, object] = {
        "confirmation": to,
        "decided_at": bindparam("now", type_=UTCDateTime()),
        "content_hash": None,
    }
    if to == "cancelled_by_patient":
        values["status"] = "cancelled"
    return (
        update(table)
        .where(
            table.c.id == bindparam("appointment_id"),
            table.c.confirmation.in_(allowed),
            table.c.status == "booked",
        )
        .values(values)
        .returning(*(column.columns[0] for column in inspect(Appointment).column_attrs))
    )


@cache
def _insert_once(dialect: str, model: type[Base], *unique: str) -> ReturningInsert[Any]:
    """INSERT ... ON CONFLICT (unique) DO NOTHING RETURNING id: the id, or nothing when a row
    with the same unique key exists (or is being inserted by a concurrent transaction)."""
    table = _table(model)
    insert = pg.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    return insert.on_conflict_do_nothing(index_elements=list(unique)).returning(table.c.id)


def _inserted_once(
    executor: Session | Connection,
    model: type[Base],
    unique: tuple[str, ...],
    values: Mapping[str, object],
) -> int | None:
    bind = executor.get_bind() if isinstance(executor, Session) else executor
    statement = _insert_once(bind.dialect.name, model, *unique)
    found: int | None = executor.scalar(statement, values)
    return found


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


_inbound = _table(InboundMessage)


def queue_answer(
    session: Session,
    clinic_id: int,
    phone: str,
    kind: str,
    rule: str,
    now: dt.datetime,
    *,
    appointment: Appointment | None = None,
) -> int | None:
    """An SMS answering the patient, created `queued` so the caller can send its id to the
    worker at once after commit (the sweep queues it again if that is lost). Returns its id, or
    None when the same answer for this booking exists already."""
    values = {
        "clinic_id": clinic_id,
        "appointment_id": appointment.id if appointment is not None else None,
        "phone_e164": phone,
        "kind": kind,
        "rule": rule,
        "appointment_starts_at": appointment.starts_at if appointment is not None else None,
        "due_at": now,
        "send_by": now + ANSWER_WINDOW,
        "status": "queued",
        "claimed_at": now,
        "attempts": 0,
    }
    # The unique (appointment, rule, start) makes a repeat insert nothing.
    return _inserted_once(
        session, Reminder, ("appointment_id", "rule", "appointment_starts_at"), values
    )


def opt_out(session: Session, phone: str, sender: str, source: str, now: dt.datetime) -> bool:
    """Records that `phone` wants nothing more from `sender`; False if it already had."""
    values = {"phone_e164": phone, "sender": sender, "source": source}
    return _inserted_once(session, OptOut, ("phone_e164", "sender"), values) is not None


def opt_in(session: Session, phone: str, sender: str) -> bool:
    """Lifts an opt-out; False if there was none."""
    result = session.execute(
        delete(OptOut).where(OptOut.phone_e164 == phone, OptOut.sender == sender)
    )
    return bool(getattr(result, "rowcount", 0))


_CLINICS_SENDING_FROM = (
    select(Clinic).where(Clinic.sender == bindparam("sender")).order_by(Clinic.id)
)


def clinics_sending_from(session: Session, sender: str) -> list[Clinic]:
    return list(session.scalars(_CLINICS_SENDING_FROM, {"sender": sender}))


# --- inbound SMS -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Inbound:
    """One inbound SMS (or part of one) as the webhook parsed it."""

    message_id: str
    msisdn: str  # E.164 with '+'
    to: str  # E.164 with '+'
    text: str
    received_at: dt.datetime
    concat_ref: str | None = None
    concat_total: int | None = None
    concat_part: int | None = None


@dataclass(frozen=True)
class Handled:
    result: str  # what happened, for the log and the inbound row
    answers: list[int]  # answer SMS queued, to send after commit
    clinic_id: int | None = None  # the clinic the reply was for, if any
    appointment_id: int | None = None  # the appointment it applied to, if any


MAX_TEXT = 1600  # what we keep of a reply; longer texts are someone writing a letter
APPLY_BATCH = 50  # stored replies applied per transaction
GATHER = 0.1  # seconds to let replies gather into a batch (see `drain`)
# A reply stored this long and still not applied: its queue message was lost (the sweep's cue).
PENDING_STALE = dt.timedelta(seconds=30)


def store(connection: Connection, message: Inbound) -> int | None:
    """Stores an inbound SMS once per provider message id, to be applied by a worker; returns
    its row id, or None when that id was stored already (a retry, even a concurrent one).
    One statement: on an `autocommit` connection it commits alone."""
    return _inserted_once(
        connection,
        InboundMessage,
        ("provider_message_id",),
        {
            "provider_message_id": message.message_id,
            "msisdn": message.msisdn,
            "to_number": message.to,
            "text": message.text[:MAX_TEXT],
            "concat_ref": message.concat_ref,
            "concat_total": message.concat_total,
            "concat_part": message.concat_part,
            "received_at": message.received_at,
        },
    )


def _claimed_columns() -> tuple[Any, ...]:
    table = _inbound
    return (
        table.c.id,
        table.c.msisdn,
        table.c.to_number,
        table.c.text,
        table.c.concat_ref,
        table.c.concat_total,
        table.c.concat_part,
        table.c.received_at,
    )


# PostgreSQL takes waiting replies in two steps. (1) The ids and numbers of the oldest waiting
# replies, in order, through the partial index of waiting rows: the first row of each number in
# that prefix is its oldest waiting reply (an earlier one would be in the prefix too), picked
# in Python. (2) Those rows, locked FOR UPDATE SKIP LOCKED: a row another worker is applying
# (uncommitted, so still waiting here) is skipped, and the later replies of its number wait,
# as it was their number's oldest. One statement (`NOT EXISTS` an earlier waiting reply of
# the number) was planned from statistics that say few replies wait, which is what they say
# between bursts: with thousands waiting, a nested loop over all pairs, 0.6 s per batch.
_PREFIX_PER_BATCH = 20  # prefix rows read per reply wanted: a number rarely sends 20 at once
_WAITING_PREFIX = (
    select(_inbound.c.id, _inbound.c.msisdn)
    .where(_inbound.c.result.is_(None))
    .order_by(_inbound.c.id)
    .limit(bindparam("scan"))
)
_LOCK_PICKED = (
    select(*_claimed_columns())
    .where(
        _inbound.c.id.in_(bindparam("ids", expanding=True)),
        _inbound.c.result.is_(None),
    )
    .with_for_update(skip_locked=True, of=_inbound)
)


def _oldest_of_each_number(prefix: Iterable[Any], limit: int) -> list[int]:
    seen: set[str] = set()
    picked: list[int] = []
    for row in prefix:  # (id, msisdn) rows, oldest first
        if row.msisdn not in seen:
            seen.add(row.msisdn)
            picked.append(row.id)
            if len(picked) == limit:
                break
    return picked


@cache
def _sqlite_claim() -> ReturningUpdate[Any]:
    """SQLite, which has no row locks: one UPDATE of the oldest waiting reply of each number,
    whose write lock on the database holds for the whole applying transaction."""
    table = _inbound
    earlier = table.alias("earlier")
    oldest = (
        select(table.c.id)
        .where(
            table.c.result.is_(None),
            ~exists().where(
                earlier.c.result.is_(None),
                earlier.c.msisdn == table.c.msisdn,
                earlier.c.id < table.c.id,
            ),
        )
        .order_by(table.c.id)
        .limit(bindparam("limit"))
        .correlate(None)
        .scalar_subquery()
    )
    return (
        update(table)
        .where(table.c.id.in_(oldest), table.c.result.is_(None))
        .values(applied_at=bindparam("now", type_=UTCDateTime()))
        .returning(*_claimed_columns())
    )


_SETTLE = update(_inbound).where(_inbound.c.id == bindparam("row_id"))


@dataclass(frozen=True)
class Applied:
    rows: int  # stored replies taken in this transaction
    answers: list[int]  # answer SMS queued, to send after commit


def _claim(session: Session, now: dt.datetime, limit: int) -> list[Row[Any]]:
    """Takes the oldest stored replies not yet applied, at most one per number: the oldest
    of each number, so a number's replies apply one at a time in the order they came (a later
    one waits while an earlier one is being applied elsewhere, uncommitted, as that one still
    counts as waiting)."""
    claimed: Iterable[Row[Any]] = []
    if session.get_bind().dialect.name == "postgresql":
        prefix = session.execute(_WAITING_PREFIX, {"scan": limit * _PREFIX_PER_BATCH})
        picked = _oldest_of_each_number(prefix, limit)
        if picked:
            claimed = session.execute(_LOCK_PICKED, {"ids": picked})
    else:
        claimed = session.execute(_sqlite_claim(), {"limit": limit, "now": now})
    return sorted(claimed, key=lambda row: int(row.id))


def _apply_claimed(session: Session, rows: list[Row[Any]], now: dt.datetime) -> list[int]:
    """Each reply is applied at the time it was received: its decision, events and answers
    are those of that moment (a cancellation sent before the appointment started counts)."""
    answers: list[int] = []
    settled: list[dict[str, object]] = []
    reminded = latest_reminded(session, ((row.msisdn, row.to_number) for row in rows))
    for row in rows:
        text = _assembled(session, row, now)
        if text is None:  # a part: its row waits (no applied_at) for the rest of the message
            settled.append(_settled(row.id, "part", None))
            continue
        found = reminded.get((row.msisdn, row.to_number))
        handled = apply_reply(session, row.msisdn, row.to_number, text, row.received_at, found)
        answers += handled.answers
        settled.append(_settled(row.id, handled.result, now, handled))
        log.info("SMS from %s: %s", mask_phone(row.msisdn), handled.result)
    session.execute(_SETTLE, settled)
    return answers


def _settled(
    row_id: int, result: str, applied_at: dt.datetime | None, handled: Handled | None = None
) -> dict[str, object]:
    return {
        "row_id": row_id,
        "result": result,
        "applied_at": applied_at,
        "clinic_id": handled.clinic_id if handled is not None else None,
        "appointment_id": handled.appointment_id if handled is not None else None,
    }


class _Applier:
    """At most one thread of a process applies stored replies at a time. A queue message that
    comes meanwhile only marks that it came (no query): the applying thread looks once more
    before it stops, and that look finds the message's reply, stored before it was queued."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = False
        self._called = False

    def enter(self) -> bool:
        """True: this thread applies; False: another one does, and will look once more."""
        with self._lock:
            if self._running:
                self._called = True
                return False
            self._running, self._called = True, False
            return True

    def forget_calls(self) -> None:
        """Before a look: the replies of the messages so far are committed, so it sees them."""
        with self._lock:
            self._called = False

    def leave(self, unless_called: bool = False) -> bool:
        """Stops applying (True), or, with `unless_called`, not if a message came since the
        last look began (False: look again)."""
        with self._lock:
            if unless_called and self._called:
                self._called = False
                return False
            self._running = False
            return True


_APPLIER = _Applier()


def apply_waiting(
    clock: Callable[[], dt.datetime],
    answered: Callable[[list[int]], None],
    seconds: float = 60.0,
) -> bool:
    """What a queue message asks: apply the stored replies (`drain`), unless another thread of
    this process is applying them already. False when the caller must queue one more message
    (`seconds` passed and some may still wait)."""
    if not _APPLIER.enter():
        return True
    try:
        drained = drain(clock, answered, seconds, _APPLIER)
    except BaseException:
        _APPLIER.leave()
        raise
    if not drained:
        _APPLIER.leave()
    return drained


def drain(
    clock: Callable[[], dt.datetime],
    answered: Callable[[list[int]], None],
    seconds: float = 60.0,
    applier: _Applier | None = None,
) -> bool:
    """Applies stored replies batch after batch, one transaction each, passing each batch's
    answers to `answered` once committed, until a look finds none (True; with `applier`, also
    none announced since, and it is left) or `seconds` have passed (False).

    After a batch smaller than APPLY_BATCH it waits GATHER seconds, so that under a steady
    flow the next replies come together into one batch (a batch costs a few statements more
    than its replies; its answers go in one `send_reminders` message). A batch that raises is
    taken again one reply at a time, and a reply that raises alone is recorded as `error`
    (logged), so that one reply that cannot be applied never holds up its number's later ones."""
    deadline = time.monotonic() + seconds
    alone = 0  # replies still to take one at a time after a batch raised
    while time.monotonic() < deadline:
        if applier is not None:
            applier.forget_calls()
        try:
            applied = _apply_batch(clock, 1 if alone else APPLY_BATCH)
        except Exception:
            if alone:
                raise  # even one reply at a time fails (the database?): dramatiq retries
            log.warning("a batch of replies failed; applying them one at a time", exc_info=True)
            alone = APPLY_BATCH
            continue
        if applied is None:
            if applier is None or applier.leave(unless_called=True):
                return True
            continue
        alone = max(0, alone - applied.rows)
        answered(applied.answers)
        if applied.rows < APPLY_BATCH and not alone:
            time.sleep(GATHER)  # letting the next replies gather into one batch
    return False


def _apply_batch(clock: Callable[[], dt.datetime], limit: int) -> Applied | None:
    """One transaction: claims up to `limit` stored replies (`_claim`), applies them and records
    each one's result on its row; None when none was waiting. A single reply that raises is
    given up (`error`)."""
    taken: list[int] = []
    try:
        with session_scope() as session:
            now = clock()
            rows = _claim(session, now, limit)
            taken = [row.id for row in rows]
            if not rows:
                return None
            answers = _apply_claimed(session, rows, now)
    except Exception:
        if len(taken) != 1:
            raise
        _give_up(taken[0], clock())
        return Applied(1, [])
    return Applied(len(taken), answers)


_GIVE_UP = (
    update(_inbound)
    .where(
        _inbound.c.id == bindparam("row_id"),
        _inbound.c.result.is_(None),
    )
    .values(result="error", applied_at=bindparam("now", type_=UTCDateTime()))
)


def _give_up(row_id: int, now: dt.datetime) -> None:
    log.exception("inbound SMS %d could not be applied; recorded as `error`", row_id)
    with session_scope() as session:
        session.execute(_GIVE_UP, {"row_id": row_id, "now": now})


def stale(session: Session, now: dt.datetime) -> int:
    """How many stored replies still wait to be applied `PENDING_STALE` after they came (their
    queue message was lost, or no worker runs): the scheduler's sweep queues them again."""
    table = _inbound
    found = session.scalar(
        select(func.count())
        .select_from(table)
        .where(table.c.result.is_(None), table.c.received_at < now - PENDING_STALE)
    )
    return int(found or 0)


_USED_PARTS = update(_inbound).where(_inbound.c.id.in_(bindparam("ids", expanding=True)))


def _assembled(session: Session, row: Row[Any], now: dt.datetime) -> str | None:
    """The whole text once every part is here (None while some are missing). Parts wait as
    `part` rows without `applied_at`; the one that completes the message carries its result,
    and the others are then marked applied, so a reused `concat-ref` starts afresh."""
    total = row.concat_total
    if not row.concat_ref or not total or total <= 1:
        return str(row.text)
    waiting = list(
        session.execute(
            select(InboundMessage.id, InboundMessage.concat_part, InboundMessage.text)
            .where(
                InboundMessage.msisdn == row.msisdn,
                InboundMessage.concat_ref == row.concat_ref,
                InboundMessage.concat_total == total,
                InboundMessage.result == "part",
                InboundMessage.applied_at.is_(None),
            )
            .order_by(InboundMessage.id)
        )
    )
    parts = {part.concat_part: part.text for part in waiting} | {row.concat_part: row.text}
    if set(parts) != set(range(1, total + 1)):
        return None
    session.execute(_USED_PARTS, {"ids": [part.id for part in waiting], "applied_at": now})
    return "".join(parts[number] for number in range(1, total + 1))[:MAX_TEXT]


Reminded = tuple[Appointment, Clinic]


def _latest_reminded() -> Select[Any]:
    """Per (number, receiving number), the appointment of the latest reminder sent to that
    number by one of the clinics sending from the receiving number, with its clinic: for every
    reply of a batch in one query, along ix_reminders_phone_sent."""
    ranked = (
        select(
            Reminder.appointment_id,
            Reminder.clinic_id,
            Reminder.phone_e164,
            Clinic.sender,
            func.row_number()
            .over(
                partition_by=(Reminder.phone_e164, Clinic.sender),
                order_by=(Reminder.sent_at.desc().nulls_last(), Reminder.id.desc()),
            )
            .label("rank"),
        )
        .join(Clinic, Clinic.id == Reminder.clinic_id)
        .where(
            Reminder.phone_e164.in_(bindparam("phones", expanding=True)),
            Clinic.sender.in_(bindparam("senders", expanding=True)),
            Reminder.kind.in_(("reminder", "late", "moved")),
            Reminder.status.in_(("sent", "sending", "unknown")),
        )
        .subquery()
    )
    return (
        select(Appointment, Clinic, ranked.c.phone_e164, ranked.c.sender)
        .join(ranked, ranked.c.appointment_id == Appointment.id)
        .join(Clinic, Clinic.id == ranked.c.clinic_id)
        .where(ranked.c.rank == 1)
    )


_LATEST_REMINDED = _latest_reminded()


def latest_reminded(
    session: Session, pairs: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], Reminded]:
    """For each (phone, sender) that has one, the appointment of the latest reminder sent to
    `phone` by one of the clinics sending from `sender`, with its clinic."""
    wanted = set(pairs)
    if not wanted:
        return {}
    values = {"phones": sorted({p for p, _ in wanted}), "senders": sorted({s for _, s in wanted})}
    found = session.execute(_LATEST_REMINDED, values)
    return {(phone, sender): (a, c) for a, c, phone, sender in found if (phone, sender) in wanted}


def apply_reply(
    session: Session, phone: str, to: str, text: str, now: dt.datetime, found: Reminded | None
) -> Handled:
    """What a patient's reply means, applied (DESIGN rule 9: carrier words only opt out/in);
    `found`: its number's latest reminded appointment (`latest_reminded`), if any."""
    clinics: list[Clinic] | None = None  # every clinic sending from `to`, read when needed
    if found is not None:
        appointment, clinic = found
    else:
        clinics = clinics_sending_from(session, to)
        if not clinics:
            return Handled("unknown_number", [])
        appointment, clinic = None, clinics[0]
    handled = _apply(session, phone, to, text, now, clinics, clinic, appointment)
    return replace(
        handled,
        clinic_id=clinic.id,
        appointment_id=appointment.id if appointment is not None else None,
    )


def _apply(
    session: Session,
    phone: str,
    to: str,
    text: str,
    now: dt.datetime,
    clinics: list[Clinic] | None,
    clinic: Clinic,
    appointment: Appointment | None,
) -> Handled:
    intent = grammar.parse(text)
    if intent is grammar.Intent.OPT_OUT:
        every = clinics if clinics is not None else clinics_sending_from(session, to)
        return _opt_out(session, phone, to, every, clinic, appointment, now)
    if intent is grammar.Intent.OPT_IN or (
        intent is grammar.Intent.YES and _opted_out(session, phone, to)
    ):
        every = clinics if clinics is not None else clinics_sending_from(session, to)
        return _opt_in(session, phone, to, every, clinic, appointment, now)
    decisive = (grammar.Intent.CONFIRM, grammar.Intent.CANCEL, grammar.Intent.YES)
    if intent in decisive and appointment is not None and appointment.starts_at > now:
        action: Action = "cancel" if intent is grammar.Intent.CANCEL else "confirm"
        decision = decide(session, appointment, action, "sms", now)
        answers = [decision.answer_id] if decision.answer_id is not None else []
        return Handled(f"{action}:{'applied' if decision.changed else 'unchanged'}", answers)
    return _needs_attention(session, phone, text, clinic, appointment, now)


def _opted_out(session: Session, phone: str, sender: str) -> bool:
    found = session.scalar(
        select(OptOut.id).where(OptOut.phone_e164 == phone, OptOut.sender == sender)
    )
    return found is not None


def _opt_out(
    session: Session,
    phone: str,
    to: str,
    clinics: list[Clinic],
    clinic: Clinic,
    appointment: Appointment | None,
    now: dt.datetime,
) -> Handled:
    if not opt_out(session, phone, to, "sms", now):
        return Handled("opt_out:unchanged", [])
    for each in clinics:
        events.record_at_commit(
            session,
            each.id,
            "patient.opted_out",
            now,
            appointment=appointment.external_id
            if appointment is not None and appointment.clinic_id == each.id
            else None,
            data={"phone": phone, "sender": to},
        )
    return _answered(session, clinic, phone, "opted_out", now, appointment, "opt_out:applied")


def _opt_in(
    session: Session,
    phone: str,
    to: str,
    clinics: list[Clinic],
    clinic: Clinic,
    appointment: Appointment | None,
    now: dt.datetime,
) -> Handled:
    if not opt_in(session, phone, to):
        return Handled("opt_in:unchanged", [])
    for each in clinics:
        events.record_at_commit(
            session, each.id, "patient.opted_in", now, data={"phone": phone, "sender": to}
        )
    return _answered(session, clinic, phone, "opted_in", now, appointment, "opt_in:applied")


def _needs_attention(
    session: Session,
    phone: str,
    text: str,
    clinic: Clinic,
    appointment: Appointment | None,
    now: dt.datetime,
) -> Handled:
    events.record_at_commit(
        session,
        clinic.id,
        "reply.needs_attention",
        now,
        appointment=appointment.external_id if appointment is not None else None,
        data={"text": text[:MAX_TEXT], "phone": phone},
    )
    # At most one "we will get back to you" a day per number.
    recent = session.scalar(
        select(Reminder.id)
        .where(
            Reminder.phone_e164 == phone,
            Reminder.clinic_id == clinic.id,
            Reminder.kind == "unclear",
            Reminder.due_at >= now - dt.timedelta(days=1),
        )
        .limit(1)
    )
    if recent is not None:
        return Handled("needs_attention", [])
    return _answered(session, clinic, phone, "unclear", now, appointment, "needs_attention")


def _answered(
    session: Session,
    clinic: Clinic,
    phone: str,
    kind: str,
    now: dt.datetime,
    appointment: Appointment | None,
    result: str,
) -> Handled:
    """Queues one answer SMS of `kind` and says what happened."""
    answer = queue_answer(
        session, clinic.id, phone, kind, f"{kind}:{now.isoformat()}", now, appointment=appointment
    )
    return Handled(result, [answer] if answer is not None else [])
