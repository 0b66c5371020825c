"""`reminders import`: CSV exports streamed into the idempotent upsert (tests/data/csv/)."""

from __future__ import annotations

import csv
import datetime as dt
import functools
import gc
import json
import shutil
import tracemalloc
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from reminders import csv_import, db
from reminders.cli import app
from reminders.csv_import import CsvError, Summary, import_csv, parse_mapping
from reminders.models import Appointment, Patient, Reminder
from reminders.planning import Intake
from tests.conftest import Cast

DATA = Path(__file__).parent / "data" / "csv"
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
PARIS = ZoneInfo("Europe/Paris")
HEADER = (
    "external_id,starts_at,duration_minutes,patient_external_id,patient_name,phone,language,"
    "practitioner,location,kind,status"
)
RENAMES = (
    "RDV=external_id,Date RDV=starts_at,Durée=duration_minutes,IPP=patient_external_id,"
    "Nom du patient=patient_name,Portable=phone,Langue=language,Médecin=practitioner,"
    "Salle=location,Motif=kind,Etat=status"
)


def copy(name: str, tmp_path: Path) -> Path:
    """The data file in tmp_path, so its errors file lands there."""
    target = tmp_path / name
    shutil.copy(DATA / name, target)
    return target


def counts(summary: Summary) -> dict[str, int]:
    return {
        "created": summary.created,
        "updated": summary.updated,
        "unchanged": summary.unchanged,
        "stale": summary.stale,
        "rejected": summary.rejected,
        "rows": summary.rows,
    }


def appointments() -> dict[str, Appointment]:
    with db.session_scope() as session:
        rows = session.scalars(select(Appointment)).all()
        for row in rows:
            _ = row.patient.name
        return {row.external_id: row for row in rows}


def error_rows(path: Path) -> list[dict[str, str]]:
    """The rows of an errors file: its own columns, then the original ones as `cells.NAME`
    (by position: the original header repeats `external_id`)."""
    with path.open(encoding="utf-8", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header[:5] == ["line", "external_id", "field", "reason", "raw"]
    return [
        dict(zip(header[:5], row[:5], strict=True))
        | {f"cells.{name}": cell for name, cell in zip(header[5:], row[5:], strict=False)}
        for row in rows
    ]


def row_count() -> int:
    with db.session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Appointment)) or 0)


def test_a_clean_export_lands_every_row_and_leaves_no_errors_file(
    cast: Cast, tmp_path: Path
) -> None:
    path = copy("clean.csv", tmp_path)
    seen: list[int] = []
    summary = import_csv(path, cast.clinic_id, now=NOW, progress=seen.append)

    assert counts(summary) == dict(created=5, updated=0, unchanged=0, stale=0, rejected=0, rows=5)
    assert summary.errors_path is None
    assert not (tmp_path / "clean.errors.csv").exists()
    assert seen
    assert seen[-1] == path.stat().st_size
    stored = appointments()
    assert stored["C2"].practitioner == "Martin, Dr"
    assert stored["C2"].starts_at == dt.datetime(2026, 3, 10, 9, 0, tzinfo=dt.UTC)
    assert stored["C3"].starts_at == dt.datetime(2026, 3, 11, 8, 0, tzinfo=dt.UTC)
    assert stored["C4"].status == "cancelled"
    assert stored["C5"].status == "booked"
    assert stored["C5"].location is None
    assert stored["C5"].patient.name == 'Jean "Jo" Moreau'
    assert stored["C1"].patient.phone_e164 == "+33612345678"
    with db.session_scope() as session:
        assert (session.scalar(select(func.count()).select_from(Reminder)) or 0) > 0


