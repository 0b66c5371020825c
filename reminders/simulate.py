"""A clinic's history with a known truth, to prove the weekly report measures what it claims.

`simulate` fills a clinic with `weeks` weeks of appointments ending with the last complete week:
weekly and seasonal swings in no-shows, lead times, patients who come often, patients who miss
often, replies, cancellations, a go-live in the middle and the clinic's holdout (drawn with the
same keyed hash as live planning). Reminders multiply a patient's no-show probability by
`1 - effect`, so the true relative effect is `effect`. Cancellations and late cancellations are
drawn apart from the no-show risk, so the rate among appointments with an outcome keeps the truth;
replies depend on the outcome (no-showers rarely confirm), as in life.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Table, func, insert, select
from sqlalchemy.orm import Session

from reminders.db import Base
from reminders.models import Appointment, Clinic, Patient, Reminder
from reminders.report import week_name
from reminders.security import in_holdout

KINDS = ("consultation", "follow-up", "vaccination", "imaging")
KIND_SHARE = (0.6, 0.25, 0.1, 0.05)
WEEKDAY_RISK = (1.15, 1.0, 0.95, 1.0, 1.1, 1.2)  # Monday to Saturday; closed on Sunday
WEEKDAY_SHARE = (0.2, 0.19, 0.18, 0.19, 0.16, 0.08)
PREFIX = "sim-"


class SimulationError(ValueError):
    pass


@dataclass(frozen=True)
class Truth:
    clinic: int
    seed: int
    weeks: int
    first_week: str
    last_week: str
    go_live: dt.date
    holdout: float
    baseline: float
    effect: float
    patients: int
    appointments: int
    reminders: int

    def as_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["go_live"] = self.go_live.isoformat()
        return data


def _lead(rng: random.Random) -> dt.timedelta:
    """How long before the start the booking was made."""
    draw = rng.random()
    if draw < 0.25:
        return dt.timedelta(hours=rng.uniform(3, 48))
    if draw < 0.7:
        return dt.timedelta(days=rng.uniform(2, 7))
    return dt.timedelta(days=rng.uniform(7, 40))


def _lead_risk(lead: dt.timedelta) -> float:
    return 0.7 if lead < dt.timedelta(days=2) else (1.0 if lead <= dt.timedelta(days=7) else 1.3)


def _phone(index: int) -> str:
    return f"+3361{index % 10_000_000:08d}"


def simulate(
    session: Session,
    clinic: Clinic,
    secret: bytes,
    now: dt.datetime,
    *,
    weeks: int = 52,
    baseline: float = 0.15,
    effect: float = 0.4,
    seed: int = 7,
    per_week: int = 150,
) -> Truth:
    """Writes the history in bulk (the caller commits); returns the ground truth."""
    if weeks < 2:
        raise SimulationError("--weeks: at least 2")
    if not 0 < baseline < 0.6:
        raise SimulationError("--baseline: a no-show rate above 0 and below 0.6")
    if not 0 <= effect < 1:
        raise SimulationError("--effect: a relative reduction from 0 to below 1")
    taken = session.scalar(
        select(func.count())
        .select_from(Patient)
        .where(Patient.clinic_id == clinic.id, Patient.external_id.startswith(PREFIX))
    )
    if taken:
        raise SimulationError(f"clinic {clinic.id} has simulated patients already")
    rng = random.Random(seed)  # noqa: S311 (a reproducible simulation, not a secret)
    zone = ZoneInfo(clinic.timezone)
    today = now.astimezone(zone).date()
    end = today - dt.timedelta(days=today.weekday())  # this week's Monday: the history ends before
    first = end - dt.timedelta(weeks=weeks)
    go_live = clinic.go_live
    if go_live is None or not first < go_live < end:
        go_live = first + dt.timedelta(weeks=weeks // 2)
        clinic.go_live = go_live

    # Patients: a few come often (Zipf-like weights); one in five misses often.
    count = max(20, weeks * per_week // 4)
    patients: list[dict[str, Any]] = [
        {
            "clinic_id": clinic.id,
            "external_id": f"{PREFIX}P{i}",
            "name": None,
            "phone_e164": _phone(i),
            "sms_capable": True,
            "language": clinic.language,
            "language_requested": clinic.language,
            "language_fallback": False,
        }
        for i in range(count)
    ]
    weights = [1 / (i + 10) for i in range(count)]
    rng.shuffle(weights)
    risk = [2.2 if rng.random() < 0.2 else 0.7 for _ in range(count)]
    session.execute(insert(_table(Patient)), patients)  # Core: no ORM objects, no RETURNING
    known: dict[str, int] = dict(
        session.execute(
            select(Patient.external_id, Patient.id).where(
                Patient.clinic_id == clinic.id, Patient.external_id.startswith(PREFIX)
            )
        ).all()
    )
    patient_ids = [known[p["external_id"]] for p in patients]
    arms = [in_holdout(secret, clinic.id, p["external_id"], clinic.holdout) for p in patients]

    appointments: list[dict[str, Any]] = []
    plans: list[list[tuple[str, dt.datetime, dt.datetime, bool, str]]] = []
    for week in range(weeks):
        monday = first + dt.timedelta(weeks=week)
        season = 1 + 0.25 * math.sin(2 * math.pi * (monday.isocalendar().week - 5) / 52)
        volume = max(1, round(per_week * (1 + 0.15 * math.cos(2 * math.pi * week / 52))))
        volume = max(1, volume + round(rng.gauss(0, math.sqrt(volume))))
        who = rng.choices(range(count), weights=weights, k=volume)
        days = rng.choices(range(6), weights=WEEKDAY_SHARE, k=volume)
        for patient, day in zip(who, days, strict=True):
            local = dt.datetime.combine(
                monday + dt.timedelta(days=day),
                dt.time(8 + rng.randrange(10), rng.choice((0, 15, 30, 45))),
                tzinfo=zone,
            )
            starts_at = local.astimezone(dt.UTC)
            lead = _lead(rng)
            booked_at = starts_at - lead
            live = local.date() >= go_live
            holdout = arms[patient] if live else None
            reminded = holdout is False
            p = baseline * risk[patient] * season * WEEKDAY_RISK[day] * _lead_risk(lead)
            p = min(0.95, p * (1 - effect) if reminded else p)
            row: dict[str, Any] = {
                "clinic_id": clinic.id,
                "external_id": f"{PREFIX}{seed}-{len(appointments)}",
                "patient_id": patient_ids[patient],
                "starts_at": starts_at,
                "duration_minutes": 20,
                "kind": rng.choices(KINDS, weights=KIND_SHARE)[0],
                "status": "booked",
                "confirmation": "unconfirmed",
                "outcome": None,
                "booked_at": booked_at,
                "decided_at": None,
                "holdout": holdout,
            }
            sends = _sends(starts_at, booked_at) if reminded else []
            if rng.random() < 0.06:  # cancelled ahead: by the patient's reply, else the clinic
                row["status"] = "cancelled"
                if sends:
                    row["confirmation"] = "cancelled_by_patient"
                    row["decided_at"] = sends[0][1] + (starts_at - sends[0][1]) * rng.random() / 2
                    sends = sends[:1]
            else:
                no_show = rng.random() < p
                late = not no_show and rng.random() < 0.03
                row["outcome"] = (
                    "no_show" if no_show else ("cancelled_late" if late else "attended")
                )
                if sends and rng.random() < (0.2 if no_show else 0.6):
                    row["confirmation"] = "confirmed"
                    row["decided_at"] = sends[0][1] + dt.timedelta(minutes=rng.uniform(1, 600))
                    sends = sends[:1]
            appointments.append(row)
            phone = _phone(patient)
            plans.append([(rule, at, starts_at, rng.random() < 0.97, phone) for rule, at in sends])
    session.execute(insert(_table(Appointment)), appointments)
    made: dict[str, int] = dict(
        session.execute(
            select(Appointment.external_id, Appointment.id).where(
                Appointment.clinic_id == clinic.id,
                Appointment.external_id.startswith(f"{PREFIX}{seed}-"),
            )
        ).all()
    )
    reminders = [
        {
            "clinic_id": clinic.id,
            "appointment_id": made[row["external_id"]],
            "phone_e164": phone,
            "kind": "reminder",
            "rule": rule,
            "appointment_starts_at": starts_at,
            "due_at": at,
            "send_by": starts_at - dt.timedelta(hours=2),
            "status": "sent" if delivered else "failed",
            "attempts": 1,
            "claimed_at": at,
            "sent_at": at,
            "segments": 1,
            "price": 0.05,
            "delivery_status": "delivered" if delivered else "failed",
            "delivered_at": at + dt.timedelta(seconds=5) if delivered else None,
        }
        for row, plan in zip(appointments, plans, strict=True)
        for rule, at, starts_at, delivered, phone in plan
    ]
    if reminders:
        session.execute(insert(_table(Reminder)), reminders)
    return Truth(
        clinic=clinic.id,
        seed=seed,
        weeks=weeks,
        first_week=week_name(first),
        last_week=week_name(end - dt.timedelta(weeks=1)),
        go_live=go_live,
        holdout=clinic.holdout,
        baseline=baseline,
        effect=effect,
        patients=count,
        appointments=len(appointments),
        reminders=len(reminders),
    )


def _table(model: type[Base]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def _sends(starts_at: dt.datetime, booked_at: dt.datetime) -> list[tuple[str, dt.datetime]]:
    """The default rules: 72 h before (or at once for a later booking), then 24 h before."""
    first = max(starts_at - dt.timedelta(hours=72), booked_at + dt.timedelta(minutes=1))
    sends = [("72h", first)]
    if starts_at - dt.timedelta(hours=24) > first:
        sends.append(("24h:unconfirmed", starts_at - dt.timedelta(hours=24)))
    return sends


@dataclass(frozen=True)
class Validation:
    seeds: int
    effect: float
    covered: int  # relative_ci95 contains the true effect
    significant: int
    undefined: int  # no interval (not enough data)
    seconds: float


def validate(
    url: str,
    seeds: int,
    effect: float,
    *,
    first_seed: int = 1,
    weeks: int = 52,
    per_week: int = 150,
    holdout: float = 0.2,
    now: dt.datetime | None = None,
) -> Validation:
    """Simulates `seeds` clinics in the database at `url` (migrated) and counts how often the
    report's relative_ci95 contains the truth, and how often it claims `significant`."""
    import time

    from sqlalchemy.orm import Session as OrmSession

    from reminders import db, report
    from reminders.clinics import ClinicOptions, create_clinic

    now = now or dt.datetime.now(dt.UTC)
    engine = db.make_engine(url)
    covered = significant = undefined = 0
    started = time.perf_counter()
    try:
        for seed in range(first_seed, first_seed + seeds):
            with OrmSession(engine) as session, session.begin():
                clinic, _ = create_clinic(
                    session,
                    ClinicOptions(
                        name=f"Simulated {seed}",
                        timezone="Europe/Paris",
                        country="FR",
                        language="fr",
                        sender="+33939000000",
                    ),
                )
                clinic.holdout = holdout
                secret = f"validation-{seed}".encode()
                truth = simulate(
                    session,
                    clinic,
                    secret,
                    now,
                    weeks=weeks,
                    effect=effect,
                    seed=seed,
                    per_week=per_week,
                )
                session.flush()
                figures = report.build(session, clinic, truth.last_week, now)["effect"]
            interval = figures["relative_ci95"]
            if interval is None:
                undefined += 1
            elif interval[0] <= effect <= interval[1]:
                covered += 1
            significant += bool(figures["significant"])
    finally:
        engine.dispose()
    return Validation(
        seeds, effect, covered, significant, undefined, round(time.perf_counter() - started, 1)
    )
