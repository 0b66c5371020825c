"""Pure time maths: reminder rules, durations, quiet hours. No clock here: `now` is passed in."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol
from zoneinfo import ZoneInfo

_DURATION = re.compile(r"^\s*(\d{1,5})\s*(m|min|h|d)\s*$", re.IGNORECASE)
_UNITS = {"m": 1, "min": 1, "h": 60, "d": 1440}
MAX_RULE_OFFSET = dt.timedelta(days=60)


@dataclass(frozen=True, order=True)
class Rule:
    """Send `offset` before the start; with `only_unconfirmed`, only while unconfirmed."""

    offset: dt.timedelta
    only_unconfirmed: bool = False

    @property
    def name(self) -> str:
        return format_duration(self.offset)

    def __str__(self) -> str:
        return self.name + (":unconfirmed" if self.only_unconfirmed else "")


def parse_duration(text: str) -> dt.timedelta:
    """`90m`, `2h`, `3d` (or `0`) as a timedelta. Raises ValueError otherwise."""
    if text.strip() == "0":
        return dt.timedelta(0)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90m, 2h or 3d")
    return dt.timedelta(minutes=int(match[1]) * _UNITS[match[2].lower()])


def format_duration(value: dt.timedelta) -> str:
    """The shortest exact form: 72h stays 72h (operators think in hours), 90m stays 90m."""
    minutes = int(value.total_seconds() // 60)
    if minutes == 0:
        return "0"
    if minutes % 60:
        return f"{minutes}m"
    return f"{minutes // 60}h"


@lru_cache(maxsize=256)  # the worker reads each clinic's rules for every SMS
def parse_rules(text: str) -> tuple[Rule, ...]:
    """`72h,24h:unconfirmed` as rules, latest-first order. Raises ValueError naming the bad part."""
    rules: list[Rule] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        offset_text, _, condition = part.partition(":")
        if condition not in ("", "unconfirmed"):
            raise ValueError(f"{part!r}: the only condition is ':unconfirmed'")
        offset = parse_duration(offset_text)
        if not dt.timedelta(minutes=1) <= offset <= MAX_RULE_OFFSET:
            raise ValueError(f"{part!r}: the offset must be between 1m and 60d")
        if any(r.offset == offset for r in rules):
            raise ValueError(f"{part!r}: two rules with the same offset")
        rules.append(Rule(offset, condition == "unconfirmed"))
    if not rules:
        raise ValueError("at least one rule is needed, e.g. 72h,24h:unconfirmed")
    return tuple(sorted(rules, reverse=True))


def format_rules(rules: tuple[Rule, ...]) -> str:
    return ",".join(str(r) for r in rules)


def parse_quiet_hours(text: str) -> tuple[dt.time, dt.time] | None:
    """`20:00-08:00` as (start, end); `none` or `off` for no quiet hours."""
    if text.strip().lower() in ("none", "off", ""):
        return None
    start_text, sep, end_text = text.partition("-")
    try:
        if not sep:
            raise ValueError
        start = dt.time.fromisoformat(start_text.strip())
        end = dt.time.fromisoformat(end_text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a range like 20:00-08:00 (or 'none')") from None
    if start == end:
        raise ValueError(f"{text!r}: start and end are the same; use 'none' for no quiet hours")
    return start, end


# --- quiet hours and send times ---------------------------------------------------------------

QuietHours = tuple[dt.time, dt.time] | None


def in_quiet_hours(at: dt.datetime, zone: ZoneInfo, quiet: QuietHours) -> bool:
    """True when the clinic's wall clock at `at` is inside its quiet hours."""
    if quiet is None:
        return False
    start, end = quiet
    local = at.astimezone(zone).time()
    if start < end:
        return start <= local < end
    return local >= start or local < end


def _local(day: dt.date, time: dt.time, zone: ZoneInfo) -> dt.datetime:
    """The instant a wall clock shows `day time` (a time skipped by DST maps just after it)."""
    naive = dt.datetime.combine(day, time)
    aware = naive.replace(tzinfo=zone)
    return aware.astimezone(dt.UTC)


def quiet_end_after(at: dt.datetime, zone: ZoneInfo, quiet: QuietHours) -> dt.datetime:
    """The first instant at or after `at` outside quiet hours."""
    if quiet is None or not in_quiet_hours(at, zone, quiet):
        return at
    day = at.astimezone(zone).date()
    for offset in (0, 1):
        candidate = _local(day + dt.timedelta(days=offset), quiet[1], zone)
        if candidate > at and not in_quiet_hours(candidate, zone, quiet):
            return candidate
    # A DST jump swallowed the end of quiet hours: step to the next whole minute outside.
    candidate = at
    while in_quiet_hours(candidate, zone, quiet):
        candidate += dt.timedelta(minutes=15)
    return candidate


