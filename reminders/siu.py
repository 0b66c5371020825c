"""HL7 v2 SIU messages over MLLP: each message is one idempotent upsert, answered by an ACK.

`apply_message` turns one message into `Intake.put` (its own transaction) and returns the ACK;
`serve` is the MLLP listener (`reminders mllp`), `run` runs it until SIGTERM/SIGINT.

Field mapping (HL7 v2.3 to v2.5.1):

- trigger (MSH-9.2): S12 new, S13 rescheduled, S14 modified -> booked; S15 cancelled, S17 deleted
  -> cancelled; S26 no-show -> booked with outcome no_show. Any other type: AR.
- appointment id: SCH-2.1 (filler), else SCH-1.1 (placer). Patient id: PID-3.1.
- start: TQ1-7, else SCH-11.4, else AIS-4 / AIL-6 / AIP-6. Duration: SCH-9 in SCH-10 units, else
  TQ1-6, else TQ1-8 (or SCH-11.5) minus the start, else SCH-11.3 (`M20`), else AIS-7/8, AIL-9/10,
  AIP-9/10. Timestamps `YYYYMMDDHHMM[SS[.S]][+/-ZZZZ]`: with an offset it is used, without one
  they are read in the clinic's time zone.
- MSH-7 -> source_updated_at: an older message than the stored one changes nothing (AA, "stale").
- PID-5 name (given family), PID-13 phone (a cellular `CP` repetition, else the first usable
  one), PID-15.1 language (an unrecognised code is ignored: the clinic's language is used, and
  MSA-3 says so).
- AIP-3 practitioner (prefix given family, else the first component), AIL-3 location (PL-9
  description, else point of care and room), kind: AIS-3, else SCH-7, else SCH-8 (text, else code).

ACK: AA when applied (MSA-3 says created / updated / unchanged / stale); AR when the message is
rejected for its structure or type (no MSH, unsupported type, missing or misplaced SCH/PID); AE when
its data cannot be applied (no id, bad timestamp, invalid phone...). AE/AR carry the reason in
MSA-3 and an ERR segment. Logs name the control id, type and appointment id, never patient data.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import hl7
from pydantic import ValidationError
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from reminders.clinics import get_clinic
from reminders.config import get_settings
from reminders.db import get_engine, session_scope
from reminders.models import Clinic
from reminders.planning import Intake, IntakeError
from reminders.schemas import BatchItem
from reminders.security import process_secret_key

log = logging.getLogger(__name__)

SB = 0x0B  # MLLP start block
EB = 0x1C  # MLLP end block (followed by CR)
CR = 0x0D
MAX_FRAME = 1_048_576
DEFAULT_PORT = 2575

# trigger event -> (status, outcome)
TRIGGERS: dict[str, tuple[str, str | None]] = {
    "S12": ("booked", None),
    "S13": ("booked", None),
    "S14": ("booked", None),
    "S15": ("cancelled", None),
    "S17": ("cancelled", None),
    "S26": ("booked", "no_show"),
}
# Segments of the SIU structure that belong after SCH.
_AFTER_SCH = ("TQ1", "PID", "PD1", "PV1", "PV2", "OBX", "DG1", "RGS", "AIS", "AIG", "AIL", "AIP")
_UNITS = {  # duration unit -> minutes
    "s": 1 / 60,
    "sec": 1 / 60,
    "second": 1 / 60,
    "seconds": 1 / 60,
    "": 1,
    "m": 1,
    "min": 1,
    "mn": 1,
    "minute": 1,
    "minutes": 1,
    "h": 60,
    "hr": 60,
    "hour": 60,
    "hours": 60,
    "d": 1440,
    "day": 1440,
    "days": 1440,
}
_TIMESTAMP = re.compile(
    r"^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?(?:([+-])(\d{2})(\d{2}))?$"
)
# HL7 error codes (table 0357)
SEQUENCE_ERROR = "100^Segment sequence error^HL70357"
REQUIRED_MISSING = "101^Required field missing^HL70357"
DATA_TYPE_ERROR = "102^Data type error^HL70357"
UNSUPPORTED_TYPE = "200^Unsupported message type^HL70357"
INTERNAL_ERROR = "207^Application internal error^HL70357"


class Rejected(Exception):
    """A message that is not applied: `code` AE or AR, `reason` for MSA-3, `where` for ERR-2."""

    def __init__(self, code: str, reason: str, error: str, where: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.error = error
        self.where = where


@dataclass
class _Header:
    """The MSH fields an ACK needs, read without trusting the rest of the message."""

    field_sep: str = "|"
    encoding: str = "^~\\&"
    fields: list[str] = field(default_factory=list)

    def get(self, n: int) -> str:
        """MSH-n, raw (MSH-1 is the separator, MSH-2 the encoding characters)."""
        index = n - 1  # fields[0] is MSH-1 (the field separator)
        return self.fields[index] if 0 <= index < len(self.fields) else ""

    def component(self, n: int, c: int) -> str:
        parts = self.get(n).split(self.encoding[0] if self.encoding else "^")
        return parts[c - 1] if c - 1 < len(parts) else ""

    @property
    def control_id(self) -> str:
        return self.get(10)

    @property
    def message_type(self) -> str:
        return "^".join(p for p in (self.component(9, 1), self.component(9, 2)) if p)


def _segments(raw: str) -> list[str]:
    text = raw.replace("\r\n", "\r").replace("\n", "\r")
    return [s for s in (line.strip("\x00 ") for line in text.split("\r")) if s]


def _header(segments: list[str]) -> _Header:
    for line in segments:
        if line.startswith("MSH") and len(line) >= 8:
            sep = line[3]
            parts = line.split(sep)
            return _Header(sep, parts[1][:4], [sep, *parts[1:]])
    return _Header()


def _escape(text: str, header: _Header) -> str:
    """HL7-escapes a free text for the ACK (escape character first)."""
    enc = (header.encoding + "^~\\&")[:4]
    component, repetition, escape, sub = enc[0], enc[1], enc[2], enc[3]
    out = text.replace(escape, f"{escape}E{escape}")
    for char, code in ((header.field_sep, "F"), (component, "S"), (repetition, "R"), (sub, "T")):
        out = out.replace(char, f"{escape}{code}{escape}")
    return " ".join(out.split())  # no CR/LF in a field


def make_ack(
    header: _Header,
    code: str,
    text: str = "",
    error: str | None = None,
    where: str = "",
    now: dt.datetime | None = None,
) -> str:
    """The ACK message: MSH with sending and receiving swapped, MSA, and ERR for AE/AR."""
    sep = header.field_sep
    comp = (header.encoding or "^")[0]
    stamp = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y%m%d%H%M%S+0000")
    trigger = header.component(9, 2)
    msh = sep.join(
        [
            "MSH",
            header.encoding or "^~\\&",
            header.get(5),
            header.get(6),
            header.get(3),
            header.get(4),
            stamp,
            "",
            comp.join(["ACK", trigger, "ACK"]) if trigger else "ACK",
            uuid.uuid4().hex[:20],
            header.get(11) or "P",
            header.component(12, 1) or "2.5.1",
        ]
    )
    segments = [msh, sep.join(["MSA", code, header.control_id, _escape(text, header)])]
    if error is not None:
        location = where.replace("^", comp)
        err = sep.join(
            [
                "ERR",
                # ERR-1 (v2.3/2.4): location^...^code; ERR-2 (v2.5): location; ERR-3 code;
                # ERR-4 severity; ERR-8 user message.
                comp.join([*location.split(comp)[:3], error.split("^")[0]]) if location else "",
                location,
                error.replace("^", comp),
                "E",
                "",
                "",
                "",
                _escape(text, header),
            ]
        )
        segments.append(err)
    return "\r".join(segments) + "\r"


Segment = list[str]  # a segment's fields: [0] its name, [n] field n (MSH aside: see _Header)


class _Message:
    """Field access on a message: components of repetitions, unescaped and stripped.

    The segments are split into fields only: python-hl7's parser builds an object for each
    component of each segment (some 200 per SIU message, about a sixth of the CPU of applying
    one), while the mapping reads some 25 fields. python-hl7 still unescapes the values read.
    """

    def __init__(self, segments: list[str], header: _Header) -> None:
        enc = (header.encoding + "^~\\&")[:4]
        self.component_sep, self.repetition_sep, self.escape, self.sub_sep = list(enc)
        separators = "\r" + header.field_sep + self.repetition_sep + self.component_sep
        self._unescaper = hl7.Message("\r", esc=self.escape, separators=separators + self.sub_sep)
        self._segments = [line.split(header.field_sep) for line in segments]
        self.order = [fields[0] for fields in self._segments]

    def segment(self, name: str) -> Segment | None:
        for fields in self._segments:
            if fields[0] == name:
                return fields
        return None

    def repetitions(self, segment: Segment | None, n: int) -> list[str]:
        if segment is None or n >= len(segment):
            return []
        return segment[n].split(self.repetition_sep)

    def components(self, value: str) -> list[str]:
        return [
            self._clean(part.split(self.sub_sep)[0]) for part in value.split(self.component_sep)
        ]

    def get(self, segment: Segment | None, n: int, c: int = 1, rep: int = 0) -> str:
        reps = self.repetitions(segment, n)
        if rep >= len(reps):
            return ""
        parts = reps[rep].split(self.component_sep)
        return self._clean(parts[c - 1].split(self.sub_sep)[0]) if c - 1 < len(parts) else ""

    def sub(self, segment: Segment | None, n: int, c: int, s: int) -> str:
        reps = self.repetitions(segment, n)
        if not reps:
            return ""
        parts = reps[0].split(self.component_sep)
        if c - 1 >= len(parts):
            return ""
        subs = parts[c - 1].split(self.sub_sep)
        return self._clean(subs[s - 1]) if s - 1 < len(subs) else ""

    def _clean(self, value: str) -> str:
        if self.escape in value:
            value = str(self._unescaper.unescape(value))
        value = value.strip()
        return "" if value == '""' else value


def _label(where: str) -> str:
    """`TQ1^1^7` (an ERR location) -> `TQ1-7` (for MSA-3)."""
    parts = where.split("^")
    return f"{parts[0]}-{parts[2]}" if len(parts) == 3 else where


def parse_timestamp(value: str, zone: ZoneInfo, where: str) -> dt.datetime:
    """An HL7 DTM/TS (`YYYYMMDDHHMM[SS[.S]][+/-ZZZZ]`); naive ones are in `zone`."""
    label = _label(where)
    match = _TIMESTAMP.match(value.strip())
    if match is None:
        raise Rejected(
            "AE",
            f"{label}: not an HL7 timestamp (YYYYMMDDHHMM[SS][+/-ZZZZ])",
            DATA_TYPE_ERROR,
            where,
        )
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    tz: dt.tzinfo = zone
    if sign is not None:
        offset = dt.timedelta(hours=int(off_h), minutes=int(off_m))
        if offset > dt.timedelta(hours=14) or int(off_m) >= 60:
            raise Rejected("AE", f"{label}: invalid UTC offset", DATA_TYPE_ERROR, where)
        tz = dt.timezone(-offset if sign == "-" else offset)
    try:
        return dt.datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")[:6]),
            tzinfo=tz,
        )
    except ValueError:
        raise Rejected(
            "AE", f"{label}: not a valid date and time", DATA_TYPE_ERROR, where
        ) from None


def _minutes(quantity: str, unit: str, where: str) -> int | None:
    if not quantity:
        return None
    try:
        amount = float(quantity)
    except ValueError:
        raise Rejected(
            "AE", f"{_label(where)}: duration is not a number", DATA_TYPE_ERROR, where
        ) from None
    factor = _UNITS.get(unit.strip().lower())
    if factor is None:
        raise Rejected("AE", f"{_label(where)}: unknown duration unit", DATA_TYPE_ERROR, where)
    return math.ceil(amount * factor - 1e-9)


def _tq_duration(value: str, where: str) -> int | None:
    """SCH-11.3 duration: `M20` (minutes), `S1200`, `H1`, `D1`, or a bare number of minutes."""
    match = re.fullmatch(r"([SMHD]?)(\d+(?:\.\d+)?)", value.strip().upper())
    if match is None:
        return None
    unit = {"S": "s", "M": "min", "H": "h", "D": "d", "": "min"}[match.group(1)]
    return _minutes(match.group(2), unit, where)


def _check_structure(msg: _Message, header: _Header) -> tuple[str, str | None]:
    kind, trigger = header.component(9, 1), header.component(9, 2)
    if kind != "SIU" or trigger not in TRIGGERS:
        shown = header.message_type or "none"
        raise Rejected("AR", f"unsupported message type {shown}", UNSUPPORTED_TYPE, "MSH^1^9")
    order = msg.order
    if "SCH" not in order:
        raise Rejected("AR", "SCH segment missing", SEQUENCE_ERROR, "SCH")
    if "PID" not in order:
        raise Rejected("AR", "PID segment missing", SEQUENCE_ERROR, "PID")
    sch = order.index("SCH")
    for name in _AFTER_SCH:
        if name in order and order.index(name) < sch:
            raise Rejected("AR", f"segment order: {name} before SCH", SEQUENCE_ERROR, name)
    return TRIGGERS[trigger]


def _phone(msg: _Message, pid: Segment) -> str | None:
    """PID-13: a cellular (`CP`) repetition first, else the first usable one."""
    candidates: list[tuple[int, str]] = []
    for rank, rep in enumerate(msg.repetitions(pid, 13)):
        parts = msg.components(rep) + [""] * 12
        number, use, equipment = parts[0], parts[1].upper(), parts[2].upper()
        if equipment in ("FX", "INTERNET", "X.400", "MD") or use == "NET":
            continue
        if not number:
            number = parts[11]
        if not number and parts[6]:
            local = parts[5] + parts[6]
            number = f"+{parts[4].lstrip('+')}{local.lstrip('0')}" if parts[4] else local
        if not number:
            continue
        preference = 0 if equipment in ("CP", "BP") else 1 if use in ("PRN", "ORN") else 2
        candidates.append((preference * 100 + rank, number))
    return min(candidates)[1] if candidates else None


def _person(parts: list[str], start: int) -> str:
    """An XCN/XPN name from `start` (family, given, middle, suffix, prefix)."""
    padded = parts + [""] * 8
    family, given, middle, suffix, prefix = padded[start : start + 5]
    return " ".join(p for p in (prefix, given, middle, family, suffix) if p)


def _language(msg: _Message, pid: Segment) -> tuple[str | None, str | None]:
    from reminders.normalize import canonical_language

    code = msg.get(pid, 15, 1)
    if not code:
        return None, None
    try:
        canonical_language(code)
    except ValueError:
        return None, "PID-15 language code not recognised: the clinic's language is used"
    return code, None


def build_appointment(
    msg: _Message, header: _Header, zone: ZoneInfo
) -> tuple[str, BatchItem, str | None]:
    """The appointment a message describes: (external_id, data, a note for MSA-3)."""
    status, outcome = _check_structure(msg, header)
    sch, pid, tq1 = msg.segment("SCH"), msg.segment("PID"), msg.segment("TQ1")
    ais, ail, aip = msg.segment("AIS"), msg.segment("AIL"), msg.segment("AIP")
    assert pid is not None
    assert sch is not None
    external_id = msg.get(sch, 2, 1) or msg.get(sch, 1, 1)
    if not external_id:
        raise Rejected("AE", "no appointment id in SCH-2 or SCH-1", REQUIRED_MISSING, "SCH^1^2")
    patient_id = msg.get(pid, 3, 1)
    if not patient_id:
        raise Rejected("AE", "no patient id in PID-3", REQUIRED_MISSING, "PID^1^3")

    start: dt.datetime | None = None
    for segment, n, where in (
        (tq1, 7, "TQ1^1^7"),
        (sch, 11, "SCH^1^11"),
        (ais, 4, "AIS^1^4"),
        (ail, 6, "AIL^1^6"),
        (aip, 6, "AIP^1^6"),
    ):
        value = msg.get(segment, n, 4 if segment is sch else 1)
        if value:
            start = parse_timestamp(value, zone, where)
            break
    if start is None:
        raise Rejected("AE", "no start time in TQ1-7 or SCH-11.4", REQUIRED_MISSING, "SCH^1^11")

    duration = _minutes(msg.get(sch, 9), msg.get(sch, 10), "SCH^1^9")
    if duration is None:
        duration = _minutes(msg.get(tq1, 6, 1), msg.sub(tq1, 6, 2, 1), "TQ1^1^6")
    for segment, n, c, where in ((tq1, 8, 1, "TQ1^1^8"), (sch, 11, 5, "SCH^1^11")):
        end = msg.get(segment, n, c)
        if duration is None and end:
            seconds = (parse_timestamp(end, zone, where) - start).total_seconds()
            duration = math.ceil(seconds / 60)
    if duration is None and msg.get(sch, 11, 3):
        duration = _tq_duration(msg.get(sch, 11, 3), "SCH^1^11")
    for segment, n, where in ((ais, 7, "AIS^1^7"), (ail, 9, "AIL^1^9"), (aip, 9, "AIP^1^9")):
        if duration is None:
            duration = _minutes(msg.get(segment, n), msg.get(segment, n + 1), where)
    if duration is None:
        raise Rejected("AE", "no duration in SCH-9, TQ1 or SCH-11", REQUIRED_MISSING, "SCH^1^9")

    sent = header.component(7, 1)
    source_updated_at = parse_timestamp(sent, zone, "MSH^1^7") if sent else None
    names = msg.repetitions(pid, 5)
    name_parts = (msg.components(names[0]) if names else []) + ["", ""]
    patient_name = " ".join(p for p in (name_parts[1], name_parts[0]) if p)
    language, note = _language(msg, pid)
    practitioner = ""
    if aip is not None:
        parts = msg.components(msg.repetitions(aip, 3)[0]) if msg.repetitions(aip, 3) else []
        practitioner = _person(parts, 1) or (parts[0] if parts else "")
    location = ""
    if ail is not None:
        parts = msg.components(msg.repetitions(ail, 3)[0]) if msg.repetitions(ail, 3) else []
        parts += [""] * 9
        location = parts[8] or " ".join(p for p in parts[:2] if p)
    kind = ""
    for segment, n in ((ais, 3), (sch, 7), (sch, 8)):
        kind = kind or msg.get(segment, n, 2) or msg.get(segment, n, 1)
    body = {
        "external_id": external_id,
        "starts_at": start,
        "duration_minutes": duration,
        "patient": {
            "external_id": patient_id,
            "name": patient_name[:200] or None,
            "phone": _phone(msg, pid),
            "language": language,
        },
        "practitioner": practitioner[:200] or None,
        "location": location[:200] or None,
        "kind": kind[:100] or None,
        "status": status,
        "outcome": outcome,
        "source_updated_at": source_updated_at,
    }
    try:
        data = BatchItem.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise Rejected("AE", f"{where}: {first['msg']}", DATA_TYPE_ERROR) from None
    return external_id, data, note


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # ISO 8859-1 (MSH-18 `8859/1`), common in hospitals


def apply_message(
    raw: str,
    clinic_id: int,
    now: dt.datetime,
    secret: bytes,
    database: HeldConnection | None = None,
) -> str:
    """Applies one SIU message (its own transaction, committed before the ACK is made) and
    returns the ACK's text. `database`: the connection of the MLLP connection it came on (by
    default, one from the pool)."""
    segments = _segments(raw)
    header = _header(segments)
    try:
        if not segments or not segments[0].startswith("MSH"):
            if header.fields:
                raise Rejected("AR", "segment order: MSH must come first", SEQUENCE_ERROR, "MSH")
            raise Rejected("AR", "no MSH segment", SEQUENCE_ERROR, "MSH")
        msg = _Message(segments, header)
        _check_structure(msg, header)
        for attempt in (1, 2):
            try:
                text = _apply(msg, header, clinic_id, now, secret, database)
                break
            except IntegrityError:
                if attempt == 2:  # two connections created the same patient: once more
                    raise
            except DBAPIError as exc:
                # The held connection was dropped (a server restart, an idle timeout): once
                # more on a new one. Safe: the message is applied whole or not at all, and a
                # second time changes nothing.
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        log.info("HL7 %s %s: AA %s", header.control_id, header.message_type, text)
        return make_ack(header, "AA", text)
    except Rejected as exc:
        log.info("HL7 %s %s: %s %s", header.control_id, header.message_type, exc.code, exc.reason)
        return make_ack(header, exc.code, exc.reason, exc.error, exc.where)
    except IntakeError as exc:
        reason = f"{exc.field}: {exc.reason}"
        log.info("HL7 %s %s: AE %s", header.control_id, header.message_type, reason)
        return make_ack(header, "AE", reason, DATA_TYPE_ERROR, _intake_location(exc.field))
    except Exception:
        log.exception("HL7 %s %s: not applied", header.control_id, header.message_type)
        return make_ack(header, "AE", "application internal error", INTERNAL_ERROR)


def _intake_location(name: str) -> str:
    return {
        "patient.phone": "PID^1^13",
        "patient.language": "PID^1^15",
        "external_id": "SCH^1^2",
        "outcome": "MSH^1^9",
    }.get(name, "")


# (database URL, clinic id) -> (the clinic, detached, with its settings loaded; when it was read)
_clinics: dict[tuple[str, int], tuple[Clinic, float]] = {}
CLINIC_TTL = 10.0  # seconds: a change of the clinic's settings applies within this delay


def _clinic(session: Session, clinic_id: int) -> Clinic:
    """The clinic, read at most every CLINIC_TTL seconds (one query less per message)."""
    key = (get_settings().database_url, clinic_id)
    cached = _clinics.get(key)
    if cached is not None and time.monotonic() - cached[1] < CLINIC_TTL:
        return cached[0]
    clinic = get_clinic(session, clinic_id)
    # Detached at once, as it is when the cache answers: a rollback of this message's
    # transaction would otherwise expire it, and every message would then fail on it until
    # CLINIC_TTL passed.
    session.expunge(clinic)
    _clinics[key] = (clinic, time.monotonic())
    return clinic


def _apply(
    msg: _Message,
    header: _Header,
    clinic_id: int,
    now: dt.datetime,
    secret: bytes,
    database: HeldConnection | None,
) -> str:
    with session_scope() if database is None else database.transaction() as session:
        clinic = _clinic(session, clinic_id)
        external_id, data, note = build_appointment(msg, header, ZoneInfo(clinic.timezone))
        # `batch` of one is `put` without reading the appointment back (one query less).
        (done,) = Intake(session, clinic, now, secret).batch([data])
        if isinstance(done, IntakeError):
            raise done
        result = done.result
    text = "stale: older than the stored version" if result == "stale" else result
    log.debug("HL7 %s: appointment %s %s", header.control_id, external_id, result)
    return f"{text}; {note}" if note else text


class HeldConnection:
    """One database connection for the messages of one MLLP connection, which come one at a
    time: a connection taken from the pool for each message is pinged first (a round trip,
    a tenth of the CPU of applying a message). A dropped one is replaced at the next message
    (apply_message applies a message that met the drop once more)."""

    def __init__(self) -> None:
        self._connection: Connection | None = None
        self._lock = threading.Lock()  # close() waits for the message being applied

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._lock:
            connection = self._connection
            if connection is None or connection.invalidated or connection.closed:
                if connection is not None:
                    connection.close()
                connection = self._connection = get_engine().connect()
            with Session(bind=connection, expire_on_commit=False) as session, session.begin():
                yield session

    def close(self) -> None:
        """Gives the connection back to the pool."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


