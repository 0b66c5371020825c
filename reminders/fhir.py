"""FHIR R4 intake: `Appointment` (and referenced `Patient`) resources onto the same idempotent
upsert as `/v1`, and the stored appointment back as an R4 `Appointment` with the patient's answer.

Parsed and validated with `fhir.resources.R4B` (the package's default module is R5, whose
Appointment differs). Every error is an `OperationOutcome` with a 4xx status. Each request owns
one transaction (the API key is checked in it too).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fhir.resources.R4B.appointment import Appointment as FhirAppointment
from fhir.resources.R4B.patient import Patient as FhirPatient
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from reminders.clinics import clinic_by_api_key
from reminders.config import get_settings
from reminders.db import session_scope
from reminders.models import Appointment, Clinic, Patient
from reminders.normalize import parse_phone
from reminders.planning import Intake, IntakeError
from reminders.schemas import AppointmentIn, PatientIn
from reminders.security import process_secret_key

FHIR_JSON = "application/fhir+json"
T = TypeVar("T")

# FHIR status -> (our status, our outcome)
STATUS_IN: dict[str, tuple[str, str | None]] = {
    "proposed": ("booked", None),
    "pending": ("booked", None),
    "booked": ("booked", None),
    "cancelled": ("cancelled", None),
    "entered-in-error": ("cancelled", None),
    "noshow": ("booked", "no_show"),
    "arrived": ("booked", "attended"),
    "checked-in": ("booked", "attended"),
    "fulfilled": ("booked", "attended"),
}
PATIENT_CANCELLED = "cancelled by the patient by SMS or link"
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# Our field names (IntakeError.field, AppointmentIn locations) as FHIRPath-ish locations.
_EXPRESSIONS = {
    "external_id": "Appointment.identifier",
    "starts_at": "Appointment.start",
    "duration_minutes": "Appointment.minutesDuration",
    "kind": "Appointment.serviceType",
    "practitioner": "Appointment.participant",
    "location": "Appointment.participant",
    "status": "Appointment.status",
    "outcome": "Appointment.status",
    "source_updated_at": "Appointment.meta.lastUpdated",
    "patient": "Patient",
    "patient.external_id": "Patient.identifier",
    "patient.name": "Patient.name",
    "patient.phone": "Patient.telecom",
    "patient.language": "Patient.communication",
}


class FhirError(Exception):
    """An answer as an OperationOutcome: HTTP `status`, issue `code`, `diagnostics`, and the
    FHIRPath-ish `expression` of the offending element."""

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        expression: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.expression = expression
        self.headers = headers


def operation_outcome(issues: Sequence[FhirError]) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for issue in issues:
        item: dict[str, Any] = {
            "severity": "error",
            "code": issue.code,
            "diagnostics": issue.diagnostics,
        }
        if issue.expression:
            item["expression"] = [issue.expression]
        out.append(item)
    return {"resourceType": "OperationOutcome", "issue": out}


def _fhir_response(
    body: dict[str, Any] | str, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    content = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return Response(content, status_code=status, media_type=FHIR_JSON, headers=headers)


def _error_response(errors: Sequence[FhirError]) -> Response:
    first = errors[0]
    return _fhir_response(operation_outcome(errors), first.status, first.headers)


class _Invalid(Exception):
    """Several FhirErrors at once (all the bad fields of one resource)."""

    def __init__(self, errors: list[FhirError]) -> None:
        super().__init__("; ".join(e.diagnostics for e in errors))
        self.errors = errors


# --------------------------------------------------------------------------------------------
# Reading bodies


def _parse_body(raw: bytes, content_type: str | None, expected: str) -> dict[str, Any]:
    """The body as a JSON object of resourceType `expected`; 400/415 otherwise."""
    if content_type and "json" not in content_type.lower():
        raise FhirError(
            415, "not-supported", f"send {FHIR_JSON} (or application/json), not {content_type}"
        )
    if not raw.strip():
        raise FhirError(400, "structure", f"the body is empty: an {expected} resource is required")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FhirError(400, "structure", f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FhirError(400, "structure", f"the body must be a JSON object (an {expected})")
    kind = data.get("resourceType")
    if kind != expected:
        got = f"a {kind}" if isinstance(kind, str) and kind else "no resourceType"
        raise FhirError(
            400, "invalid", f"resourceType: expected an {expected}, got {got}", "resourceType"
        )
    return data


def _location(prefix: str, loc: Sequence[int | str]) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _validation_errors(prefix: str, exc: ValidationError) -> list[FhirError]:
    errors = []
    for error in exc.errors():
        where = _location(prefix, [p for p in error["loc"] if p != "__root__"])
        reason = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "missing":
            reason = "is required"
        errors.append(FhirError(422, "invalid", f"{where}: {reason}", where))
    return errors


def _validate(model: Any, data: dict[str, Any], prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _Invalid(_validation_errors(prefix, exc)) from None


# --------------------------------------------------------------------------------------------
# Mapping FHIR -> ours


def _text(concept: Any) -> str | None:
    """A CodeableConcept as text: its text, else its first coding's display, else its code."""
    if concept is None:
        return None
    if concept.text:
        return str(concept.text)
    for coding in concept.coding or []:
        if coding.display:
            return str(coding.display)
        if coding.code:
            return str(coding.code)
    return None


