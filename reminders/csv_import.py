"""`reminders import`: appointments from a CSV export, streamed, validated and applied in batches.

Reading (never the whole file in memory; a 1 GB export runs in flat memory):

- The file is read in binary, one physical line at a time (a line longer than
  `MAX_RECORD_BYTES` is rejected and skipped up to its end, without being held in memory).
- Each line is decoded on its own: UTF-8, else cp1252 (the Windows superset of Latin-1 that French
  exports use), else Latin-1 (which decodes any byte). A file may mix them: an export with one
  "é" written as 0xE9 still imports right. A UTF-8 BOM at the start is dropped.
- The separator is sniffed from the header line: the most frequent of `;`, `,` and tab outside
  quotes (`,` when none).
- Blank lines are skipped. Quoted fields follow RFC 4180 (`""` escapes, quoted separators).

Broken quotes. A record continues over the following physical lines only while a quoted field is
open, and only for `MAX_RECORD_LINES` lines and `MAX_RECORD_BYTES` bytes in all. A continued record
is accepted only when it parses cleanly (strict RFC 4180) and has the header's number of columns.
Otherwise the record is rejected as "unterminated quoted field" with the line number of its
opening line, and reading resumes at the line right after the opening line: the lines looked at
are read again as records of their own. So a stray quote costs one row, never the rows after it.
A quote inside an unquoted field (`5" screen`) is a plain character; a closing quote followed by
something other than a separator (`"abc"def`) rejects that line.

Rows. Columns are matched by name (trimmed, case-insensitive), after `mapping` renames the file's
columns to ours; unknown columns are ignored; every column of the contract's header except
`outcome` is required (a missing one raises CsvError). A row with fewer cells than the header, or
with more non-empty ones, is rejected. Empty cells are None; `status` defaults to `booked`;
`status` and `outcome` are lower-cased. `starts_at` is ISO 8601 (`2026-11-24T09:30:00+01:00`,
`...Z`) or `YYYY-MM-DD HH:MM[:SS]`; without an offset it is read in the clinic's time zone: a
time in the spring-forward gap does not exist and is rejected; an ambiguous time of the autumn
fall-back hour is read as its first occurrence (summer time, `fold=0`).

Applying. Valid rows go through `Intake.batch`, `batch_size` at a time, one transaction per batch
(so a bad row never blocks the others, and rows of the same external_id apply in file order: the
second is `unchanged` or `updated`). A batch the database refuses is reported (its rows rejected
with the SQLSTATE, nothing identifying) and the import goes on; after `MAX_FAILED_BATCHES` failures
in a row (the database is down), it stops with ImportAborted, which carries the summary so far.
`dry_run` runs everything, Intake included, and rolls each batch back: the summary says what would
happen, except that a row repeating an external_id first seen in an EARLIER batch (more than
`batch_size` rows before) is counted as if that earlier row had not been applied.

Batches are applied in the reading thread, one after the other. A writer thread applying one
batch while the next is read was tried and measured (2 cores, 100k and 1M rows): no faster, and
8-14% more CPU. Only the reading (csv and pydantic, a quarter of the CPU) could run beside the
database; the upsert (three quarters) needs the GIL between its own round trips, and two busy
threads handing the GIL over cost more than the overlap gained.

Errors file (default `FILE.errors.csv` beside the input): UTF-8, comma-separated, with the columns
`line,external_id,field,reason,raw` and then the file's own header, one row per rejected record,
streamed batch by batch in line order (dry runs write it too). `raw` holds the text of a record
whose cells could not be read (a broken quote); otherwise the original cells follow, so the file
can be fixed and imported again as it is (our own columns are unknown ones, ignored; its first
`external_id` is the row's). It is created on the first error only; a run without errors removes
an errors file left at that path by an earlier import (only a file that starts with our header).
It holds what the clinic sent, names and phone numbers included (to fix and re-import); nothing
identifying goes to logs.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from reminders.clinics import get_clinic
from reminders.config import get_settings
from reminders.db import session_scope
from reminders.planning import Intake, IntakeError, Upserted
from reminders.schemas import BatchItem
from reminders.security import process_secret_key

log = logging.getLogger(__name__)

COLUMNS = (
    "external_id",
    "starts_at",
    "duration_minutes",
    "patient_external_id",
    "patient_name",
    "phone",
    "language",
    "practitioner",
    "location",
    "kind",
    "status",
)
OPTIONAL_COLUMNS = ("outcome",)
ERROR_COLUMNS = ("line", "external_id", "field", "reason", "raw")

MAX_RECORD_LINES = 10  # physical lines one record may span (inside a quoted field)
MAX_RECORD_BYTES = 64 * 1024  # bytes one record may span
MAX_FAILED_BATCHES = 3  # database failures in a row before the import stops

_BOM = b"\xef\xbb\xbf"
_SEPARATORS = (";", ",", "\t")
# Where pydantic's error locations land in the file's columns.
_FIELD_COLUMNS = {
    "patient.external_id": "patient_external_id",
    "patient.name": "patient_name",
    "patient.phone": "phone",
    "patient.language": "language",
    "patient": "patient_external_id",
}


class CsvError(ValueError):
    """The file cannot be imported at all (a usage error: the CLI exits 2)."""


class ImportAborted(RuntimeError):
    """The database failed too many batches in a row; `summary` says what was done."""

    def __init__(self, reason: str, summary: Summary) -> None:
        super().__init__(reason)
        self.summary = summary


@dataclass
class Summary:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    stale: int = 0
    rejected: int = 0
    rows: int = 0
    errors_path: Path | None = None


def parse_mapping(text: str) -> dict[str, str]:
    """`"old=new,old2=new2"` (the file's column = ours) as a dict; ValueError when malformed."""
    mapping: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        old, sep, new = part.partition("=")
        old, new = old.strip(), new.strip()
        if not sep or not old or not new:
            raise ValueError(f"--map expects old=new pairs separated by commas, got {part!r}")
        if new.lower() not in COLUMNS + OPTIONAL_COLUMNS:
            raise ValueError(
                f"--map: {new!r} is not a column we read (one of {', '.join(COLUMNS)}, outcome)"
            )
        if old.lower() in {k.lower() for k in mapping}:
            raise ValueError(f"--map names the column {old!r} twice")
        mapping[old] = new
    if not mapping:
        raise ValueError("--map is empty; expected old=new pairs, e.g. RDV=external_id")
    return mapping


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D are undefined in cp1252
        return raw.decode("latin-1")


def _strip_eol(text: str) -> str:
    return text.rstrip("\r\n")


def _sniff(header: str) -> str:
    """The separator: the most frequent candidate outside quotes (`,` when none)."""
    counts = dict.fromkeys(_SEPARATORS, 0)
    quoted = False
    for char in header:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in counts:
            counts[char] += 1
    best = max(_SEPARATORS, key=lambda s: counts[s])
    return best if counts[best] else ","


class _Unterminated(Exception):
    pass


class _Malformed(Exception):
    pass


def _parse(lines: Sequence[str], sep: str) -> list[str]:
    """The cells of one record made of these physical lines (without their line ends)."""
    reader = csv.reader((line + "\n" for line in lines), delimiter=sep, strict=True)
    try:
        cells = next(reader)
        extra = next(reader, None)
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise _Unterminated from None
        raise _Malformed(str(exc)) from None
    if extra is not None:  # the quote closed before the last line: not one record
        raise _Malformed("a quoted field spans lines but the record ends early")
    return cells


@dataclass
class _Record:
    line: int
    cells: list[str] | None  # None: unreadable
    raw: str = ""
    reason: str = ""


class _Lines:
    """Physical lines (number, bytes without the line end), with a bounded push-back."""

    def __init__(self, stream: IO[bytes], first: int) -> None:
        self.stream = stream
        self.number = first - 1
        self.bytes_read = 0
        self._back: list[tuple[int, str]] = []

    def next(self) -> tuple[int, str | None] | None:
        """(number, text) or (number, None) for an overlong line; None at the end."""
        if self._back:
            return self._back.pop()
        raw = self.stream.readline(MAX_RECORD_BYTES + 1)
        if not raw:
            return None
        self.number += 1
        self.bytes_read += len(raw)
        if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip to the end of the line
                raw = self.stream.readline(MAX_RECORD_BYTES)
                self.bytes_read += len(raw)
            return self.number, None
        return self.number, _strip_eol(_decode(raw))

    def push_back(self, lines: list[tuple[int, str]]) -> None:
        self._back.extend(reversed(lines))


def _records(lines: _Lines, sep: str, width: int) -> Iterator[_Record]:
    """The records of the file after its header (see the module's doc for the rules)."""
    while (item := lines.next()) is not None:
        number, text = item
        if text is None:
            yield _Record(number, None, "", f"line longer than {MAX_RECORD_BYTES} bytes")
            continue
        if not text.strip():
            continue
        if '"' not in text:
            yield _Record(number, text.split(sep))
            continue
        try:
            yield _Record(number, _parse([text], sep))
            continue
        except _Malformed as exc:
            yield _Record(number, None, text, f"malformed quoting: {exc}")
            continue
        except _Unterminated:
            pass
        taken: list[tuple[int, str]] = []
        size = len(text)
        cells: list[str] | None = None
        while len(taken) + 1 < MAX_RECORD_LINES and size <= MAX_RECORD_BYTES:
            more = lines.next()
            if more is None:
                break
            if more[1] is None:  # an overlong line cannot be part of a record
                yield _Record(more[0], None, "", f"line longer than {MAX_RECORD_BYTES} bytes")
                break
            taken.append((more[0], more[1]))
            size += len(more[1]) + 1
            try:
                cells = _parse([text] + [t for _, t in taken], sep)
            except _Unterminated:
                continue
            except _Malformed:
                cells = None
            break
        if cells is not None and _width_ok(cells, width):
            yield _Record(number, cells)
            continue
        lines.push_back(taken)
        yield _Record(number, None, text, "unterminated quoted field (a quote opened here)")


def _width_ok(cells: list[str], width: int) -> bool:
    return len(cells) >= width and not any(c.strip() for c in cells[width:])


@lru_cache(maxsize=4096)  # an export books the same slots many times
def _starts_at(value: str, zone: ZoneInfo) -> dt.datetime:
    """An aware start: ISO 8601 or `YYYY-MM-DD HH:MM[:SS]`, naive ones in the clinic's zone."""
    text = value.strip()
    if len(text) < 16 or text[10] not in "T t":
        raise ValueError(f"{text!r} is not a date and time (YYYY-MM-DD HH:MM or ISO 8601)")
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a date and time (YYYY-MM-DD HH:MM or ISO 8601)"
        ) from None
    if parsed.tzinfo is not None:
        return parsed
    local = parsed.replace(tzinfo=zone)  # fold=0: the first of an ambiguous hour's two times
    back = local.astimezone(dt.UTC).astimezone(zone).replace(tzinfo=None)
    if back != parsed:
        raise ValueError(
            f"{text} does not exist in {zone.key} (the clocks jump forward then); "
            "give the time with its UTC offset"
        )
    return local


