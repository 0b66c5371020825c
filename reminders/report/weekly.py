"""Stored weekly builds: queued once per clinic and week (Monday 07:00 clinic time), built by a
worker, announced with a `report.weekly` event, served by the API."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from reminders import events
from reminders.models import Clinic, WeeklyReport
from reminders.report.figures import build
from reminders.report.weeks import due_week, last_complete_week, parse_week, week_name


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
