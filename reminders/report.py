"""Outcomes and the weekly no-show report: SQL aggregates in, the contract's JSON out.

Every figure is a GROUP BY in the database; Python only turns a few dozen sums into rates and
intervals. Weeks are ISO weeks in the clinic's time zone. The report compares two arms drawn at
random by patient (the clinic's holdout, recorded on each appointment when its first reminder is
planned): appointments since go-live whose patient was held out, against those whose patient was
reminded. That comparison is what `effect` measures; the before/after series only shows the trend.

Intervals: rates get a Wilson 95% interval. The effect's intervals are cluster-robust (patients
are the clusters: one who misses often counts once, not once per appointment): the variance of
each arm's ratio estimator sum(no_show)/sum(n) comes from per-patient sums computed in SQL, the
difference by the delta method, the relative reduction on the log scale.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    and_,
    case,
    cast,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from reminders import events
from reminders.models import Appointment, Clinic, Reminder, WeeklyReport

Z95 = NormalDist().inv_cdf(0.975)
BASELINE_WEEKS = 12
MIN_ARM = 20  # appointments with an outcome per arm before an effect is worth stating
MAX_KINDS = 10  # more kinds than this are summed as "other"
WEEK_RE = re.compile(r"^(\d{4})-W(\d{2})$")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
LEAD_TIMES = ("< 2 days", "2-7 days", "> 7 days")
REPLIES = ("confirmed", "cancelled", "no reply")
OUTCOMES = ("attended", "no_show", "cancelled_late")


class ReportError(ValueError):
    """A bad report request: `field` names it, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# --- outcomes -------------------------------------------------------------------------------------


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


# --- weeks and time zones -------------------------------------------------------------------------


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


def _utc(day: dt.date, zone: ZoneInfo) -> dt.datetime:
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