def _cell(cells: list[str], index: int | None) -> str | None:
    if index is None or index >= len(cells):
        return None
    value = cells[index].strip()
    return value or None


class _ErrorsFile:
    """The errors CSV, opened on the first error."""

    def __init__(self, path: Path, header: list[str]) -> None:
        self.path = path
        self.header = header
        self._file: IO[str] | None = None
        self._writer: Any = None

    def write(self, row: _Rejected) -> None:
        if self._writer is None:
            self._file = self.path.open("w", encoding="utf-8", newline="")
            self._writer = csv.writer(self._file)
            self._writer.writerow([*ERROR_COLUMNS, *self.header])
        self._writer.writerow(
            [row.line, row.external_id or "", row.field, row.reason, row.raw, *(row.cells or [])]
        )

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> bool:
        """Closes it; True when it was written."""
        if self._file is None:
            return False
        self._file.close()
        return True

    def remove_stale(self) -> None:
        """Removes an errors file an earlier import left at this path (ours only)."""
        try:
            with self.path.open("rb") as old:
                start = old.read(64)
        except OSError:
            return
        if start.startswith(",".join(ERROR_COLUMNS).encode()):
            self.path.unlink(missing_ok=True)


@dataclass
class _Rejected:
    line: int
    external_id: str | None
    field: str
    reason: str
    raw: str = ""
    cells: list[str] | None = None