def _phone(patient: Any) -> str | None:
    """`telecom`: system sms, else phone with use mobile, else phone."""
    telecom = [t for t in patient.telecom or [] if t.value]
    for system, use in (("sms", None), ("phone", "mobile"), ("phone", None)):
        for item in telecom:
            if item.system == system and (use is None or item.use == use):
                return str(item.value)
    return None


def _language(patient: Any) -> str | None:
    """`communication[].language`: the preferred one, else the first."""
    items = list(patient.communication or [])
    items.sort(key=lambda c: not c.preferred)
    for item in items:
        for coding in item.language.coding or []:
            if coding.code:
                return str(coding.code)
        if item.language.text:
            return str(item.language.text)
    return None


def _name(patient: Any) -> str | None:
    for name in patient.name or []:
        if name.text:
            return str(name.text)
        parts = [*(name.given or []), *([name.family] if name.family else [])]
        if parts:
            return " ".join(str(p) for p in parts)
    return None


def _first_identifier(resource: Any) -> str | None:
    for identifier in resource.identifier or []:
        if identifier.value:
            return str(identifier.value)
    return None


def patient_in(patient: Any, key: str) -> PatientIn:
    try:
        return PatientIn(
            external_id=key, name=_name(patient), phone=_phone(patient), language=_language(patient)
        )
    except ValidationError as exc:
        raise _Invalid(
            [
                FhirError(422, "invalid", f"Patient.{_where(e['loc'])}: {e['msg']}", "Patient")
                for e in exc.errors()
            ]
        ) from None


def _where(loc: Sequence[int | str]) -> str:
    return ".".join(str(p) for p in loc)


@dataclass(frozen=True)
class PatientRef:
    """The Appointment's patient: contained (already mapped) or a `Patient/{id}` reference."""

    contained: PatientIn | None
    reference: str | None
    expression: str


def _referenced_id(reference: str, kind: str) -> str | None:
    """`Patient/123`, `https://ehr/fhir/Patient/123/_history/2` -> `123` (for kind Patient)."""
    parts = reference.split("/")
    for index in range(len(parts) - 1):
        if parts[index] == kind and parts[index + 1]:
            return parts[index + 1]
    return None


def _participant_display(appointment: Any, kind: str) -> str | None:
    for participant in appointment.participant or []:
        actor = participant.actor
        if actor is None:
            continue
        named = (actor.reference and _referenced_id(actor.reference, kind)) or actor.type == kind
        if named and actor.display:
            return str(actor.display)
    return None


def _patient_ref(appointment: Any, clinic: Clinic) -> PatientRef:
    contained = {
        r.id: r for r in appointment.contained or [] if r.get_resource_type() == "Patient" and r.id
    }
    for index, participant in enumerate(appointment.participant or []):
        actor = participant.actor
        if actor is None or not actor.reference:
            continue
        where = f"Appointment.participant[{index}].actor"
        reference = str(actor.reference)
        if reference.startswith("#"):
            patient = contained.get(reference[1:])
            if patient is None:
                continue  # a contained Practitioner, Location, ...
            return PatientRef(_contained_patient(patient, clinic), None, where)
        patient_id = _referenced_id(reference, "Patient")
        if patient_id is not None:
            return PatientRef(None, patient_id, where)
    raise FhirError(
        422,
        "invalid",
        "Appointment.participant: no patient (a participant whose actor is a contained "
        "Patient `#id` or a `Patient/{id}` reference)",
        "Appointment.participant",
    )