# --- MLLP framing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    data: bytes


@dataclass(frozen=True)
class TooLarge:
    head: bytes  # the first bytes of the frame (its MSH, for the ACK)


class FrameReader:
    """Splits a byte stream into MLLP frames (0x0B ... 0x1C 0x0D) with bounded memory.

    Bytes outside frames are skipped. A frame over `max_frame` bytes gives one TooLarge event as
    soon as the limit is passed; the rest of it is discarded up to its end block, and the reader
    resynchronises on the next frame (the connection stays open). A start block inside a frame
    drops the unfinished frame and starts a new one.
    """

    HEAD = 4096

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.in_frame = False
        self.discarding = False
        self.pending_end = False
        self.buffer = bytearray()
        self.skipped = 0

    @property
    def partial(self) -> bool:
        return self.in_frame

    def feed(self, data: bytes) -> list[Frame | TooLarge]:
        events: list[Frame | TooLarge] = []
        pos, size = 0, len(data)
        while pos < size:
            if not self.in_frame:
                start = data.find(SB, pos)
                if start < 0:
                    self.skipped += size - pos
                    break
                self.skipped += start - pos
                self._start()
                pos = start + 1
                continue
            if self.pending_end:
                self.pending_end = False
                if data[pos] == CR:
                    self._end(events)
                    pos += 1
                    continue
                self._append(bytes([EB]), events)
            end = data.find(EB, pos)
            restart = data.find(SB, pos, end if end >= 0 else size)
            if restart >= 0:
                log.warning("MLLP: start block inside a frame; the unfinished frame is dropped")
                self._start()
                pos = restart + 1
                continue
            stop = end if end >= 0 else size
            self._append(data[pos:stop], events)
            if end < 0:
                break
            if end + 1 < size:
                if data[end + 1] == CR:
                    self._end(events)
                    pos = end + 2
                else:
                    self._append(bytes([EB]), events)
                    pos = end + 1
            else:
                self.pending_end = True
                pos = size
        return events

    def _start(self) -> None:
        self.in_frame, self.discarding, self.pending_end = True, False, False
        self.buffer = bytearray()

    def _append(self, chunk: bytes, events: list[Frame | TooLarge]) -> None:
        if self.discarding:
            return
        if len(self.buffer) + len(chunk) > self.max_frame:
            head = bytes((self.buffer + chunk[: self.HEAD])[: self.HEAD])
            events.append(TooLarge(head))
            self.discarding = True
            self.buffer = bytearray()
            return
        self.buffer += chunk

    def _end(self, events: list[Frame | TooLarge]) -> None:
        if not self.discarding:
            events.append(Frame(bytes(self.buffer)))
        self.in_frame, self.discarding, self.pending_end = False, False, False
        self.buffer = bytearray()