@dataclass
class _Pending:
    line: int
    cells: list[str]
    item: BatchItem


@dataclass
class _Importer:
    """Applies valid rows a batch at a time; writes the rejected ones in line order."""

    clinic_id: int
    now: dt.datetime
    dry_run: bool
    errors: _ErrorsFile
    batch_size: int
    summary: Summary = field(default_factory=Summary)
    failed_in_a_row: int = 0
    pending: list[_Pending] = field(default_factory=list)
    # Rejections that follow a pending row: written once its batch is applied.
    held: list[_Rejected] = field(default_factory=list)

    def add(self, row: _Pending) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.batch_size:
            self.apply()

    def reject(self, row: _Rejected) -> None:
        self.summary.rejected += 1
        if not self.pending:
            self.errors.write(row)
            return
        self.held.append(row)
        if len(self.held) >= self.batch_size:
            self.apply()

    def apply(self) -> None:
        """Applies the pending rows, then writes this stretch's rejections in line order."""
        pending, self.pending = self.pending, []
        rejected, self.held = self.held, []
        try:
            self._apply(pending, rejected)
        finally:
            rejected.sort(key=lambda r: r.line)
            for row in rejected:
                self.errors.write(row)
            self.errors.flush()

    def _apply(self, pending: list[_Pending], rejected: list[_Rejected]) -> None:
        if not pending:
            return
        try:
            results = self._run([p.item for p in pending])
        except SQLAlchemyError as exc:
            self.failed_in_a_row += 1
            code = getattr(getattr(exc, "orig", None), "sqlstate", None) or type(exc).__name__
            reason = (
                f"database error ({code}): the batch of lines "
                f"{pending[0].line}-{pending[-1].line} was not applied"
            )
            log.warning("csv import: %s", reason)  # no row content: it may identify patients
            self.summary.rejected += len(pending)
            rejected.extend(
                _Rejected(p.line, p.item.external_id, "", reason, cells=p.cells) for p in pending
            )
            if self.failed_in_a_row >= MAX_FAILED_BATCHES:
                raise ImportAborted(
                    f"the database failed {self.failed_in_a_row} batches in a row ({code})",
                    self.summary,
                ) from exc
            return
        self.failed_in_a_row = 0
        for p, result in zip(pending, results, strict=True):
            if isinstance(result, IntakeError):
                column = _FIELD_COLUMNS.get(result.field, result.field)
                reason = result.reason
            elif result.result in ("created", "updated", "unchanged", "stale"):
                key = result.result
                setattr(self.summary, key, getattr(self.summary, key) + 1)
                continue
            else:  # not expected from an upsert: counted, never lost
                column, reason = "", f"unexpected result {result.result}"
            self.summary.rejected += 1
            rejected.append(_Rejected(p.line, p.item.external_id, column, reason, cells=p.cells))

    def _run(self, items: list[BatchItem]) -> list[Upserted | IntakeError]:
        secret = process_secret_key(get_settings())
        results: list[Upserted | IntakeError] = []
        try:
            with session_scope() as session:
                clinic = get_clinic(session, self.clinic_id)
                results = Intake(session, clinic, self.now, secret).batch(items)
                if self.dry_run:
                    raise _RollBack
        except _RollBack:
            pass
        return results


