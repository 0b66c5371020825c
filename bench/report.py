"""Weekly report benchmark: one clinic-week over 2,000,000 appointments in PostgreSQL.

    .venv/bin/python bench/report.py [--appointments 2000000] [--clinics 10] [--runs 5] [--keep]
                                     [--reuse] [--json]

It creates a fresh PostgreSQL database (`reminders_bench_report`, dropped first), migrates it,
adds `--clinics` clinics through `clinics.create_clinic` (go-live a year before `now`, 10%
holdout, four time zones), and fills it with SQL (`INSERT ... SELECT generate_series`, seeded):
patients with five appointments each on average, appointments spread evenly over two years up to
a month after `now` (so each clinic has ~100,000 since go-live at the default size), their
outcomes (no-show 15%, 9% when reminded), confirmations, patient cancellations, lead times,
kinds, and one sent reminder per reminded appointment. Then VACUUM ANALYZE.

It times `report.build` (every query of the report, the JSON and the summary) for the last
complete week of the first clinic `--runs` times in fresh transactions, with the client's CPU
time and the PostgreSQL backend's CPU time (from /proc) apart, the time per SQL statement, and the
process's peak RSS before and after (memory must stay flat: no row per appointment reaches
Python). It also times the HTML rendering. Target: < 2 s per report.

Environment: `REMINDERS_BENCH_DATABASE_URL` (default
`postgresql+psycopg://postgres@127.0.0.1:5432/`): server and credentials; the database name is
`--database`. Exit code 0 when the target is met, 1 when missed, 2 when setup failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from zoneinfo import ZoneInfo

from common import (
    CLK_TCK,
    SetupError,
    drop_database,
    peak_rss_mib,
    recreate_database,
    stat_fields,
)
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from reminders import db, report
from reminders.clinics import ClinicOptions, create_clinic
from reminders.models import Clinic
from reminders.report import render as report_render

NOW = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.UTC)
TARGET_SECONDS = 2.0
ZONES = ("Europe/Paris", "Europe/London", "America/New_York", "Asia/Shanghai")

FILL = """
SELECT setseed(0.42);
INSERT INTO patients (id, clinic_id, external_id, phone_e164, sms_capable, language,
                      language_fallback)
SELECT g, (:clinics)[1 + g % cardinality(:clinics)], 'P' || g,
       '+336' || lpad((g % 100000000)::text, 8, '0'), true, 'fr', false
FROM generate_series(1, :patients) AS g;

INSERT INTO appointments (id, clinic_id, external_id, patient_id, starts_at, duration_minutes,
                          kind, status, confirmation, outcome, booked_at, decided_at, holdout)
SELECT g, (:clinics)[1 + p % cardinality(:clinics)], 'A' || g, p, starts_at, 20,
       (ARRAY['consultation', 'follow-up', 'vaccination', 'imaging'])[1 + g % 4],
       CASE WHEN r_cancel < 0.04 THEN 'cancelled' ELSE 'booked' END,
       CASE WHEN r_cancel < 0.04 AND arm = false THEN 'cancelled_by_patient'
            WHEN r_cancel >= 0.04 AND arm = false AND r_reply < 0.55 THEN 'confirmed'
            ELSE 'unconfirmed' END,
       CASE WHEN starts_at > :now OR r_cancel < 0.04 THEN NULL
            WHEN r_show < CASE WHEN arm = false THEN 0.09 ELSE 0.15 END THEN 'no_show'
            WHEN r_show > 0.97 THEN 'cancelled_late'
            ELSE 'attended' END,
       starts_at - lead, CASE WHEN arm = false THEN starts_at - lead / 2 END, arm
FROM (
    SELECT g, p, starts_at, random() AS r_cancel, random() AS r_reply, random() AS r_show,
           make_interval(hours => (2 + random() * 720)::int) AS lead,
           CASE WHEN starts_at < :go_live THEN NULL
                ELSE (p * 2654435761::bigint) % 1000 < 100 END AS arm
    FROM (
        SELECT g, 1 + (g::bigint * 7919) % :patients AS p,
               :first + make_interval(days => (g::bigint * :days / :n)::int)
                      + make_interval(mins => (420 + random() * 600)::int) AS starts_at
        FROM generate_series(1, :n) AS g
    ) AS base
) AS drawn;

INSERT INTO reminders (clinic_id, appointment_id, phone_e164, kind, rule, appointment_starts_at,
                       due_at, send_by, status, attempts, claimed_at, sent_at, segments, price,
                       delivery_status)
SELECT clinic_id, id, '+33612345678', 'reminder', '72h', starts_at,
       starts_at - interval '3 days', starts_at - interval '2 hours',
       'sent', 1, starts_at - interval '3 days', starts_at - interval '3 days', 1, 0.05,
       CASE WHEN id % 40 = 0 THEN 'failed' ELSE 'delivered' END
FROM appointments WHERE holdout = false AND starts_at < :now;