def frame(message: str) -> bytes:
    return bytes([SB]) + message.encode("utf-8") + bytes([EB, CR])


def too_large_ack(head: bytes, max_frame: int) -> str:
    segments = _segments(_decode(head).rsplit("\r", 1)[0] if b"\r" in head else "")
    header = _header(segments[:1])
    return make_ack(
        header, "AR", f"message too large (over {max_frame} bytes)", SEQUENCE_ERROR, "MSH"
    )


# --- the server -----------------------------------------------------------------------------


class _Connection:
    def __init__(self) -> None:
        self.busy = False
        self.stopping = False


async def _handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    apply: Callable[[str], str],
    max_frame: int,
    state: _Connection,
) -> None:
    peer = writer.get_extra_info("peername")
    frames = FrameReader(max_frame)
    log.info("MLLP connection from %s", peer)
    try:
        while not state.stopping:
            data = await reader.read(65536)
            if not data:
                break
            for event in frames.feed(data):
                state.busy = True
                if isinstance(event, TooLarge):
                    log.warning("MLLP %s: frame over %d bytes rejected", peer, max_frame)
                    ack = too_large_ack(event.head, max_frame)
                else:
                    ack = await asyncio.to_thread(apply, _decode(event.data))
                writer.write(frame(ack))
                await writer.drain()
                state.busy = False
        if frames.partial:
            log.warning("MLLP %s: connection closed mid-frame; nothing applied", peer)
        if frames.skipped:
            log.info("MLLP %s: %d bytes outside frames skipped", peer, frames.skipped)
    except (ConnectionError, OSError) as exc:
        log.info("MLLP %s: %s", peer, type(exc).__name__)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        log.info("MLLP connection from %s closed", peer)