def test_a_messy_french_export_keeps_its_good_rows_and_lists_the_bad_ones_by_line(
    cast: Cast, tmp_path: Path
) -> None:
    """BOM, `;`, Latin-1 and UTF-8 lines mixed, CRLF, blank lines, duplicates, a broken quote."""
    path = copy("messy_fr.csv", tmp_path)
    summary = import_csv(path, cast.clinic_id, now=NOW)

    assert counts(summary) == dict(created=5, updated=1, unchanged=1, stale=0, rejected=5, rows=12)
    assert summary.errors_path == tmp_path / "messy_fr.errors.csv"
    stored = appointments()
    assert sorted(stored) == ["A1", "A2", "A4", "A5", "A7"]
    assert stored["A1"].patient.name == "Hélène Dupré"
    assert stored["A2"].patient.name == "Léa; Françoise"
    assert stored["A2"].practitioner == 'Dr "Jo" Bernard'
    assert stored["A2"].status == "cancelled"  # the duplicate row, applied second
    assert stored["A5"].patient.name == "Chloé Roux"

    errors = error_rows(summary.errors_path)
    assert [(e["line"], e["external_id"], e["field"]) for e in errors] == [
        ("5", "", "line"),
        ("11", "A6", "starts_at"),
        ("13", "A8", "phone"),
        ("14", "A9", "duration_minutes"),
        ("15", "A10", "status"),
    ]
    assert "unterminated quoted field" in errors[0]["reason"]
    assert errors[0]["raw"].startswith('A3;2026-03-11 11:00;30;P3;"Zoé Petit')
    assert "does not exist in Europe/Paris" in errors[1]["reason"]
    assert errors[2]["cells.phone"] == "pas de numéro"  # the original cells follow
    assert errors[4]["cells.patient_name"] == "Emma Noël"
    assert all(e["reason"] for e in errors)


def test_naive_times_are_read_in_the_clinics_timezone_across_dst_edges(
    cast: Cast, tmp_path: Path
) -> None:
    path = copy("messy_fr.csv", tmp_path)
    import_csv(path, cast.clinic_id, now=NOW)
    stored = appointments()
    # Winter time (UTC+1).
    assert stored["A1"].starts_at == dt.datetime(2026, 3, 10, 8, 30, tzinfo=dt.UTC)
    # 2026-10-25 02:30 happens twice in Paris: the first (summer time, UTC+2) is taken.
    assert stored["A7"].starts_at == dt.datetime(2026, 10, 25, 0, 30, tzinfo=dt.UTC)
    # 2026-03-29 02:30 does not exist (A6 is rejected); the hour after the jump is summer time.
    assert csv_import._starts_at("2026-03-29 03:30", PARIS) == dt.datetime(
        2026, 3, 29, 1, 30, tzinfo=dt.UTC
    )
    with pytest.raises(ValueError, match="does not exist"):
        csv_import._starts_at("2026-03-29T02:00:00", PARIS)
    with pytest.raises(ValueError, match="not a date and time"):
        csv_import._starts_at("2026-03-29", PARIS)
    assert csv_import._starts_at("2026-03-29T02:30:00+01:00", PARIS).utcoffset() == dt.timedelta(
        hours=1
    )


def test_reimporting_the_same_file_gives_all_unchanged(cast: Cast, tmp_path: Path) -> None:
    path = copy("clean.csv", tmp_path)
    import_csv(path, cast.clinic_id, now=NOW)
    again = import_csv(path, cast.clinic_id, now=NOW, batch_size=2)
    assert counts(again) == dict(created=0, updated=0, unchanged=5, stale=0, rejected=0, rows=5)


def test_a_dry_run_writes_nothing_but_says_what_would_happen(cast: Cast, tmp_path: Path) -> None:
    path = copy("messy_fr.csv", tmp_path)
    summary = import_csv(path, cast.clinic_id, now=NOW, dry_run=True)
    assert counts(summary) == dict(created=5, updated=1, unchanged=1, stale=0, rejected=5, rows=12)
    assert row_count() == 0
    with db.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Patient)) == 0
    assert summary.errors_path is not None  # a dry run still lists the bad rows


def test_a_missing_required_column_is_a_usage_error_naming_it(cast: Cast, tmp_path: Path) -> None:
    path = tmp_path / "nophone.csv"
    path.write_text(HEADER.replace(",phone", "") + "\nX1,2026-03-10 09:30,20,P1,A B,fr,,,,\n")
    with pytest.raises(CsvError, match="missing required column 'phone'"):
        import_csv(path, cast.clinic_id, now=NOW)
    with pytest.raises(CsvError, match="'portable', which is not in the file"):
        import_csv(path, cast.clinic_id, now=NOW, mapping={"Portable": "phone"})
    assert not (tmp_path / "nophone.errors.csv").exists()


