"""The SMS providers: the real Vonage SDK against the local HTTPS stand-in, and the console."""

from __future__ import annotations

import datetime as dt
import http.server
import io
import logging
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import requests
import vonage
import vonage_sms

from reminders.config import Settings
from reminders.sms import (
    ConsoleProvider,
    OutcomeUnknown,
    RedactingFilter,
    Sent,
    SmsError,
    VonageProvider,
    install_log_filter,
    mask_phone,
    provider_from_settings,
    transport_error,
)
from tests.vonage_standin import (
    ReceivedRequest,
    VonageStandIn,
    drop,
    hang,
    http_error,
    partial,
    reset,
    status,
)

PHONE = "+33612345678"
SENDER = "+33939000000"
TEXT = "Rappel: RDV mardi 24 novembre a 9h30 avec Dr Martin. 1 pour confirmer, 2 pour annuler."
HOUR = dt.timedelta(hours=1)


def vonage_settings(rest_host: str) -> Settings:
    return Settings(
        sms_provider="vonage",
        vonage_api_key="key123",
        vonage_api_secret="secret-456",
        vonage_signature_secret="signature-secret-789",
        vonage_rest_host=rest_host,
        secret_key="x" * 20,
        database_url="sqlite://",
    )


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[VonageStandIn]:
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with VonageStandIn() as server:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.ca_bundle))
        yield server


@pytest.fixture
def provider(standin: VonageStandIn) -> Iterator[VonageProvider]:
    sms = VonageProvider(vonage_settings(standin.rest_host), timeout=5)
    yield sms
    sms.close()


def send(provider: VonageProvider, **overrides: Any) -> Sent:
    arguments: dict[str, Any] = {
        "to": PHONE,
        "sender": SENDER,
        "text": TEXT,
        "client_ref": "reminder-42",
        "ttl": HOUR,
    }
    arguments.update(overrides)
    return provider.send(**arguments)


def the_post(standin: VonageStandIn) -> ReceivedRequest:
    assert standin.posts == 1
    return standin.requests[0]


# -- success -----------------------------------------------------------------------------------


def test_it_sends_the_form_fields_vonage_expects_with_basic_auth_and_no_signature(
    provider: VonageProvider, standin: VonageStandIn
) -> None:
    sent = send(provider)

    request = the_post(standin)
    assert request.path == "/sms/json"
    assert request.form == {
        "to": "33612345678",
        "from": "33939000000",
        "text": TEXT,
        "type": "text",
        "ttl": "3600000",
        "client-ref": "reminder-42",
        "status-report-req": "True",
    }
    assert request.basic_auth == ("key123", "secret-456")
    assert "sig" not in request.form
    assert "timestamp" not in request.form
    assert sent.parts == 1
    assert sent.message_ids == (sent.message_id,)
    assert sent.price == pytest.approx(0.0333)


