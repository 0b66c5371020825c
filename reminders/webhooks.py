"""Vonage's webhooks: inbound SMS and delivery receipts (SMS API formats, GET or POST, form or
JSON). Signed requests are checked with the SDK's `Auth.check_signature` plus a freshness check;
anything valid or merely unknown gets 200 at once, so Vonage stops retrying (it retries for 24 h).

An inbound SMS is stored (once per `messageId`) and answered 200 `received` at once; a worker
applies it within seconds (`replies.apply_waiting`, queued here as `apply_replies`). Applying it
before the 200 was tried first: at 300 replies a second the API then ran short of CPU and the
answers queued for over a minute (Vonage times out and retries), and each reply cost its own
transaction. A worker applies stored replies in batches, a number's replies in the order they
came, and the scheduler's sweep queues again any left waiting (a lost queue message).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import urllib.parse
from typing import Annotated, Any

import vonage_http_client
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute

from reminders import broker, dispatch, replies
from reminders.config import Settings, get_settings
from reminders.db import autocommit, session_scope
from reminders.models import DeliveryReceipt, InboundMessage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/webhooks/vonage", tags=["vonage"])

RETRY_WINDOW = dt.timedelta(hours=24)  # Vonage retries this long: anything older is a replay
CLOCK_SKEW = dt.timedelta(minutes=5)


class Unauthorized(Exception):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def parameters(request: Request) -> dict[str, str]:
    """The webhook's fields, from the query string and a form or JSON body."""
    params = {k: v for k, v in request.query_params.items()}
    if request.method == "POST":
        body = await request.body()
        kind = request.headers.get("content-type", "")
        if "json" in kind and body:
            try:
                decoded = json.loads(body)
            except ValueError:
                decoded = {}
            if isinstance(decoded, dict):
                params |= {str(k): "" if v is None else str(v) for k, v in decoded.items()}
        elif "x-www-form-urlencoded" in kind and body:
            # What Vonage posts: read with the standard library (starlette's form parser
            # builds a multidict through python-multipart, a tenth of the request's CPU).
            params |= urllib.parse.parse_qsl(
                body.decode("utf-8", "replace"), keep_blank_values=True
            )
        elif body:
            form = await request.form()
            params |= {k: v for k, v in form.items() if isinstance(v, str)}
    # NUL is no character of an SMS or an id, and PostgreSQL refuses it in text: dropped here,
    # before the signature is checked (a signed NUL still fails it, as Vonage never sends one).
    return {k.replace("\x00", ""): v.replace("\x00", "") for k, v in params.items()}


def verify(params: dict[str, str], settings: Settings, now: dt.datetime) -> None:
    """Raises Unauthorized for a missing or wrong signature or a stale timestamp.

    With the console provider, unsigned webhooks are accepted (development); signed ones are
    still checked when a signature secret is configured.
    """
    secret = settings.vonage_signature_secret
    signed = "sig" in params
    if settings.sms_provider == "vonage" and not signed:
        raise Unauthorized("unsigned")
    if not signed or secret is None:
        return
    auth = vonage_http_client.Auth(
        api_key=settings.vonage_api_key or "unused",
        signature_secret=secret.get_secret_value(),
        signature_method=settings.vonage_signature_method,
    )
    if "timestamp" not in params or not auth.check_signature(dict(params)):
        raise Unauthorized("bad signature")
    try:
        sent = dt.datetime.fromtimestamp(int(params["timestamp"]), dt.UTC)
    except (ValueError, OverflowError, OSError):
        raise Unauthorized("bad timestamp") from None
    if not now - RETRY_WINDOW <= sent <= now + CLOCK_SKEW:
        raise Unauthorized("stale timestamp")


def _e164(raw: str) -> str:
    digits = "".join(c for c in raw if c.isdigit())
    return f"+{digits}" if digits else ""


MAX_PARTS = 255  # a concatenated SMS has at most 255 parts (its header counts them in a byte)
E164_DIGITS = 15


