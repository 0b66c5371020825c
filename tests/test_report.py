"""Outcomes, the holdout and the weekly report: figures checked against data we know."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from reminders import actors, db, report, scheduler
from reminders.broker import WEBHOOK_QUEUE
from reminders.cli import app
from reminders.config import get_settings
from reminders.models import Appointment, Clinic, Event, Patient, Reminder, WeeklyReport
from reminders.report import render as report_render
from reminders.simulate import validate
from reminders.sms import ConsoleProvider
from tests.conftest import Cast, apply_stored_replies, appointment_body

PARIS = ZoneInfo("Europe/Paris")
GO_LIVE = dt.date(2026, 11, 2)  # a Monday: week 2026-W45
WEEK = "2026-W47"  # 16 to 22 November 2026
NOW = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)


def local(day: dt.date, hour: int = 10, minute: int = 0) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hour, minute), tzinfo=PARIS).astimezone(dt.UTC)


class Cabinet:
    """Writes appointments straight into the database, each with what the report reads."""

    def __init__(self, clinic_id: int) -> None:
        self.clinic_id = clinic_id
        self.count = 0
        self.patients: dict[str, int] = {}

    def add(
        self,
        patient: str,
        starts_at: dt.datetime,
        outcome: str | None,
        *,
        holdout: bool | None = None,
        kind: str = "consultation",
        confirmation: str = "unconfirmed",
        lead: dt.timedelta = dt.timedelta(days=4),
        decided_at: dt.datetime | None = None,
    ) -> int:
        self.count += 1
        with db.session_scope() as session:
            if patient not in self.patients:
                row = Patient(clinic_id=self.clinic_id, external_id=patient, language="fr")
                session.add(row)
                session.flush()
                self.patients[patient] = row.id
            appointment = Appointment(
                clinic_id=self.clinic_id,
                external_id=f"X{self.count}",
                patient_id=self.patients[patient],
                starts_at=starts_at,
                duration_minutes=20,
                kind=kind,
                status="cancelled" if confirmation == "cancelled_by_patient" else "booked",
                confirmation=confirmation,
                outcome=outcome,
                booked_at=starts_at - lead,
                decided_at=decided_at,
                holdout=holdout,
            )
            session.add(appointment)
            session.flush()
            return appointment.id


def set_clinic(cast: Cast, **values: Any) -> None:
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        for key, value in values.items():
            setattr(clinic, key, value)


def build(cast: Cast, week: str = WEEK, now: dt.datetime = NOW) -> dict[str, Any]:
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        return report.build(session, clinic, week, now)


# arms since go-live: (patient, [outcomes]); one patient misses often
HOLDOUT_ARM = {f"H{i}": ["attended", "no_show", "attended"] for i in range(4)} | {
    f"H{i}": ["attended", "attended", "attended"] for i in range(4, 8)
}
REMINDED_ARM = {f"R{i}": ["attended", "attended", "attended"] for i in range(10)} | {
    "R10": ["no_show", "no_show", "no_show", "attended"],
    "R11": ["attended", "cancelled_late", "attended"],
}


@pytest.fixture
def known(cast: Cast) -> Cabinet:
    """Baseline: 10 appointments with 3 no-shows. Since go-live: two arms we can count."""
    set_clinic(cast, go_live=GO_LIVE, holdout=0.3)
    cabinet = Cabinet(cast.clinic_id)
    baseline = ["no_show"] * 3 + ["attended"] * 6 + ["cancelled_late"]
    for i, outcome in enumerate(baseline):
        cabinet.add(f"B{i % 4}", local(dt.date(2026, 9, 1) + dt.timedelta(days=i)), outcome)
    cabinet.add("B0", local(dt.date(2026, 7, 1)), "no_show")  # older than 12 weeks: not baseline
    for arm, holdout in ((HOLDOUT_ARM, True), (REMINDED_ARM, False)):
        for patient, outcomes in arm.items():
            for j, outcome in enumerate(outcomes):
                day = GO_LIVE + dt.timedelta(days=1 + 5 * j + len(patient))
                cabinet.add(patient, local(day), outcome, holdout=holdout)
    return cabinet


def test_the_report_counts_baseline_arms_and_effect_from_known_data(
    cast: Cast, known: Cabinet
) -> None:
    r = build(cast)
    assert r["week"] == WEEK
    assert (r["from"], r["to"]) == ("2026-11-16", "2026-11-22")
    base = r["baseline"]
    assert (base["from"], base["to"]) == ("2026-08-10", "2026-11-01")
    assert (base["appointments"], base["no_show"], base["cancelled_late"]) == (10, 3, 1)
    assert base["no_show_rate"]["value"] == 0.3
    assert base["no_show_rate"]["n"] == 10
    low, high = base["no_show_rate"]["ci95"]
    assert 0.10 < low < 0.3 < high < 0.61  # Wilson: 0.108 to 0.603
    holdout, reminded = r["holdout"], r["reminded"]
    assert (holdout["patients"], holdout["with_outcome"], holdout["no_show"]) == (8, 24, 4)
    assert (reminded["patients"], reminded["with_outcome"], reminded["no_show"]) == (12, 37, 3)
    effect = r["effect"]
    assert effect["difference"] == round(3 / 37 - 4 / 24, 4)
    assert effect["relative"] == round(1 - (3 / 37) / (4 / 24), 4)
    assert effect["significant"] is False  # 24 and 37 appointments prove nothing


def _cluster_variance(arm: dict[str, list[str]]) -> tuple[float, float]:
    """The ratio and its cluster-robust variance, computed the long way."""
    n = [len(o) for o in arm.values()]
    y = [o.count("no_show") for o in arm.values()]
    ratio = sum(y) / sum(n)
    g = len(n)
    spread = sum((yi - ratio * ni) ** 2 for yi, ni in zip(y, n, strict=True))
    return ratio, g / (g - 1) * spread / sum(n) ** 2


def test_the_effect_interval_counts_patients_not_appointments(cast: Cast, known: Cabinet) -> None:
    r1, v1 = _cluster_variance(REMINDED_ARM)
    r0, v0 = _cluster_variance(HOLDOUT_ARM)
    half = 1.959964 * math.sqrt(v1 + v0)
    effect = build(cast)["effect"]
    assert effect["ci95"] == pytest.approx([r1 - r0 - half, r1 - r0 + half], abs=1e-4)
    spread = 1.959964 * math.sqrt(v1 / r1**2 + v0 / r0**2)
    expected = [1 - r1 / r0 * math.exp(spread), 1 - r1 / r0 * math.exp(-spread)]
    assert effect["relative_ci95"] == pytest.approx(expected, abs=1e-4)
    # R10 missed three times: as one patient the interval is wider than for 37 independent
    # appointments (the binomial standard error).
    naive = math.sqrt(r1 * (1 - r1) / 37)
    assert math.sqrt(v1) > naive


def test_weeks_and_weekdays_follow_the_clinic_clock_across_dst(cast: Cast) -> None:
    set_clinic(cast, go_live=GO_LIVE)
    cabinet = Cabinet(cast.clinic_id)
    # 00:15 on Monday 16 November in Paris is still Sunday 15 November in UTC.
    early = local(dt.date(2026, 11, 16), 0, 15)
    assert early.date() == dt.date(2026, 11, 15)
    cabinet.add("P1", early, "no_show", holdout=False)
    # Monday 26 October, the day after clocks went back: 00:30 Paris is 23:30 UTC on Sunday.
    cabinet.add("P2", local(dt.date(2026, 10, 26), 0, 30), "attended")
    # 23:30 on Sunday 22 November belongs to W47; 00:10 on Monday 23 November does not.
    cabinet.add("P3", local(dt.date(2026, 11, 22), 23, 30), "attended", holdout=True)
    cabinet.add("P4", local(dt.date(2026, 11, 23), 0, 10), "no_show", holdout=True)
    r = build(cast)
    assert (r["appointments"], r["no_show"], r["attended"]) == (2, 1, 1)
    weekdays = {g["key"]: g["appointments"] for g in r["by_weekday"]}
    assert weekdays["Monday"] == 1
    assert weekdays["Sunday"] == 1
    assert sum(weekdays.values()) == 2  # 26 October is before go-live: not in the window
    series = {w["week"]: w for w in r["series"]}
    assert series["2026-W44"]["appointments"] == 1
    assert series["2026-W47"]["appointments"] == 2
    assert r["series"][0]["week"] == "2026-W33"  # 12 weeks before the go-live week
    assert r["series"][-1]["week"] == WEEK
    assert [w["live"] for w in r["series"]].index(True) == 12


def test_breakdowns_by_kind_lead_time_and_reply(cast: Cast) -> None:
    set_clinic(cast, go_live=GO_LIVE, holdout=0.2)
    cabinet = Cabinet(cast.clinic_id)
    day = local(dt.date(2026, 11, 18))
    cabinet.add("P1", day, "no_show", kind="imaging", lead=dt.timedelta(hours=20), holdout=True)
    cabinet.add("P2", day, "attended", kind="imaging", lead=dt.timedelta(days=3), holdout=False)
    cabinet.add(
        "P3",
        day,
        "attended",
        kind="vaccination",
        lead=dt.timedelta(days=30),
        confirmation="confirmed",
        holdout=False,
    )
    cabinet.add(
        "P4",
        day,
        None,
        lead=dt.timedelta(days=10),
        confirmation="cancelled_by_patient",
        decided_at=day - dt.timedelta(hours=30),
        holdout=False,
    )
    r = build(cast)
    kinds = {g["key"]: g for g in r["by_kind"]}
    assert kinds["imaging"]["appointments"] == 2
    assert kinds["imaging"]["no_show_rate"]["value"] == 0.5
    assert kinds["imaging"]["holdout"]["value"] == 1.0
    assert kinds["imaging"]["reminded"]["value"] == 0.0
    leads = {g["key"]: g["appointments"] for g in r["by_lead_time"]}
    assert leads == {"< 2 days": 1, "2-7 days": 1, "> 7 days": 2}
    replies = {g["key"]: g["appointments"] for g in r["by_reply"]}
    assert replies == {"confirmed": 1, "cancelled": 1, "no reply": 2}
    assert r["slots_freed"] == {
        "count": 1,
        "mean_hours_ahead": 30.0,
        "ahead": {"< 1 day": 0, "1-3 days": 1, "> 3 days": 0},
    }
    assert (r["confirmed"], r["cancelled_by_patient"]) == (1, 1)


def test_sms_figures_count_what_was_sent_in_the_week(cast: Cast) -> None:
    cabinet = Cabinet(cast.clinic_id)
    appointment = cabinet.add("P1", local(dt.date(2026, 11, 20)), "attended", holdout=False)
    sent_at = local(dt.date(2026, 11, 17), 10)
    rows = [
        ("sent", "delivered", sent_at, 1, 0.05),
        ("sent", "delivered", sent_at, 2, 0.10),
        ("failed", "failed", sent_at, 1, 0.05),
        ("sent", "delivered", local(dt.date(2026, 11, 10)), 1, 0.05),  # another week
        ("failed", None, None, None, None),  # refused before it went out, this week
    ]
    with db.session_scope() as session:
        for i, (status, delivery, at, segments, price) in enumerate(rows):
            session.add(
                Reminder(
                    clinic_id=cast.clinic_id,
                    appointment_id=appointment,
                    phone_e164="+33612345678",
                    kind="reminder",
                    rule=f"r{i}",
                    due_at=at or sent_at,
                    send_by=sent_at + dt.timedelta(days=2),
                    status=status,
                    attempts=1,
                    claimed_at=at or sent_at,
                    sent_at=at,
                    delivery_status=delivery,
                    segments=segments,
                    price=price,
                )
            )
    sms = build(cast)["sms"]
    assert sms == {"sent": 3, "delivered": 2, "failed": 2, "segments": 4, "cost": 0.2}


# --- bad input and thin data ----------------------------------------------------------------------


def test_a_week_without_data_says_so_without_dividing_by_zero(cast: Cast) -> None:
    set_clinic(cast, go_live=GO_LIVE, holdout=0.1)
    r = build(cast)
    assert r["no_show_rate"] == {"value": None, "ci95": None, "n": 0}
    assert r["effect"]["difference"] is None
    assert r["effect"]["significant"] is False
    assert "not enough data" in r["effect"]["note"]
    assert r["summary"][0].startswith("Not enough data for 2026-W47")
    assert any("Not enough data yet to measure the effect" in line for line in r["summary"])
    assert "<svg" in report_render.render(r, "html")
    assert report_render.render(r, "csv").startswith("section,key,value,low,high\n")


def test_a_clinic_without_go_live_gets_a_report_without_comparison(
    cast: Cast, known: Cabinet
) -> None:
    set_clinic(cast, go_live=None)
    r = build(cast)
    assert r["baseline"] is None
    assert r["effect"]["difference"] is None
    assert r["holdout"]["from"] is None
    assert len(r["series"]) == 12
    assert not any(w["live"] for w in r["series"])
    assert any("No go-live date is set" in line for line in r["summary"])


def test_no_holdout_says_the_effect_cannot_be_measured(cast: Cast) -> None:
    set_clinic(cast, go_live=GO_LIVE, holdout=0.0)
    cabinet = Cabinet(cast.clinic_id)
    for i in range(30):
        cabinet.add(f"P{i}", local(dt.date(2026, 11, 17)), "attended", holdout=False)
    r = build(cast)
    assert r["effect"]["difference"] is None
    assert any("No patients are held out" in line for line in r["summary"])


def test_everyone_held_out_leaves_the_reminded_arm_empty(cast: Cast) -> None:
    set_clinic(cast, go_live=GO_LIVE, holdout=0.99)
    cabinet = Cabinet(cast.clinic_id)
    for i in range(30):
        cabinet.add(f"P{i}", local(dt.date(2026, 11, 17)), "no_show", holdout=True)
    r = build(cast)
    assert r["reminded"]["no_show_rate"]["n"] == 0
    assert r["holdout"]["no_show_rate"]["value"] == 1.0
    assert r["effect"]["relative"] is None
    assert "reminded 0" in r["effect"]["note"]


def test_one_patient_is_not_an_arm(cast: Cast) -> None:
    set_clinic(cast, go_live=GO_LIVE, holdout=0.5)
    cabinet = Cabinet(cast.clinic_id)
    for i in range(25):
        day = local(GO_LIVE + dt.timedelta(days=i % 20))
        cabinet.add("H1", day, "no_show" if i % 3 else "attended", holdout=True)
        cabinet.add(f"R{i}", day, "attended", holdout=False)
    r = build(cast)
    assert r["effect"]["difference"] is None
    json.dumps(r, allow_nan=False)  # no NaN anywhere


def test_a_week_before_go_live_breaks_down_the_last_twelve_weeks(cast: Cast) -> None:
    set_clinic(cast, go_live=dt.date(2027, 1, 4), holdout=0.1)
    Cabinet(cast.clinic_id).add("P1", local(dt.date(2026, 11, 3)), "no_show")
    r = build(cast)
    assert r["breakdown_window"] == {"from": "2026-08-31", "to": "2026-11-22"}
    assert sum(g["appointments"] for g in r["by_kind"]) == 1
    assert r["holdout"]["from"] is None
    assert not any(w["live"] for w in r["series"])


def test_no_no_show_in_either_arm_gives_no_relative_effect(cast: Cast) -> None:
    set_clinic(cast, go_live=GO_LIVE, holdout=0.5)
    cabinet = Cabinet(cast.clinic_id)
    for i in range(40):
        cabinet.add(f"P{i}", local(dt.date(2026, 11, 17)), "attended", holdout=i % 2 == 0)
    effect = build(cast)["effect"]
    assert effect["difference"] == 0.0
    assert effect["relative"] is None
    assert effect["significant"] is False


@pytest.mark.parametrize(
    ("week", "reason"),
    [
        ("2026-W54", "2026 has weeks 1 to 53, not 54"),
        ("2025-W53", "2025 has weeks 1 to 52, not 53"),
        ("2026-W00", "not 0"),
        ("2026-47", "is not an ISO week like 2026-W47"),
        ("", "is not an ISO week"),
    ],
)
def test_impossible_weeks_are_refused(week: str, reason: str) -> None:
    with pytest.raises(report.ReportError, match=re.escape(reason)) as caught:
        report.parse_week(week)
    assert caught.value.field == "week"


def test_week_53_exists_in_long_years() -> None:
    assert report.parse_week("2026-W53") == dt.date(2026, 12, 28)


# --- outcomes through the API ---------------------------------------------------------------------


def test_an_outcome_is_recorded_once_the_appointment_started(
    client: TestClient, cast: Cast
) -> None:
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).isoformat()
    assert (
        client.put(
            "/v1/appointments/A1", json=appointment_body(starts_at=past), headers=cast.auth
        ).status_code
        == 201
    )
    path = "/v1/appointments/A1/outcome"
    first = client.post(path, json={"outcome": "no_show"}, headers=cast.auth)
    assert first.status_code == 200
    assert (first.json()["result"], first.json()["outcome"]) == ("updated", "no_show")
    again = client.post(path, json={"outcome": "no_show"}, headers=cast.auth)
    assert (again.json()["result"], again.json()["outcome"]) == ("unchanged", "no_show")
    corrected = client.post(path, json={"outcome": "attended"}, headers=cast.auth)
    assert (corrected.json()["result"], corrected.json()["outcome"]) == ("updated", "attended")
    # The clinic pushing the same body again does not undo it.
    client.put("/v1/appointments/A1", json=appointment_body(starts_at=past), headers=cast.auth)
    assert client.get("/v1/appointments/A1", headers=cast.auth).json()["outcome"] == "attended"


def test_an_outcome_for_a_future_or_unknown_appointment_is_refused(
    client: TestClient, cast: Cast
) -> None:
    client.put("/v1/appointments/A1", json=appointment_body(), headers=cast.auth)
    future = client.post(
        "/v1/appointments/A1/outcome", json={"outcome": "attended"}, headers=cast.auth
    )
    assert future.status_code == 422
    assert future.headers["content-type"] == "application/problem+json"
    assert future.json()["errors"][0]["field"] == "outcome"
    assert "once the appointment has started" in future.json()["errors"][0]["reason"]
    unknown = client.post(
        "/v1/appointments/NOPE/outcome", json={"outcome": "attended"}, headers=cast.auth
    )
    assert unknown.status_code == 404
    other = client.post(
        "/v1/appointments/A1/outcome", json={"outcome": "attended"}, headers=cast.other_auth
    )
    assert other.status_code == 404
    bad = client.post("/v1/appointments/A1/outcome", json={"outcome": "late"}, headers=cast.auth)
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "outcome"
    assert (
        client.post("/v1/appointments/A1/outcome", json={"outcome": "no_show"}).status_code == 401
    )


def test_past_appointments_pushed_before_go_live_form_the_baseline(
    client: TestClient, cast: Cast
) -> None:
    today = dt.datetime.now(PARIS).date()
    monday = today - dt.timedelta(days=today.weekday())
    set_clinic(cast, go_live=monday, holdout=0.5)
    items = [
        appointment_body(
            external_id=f"OLD{i}",
            starts_at=local(monday - dt.timedelta(days=3 + 7 * (i % 10))).isoformat(),
            outcome="no_show" if i % 4 == 0 else "attended",
            patient={"external_id": f"P{i}", "phone": "06 12 34 56 78"},
        )
        for i in range(20)
    ]
    answer = client.post("/v1/appointments/batch", json={"appointments": items}, headers=cast.auth)
    assert {r["result"] for r in answer.json()["results"]} == {"created"}
    with db.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Reminder)) == 0
        arms = set(session.scalars(select(Appointment.holdout)))
    assert arms == {None}  # no arm: nobody was going to be reminded
    week = report.week_name(monday - dt.timedelta(days=7))
    body = client.get(f"/v1/reports/weekly?week={week}", headers=cast.auth).json()
    assert body["baseline"]["no_show_rate"] == {**body["baseline"]["no_show_rate"], "n": 20}
    assert body["baseline"]["no_show"] == 5


def test_holdout_patients_who_write_in_still_get_an_answer(client: TestClient, cast: Cast) -> None:
    set_clinic(cast, holdout=0.999999)
    client.put("/v1/appointments/A1", json=appointment_body(), headers=cast.auth)
    with db.session_scope() as session:
        appointment = session.scalars(select(Appointment)).one()
        assert appointment.holdout is True
        assert session.scalar(select(func.count()).select_from(Reminder)) == 0
    params = {
        "msisdn": "33612345678",
        "to": "33939000000",
        "text": "1",
        "messageId": "in-1",
        "message-timestamp": "2026-11-22 10:00:00",
    }
    assert client.post("/webhooks/vonage/inbound", data=params).status_code == 200
    apply_stored_replies()
    with db.session_scope() as session:
        answers = list(session.scalars(select(Reminder.kind)))
        kinds = list(session.scalars(select(Event.type)))
    assert answers == ["unclear"]  # "we will get back to you"
    assert kinds == ["reply.needs_attention"]


# --- the report endpoint, the Monday build --------------------------------------------------------


def test_the_report_endpoint_serves_json_and_refuses_bad_weeks(
    client: TestClient, cast: Cast
) -> None:
    answer = client.get(f"/v1/reports/weekly?week={WEEK}", headers=cast.auth)
    assert answer.status_code == 200
    body = answer.json()
    for key in (
        "clinic", "week", "appointments", "attended", "no_show", "cancelled_late",
        "no_show_rate", "baseline", "holdout", "reminded", "effect", "confirmed",
        "cancelled_by_patient", "slots_freed", "sms", "series", "by_kind", "by_weekday",
        "by_lead_time", "by_reply", "summary",
    ):  # fmt: skip
        assert key in body
    assert body["clinic"] == cast.clinic_id
    bad = client.get("/v1/reports/weekly?week=2026-W54", headers=cast.auth)
    assert bad.status_code == 422
    assert bad.json()["errors"] == [{"field": "week", "reason": "2026 has weeks 1 to 53, not 54"}]
    assert client.get(f"/v1/reports/weekly?week={WEEK}").status_code == 401
    default = client.get("/v1/reports/weekly", headers=cast.auth).json()
    assert default["week"] == report.last_complete_week(dt.datetime.now(dt.UTC), PARIS)


def test_the_monday_build_happens_once_and_is_served_and_announced(
    client: TestClient, cast: Cast, known: Cabinet
) -> None:
    sunday_night = dt.datetime(2026, 11, 23, 5, 59, tzinfo=dt.UTC)  # 06:59 in Paris
    with db.session_scope() as session:
        ids = report.queue_due(session, sunday_night)
        queued = session.scalars(select(WeeklyReport.week)).all()
    assert all(w != WEEK for w in queued)  # Paris is not due yet; London is a week earlier
    at_seven = dt.datetime(2026, 11, 23, 6, 0, tzinfo=dt.UTC)
    with db.session_scope() as session:
        ids = report.queue_due(session, at_seven)
    with db.session_scope() as session:  # a second scheduler at the same moment
        assert report.queue_due(session, at_seven) == []
    with db.session_scope() as session:
        rows = session.execute(select(WeeklyReport.clinic_id, WeeklyReport.week)).all()
    assert (cast.clinic_id, WEEK) in rows
    assert len(rows) == len(set(rows))
    paris = [i for i in ids if i in _ids_of(cast.clinic_id)]
    assert len(paris) == 1
    with db.session_scope() as session:
        assert report.build_stored(session, paris[0], at_seven) is True
    with db.session_scope() as session:
        assert report.build_stored(session, paris[0], at_seven) is False  # built already
        events = session.scalars(select(Event).where(Event.type == "report.weekly")).all()
    assert len(events) == 1
    assert events[0].data["week"] == WEEK
    assert events[0].data["url"] == f"/v1/reports/weekly?week={WEEK}"
    # The stored build is what the API serves, even after newer outcomes.
    known.add("late", local(dt.date(2026, 11, 18)), "no_show", holdout=True)
    served = client.get(f"/v1/reports/weekly?week={WEEK}", headers=cast.auth).json()
    assert served["generated_at"] == "2026-11-23T06:00:00Z"
    assert served["holdout"]["with_outcome"] == 24


def _ids_of(clinic_id: int) -> set[int]:
    with db.session_scope() as session:
        return set(
            session.scalars(select(WeeklyReport.id).where(WeeklyReport.clinic_id == clinic_id))
        )


def test_a_lost_build_is_queued_again_after_an_hour(cast: Cast) -> None:
    at_seven = dt.datetime(2026, 11, 23, 6, 0, tzinfo=dt.UTC)
    with db.session_scope() as session:
        first = report.queue_due(session, at_seven)
    with db.session_scope() as session:
        assert report.queue_due(session, at_seven + dt.timedelta(minutes=30)) == []
    with db.session_scope() as session:
        later = report.queue_due(session, at_seven + dt.timedelta(hours=2))
    assert set(first) <= set(later)  # London's (due at 07:00 UTC) is new
    assert len(later) == len(first) + 1


# --- formats and commands -------------------------------------------------------------------------


runner = CliRunner()


def invoke(*args: str) -> Any:
    db.reset()
    return runner.invoke(app, list(args))


def test_simulate_then_report_in_every_format(cast: Cast, tmp_path: Path) -> None:
    set_clinic(cast, holdout=0.2)
    made = invoke("simulate", "--clinic", str(cast.clinic_id), "--weeks", "30", "--json")
    assert made.exit_code == 0, made.stderr
    truth = json.loads(made.stdout)
    assert truth["effect"] == 0.4
    assert truth["appointments"] > 3000
    week = truth["last_week"]
    html = tmp_path / "r.html"
    done = invoke("report", "--clinic", str(cast.clinic_id), "--week", week, "--out", str(html))
    assert done.exit_code == 0, done.stderr
    page = html.read_text()
    assert page.count("<svg") == 5  # the series and four breakdowns
    assert "reminders start" in page
    assert not re.search(r"<(script|link|img)\b", page)  # self-contained
    assert not re.search(r"(src|href)=\"https?:", page)
    as_json = invoke("report", "--clinic", str(cast.clinic_id), "--week", week, "--json")
    data = json.loads(as_json.stdout)
    assert data["effect"]["significant"] is True
    low, high = data["effect"]["relative_ci95"]
    assert low < 0.4 < high
    as_csv = invoke("report", "--clinic", str(cast.clinic_id), "--week", week, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    relative = next(r for r in rows if (r["section"], r["key"]) == ("effect", "relative"))
    assert float(relative["low"]) == low
    assert float(relative["high"]) == high
    monday = next(r for r in rows if (r["section"], r["key"]) == ("by_weekday", "Monday.reminded"))
    assert float(monday["low"]) < float(monday["value"]) < float(monday["high"])
    again = invoke("simulate", "--clinic", str(cast.clinic_id))
    assert again.exit_code == 2
    assert "has simulated patients already" in again.stderr


def test_report_command_refuses_bad_input_with_one_line(cast: Cast) -> None:
    bad_week = invoke("report", "--clinic", str(cast.clinic_id), "--week", "2026-W54")
    assert (bad_week.exit_code, bad_week.stderr) == (
        2,
        "reminders: --week: 2026 has weeks 1 to 53, not 54\n",
    )
    bad_format = invoke("report", "--clinic", str(cast.clinic_id), "--format", "pdf")
    assert bad_format.exit_code == 2
    assert "--format" in bad_format.stderr
    unknown = invoke("report", "--clinic", "999", "--week", WEEK)
    assert unknown.exit_code == 2
    bad_effect = invoke("simulate", "--clinic", str(cast.clinic_id), "--effect", "1.5")
    assert bad_effect.exit_code == 2
    assert "--effect" in bad_effect.stderr


# --- the simulator proves the interval ------------------------------------------------------------


def test_ten_simulated_clinics_cover_the_true_effect(tmp_path: Path) -> None:
    """The fast version of `make validate-report` (100 seeds each)."""
    url = f"sqlite:///{tmp_path / 'v.db'}"
    engine = db.make_engine(url)
    db.migrate(engine)
    engine.dispose()
    real = validate(url, 10, 0.4, weeks=40, per_week=120, now=NOW)
    assert real.covered >= 9
    assert real.significant >= 7  # and the effect is found
    null = validate(url, 10, 0.0, first_seed=11, weeks=40, per_week=120, now=NOW)
    assert null.significant <= 1
    assert null.covered >= 9


def test_the_scheduler_job_queues_each_build_to_a_worker_once(cast: Cast, known: Cabinet) -> None:
    at_seven = dt.datetime(2026, 11, 23, 6, 0, tzinfo=dt.UTC)  # Monday 07:00 in Paris
    broker = StubBroker()
    actors.configure(
        get_settings(), clock=lambda: at_seven, provider=ConsoleProvider(), broker=broker
    )
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        first = scheduler.queue_reports(lambda: at_seven)
        second = scheduler.queue_reports(lambda: at_seven)  # another scheduler, same minute
        broker.join(WEBHOOK_QUEUE, fail_fast=True)
        worker.join()
    finally:
        worker.stop()
    assert len(first) == 2  # Paris (W47) and London (W46: not 07:00 there yet)
    assert second == []
    with db.session_scope() as session:
        built = session.execute(
            select(WeeklyReport.clinic_id, WeeklyReport.week, WeeklyReport.status)
        ).all()
        announced = session.scalars(select(Event.clinic_id).where(Event.type == "report.weekly"))
        assert sorted(announced) == sorted([cast.clinic_id, cast.other_clinic_id])
    assert (cast.clinic_id, WEEK, "built") in built
    assert (cast.other_clinic_id, "2026-W46", "built") in built
