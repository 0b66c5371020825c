"""Pure time maths: reminder rules, durations, quiet hours. No clock here: `now` is passed in."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

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