def test_renamed_columns_import_with_a_mapping_and_extra_columns_are_ignored(
    cast: Cast, tmp_path: Path
) -> None:
    path = copy("renamed.csv", tmp_path)
    with pytest.raises(CsvError, match="missing required column 'external_id'"):
        import_csv(path, cast.clinic_id, now=NOW)
    summary = import_csv(path, cast.clinic_id, now=NOW, mapping=parse_mapping(RENAMES))
    assert counts(summary) == dict(created=3, updated=0, unchanged=0, stale=0, rejected=0, rows=3)
    stored = appointments()
    assert stored["R2"].status == "booked"
    assert stored["R3"].status == "cancelled"
    assert stored["R1"].starts_at == dt.datetime(2026, 3, 16, 8, 0, tzinfo=dt.UTC)


def test_a_mapping_string_is_parsed_or_refused_clearly() -> None:
    assert parse_mapping("RDV=external_id, Tel = phone") == {"RDV": "external_id", "Tel": "phone"}
    with pytest.raises(ValueError, match="old=new"):
        parse_mapping("RDV")
    with pytest.raises(ValueError, match="not a column we read"):
        parse_mapping("RDV=rendezvous")
    with pytest.raises(ValueError, match="twice"):
        parse_mapping("A=phone,a=kind")
    with pytest.raises(ValueError, match="empty"):
        parse_mapping(" , ")


def test_outcomes_of_past_appointments_are_recorded_and_future_ones_refused(
    cast: Cast, tmp_path: Path
) -> None:
    path = copy("outcomes.csv", tmp_path)
    summary = import_csv(path, cast.clinic_id, now=NOW)
    assert counts(summary) == dict(created=4, updated=0, unchanged=0, stale=0, rejected=2, rows=6)
    stored = appointments()
    assert stored["O1"].outcome == "attended"
    assert stored["O2"].outcome == "no_show"
    assert stored["O3"].outcome == "cancelled_late"
    assert stored["O4"].outcome is None
    assert summary.errors_path is not None
    errors = error_rows(summary.errors_path)
    assert [(e["line"], e["field"]) for e in errors] == [("6", "outcome"), ("7", "outcome")]
    assert "once the appointment has started" in errors[0]["reason"]


def test_a_broken_quote_never_swallows_the_rows_after_it(cast: Cast, tmp_path: Path) -> None:
    rows = [HEADER]
    rows.append('B0,2026-03-10 09:00,20,P0,"Broken,06 12 34 56 78,fr,Dr,Cab,c,booked')
    for n in range(1, 16):  # more than MAX_RECORD_LINES plain lines after it
        rows.append(f"B{n},2026-03-10 09:{n:02},20,P{n},Name {n},06 12 34 56 {n:02},fr,Dr,Cab,c,")
    # A legitimate quoted field over two lines still reads as one record.
    rows.append('B99,2026-03-11 09:00,20,P99,"Anne\nMarie",06 12 34 56 99,fr,Dr,Cab,c,booked')
    rows.append('B98,2026-03-11 09:30,20,P98,"Bad"x,06 12 34 56 98,fr,Dr,Cab,c,booked')
    rows.append("B97,2026-03-11 10:00,20,P97,Short")
    path = tmp_path / "broken.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")

    summary = import_csv(path, cast.clinic_id, now=NOW, batch_size=4)

    assert counts(summary) == dict(created=16, updated=0, unchanged=0, stale=0, rejected=3, rows=19)
    stored = appointments()
    assert {f"B{n}" for n in range(1, 16)} <= set(stored)
    assert stored["B99"].patient.name == "Anne\nMarie"
    assert summary.errors_path is not None
    errors = error_rows(summary.errors_path)
    assert [(e["line"], e["field"]) for e in errors] == [
        ("2", "line"),
        ("20", "line"),
        ("21", "line"),
    ]
    assert "unterminated quoted field" in errors[0]["reason"]
    assert "malformed quoting" in errors[1]["reason"]
    assert errors[2]["reason"] == "expected 11 columns, found 5"