def _epoch(session: Session, column: Any) -> ColumnElement[int]:
    """Whole seconds since 1970 of a stored UTC time, on either database."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.extract("epoch", column), BigInteger)
    return cast(func.strftime("%s", column), BigInteger)


def _local_epoch(session: Session, zone: ZoneInfo, start: dt.datetime, end: dt.datetime) -> Any:
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
    return _epoch(session, Appointment.starts_at) + offset


def _naive_epoch(day: dt.date) -> int:
    return int(dt.datetime.combine(day, dt.time(0), tzinfo=dt.UTC).timestamp())


# --- statistics -----------------------------------------------------------------------------------


def rate(events: int, n: int) -> dict[str, Any]:
    """`{"value", "ci95", "n"}` with a Wilson interval; value and interval None when n is 0."""
    if n <= 0:
        return {"value": None, "ci95": None, "n": 0}
    p = events / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return {
        "value": round(p, 4),
        "ci95": [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)],
        "n": n,
    }


@dataclass(frozen=True)
class Arm:
    """Per-patient sums of one arm: patients, appointments with an outcome, no-shows, and the
    sums of squares the cluster-robust variance needs."""

    patients: int = 0
    n: int = 0
    y: int = 0
    yy: float = 0.0
    ny: float = 0.0
    nn: float = 0.0

    @property
    def ratio(self) -> float:
        return self.y / self.n if self.n else math.nan

    def variance(self) -> float:
        """Cluster-robust variance of the ratio sum(y)/sum(n), with the G/(G-1) correction."""
        if self.patients < 2 or self.n == 0:
            return math.nan
        r = self.ratio
        spread = self.yy - 2 * r * self.ny + r * r * self.nn
        return self.patients / (self.patients - 1) * max(spread, 0.0) / (self.n * self.n)


def effect(reminded: Arm, holdout: Arm) -> dict[str, Any]:
    """Reminded minus holdout no-show rate, and the relative reduction, with 95% intervals."""
    out: dict[str, Any] = {
        "difference": None,
        "ci95": None,
        "relative": None,
        "relative_ci95": None,
        "significant": False,
    }
    if min(reminded.n, holdout.n) < MIN_ARM or min(reminded.patients, holdout.patients) < 2:
        out["note"] = (
            f"not enough data: each arm needs {MIN_ARM} appointments with an outcome "
            f"(reminded {reminded.n}, holdout {holdout.n})"
        )
        return out
    r1, r0 = reminded.ratio, holdout.ratio
    v1, v0 = reminded.variance(), holdout.variance()
    difference = r1 - r0
    half = Z95 * math.sqrt(v1 + v0)
    out["difference"] = round(difference, 4)
    out["ci95"] = [round(difference - half, 4), round(difference + half, 4)]
    out["significant"] = bool(difference + half < 0 or difference - half > 0)
    if r0 > 0 and r1 > 0:
        log_ratio = math.log(r1 / r0)
        spread = Z95 * math.sqrt(v1 / (r1 * r1) + v0 / (r0 * r0))
        out["relative"] = round(1 - r1 / r0, 4)
        out["relative_ci95"] = [
            round(1 - math.exp(log_ratio + spread), 4),
            round(1 - math.exp(log_ratio - spread), 4),
        ]
    elif r0 > 0:
        out["relative"] = 1.0
        out["note"] = "no no-show at all in the reminded arm: the relative interval is undefined"
    else:
        out["note"] = "no no-show at all in the holdout: the relative effect is undefined"
    return out


# --- the queries ----------------------------------------------------------------------------------

_has_outcome = Appointment.outcome.is_not(None)
_no_show = case((Appointment.outcome == "no_show", 1), else_=0)
_counted = case((_has_outcome, 1), else_=0)


def _in_range(clinic_id: int, start: dt.datetime, end: dt.datetime) -> ColumnElement[bool]:
    return and_(
        Appointment.clinic_id == clinic_id,
        Appointment.starts_at >= start,
        Appointment.starts_at < end,
    )


def _totals(session: Session, clinic_id: int, start: dt.datetime, end: dt.datetime) -> Any:
    def count(condition: ColumnElement[bool]) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    return session.execute(
        select(
            func.count(),
            count(Appointment.outcome == "attended"),
            count(Appointment.outcome == "no_show"),
            count(Appointment.outcome == "cancelled_late"),
            count(Appointment.confirmation == "confirmed"),
            count(Appointment.confirmation == "cancelled_by_patient"),
        ).where(_in_range(clinic_id, start, end))
    ).one()


def _period(
    session: Session, clinic_id: int, start: dt.datetime, end: dt.datetime
) -> dict[str, Any]:
    total, attended, no_show, late, _, _ = _totals(session, clinic_id, start, end)
    return {
        "appointments": total,
        "attended": attended,
        "no_show": no_show,
        "cancelled_late": late,
        "no_show_rate": rate(no_show, attended + no_show + late),
    }


def _arms(
    session: Session, clinic_id: int, start: dt.datetime, end: dt.datetime
) -> dict[bool, Arm]:
    """Per-arm sums over per-patient sums (both GROUP BYs in SQL)."""
    per_patient = (
        select(
            Appointment.holdout.label("holdout"),
            func.count().label("n"),
            func.sum(_no_show).label("y"),
        )
        .where(_in_range(clinic_id, start, end), _has_outcome, Appointment.holdout.is_not(None))
        .group_by(Appointment.patient_id, Appointment.holdout)
        .subquery()
    )
    n, y = per_patient.c.n, per_patient.c.y
    rows = session.execute(
        select(
            per_patient.c.holdout,
            func.count(),
            func.sum(n),
            func.sum(y),
            func.sum(y * y),
            func.sum(n * y),
            func.sum(n * n),
        ).group_by(per_patient.c.holdout)
    )
    arms = {True: Arm(), False: Arm()}
    for holdout, patients, sn, sy, syy, sny, snn in rows:
        arms[bool(holdout)] = Arm(
            int(patients), int(sn), int(sy), float(syy), float(sny), float(snn)
        )
    return arms


def _arm_figures(arm: Arm, start: dt.date | None, end: dt.date) -> dict[str, Any]:
    """One arm since go-live (`from` None before go-live: no arm yet)."""
    return {
        "from": start.isoformat() if start else None,
        "to": (end - dt.timedelta(days=1)).isoformat() if start else None,
        "patients": arm.patients,
        "with_outcome": arm.n,
        "no_show": arm.y,
        "no_show_rate": rate(arm.y, arm.n),
    }


def _grouped(
    session: Session,
    clinic_id: int,
    start: dt.datetime,
    end: dt.datetime,
    key: Any,
) -> dict[Any, dict[str, Any]]:
    """{key: {appointments, overall, reminded, holdout}} for appointments in [start, end)."""
    label = key.label("key")
    rows = session.execute(
        select(
            label,
            Appointment.holdout,
            func.count(),
            func.sum(_counted),
            func.sum(_no_show),
        )
        .where(_in_range(clinic_id, start, end))
        .group_by(label, Appointment.holdout)
    )
    groups: dict[Any, dict[str, Any]] = {}
    for value, holdout, total, counted, no_show in rows:
        group = groups.setdefault(
            value, {"appointments": 0, "all": [0, 0], "reminded": [0, 0], "holdout": [0, 0]}
        )
        group["appointments"] += int(total)
        for arm in ("all", None if holdout is None else ("holdout" if holdout else "reminded")):
            if arm is not None:
                group[arm][0] += int(no_show or 0)
                group[arm][1] += int(counted or 0)
    return groups


def _breakdown(
    groups: dict[Any, dict[str, Any]], keys: Sequence[Any], names: Sequence[str]
) -> list[dict[str, Any]]:
    out = []
    for key, name in zip(keys, names, strict=True):
        group = groups.get(
            key, {"appointments": 0, "all": [0, 0], "reminded": [0, 0], "holdout": [0, 0]}
        )
        out.append(
            {
                "key": name,
                "appointments": group["appointments"],
                "no_show_rate": rate(*group["all"]),
                "reminded": rate(*group["reminded"]),
                "holdout": rate(*group["holdout"]),
            }
        )
    return out


def _by_kind(groups: dict[Any, dict[str, Any]]) -> list[dict[str, Any]]:
    ordered = sorted(groups, key=lambda k: (-groups[k]["appointments"], str(k)))
    keep, rest = ordered[:MAX_KINDS], ordered[MAX_KINDS:]
    if rest:
        other: dict[str, Any] = {
            "appointments": 0,
            "all": [0, 0],
            "reminded": [0, 0],
            "holdout": [0, 0],
        }
        for key in rest:
            other["appointments"] += groups[key]["appointments"]
            for arm in ("all", "reminded", "holdout"):
                other[arm] = [a + b for a, b in zip(other[arm], groups[key][arm], strict=True)]
        groups = {**groups, "\x00other": other}
        keep.append("\x00other")
    names = ["other kinds" if k == "\x00other" else (k or "(no kind)") for k in keep]
    return _breakdown(groups, keep, names)


def _slots_freed(
    session: Session, clinic_id: int, start: dt.datetime, end: dt.datetime
) -> dict[str, Any]:
    """Patient cancellations of this week's appointments, and how far ahead they came."""
    ahead = (
        _epoch(session, Appointment.starts_at) - _epoch(session, Appointment.decided_at)
    ) / 3600
    bucket = case((ahead < 24, "< 1 day"), (ahead < 72, "1-3 days"), else_="> 3 days")
    rows = session.execute(
        select(bucket.label("b"), func.count(), func.sum(ahead))
        .where(
            _in_range(clinic_id, start, end),
            Appointment.confirmation == "cancelled_by_patient",
            Appointment.decided_at.is_not(None),
        )
        .group_by(bucket)
    ).all()
    buckets = dict.fromkeys(("< 1 day", "1-3 days", "> 3 days"), 0)
    total, hours = 0, 0.0
    for name, count, summed in rows:
        buckets[name] = int(count)
        total += int(count)
        hours += float(summed or 0)
    return {
        "count": total,
        "mean_hours_ahead": round(hours / total, 1) if total else None,
        "ahead": buckets,
    }


