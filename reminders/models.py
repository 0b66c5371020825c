"""The schema: clinics, patients, appointments, reminders (the outbox), inbound messages, opt-outs,
events. Alembic migrations create it; a test proves migrations and models match."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Time,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from reminders.db import Base, UTCDateTime

APPOINTMENT_STATUSES = ("booked", "cancelled")
CONFIRMATIONS = ("unconfirmed", "confirmed", "cancelled_by_patient")
OUTCOMES = ("attended", "no_show", "cancelled_late")
REMINDER_STATUSES = ("planned", "queued", "sending", "unknown", "sent", "skipped", "failed")
# SMS that answer a patient (not reminders): sent at any hour, even for a paused clinic.
ANSWER_KINDS = ("ack", "opted_out", "opted_in", "unclear")
# Statuses of a reminder that went out, or may have: the patient may rely on what it said.
WENT_OUT = ("sent", "sending", "unknown")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Timestamps:
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(
        UTCDateTime, server_default=func.now(), onupdate=func.now()
    )


class AppSetting(Base):
    """Process-independent values kept in the database (the embedded-mode secret key)."""

    __tablename__ = "app_settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Clinic(Timestamps, Base):
    __tablename__ = "clinics"
    __table_args__ = (
        CheckConstraint("holdout >= 0 AND holdout < 1", name="holdout_range"),
        CheckConstraint("deadline_minutes >= 0", name="deadline_positive"),
        CheckConstraint("daily_cap IS NULL OR daily_cap > 0", name="daily_cap_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    country: Mapped[str] = mapped_column(String(2))
    language: Mapped[str] = mapped_column(String(8))
    sender: Mapped[str | None] = mapped_column(String(20))
    # "72h,24h:unconfirmed": offsets before the start, optionally only while unconfirmed.
    rules: Mapped[str] = mapped_column(String(200), default="72h,24h:unconfirmed")
    # Both None: no quiet hours (clinics.create_clinic sets the 20:00-08:00 default).
    quiet_start: Mapped[dt.time | None] = mapped_column(Time)
    quiet_end: Mapped[dt.time | None] = mapped_column(Time)
    deadline_minutes: Mapped[int] = mapped_column(Integer, default=120)
    holdout: Mapped[float] = mapped_column(Float, default=0.0)
    go_live: Mapped[dt.date | None] = mapped_column(Date)
    daily_cap: Mapped[int | None] = mapped_column(Integer)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    # Kept in clear: we must sign with it. It only authenticates our calls to the clinic.
    webhook_secret: Mapped[str | None] = mapped_column(String(100))
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)


class Patient(Timestamps, Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("clinic_id", "external_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(200))
    name: Mapped[str | None] = mapped_column(String(200))
    phone_e164: Mapped[str | None] = mapped_column(String(20), index=True)
    sms_capable: Mapped[bool] = mapped_column(Boolean, default=False)
    # What the clinic sent (e.g. "zh-CN") and what texts we use ("zh").
    language_requested: Mapped[str | None] = mapped_column(String(35))
    language: Mapped[str] = mapped_column(String(8))
    language_fallback: Mapped[bool] = mapped_column(Boolean, default=False)


class Appointment(Timestamps, Base):
    __tablename__ = "appointments"
    __table_args__ = (
        UniqueConstraint("clinic_id", "external_id"),
        CheckConstraint(_in("status", APPOINTMENT_STATUSES), name="status_known"),
        CheckConstraint(_in("confirmation", CONFIRMATIONS), name="confirmation_known"),
        CheckConstraint(f"outcome IS NULL OR {_in('outcome', OUTCOMES)}", name="outcome_known"),
        CheckConstraint("duration_minutes > 0 AND duration_minutes <= 1440", name="duration_range"),
        # The weekly report aggregates one clinic's appointments over a time range: with these
        # columns included, PostgreSQL answers those queries from the index alone.
        Index(
            "ix_appointments_clinic_starts",
            "clinic_id",
            "starts_at",
            postgresql_include=["patient_id", "holdout", "outcome", "confirmation", "booked_at"],
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(200))
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    starts_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    duration_minutes: Mapped[int] = mapped_column(Integer)
    practitioner: Mapped[str | None] = mapped_column(String(200))
    location: Mapped[str | None] = mapped_column(String(200))
    kind: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default="booked")
    confirmation: Mapped[str] = mapped_column(String(24), default="unconfirmed")
    outcome: Mapped[str | None] = mapped_column(String(16))
    source_updated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # When this booking (this start time) was made: the lead time in reports.
    booked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    decided_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # None until the first reminder is planned; then fixed (the randomised arm of the report).
    holdout: Mapped[bool | None] = mapped_column(Boolean)
    # The patient link's token (/c/{token}): a keyed hash, made with the first reminder.
    link_token: Mapped[str | None] = mapped_column(String(32), unique=True)
    # A digest of the last body the clinic pushed that was applied in full: the same body again
    # is answered `unchanged` without reading the row. Cleared by any other change.
    content_hash: Mapped[str | None] = mapped_column(String(32))

    patient: Mapped[Patient] = relationship(lazy="joined", innerjoin=True)
    reminders: Mapped[list[Reminder]] = relationship(
        back_populates="appointment", order_by="Reminder.id"
    )


class Reminder(Timestamps, Base):
    """One outbound SMS: a row before it is a queue job (the outbox)."""

    __tablename__ = "reminders"
    __table_args__ = (
        # One (appointment, rule, start time) can never give two rows.
        UniqueConstraint("appointment_id", "rule", "appointment_starts_at"),
        CheckConstraint(_in("status", REMINDER_STATUSES), name="status_known"),
        # The daily cap counts a clinic's SMS since its midnight.
        Index("ix_reminders_clinic_claimed", "clinic_id", "claimed_at"),
        # A reply applies to the latest reminder sent to the number it came from.
        Index("ix_reminders_phone_sent", "phone_e164", "sent_at"),
        # The scheduler's scans touch only the small set of rows still in play, so an idle tick
        # costs the same at any table size.
        Index(
            "ix_reminders_planned_due",
            "due_at",
            postgresql_where=text("status = 'planned'"),
            sqlite_where=text("status = 'planned'"),
        ),
        Index(
            "ix_reminders_in_flight",
            "status",
            "claimed_at",
            postgresql_where=text("status IN ('queued', 'sending', 'unknown')"),
            sqlite_where=text("status IN ('queued', 'sending', 'unknown')"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"))
    appointment_id: Mapped[int | None] = mapped_column(ForeignKey("appointments.id"))
    phone_e164: Mapped[str] = mapped_column(String(20))
    kind: Mapped[str] = mapped_column(String(16))  # reminder, late, moved, ack, ...
    rule: Mapped[str] = mapped_column(String(64))
    appointment_starts_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    due_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    send_by: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16), default="planned")
    skip_reason: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(String(500))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    claimed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    provider_message_id: Mapped[str | None] = mapped_column(String(64), index=True)
    text: Mapped[str | None] = mapped_column(Text)
    encoding: Mapped[str | None] = mapped_column(String(8))
    segments: Mapped[int | None] = mapped_column(Integer)
    price: Mapped[float | None] = mapped_column(Float)
    delivery_status: Mapped[str | None] = mapped_column(String(16))
    delivery_error: Mapped[str | None] = mapped_column(String(16))
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    appointment: Mapped[Appointment | None] = relationship(back_populates="reminders")


class Template(Timestamps, Base):
    """A clinic's own text for one kind of SMS in one language (Jinja2, sandboxed)."""

    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("clinic_id", "kind", "language"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    language: Mapped[str] = mapped_column(String(8))
    source: Mapped[str] = mapped_column(Text)


class InboundMessage(Timestamps, Base):
    """An SMS from a patient, kept once per provider message id: stored by the webhook, then
    applied by a worker (`result` set; `applied_at` too, except for a part still waiting for the
    rest of its message)."""

    __tablename__ = "inbound_messages"
    __table_args__ = (
        Index("ix_inbound_messages_concat", "msisdn", "concat_ref"),
        # Replies stored and not yet applied: the worker's claim and the sweep read only these.
        Index(
            "ix_inbound_messages_pending",
            "id",
            postgresql_where=text("result IS NULL"),
            sqlite_where=text("result IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider_message_id: Mapped[str] = mapped_column(String(64), unique=True)
    clinic_id: Mapped[int | None] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"))
    appointment_id: Mapped[int | None] = mapped_column(ForeignKey("appointments.id"))
    msisdn: Mapped[str] = mapped_column(String(20), index=True)
    to_number: Mapped[str] = mapped_column(String(20))
    text: Mapped[str] = mapped_column(Text)
    concat_ref: Mapped[str | None] = mapped_column(String(32))
    concat_total: Mapped[int | None] = mapped_column(Integer)
    concat_part: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    applied_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[str | None] = mapped_column(String(32))


class DeliveryReceipt(Base):
    """A delivery receipt as Vonage sent it; kept so one that arrives before its send is
    recorded is applied once the send is."""

    __tablename__ = "delivery_receipts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider_message_id: Mapped[str | None] = mapped_column(String(64), index=True)
    client_ref: Mapped[str | None] = mapped_column(String(40), index=True)
    status: Mapped[str] = mapped_column(String(16))
    err_code: Mapped[str | None] = mapped_column(String(8))
    price: Mapped[float | None] = mapped_column(Float)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    reminder_id: Mapped[int | None] = mapped_column(ForeignKey("reminders.id"), index=True)


class OptOut(Timestamps, Base):
    """A number that said STOP to a sender: nothing more goes from that sender to it."""

    __tablename__ = "opt_outs"
    __table_args__ = (UniqueConstraint("phone_e164", "sender"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    phone_e164: Mapped[str] = mapped_column(String(20))
    sender: Mapped[str] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(String(32))


class Event(Base):
    """Something the clinic system must learn; ids increase per clinic, never skipping."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_clinic_id_id", "clinic_id", "id"),
        Index(
            "ix_events_webhook_pending",
            "webhook_next_at",
            postgresql_where=text("webhook_status IN ('pending', 'sending')"),
            sqlite_where=text("webhook_status IN ('pending', 'sending')"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(40))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    appointment_external_id: Mapped[str | None] = mapped_column(String(200))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Delivery to the clinic's webhook: none (no URL), pending, delivered or failed (after 24 h).
    webhook_status: Mapped[str] = mapped_column(String(16), default="none", server_default="none")
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_next_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    webhook_error: Mapped[str | None] = mapped_column(String(300))
    webhook_delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class WeeklyReport(Base):
    """One clinic's report for one ISO week: the unique row makes the Monday build happen once
    however many schedulers run; `data` holds the JSON once built."""

    __tablename__ = "weekly_reports"
    __table_args__ = (UniqueConstraint("clinic_id", "week"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinics.id", ondelete="CASCADE"))
    week: Mapped[str] = mapped_column(String(8))  # 2026-W47
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued, built
    queued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    built_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
