"""The HTTP API for clinic systems: appointments in, their state and messages out.

Every error is `application/problem+json` (RFC 9457) naming the field and the reason. Each handler
owns one transaction, committed before the answer is sent.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import redis
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reminders import __version__, events, fhir, links, replies, report, webhooks
from reminders.clinics import clinic_by_api_key
from reminders.config import get_settings
from reminders.db import session_scope
from reminders.dispatch import sending_stopped
from reminders.models import Appointment, Clinic
from reminders.planning import Intake, IntakeError, Upserted
from reminders.schemas import (
    AppointmentIn,
    AppointmentOut,
    BatchIn,
    BatchItem,
    BatchOut,
    BatchResult,
    FieldError,
    OutcomeIn,
    Problem,
)
from reminders.security import process_secret_key

MAX_BODY_BYTES = 2 * 1024 * 1024
PROBLEM = "application/problem+json"
T = TypeVar("T")
_batch_item = TypeAdapter(BatchItem)


class ProblemError(Exception):
    def __init__(
        self,
        status: int,
        title: str,
        errors: list[FieldError] | None = None,
        detail: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.problem = problem(status, title, errors or [], detail)
        self.headers = headers


def problem(
    status: int, title: str, errors: list[FieldError], detail: str | None = None
) -> Problem:
    if detail is None:
        detail = "; ".join(f"{e.field}: {e.reason}" for e in errors) or title
    return Problem(title=title, status=status, detail=detail, errors=errors)


def problem_response(p: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(p.model_dump(), status_code=p.status, media_type=PROBLEM, headers=headers)


def field_name(loc: tuple[int | str, ...]) -> str:
    """("body", "patient", "phone") -> "patient.phone"; list indices as [i]."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "path", "query") else loc)
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or (str(loc[0]) if loc else "body")


def validation_errors(errors: list[Any]) -> list[FieldError]:
    out = []
    for error in errors:
        reason = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "missing":
            reason = "is required"
        out.append(FieldError(field=field_name(tuple(error["loc"])), reason=reason))
    return out


class BodyLimit:
    """Refuses bodies over `limit` bytes with 413, whether announced or streamed."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, receive, send)
            return
        # Read the whole body first (it is small by then), so a streamed body over the limit is
        # refused before the app sees any of it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            problem(
                413,
                "Content Too Large",
                [FieldError(field="body", reason=f"larger than {self.limit} bytes")],
            )
        )
        await response(scope, receive, send)


bearer = HTTPBearer(auto_error=False)


def authenticated_clinic(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> int:
    """The id of the clinic whose API key is presented; 401 otherwise."""
    challenge = {"WWW-Authenticate": 'Bearer realm="reminders"'}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ProblemError(
            401,
            "Unauthorized",
            [FieldError(field="Authorization", reason="a Bearer API key is required")],
            headers=challenge,
        )
    with session_scope() as session:
        clinic = clinic_by_api_key(session, credentials.credentials)
        if clinic is None:
            raise ProblemError(
                401,
                "Unauthorized",
                [FieldError(field="Authorization", reason="unknown or revoked API key")],
                headers=challenge,
            )
        return clinic.id


ClinicId = Annotated[int, Depends(authenticated_clinic)]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _secret() -> bytes:
    return process_secret_key(get_settings())


def _transaction(work: Callable[[Session, Clinic], T], clinic_id: int) -> T:
    """Runs `work` in one transaction; again if a concurrent insert of the same id won."""
    for attempt in (1, 2, 3):
        try:
            with session_scope() as session:
                clinic = session.get(Clinic, clinic_id)
                assert clinic is not None
                return work(session, clinic)
        except (IntegrityError, OperationalError) as exc:
            # A concurrent insert of the same id won, or PostgreSQL broke a deadlock between
            # two batches: the work is idempotent, so run it again.
            transient = isinstance(exc, IntegrityError) or getattr(exc.orig, "sqlstate", None) in (
                "40P01",
                "40001",
            )
            if attempt == 3 or not transient:
                raise
    raise AssertionError("unreachable")


def _intake_problem(exc: IntakeError) -> ProblemError:
    return ProblemError(
        422, "Unprocessable Content", [FieldError(field=exc.field, reason=exc.reason)]
    )


def _not_found(external_id: str) -> ProblemError:
    return ProblemError(
        404,
        "Not Found",
        [FieldError(field="external_id", reason=f"no appointment {external_id!r} for this clinic")],
    )


router = APIRouter(prefix="/v1", tags=["appointments"])


@router.put(
    "/appointments/{external_id:path}",
    response_model=AppointmentOut,
    responses={201: {"model": AppointmentOut}, 422: {"model": Problem}, 401: {"model": Problem}},
)
def put_appointment(external_id: str, body: AppointmentIn, clinic_id: ClinicId) -> JSONResponse:
    """Creates or updates an appointment. The same body twice answers `unchanged`."""

    def work(session: Session, clinic: Clinic) -> AppointmentOut:
        try:
            appointment, result = Intake(session, clinic, _now(), _secret()).put(external_id, body)
        except IntakeError as exc:
            raise _intake_problem(exc) from None
        session.flush()
        return AppointmentOut.of(appointment, result)

    out = _transaction(work, clinic_id)
    status = 201 if out.result == "created" else 200
    return JSONResponse(out.model_dump(mode="json"), status_code=status)


@router.post("/appointments/batch", response_model=BatchOut)
def post_batch(body: BatchIn, clinic_id: ClinicId) -> BatchOut:
    """Up to 1000 appointments; each gets its own result, a bad one never blocks the others."""
    results: list[BatchResult | None] = [None] * len(body.appointments)
    valid: list[tuple[int, BatchItem]] = []
    for index, raw in enumerate(body.appointments):
        try:
            valid.append((index, _batch_item.validate_python(raw)))
        except ValidationError as exc:
            results[index] = BatchResult(
                external_id=_printable_id(raw.get("external_id")),
                result="error",
                error=problem(422, "Unprocessable Content", validation_errors(exc.errors())),
            )

    def work(session: Session, clinic: Clinic) -> list[BatchResult]:
        outcomes = Intake(session, clinic, _now(), _secret()).batch([item for _, item in valid])
        return [
            _batch_result(item.external_id, o) for (_, item), o in zip(valid, outcomes, strict=True)
        ]

    for (index, _), result in zip(valid, _transaction(work, clinic_id), strict=True):
        results[index] = result
    return BatchOut(results=[r for r in results if r is not None])


def _printable_id(value: object) -> str | None:
    """The item's id as given, escaped if it is not valid UTF-8 (so the client can find it)."""
    if not isinstance(value, str):
        return None
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _batch_result(external_id: str, outcome: Upserted | IntakeError) -> BatchResult:
    if isinstance(outcome, IntakeError):
        error = problem(
            422, "Unprocessable Content", [FieldError(field=outcome.field, reason=outcome.reason)]
        )
        return BatchResult(external_id=external_id, result="error", error=error)
    return BatchResult(external_id=external_id, result=outcome.result)


