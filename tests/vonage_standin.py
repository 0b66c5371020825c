"""A local HTTPS stand-in for Vonage's SMS API (`POST /sms/json`), for tests and benchmarks.

It answers like the real API (form POST in, JSON out, one message per SMS part), over TLS with a
certificate for the IP 127.0.0.1 signed by a throwaway CA (`ca_bundle`: point `REQUESTS_CA_BUNDLE`
at it), and records every request. What it answers is programmable: a queue of `Reply`s, then a
`behaviour` callable, then "accept".

    with VonageStandIn() as standin:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(standin.ca_bundle))
        standin.queue(status(1), drop())       # the next two POSTs: throttled, then a drop
        settings = Settings(..., vonage_rest_host=standin.rest_host)

For fault tests, `random_faults` answers a share of POSTs throttled, HTTP 500, late or cut, and
`accepted` counts, per `client-ref`, the messages the stand-in took (so a duplicate send shows).

Self-contained (stdlib + trustme), so bench/ and fault tests can import it as is.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import random
import socket
import ssl
import struct
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import trustme

ReplyKind = Literal["ok", "status", "partial", "http", "hang", "drop", "reset"]

ERROR_TEXTS = {
    1: "Throttled",
    2: "Missing Parameters",
    3: "Invalid Parameters",
    4: "Bad Credentials",
    5: "Internal Error",
    6: "Invalid Message",
    7: "Number Barred",
    8: "Partner Account Barred",
    9: "Partner Quota Violation",
    10: "Too Many Existing Binds",
    11: "Account Not Enabled For HTTP",
    12: "Message Too Long",
    14: "Invalid Signature",
    15: "Invalid Sender Address",
    22: "Invalid Network Code",
    23: "Invalid Callback Url",
    29: "Non-Whitelisted Destination",
    32: "Signature And API Secret Disallowed",
    33: "Number De-activated",
}
HTTP_TITLES = {401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests", 500: "Error"}

GSM7 = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED = frozenset("^{}\\[~]|€\f")


@dataclass(frozen=True)
class Reply:
    """What the stand-in does with one POST. Build them with the helpers below."""

    kind: ReplyKind = "ok"
    status: int = 0  # SMS API status for "status" and "partial"
    http_status: int = 200  # for "http"
    seconds: float = 0.0  # for "hang": then it answers "ok" (to a client long gone)
    accepted_parts: int = 0  # for "partial": parts accepted before the failing one
    error_text: str | None = None
    body: str | None = None  # for "http": the body (default: a Vonage-like problem JSON)
    accepted: bool = False  # for "drop" and "reset": the message was taken before the cut


def ok() -> Reply:
    return Reply()


def status(code: int, error_text: str | None = None) -> Reply:
    """Every part refused with SMS API status `code` (HTTP 200, as Vonage does)."""
    return Reply("status", status=code, error_text=error_text)


def partial(accepted_parts: int, code: int) -> Reply:
    """The first `accepted_parts` parts accepted, the others refused with `code`."""
    return Reply("partial", status=code, accepted_parts=accepted_parts)


def http_error(code: int, body: str | None = None) -> Reply:
    return Reply("http", http_status=code, body=body)


def hang(seconds: float) -> Reply:
    """Read the request, wait (cut short when the stand-in stops), then accept it."""
    return Reply("hang", seconds=seconds)


def drop(*, accepted: bool = False) -> Reply:
    """Read the whole request, then close the connection without a word (FIN). `accepted`: the
    message was taken (counted, receipts sent) before the cut, as when only the answer is lost."""
    return Reply("drop", accepted=accepted)


def reset(*, accepted: bool = False) -> Reply:
    """Read the whole request, then reset the connection (RST)."""
    return Reply("reset", accepted=accepted)


def random_faults(
    *,
    throttled: float = 0.0,
    server_error: float = 0.0,
    timeout: float = 0.0,
    dropped: float = 0.0,
    timeout_seconds: float = 12.0,
    seed: int = 7,
) -> Behaviour:
    """A behaviour answering each POST, independently, throttled (status 1), HTTP 500, after
    `timeout_seconds` (longer than the client waits; the message is taken all the same), or with
    the connection dropped after reading it (half of those taken first), in these shares; the
    rest are accepted. Seeded, so a run can be repeated."""
    draw = random.Random(seed)
    lock = threading.Lock()

    def behaviour(request: ReceivedRequest) -> Reply:
        with lock:
            roll, coin = draw.random(), draw.random()
        for share, reply in (
            (throttled, status(1)),
            (server_error, http_error(500)),
            (timeout, hang(timeout_seconds)),
            (dropped, drop(accepted=coin < 0.5)),
        ):
            if roll < share:
                return reply
            roll -= share
        return ok()

    return behaviour


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    form: dict[str, str]
    at: float = field(default_factory=time.monotonic)

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        value = self.headers.get("authorization", "")
        if not value.startswith("Basic "):
            return None
        key, _, secret = base64.b64decode(value[6:]).decode().partition(":")
        return key, secret


Behaviour = Callable[[ReceivedRequest], Reply]


def segments(text: str, kind: str) -> int:
    """Parts Vonage splits a text into: GSM-7 160/153 septets, unicode 70/67 UTF-16 units."""
    if kind == "unicode":
        units = [2 if ord(c) > 0xFFFF else 1 for c in text]
        single, multi = 70, 67
    else:
        units = [2 if c in GSM7_EXTENDED else 1 for c in text]
        single, multi = 160, 153
    if sum(units) <= single:
        return 1
    count, used = 1, 0
    for cost in units:
        if used + cost > multi:
            count, used = count + 1, 0
        used += cost
    return count


def sign(params: dict[str, str], secret: str, method: str = "sha256") -> str:
    """Vonage's SMS API signature (HMAC over sorted `&key=value`, `&`/`=` in values as `_`)."""
    hasher = hmac.new(secret.encode(), digestmod=getattr(hashlib, method))
    for key in sorted(params):
        value = params[key].replace("&", "_").replace("=", "_")
        hasher.update(f"&{key}={value}".encode())
    return hasher.hexdigest()


