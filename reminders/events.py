"""The clinic event feed: what the clinic system must learn, with ids that never skip.

PostgreSQL hands out sequence values before commit, so two transactions can commit ids out of
order and a poller reading `after=102` could miss 101. Event writes are serialised per clinic
with a transaction-scoped advisory lock, so ids of one clinic commit in order (DESIGN rule 12).

`record` takes the lock at once and holds it until the transaction ends. Busy paths (patients'
replies, links) use `record_at_commit` instead: the event is kept on the session and written
just before COMMIT, in one INSERT for all of them, after the lock; so the lock is held only for
that INSERT and the COMMIT, not for the rest of the request. The ids still come from the
sequence under the lock, in commit order. A lock-free feed (e.g. a cursor over transaction ids)
was not chosen: a sequence value and a commit can only be ordered by serialising them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Insert, Table, bindparam, func, insert, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, aliased

from reminders.db import session_scope
from reminders.models import Clinic, Event
from reminders.security import sign

log = logging.getLogger(__name__)

EVENT_TYPES = (
    "appointment.confirmed",
    "appointment.cancelled",
    "patient.opted_out",
    "patient.opted_in",
    "reply.needs_attention",
    "message.failed",
    "report.weekly",
)
_LOCK_NAMESPACE = 0x52454D  # "REM": keeps our advisory locks apart from anyone else's


def record(
    session: Session,
    clinic_id: int,
    type_: str,
    now: dt.datetime,
    *,
    appointment: str | None = None,
    data: dict[str, Any] | None = None,
) -> Event:
    """Appends an event in the caller's transaction (and its webhook delivery, if any)."""
    row = _row(session, clinic_id, type_, now, appointment, data)
    _lock(session, [clinic_id])
    event = Event(**row)
    session.add(event)
    session.flush()
    return event


def _row(
    session: Session,
    clinic_id: int,
    type_: str,
    now: dt.datetime,
    appointment: str | None,
    data: dict[str, Any] | None,
) -> dict[str, Any]:
    """An event's columns, its webhook delivery pending when the clinic has a webhook."""
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    clinic = session.get(Clinic, clinic_id)  # usually loaded already: no query
    has_webhook = clinic is not None and bool(clinic.webhook_url)
    return {
        "clinic_id": clinic_id,
        "type": type_,
        "at": now,
        "appointment_external_id": appointment,
        "data": data or {},
        "webhook_status": "pending" if has_webhook else "none",
        "webhook_next_at": now if has_webhook else None,
        "webhook_attempts": 0,
    }


_PENDING = "reminders.events.pending"  # the session.info key of events written at commit


def record_at_commit(
    session: Session,
    clinic_id: int,
    type_: str,
    now: dt.datetime,
    *,
    appointment: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Appends an event to the caller's transaction, written just before it commits (and lost
    with it on rollback). Queries in the same transaction do not see it: for writers that do not
    read their events back (and not inside a savepoint, whose rollback would not drop it)."""
    row = _row(session, clinic_id, type_, now, appointment, data)
    session.info.setdefault(_PENDING, []).append(row)


_LOCK = select(func.pg_advisory_xact_lock(_LOCK_NAMESPACE, bindparam("clinic_id")))
_INSERT = insert(Event)


def _lock(session: Session, clinic_ids: list[int]) -> None:
    """Serialises event writers of these clinics until the transaction ends (PostgreSQL; SQLite
    writers are serialised by the database itself). Sorted, so two writers cannot deadlock."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for clinic_id in sorted(set(clinic_ids)):
        session.execute(_LOCK, {"clinic_id": clinic_id})


_COLUMNS = (
    "clinic_id",
    "type",
    "at",
    "appointment_external_id",
    "data",
    "webhook_status",
    "webhook_attempts",
    "webhook_next_at",
)


def _locked_insert() -> Insert:
    """One event's INSERT that first takes its clinic's lock, in the same statement (one round
    trip less while the lock is held): the row, and so its sequence value, is made from the
    lock's row, which PostgreSQL computes first (a CTE calling a volatile function is never
    inlined, and the INSERT's source rows come out of it)."""
    table = cast(Table, Event.__table__)
    taken = select(
        func.pg_advisory_xact_lock(_LOCK_NAMESPACE, bindparam("clinic_id")).label("taken")
    ).cte("event_lock")
    values = select(*(bindparam(name, type_=table.c[name].type) for name in _COLUMNS)).select_from(
        taken
    )
    return insert(table).from_select([table.c[name] for name in _COLUMNS], values)


_LOCKED_INSERT = _locked_insert()