def _int(raw: str | None) -> int | None:
    """A part number or count, or None when it is none (out of range: not one Vonage sends)."""
    if raw is None or not raw.isdigit() or len(raw) > 3:
        return None
    value = int(raw)
    return value if value <= MAX_PARTS else None


def _checked(params: dict[str, str]) -> JSONResponse | None:
    try:
        verify(params, get_settings(), _now())
    except Unauthorized as exc:
        log.warning("Vonage webhook refused: %s", exc)
        return JSONResponse({"status": "unauthorized"}, status_code=401)
    return None


Params = Annotated[dict[str, str], Depends(parameters)]


@router.get("/inbound", operation_id="vonage_inbound_get")
@router.post("/inbound", operation_id="vonage_inbound_post")
def inbound(params: Params) -> JSONResponse:
    """A patient's SMS: stored once per `messageId`, then applied by a worker."""
    refused = _checked(params)
    if refused is not None:
        return refused
    msisdn, to = _e164(params.get("msisdn", "")), _e164(params.get("to", ""))
    message_id = _fit(_message_id(params), InboundMessage.provider_message_id)
    if not msisdn or not to or not message_id:
        return JSONResponse({"status": "ignored", "reason": "msisdn, to and messageId needed"})
    if len(msisdn) > E164_DIGITS + 1 or len(to) > E164_DIGITS + 1:
        return JSONResponse(
            {"status": "ignored", "reason": "msisdn and to must have at most 15 digits (E.164)"}
        )
    concat = params.get("concat") == "true"
    message = replies.Inbound(
        message_id=message_id,
        msisdn=msisdn,
        to=to,
        text=params.get("text", ""),
        received_at=_now(),
        concat_ref=_fit(params.get("concat-ref"), InboundMessage.concat_ref) if concat else None,
        concat_total=_int(params.get("concat-total")) if concat else None,
        concat_part=_int(params.get("concat-part")) if concat else None,
    )
    try:
        with autocommit() as connection:
            stored = replies.store(connection, message)
    except IntegrityError:
        stored = None  # a concurrent retry won
    if stored is None:
        return JSONResponse({"status": "ok", "result": "duplicate"})
    broker.enqueue_apply()
    return JSONResponse({"status": "ok", "result": "received"})


@router.get("/status", operation_id="vonage_status_get")
@router.post("/status", operation_id="vonage_status_post")
def status(params: Params) -> JSONResponse:
    """A delivery receipt: moves its message's delivery status forward."""
    refused = _checked(params)
    if refused is not None:
        return refused
    message_id = _message_id(params)
    client_ref = params.get("client-ref")
    state = params.get("status")
    if not state or not (message_id or client_ref):
        return JSONResponse({"status": "ignored", "reason": "status and messageId needed"})
    price = _price(params.get("price"))
    with session_scope() as session:
        result = dispatch.apply_receipt(
            session,
            message_id=_fit(message_id, DeliveryReceipt.provider_message_id),
            client_ref=_fit(client_ref, DeliveryReceipt.client_ref),
            status=state,
            err_code=_fit(params.get("err-code"), DeliveryReceipt.err_code),
            price=price,
            now=_now(),
        )
    return JSONResponse({"status": "ok", "result": result})


def _message_id(params: dict[str, str]) -> str | None:
    """Vonage names it `messageId` in inbound SMS and `message-id` in some receipts."""
    return params.get("messageId") or params.get("message-id")


def _fit(raw: str | None, column: InstrumentedAttribute[Any]) -> str | None:
    """`raw` cut to what its column holds (PostgreSQL refuses a longer value; Vonage never sends
    one), None when empty."""
    return raw[: column.type.length] if raw else None


def _price(raw: Any) -> float | None:
    try:
        price = float(raw) if raw not in (None, "") else None
    except ValueError:
        return None
    return price if price is not None and math.isfinite(price) else None