def _sms(session: Session, clinic_id: int, start: dt.datetime, end: dt.datetime) -> dict[str, Any]:
    """SMS sent in the week. `claimed_at` (indexed) precedes `sent_at` by seconds to hours."""
    failed = Reminder.delivery_status.in_(("failed", "rejected", "expired"))
    row = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((Reminder.delivery_status == "delivered", 1), else_=0)), 0),
            func.coalesce(func.sum(case((failed, 1), else_=0)), 0),
            func.coalesce(func.sum(Reminder.segments), 0),
            func.coalesce(func.sum(Reminder.price), 0.0),
        ).where(
            Reminder.clinic_id == clinic_id,
            Reminder.claimed_at >= start - dt.timedelta(days=2),
            Reminder.claimed_at < end,
            Reminder.sent_at >= start,
            Reminder.sent_at < end,
        )
    ).one()
    failed_unsent = session.scalar(
        select(func.count()).where(
            Reminder.clinic_id == clinic_id,
            Reminder.status == "failed",
            Reminder.sent_at.is_(None),
            Reminder.claimed_at >= start,
            Reminder.claimed_at < end,
        )
    )
    sent, delivered, failed_after, segments, cost = row
    return {
        "sent": int(sent),
        "delivered": int(delivered),
        "failed": int(failed_after) + int(failed_unsent or 0),
        "segments": int(segments),
        "cost": round(float(cost), 4),
    }


