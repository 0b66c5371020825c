"""SMS providers: Vonage (the SMS API through the SDK v4) and the console.

A provider sends one SMS and says what happened, in one of three ways (DESIGN.md rules 6 and 7):

- it returns `Sent` (Vonage accepted every part);
- it raises `SmsError`, which says whether to retry (`transient`), to record and stop for this
  SMS (`permanent`), or to stop ALL sending and keep every reminder pending (`stop_all`);
- it raises `OutcomeUnknown`: the request may have reached Vonage but no answer came. The caller
  records the send as unknown and reconciles it by delivery receipt (`client_ref`) before any
  resend.

Nothing here logs a phone number or an SMS text in clear (rule 11): our lines use `mask_phone`, and
a filter on the SDK's `vonage` logger drops its DEBUG records (full request parameters) and masks
long digit runs in the rest.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import re
import ssl
import sys
import threading
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

import requests
import urllib3.exceptions
import vonage_http_client
import vonage_sms

from reminders.config import Settings
from reminders.texts import count_segments

log = logging.getLogger(__name__)

SDK_LOGGER = "vonage"
MIN_TTL_MS = 20_000  # the SDK (and the SMS API) refuse a shorter ttl
MAX_TTL_MS = 604_800_000  # 7 days
MAX_CLIENT_REF = 40

#: SMS API statuses worth retrying with backoff (within the deadline).
TRANSIENT_STATUSES: dict[str, str] = {
    "1": "Throttled",
    "5": "Internal Error",
    "10": "Too Many Existing Binds",
}
#: SMS API statuses that no SMS can get past: stop all sending, keep reminders pending.
STOP_ALL_STATUSES: dict[str, str] = {
    "4": "Invalid Credentials",
    "8": "Partner Account Barred",
    "9": "Partner Quota Violation",
    "14": "Invalid Signature",
}
#: SMS API statuses that doom this SMS only (any other non-zero status is permanent too).
PERMANENT_STATUSES: dict[str, str] = {
    "2": "Missing Parameters",
    "3": "Invalid Parameters",
    "6": "Invalid Message",
    "7": "Number Barred",
    "11": "Account Not Enabled For HTTP",
    "12": "Message Too Long",
    "15": "Invalid Sender Address",
    "16": "Invalid TTL",
    "19": "Facility Not Allowed",
    "20": "Invalid Message Class",
    "22": "Invalid Network Code",
    "23": "Invalid Callback Url",
    "29": "Non-Whitelisted Destination",
    "32": "Signature And API Secret Disallowed",
    "33": "Number De-activated",
    "34": "Rejected for this destination",
}


class SmsError(Exception):
    """Vonage (or the way to it) refused this SMS; the flags say what to do next.

    - `permanent`: this SMS will never go out (invalid or barred number, bad sender, past its
      deadline...): record the reason and stop.
    - `stop_all`: no SMS can go out (bad credentials, no credit, account barred): stop ALL sending,
      keep the reminders pending, and tell an operator loudly.
    - neither (`transient`): throttled, a Vonage 5xx, a connection that could not be opened: retry
      with backoff, never past the deadline. The request surely did not take effect.

    `status` is the SMS API status code (a string, as Vonage sends it) when there was one.
    """

    def __init__(
        self,
        reason: str,
        *,
        permanent: bool = False,
        stop_all: bool = False,
        status: str | None = None,
        message_ids: tuple[str, ...] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.stop_all = stop_all
        self.status = status
        #: ids of the parts Vonage accepted before a part failed (partial failures only).
        self.message_ids = message_ids

    @property
    def transient(self) -> bool:
        return not self.permanent and not self.stop_all

    def __repr__(self) -> str:
        kind = "stop_all" if self.stop_all else "permanent" if self.permanent else "transient"
        return f"SmsError({self.reason!r}, {kind}, status={self.status!r})"


class OutcomeUnknown(Exception):
    """The request may have reached Vonage, but no answer came (read timeout, dropped connection).

    Record the send as unknown and reconcile it by delivery receipt before any resend.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Sent:
    """Vonage accepted the SMS: one message per part, each with its id and price."""

    message_id: str
    message_ids: tuple[str, ...]
    price: float | None
    parts: int


class Provider(Protocol):
    name: str

    def send(self, *, to: str, sender: str, text: str, client_ref: str, ttl: dt.timedelta) -> Sent:
        """Sends `text` to `to` (E.164 with '+') from `sender` (E.164 or alphanumeric).

        `client_ref` (at most 40 characters) names our row, so that a delivery receipt finds it;
        `ttl` is the time left before the send-by deadline. Raises SmsError or OutcomeUnknown.
        """
        ...


