"""HL7 v2 SIU over MLLP: the messages under tests/data/hl7/, their ACKs and what they store."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import hl7
import pytest
from sqlalchemy import select, text
from sqlalchemy.pool import QueuePool

from reminders import db, siu
from reminders.clinics import ClinicOptions, create_clinic
from reminders.models import Appointment
from reminders.siu import EB, SB, Frame, FrameReader, TooLarge, apply_message, frame, serve
from tests.conftest import TEST_SECRET, Cast

DATA = Path(__file__).parent / "data" / "hl7"
SECRET = TEST_SECRET.encode()
PARIS = dt.timezone(dt.timedelta(hours=1))


def message(name: str) -> str:
    return (DATA / f"{name}.hl7").read_text(encoding="utf-8")


def ack_of(text: str) -> tuple[str, str, str, hl7.Message]:
    """(MSA-1, MSA-2, MSA-3, the parsed ACK)."""
    parsed = hl7.parse(text)
    msa = parsed.segment("MSA")
    third = parsed.unescape(str(msa[3])) if len(msa) > 3 else ""
    return str(msa[1]), str(msa[2]), third, parsed


def apply(cast: Cast, name_or_text: str, now: dt.datetime | None = None) -> tuple[str, str, str]:
    raw = message(name_or_text) if "|" not in name_or_text else name_or_text
    code, control, text, _ = ack_of(
        apply_message(raw, cast.clinic_id, now or dt.datetime.now(dt.UTC), SECRET)
    )
    return code, control, text


def stored(external_id: str) -> Appointment:
    with db.session_scope() as session:
        appointment = session.scalars(
            select(Appointment).where(Appointment.external_id == external_id)
        ).one()
        _ = appointment.patient, appointment.reminders  # loaded before the session closes
        return appointment


def count() -> int:
    with db.session_scope() as session:
        return len(session.scalars(select(Appointment)).all())


def test_s12_v251_with_tq1(cast: Cast) -> None:
    code, control, text = apply(cast, "s12_v251_tq1")
    assert (code, control, text) == ("AA", "MSG00001", "created")
    appointment = stored("FL10001")
    assert appointment.starts_at == dt.datetime(2031, 3, 10, 9, 30, tzinfo=PARIS)
    assert appointment.duration_minutes == 20
    assert appointment.practitioner == "Dr Jean MARTIN"
    assert appointment.location == "Cardiologie salle 3"
    assert appointment.kind == "Consultation de cardiologie"
    assert appointment.status == "booked"
    assert appointment.source_updated_at == dt.datetime(2031, 3, 1, 9, 15, tzinfo=dt.UTC)
    patient = appointment.patient
    assert patient.external_id == "P000123"
    assert patient.name == "Marie DUPONT"
    assert patient.phone_e164 == "+33612345678"  # the CP repetition, not the landline first
    assert patient.language == "fr"
    assert appointment.reminders  # planned like any other appointment


def test_ack_header(cast: Cast) -> None:
    _, _, _, ack = ack_of(
        apply_message(message("s12_v251_tq1"), cast.clinic_id, dt.datetime.now(dt.UTC), SECRET)
    )
    msh = ack.segment("MSH")
    assert [str(msh[n]) for n in (3, 4, 5, 6)] == ["REMINDERS", "CLINIQUE", "EPIC", "CHU_PARIS"]
    assert str(msh[9]) == "ACK^S12^ACK"
    assert str(msh[12]) == "2.5.1"
    assert str(msh[10]) != "MSG00001"


def test_s12_v23_with_sch11_in_summer_time(cast: Cast) -> None:
    assert apply(cast, "s12_v23") == ("AA", "MB-4711", "created")
    appointment = stored("88112")
    assert appointment.starts_at == dt.datetime(2031, 6, 16, 6, 30, tzinfo=dt.UTC)  # 08:30 +02
    assert appointment.duration_minutes == 30
    assert appointment.practitioner == "Dr Sophie DURAND"
    assert appointment.location == "RADIO Box 2"
    assert appointment.kind == "IRM genou"
    assert appointment.patient.phone_e164 == "+447911123456"
    assert appointment.patient.language == "en"
    # a naive MSH-7 is read in the clinic's time zone
    assert appointment.source_updated_at == dt.datetime(2031, 5, 2, 10, 0, tzinfo=dt.UTC)


def test_lifecycle_s13_s14_s15(cast: Cast) -> None:
    assert apply(cast, "s12_v251_tq1")[0] == "AA"
    assert apply(cast, "s13") == ("AA", "MSG00002", "updated")
    appointment = stored("FL10001")
    assert appointment.starts_at == dt.datetime(2031, 3, 12, 14, 0, tzinfo=PARIS)
    assert appointment.duration_minutes == 20
    assert apply(cast, "s14") == ("AA", "MSG00003", "updated")
    assert stored("FL10001").location == "Cardiologie salle 5"
    assert apply(cast, "s15") == ("AA", "MSG00004", "updated")
    assert stored("FL10001").status == "cancelled"
    assert apply(cast, "s15") == ("AA", "MSG00004", "unchanged")  # a resent message
    assert count() == 1


def test_s14_after_a_later_s15_does_not_undo_the_cancellation(cast: Cast) -> None:
    apply(cast, "s12_v251_tq1")
    assert apply(cast, "s15")[2] == "updated"
    assert apply(cast, "s14") == ("AA", "MSG00003", "stale: older than the stored version")
    appointment = stored("FL10001")
    assert appointment.status == "cancelled"
    assert appointment.location == "Cardiologie salle 3"  # not the S14's "salle 5"


def test_s17_deleted_is_cancelled(cast: Cast) -> None:
    apply(cast, "s12_v23")
    assert apply(cast, "s17") == ("AA", "MB-4790", "updated")
    assert stored("88112").status == "cancelled"


def test_s26_no_show(cast: Cast) -> None:
    assert apply(cast, "s26") == ("AA", "MSG00900", "created")
    appointment = stored("FL10900")
    assert appointment.outcome == "no_show"
    assert appointment.starts_at == dt.datetime(2025, 1, 15, 10, 0, tzinfo=PARIS)
    assert appointment.duration_minutes == 15
    assert appointment.patient.phone_e164 == "+33698765432"  # XTN-12, unformatted
    assert appointment.kind == "Consultation"  # SCH-8


def test_s26_before_the_start_is_a_data_error(cast: Cast) -> None:
    code, control, text = apply(cast, "s26", now=dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
    assert (code, control) == ("AE", "MSG00900")
    assert text.startswith("outcome:")
    assert count() == 0


@pytest.mark.parametrize(
    ("name", "code", "control", "reason"),
    [
        ("adt_a04", "AR", "ADT00042", "unsupported message type ADT^A04"),
        ("wrong_order", "AR", "MSG00005", "segment order: MSH must come first"),
        ("no_sch", "AR", "MSG00006", "SCH segment missing"),
    ],
)
def test_rejected_messages(cast: Cast, name: str, code: str, control: str, reason: str) -> None:
    raw = apply_message(message(name), cast.clinic_id, dt.datetime.now(dt.UTC), SECRET)
    assert ack_of(raw)[:3] == (code, control, reason)
    err = ack_of(raw)[3].segment("ERR")
    assert str(err[4]) == "E"
    assert ack_of(raw)[3].unescape(str(err[8])) == reason
    assert count() == 0


def _edit(old: str, new: str) -> str:
    text = message("s12_v251_tq1")
    assert old in text
    return text.replace(old, new)


@pytest.mark.parametrize(
    ("raw", "code", "reason"),
    [
        (_edit("P000123^^^CHU_PARIS^MR~", "~"), "AE", "no patient id in PID-3"),
        (
            _edit("20310310093000|2031", "2031031009|2031"),
            "AE",
            "TQ1-7: not an HL7 timestamp (YYYYMMDDHHMM[SS][+/-ZZZZ])",
        ),
        (_edit("20310310093000|2031", "20311340093000|2031"), "AE", "TQ1-7: not a valid date"),
        (_edit("^33^6^12345678^^^^^+33612345678", "^^^^^^^^123"), "AE", "patient.phone: "),
        (_edit("PL20001^EPIC|FL10001^EPIC", "|"), "AE", "no appointment id in SCH-2 or SCH-1"),
        (
            _edit("SIU^S12^SIU_S12", "SIU^S99^SIU_S12"),
            "AR",
            "unsupported message type SIU^S99",
        ),
        (
            "\r".join(line for line in message("s12_v251_tq1").splitlines() if line[:3] != "PID"),
            "AR",
            "PID segment missing",
        ),
        (
            "\r".join(
                sorted(message("s12_v251_tq1").splitlines(), key=lambda s: s[:3] != "MSH")[:1]
                + [line for line in message("s12_v251_tq1").splitlines() if line[:3] == "PID"]
                + [line for line in message("s12_v251_tq1").splitlines()[1:] if line[:3] != "PID"]
            ),
            "AR",
            "segment order: PID before SCH",
        ),
    ],
)
def test_data_errors(cast: Cast, raw: str, code: str, reason: str) -> None:
    got_code, control, text = apply(cast, raw)
    assert (got_code, control) == (code, "MSG00001")
    assert text.startswith(reason)
    assert count() == 0


def test_line_endings_and_placer_id(cast: Cast) -> None:
    raw = message("s12_v23").replace("88112^MEDIBOARD", "").replace("\n", "\r\n")
    assert apply(cast, raw)[0] == "AA"
    assert stored("4711").duration_minutes == 30


def test_unknown_language_code_falls_back_with_a_note(cast: Cast) -> None:
    code, _, text = apply(cast, _edit("|fr^French^ISO639|", "|99^Autre|"))
    assert code == "AA"
    assert text.startswith("created; PID-15")
    assert stored("FL10001").patient.language == "fr"


def test_escaped_text(cast: Cast) -> None:
    apply(cast, _edit("Cardiologie salle 3", "Cardio \\T\\ rythmo"))
    assert stored("FL10001").location == "Cardio & rythmo"


def test_no_patient_data_in_logs(cast: Cast, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="reminders.siu")
    apply(cast, "s12_v251_tq1")
    apply(cast, _edit("^33^6^12345678^^^^^+33612345678", "^^^^^^^^123"))
    for secret in ("DUPONT", "Marie", "612345678", "42123456", "P000123"):
        assert secret not in caplog.text


def test_each_message_on_a_held_connection_is_committed_before_its_ack(cast: Cast) -> None:
    """An MLLP connection's messages share one database connection, each in its own
    transaction: another connection sees the appointment as soon as the ACK is made."""
    held = siu.HeldConnection()
    try:
        for name, expected in (("s12_v251_tq1", "created"), ("s15", "updated")):
            raw = apply_message(
                message(name), cast.clinic_id, dt.datetime.now(dt.UTC), SECRET, held
            )
            assert ack_of(raw)[0] == "AA"
            assert ack_of(raw)[2] == expected
            assert count() == 1
        assert stored("FL10001").status == "cancelled"
    finally:
        held.close()


@pytest.mark.postgres
def test_a_dropped_held_connection_is_replaced_and_the_message_applied(pg_database: str) -> None:
    with db.session_scope() as session:
        clinic, _ = create_clinic(
            session, ClinicOptions(name="C", timezone="Europe/Paris", country="FR", language="fr")
        )
        clinic_id = clinic.id
    held = siu.HeldConnection()
    now = dt.datetime.now(dt.UTC)
    try:
        assert ack_of(apply_message(message("s12_v23"), clinic_id, now, SECRET, held))[0] == "AA"
        with held.transaction() as session:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with db.session_scope() as session:
            session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        raw = apply_message(message("s12_v251_tq1"), clinic_id, now, SECRET, held)
        assert ack_of(raw)[:3] == ("AA", "MSG00001", "created")
        with held.transaction() as session:
            assert session.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        held.close()
    assert count() == 2


# --- framing ---------------------------------------------------------------------------------


def test_frame_reader_split_skip_and_resync() -> None:
    reader = FrameReader(max_frame=100)
    stream = b"noise" + frame("A|1") + b"\n" + frame("B|2") + bytes([SB]) + b"x" * 300
    stream += bytes([EB, 0x0D]) + frame("C|3")
    events = []
    for i in range(0, len(stream), 7):  # split anywhere, also between 0x1C and 0x0D
        events += reader.feed(stream[i : i + 7])
    assert events[0] == Frame(b"A|1")
    assert events[1] == Frame(b"B|2")
    assert isinstance(events[2], TooLarge)
    assert events[3] == Frame(b"C|3")
    assert len(events) == 4
    assert reader.skipped == 6
    assert len(reader.buffer) == 0


# --- over real sockets -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def server(cast: Cast) -> Iterator[int]:
    """`serve` in a background event loop; yields its port."""
    with running_server(cast) as port:
        yield port


@contextlib.contextmanager
def running_server(cast: Cast) -> Iterator[int]:
    """`serve` in a background event loop until the block ends (then cancelled, as SIGTERM
    does, and its loop closed); yields its port."""
    port = _free_port()
    loop = asyncio.new_event_loop()
    task: asyncio.Task[None] | None = None

    def main() -> None:
        nonlocal task
        asyncio.set_event_loop(loop)
        task = loop.create_task(serve(cast.clinic_id, "127.0.0.1", port, max_frame=1_048_576))
        with contextlib.suppress(asyncio.CancelledError, Exception):
            loop.run_until_complete(task)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
    yield port
    assert task is not None
    loop.call_soon_threadsafe(task.cancel)
    thread.join(15)
    loop.close()


def _read_ack(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(bytes([EB, 0x0D])):
        chunk = sock.recv(1)  # one byte at a time: never reads into the next ACK
        assert chunk, "connection closed before the ACK"
        data += chunk
    assert data[0] == SB
    return data[1:-2].decode()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=60)


def test_mllp_one_connection_acks_in_order(server: int) -> None:
    names = ["s12_v251_tq1", "s13", "adt_a04", "s15", "s14"]
    with _connect(server) as sock:
        sock.sendall(b"garbage\r\n" + b"".join(frame(message(n)) for n in names))
        acks = [ack_of(_read_ack(sock))[:3] for _ in names]
    assert acks == [
        ("AA", "MSG00001", "created"),
        ("AA", "MSG00002", "updated"),
        ("AR", "ADT00042", "unsupported message type ADT^A04"),
        ("AA", "MSG00004", "updated"),
        ("AA", "MSG00003", "stale: older than the stored version"),
    ]
    assert stored("FL10001").status == "cancelled"


def test_mllp_ten_megabyte_frame(server: int) -> None:
    big = message("s12_v251_tq1").replace("\n", "\r") + "NTE|2||" + "x" * 10_000_000 + "\r"
    with _connect(server) as sock:
        sock.sendall(frame(big))
        code, control, text, _ = ack_of(_read_ack(sock))
        assert (code, control) == ("AR", "MSG00001")
        assert text.startswith("message too large")
        sock.sendall(frame(message("s12_v23")))  # resynchronised on the same connection
        assert ack_of(_read_ack(sock))[:3] == ("AA", "MB-4711", "created")
    with _connect(server) as sock:
        sock.sendall(frame(message("s17")))
        assert ack_of(_read_ack(sock))[0] == "AA"
    assert count() == 1


def test_stopping_the_server_gives_back_the_database_connections_of_open_ones(
    cast: Cast,
) -> None:
    pool = db.get_engine().pool
    assert isinstance(pool, QueuePool)
    with contextlib.ExitStack() as later:
        with running_server(cast) as port:
            sock = later.enter_context(_connect(port))  # closed only after the server stops
            sock.sendall(frame(message("s12_v23")))
            assert ack_of(_read_ack(sock))[:2] == ("AA", "MB-4711")
            assert pool.checkedout() == 1  # held by the open connection
        assert pool.checkedout() == 0


def test_mllp_truncated_frame(server: int) -> None:
    with _connect(server) as sock:
        sock.sendall(frame(message("s12_v251_tq1"))[:-200])
    with _connect(server) as sock:
        sock.sendall(frame(message("s12_v23")))
        assert ack_of(_read_ack(sock))[:2] == ("AA", "MB-4711")
    assert count() == 1


def test_a_message_refused_by_intake_does_not_break_the_next_ones(cast: Cast) -> None:
    """The clinic read in the transaction of a refused message stays usable (it is cached)."""
    siu._clinics.clear()  # read in the next message's transaction
    bad_phone = _edit("^33^6^12345678^^^^^+33612345678", "^^^^^^^^123")
    assert apply(cast, bad_phone)[0] == "AE"
    assert apply(cast, "s12_v251_tq1")[0] == "AA"