SELECT setval(pg_get_serial_sequence('patients', 'id'), :patients);
SELECT setval(pg_get_serial_sequence('appointments', 'id'), :n);
"""


def fill(engine: Engine, clinics: list[int], appointments: int) -> float:
    started = time.perf_counter()
    first = NOW - dt.timedelta(days=700)
    params = {
        "clinics": clinics,
        "patients": max(10, appointments // 5),
        "n": appointments,
        "days": 730,
        "first": first,
        "now": NOW,
        "go_live": NOW - dt.timedelta(days=365),
    }
    with engine.begin() as connection:
        for statement in FILL.split(";\n"):
            if statement.strip():
                connection.execute(text(statement), params)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))
    return time.perf_counter() - started


def setup(url: str, clinics: int) -> list[int]:
    recreate_database(url)
    engine = db.make_engine(url)
    db.migrate(engine)
    ids = []
    with Session(engine) as session, session.begin():
        for i in range(clinics):
            clinic, _ = create_clinic(
                session,
                ClinicOptions(
                    name=f"Bench {i}",
                    timezone=ZONES[i % len(ZONES)],
                    country="FR",
                    language="fr",
                    sender="+33939000000",
                ),
            )
            clinic.go_live = (NOW - dt.timedelta(days=365)).date()
            clinic.holdout = 0.1
            session.flush()
            ids.append(clinic.id)
    engine.dispose()
    return ids


@contextmanager
def statement_times(engine: Engine) -> Iterator[dict[str, list[float]]]:
    """Wall time per SQL statement (keyed by its first words) while the block runs."""
    times: dict[str, list[float]] = defaultdict(list)

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info["bench_started"] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        key = " ".join(statement.split())[:90]
        times[key].append(time.perf_counter() - conn.info.pop("bench_started"))

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        yield times
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


def backend_cpu(session: Session) -> float:
    pid = session.scalar(text("SELECT pg_backend_pid()"))
    fields = stat_fields(int(pid or 0))
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def measure(url: str, clinic_id: int, runs: int) -> dict[str, Any]:
    engine = db.make_engine(url)
    week = report.last_complete_week(NOW, ZoneInfo("Europe/Paris"))
    rss_before = peak_rss_mib(os.getpid())
    walls, client_cpu, server_cpu, render_walls = [], [], [], []
    data: dict[str, Any] = {}
    with statement_times(engine) as times:
        for _ in range(runs):
            with Session(engine) as session, session.begin():
                clinic = session.get(Clinic, clinic_id)
                assert clinic is not None
                server0, cpu0, wall0 = (
                    backend_cpu(session),
                    time.process_time(),
                    time.perf_counter(),
                )
                data = report.build(session, clinic, week, NOW)
                walls.append(time.perf_counter() - wall0)
                client_cpu.append(time.process_time() - cpu0)
                server_cpu.append(backend_cpu(session) - server0)
            wall0 = time.perf_counter()
            report_render.render(data, "html")
            render_walls.append(time.perf_counter() - wall0)
    engine.dispose()
    per_statement = sorted(
        ((statistics.median(v), k) for k, v in times.items() if not k.startswith("SELECT pg_")),
        reverse=True,
    )
    return {
        "week": week,
        "appointments_in_arms": data["holdout"]["with_outcome"] + data["reminded"]["with_outcome"],
        "series_weeks": len(data["series"]),
        "wall_median_s": round(statistics.median(walls), 3),
        "wall_max_s": round(max(walls), 3),
        "client_cpu_median_s": round(statistics.median(client_cpu), 3),
        "server_cpu_median_s": round(statistics.median(server_cpu), 3),
        "render_html_median_s": round(statistics.median(render_walls), 3),
        "peak_rss_mib_before": round(rss_before, 1),
        "peak_rss_mib_after": round(peak_rss_mib(os.getpid()), 1),
        "statements": [(round(t, 4), k) for t, k in per_statement[:12]],
        "effect": data["effect"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--appointments", type=int, default=2_000_000)
    parser.add_argument("--clinics", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--database", default="reminders_bench_report")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--reuse", action="store_true", help="measure an existing database")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = os.environ.get(
        "REMINDERS_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/"
    )
    url = make_url(base).set(database=args.database).render_as_string(hide_password=False)
    try:
        filled = None
        if not args.reuse:
            clinics = setup(url, args.clinics)
            filled = round(fill(db.make_engine(url), clinics, args.appointments), 1)
        result = {"appointments": args.appointments, "fill_seconds": filled}
        result |= measure(url, 1, args.runs)
    except SetupError as exc:
        print(f"bench/report.py: setup failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep and not args.reuse:
            drop_database(url)
    met = result["wall_median_s"] < TARGET_SECONDS
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"weekly report, clinic 1, {result['week']}, over {args.appointments:,} appointments "
            f"({result['appointments_in_arms']:,} in the arms since go-live, "
            f"{result['series_weeks']} weeks of series); "
            + (f"filled in {filled} s" if filled is not None else "existing database")
        )
        print(
            f"  build: median {result['wall_median_s']} s, max {result['wall_max_s']} s "
            f"(target < {TARGET_SECONDS} s: {'met' if met else 'MISSED'}); CPU client "
            f"{result['client_cpu_median_s']} s, PostgreSQL backend "
            f"{result['server_cpu_median_s']} s; HTML render {result['render_html_median_s']} s"
        )
        print(
            f"  peak RSS {result['peak_rss_mib_before']} MiB before, "
            f"{result['peak_rss_mib_after']} MiB after {args.runs} builds"
        )
        print("  slowest statements (median s):")
        for seconds, statement in result["statements"]:
            print(f"    {seconds:8.4f}  {statement}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