def mask_phone(e164: str) -> str:
    """The number with all but its first 3 characters and last 2 digits masked.

    "+33612345678" -> "+33*******78". Anything 5 characters or shorter is masked entirely.
    """
    if len(e164) <= 5:
        return "*" * len(e164)
    return e164[:3] + "*" * (len(e164) - 5) + e164[-2:]


_LONG_DIGITS = re.compile(r"\d{6,}")


def redact(text: str) -> str:
    """Masks every run of 6 or more digits (phone numbers) but its last 2 digits."""
    return _LONG_DIGITS.sub(lambda m: "*" * (len(m.group()) - 2) + m.group()[-2:], text)


class RedactingFilter(logging.Filter):
    """Drops DEBUG records and masks long digit runs in the others.

    The SDK logs every request's parameters (number and text) at DEBUG and error response bodies
    at WARNING.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return False
        try:
            message = record.getMessage()
        except Exception:  # a broken format must not break the send that logged it
            message = f"(unformattable log record from {record.pathname}:{record.lineno})"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


_filter_lock = threading.Lock()


def install_log_filter() -> None:
    """Puts a RedactingFilter on the SDK's logger, once however often it is called."""
    logger = logging.getLogger(SDK_LOGGER)
    with _filter_lock:
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())


install_log_filter()


class ConsoleProvider:
    """Sends nothing: prints one line per SMS, number masked (the caller records the row).

    It prints to stderr by default: stdout carries commands' results (`--json`).
    """

    name: str = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, *, to: str, sender: str, text: str, client_ref: str, ttl: dt.timedelta) -> Sent:
        segments = count_segments(text)
        parts = max(segments.count, 1)
        message_id = f"console-{uuid.uuid4()}"
        plural = "part" if parts == 1 else "parts"
        one_line = text.replace("\n", "\\n")
        line = (
            f"SMS {message_id} to {mask_phone(to)} from {sender} "
            f"({segments.encoding}, {parts} {plural}): {one_line}"
        )
        stream = self._stream or sys.stderr
        with self._lock:  # one write per line: worker threads must not interleave
            stream.write(line + "\n")
            stream.flush()
        return Sent(message_id=message_id, message_ids=(message_id,), price=None, parts=parts)


def ttl_milliseconds(ttl: dt.timedelta) -> int:
    """The SMS API's `ttl`; under 20 s left is a permanent "deadline" error (nothing is sent)."""
    milliseconds = int(ttl.total_seconds() * 1000)
    if milliseconds < MIN_TTL_MS:
        raise SmsError("deadline", permanent=True)
    return min(milliseconds, MAX_TTL_MS)


def status_error(status: str, error_text: str = "") -> SmsError:
    """The SmsError for a non-zero SMS API status (see the tables at the top of this module).

    0 success. Transient: 1 throttled, 5 internal error, 10 too many binds. Stop all: 4 invalid
    credentials, 8 account barred (suspended), 9 partner quota violation (out of credit),
    14 invalid signature. Permanent: 2 missing parameters, 3 invalid parameters, 6 invalid
    message (e.g. unknown number prefix), 7 number barred, 11 account not enabled for HTTP,
    12 message too long, 15 invalid sender address, 16 invalid ttl, 19 facility not allowed,
    20 invalid message class, 22 invalid network code, 23 invalid callback url, 29
    non-whitelisted destination (demo account), 32 signature and API secret disallowed,
    33 number de-activated, 34 rejected for this destination, and any other unknown status.
    """
    meaning = (
        TRANSIENT_STATUSES.get(status)
        or STOP_ALL_STATUSES.get(status)
        or PERMANENT_STATUSES.get(status)
        or "Unknown status"
    )
    detail = redact(error_text) if error_text else meaning
    reason = f"status {status}: {detail}"
    if status in TRANSIENT_STATUSES:
        return SmsError(reason, status=status)
    if status in STOP_ALL_STATUSES:
        return SmsError(reason, stop_all=True, status=status)
    return SmsError(reason, permanent=True, status=status)


def outcome_of(messages: list[dict[str, Any]]) -> Sent | SmsError:
    """Reads the SMS API's per-part answers: all accepted, or the error of the first failed part.

    Raises OutcomeUnknown for an answer without any message.

    A part refused after others were accepted is a permanent error for this SMS (resending would
    duplicate the accepted parts); the accepted ids ride along on the error.
    """
    if not messages:
        raise OutcomeUnknown("an answer without messages")
    accepted = tuple(str(m.get("message-id", "")) for m in messages if str(m.get("status")) == "0")
    failed = [m for m in messages if str(m.get("status")) != "0"]
    if not failed:
        return Sent(
            message_id=accepted[0],
            message_ids=accepted,
            price=_total_price(messages),
            parts=len(messages),
        )
    first = failed[0]
    error = status_error(str(first.get("status")), str(first.get("error-text") or ""))
    if accepted:
        return SmsError(
            f"partial failure: {len(accepted)} of {len(messages)} parts accepted; {error.reason}",
            permanent=True,
            status=error.status,
            message_ids=accepted,
        )
    return error