def _contained_patient(patient: Any, clinic: Clinic) -> PatientIn:
    key = _first_identifier(patient)
    if key is None:
        phone = _phone(patient)
        if phone is None:
            raise FhirError(
                422,
                "invalid",
                "Patient: a contained Patient needs an identifier or a phone number",
                "Appointment.contained.Patient.identifier",
            )
        try:
            key = parse_phone(phone, clinic.country).e164
        except ValueError as exc:
            raise FhirError(
                422, "invalid", f"Patient.telecom: {exc}", "Appointment.contained.Patient.telecom"
            ) from None
    return patient_in(patient, key)


@dataclass(frozen=True)
class Mapped:
    external_id: str | None  # the first identifier.value
    patient: PatientRef
    fields: dict[str, Any]  # AppointmentIn without its patient


def map_appointment(data: dict[str, Any], clinic: Clinic) -> Mapped:
    """An Appointment resource as our fields; raises FhirError or _Invalid."""
    resource = _validate(FhirAppointment, data, "Appointment")
    status = str(resource.status)
    if status not in STATUS_IN:
        raise FhirError(
            422,
            "invalid",
            f"Appointment.status: {status!r} cannot be taken (use one of {', '.join(STATUS_IN)})",
            "Appointment.status",
        )
    ours, outcome = STATUS_IN[status]
    if resource.start is None:
        raise FhirError(422, "invalid", "Appointment.start: is required", "Appointment.start")
    start: dt.datetime = resource.start
    if resource.minutesDuration is not None:
        duration = int(resource.minutesDuration)
    elif resource.end is not None:
        seconds = (resource.end - start).total_seconds()
        if seconds <= 0:
            raise FhirError(
                422, "invalid", "Appointment.end: must be after start", "Appointment.end"
            )
        duration = max(1, round(seconds / 60))
    else:
        raise FhirError(
            422,
            "invalid",
            "Appointment.end: end or minutesDuration is required",
            "Appointment.end",
        )
    kind = None
    for concept in resource.serviceType or []:
        kind = _text(concept)
        if kind:
            break
    kind = kind or _text(resource.appointmentType)
    updated = resource.meta.lastUpdated if resource.meta is not None else None
    fields: dict[str, Any] = {
        "starts_at": start,
        "duration_minutes": duration,
        "practitioner": _participant_display(resource, "Practitioner"),
        "location": _participant_display(resource, "Location"),
        "kind": kind,
        "status": ours,
        "outcome": outcome,
        "source_updated_at": updated,
    }
    return Mapped(_first_identifier(resource), _patient_ref(resource, clinic), fields)


def _appointment_in(mapped: Mapped, patient: PatientIn) -> AppointmentIn:
    try:
        return AppointmentIn(**mapped.fields, patient=patient)
    except ValidationError as exc:
        errors = []
        for error in exc.errors():
            field = _where(error["loc"])
            where = _EXPRESSIONS.get(field, f"Appointment.{field}")
            reason = str(error["msg"]).removeprefix("Value error, ")
            errors.append(FhirError(422, "invalid", f"{where}: {reason}", where))
        raise _Invalid(errors) from None


def _stored_patient_in(session: Session, clinic: Clinic, ref: PatientRef) -> PatientIn:
    if ref.contained is not None:
        return ref.contained
    assert ref.reference is not None
    patient = session.scalar(
        select(Patient).where(Patient.clinic_id == clinic.id, Patient.external_id == ref.reference)
    )
    if patient is None:
        raise FhirError(
            422,
            "not-found",
            f"{ref.expression}: no Patient/{ref.reference} for this clinic "
            "(PUT /fhir/Patient/{id} first, or contain the Patient)",
            ref.expression,
        )
    return PatientIn(
        external_id=patient.external_id,
        name=patient.name,
        phone=patient.phone_e164,
        language=patient.language_requested,
    )


