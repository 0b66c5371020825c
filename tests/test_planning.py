"""Planning reminder rows as appointments arrive, move and are cancelled (`now` is passed in)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest
from sqlalchemy import delete, event, select, text

from reminders import db, planning
from reminders.clinics import ClinicOptions, create_clinic
from reminders.models import Appointment, Clinic, Patient, Reminder
from reminders.planning import Intake
from reminders.schemas import AppointmentIn, BatchItem
from tests.conftest import TEST_SECRET, Cast

NOW = dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.UTC)


def body(starts_at: str = "2026-11-12T09:30:00+01:00", **overrides: Any) -> AppointmentIn:
    data: dict[str, Any] = {
        "starts_at": starts_at,
        "duration_minutes": 20,
        "patient": {"external_id": "P1", "phone": "06 12 34 56 78", "language": "fr"},
    }
    data.update(overrides)
    return AppointmentIn.model_validate(data)


def push(cast: Cast, external_id: str, data: AppointmentIn, now: dt.datetime = NOW) -> list[Any]:
    """Upserts in its own transaction; returns (rule, kind, status, skip_reason) per row."""
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        appointment, _ = Intake(session, clinic, now, TEST_SECRET.encode()).put(external_id, data)
        session.flush()
        return [(r.rule, r.kind, r.status, r.skip_reason) for r in appointment.reminders]


def push_batch(cast: Cast, items: list[tuple[str, AppointmentIn]]) -> list[Any]:
    """The items as one batch (as POST /v1/appointments/batch sends them); their results."""
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        batch = [
            BatchItem.model_validate({**data.model_dump(), "external_id": external_id})
            for external_id, data in items
        ]
        return list(Intake(session, clinic, NOW, TEST_SECRET.encode()).batch(batch))


def stored(external_id: str) -> Appointment:
    with db.session_scope() as session:
        found = session.scalars(select(Appointment).where(Appointment.external_id == external_id))
        return found.one()


def test_a_booking_plans_its_rules(cast: Cast) -> None:
    assert push(cast, "A1", body()) == [
        ("72h", "reminder", "planned", None),
        ("24h:unconfirmed", "reminder", "planned", None),
    ]


def test_a_landline_a_missing_phone_and_a_past_appointment_plan_nothing(cast: Cast) -> None:
    landline = {"external_id": "P2", "phone": "01 42 68 53 00"}
    assert push(cast, "A1", body(patient=landline)) == []
    assert push(cast, "A2", body(patient={"external_id": "P3"})) == []
    assert push(cast, "A3", body("2026-10-01T09:30:00+02:00")) == []


def test_a_cancelled_booking_skips_its_rows_and_a_rebooking_restores_them(cast: Cast) -> None:
    push(cast, "A1", body())
    assert {r[2:] for r in push(cast, "A1", body(status="cancelled"))} == {("skipped", "cancelled")}
    assert {r[2:] for r in push(cast, "A1", body(status="booked"))} == {("planned", None)}


def test_a_move_after_a_reminder_went_out_plans_one_moved_sms(cast: Cast) -> None:
    push(cast, "A1", body())
    with db.session_scope() as session:
        first = stored("A1")
        row = session.merge(first).reminders[0]
        row.status, row.sent_at = "sent", NOW
    later = NOW + dt.timedelta(days=7)  # 72h reminder went out; now the appointment moves
    rows = push(cast, "A1", body("2026-11-20T15:00:00+01:00"), now=later)
    assert rows == [
        ("72h", "reminder", "sent", None),
        ("24h:unconfirmed", "reminder", "skipped", "moved"),
        ("moved", "moved", "planned", None),
        ("72h", "reminder", "planned", None),
        ("24h:unconfirmed", "reminder", "planned", None),
    ]


def test_a_move_before_any_reminder_just_replans(cast: Cast) -> None:
    push(cast, "A1", body())
    rows = push(cast, "A1", body("2026-11-20T15:00:00+01:00"))
    assert [r for r in rows if r[2] == "planned"] == [
        ("72h", "reminder", "planned", None),
        ("24h:unconfirmed", "reminder", "planned", None),
    ]


def test_a_patient_who_gets_a_mobile_later_is_planned_then(cast: Cast) -> None:
    assert push(cast, "A1", body(patient={"external_id": "P1"})) == []
    later = dt.datetime(2026, 11, 11, 9, 0, tzinfo=dt.UTC)  # 24.5 h before: a late booking now
    assert push(cast, "A1", body(), now=later) == [("late", "late", "planned", None)]


def test_every_row_of_an_appointment_shares_one_link_token(cast: Cast) -> None:
    push(cast, "A1", body())
    push(cast, "A2", body(patient={"external_id": "P2", "phone": "07 81 23 45 67"}))
    first, second = stored("A1"), stored("A2")
    assert first.link_token is not None
    assert second.link_token is not None
    assert len(first.link_token) == 12
    assert first.link_token != second.link_token


def test_holdout_patients_get_no_rows_and_keep_their_arm(cast: Cast) -> None:
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        clinic.holdout = 0.5
    arms = {}
    for i in range(40):
        patient = {"external_id": f"P{i}", "phone": "06 12 34 56 78"}
        rows = push(cast, f"A{i}", body(patient=patient))
        arms[i] = stored(f"A{i}").holdout
        assert (rows == []) is arms[i]
    assert 8 <= sum(bool(v) for v in arms.values()) <= 32  # a fair coin, not a constant
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        clinic.holdout = 0.0
    # Same patient, new appointment: same arm while the share is unchanged...
    # ...and an appointment already assigned never changes arm.
    push(cast, "A0", body(location="Elsewhere"))
    assert stored("A0").holdout == arms[0]


def _rows() -> list[tuple[Any, ...]]:
    """Every stored column of the appointments, their patients and reminders but the row ids."""
    with db.session_scope() as session:
        found = session.scalars(select(Appointment).order_by(Appointment.external_id)).all()
        rows = []
        for a in found:
            p = a.patient
            assert a.created_at is not None
            assert p.created_at is not None
            rows.append(
                (
                    (a.clinic_id, a.external_id, a.starts_at, a.duration_minutes, a.practitioner),
                    (a.location, a.kind, a.status, a.confirmation, a.outcome, a.source_updated_at),
                    (a.booked_at, a.decided_at, a.holdout, a.link_token, a.content_hash),
                    (p.clinic_id, p.external_id, p.name, p.phone_e164, p.sms_capable),
                    (p.language_requested, p.language, p.language_fallback),
                    sorted(
                        (
                            *(r.clinic_id, r.rule, r.kind, r.phone_e164, r.appointment_starts_at),
                            *(r.due_at, r.send_by, r.status, r.skip_reason, r.attempts),
                        )
                        for r in a.reminders
                    ),
                )
            )
        return rows


@pytest.mark.parametrize("count", [12, 60])
def test_a_batch_stores_what_single_pushes_store(
    cast: Cast, count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New rows are written in bulk (on PostgreSQL: a few in one pipelined round trip, more than
    20 by COPY): the same rows as pushed one by one through plain INSERTs, server defaults
    included."""
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        clinic.holdout = 0.3
    variants: list[dict[str, Any]] = [
        {},
        {"status": "cancelled"},
        {"starts_at": "2026-10-01T09:30:00+02:00", "outcome": "attended"},
        {"starts_at": "2026-11-02T23:30:00+01:00"},  # a late booking inside the windows
        {"practitioner": 'Dr "Jo" Roux', "location": "Cabinet\t2\\3", "kind": "suivi"},
        {"source_updated_at": "2026-11-01T08:00:00Z"},
    ]
    patients: list[dict[str, Any]] = [
        {"phone": "06 12 34 56 78", "language": "fr", "name": "Zoé Noël"},
        {"phone": "01 42 68 53 00"},  # a landline
        {"language": "de"},  # no phone; a language without texts
        {"phone": "+44 7911 123456", "language": "en-GB"},
    ]
    items = [
        (
            f"A{i:02d}",
            body(patient={"external_id": f"P{i % 9}", **patients[i % 4]}, **variants[i % 6]),
        )
        for i in range(count)
    ]
    results = push_batch(cast, items)
    assert [getattr(r, "result", r) for r in results] == ["created"] * count
    in_bulk = _rows()
    assert sum(len(row[-1]) for row in in_bulk) > count / 3  # reminders
    with db.session_scope() as session:
        for model in (Reminder, Appointment, Patient):
            session.execute(delete(model))
    monkeypatch.setattr(planning, "_SMALL_BATCH", 0)  # no pipelined round trip...
    monkeypatch.setattr(planning, "_COPY_FROM", 10**9)  # ...and no COPY: INSERT ... RETURNING
    for external_id, data in items:
        push(cast, external_id, data)
    assert _rows() == in_bulk