# --- the report -----------------------------------------------------------------------------------


def build(session: Session, clinic: Clinic, week: str, now: dt.datetime) -> dict[str, Any]:
    """The weekly report of `clinic` for ISO `week` (e.g. 2026-W47), as the contract's JSON."""
    monday = parse_week(week)
    zone = ZoneInfo(clinic.timezone)
    week_start, week_end = _utc(monday, zone), _utc(monday + dt.timedelta(days=7), zone)
    end_day = monday + dt.timedelta(days=7)
    go_live = clinic.go_live
    totals = _totals(session, clinic.id, week_start, week_end)
    total, attended, no_show, late, confirmed, cancelled = totals
    report: dict[str, Any] = {
        "clinic": clinic.id,
        "clinic_name": clinic.name,
        "week": week_name(monday),
        "from": monday.isoformat(),
        "to": (end_day - dt.timedelta(days=1)).isoformat(),
        "timezone": clinic.timezone,
        "go_live": go_live.isoformat() if go_live else None,
        "holdout_share": clinic.holdout,
        "appointments": total,
        "attended": attended,
        "no_show": no_show,
        "cancelled_late": late,
        "no_show_rate": rate(no_show, attended + no_show + late),
        "confirmed": confirmed,
        "cancelled_by_patient": cancelled,
    }
    empty = Arm()
    arms = {True: empty, False: empty}
    if go_live is not None:
        base_start = go_live - dt.timedelta(weeks=BASELINE_WEEKS)
        report["baseline"] = {
            "from": base_start.isoformat(),
            "to": (go_live - dt.timedelta(days=1)).isoformat(),
            **_period(session, clinic.id, _utc(base_start, zone), _utc(go_live, zone)),
        }
        if end_day > go_live:
            arms = _arms(session, clinic.id, _utc(go_live, zone), week_end)
    else:
        report["baseline"] = None
    # Breakdowns: since go-live, or the last 12 weeks when reminders have not started.
    window = (end_day - dt.timedelta(weeks=BASELINE_WEEKS), end_day)
    if go_live is not None and end_day > go_live:
        window = (go_live, end_day)
    live = go_live is not None and end_day > go_live
    report["holdout"] = _arm_figures(arms[True], go_live if live else None, end_day)
    report["reminded"] = _arm_figures(arms[False], go_live if live else None, end_day)
    report["effect"] = effect(arms[False], arms[True])
    report["slots_freed"] = _slots_freed(session, clinic.id, week_start, week_end)
    report["sms"] = _sms(session, clinic.id, week_start, week_end)
    report["series"] = _series(session, clinic, zone, monday)
    report |= _breakdowns(session, clinic, zone, *window)
    report["summary"] = summary(report)
    report["generated_at"] = now.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return report