def _prepare(clinic_id: int) -> bytes:
    secret = process_secret_key(get_settings())
    with session_scope() as session:
        get_clinic(session, clinic_id)  # raises ClinicError for an unknown clinic
    return secret


async def serve(clinic_id: int, host: str, port: int, *, max_frame: int = MAX_FRAME) -> None:
    """Listens for MLLP connections until cancelled; then lets each connection finish the message
    it is applying (10 s at most) and closes them."""
    secret = await asyncio.to_thread(_prepare, clinic_id)
    connections: dict[asyncio.Task[None], _Connection] = {}

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = connections[task] = _Connection()
        database = HeldConnection()

        def apply(raw: str) -> str:
            return apply_message(raw, clinic_id, dt.datetime.now(dt.UTC), secret, database)

        try:
            await _handle(reader, writer, apply, max_frame, state)
        finally:
            connections.pop(task, None)
            await asyncio.to_thread(database.close)

    server = await asyncio.start_server(on_connect, host, port, limit=65536)
    log.info("MLLP listening on %s:%d for clinic %d", host, port, clinic_id)
    try:
        async with server:
            await server.serve_forever()
    finally:
        server.close()
        busy = []
        for task, state in list(connections.items()):
            state.stopping = True
            if state.busy:
                busy.append(task)
            else:
                task.cancel()
        if busy:
            await asyncio.wait(busy, timeout=10)
        left = list(connections)
        for task in left:
            task.cancel()
        if left:  # each gives its database connection back before the loop may close
            await asyncio.wait(left, timeout=10)
        log.info("MLLP server stopped")


def run(clinic_id: int, host: str = "0.0.0.0", port: int = DEFAULT_PORT) -> None:  # noqa: S104
    """Runs `serve` until SIGTERM or SIGINT, then shuts it down cleanly."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(serve(clinic_id, host, port))
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