def _shutdown(sock: socket.socket) -> None:
    """Ends a connection under any thread blocked on it (the socket level, not TLS's)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True
    standin: VonageStandIn

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # dropped and reset connections are the point of some replies


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    timeout = 30  # an idle keep-alive connection ends eventually
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.standin._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.standin._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet (and nothing identifying on stderr)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        form = {k: v for k, v in urllib.parse.parse_qsl(body, keep_blank_values=True)}
        path = self.path.split("?", 1)[0]
        request = ReceivedRequest(
            method="POST",
            path=path,
            headers={k.lower(): v for k, v in self.headers.items()},
            form=form,
        )
        standin = self.server.standin
        reply = standin._record(request)
        if path != "/sms/json":
            self._send(404, {"title": "Not Found"})
            return
        if reply.kind in ("drop", "reset"):
            if reply.accepted:
                standin._answer(request, ok())  # taken (and receipts sent); the answer is lost
            self._cut(rst=reply.kind == "reset")
            return
        if reply.kind == "hang":
            standin._stopping.wait(reply.seconds)
        if reply.kind == "http":
            self._http_error(reply)
            return
        self._send(200, standin._answer(request, reply))

    def do_GET(self) -> None:
        self._send(405, {"title": "Method Not Allowed"})

    def _http_error(self, reply: Reply) -> None:
        code = reply.http_status
        if reply.body is not None:
            self._send_bytes(code, reply.body.encode(), "application/json")
            return
        title = HTTP_TITLES.get(code, "Error")
        self._send(
            code,
            {
                "type": f"https://developer.nexmo.com/api-errors#{title.lower().replace(' ', '-')}",
                "title": title,
                "detail": f"Stand-in HTTP {code}",
                "instance": str(uuid.uuid4()),
            },
        )

    def _send(self, code: int, payload: dict[str, Any]) -> None:
        self._send_bytes(code, json.dumps(payload).encode(), "application/json")

    def _send_bytes(self, code: int, body: bytes, content_type: str) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client left (e.g. after a timeout)

    def _cut(self, *, rst: bool) -> None:
        self.close_connection = True
        if not rst:
            _shutdown(self.connection)
            return
        with contextlib.suppress(OSError):
            # Linger 0: closing sends RST (the close completes once the handler's files close).
            linger = struct.pack("ii", 1, 0)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            self.connection.close()


class VonageStandIn:
    """The stand-in server. Use as a context manager (or call start() and stop())."""

    def __init__(
        self,
        *,
        price: str = "0.03330000",
        balance: float = 10.0,
        network: str = "20810",
        api_key: str | None = None,
        api_secret: str | None = None,
        behaviour: Behaviour | None = None,
        delivery_receipts_to: str | None = None,
        signature_secret: str | None = None,
        signature_method: str = "sha256",
        keep_requests: bool = True,
        receipt_attempts: int = 1,
    ) -> None:
        """`api_key`/`api_secret`: when set, other credentials get status 4 (as Vonage does).

        `delivery_receipts_to`: a URL that receives a "delivered" receipt (form POST, SMS API
        fields, signed with `signature_secret` when given) for each accepted part; like Vonage,
        the stand-in tries again (`receipt_attempts` in all, backing off) while it is refused.

        `keep_requests=False` only counts POSTs (long benchmarks).
        """
        self.price = price
        self.network = network
        self.api_key = api_key
        self.api_secret = api_secret
        self.behaviour = behaviour
        self.delivery_receipts_to = delivery_receipts_to
        self.signature_secret = signature_secret
        self.signature_method = signature_method
        self._balance = balance
        self._lock = threading.Condition()  # notified when a connection ends
        self._replies: deque[Reply] = deque()
        self._requests: list[ReceivedRequest] = []
        self._posts = 0
        self.keep_requests = keep_requests
        self.receipt_attempts = receipt_attempts
        self._taken: Counter[str] = Counter()  # client-ref: messages taken
        self._taken_at: dict[str, float] = {}  # client-ref: last taken, time.time()
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._receipt_threads: list[threading.Thread] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.ca = trustme.CA()
        self._cert = self.ca.issue_cert("127.0.0.1")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> VonageStandIn:
        self._tmp = tempfile.TemporaryDirectory(prefix="vonage-standin-")
        self.ca_bundle = Path(self._tmp.name) / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_bundle))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(context)
        server = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=False)
        server.standin = self
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        # Handshakes happen lazily, in each connection's own thread, not in the accept loop.
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._server = server
        self.port: int = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            with self._lock:
                connections = list(self._connections)
            for sock in connections:  # end keep-alive connections still waiting
                _shutdown(sock)
            self._server.server_close()  # joins the connection threads
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for thread in self._receipt_threads:
            thread.join()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> VonageStandIn:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- programming and inspecting -------------------------------------------------------------

    @property
    def rest_host(self) -> str:
        """For `REMINDERS_VONAGE_REST_HOST` / `HttpClientOptions(rest_host=...)`."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.rest_host}/sms/json"

    def queue(self, *replies: Reply) -> None:
        """The next POSTs get these replies, in order."""
        with self._lock:
            self._replies.extend(replies)

    def reset(self) -> None:
        """Forgets queued replies, the behaviour and the record."""
        with self._lock:
            self._replies.clear()
            self._requests.clear()
            self._taken.clear()
            self._taken_at.clear()
            self._posts = 0
            self.behaviour = None

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def posts(self) -> int:
        with self._lock:
            return self._posts

    @property
    def accepted(self) -> Counter[str]:
        """How many messages the stand-in took per `client-ref` (a refusal is not counted)."""
        with self._lock:
            return Counter(self._taken)

    @property
    def accepted_at(self) -> dict[str, float]:
        """When (`time.time()`) the last message of each `client-ref` was taken."""
        with self._lock:
            return dict(self._taken_at)

    def close_connections(self, timeout: float = 5.0) -> None:
        """Closes every open connection, as a server ending idle keep-alives does, and waits
        until they are gone (so a client sees the close before its next request)."""
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            _shutdown(sock)
        with self._lock:
            self._lock.wait_for(lambda: not self._connections, timeout)

    # -- inside ---------------------------------------------------------------------------------

    def _track(self, sock: socket.socket, *, add: bool) -> None:
        with self._lock:
            if not add:
                self._connections.discard(sock)
                self._lock.notify_all()
                return
            self._connections.add(sock)
            if not self._stopping.is_set():
                return
        _shutdown(sock)  # accepted while stopping: stop() may already have looked

    def _record(self, request: ReceivedRequest) -> Reply:
        with self._lock:
            self._posts += 1
            if self.keep_requests:
                self._requests.append(request)
            if self._replies:
                return self._replies.popleft()
            behaviour = self.behaviour
        return behaviour(request) if behaviour is not None else Reply()

    def _credentials_ok(self, request: ReceivedRequest) -> bool:
        if self.api_key is None:
            return True
        given = request.basic_auth or (
            request.form.get("api_key", ""),
            request.form.get("api_secret", ""),
        )
        return given == (self.api_key, self.api_secret)

    def _answer(self, request: ReceivedRequest, reply: Reply) -> dict[str, Any]:
        form = request.form
        if not self._credentials_ok(request):
            reply = status(4)
        parts = segments(form.get("text", ""), form.get("type", "text"))
        if reply.kind == "status":
            return {"message-count": "1", "messages": [self._refused(reply.status, reply)]}
        accepted = reply.accepted_parts if reply.kind == "partial" else parts
        messages: list[dict[str, Any]] = []
        for index in range(parts):
            if index < accepted:
                messages.append(self._accepted(form))
            else:
                messages.append(self._refused(reply.status, reply))
        taken = [m for m in messages if m["status"] == "0"]
        if taken and "client-ref" in form:
            with self._lock:
                self._taken[form["client-ref"]] += 1
                self._taken_at[form["client-ref"]] = time.time()
        if self.delivery_receipts_to:
            self._send_receipts(form, taken)
        return {"message-count": str(parts), "messages": messages}

    def _accepted(self, form: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            self._balance -= float(self.price)
            balance = self._balance
        message = {
            "to": form.get("to", ""),
            "message-id": uuid.uuid4().hex[:16].upper(),
            "status": "0",
            "remaining-balance": f"{balance:.8f}",
            "message-price": self.price,
            "network": self.network,
        }
        if "client-ref" in form:
            message["client-ref"] = form["client-ref"]
        return message

    @staticmethod
    def _refused(code: int, reply: Reply) -> dict[str, Any]:
        return {"status": str(code), "error-text": reply.error_text or ERROR_TEXTS.get(code, "")}

    def _send_receipts(self, form: dict[str, str], messages: list[dict[str, Any]]) -> None:
        url = self.delivery_receipts_to
        assert url is not None
        receipts = [self._receipt(form, m) for m in messages]

        def post_all() -> None:
            for receipt in receipts:
                data = urllib.parse.urlencode(receipt).encode()
                for attempt in range(self.receipt_attempts):
                    if attempt and self._stopping.wait(min(2.0**attempt, 10.0)):
                        return
                    try:
                        with urllib.request.urlopen(url, data=data, timeout=5):
                            break
                    except OSError:
                        pass  # a receipt lost is a case the app must survive too

        thread = threading.Thread(target=post_all, daemon=True)
        self._receipt_threads.append(thread)
        thread.start()

    def _receipt(self, form: dict[str, str], message: dict[str, Any]) -> dict[str, str]:
        now = time.gmtime()
        receipt = {
            "msisdn": form.get("to", ""),
            "to": form.get("from", ""),
            "network-code": self.network,
            "messageId": message["message-id"],
            "price": self.price,
            "status": "delivered",
            "scts": time.strftime("%y%m%d%H%M", now),
            "err-code": "0",
            "api-key": self.api_key or "standin",
            "message-timestamp": time.strftime("%Y-%m-%d %H:%M:%S", now),
        }
        if "client-ref" in form:
            receipt["client-ref"] = form["client-ref"]
        if self.signature_secret:
            receipt["timestamp"] = str(int(time.time()))
            receipt["nonce"] = str(uuid.uuid4())
            receipt["sig"] = sign(receipt, self.signature_secret, self.signature_method)
        return receipt