def _intake_error(exc: IntakeError) -> FhirError:
    where = _EXPRESSIONS.get(exc.field, f"Appointment.{exc.field}")
    return FhirError(422, "invalid", f"{where}: {exc.reason}", where)


# --------------------------------------------------------------------------------------------
# Ours -> FHIR


def _fhir_id(value: str) -> str | None:
    return value if _FHIR_ID.fullmatch(value) else None


def to_fhir(appointment: Appointment) -> str:
    """The stored appointment as an R4B Appointment (JSON), with the patient's answer."""
    patient = appointment.patient
    cancelled_by_patient = appointment.confirmation == "cancelled_by_patient"
    if appointment.status == "cancelled" or cancelled_by_patient:
        status = "cancelled"
    elif appointment.outcome == "no_show":
        status = "noshow"
    elif appointment.outcome == "attended":
        status = "fulfilled"
    elif appointment.outcome == "cancelled_late":
        status = "cancelled"
    else:
        status = "booked"
    answer = {"confirmed": "accepted", "cancelled_by_patient": "declined"}.get(
        appointment.confirmation, "needs-action"
    )
    actor: dict[str, Any] = {"type": "Patient", "identifier": {"value": patient.external_id}}
    if _fhir_id(patient.external_id):
        actor["reference"] = f"Patient/{patient.external_id}"
    if patient.name:
        actor["display"] = patient.name
    participants: list[dict[str, Any]] = [{"actor": actor, "status": answer}]
    for kind, display in (
        ("Practitioner", appointment.practitioner),
        ("Location", appointment.location),
    ):
        if display:
            participants.append({"actor": {"type": kind, "display": display}, "status": "accepted"})
    start = appointment.starts_at.astimezone(dt.UTC)
    end = start + dt.timedelta(minutes=appointment.duration_minutes)
    resource: dict[str, Any] = {
        "resourceType": "Appointment",
        "meta": {"lastUpdated": _instant(appointment.updated_at)},
        "identifier": [{"value": appointment.external_id}],
        "status": status,
        "start": _instant(start),
        "end": _instant(end),
        "minutesDuration": appointment.duration_minutes,
        "participant": participants,
    }
    if _fhir_id(appointment.external_id):
        resource["id"] = appointment.external_id
    if appointment.kind:
        resource["serviceType"] = [{"text": appointment.kind}]
    if cancelled_by_patient:
        resource["cancelationReason"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason",
                    "code": "pat",
                    "display": "Patient",
                }
            ],
            "text": PATIENT_CANCELLED,
        }
    model = FhirAppointment.model_validate(resource)
    return str(model.model_dump_json(exclude_none=True))