class _RollBack(Exception):
    """Leaves a dry run's transaction by rolling it back."""


def import_csv(
    path: Path,
    clinic_id: int,
    *,
    mapping: dict[str, str] | None = None,
    errors_path: Path | None = None,
    dry_run: bool = False,
    now: dt.datetime,
    progress: Callable[[int], None] | None = None,
    batch_size: int = 1000,
) -> Summary:
    """Imports a CSV export of appointments for one clinic; see the module's doc.

    `progress` is called with the number of bytes read so far (every 256 KiB or so, and at the
    end, with the file's size). Raises CsvError when the file cannot be imported at all
    (unreadable, no header, a required column missing), ImportAborted when the database keeps
    failing (the errors file is complete up to there).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if errors_path is None:  # the contract's FILE.errors.csv for FILE.csv
        stem = path.stem if path.suffix.lower() == ".csv" else path.name
        errors_path = path.with_name(stem + ".errors.csv")
    if errors_path.resolve() == path.resolve():
        raise CsvError("the errors file must not be the input file")
    with session_scope() as session:
        zone = ZoneInfo(get_clinic(session, clinic_id).timezone)
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise CsvError(f"cannot read {path}: {exc.strerror}") from None
    with stream:
        first = stream.readline(MAX_RECORD_BYTES + 1)
        lines = _Lines(stream, first=2)
        lines.bytes_read = len(first)
        if first.startswith(_BOM):
            first = first[len(_BOM) :]
        header_text = _strip_eol(_decode(first))
        if not header_text.strip():
            raise CsvError(f"{path} has no header line (expected {','.join(COLUMNS)})")
        sep = _sniff(header_text)
        try:
            header = _parse([header_text], sep)
        except (_Unterminated, _Malformed):
            raise CsvError("the header line has a broken quote") from None
        index = _columns(header, mapping)
        errors = _ErrorsFile(errors_path, header)
        importer = _Importer(clinic_id, now, dry_run, errors, batch_size)
        try:
            with _few_full_collections():
                _import_records(importer, lines, sep, index, zone, progress)
        finally:
            if errors.close():
                importer.summary.errors_path = errors_path
    if importer.summary.errors_path is None:
        errors.remove_stale()
    if progress is not None:
        progress(lines.bytes_read)
    return importer.summary


# Young collections (generations 0 and 1) as usual, during an import; a full one only after this
# many collections of generation 1 (CPython's default is 10). A full collection walks every object
# the process keeps, and an import keeps many: SQLAlchemy's and pydantic's, phonenumbers' metadata,
# parse_phone's 65,536 remembered numbers. Seen at 100k rows: 18 full collections took 2.4 s of the
# import's 10.5 s of CPU. What a batch leaves behind dies young; memory stays flat (see the README).
_FULL_COLLECTION_AFTER = 1000


@contextlib.contextmanager
def _few_full_collections() -> Iterator[None]:
    """Makes full garbage collections rare while the import runs, then puts the thresholds back."""
    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, max(full, _FULL_COLLECTION_AFTER))
    try:
        yield
    finally:
        gc.set_threshold(young, middle, full)


def _columns(header: list[str], mapping: dict[str, str] | None) -> dict[str, int]:
    """Our column name -> its index in the file; CsvError when a required one is missing."""
    names = [h.strip().lower() for h in header]
    renames = {old.strip().lower(): new.strip().lower() for old, new in (mapping or {}).items()}
    for old in renames:
        if old not in names:
            raise CsvError(f"--map names the column {old!r}, which is not in the file's header")
    index: dict[str, int] = {}
    for position, name in enumerate(names):
        ours = renames.get(name, name)
        if ours in COLUMNS + OPTIONAL_COLUMNS and ours not in index:
            index[ours] = position
    missing = [c for c in COLUMNS if c not in index]
    if missing:
        raise CsvError(
            f"missing required column {missing[0]!r}"
            + (f" (and {', '.join(missing[1:])})" if missing[1:] else "")
            + "; use --map old=new to rename the file's columns"
        )
    return index


_TICK_BYTES = 256 * 1024


def _import_records(
    importer: _Importer,
    lines: _Lines,
    sep: str,
    index: dict[str, int],
    zone: ZoneInfo,
    progress: Callable[[int], None] | None,
) -> None:
    width = len(importer.errors.header)
    ticked = 0
    ext, outcome = index["external_id"], index.get("outcome")
    start, duration, status_at = index["starts_at"], index["duration_minutes"], index["status"]
    patient, name, phone = index["patient_external_id"], index["patient_name"], index["phone"]
    language, practitioner = index["language"], index["practitioner"]
    location, kind = index["location"], index["kind"]
    for record in _records(lines, sep, width):
        importer.summary.rows += 1
        if progress is not None and lines.bytes_read - ticked >= _TICK_BYTES:
            ticked = lines.bytes_read
            progress(ticked)
        cells = record.cells
        if cells is None:
            importer.reject(_Rejected(record.line, None, "line", record.reason, raw=record.raw))
            continue
        external_id = _cell(cells, ext)
        if not _width_ok(cells, width):
            reason = f"expected {width} columns, found {len(cells)}"
            importer.reject(_Rejected(record.line, external_id, "line", reason, cells=cells))
            continue
        # Every index is below `width`: the cells, trimmed, empty ones None.
        values = [cell.strip() or None for cell in cells[:width]]
        start_cell = values[start]
        try:
            starts_at = None if start_cell is None else _starts_at(start_cell, zone)
        except ValueError as exc:
            importer.reject(_Rejected(record.line, external_id, "starts_at", str(exc), cells=cells))
            continue
        status = values[status_at]
        outcome_value = None if outcome is None else values[outcome]
        data = {
            "external_id": external_id,
            "starts_at": starts_at,
            "duration_minutes": values[duration],
            "patient": {
                "external_id": values[patient],
                "name": values[name],
                "phone": values[phone],
                "language": values[language],
            },
            "practitioner": values[practitioner],
            "location": values[location],
            "kind": values[kind],
            "status": status.lower() if status else "booked",
            "outcome": outcome_value.lower() if outcome_value else None,
        }
        try:
            item = BatchItem.model_validate(data)
        except ValidationError as exc:
            column, reason = _explain(exc)
            importer.reject(_Rejected(record.line, external_id, column, reason, cells=cells))
            continue
        importer.add(_Pending(record.line, cells, item))
    importer.apply()


def _explain(exc: ValidationError) -> tuple[str, str]:
    """The first bad column and the reasons, in the file's column names."""
    parts: list[tuple[str, str]] = []
    for error in exc.errors():
        dotted = ".".join(str(p) for p in error["loc"])
        column = _FIELD_COLUMNS.get(dotted, dotted)
        message = str(error["msg"])
        if error["type"] == "missing" or error.get("input", "") is None:
            message = "is required"  # an empty cell (optional fields take None)
        parts.append((column, message))
    if len(parts) == 1:
        return parts[0]
    return parts[0][0], "; ".join(f"{column}: {message}" for column, message in parts)
