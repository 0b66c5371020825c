"""Upsert and cancel appointments, idempotently. Functions take a session and `now`; they never
commit (the caller owns the transaction) and validate everything before writing anything."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import (
    ARRAY,
    Boolean,
    ColumnElement,
    DateTime,
    Float,
    Integer,
    String,
    Table,
    and_,
    any_,
    bindparam,
    insert,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import InstrumentedAttribute, Session, joinedload
from sqlalchemy.sql import Executable
from sqlalchemy.types import TypeDecorator, TypeEngine

from reminders import schedule
from reminders.db import Base
from reminders.models import WENT_OUT, Appointment, Clinic, Patient, Reminder
from reminders.normalize import choose_language, parse_phone
from reminders.schemas import AppointmentIn, BatchItem, PatientIn, Result, check_external_id
from reminders.security import in_holdout, link_token


class IntakeError(ValueError):
    """An input that cannot be applied: `field` names it (dotted path), `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Upserted:
    # None for an appointment created in bulk and not read back (see Intake.finish).
    appointment: Appointment | None
    result: Result


@dataclass(frozen=True)
class _PatientValues:
    name: str | None
    phone_e164: str | None
    sms_capable: bool
    language_requested: str | None
    language: str
    language_fallback: bool


@dataclass(frozen=True)
class _StoredPatient:
    """A patient row read as plain values: a batch needs no ORM object for a patient whose
    new appointment changes nothing about them (an ORM object costs 3x as much to load)."""

    id: int
    values: _PatientValues


def _patient_values(clinic: Clinic, data: PatientIn) -> _PatientValues:
    phone_e164, sms_capable = None, False
    if data.phone:
        try:
            phone = parse_phone(data.phone, clinic.country)
        except ValueError as exc:
            raise IntakeError("patient.phone", str(exc)) from None
        phone_e164, sms_capable = phone.e164, phone.sms_capable
    try:
        language = choose_language(data.language, clinic.language)
    except ValueError as exc:
        raise IntakeError("patient.language", str(exc)) from None
    return _PatientValues(
        name=data.name or None,
        phone_e164=phone_e164,
        sms_capable=sms_capable,
        language_requested=language.requested,
        language=language.used,
        language_fallback=language.fallback,
    )


def _assign(obj: object, values: dict[str, object]) -> bool:
    """Sets only the attributes that differ (so an identical push writes nothing)."""
    changed = False
    for key, value in values.items():
        if getattr(obj, key) != value:
            setattr(obj, key, value)
            changed = True
    return changed


class Intake:
    """Applies appointments for one clinic within one transaction.

    Keeps the patients and appointments it has seen, so a batch loads them in two queries and
    two items about the same patient or appointment see each other's changes.
    """

    def __init__(self, session: Session, clinic: Clinic, now: dt.datetime, secret: bytes) -> None:
        self.session = session
        self.clinic = clinic
        self.now = now
        self.secret = secret
        self.timing = schedule.clinic_timing(clinic)
        # Read once: an ORM attribute costs a call per access, and a batch reads these per row.
        self._clinic_id: int = clinic.id
        self._holdout_share: float = clinic.holdout
        # None: not in the database. A patient is here or in _stored, never in both.
        self._patients: dict[str, Patient | None] = {}
        self._stored: dict[str, _StoredPatient] = {}
        self._appointments: dict[str, Appointment | None] = {}
        # New rows are inserted in bulk by finish(): plain dicts, no ORM objects (3x faster).
        self._new_patients: dict[str, dict[str, object]] = {}
        self._new_appointments: dict[str, dict[str, object]] = {}
        self._new_reminders: list[tuple[str, dict[str, object]]] = []
        # external_id -> (digest of the last body applied, its source_updated_at)
        self._digests: dict[str, tuple[str | None, dt.datetime | None]] = {}
        self._digest_cache: dict[int, tuple[AppointmentIn, str]] = {}

    def preload(self, external_ids: Iterable[str], patient_ids: Iterable[str]) -> None:
        """Loads the existing rows for a batch in two queries (one for a single item): the
        appointments as ORM objects with their patients, the other patients as plain rows."""
        wanted = [e for e in set(external_ids) if e not in self._appointments]
        wanted_patients = [p for p in set(patient_ids) if not self._knows_patient(p)]
        if len(wanted) == 1 and len(wanted_patients) == 1:
            self._preload_one(wanted[0], wanted_patients[0])
            return
        for chunk in _chunks(wanted, 500):
            self._appointments.update(dict.fromkeys(chunk))
            rows = self.session.scalars(
                _lookup(self.session, "appointments"), {"clinic_id": self.clinic.id, "ids": chunk}
            )
            for appointment in rows:
                self._appointments[appointment.external_id] = appointment
                self._keep_patient(appointment.patient)
                self._digests.setdefault(
                    appointment.external_id,
                    (appointment.content_hash, appointment.source_updated_at),
                )
            for external_id in chunk:
                if self._appointments[external_id] is None:
                    self._digests.setdefault(external_id, (None, None))
        wanted = [p for p in set(patient_ids) if not self._knows_patient(p)]
        for chunk in _chunks(wanted, 500):
            self._patients.update(dict.fromkeys(chunk))
            found = self.session.execute(
                _lookup(self.session, "patient_rows"), {"clinic_id": self.clinic.id, "ids": chunk}
            )
            for patient_id, external_id, *values in found:
                del self._patients[external_id]
                self._stored[external_id] = _StoredPatient(patient_id, _PatientValues(*values))

    def _knows_patient(self, external_id: str) -> bool:
        return external_id in self._patients or external_id in self._stored

    def _keep_patient(self, patient: Patient) -> None:
        """Remembers a loaded patient object (it supersedes a plain row read before)."""
        self._stored.pop(patient.external_id, None)
        self._patients[patient.external_id] = patient

    def _preload_one(self, external_id: str, patient_id: str) -> None:
        """An appointment and a patient in one query (a feed's single message): two round
        trips and two ORM queries cost more than the one outer join."""
        with _prepared(self.session):
            appointment, patient = self.session.execute(
                _lookup(self.session, "one"),
                {"clinic_id": self.clinic.id, "external_id": external_id, "patient_id": patient_id},
            ).one()
        self._appointments[external_id] = appointment
        if appointment is not None:
            self._keep_patient(appointment.patient)
            self._digests.setdefault(
                external_id, (appointment.content_hash, appointment.source_updated_at)
            )
        else:
            self._digests.setdefault(external_id, (None, None))
        if not self._knows_patient(patient_id):
            self._patients[patient_id] = patient

    def _load_digests(self, external_ids: Iterable[str]) -> None:
        """The stored digests of these appointments, without loading the rows. One it does not
        find is known to be new: preload() does not look for it again (a new appointment, the
        bulk of a first import, cost a second lookup)."""
        wanted = [e for e in set(external_ids) if e not in self._digests]
        for chunk in _chunks(wanted, 500):
            self._digests.update(dict.fromkeys(chunk, (None, None)))
            absent = set(chunk)
            rows = self.session.execute(
                _lookup(self.session, "digests"), {"clinic_id": self.clinic.id, "ids": chunk}
            )
            for external_id, digest, source_updated_at in rows:
                self._digests[external_id] = (digest, source_updated_at)
                absent.discard(external_id)
            for external_id in absent:
                self._appointments.setdefault(external_id, None)

    def _repeat(self, external_id: str, data: AppointmentIn, digest: str) -> Result | None:
        """`unchanged` (or `stale`) when this exact body was applied last; else None."""
        if external_id in self._new_appointments:
            return None
        if external_id not in self._digests:  # one item: its rows, which carry the digest
            self.preload([external_id], [data.patient.external_id])
        stored, stored_at = self._digests[external_id]
        if stored != digest:
            return None
        incoming = _utc(data.source_updated_at)
        if incoming is None or (stored_at is not None and incoming == stored_at):
            return "unchanged"
        if stored_at is not None and incoming < stored_at:
            return "stale"
        return None  # a newer clock: remembered through the full path

    def _digest(self, data: AppointmentIn) -> str:
        key = id(data)
        cached = self._digest_cache.get(key)
        if cached is None or cached[0] is not data:
            cached = self._digest_cache[key] = (data, content_digest(self.clinic, data))
        return cached[1]

    def appointment(self, external_id: str) -> Appointment | None:
        if external_id not in self._appointments:
            self.preload([external_id], [])
        return self._appointments[external_id]

    def _patient(self, external_id: str) -> Patient | None:
        """The patient as an ORM object (None: not in the database)."""
        if external_id in self._patients:
            return self._patients[external_id]
        stored = self._stored.pop(external_id, None)
        if stored is not None:
            patient = self.session.get(Patient, stored.id)
        else:
            query = _lookup(self.session, "patients")
            params = {"clinic_id": self.clinic.id, "ids": [external_id]}
            patient = self.session.scalars(query, params).one_or_none()
        self._patients[external_id] = patient
        return patient

    def _upsert(self, external_id: str, data: AppointmentIn) -> Upserted:
        """Creates or updates one appointment; raises IntakeError before writing anything.

        New rows are only buffered: `put` and `batch` write them (finish).
        """
        validated = isinstance(data, BatchItem) and data.external_id == external_id
        try:
            if not validated:  # a batch item's was checked with its body
                check_external_id(external_id)
        except ValueError as exc:
            raise IntakeError("external_id", str(exc)) from None
        digest = self._digest(data)
        repeat = self._repeat(external_id, data, digest)
        if repeat is not None:
            return Upserted(None, repeat)
        values = _patient_values(self.clinic, data.patient)
        if data.outcome is not None and data.starts_at > self.now:
            raise IntakeError("outcome", "can only be given once the appointment has started")
        if external_id in self._new_appointments:
            self.finish()  # the same id twice in one batch: the second sees the first
        existing = self.appointment(external_id)
        if existing is not None and _is_stale(existing, data):
            return Upserted(existing, "stale")
        if existing is None:
            self._create(external_id, data, values, digest)
            return Upserted(None, "created")
        patient_changed, patient = self._save_patient(data.patient.external_id, values)
        old_start = existing.starts_at
        changed = self._update(existing, data, patient)
        if changed or patient_changed:
            self.plan(existing, moved_from=old_start if existing.starts_at != old_start else None)
        existing.content_hash = digest
        self._digests[external_id] = (digest, existing.source_updated_at)
        return Upserted(existing, "updated" if changed or patient_changed else "unchanged")

    def plan(self, appointment: Appointment, moved_from: dt.datetime | None = None) -> None:
        """Plans the reminders of the appointment's current booking, once (DESIGN rule 1).

        Nothing for a cancelled or past appointment, a patient who cannot get SMS, or a patient
        in the clinic's holdout. A booking that was cancelled and is booked again gets back the
        reminders its cancellation skipped.
        """
        patient = appointment.patient
        holdout, items = self._sends(
            appointment.external_id,
            patient.external_id,
            appointment.starts_at,
            appointment.status,
            appointment.confirmation,
            patient.sms_capable,
            patient.phone_e164,
            appointment.holdout,
        )
        appointment.holdout = holdout
        if not items:
            return
        assert patient.phone_e164 is not None  # _sends plans nothing without a number
        current = {
            r.rule: r
            for r in appointment.reminders
            if r.appointment_starts_at == appointment.starts_at
        }
        if any(r.skip_reason != "cancelled" for r in current.values()):
            return  # this booking is planned already
        if appointment.link_token is None:
            appointment.link_token = link_token(
                self.secret, self.clinic.id, appointment.external_id
            )
        moved = moved_from is not None and any(
            r.appointment_starts_at == moved_from and r.status in WENT_OUT and r.kind != "ack"
            for r in appointment.reminders
        )
        if moved:
            items = schedule.plan(appointment.starts_at, self.now, self.timing, moved=True)
        for item in items:
            row = current.get(item.rule)
            if row is None:
                row = Reminder(
                    clinic_id=self.clinic.id,
                    appointment=appointment,
                    rule=item.rule,
                    appointment_starts_at=appointment.starts_at,
                    attempts=0,
                )
                self.session.add(row)
            row.phone_e164 = patient.phone_e164
            row.kind = item.kind
            row.due_at = item.due_at
            row.send_by = item.send_by
            row.status = "planned" if item.skip is None else "skipped"
            row.skip_reason = item.skip

    def _save_patient(self, external_id: str, values: _PatientValues) -> tuple[bool, Patient]:
        """The patient as an ORM object (an existing appointment points at it)."""
        new = self._new_patients.pop(external_id, None)
        if new is not None:
            patient = Patient(**new)
            _assign(patient, vars(values))
            self.session.add(patient)
            self._patients[external_id] = patient
            return True, patient
        known = self._patient(external_id)
        if known is None:
            known = Patient(clinic_id=self.clinic.id, external_id=external_id, **vars(values))
            self.session.add(known)
            self._patients[external_id] = known
            return True, known
        return _assign(known, vars(values)), known

    def _create(
        self, external_id: str, data: AppointmentIn, values: _PatientValues, digest: str
    ) -> None:
        """Buffers a new appointment (and its patient and reminders) for finish()."""
        key = data.patient.external_id
        stored = self._stored.get(key)
        if stored is not None and stored.values == values:
            patient = None  # known and unchanged: finish() needs only its id
        elif key in self._new_patients:
            patient = None
        else:
            patient = self._patient(key)
        if patient is not None:
            _assign(patient, vars(values))
        elif stored is None:
            row = self._new_patients.setdefault(
                key, {"clinic_id": self._clinic_id, "external_id": key}
            )
            row.update(vars(values))
        starts_at = data.starts_at.astimezone(dt.UTC)
        appointment: dict[str, object] = {
            "clinic_id": self._clinic_id,
            "external_id": external_id,
            **_pushed(data),
            "confirmation": "unconfirmed",
            "outcome": data.outcome,
            "source_updated_at": _utc(data.source_updated_at),
            "booked_at": self.now,
            "decided_at": None,
            "holdout": None,
            "link_token": None,
            "content_hash": digest,
            "_patient": key,
        }
        self._new_appointments[external_id] = appointment
        holdout, items = self._sends(
            external_id,
            key,
            starts_at,
            data.status,
            "unconfirmed",
            values.sms_capable,
            values.phone_e164,
            None,
        )
        appointment["holdout"] = holdout
        if items:
            appointment["link_token"] = link_token(self.secret, self._clinic_id, external_id)
        for item in items:
            self._new_reminders.append(
                (
                    external_id,
                    {
                        "clinic_id": self._clinic_id,
                        "phone_e164": values.phone_e164,
                        "kind": item.kind,
                        "rule": item.rule,
                        "appointment_starts_at": starts_at,
                        "due_at": item.due_at,
                        "send_by": item.send_by,
                        "status": "planned" if item.skip is None else "skipped",
                        "skip_reason": item.skip,
                        "attempts": 0,
                    },
                )
            )

    def _sends(
        self,
        external_id: str,
        patient_key: str,
        starts_at: dt.datetime,
        status: str,
        confirmation: str,
        sms_capable: bool,
        phone: str | None,
        holdout: bool | None,
        moved: bool = False,
    ) -> tuple[bool | None, list[schedule.Planned]]:
        """The holdout arm (drawn when first needed) and the sends to plan for a booking."""
        if (
            status != "booked"
            or confirmation == "cancelled_by_patient"
            or starts_at <= self.now
            or not sms_capable
            or phone is None
        ):
            return holdout, []
        if holdout is None:
            holdout = in_holdout(self.secret, self._clinic_id, patient_key, self._holdout_share)
        if holdout:
            return holdout, []
        return holdout, list(_planned(starts_at, self.now, self.timing, moved))

    def finish(self) -> None:
        """Writes the buffered new patients, appointments and reminders, in bulk.

        On PostgreSQL, a few new appointments (a feed's single message) go in one pipelined
        round trip (_write_few); for more, from `_COPY_FROM` rows of a table, their ids are
        drawn from the sequences first, so the rows need no RETURNING and go as one COPY per
        table.
        """
        self.session.flush()
        if not self._new_appointments:
            self._new_patients.clear()
            return
        patient_ids = {
            key: patient.id for key, patient in self._patients.items() if patient is not None
        }
        patient_ids.update((key, stored.id) for key, stored in self._stored.items())
        rows = sorted(self._new_appointments.values(), key=lambda r: str(r["external_id"]))
        if len(rows) <= _SMALL_BATCH and self._postgres():
            self._write_few(patient_ids, rows)
        else:
            patient_ids |= self._insert(Patient, list(self._new_patients.values()), "external_id")
            for row in rows:
                row["patient_id"] = patient_ids[str(row.pop("_patient"))]
            appointment_ids = self._insert(Appointment, rows, "external_id")
            reminders = []
            for external_id, row in self._new_reminders:  # buffered here: completed in place
                row["appointment_id"] = appointment_ids[external_id]
                reminders.append(row)
            if len(reminders) > _COPY_FROM and self._postgres():
                _copy(self.session, _table(Reminder), reminders, self.now)
            elif reminders:
                self.session.execute(insert(_table(Reminder)), reminders)
        if _statistics_due(len(rows)):
            refresh_statistics(self.session)
        for key in self._new_patients:
            self._patients.pop(key, None)  # read back from the database when next needed
        for external_id, row in self._new_appointments.items():
            self._appointments.pop(external_id, None)
            self._digests[external_id] = (
                str(row["content_hash"]),
                _utc(row["source_updated_at"]),  # type: ignore[arg-type]
            )
        self._new_patients.clear()
        self._new_appointments.clear()
        self._new_reminders.clear()

    def _write_few(self, patient_ids: dict[str, int], rows: list[dict[str, object]]) -> None:
        """Writes a few new rows (a feed's single message) in one round trip (PostgreSQL).

        One multi-row INSERT per table, pipelined; a new row's parent id is looked up by its
        external id inside the INSERT, so no id has to be read back in between (three round
        trips less than INSERT ... RETURNING table by table).
        """
        clinic_id = self.clinic.id
        statements = []
        patients = sorted(self._new_patients.values(), key=lambda r: str(r["external_id"]))
        if patients:
            statements.append(_insert_sql("patients", patients))
        for row in rows:
            key = str(row.pop("_patient"))
            known = patient_ids.get(key)
            row["patient_id"] = known if known is not None else _Lookup("patients", clinic_id, key)
        statements.append(_insert_sql("appointments", rows))
        if self._new_reminders:
            reminders = []
            for external_id, row in self._new_reminders:
                row["appointment_id"] = _Lookup("appointments", clinic_id, external_id)
                reminders.append(row)
            statements.append(_insert_sql("reminders", reminders))
        _check_aware(self.now)
        driver = _driver(self.session)
        try:
            with _prepared(self.session), driver.pipeline(), driver.cursor() as cursor:
                for statement, params in statements:
                    cursor.execute(statement, params)
        except psycopg.Error as exc:
            shown = "; ".join(statement for statement, _ in statements)
            raise DBAPIError.instance(shown, None, exc, psycopg.Error) from exc

    def _insert(
        self, model: type[Patient] | type[Appointment], rows: list[dict[str, object]], key: str
    ) -> dict[str, int]:
        """Inserts rows; returns their ids by `key` (external_id)."""
        if not rows:
            return {}
        table = _table(model)
        rows = sorted(rows, key=lambda r: str(r[key]))  # one lock order for concurrent batches
        # Big batches: ids from the sequence, then one COPY. A few rows: one INSERT ...
        # RETURNING is fewer round trips.
        if len(rows) > _COPY_FROM and self._postgres():
            ids = self.session.scalars(_NEW_IDS, {"table": table.name, "n": len(rows)}).all()
            for row, new_id in zip(rows, ids, strict=True):
                row["id"] = new_id
            _copy(self.session, table, rows, self.now)
            return {str(row[key]): int(str(row["id"])) for row in rows}
        inserted = self.session.execute(
            insert(table).returning(table.c.id, table.c[key], sort_by_parameter_order=True), rows
        )
        return {str(external): int(new_id) for new_id, external in inserted}

    def _postgres(self) -> bool:
        return self.session.get_bind().dialect.name == "postgresql"

    def _update(self, appointment: Appointment, data: AppointmentIn, patient: Patient) -> bool:
        values: dict[str, object] = {"patient": patient, **_pushed(data)}
        moved = values["starts_at"] != appointment.starts_at
        if data.outcome is not None:
            values["outcome"] = data.outcome
        if moved:
            # A new start time is a new booking: the patient's answer was about another slot.
            values.update(booked_at=self.now, confirmation="unconfirmed", decided_at=None)
            if data.outcome is None:
                values["outcome"] = None
        elif appointment.confirmation == "cancelled_by_patient":
            values["status"] = "cancelled"  # a patient's cancellation stands
        changed = _assign(appointment, values)
        if data.source_updated_at is not None:
            # A newer clock with the same content is remembered but is not a change.
            _assign(appointment, {"source_updated_at": _utc(data.source_updated_at)})
        if changed and (moved or appointment.status == "cancelled"):
            drop_pending(self.session, appointment, "moved" if moved else "cancelled")
        return changed

    def cancel(self, external_id: str) -> Upserted:
        """The clinic cancels: no more reminders. Raises LookupError for an unknown appointment."""
        appointment = self.appointment(external_id)
        if appointment is None:
            raise LookupError(external_id)
        if appointment.status == "cancelled":
            return Upserted(appointment, "unchanged")
        appointment.status = "cancelled"
        appointment.content_hash = None  # the same body again must book it again
        self._digests.pop(external_id, None)
        drop_pending(self.session, appointment, "cancelled")
        return Upserted(appointment, "cancelled")

    def batch(self, items: Sequence[BatchItem]) -> list[Upserted | IntakeError]:
        """Applies valid items in order; a bad item gives its error and never blocks the others.

        A big batch reads the stored digests first and loads only the rows that changed; a
        small one (a feed's single message) loads its rows at once, which carry the digests:
        one round trip less.
        """
        if len(items) > _SMALL_BATCH:
            self._load_digests(i.external_id for i in items)
            fresh = [i for i in items if self._digests[i.external_id][0] != self._digest(i)]
        else:
            fresh = list(items)
        self.preload([i.external_id for i in fresh], [i.patient.external_id for i in fresh])
        results: list[Upserted | IntakeError] = []
        for item in items:
            try:
                results.append(self._upsert(item.external_id, item))
            except IntakeError as exc:
                results.append(exc)
        self.finish()
        return results

    def put_patient(self, external_id: str, data: PatientIn) -> Patient:
        """Creates or updates a patient alone (FHIR `PUT /fhir/Patient/{id}`), validating the
        phone and language as an appointment's patient is; raises IntakeError."""
        try:
            check_external_id(external_id)
        except ValueError as exc:
            raise IntakeError("patient.external_id", str(exc)) from None
        _, patient = self._save_patient(external_id, _patient_values(self.clinic, data))
        self.session.flush()
        return patient

    def put(self, external_id: str, data: AppointmentIn) -> tuple[Appointment, Result]:
        """One upsert, written, with the appointment read back for the answer."""
        done = self._upsert(external_id, data)
        self.finish()
        appointment = done.appointment or self.appointment(external_id)
        assert appointment is not None
        return appointment, done.result


def drop_pending(session: Session, appointment: Appointment, reason: str) -> None:
    """Skips the reminders of an appointment that are not out yet, recording why."""
    if appointment.id is None:
        return
    session.execute(
        update(Reminder)
        .where(Reminder.appointment_id == appointment.id, Reminder.status == "planned")
        .values(status="skipped", skip_reason=reason)
        .execution_options(synchronize_session="fetch")
    )


def _pushed(data: AppointmentIn) -> dict[str, object]:
    """The appointment columns a push sets directly, as stored."""
    return {
        "starts_at": data.starts_at.astimezone(dt.UTC),
        "duration_minutes": data.duration_minutes,
        "practitioner": data.practitioner or None,
        "location": data.location or None,
        "kind": data.kind or None,
        "status": data.status,
    }


def _is_stale(appointment: Appointment, data: AppointmentIn) -> bool:
    incoming = _utc(data.source_updated_at)
    stored = appointment.source_updated_at
    return incoming is not None and stored is not None and incoming < stored


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    return value.astimezone(dt.UTC) if value is not None else None


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@lru_cache(maxsize=8192)
def _planned(
    starts_at: dt.datetime, now: dt.datetime, timing: schedule.Timing, moved: bool
) -> tuple[schedule.Planned, ...]:
    """schedule.plan, remembered: an import (one `now`) books the same slots many times."""
    return tuple(schedule.plan(starts_at, now, timing, moved=moved))


# From this many new rows of a table, finish() writes them with COPY on PostgreSQL.
_COPY_FROM = 20
# N ids from a table's sequence; its name is looked up once (per row, the lookup took four
# times as long as the nextval).
_NEW_IDS = text(
    "WITH s AS MATERIALIZED "
    "(SELECT pg_get_serial_sequence(:table, 'id')::regclass AS seq) "
    "SELECT nextval(s.seq) FROM s, generate_series(1, :n)"
)


def _copy(session: Session, table: Table, rows: list[dict[str, object]], now: dt.datetime) -> None:
    """Inserts rows (dicts with the same keys) with one COPY, in the session's transaction.

    An INSERT executed once per row costs PostgreSQL a parse and plan each time (we prepare no
    statements, see db.make_engine) and psycopg a placeholder rewrite: COPY costs about a fifth
    of either. Columns left out take their server defaults, as with an INSERT. The values are
    written as they are, without the column types' bind processing: the intake's datetimes all
    derive from `now` or from validated aware inputs, so an aware `now` is checked once here.
    """
    _check_aware(now)
    columns = list(rows[0])
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    driver = _driver(session)
    try:
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            copy.set_types([_binary_type(table.c[name].type) for name in columns])
            for row in rows:
                copy.write_row([row[name] for name in columns])
    except psycopg.Error as exc:
        # As SQLAlchemy raises them (IntegrityError...): callers retry or report on those.
        raise DBAPIError.instance(statement.as_string(driver), None, exc, psycopg.Error) from exc


def _binary_type(column_type: TypeEngine[Any]) -> str:
    """The PostgreSQL type psycopg writes a column's values as, in a binary COPY (10 times
    less Python than the text format, which formats each datetime)."""
    if isinstance(column_type, TypeDecorator):
        column_type = column_type.impl_instance
    if isinstance(column_type, Boolean):
        return "bool"
    if isinstance(column_type, Integer):
        return "int4"
    if isinstance(column_type, Float):
        return "float8"
    if isinstance(column_type, DateTime):
        return "timestamptz" if column_type.timezone else "timestamp"
    if isinstance(column_type, String):
        return "text"  # varchar's binary form is the same; its length is still checked
    raise TypeError(f"no binary COPY type for {column_type!r}")


def _check_aware(now: dt.datetime) -> None:
    if now.tzinfo is None:
        raise ValueError("naive datetime given to the database; pass an aware one")


@contextmanager
def _prepared(session: Session) -> Iterator[None]:
    """Runs the statements of the block as server-side prepared statements (PostgreSQL).

    Only for the single-message path's statements, which look rows up by a unique key (the
    outer-join lookup of `_preload_one`, the parent-id sub-selects of `_write_few`): parsing and
    planning them cost PostgreSQL more than running them (0.6 of its 1.1 ms per MLLP message).
    The engine prepares nothing else (db.make_engine: a generic plan made while a table was
    nearly empty can be a sequential scan). Here that risk is bounded: an equality on every
    column of a unique index estimates one row whatever the statistics, so the index wins as
    soon as the table is more than a few pages, and refresh_statistics' ANALYZE as the tables
    grow invalidates the plans made before.
    """
    if session.get_bind().dialect.name != "postgresql":
        yield
        return
    driver = _driver(session)
    before = driver.prepare_threshold
    driver.prepare_threshold = 0  # prepare at the first run; kept in psycopg's per-connection LRU
    try:
        yield
    finally:
        driver.prepare_threshold = before


def _driver(session: Session) -> psycopg.Connection[Any]:
    """The psycopg connection under the session's transaction."""
    driver = session.connection().connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver


@dataclass(frozen=True)
class _Lookup:
    """The id of a row inserted earlier in the same round trip, found by its external id."""

    table: str
    clinic_id: int
    external_id: str


def _insert_sql(table: str, rows: list[dict[str, object]]) -> tuple[str, list[object]]:
    """One INSERT of rows (dicts with the same keys) and its parameters; a `_Lookup` value
    becomes a sub-select on the table's unique (clinic_id, external_id)."""
    columns = tuple(rows[0])
    params: list[object] = []
    shape: list[tuple[str | None, ...]] = []
    for row in rows:
        cells: list[str | None] = []
        for name in columns:
            value = row[name]
            if isinstance(value, _Lookup):
                cells.append(value.table)
                params += (value.clinic_id, value.external_id)
            else:
                cells.append(None)
                params.append(value)
        shape.append(tuple(cells))
    return _insert_text(table, columns, tuple(shape)), params


@lru_cache(maxsize=512)
def _insert_text(
    table: str, columns: tuple[str, ...], shape: tuple[tuple[str | None, ...], ...]
) -> str:
    """The INSERT statement of a shape of rows (which cells look up a parent), built once."""
    values = [
        sql.SQL("({})").format(
            sql.SQL(", ").join(
                sql.Placeholder() if parent is None else _LOOKUP.format(sql.Identifier(parent))
                for parent in row
            )
        )
        for row in shape
    ]
    statement = sql.SQL("INSERT INTO {} ({}) VALUES {}").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(values),
    )
    return statement.as_string()


_LOOKUP = sql.SQL("(SELECT id FROM {} WHERE clinic_id = %s AND external_id = %s)")


def _table(model: type[Base]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def content_digest(clinic: Clinic, data: AppointmentIn) -> str:
    """A digest of what a push says (its clock aside), and of the clinic settings that shape how
    it is read: the same digest means the same body."""
    payload = data.model_dump_json(exclude={"source_updated_at", "external_id"})
    raw = f"{clinic.country}\x00{clinic.language}\x00{payload}"
    return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()


# Batches of at most this many items load their rows at once (see Intake.batch).
_SMALL_BATCH = 20
# New appointments this process wrote since it last looked at the tables' statistics.
_STATISTICS_EVERY = 100
_statistics_lock = threading.Lock()
_written_since_statistics = 0


def _statistics_due(new_appointments: int) -> bool:
    """True every `_STATISTICS_EVERY` new appointments written by this process: a big batch
    looks each time, single messages (MLLP, FHIR, PUT) once in a while."""
    global _written_since_statistics
    with _statistics_lock:
        _written_since_statistics += new_appointments
        if _written_since_statistics < _STATISTICS_EVERY:
            return False
        _written_since_statistics = 0
        return True


def refresh_statistics(session: Session) -> None:
    """ANALYZE the intake tables when they doubled since the last one (PostgreSQL).

    A go-live import fills empty tables faster than autovacuum samples them (and a server may
    run without autovacuum); with statistics that still say "empty", the planner looks
    appointments up through the (clinic_id, starts_at) index instead of the unique one, and
    each lookup scans all of the clinic's rows (seen: 0.3 ms of server CPU per lookup at
    1,500 appointments, growing with the table). Statistics of half the table are as good:
    the planner scales row counts to the table's current size, and the distinct-value counts
    that pick the index are kept as fractions. More often costs more than it saves: at a
    quarter's growth, ANALYZE was a fifth of PostgreSQL's CPU in a 200,000-row import.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    stale = (
        session.execute(
            text(
                "SELECT relname FROM pg_stat_user_tables "
                "WHERE relid IN ('appointments'::regclass, 'patients'::regclass, "
                "'reminders'::regclass) "
                "AND n_mod_since_analyze > GREATEST(200, n_live_tup / 2)"
            )
        )
        .scalars()
        .all()
    )
    for table in stale:
        session.execute(text(f"ANALYZE {table}"))


def _among(postgresql: bool, column: InstrumentedAttribute[str]) -> ColumnElement[bool]:
    """`column IN :ids`; on PostgreSQL as `= ANY(:ids)`: one parameter instead of hundreds."""
    if postgresql:
        return column == any_(bindparam("ids", type_=ARRAY(String)))
    return column.in_(bindparam("ids", expanding=True))


@cache
def _lookups(postgresql: bool) -> dict[str, Executable]:
    """The intake's lookups by (clinic_id, external ids), built once: SQLAlchemy then finds
    their compiled form without rebuilding them and their cache keys for each query."""
    clinic = bindparam("clinic_id", type_=Integer)
    return {
        "appointments": select(Appointment).where(
            Appointment.clinic_id == clinic, _among(postgresql, Appointment.external_id)
        ),
        "patients": select(Patient).where(
            Patient.clinic_id == clinic, _among(postgresql, Patient.external_id)
        ),
        "patient_rows": select(
            Patient.id,
            Patient.external_id,
            # in _PatientValues' order
            Patient.name,
            Patient.phone_e164,
            Patient.sms_capable,
            Patient.language_requested,
            Patient.language,
            Patient.language_fallback,
        ).where(Patient.clinic_id == clinic, _among(postgresql, Patient.external_id)),
        "digests": select(
            Appointment.external_id, Appointment.content_hash, Appointment.source_updated_at
        ).where(Appointment.clinic_id == clinic, _among(postgresql, Appointment.external_id)),
        "one": select(Appointment, Patient)
        .select_from(select(literal_column("1").label("one")).subquery())
        .outerjoin(
            Appointment,
            and_(
                Appointment.clinic_id == clinic, Appointment.external_id == bindparam("external_id")
            ),
        )
        .outerjoin(
            Patient,
            and_(Patient.clinic_id == clinic, Patient.external_id == bindparam("patient_id")),
        )
        # Outer: the relationship's inner join would leave no row when no appointment matches.
        .options(joinedload(Appointment.patient, innerjoin=False)),
    }


def _lookup(session: Session, name: str) -> Executable:
    return _lookups(session.get_bind().dialect.name == "postgresql")[name]