def _total_price(messages: list[dict[str, Any]]) -> float | None:
    prices: list[float] = []
    for message in messages:
        try:
            prices.append(float(message["message-price"]))
        except (KeyError, TypeError, ValueError):
            continue
    return round(sum(prices), 8) if prices else None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (args, urllib3 `reason`, cause, context)."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(a for a in current.args if isinstance(a, BaseException))
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
        if current.__cause__ is not None:
            stack.append(current.__cause__)
        if current.__context__ is not None:
            stack.append(current.__context__)


def transport_error(exc: requests.RequestException) -> SmsError | OutcomeUnknown:
    """Whether a requests failure surely happened before the request left (transient) or not.

    Connect timeouts, refused or failed new connections, and TLS certificate failures happen
    before a byte of the request is sent. Everything else (read timeouts, a connection dropped or
    reset after sending, a broken answer) may hide an accepted SMS: the outcome is unknown.
    """
    causes = list(_causes(exc))
    names = "/".join(dict.fromkeys(type(c).__name__ for c in causes[1:])) or type(exc).__name__
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return SmsError(f"connect timeout ({names})")
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return OutcomeUnknown(f"no answer in time ({names})")
    if any(isinstance(c, ssl.SSLCertVerificationError) for c in causes):
        return SmsError(f"TLS certificate verification failed ({names})")
    if isinstance(exc, requests.exceptions.ConnectionError) and any(
        isinstance(c, urllib3.exceptions.ConnectTimeoutError) for c in causes
    ):
        # NewConnectionError (refused, unreachable, DNS) is a ConnectTimeoutError in urllib3.
        return SmsError(f"could not connect ({names})")
    return OutcomeUnknown(f"connection lost after sending ({names})")


def http_error(exc: Any) -> SmsError:
    """An HTTP error status from Vonage (the SDK's HttpRequestError family).

    401 (credentials), 403 (account forbidden) and 404 (wrong host or path) fail every SMS alike:
    stop all. 408, 429 and 5xx: transient. Any other 4xx: permanent for this SMS.
    """
    code = int(getattr(getattr(exc, "response", None), "status_code", 0) or 0)
    reason = f"HTTP {code}"
    if isinstance(exc, vonage_http_client.AuthenticationError) or code in (401, 403, 404):
        return SmsError(f"{reason}: Vonage refused the account or host", stop_all=True)
    if isinstance(exc, vonage_http_client.RateLimitedError | vonage_http_client.ServerError):
        return SmsError(reason)
    if code in (408, 429) or code >= 500:
        return SmsError(reason)
    return SmsError(reason, permanent=True)


def _e164_digits(number: str) -> str:
    """Vonage wants E.164 without the '+'; alphanumeric sender ids pass unchanged."""
    rest = number.removeprefix("+")
    return rest if rest.isdigit() else number


_SDK_VERSION = importlib.metadata.version("vonage")


class SdkClient:
    """What `vonage.Vonage` holds for the SMS API, built from the same SDK packages
    (`vonage_http_client`, `vonage_sms`) without importing its fifteen other APIs, which would
    add about a second to every worker's start."""

    def __init__(self, http_client: Any) -> None:
        self.http_client = http_client
        self.sms = vonage_sms.Sms(http_client)