def test_the_environment_proxy_and_ca_settings_are_read_once_per_client(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    sms = VonageProvider(vonage_settings("rest.example.test"))
    session = sms.thread_client().http_client._session
    assert session.trust_env is False  # not looked up again on every request
    assert session.proxies["https"] == "http://proxy.internal:3128"
    assert session.verify == str(bundle)
    monkeypatch.setenv("NO_PROXY", "rest.example.test")  # honoured too, when set
    other = VonageProvider(vonage_settings("rest.example.test"))
    assert "https" not in other.thread_client().http_client._session.proxies


@pytest.mark.parametrize(
    "text",
    [
        "Напоминание: приём во вторник в 9:30.",
        "提醒：您的预约在星期二上午9:30。",
        "Rendez-vous à 9h30 – merci",
    ],
)
def test_texts_outside_gsm7_go_as_unicode(
    provider: VonageProvider, standin: VonageStandIn, text: str
) -> None:
    send(provider, text=text)

    assert the_post(standin).form["type"] == "unicode"
    assert the_post(standin).form["text"] == text


def test_an_alphanumeric_sender_goes_unchanged(
    provider: VonageProvider, standin: VonageStandIn
) -> None:
    send(provider, sender="Clinique")

    assert the_post(standin).form["from"] == "Clinique"


def test_a_long_text_comes_back_as_two_parts_with_both_ids_and_the_summed_price(
    provider: VonageProvider, standin: VonageStandIn
) -> None:
    sent = send(provider, text="a" * 200)

    assert sent.parts == 2
    assert len(set(sent.message_ids)) == 2
    assert sent.message_id == sent.message_ids[0]
    assert sent.price == pytest.approx(0.0666)


def test_a_ttl_beyond_seven_days_is_clamped(
    provider: VonageProvider, standin: VonageStandIn
) -> None:
    send(provider, ttl=dt.timedelta(days=30))

    assert the_post(standin).form["ttl"] == "604800000"


# -- what each answer means --------------------------------------------------------------------


@pytest.mark.parametrize("code", [1, 5, 10])
def test_throttling_and_vonage_internal_errors_are_transient(
    provider: VonageProvider, standin: VonageStandIn, code: int
) -> None:
    standin.queue(status(code))

    with pytest.raises(SmsError) as caught:
        send(provider)

    assert caught.value.transient
    assert caught.value.status == str(code)


@pytest.mark.parametrize("code", [2, 3, 6, 7, 12, 15, 29, 33, 99])
def test_a_refused_number_or_message_is_permanent_for_that_sms(
    provider: VonageProvider, standin: VonageStandIn, code: int
) -> None:
    standin.queue(status(code))

    with pytest.raises(SmsError) as caught:
        send(provider)

    assert caught.value.permanent
    assert not caught.value.stop_all
    assert caught.value.status == str(code)


@pytest.mark.parametrize("code", [4, 8, 9, 14])
def test_bad_credentials_or_no_credit_stop_all_sending(
    provider: VonageProvider, standin: VonageStandIn, code: int
) -> None:
    standin.queue(status(code))

    with pytest.raises(SmsError) as caught:
        send(provider)

    assert caught.value.stop_all
    assert not caught.value.permanent
    assert caught.value.status == str(code)
    assert standin.posts == 1


def test_a_part_refused_after_others_were_accepted_is_permanent_with_the_accepted_ids(
    provider: VonageProvider, standin: VonageStandIn
) -> None:
    standin.queue(partial(1, 1))

    with pytest.raises(SmsError) as caught:
        send(provider, text="a" * 200)

    assert caught.value.permanent
    assert caught.value.status == "1"
    assert len(caught.value.message_ids) == 1


@pytest.mark.parametrize("code", [500, 502, 503, 429])
def test_a_vonage_5xx_or_429_is_transient(
    provider: VonageProvider, standin: VonageStandIn, code: int
) -> None:
    standin.queue(http_error(code))

    with pytest.raises(SmsError) as caught:
        send(provider)

    assert caught.value.transient
    assert standin.posts == 1


def test_an_http_401_stops_all_sending(provider: VonageProvider, standin: VonageStandIn) -> None:
    standin.queue(http_error(401))

    with pytest.raises(SmsError) as caught:
        send(provider)

    assert caught.value.stop_all


def test_an_unreadable_answer_is_an_unknown_outcome(
    provider: VonageProvider, standin: VonageStandIn
) -> None:
    standin.queue(http_error(200, body="<html>gateway</html>"))

    with pytest.raises(OutcomeUnknown):
        send(provider)


# -- the network -------------------------------------------------------------------------------


def test_no_answer_before_the_timeout_is_an_unknown_outcome(standin: VonageStandIn) -> None:
    standin.queue(hang(5))  # cut short when the stand-in stops
    impatient = VonageProvider(vonage_settings(standin.rest_host), timeout=1)

    try:
        with pytest.raises(OutcomeUnknown):
            send(impatient)
    finally:
        impatient.close()

    assert standin.posts == 1


@pytest.mark.parametrize("cut", [drop, reset])
def test_a_connection_dropped_after_the_request_was_read_is_unknown_and_posted_once(
    provider: VonageProvider, standin: VonageStandIn, cut: Any
) -> None:
    standin.behaviour = lambda request: cut()  # every POST, should the SDK try again

    with pytest.raises(OutcomeUnknown):
        send(provider)

    assert standin.posts == 1


def test_a_keep_alive_connection_the_server_closed_while_idle_is_replaced_not_unknown(
    provider: VonageProvider, standin: VonageStandIn
) -> None:
    send(provider)
    standin.close_connections()

    send(provider)

    assert standin.posts == 2


def test_the_sdks_default_client_re_posts_a_dropped_send_which_is_why_we_use_one_connection(
    standin: VonageStandIn,
) -> None:
    # The trap DESIGN.md rule 7 is about: the SDK's own loop re-POSTs up to pool_maxsize times.
    standin.behaviour = lambda request: drop()
    client = vonage.Vonage(
        auth=vonage.Auth(api_key="key123", api_secret="secret-456"),
        http_client_options=vonage.HttpClientOptions(rest_host=standin.rest_host, timeout=1),
    )
    try:
        with pytest.raises(requests.ConnectionError):
            client.sms.send(vonage_sms.SmsMessage(to="33612345678", from_="Clinic", text="x"))
    finally:
        client.http_client._session.close()

    assert standin.posts == 10


def test_a_refused_connection_is_transient_not_unknown(standin: VonageStandIn) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = unused.getsockname()[1]
        sms = VonageProvider(vonage_settings(f"127.0.0.1:{port}"), timeout=1)
        try:
            with pytest.raises(SmsError) as caught:
                send(sms)
        finally:
            sms.close()

    assert caught.value.transient


def test_connect_timeouts_are_transient_and_read_timeouts_unknown() -> None:
    assert isinstance(transport_error(requests.exceptions.ConnectTimeout()), SmsError)
    assert isinstance(transport_error(requests.exceptions.ReadTimeout()), OutcomeUnknown)
    assert isinstance(transport_error(requests.exceptions.ChunkedEncodingError()), OutcomeUnknown)


def test_under_twenty_seconds_before_the_deadline_nothing_is_sent(
    provider: VonageProvider, standin: VonageStandIn
) -> None:
    with pytest.raises(SmsError) as caught:
        send(provider, ttl=dt.timedelta(seconds=19))

    assert caught.value.permanent
    assert caught.value.reason == "deadline"
    assert standin.posts == 0


def test_a_client_ref_longer_than_forty_characters_is_refused(provider: VonageProvider) -> None:
    with pytest.raises(ValueError, match="client_ref"):
        send(provider, client_ref="r" * 41)


# -- one client per thread ---------------------------------------------------------------------


def test_each_thread_gets_its_own_sdk_client_and_keeps_it(
    provider: VonageProvider, standin: VonageStandIn
) -> None:
    clients: dict[str, list[Any]] = {"a": [], "b": []}

    def work(name: str) -> None:
        for _ in range(2):
            send(provider)
            clients[name].append(provider.thread_client())

    threads = [threading.Thread(target=work, args=(name,)) for name in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert clients["a"][0] is clients["a"][1]
    assert clients["b"][0] is clients["b"][1]
    assert clients["a"][0] is not clients["b"][0]
    assert standin.posts == 4
    options = clients["a"][0].http_client.http_client_options
    assert (options.pool_maxsize, options.max_retries, options.timeout) == (1, 0, 5)
    assert clients["a"][0].http_client.auth._signature_secret is None


# -- nothing identifying in logs ---------------------------------------------------------------


def test_no_log_record_carries_the_number_or_the_text(
    provider: VonageProvider, standin: VonageStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    send(provider)
    standin.queue(
        status(3),
        http_error(500, body='{"detail": "bad destination 33612345678"}'),
        drop(),
    )
    for _ in range(3):
        with pytest.raises((SmsError, OutcomeUnknown)):
            send(provider)

    messages = [record.getMessage() for record in caplog.records]
    assert any("Http Response Error" in m for m in messages)  # the SDK's warning got through
    assert any("+33*******78" in m for m in messages)  # ours, masked
    for message in messages:
        assert "612345678" not in message
        assert "Rappel" not in message
    assert not [r for r in caplog.records if r.name == "vonage" and r.levelno <= logging.DEBUG]


def test_the_log_filter_is_installed_once() -> None:
    install_log_filter()
    install_log_filter()

    filters = logging.getLogger("vonage").filters
    assert sum(isinstance(f, RedactingFilter) for f in filters) == 1


# -- console -----------------------------------------------------------------------------------


def test_the_console_prints_the_masked_number_never_the_full_one() -> None:
    stream = io.StringIO()

    sent = ConsoleProvider(stream).send(
        to=PHONE, sender=SENDER, text="Bonjour", client_ref="r1", ttl=HOUR
    )

    line = stream.getvalue()
    assert line == f"SMS {sent.message_id} to +33*******78 from {SENDER} (GSM-7, 1 part): Bonjour\n"
    assert "612345678" not in line
    assert sent.message_id.startswith("console-")
    assert sent.price is None
    assert sent.parts == 1


def test_the_console_prints_to_stderr_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    ConsoleProvider().send(to=PHONE, sender="Clinique", text="Привет", client_ref="r", ttl=HOUR)

    captured = capsys.readouterr()
    assert "to +33*******78 from Clinique (UCS-2, 1 part): Привет" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+33612345678", "+33*******78"),
        ("+447700900123", "+44********23"),
        ("+8613812345678", "+86*********78"),
        ("+1234", "*****"),
    ],
)
def test_mask_phone_keeps_the_prefix_and_the_last_two_digits(number: str, masked: str) -> None:
    assert mask_phone(number) == masked


def test_the_provider_follows_the_settings(standin: VonageStandIn) -> None:
    assert isinstance(provider_from_settings(Settings(database_url="sqlite://")), ConsoleProvider)
    vonage_provider = provider_from_settings(vonage_settings(standin.rest_host))
    assert isinstance(vonage_provider, VonageProvider)
    assert vonage_provider.name == "vonage"


# -- the stand-in's delivery receipts ----------------------------------------------------------


class _Receipts(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.received.append(dict(urllib.parse.parse_qsl(body)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_standin_posts_signed_receipts_that_the_sdk_verifies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = http.server.HTTPServer(("127.0.0.1", 0), _Receipts)
    _Receipts.received = []
    thread = threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/webhooks/vonage/status"
    try:
        with VonageStandIn(delivery_receipts_to=url, signature_secret="signature-secret-789") as s:
            monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(s.ca_bundle))
            sms = VonageProvider(vonage_settings(s.rest_host), timeout=1)
            sent = send(sms)
            sms.close()
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join()

    (receipt,) = _Receipts.received
    assert receipt["messageId"] == sent.message_id
    assert receipt["client-ref"] == "reminder-42"
    assert receipt["status"] == "delivered"
    auth = vonage.Auth(
        api_key="key123", signature_secret="signature-secret-789", signature_method="sha256"
    )
    assert auth.check_signature(receipt)