@pytest.mark.parametrize("filler", [0, 30])
def test_known_patients_in_a_batch_are_read_as_rows_and_changed_like_single_pushes(
    cast: Cast, filler: int
) -> None:
    """A batch reads its known patients as plain rows and loads one as an object only to change
    it: an unchanged patient, a changed one booked twice, one that an updated appointment
    brings along and a later item renames: the same rows as single pushes in the same order
    (with `filler` new appointments, the batch writes by COPY)."""
    p1 = {"external_id": "P1", "phone": "06 12 34 56 78", "language": "fr", "name": "Léa"}
    p2 = {"external_id": "P2", "phone": "06 98 76 54 32"}
    setup = [("A1", body(patient=p1)), ("A2", body(patient=p2))]
    items = [
        ("A3", body(patient=p1)),
        ("A4", body(patient={**p2, "phone": "07 81 22 33 44"})),
        ("A5", body(patient={**p2, "phone": "07 81 22 33 44"})),
        ("A1", body(patient=p1, location="Salle 4")),
        ("A6", body(patient={**p1, "name": "Léa M."})),
        ("A7", body(patient={**p2, "phone": "01 42 68 53 00"})),  # a landline: no reminders
        *[(f"F{i:02d}", body(patient={"external_id": f"Q{i}"})) for i in range(filler)],
    ]
    for external_id, data in setup:
        push(cast, external_id, data)
    results = push_batch(cast, items)
    assert [getattr(r, "result", r) for r in results] == ["created"] * 3 + ["updated"] + [
        "created"
    ] * (2 + filler)
    in_batch = _rows()
    with db.session_scope() as session:
        for model in (Reminder, Appointment, Patient):
            session.execute(delete(model))
    for external_id, data in setup + items:
        push(cast, external_id, data)
    assert _rows() == in_batch
    assert stored("A6").patient.name == "Léa M."
    assert stored("A4").patient.phone_e164 == "+33142685300"


