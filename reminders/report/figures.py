"""The report's figures: every one a GROUP BY in the database over one clinic's appointments in
a time range; Python only turns a few dozen sums into rates and intervals."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, Integer, and_, case, cast, func, select
from sqlalchemy.orm import Session

from reminders.models import Appointment, Clinic, Reminder
from reminders.report.stats import Arm, effect, rate
from reminders.report.summary import summary
from reminders.report.weeks import (
    BASELINE_WEEKS,
    epoch,
    local_epoch,
    local_midnight,
    naive_epoch,
    parse_week,
    week_name,
)

MAX_KINDS = 10  # more kinds than this are summed as "other"
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
LEAD_TIMES = ("< 2 days", "2-7 days", "> 7 days")
REPLIES = ("confirmed", "cancelled", "no reply")


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
    ahead = (epoch(session, Appointment.starts_at) - epoch(session, Appointment.decided_at)) / 3600
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


def build(session: Session, clinic: Clinic, week: str, now: dt.datetime) -> dict[str, Any]:
    """The weekly report of `clinic` for ISO `week` (e.g. 2026-W47), as the contract's JSON."""
    monday = parse_week(week)
    zone = ZoneInfo(clinic.timezone)
    week_start, week_end = (
        local_midnight(monday, zone),
        local_midnight(monday + dt.timedelta(days=7), zone),
    )
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
            **_period(
                session, clinic.id, local_midnight(base_start, zone), local_midnight(go_live, zone)
            ),
        }
        if end_day > go_live:
            arms = _arms(session, clinic.id, local_midnight(go_live, zone), week_end)
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
    start, end = local_midnight(first, zone), local_midnight(end_day, zone)
    index = (local_epoch(session, zone, start, end) - naive_epoch(first)) // 604800
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
    start, end = local_midnight(first, zone), local_midnight(end_day, zone)
    local = local_epoch(session, zone, start, end)
    weekday = (local // 86400 + 3) % 7  # 1970-01-01 was a Thursday
    lead = epoch(session, Appointment.starts_at) - epoch(session, Appointment.booked_at)
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