@router.post("/appointments/{external_id:path}/cancel", response_model=AppointmentOut)
def cancel_appointment(external_id: str, clinic_id: ClinicId) -> AppointmentOut:
    """The clinic cancels: pending reminders are dropped. Cancelling twice answers `unchanged`."""

    def work(session: Session, clinic: Clinic) -> AppointmentOut:
        try:
            done = Intake(session, clinic, _now(), _secret()).cancel(external_id)
        except LookupError:
            raise _not_found(external_id) from None
        session.flush()
        assert done.appointment is not None
        return AppointmentOut.of(done.appointment, done.result)

    return _transaction(work, clinic_id)


@router.post("/appointments/{external_id:path}/confirm", response_model=AppointmentOut)
def confirm_appointment(external_id: str, clinic_id: ClinicId) -> AppointmentOut:
    """Staff took the patient's confirmation by phone: recorded like the patient's own (no SMS
    is sent back). A patient's cancellation is final and stays."""

    def work(session: Session, clinic: Clinic) -> AppointmentOut:
        appointment = Intake(session, clinic, _now(), _secret()).appointment(external_id)
        if appointment is None:
            raise _not_found(external_id)
        decision = replies.decide(session, appointment, "confirm", "staff", _now())
        session.refresh(appointment)
        return AppointmentOut.of(appointment, "updated" if decision.changed else "unchanged")

    return _transaction(work, clinic_id)


@router.post(
    "/appointments/{external_id:path}/outcome",
    response_model=AppointmentOut,
    responses={404: {"model": Problem}, 422: {"model": Problem}},
)
def record_outcome(external_id: str, body: OutcomeIn, clinic_id: ClinicId) -> AppointmentOut:
    """What happened at an appointment that has started: `attended`, `no_show` or
    `cancelled_late`. The same outcome again answers `unchanged`; another one corrects it."""

    def work(session: Session, clinic: Clinic) -> AppointmentOut:
        try:
            appointment, result = report.record_outcome(
                session, clinic.id, external_id, body.outcome, _now()
            )
        except LookupError:
            raise _not_found(external_id) from None
        except report.ReportError as exc:
            raise ProblemError(
                422, "Unprocessable Content", [FieldError(field=exc.field, reason=exc.reason)]
            ) from None
        session.flush()
        return AppointmentOut.of(appointment, "updated" if result == "updated" else "unchanged")

    return _transaction(work, clinic_id)


@router.get("/appointments/{external_id:path}", response_model=AppointmentOut)
def get_appointment(external_id: str, clinic_id: ClinicId) -> AppointmentOut:
    """An appointment with its patient, answer and messages. Another clinic's is a 404."""

    def work(session: Session, clinic: Clinic) -> AppointmentOut:
        appointment = session.scalar(
            select(Appointment).where(
                Appointment.clinic_id == clinic.id, Appointment.external_id == external_id
            )
        )
        if appointment is None:
            raise _not_found(external_id)
        return AppointmentOut.of(appointment)

    return _transaction(work, clinic_id)


class EventOut(BaseModel):
    id: int
    type: str
    at: str
    appointment: str | None
    data: dict[str, Any]


class EventsOut(BaseModel):
    events: list[EventOut]
    next: int = Field(description="pass it as `after` to read on; never skips a late commit")