def _instant(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------
# Requests


def _api_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("a Bearer API key is required")
    return key.strip()


def _unauthorized(reason: str) -> FhirError:
    return FhirError(
        401,
        "security",
        f"Authorization: {reason}",
        "Authorization",
        {"WWW-Authenticate": 'Bearer realm="reminders"'},
    )


def _in_transaction(key: str, work: Callable[[Session, Clinic], T]) -> T:
    """Runs `work` for the key's clinic in one transaction; again if a concurrent insert of the
    same id won."""
    for attempt in (1, 2, 3):
        try:
            with session_scope() as session:
                clinic = clinic_by_api_key(session, key)
                if clinic is None:
                    raise _unauthorized("unknown or revoked API key")
                return work(session, clinic)
        except IntegrityError:
            if attempt == 3:
                raise
    raise AssertionError("unreachable")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _handle(request: Request, work: Callable[[str, bytes], Response]) -> Response:
    """Authenticates, reads the body and runs `work` off the event loop; errors as
    OperationOutcome."""
    try:
        key = _api_key(request)
        raw = await request.body()
        return await run_in_threadpool(work, key, raw)
    except FhirError as exc:
        return _error_response([exc])
    except _Invalid as exc:
        return _error_response(exc.errors)


router = APIRouter(prefix="/fhir", tags=["fhir"])


def _put_appointment(
    key: str, raw: bytes, content_type: str | None, path_id: str | None
) -> Response:
    data = _parse_body(raw, content_type, "Appointment")

    def work(session: Session, clinic: Clinic) -> tuple[str, str, str]:
        mapped = map_appointment(data, clinic)
        external_id = path_id if path_id is not None else mapped.external_id
        if external_id is None:
            raise FhirError(
                422,
                "invalid",
                "Appointment.identifier: POST needs an identifier with a value "
                "(it is the appointment's id here)",
                "Appointment.identifier",
            )
        if path_id is not None and data.get("id") not in (None, path_id):
            raise FhirError(
                400,
                "invalid",
                f"Appointment.id: {data.get('id')!r} differs from the id in the URL {path_id!r}",
                "Appointment.id",
            )
        body = _appointment_in(mapped, _stored_patient_in(session, clinic, mapped.patient))
        try:
            appointment, result = Intake(
                session, clinic, _now(), process_secret_key(get_settings())
            ).put(external_id, body)
        except IntakeError as exc:
            raise _intake_error(exc) from None
        session.flush()
        session.refresh(appointment)
        return external_id, result, to_fhir(appointment)

    external_id, result, body = _in_transaction(key, work)
    headers = {"X-Reminders-Result": result}
    if _fhir_id(external_id):
        headers["Location"] = f"/fhir/Appointment/{external_id}"
    return _fhir_response(body, 201 if result == "created" else 200, headers)


@router.put("/Appointment/{appointment_id}")
async def put_appointment(appointment_id: str, request: Request) -> Response:
    """Creates or updates the appointment whose external id is `appointment_id`, from an R4
    Appointment. Answers 201 (created) or 200, with `X-Reminders-Result`: created, updated,
    unchanged or stale (an older `meta.lastUpdated` than the stored one)."""
    content_type = request.headers.get("content-type")
    return await _handle(
        request, lambda key, raw: _put_appointment(key, raw, content_type, appointment_id)
    )


@router.post("/Appointment")
async def post_appointment(request: Request) -> Response:
    """The same, keyed by the Appointment's first `identifier.value`."""
    content_type = request.headers.get("content-type")
    return await _handle(request, lambda key, raw: _put_appointment(key, raw, content_type, None))


@router.get("/Appointment/{appointment_id}")
async def get_appointment(appointment_id: str, request: Request) -> Response:
    """The stored appointment as an R4 Appointment: the patient participant is `accepted` once
    the patient confirmed, `declined` (and the Appointment `cancelled`, with a
    `cancelationReason`) once the patient cancelled, `needs-action` otherwise."""

    def run(key: str, raw: bytes) -> Response:
        def work(session: Session, clinic: Clinic) -> str:
            appointment = session.scalar(
                select(Appointment).where(
                    Appointment.clinic_id == clinic.id,
                    Appointment.external_id == appointment_id,
                )
            )
            if appointment is None:
                raise FhirError(
                    404,
                    "not-found",
                    f"Appointment/{appointment_id}: no such appointment for this clinic",
                    "Appointment.id",
                )
            return to_fhir(appointment)

        return _fhir_response(_in_transaction(key, work))

    return await _handle(request, run)


@router.put("/Patient/{patient_id}")
async def put_patient(patient_id: str, request: Request) -> Response:
    """Creates or updates a patient that Appointments reference as `Patient/{id}` (its key is
    the id). Answers 201 or 200 with the Patient as received."""
    content_type = request.headers.get("content-type")

    def run(key: str, raw: bytes) -> Response:
        data = _parse_body(raw, content_type, "Patient")
        if data.get("id") not in (None, patient_id):
            raise FhirError(
                400,
                "invalid",
                f"Patient.id: {data.get('id')!r} differs from the id in the URL {patient_id!r}",
                "Patient.id",
            )
        resource = _validate(FhirPatient, data, "Patient")
        incoming = patient_in(resource, patient_id)

        def work(session: Session, clinic: Clinic) -> bool:
            known = session.scalar(
                select(Patient.id).where(
                    Patient.clinic_id == clinic.id, Patient.external_id == patient_id
                )
            )
            try:
                Intake(session, clinic, _now(), process_secret_key(get_settings())).put_patient(
                    patient_id, incoming
                )
            except IntakeError as exc:
                raise _intake_error(exc) from None
            return known is None

        created = _in_transaction(key, work)
        out = {**data, "id": patient_id}
        return _fhir_response(
            out,
            201 if created else 200,
            {"Location": f"/fhir/Patient/{patient_id}"} if _fhir_id(patient_id) else None,
        )

    return await _handle(request, run)