@sa_event.listens_for(Session, "before_commit")
def _write_pending(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    session.flush()  # the transaction's other writes go before the lock, not under it
    if session.get_bind().dialect.name != "postgresql":
        session.execute(_INSERT, pending)
        return
    # Clinics in id order (two writers cannot deadlock), each clinic's events in the order they
    # were recorded, in one executemany (one round trip; taking a lock held already is a no-op).
    by_clinic: dict[int, list[dict[str, Any]]] = {}
    for row in pending:
        by_clinic.setdefault(int(row["clinic_id"]), []).append(row)
    for clinic_id in sorted(by_clinic):
        session.execute(_LOCKED_INSERT, by_clinic[clinic_id])


@sa_event.listens_for(Session, "after_rollback")
def _forget_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


def envelope(event: Event) -> dict[str, Any]:
    """An event as the feed and the webhook show it."""
    return {
        "id": event.id,
        "type": event.type,
        "at": event.at.isoformat().replace("+00:00", "Z"),
        "appointment": event.appointment_external_id,
        "data": event.data,
    }


def feed(session: Session, clinic_id: int, after: int, limit: int) -> tuple[list[Event], int]:
    """The clinic's events after id `after`, oldest first, and the `next` cursor."""
    rows = list(
        session.scalars(
            select(Event)
            .where(Event.clinic_id == clinic_id, Event.id > after)
            .order_by(Event.id)
            .limit(limit)
        )
    )
    return rows, rows[-1].id if rows else after


# --- delivery to the clinic's webhook ------------------------------------------------------------

WEBHOOK_WINDOW = dt.timedelta(hours=24)  # retried with backoff for this long, then failed
WEBHOOK_LEASE = dt.timedelta(minutes=2)  # a delivery in flight longer than this was lost
WEBHOOK_TIMEOUT = 10.0


def claim_webhooks(session: Session, now: dt.datetime, limit: int = 200) -> list[int]:
    """Claims events due for delivery, in order per appointment: an event waits while an
    earlier one of the same appointment is undelivered. A claim whose lease ran out (its worker
    died) is claimed again."""
    earlier = aliased(Event)
    blocked = (
        select(earlier.id)
        .where(
            earlier.clinic_id == Event.clinic_id,
            earlier.appointment_external_id == Event.appointment_external_id,
            earlier.id < Event.id,
            earlier.webhook_status.in_(("pending", "sending")),
        )
        .exists()
    )
    due = (
        select(Event.id)
        .where(
            Event.webhook_status.in_(("pending", "sending")),
            Event.webhook_next_at <= now,
            ~blocked,
        )
        .order_by(Event.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True, of=Event)
    statement = (
        update(Event)
        .where(Event.id.in_(due.scalar_subquery()))
        .values(webhook_status="sending", webhook_next_at=now + WEBHOOK_LEASE)
        .returning(Event.id)
        .execution_options(synchronize_session=False)
    )
    return list(session.scalars(statement))


@dataclass(frozen=True)
class Delivery:
    event_id: int
    url: str
    body: bytes
    headers: dict[str, str]


def prepare_delivery(session: Session, event_id: int) -> Delivery | None:
    event = session.get(Event, event_id)
    if event is None or event.webhook_status != "sending":
        return None
    clinic = session.get(Clinic, event.clinic_id)
    assert clinic is not None
    if not clinic.webhook_url or not clinic.webhook_secret:
        event.webhook_status = "none"  # the clinic removed its webhook meanwhile
        return None
    body = json.dumps(envelope(event), separators=(",", ":"), ensure_ascii=False).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "reminders-webhook/1",
        "X-Reminders-Event": event.type,
        "X-Reminders-Event-Id": str(event.id),
        "X-Reminders-Signature": sign(clinic.webhook_secret, body),
    }
    return Delivery(event.id, clinic.webhook_url, body, headers)


def record_delivery(session: Session, event_id: int, now: dt.datetime, error: str | None) -> None:
    """Delivered; or retried later with backoff until 24 h after the event, then failed."""
    event = session.get(Event, event_id)
    if event is None or event.webhook_status != "sending":
        return
    event.webhook_attempts += 1
    if error is None:
        event.webhook_status, event.webhook_delivered_at = "delivered", now
        event.webhook_error = None
        event.webhook_next_at = None
        return
    event.webhook_error = error[:300]
    wait = min(dt.timedelta(seconds=15 * 2**event.webhook_attempts), dt.timedelta(hours=1))
    if now + wait > event.at + WEBHOOK_WINDOW:
        event.webhook_status, event.webhook_next_at = "failed", None
        log.warning("event %s: webhook delivery given up after 24 h: %s", event.id, error)
    else:
        event.webhook_status, event.webhook_next_at = "pending", now + wait


def deliver(event_id: int, clock: Callable[[], dt.datetime]) -> str:
    """Posts one claimed event to its clinic's webhook and records the outcome."""
    with session_scope() as session:
        delivery = prepare_delivery(session, event_id)
    if delivery is None:
        return "not_claimed"
    import httpx  # only webhook delivery needs it: the SMS worker starts faster without it

    try:
        response = httpx.post(
            delivery.url,
            content=delivery.body,
            headers=delivery.headers,
            timeout=WEBHOOK_TIMEOUT,
            follow_redirects=False,
        )
        error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    with session_scope() as session:
        record_delivery(session, event_id, clock(), error)
    return "delivered" if error is None else "retry"
