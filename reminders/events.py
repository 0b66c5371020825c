"""The clinic event feed: what the clinic system must learn, with ids that never skip.

PostgreSQL hands out sequence values before commit, so two transactions can commit ids out of
order and a poller reading `after=102` could miss 101. Event writes are serialised per clinic
with a transaction-scoped advisory lock, so ids of one clinic commit in order (DESIGN rule 12).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from reminders.models import Event

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
    """Appends an event in the caller's transaction."""
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_LOCK_NAMESPACE, clinic_id)))
    event = Event(
        clinic_id=clinic_id,
        type=type_,
        at=now,
        appointment_external_id=appointment,
        data=data or {},
    )
    session.add(event)
    session.flush()
    return event