def quiet_start_before(at: dt.datetime, zone: ZoneInfo, quiet: QuietHours) -> dt.datetime:
    """The last instant (to the minute) at or before `at` outside quiet hours."""
    if quiet is None or not in_quiet_hours(at, zone, quiet):
        return at
    day = at.astimezone(zone).date()
    for offset in (0, -1):
        candidate = _local(day + dt.timedelta(days=offset), quiet[0], zone)
        candidate -= dt.timedelta(minutes=1)
        if candidate < at and not in_quiet_hours(candidate, zone, quiet):
            return candidate
    candidate = at
    while in_quiet_hours(candidate, zone, quiet):
        candidate -= dt.timedelta(minutes=15)
    return candidate


@dataclass(frozen=True)
class Planned:
    """One SMS to plan: `rule` keys it (with the start time); `skip` says why it cannot go."""

    rule: str
    kind: str  # "reminder", "late" or "moved"
    due_at: dt.datetime
    send_by: dt.datetime
    skip: str | None = None


@dataclass(frozen=True)
class Timing:
    """A clinic's timing settings, in the form planning needs."""

    rules: tuple[Rule, ...]
    zone: ZoneInfo
    quiet: QuietHours
    deadline: dt.timedelta

    def __hash__(self) -> int:
        """Hashed once (planning caches plans by timing, a hash per appointment)."""
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.rules, self.zone, self.quiet, self.deadline))
            object.__setattr__(self, "_hash", cached)
        return cached


class ClinicTimingSettings(Protocol):
    """The columns of a clinic that make its Timing (a Clinic row, without importing models)."""

    rules: str
    timezone: str
    quiet_start: dt.time | None
    quiet_end: dt.time | None
    deadline_minutes: int


def clinic_timing(clinic: ClinicTimingSettings) -> Timing:
    """A clinic's rules, time zone, quiet hours and deadline, as the planner needs them."""
    return _timing(
        clinic.rules, clinic.timezone, clinic.quiet_start, clinic.quiet_end, clinic.deadline_minutes
    )


@lru_cache(maxsize=256)
def _timing(
    rules: str,
    timezone: str,
    quiet_start: dt.time | None,
    quiet_end: dt.time | None,
    deadline_minutes: int,
) -> Timing:
    """One Timing per set of settings: its hash is computed once (see planning._planned)."""
    quiet = None
    if quiet_start is not None and quiet_end is not None:
        quiet = (quiet_start, quiet_end)
    return Timing(
        rules=parse_rules(rules),
        zone=ZoneInfo(timezone),
        quiet=quiet,
        deadline=dt.timedelta(minutes=deadline_minutes),
    )


def place(
    nominal: dt.datetime, now: dt.datetime, send_by: dt.datetime, timing: Timing
) -> dt.datetime | None:
    """Where a send meant for `nominal` can go: there, else after quiet hours if that is before
    the deadline, else before them if that is not in the past; None when nowhere fits."""
    at = max(nominal, now)
    if at > send_by:
        return None
    if not in_quiet_hours(at, timing.zone, timing.quiet):
        return at
    later = quiet_end_after(at, timing.zone, timing.quiet)
    if later <= send_by:
        return later
    earlier = quiet_start_before(at, timing.zone, timing.quiet)
    return earlier if now <= earlier <= send_by else None


def plan(
    starts_at: dt.datetime, now: dt.datetime, timing: Timing, *, moved: bool = False
) -> list[Planned]:
    """The sends for one booking, planned once when it is made (or moved).

    Rules whose time is still ahead are planned at their time, moved out of quiet hours. A booking
    made inside the windows (some rule's time already passed), or moved after the patient was
    reminded of the old time (`moved`), gets one catch-up SMS at once instead of a burst, and later
    rules that would follow it too closely (within half their offset) are dropped. Nothing is
    planned after the deadline; an appointment already started gets nothing.
    """
    if starts_at <= now:
        return []
    send_by = starts_at - timing.deadline
    ahead = [r for r in timing.rules if starts_at - r.offset > now]
    planned: list[Planned] = []
    catch_up: dt.datetime | None = None
    if moved or len(ahead) < len(timing.rules):
        kind = "moved" if moved else "late"
        at = place(now, now, send_by, timing)
        if at is None:
            reason = "deadline" if now >= send_by else "quiet_hours"
            return [Planned(kind, kind, now, send_by, skip=reason)]
        planned.append(Planned(kind, kind, at, send_by))
        catch_up = at
    for rule in ahead:
        at = place(starts_at - rule.offset, now, send_by, timing)
        if at is None:
            continue  # the next rule, or the catch-up, covers it
        if catch_up is not None and at - catch_up < rule.offset / 2:
            continue
        if any(abs(at - p.due_at) < dt.timedelta(hours=1) for p in planned):
            continue  # quiet hours pushed two rules together: one SMS is enough
        planned.append(Planned(str(rule), "reminder", at, send_by))
    return planned