def _series(
    session: Session, clinic: Clinic, zone: ZoneInfo, monday: dt.date
) -> list[dict[str, Any]]:
    """Per week from 12 weeks before go-live (or 12 weeks back) to the report's week."""
    go_live = clinic.go_live
    if go_live is not None and go_live <= monday + dt.timedelta(days=6):
        first = go_live - dt.timedelta(days=go_live.weekday(), weeks=BASELINE_WEEKS)
    else:
        first = monday - dt.timedelta(weeks=BASELINE_WEEKS - 1)
    end_day = monday + dt.timedelta(days=7)
    start, end = _utc(first, zone), _utc(end_day, zone)
    index = (_local_epoch(session, zone, start, end) - _naive_epoch(first)) // 604800
    groups = _grouped(session, clinic.id, start, end, cast(index, Integer))
    series = []
    for i in range((end_day - first).days // 7):
        week_monday = first + dt.timedelta(weeks=i)
        group = groups.get(
            i, {"appointments": 0, "all": [0, 0], "reminded": [0, 0], "holdout": [0, 0]}
        )
        live = go_live is not None and week_monday + dt.timedelta(days=7) > go_live
        series.append(
            {
                "week": week_name(week_monday),
                "live": live,
                "appointments": group["appointments"],
                "no_show_rate": rate(*group["all"]),
                "reminded": rate(*group["reminded"]) if live else None,
                "holdout": rate(*group["holdout"]) if live else None,
            }
        )
    return series


def _breakdowns(
    session: Session, clinic: Clinic, zone: ZoneInfo, first: dt.date, end_day: dt.date
) -> dict[str, Any]:
    """By kind, weekday, lead time and reply, over the days [first, end_day)."""
    start, end = _utc(first, zone), _utc(end_day, zone)
    local = _local_epoch(session, zone, start, end)
    weekday = (local // 86400 + 3) % 7  # 1970-01-01 was a Thursday
    lead = _epoch(session, Appointment.starts_at) - _epoch(session, Appointment.booked_at)
    lead_bucket = case((lead < 2 * 86400, 0), (lead <= 7 * 86400, 1), else_=2)
    reply = case(
        (Appointment.confirmation == "confirmed", 0),
        (Appointment.confirmation == "cancelled_by_patient", 1),
        else_=2,
    )
    kinds = _grouped(session, clinic.id, start, end, Appointment.kind)
    return {
        "breakdown_window": {
            "from": first.isoformat(),
            "to": (end_day - dt.timedelta(days=1)).isoformat(),
        },
        "by_kind": _by_kind(kinds),
        "by_weekday": _breakdown(
            _grouped(session, clinic.id, start, end, cast(weekday, Integer)), range(7), WEEKDAYS
        ),
        "by_lead_time": _breakdown(
            _grouped(session, clinic.id, start, end, lead_bucket), range(3), LEAD_TIMES
        ),
        "by_reply": _breakdown(_grouped(session, clinic.id, start, end, reply), range(3), REPLIES),
    }


# --- plain sentences ------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%".replace(".0%", "%")


def summary(report: dict[str, Any]) -> list[str]:
    """What a clinic manager can act on, in plain sentences."""
    lines = []
    week_rate = report["no_show_rate"]
    if week_rate["n"] == 0:
        lines.append(
            f"Not enough data for {report['week']}: no appointment that week has an outcome "
            "recorded yet (send them with POST /v1/appointments/{id}/outcome or the CSV "
            "`outcome` column)."
        )
    else:
        lines.append(
            f"In {report['week']}, {report['no_show']} of {week_rate['n']} appointments with an "
            f"outcome were no-shows ({_pct(week_rate['value'])})."
        )
    base = report["baseline"]
    if base is None:
        lines.append(
            "No go-live date is set, so there is no before/after comparison: set it with "
            "`reminders clinic set ID --go-live YYYY-MM-DD`."
        )
    elif base["no_show_rate"]["n"]:
        lines.append(
            f"In the 12 weeks before reminders started ({base['from']} to {base['to']}), the "
            f"no-show rate was {_pct(base['no_show_rate']['value'])}."
        )
    else:
        lines.append("There are no outcomes from the 12 weeks before go-live to compare with.")
    lines.extend(_effect_sentences(report))
    freed = report["slots_freed"]
    if freed["count"]:
        lines.append(
            f"Patients cancelled {freed['count']} appointments themselves, on average "
            f"{freed['mean_hours_ahead']:.0f} hours ahead: slots you could offer again."
        )
    sms = report["sms"]
    if sms["sent"]:
        lines.append(
            f"{sms['sent']} SMS were sent ({sms['segments']} segments, cost {sms['cost']:.2f}); "
            f"{sms['delivered']} were confirmed delivered and {sms['failed']} failed."
        )
    return lines


def _effect_sentences(report: dict[str, Any]) -> list[str]:
    effect_ = report["effect"]
    if report["go_live"] is None:
        return []
    if report["holdout_share"] <= 0 and report["holdout"]["with_outcome"] == 0:
        return [
            "No patients are held out, so the effect of reminders cannot be measured apart from "
            "seasons and other changes: a holdout of 0.05 to 0.1 (`--holdout`) makes it measurable."
        ]
    if effect_["difference"] is None:
        return [
            "Not enough data yet to measure the effect of reminders: "
            + effect_.get("note", "").removeprefix("not enough data: ")
            + "."
        ]
    reminded, holdout = report["reminded"]["no_show_rate"], report["holdout"]["no_show_rate"]
    lines = [
        f"Since go-live, reminded patients missed {_pct(reminded['value'])} of their appointments "
        f"and patients held out at random missed {_pct(holdout['value'])}."
    ]
    relative, interval = effect_["relative"], effect_["relative_ci95"]
    if effect_["significant"] and effect_["difference"] < 0:
        text = "Reminders cut no-shows"
        if relative is not None and interval is not None:
            text += (
                f" by {_pct(relative)} (95% interval {_pct(interval[0])} to {_pct(interval[1])})"
            )
        lines.append(text + ": a real effect, not chance.")
    elif effect_["significant"]:
        lines.append(
            "Reminded patients missed more appointments than those held out, beyond chance: "
            "check the texts and timing."
        )
    else:
        lines.append(
            "The difference between the two groups is within what chance alone could give; "
            "more weeks of data will tell."
        )
    return lines


# --- stored builds --------------------------------------------------------------------------------


def stored(session: Session, clinic_id: int, week: str) -> dict[str, Any] | None:
    """The report built on Monday for this week, if there is one."""
    return session.scalar(
        select(WeeklyReport.data).where(
            WeeklyReport.clinic_id == clinic_id,
            WeeklyReport.week == week,
            WeeklyReport.status == "built",
        )
    )


def report_for(
    session: Session, clinic: Clinic, week: str | None, now: dt.datetime
) -> dict[str, Any]:
    """The stored build of `week` (default: the last complete week) or a fresh one."""
    if week is None:
        week = last_complete_week(now, ZoneInfo(clinic.timezone))
    name = week_name(parse_week(week))
    return stored(session, clinic.id, name) or build(session, clinic, name, now)


BUILD_LEASE = dt.timedelta(hours=1)  # a build queued longer ago than this was lost: queue it again


def queue_due(session: Session, now: dt.datetime) -> list[int]:
    """Adds the row of each clinic's due week (after Monday 07:00 clinic time) where there is
    none, and returns the ids to build: the rows this call added, and builds lost on the way.
    The unique (clinic, week) row makes each build happen once however many schedulers run."""
    due = {
        clinic_id: due_week(now, ZoneInfo(timezone))
        for clinic_id, timezone in session.execute(select(Clinic.id, Clinic.timezone))
    }
    if not due:
        return []
    have = set(
        session.execute(
            select(WeeklyReport.clinic_id, WeeklyReport.week).where(
                WeeklyReport.week.in_(set(due.values()))
            )
        ).all()
    )
    missing = [
        {"clinic_id": c, "week": w, "status": "queued", "queued_at": now}
        for c, w in due.items()
        if (c, w) not in have
    ]
    ids: list[int] = []
    if missing:
        dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        for row in missing:  # one clinic a week each: few rows
            added = session.scalar(
                dialect.insert(WeeklyReport)
                .values(**row)
                .on_conflict_do_nothing(index_elements=["clinic_id", "week"])
                .returning(WeeklyReport.id)
            )
            if added is not None:
                ids.append(added)
    lost = session.scalars(
        update(WeeklyReport)
        .where(WeeklyReport.status == "queued", WeeklyReport.queued_at < now - BUILD_LEASE)
        .values(queued_at=now)
        .returning(WeeklyReport.id)
    ).all()
    return ids + list(lost)


def build_stored(session: Session, report_id: int, now: dt.datetime) -> bool:
    """Builds a queued weekly report, stores it and announces it with a `report.weekly` event;
    False if it was built already (by another worker)."""
    row = session.get(WeeklyReport, report_id)
    if row is None or row.status != "queued":
        return False
    clinic = session.get(Clinic, row.clinic_id)
    assert clinic is not None
    data = build(session, clinic, row.week, now)
    done = session.execute(
        update(WeeklyReport)
        .where(WeeklyReport.id == report_id, WeeklyReport.status == "queued")
        .values(status="built", built_at=now, data=data)
        .execution_options(synchronize_session=False)
    )
    if getattr(done, "rowcount", 0) != 1:
        return False
    effect_ = data["effect"]
    events.record(
        session,
        clinic.id,
        "report.weekly",
        now,
        data={
            "week": row.week,
            "url": f"/v1/reports/weekly?week={row.week}",
            "no_show_rate": data["no_show_rate"]["value"],
            "relative_effect": effect_["relative"],
            "relative_ci95": effect_["relative_ci95"],
            "significant": effect_["significant"],
            "summary": data["summary"],
        },
    )
    return True
