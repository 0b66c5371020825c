"""ISO weeks in a clinic's time zone, and local clock times computed in SQL on either database."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import BigInteger, ColumnElement, case, cast, func, literal
from sqlalchemy.orm import Session

from reminders.models import Appointment

BASELINE_WEEKS = 12
WEEK_RE = re.compile(r"^(\d{4})-W(\d{2})$")


class ReportError(ValueError):
    """A bad report request: `field` names it, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def parse_week(value: str) -> dt.date:
    """The Monday of an ISO week like `2026-W47`; ReportError for anything else."""
    match = WEEK_RE.match(value.strip())
    if match is None:
        raise ReportError("week", f"{value!r} is not an ISO week like 2026-W47")
    year, week = int(match[1]), int(match[2])
    weeks_in_year = dt.date(year, 12, 28).isocalendar().week
    if not 1 <= week <= weeks_in_year:
        raise ReportError("week", f"{year} has weeks 1 to {weeks_in_year}, not {week}")
    return dt.date.fromisocalendar(year, week, 1)


def week_name(monday: dt.date) -> str:
    iso = monday.isocalendar()
    return f"{iso.year}-W{iso.week:02d}"


def last_complete_week(now: dt.datetime, zone: ZoneInfo) -> str:
    """The ISO week that ended before `now` in the clinic's time zone."""
    today = now.astimezone(zone).date()
    return week_name(today - dt.timedelta(days=today.weekday() + 7))


def due_week(now: dt.datetime, zone: ZoneInfo) -> str:
    """The week whose report is due: the last complete one once Monday 07:00 has passed."""
    return last_complete_week(now - dt.timedelta(hours=7), zone)


def local_midnight(day: dt.date, zone: ZoneInfo) -> dt.datetime:
    """Local midnight of `day` as UTC."""
    return dt.datetime.combine(day, dt.time(0), tzinfo=zone).astimezone(dt.UTC)


def _offsets(zone: ZoneInfo, start: dt.datetime, end: dt.datetime) -> list[tuple[dt.datetime, int]]:
    """[(from this UTC instant, the zone's UTC offset in seconds)] over [start, end): a few
    entries, one per daylight-saving change."""

    def offset(at: dt.datetime) -> int:
        delta = at.astimezone(zone).utcoffset()
        return int(delta.total_seconds()) if delta is not None else 0

    spans = [(start, offset(start))]
    at = start
    while at < end:
        nxt = min(at + dt.timedelta(days=1), end)
        if offset(nxt) != spans[-1][1]:
            low, high = at, nxt  # the change is in (low, high]: bisect to the minute
            while high - low > dt.timedelta(minutes=1):
                mid = low + (high - low) / 2
                if offset(mid) == spans[-1][1]:
                    low = mid
                else:
                    high = mid
            spans.append((high, offset(high)))
        at = nxt
    return spans


def epoch(session: Session, column: Any) -> ColumnElement[int]:
    """Whole seconds since 1970 of a stored UTC time, on either database."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.extract("epoch", column), BigInteger)
    return cast(func.strftime("%s", column), BigInteger)


def local_epoch(session: Session, zone: ZoneInfo, start: dt.datetime, end: dt.datetime) -> Any:
    """Appointment.starts_at as seconds since 1970 of the clinic's wall clock."""
    spans = _offsets(zone, start, end)
    offset: Any = literal(spans[0][1])
    if len(spans) > 1:
        offset = case(
            *[
                (Appointment.starts_at < at, prev)
                for (at, _), (_, prev) in zip(spans[1:], spans[:-1], strict=True)
            ],
            else_=spans[-1][1],
        )
    return epoch(session, Appointment.starts_at) + offset


def naive_epoch(day: dt.date) -> int:
    return int(dt.datetime.combine(day, dt.time(0), tzinfo=dt.UTC).timestamp())