class VonageProvider:
    """Sends through the Vonage SMS API with the SDK v4, as DESIGN.md rule 7 says.

    Each worker thread gets its own SDK client (the SDK's client is not meant to be shared and
    keeps per-request state), with one connection (`pool_maxsize=1`: on a dropped connection the
    SDK re-POSTs up to `pool_maxsize` times, so one means it raises instead), no urllib3 retries
    and a timeout. The client's `Auth` holds key and secret only: with a signature secret the SDK
    signs sends itself, wrongly.
    """

    name: str = "vonage"

    def __init__(self, settings: Settings, *, timeout: int = 10) -> None:
        if not settings.vonage_api_key or settings.vonage_api_secret is None:
            raise ValueError("the vonage provider needs an API key and secret")
        if timeout < 1:
            raise ValueError("timeout must be at least 1 second")
        self._api_key = settings.vonage_api_key
        self._api_secret = settings.vonage_api_secret
        self._rest_host = settings.vonage_rest_host
        self._api_host = settings.vonage_api_host
        self._timeout = timeout
        self._local = threading.local()
        # Weak: a finished thread's client goes with it (urllib3 closes its pool when collected).
        self._clients: weakref.WeakSet[SdkClient] = weakref.WeakSet()
        self._lock = threading.Lock()
        install_log_filter()

    def thread_client(self) -> SdkClient:
        """The calling thread's SDK client, built on first use."""
        client: SdkClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._build_client()
            self._local.client = client
            with self._lock:
                self._clients.add(client)
        return client

    def _build_client(self) -> SdkClient:
        hosts: dict[str, str] = {}
        if self._rest_host:
            hosts["rest_host"] = self._rest_host
        if self._api_host:
            hosts["api_host"] = self._api_host
        options = vonage_http_client.HttpClientOptions(
            timeout=self._timeout, pool_connections=1, pool_maxsize=1, max_retries=0, **hosts
        )
        auth = vonage_http_client.Auth(
            api_key=self._api_key, api_secret=self._api_secret.get_secret_value()
        )
        client = SdkClient(vonage_http_client.HttpClient(auth, options, _SDK_VERSION))
        # requests reads the proxy and CA settings of the environment (and ~/.netrc) on every
        # request: read them once here instead, for the SMS API's host.
        session = client.http_client._session
        found = session.merge_environment_settings(
            f"https://{client.http_client.rest_host}/sms/json", {}, None, None, None
        )
        session.trust_env = False
        session.proxies.update(found["proxies"])
        session.verify = found["verify"]
        return client

    def close(self) -> None:
        """Closes every thread's connections (at shutdown; a later send reconnects)."""
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            # The SDK exposes no close(); its requests Session is the only thing holding sockets.
            client.http_client._session.close()

    def send(self, *, to: str, sender: str, text: str, client_ref: str, ttl: dt.timedelta) -> Sent:
        if len(client_ref) > MAX_CLIENT_REF:
            raise ValueError(f"client_ref is longer than {MAX_CLIENT_REF} characters")
        message = vonage_sms.SmsMessage(
            to=_e164_digits(to),
            from_=_e164_digits(sender),
            text=text,
            type=count_segments(text).vonage_type,
            client_ref=client_ref,
            ttl=ttl_milliseconds(ttl),
            status_report_req=True,
        )
        try:
            sent = self._post(message)
        except SmsError as exc:
            self._log_error(exc, to, client_ref)
            raise
        except OutcomeUnknown as exc:
            log.warning(
                "SMS %s to %s: outcome unknown (%s); reconcile by receipt before any resend",
                client_ref,
                mask_phone(to),
                exc.reason,
            )
            raise
        log.debug(
            "SMS %s to %s accepted by Vonage as %s (%d part(s))",
            client_ref,
            mask_phone(to),
            sent.message_id,
            sent.parts,
        )
        return sent

    def _post(self, message: Any) -> Sent:
        client = self.thread_client()
        before = client.http_client.last_response
        try:
            response = client.sms.send(message)
        except vonage_sms.PartialFailureError as exc:
            return self._raise_or_sent(outcome_of(list(exc.response["messages"])))
        except vonage_http_client.HttpRequestError as exc:
            raise http_error(exc) from None
        except requests.RequestException as exc:
            raise transport_error(exc) from None
        except (vonage_sms.SmsError, KeyError, TypeError, ValueError):
            # The SDK puts the status only in its error's text, and trips on answers it did not
            # expect: read the answer itself.
            return self._raise_or_sent(self._answer(client, before))
        return self._raise_or_sent(outcome_of([_dump(m) for m in response.messages]))

    @staticmethod
    def _answer(client: Any, before: Any) -> Sent | SmsError:
        response = client.http_client.last_response
        if response is None or response is before:
            raise OutcomeUnknown("no readable answer") from None
        try:
            messages = response.json()["messages"]
            if not isinstance(messages, list):
                raise TypeError("messages is not a list")
        except (KeyError, TypeError, ValueError):
            raise OutcomeUnknown(f"unreadable answer (HTTP {response.status_code})") from None
        return outcome_of(messages)

    @staticmethod
    def _raise_or_sent(outcome: Sent | SmsError) -> Sent:
        if isinstance(outcome, SmsError):
            raise outcome
        return outcome

    @staticmethod
    def _log_error(exc: SmsError, to: str, client_ref: str) -> None:
        if exc.stop_all:
            log.error(
                "VONAGE REFUSES ALL SENDING (%s): stopping every send until an operator fixes it",
                exc.reason,
            )
        elif exc.permanent:
            log.warning("SMS %s to %s: permanent error: %s", client_ref, mask_phone(to), exc.reason)
        else:
            log.info("SMS %s to %s: transient error: %s", client_ref, mask_phone(to), exc.reason)


def _dump(message: Any) -> dict[str, Any]:
    """An SDK MessageResponse back in the SMS API's own field names."""
    return {
        "status": message.status,
        "message-id": message.message_id,
        "message-price": message.message_price,
        "error-text": None,
    }


def provider_from_settings(settings: Settings) -> Provider:
    """The provider `REMINDERS_SMS_PROVIDER` names."""
    if settings.sms_provider == "vonage":
        return VonageProvider(settings)
    return ConsoleProvider()