def test_a_database_error_loses_one_batch_and_the_import_goes_on(
    cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Intake.batch
    calls: list[int] = []

    def flaky(self: Intake, items: list[object]) -> object:
        calls.append(len(items))
        if len(calls) == 1:
            raise OperationalError("INSERT ...", {}, Exception("server closed the connection"))
        return real(self, items)  # type: ignore[arg-type]

    monkeypatch.setattr(Intake, "batch", flaky)
    path = copy("clean.csv", tmp_path)
    summary = import_csv(path, cast.clinic_id, now=NOW, batch_size=2)
    assert counts(summary) == dict(created=3, updated=0, unchanged=0, stale=0, rejected=2, rows=5)
    assert summary.errors_path is not None
    errors = error_rows(summary.errors_path)
    assert [e["external_id"] for e in errors] == ["C1", "C2"]
    assert "database error" in errors[0]["reason"]
    assert "Marie" not in errors[0]["reason"]


def test_a_database_down_stops_the_import_after_three_batches_and_applies_nothing_after(
    cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def down(self: Intake, items: list[object]) -> object:
        calls.append(len(items))
        raise OperationalError("INSERT ...", {}, Exception("connection refused"))

    monkeypatch.setattr(Intake, "batch", down)
    path = copy("clean.csv", tmp_path)
    with pytest.raises(csv_import.ImportAborted) as aborted:
        import_csv(path, cast.clinic_id, now=NOW, batch_size=1)
    assert calls == [1] * csv_import.MAX_FAILED_BATCHES
    assert aborted.value.summary.rejected == csv_import.MAX_FAILED_BATCHES
    assert aborted.value.summary.created == 0


def test_an_errors_file_left_by_an_earlier_run_is_removed_when_all_rows_are_good(
    cast: Cast, tmp_path: Path
) -> None:
    path = copy("clean.csv", tmp_path)
    stale = tmp_path / "clean.errors.csv"
    stale.write_text("line,external_id,field,reason,raw\n2,C1,phone,bad\n")
    summary = import_csv(path, cast.clinic_id, now=NOW)
    assert summary.errors_path is None
    assert not stale.exists()


def test_reading_a_large_file_keeps_memory_flat(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    note = "consultation " + "x" * 300  # long lines: 20 MB in few records keeps the test fast
    plain = f"A1,2026-03-10 09:30,20,P1,Dupré Hélène,06 12 34 56 78,fr,Dr Martin,Cab 2,{note},\n"
    quoted = plain.replace("Dupré Hélène", '"Dupré, Hélène"')
    chunk = (plain * 9 + quoted) * 100
    with path.open("w", encoding="utf-8") as f:
        f.write(HEADER + "\n")
        for _ in range(40):
            f.write(chunk)
        f.write("X" * (200 * 1024) + "\n")  # one overlong line: skipped without being held
        for _ in range(10):
            f.write(chunk)
    assert path.stat().st_size > 19_000_000

    tracemalloc.start()
    try:
        with path.open("rb") as stream:
            stream.readline()
            lines = csv_import._Lines(stream, first=2)
            total = bad = 0
            for record in csv_import._records(lines, ",", 11):
                total += 1
                bad += record.cells is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (total, bad) == (50_001, 1)
    assert peak < 1_000_000, peak


def test_a_failure_other_than_the_database_ends_the_import_with_that_error(
    cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a database error (a bug, say): raised by import_csv as it was raised, at once, with
    the batches before it applied."""
    real = Intake.batch
    calls: list[int] = []

    class Boom(Exception):
        pass

    def second_breaks(self: Intake, items: list[object]) -> object:
        calls.append(len(items))
        if len(calls) == 2:
            raise Boom("boom")
        return real(self, items)  # type: ignore[arg-type]

    monkeypatch.setattr(Intake, "batch", second_breaks)
    path = copy("clean.csv", tmp_path)
    with pytest.raises(Boom, match="boom"):
        import_csv(path, cast.clinic_id, now=NOW, batch_size=2)
    assert calls == [2, 2]  # the third batch never started
    assert sorted(appointments()) == ["C1", "C2"]


def test_a_database_down_mid_import_stops_it_as_before(
    cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A good batch, then the database fails: the import stops at the third failed batch (the
    rows after it are not read), the errors file lists the rows not applied, nothing is applied
    after, and the command exits 1 saying why."""
    real = Intake.batch
    calls: list[int] = []

    def down_after_one(self: Intake, items: list[object]) -> object:
        calls.append(len(items))
        if len(calls) > 1:
            raise OperationalError("INSERT ...", {}, Exception("connection refused"))
        return real(self, items)  # type: ignore[arg-type]

    monkeypatch.setattr(Intake, "batch", down_after_one)
    path = copy("clean.csv", tmp_path)
    with pytest.raises(csv_import.ImportAborted) as aborted:
        import_csv(path, cast.clinic_id, now=NOW, batch_size=1)
    assert calls == [1] * 4
    assert counts(aborted.value.summary) == dict(
        created=1, updated=0, unchanged=0, stale=0, rejected=3, rows=4
    )
    errors = error_rows(tmp_path / "clean.errors.csv")
    assert [e["line"] for e in errors] == ["3", "4", "5"]
    assert sorted(appointments()) == ["C1"]

    calls[:] = [1]  # the database stays down
    monkeypatch.setattr(csv_import, "import_csv", functools.partial(import_csv, batch_size=1))
    db.reset()  # the command reads the settings once, as a fresh process would
    result = CliRunner().invoke(
        app, ["import", str(path), "--clinic", str(cast.clinic_id), "--json"]
    )
    assert result.exit_code == 1, result.stderr
    assert "import stopped: the database failed 3 batches in a row" in result.stderr
    assert json.loads(result.stdout)["rows"] == 3


def test_a_reading_failure_keeps_the_batches_applied_before_it(
    cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reading fails (not a bad row: the machine): the batches before it stay applied and
    their rejections written; the error is raised as it was."""
    path = tmp_path / "bad_third.csv"
    path.write_text(
        HEADER + "\n"
        "D1,2026-03-10 09:00,20,P1,Ann,06 12 34 56 01,fr,,,,\n"
        "D2,2026-03-10 09:30,20,P2,Bob,pas de numéro,fr,,,,\n"
        "D3,2026-03-10 10:00,20,P3,Cid,06 12 34 56 03,fr,,,,\n",
        encoding="utf-8",
    )
    real = csv_import._starts_at

    def breaks_on_the_third(value: str, zone: ZoneInfo) -> dt.datetime:
        if value == "2026-03-10 10:00":
            raise MemoryError
        return real(value, zone)

    monkeypatch.setattr(csv_import, "_starts_at", breaks_on_the_third)
    with pytest.raises(MemoryError):
        import_csv(path, cast.clinic_id, now=NOW, batch_size=2)
    assert sorted(appointments()) == ["D1"]
    assert [e["external_id"] for e in error_rows(tmp_path / "bad_third.errors.csv")] == ["D2"]


def test_full_garbage_collections_are_rare_during_an_import_and_as_before_after(
    cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = gc.get_threshold()
    real = Intake.batch
    during: list[tuple[int, int, int]] = []

    def watched(self: Intake, items: list[object]) -> object:
        during.append(gc.get_threshold())
        if len(during) == 2:
            raise RuntimeError("stop")
        return real(self, items)  # type: ignore[arg-type]

    monkeypatch.setattr(Intake, "batch", watched)
    path = copy("clean.csv", tmp_path)
    import_csv(path, cast.clinic_id, now=NOW)
    assert during == [(before[0], before[1], max(before[2], csv_import._FULL_COLLECTION_AFTER))]
    assert gc.get_threshold() == before
    with pytest.raises(RuntimeError, match="stop"):
        import_csv(path, cast.clinic_id, now=NOW)
    assert gc.get_threshold() == before