@router.get("/events", response_model=EventsOut, tags=["events"])
def list_events(
    clinic_id: ClinicId,
    after: Annotated[
        int, Query(ge=0, le=2**31 - 1, description="the last event id already read")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventsOut:
    """The clinic's events after `after`, oldest first."""

    def work(session: Session, clinic: Clinic) -> EventsOut:
        rows, cursor = events.feed(session, clinic.id, after, limit)
        return EventsOut(events=[EventOut(**events.envelope(e)) for e in rows], next=cursor)

    return _transaction(work, clinic_id)


@router.get("/reports/weekly", tags=["reports"], responses={422: {"model": Problem}})
def weekly_report(
    clinic_id: ClinicId,
    week: Annotated[
        str | None,
        Query(description="ISO week like 2026-W47; default: the last complete week"),
    ] = None,
) -> dict[str, Any]:
    """The clinic's weekly no-show report (the contract's JSON): the one built on Monday when
    there is one, else computed now."""

    def work(session: Session, clinic: Clinic) -> dict[str, Any]:
        try:
            return report.report_for(session, clinic, week, _now())
        except report.ReportError as exc:
            raise ProblemError(
                422, "Unprocessable Content", [FieldError(field=exc.field, reason=exc.reason)]
            ) from None

    return _transaction(work, clinic_id)


health = APIRouter(tags=["health"])


@health.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@health.get("/readyz", responses={503: {"model": Problem}})
def readyz() -> JSONResponse:
    """The database (and Redis, when configured) answer."""
    checks: dict[str, str] = {}
    try:
        with session_scope() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except SQLAlchemyError as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    if checks["database"] == "ok":
        with session_scope() as session:
            stopped = sending_stopped(session, _now())
        checks["sms"] = "ok" if stopped is None else f"stopped: {stopped}"
    url = get_settings().redis_url
    if url is None:
        checks["redis"] = "not configured (embedded mode)"
    else:
        try:
            redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
            checks["redis"] = "ok"
        except redis.RedisError as exc:
            checks["redis"] = f"unreachable: {type(exc).__name__}"
    failing = [
        FieldError(field=k, reason=v)
        for k, v in checks.items()
        if v.startswith(("unreachable", "stopped"))
    ]
    if failing:
        return problem_response(problem(503, "Service Unavailable", failing))
    return JSONResponse({"status": "ready", **checks})


def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e["type"] == "json_invalid" for e in errors):
        reason = next(
            str(e.get("ctx", {}).get("error", e["msg"]))
            for e in errors
            if e["type"] == "json_invalid"
        )
        return problem_response(
            problem(
                400, "Bad Request", [FieldError(field="body", reason=f"invalid JSON: {reason}")]
            )
        )
    return problem_response(problem(422, "Unprocessable Content", validation_errors(errors)))


def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(exc.problem, exc.headers)


def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    title = {404: "Not Found", 405: "Method Not Allowed"}.get(exc.status_code, str(exc.detail))
    field = "path" if exc.status_code in (404, 405) else "request"
    return problem_response(
        problem(exc.status_code, title, [FieldError(field=field, reason=str(exc.detail))]),
        getattr(exc, "headers", None),
    )


def _documented_errors(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document, saying what errors really look like: problem details (RFC 9457,
    `application/problem+json`) for any error status, FHIR resources (`application/fhir+json`)
    from /fhir, and `{"status": "unauthorized"}` for a webhook whose signature fails."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components.setdefault("Problem", Problem.model_json_schema(ref_template=_REF))
        components.setdefault("FieldError", FieldError.model_json_schema(ref_template=_REF))
        problem_content = {PROBLEM: {"schema": {"$ref": _REF.format(model="Problem")}}}
        for path, operations in schema.get("paths", {}).items():
            error: dict[str, Any] = {"description": "Problem details", "content": problem_content}
            if path.startswith("/fhir/"):
                fhir_content: dict[str, Any] = {fhir.FHIR_JSON: {"schema": {}}}
                # FHIR answers an OperationOutcome; a body too large is refused before it.
                error = {"description": "An OperationOutcome", "content": fhir_content}
                error["content"] |= problem_content
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                for status in responses:
                    if not status.startswith("2"):
                        responses[status] = error
                    elif path.startswith("/fhir/"):
                        responses[status] = {
                            "description": "A FHIR resource",
                            "content": fhir_content,
                        }
                if path.startswith("/webhooks/"):
                    responses["401"] = {
                        "description": "A missing, wrong or stale signature",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                responses["default"] = error
        app.openapi_schema = schema
        return schema

    return openapi


_REF = "#/components/schemas/{model}"


def create_app() -> FastAPI:
    app = FastAPI(
        title="reminders",
        version=__version__,
        summary="Two-way SMS appointment reminders: push appointments, read the patients' answers.",
    )
    app.include_router(router)
    app.include_router(webhooks.router)
    app.include_router(fhir.router)
    app.include_router(health)
    app.include_router(links.router)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_middleware(BodyLimit)
    app.openapi = _documented_errors(app)  # type: ignore[method-assign]
    return app
