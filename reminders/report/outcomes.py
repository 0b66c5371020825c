"""Outcomes: what happened at an appointment that has started."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from reminders.models import Appointment
from reminders.report.weeks import ReportError

OUTCOMES = ("attended", "no_show", "cancelled_late")


def record_outcome(
    session: Session, clinic_id: int, external_id: str, outcome: str, now: dt.datetime
) -> tuple[Appointment, str]:
    """Records what happened at an appointment that has started; returns it with `updated` or
    `unchanged` (the same outcome again changes nothing; a different one corrects it).
    Raises LookupError for an unknown appointment and ReportError before its start."""
    if outcome not in OUTCOMES:
        raise ReportError("outcome", f"one of {', '.join(OUTCOMES)}")
    appointment = session.scalar(
        select(Appointment).where(
            Appointment.clinic_id == clinic_id, Appointment.external_id == external_id
        )
    )
    if appointment is None:
        raise LookupError(external_id)
    if appointment.starts_at > now:
        raise ReportError(
            "outcome",
            "can only be recorded once the appointment has started "
            f"({appointment.starts_at.isoformat()})",
        )
    if appointment.outcome == outcome:
        return appointment, "unchanged"
    appointment.outcome = outcome
    appointment.content_hash = None  # the clinic's next push must be read in full
    return appointment, "updated"
