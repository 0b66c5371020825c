"""What clinic systems send and get back: one definition shared by every intake feed.

Unknown fields are ignored (decided once, for every body): clinic systems add fields over time and
a stricter check would break their integration on their next upgrade, while every field we need is
required or has a stated default.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from reminders.models import Appointment, Reminder

ExternalId = Annotated[str, StringConstraints(min_length=1, max_length=200)]
ShortText = Annotated[str, StringConstraints(max_length=200)]
Status = Literal["booked", "cancelled"]
Outcome = Literal["attended", "no_show", "cancelled_late"]
Result = Literal["created", "updated", "unchanged", "stale", "cancelled", "error"]

MAX_BATCH = 1000


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def check_external_id(value: str) -> str:
    """Raises ValueError unless `value` is 1-200 characters of valid UTF-8 without controls."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > 200:
        raise ValueError("at most 200 characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid UTF-8") from None
    if "\ufffd" in value:
        raise ValueError("not valid UTF-8 (contains a replacement character)")
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.utcoffset() is None:
        raise ValueError("must carry a UTC offset, e.g. 2026-11-24T09:30:00+01:00")
    return value


class PatientIn(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    external_id: ExternalId
    name: ShortText | None = None
    phone: Annotated[str, StringConstraints(max_length=40)] | None = None
    language: Annotated[str, StringConstraints(max_length=35)] | None = None

    _check_id = field_validator("external_id")(check_external_id)


class AppointmentIn(BaseModel):
    """The body of `PUT /v1/appointments/{external_id}`."""

    model_config = ConfigDict(
        extra="ignore",
        str_strip_whitespace=True,
        json_schema_extra={
            "example": {
                "starts_at": "2026-11-24T09:30:00+01:00",
                "duration_minutes": 20,
                "patient": {
                    "external_id": "P1",
                    "name": "Marie Curie",
                    "phone": "06 12 34 56 78",
                    "language": "fr",
                },
                "practitioner": "Dr Martin",
                "location": "Cabinet 2",
                "kind": "consultation",
                "status": "booked",
            }
        },
    )

    starts_at: dt.datetime
    duration_minutes: int = Field(gt=0, le=1440)
    patient: PatientIn
    practitioner: ShortText | None = None
    location: ShortText | None = None
    kind: Annotated[str, StringConstraints(max_length=100)] | None = None
    status: Status = "booked"
    outcome: Outcome | None = None
    source_updated_at: dt.datetime | None = None

    _aware_start = field_validator("starts_at")(_aware)
    _aware_source = field_validator("source_updated_at")(_aware)


class OutcomeIn(BaseModel):
    """The body of `POST /v1/appointments/{external_id}/outcome`."""

    outcome: Outcome


class BatchItem(AppointmentIn):
    external_id: ExternalId

    _check_id = field_validator("external_id")(check_external_id)


class MessageOut(BaseModel):
    id: int
    kind: str
    rule: str
    status: str
    skip_reason: str | None
    due_at: dt.datetime
    sent_at: dt.datetime | None
    delivery_status: str | None
    segments: int | None
    price: float | None

    @classmethod
    def of(cls, r: Reminder) -> MessageOut:
        return cls(
            id=r.id,
            kind=r.kind,
            rule=r.rule,
            status=r.status,
            skip_reason=r.skip_reason,
            due_at=r.due_at,
            sent_at=r.sent_at,
            delivery_status=r.delivery_status,
            segments=r.segments,
            price=r.price,
        )


class PatientOut(BaseModel):
    external_id: str
    name: str | None
    phone_e164: str | None
    sms_capable: bool
    language: str
    language_requested: str | None
    language_fallback: bool


class AppointmentOut(BaseModel):
    external_id: str
    result: Result | None = None
    starts_at: dt.datetime
    duration_minutes: int
    practitioner: str | None
    location: str | None
    kind: str | None
    status: Status
    confirmation: Literal["unconfirmed", "confirmed", "cancelled_by_patient"]
    outcome: Outcome | None
    source_updated_at: dt.datetime | None
    language: str = Field(description="the language of the texts this patient gets")
    language_fallback: bool = Field(
        description="true when the patient's language has no texts and the clinic's is used"
    )
    patient: PatientOut
    messages: list[MessageOut]
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(cls, a: Appointment, result: Result | None = None) -> AppointmentOut:
        p = a.patient
        return cls(
            external_id=a.external_id,
            result=result,
            starts_at=a.starts_at,
            duration_minutes=a.duration_minutes,
            practitioner=a.practitioner,
            location=a.location,
            kind=a.kind,
            status=a.status,
            confirmation=a.confirmation,
            outcome=a.outcome,
            source_updated_at=a.source_updated_at,
            language=p.language,
            language_fallback=p.language_fallback,
            patient=PatientOut(
                external_id=p.external_id,
                name=p.name,
                phone_e164=p.phone_e164,
                sms_capable=p.sms_capable,
                language=p.language,
                language_requested=p.language_requested,
                language_fallback=p.language_fallback,
            ),
            messages=[MessageOut.of(r) for r in a.reminders],
            created_at=a.created_at,
            updated_at=a.updated_at,
        )


class FieldError(BaseModel):
    field: str
    reason: str


class Problem(BaseModel):
    """RFC 9457 problem details, with each bad field and its reason in `errors`."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[FieldError] = []


class BatchIn(BaseModel):
    # Items are validated one by one in the handler, so a bad item never sinks the batch.
    appointments: list[dict[str, object]] = Field(max_length=MAX_BATCH)


class BatchResult(BaseModel):
    external_id: str | None
    result: Result
    error: Problem | None = None


class BatchOut(BaseModel):
    results: list[BatchResult]
