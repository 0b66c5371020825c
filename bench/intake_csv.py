"""CSV import benchmark: a generated export of N appointments through `import_csv`, once.

    .venv/bin/python bench/intake_csv.py [--rows 1000000] [--json]

It writes a realistic CSV (to a temporary directory: French clinic, `;`-free comma export, naive
local times over the next 60 days, one patient per two appointments, French mobile numbers, names
with accents, a quoted practitioner now and then, 5% cancelled), re-creates the PostgreSQL
database `reminders_bench_csv` (dropped first), migrates it, creates a clinic in Europe/Paris and
imports the file into it in this process, in batches of 1000 (one transaction each), reminders
planned for every booked appointment as in production.

Printed: rows/s of the import (generation not counted), the CPU seconds of this process and of
the PostgreSQL backends during the import with the machine's load average (other work on the
machine slows both, so wall-clock rows/s alone can mislead), the summary counts, the process's
peak RSS (VmHWM) and its RSS when 10%, 50% and 100% of the file was read (flat memory: the last
two stay close to the first). Target: >= 5,000 rows/s with memory flat. Exit code 0 when every
row was created and the target is met, 1 otherwise, 2 when the set-up failed.

Environment: `REMINDERS_BENCH_DATABASE_URL` (default
`postgresql+psycopg://postgres@127.0.0.1:5432/`; the database name in it, when there is one,
replaces `reminders_bench_csv`), re-created through the server's `postgres` maintenance database.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import make_url

from reminders import db
from reminders.clinics import ClinicOptions, create_clinic
from reminders.csv_import import COLUMNS, import_csv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import postgres_cpu_seconds, recreate_database

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/"
DATABASE = "reminders_bench_csv"
TARGET = 5000.0
FIRST = ["Marie", "Hélène", "Zoé", "Jean", "Léa", "François", "Chloé", "Noël", "Anaïs", "Luc"]
LAST = ["Dupré", "Martin", "Bernard", "Lefèvre", "Moreau", "Girard", "Roux", "Fabre", "Noël"]
KINDS = ["consultation", "suivi", "bilan", "vaccination", "téléconsultation"]


def database_url() -> str:
    url = make_url(os.environ.get("REMINDERS_BENCH_DATABASE_URL", DEFAULT_URL))
    if not url.database:
        url = url.set(database=DATABASE)
    if url.drivername in ("postgresql", "postgresql+psycopg2"):
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def generate(path: Path, rows: int, today: dt.date, seed: int = 7) -> None:
    """A realistic export, written row by row."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for n in range(rows):
            patient = rng.randrange(max(1, rows // 2))
            day = today + dt.timedelta(days=1 + rng.randrange(60))
            minutes = 8 * 60 + 15 * rng.randrange(40)
            practitioner = rng.choice(["Dr Martin", "Dr Bernard", "Martin, Dr", 'Dr "Jo" Roux'])
            writer.writerow(
                [
                    f"A{n:07d}",
                    f"{day.isoformat()} {minutes // 60:02d}:{minutes % 60:02d}",
                    rng.choice((15, 20, 30, 45)),
                    f"P{patient:07d}",
                    f"{FIRST[patient % len(FIRST)]} {LAST[patient % len(LAST)]}",
                    f"06 {patient // 1000000 % 100:02d} {patient // 10000 % 100:02d} "
                    f"{patient // 100 % 100:02d} {patient % 100:02d}",
                    "fr" if patient % 10 else "en",
                    practitioner,
                    f"Cabinet {rng.randrange(1, 6)}",
                    rng.choice(KINDS),
                    "cancelled" if rng.random() < 0.05 else "booked",
                ]
            )


def _status_mib(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(rows: int) -> dict[str, float]:
    """Generates, imports and measures; returns the figures (see the module's doc)."""
    url = database_url()
    recreate_database(url)
    engine = db.make_engine(url)
    db.migrate(engine)
    engine.dispose()
    os.environ["REMINDERS_DATABASE_URL"] = url
    os.environ.setdefault("REMINDERS_SECRET_KEY", "bench-secret-key-0123456789abcdef")
    db.reset()
    with db.session_scope() as session:
        clinic, _ = create_clinic(
            session,
            ClinicOptions(
                name="Clinique Bench",
                timezone="Europe/Paris",
                country="FR",
                language="fr",
                sender="+33939000000",
            ),
        )
        clinic_id = clinic.id
    now = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="bench-csv-") as tmp:
        path = Path(tmp) / "export.csv"
        started = time.perf_counter()
        generate(path, rows, now.date())
        generated = time.perf_counter() - started
        size = path.stat().st_size
        rss_at: dict[int, float] = {}

        def progress(done: int) -> None:
            for mark in (10, 50, 100):
                if mark not in rss_at and done * 100 >= size * mark:
                    rss_at[mark] = _status_mib("VmRSS")

        rss_before = _status_mib("VmRSS")
        database = make_url(url).database or DATABASE
        pg_before, cpu_before = postgres_cpu_seconds(database), time.process_time()
        started = time.perf_counter()
        summary = import_csv(path, clinic_id, now=now, progress=progress)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
        pg_cpu = postgres_cpu_seconds(database) - pg_before
        load = os.getloadavg()[0]
    db.reset()
    return {
        "rows": float(rows),
        "file_mib": size / 2**20,
        "generate_seconds": generated,
        "import_seconds": seconds,
        "rows_per_s": rows / seconds,
        "import_cpu_seconds": cpu,
        "postgres_cpu_seconds": pg_cpu,
        "load_average_1m": load,
        "created": float(summary.created),
        "updated": float(summary.updated),
        "unchanged": float(summary.unchanged),
        "stale": float(summary.stale),
        "rejected": float(summary.rejected),
        "rss_before_mib": rss_before,
        "rss_10pct_mib": rss_at.get(10, float("nan")),
        "rss_50pct_mib": rss_at.get(50, float("nan")),
        "rss_100pct_mib": rss_at.get(100, float("nan")),
        "peak_rss_mib": _status_mib("VmHWM"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    try:
        figures = run(args.rows)
    except Exception as exc:  # set-up or import failure: say what, exit 2
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    ok = figures["created"] == args.rows and figures["rows_per_s"] >= TARGET
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(
            f"{int(figures['rows']):,} rows ({figures['file_mib']:.0f} MiB) imported in "
            f"{figures['import_seconds']:.1f} s: {figures['rows_per_s']:,.0f} rows/s "
            f"(target >= {TARGET:,.0f})"
        )
        print(
            "CPU s: importer {import_cpu_seconds:.1f}, PostgreSQL backends "
            "{postgres_cpu_seconds:.1f} (machine load average {load_average_1m:.1f} on "
            "{cores} cores)".format(cores=os.cpu_count(), **figures)
        )
        print(
            "created {created:.0f}, updated {updated:.0f}, unchanged {unchanged:.0f}, "
            "stale {stale:.0f}, rejected {rejected:.0f}".format(**figures)
        )
        print(
            "RSS MiB: before {rss_before_mib:.0f}, at 10% {rss_10pct_mib:.0f}, "
            "50% {rss_50pct_mib:.0f}, 100% {rss_100pct_mib:.0f}; peak (VmHWM) "
            "{peak_rss_mib:.0f}".format(**figures)
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