def test_new_appointments_of_unchanged_known_patients_load_no_patient_object(cast: Cast) -> None:
    p1 = {"external_id": "P1", "phone": "06 12 34 56 78", "language": "fr"}
    p2 = {"external_id": "P2", "phone": "06 98 76 54 32"}
    push(cast, "A1", body(patient=p1))
    push(cast, "A2", body(patient=p2))
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        batch = [
            BatchItem.model_validate({**body(patient=p).model_dump(), "external_id": e})
            for e, p in (("A3", p1), ("A4", p2), ("A5", p1))
        ]
        intake = Intake(session, clinic, NOW, TEST_SECRET.encode())
        results = intake.batch(batch)
        assert [getattr(r, "result", r) for r in results] == ["created"] * 3
        # (`intake`, alive here, would keep the objects it loaded in the weak identity map)
        assert not [o for o in session.identity_map.values() if isinstance(o, Patient)]
    assert stored("A5").patient_id == stored("A3").patient_id == stored("A1").patient_id


def _selects(session: Any) -> list[str]:
    """The SELECTs the session sends from now on (a list that fills as they go)."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        statement = str(args[2])
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    event.listen(session.connection(), "before_cursor_execute", record)
    return seen


def test_a_single_push_reads_its_appointment_and_another_known_patient_in_one_query(
    cast: Cast,
) -> None:
    """A feed's single message (MLLP, FHIR, PUT) looks its appointment and its patient up in
    one outer join: a new appointment of a known patient, and a known appointment moved to
    another known patient, each with one SELECT."""
    push(cast, "A1", body())
    push(cast, "A2", body(patient={"external_id": "P2", "phone": "06 98 76 54 32"}))
    with db.session_scope() as session:
        clinic = session.get(Clinic, cast.clinic_id)
        assert clinic is not None
        intake = Intake(session, clinic, NOW, TEST_SECRET.encode())
        selects = _selects(session)
        new = BatchItem.model_validate({**body().model_dump(), "external_id": "A3"})
        assert [r.result for r in intake.batch([new]) if not isinstance(r, Exception)] == [
            "created"
        ]
        assert len(selects) == 1
        moved = body(patient={"external_id": "P2", "phone": "06 98 76 54 32", "name": "Zoé"})
        item = BatchItem.model_validate({**moved.model_dump(), "external_id": "A1"})
        selects.clear()
        assert [
            r.result
            for r in Intake(session, clinic, NOW, TEST_SECRET.encode()).batch([item])
            if not isinstance(r, Exception)
        ] == ["updated"]
        assert len([s for s in selects if "FROM reminders" not in s]) == 1
    assert stored("A1").patient.external_id == "P2"
    assert stored("A1").patient.name == "Zoé"
    assert stored("A3").patient.external_id == "P1"
    assert stored("A2").patient_id == stored("A1").patient_id


@pytest.mark.postgres
def test_only_the_single_message_statements_are_prepared(pg_database: str) -> None:
    """On PostgreSQL the lookup and the INSERTs of a single message are server-side prepared
    statements (their parsing and planning cost more than their run); nothing else is, and the
    connection goes back to preparing nothing."""
    with db.session_scope() as session:
        clinic, _ = create_clinic(
            session, ClinicOptions(name="C", timezone="Europe/Paris", country="FR", language="fr")
        )
        intake = Intake(session, clinic, NOW, TEST_SECRET.encode())
        intake.put("A1", body())
        session.execute(select(Patient)).all()
        prepared = session.execute(text("SELECT statement FROM pg_prepared_statements")).all()
        driver = session.connection().connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        assert driver.prepare_threshold is None
    kinds = sorted(statement.split(" (")[0].split(",")[0] for (statement,) in prepared)
    assert kinds == [
        'INSERT INTO "appointments"',
        'INSERT INTO "patients"',
        'INSERT INTO "reminders"',
        "SELECT appointments.id",
    ]
