"""Scheduler scan benchmark: idle ticks at 10k, 100k and 1M appointments, then a busy hour.

    .venv/bin/python bench/scan.py [--sizes 10000,100000,1000000] [--runs 50] [--busy 20000]
                                   [--clinics 20] [--capped 2] [--keep] [--json]

It creates a fresh PostgreSQL database (`reminders_bench_scan`, dropped first if it exists),
migrates it (`reminders.db.migrate`), adds clinics through `clinics.create_clinic`, and fills it
with SQL (`INSERT ... SELECT generate_series`): patients (two appointments each), appointments
spread over 90 days (10 days past, 80 ahead, 08:00-19:00 in each clinic's time zone, 4%
cancelled), and their two reminder rows (`72h` and `24h:unconfirmed`). Rows due before the
benchmark's `now` look like history (sent, skipped as confirmed or cancelled, a few failed); every
row due later is planned. The table grows in steps and each step is vacuumed and analysed.

(a) Idle tick: with nothing due at `now`, `reminders.scheduler.tick(clock)` (expire + sweep in one
    transaction, then `claim_due` in another, exactly as the scheduler runs it) is timed `--runs`
    times at every size, and each part alone in its own transaction. Target: < 20 ms.
(b) Busy hour: `--busy` planned reminders (the earliest due, of uncapped clinics) are moved into
    the hour before `now`, then `scheduler.tick(clock)` claims them in batches and queues them into
    a real RedisBroker (db 15 by default, flushed before and after). Target: >= 10,000/s, memory
    flat (a `--warmup` tick first; the peak RSS must not grow with the number claimed).

At the largest size it prints EXPLAIN (ANALYZE, BUFFERS) of the claim query (captured from a real
`claim_due` call, run in a rolled-back transaction) and a one-line plan of every other statement
of an idle tick.

Environment: `REMINDERS_BENCH_DATABASE_URL` (default
`postgresql+psycopg://postgres@127.0.0.1:5432/`): server and credentials; the database name is
`--database`. Exit code 0 when every target is met, 1 when one is missed, 2 when setup failed.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import redis
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SetupError, bench_database_url, machine_busy_seconds, recreate_database

DEFAULT_DATABASE = "reminders_bench_scan"
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
SECRET_KEY = "bench-secret-key-not-for-production-0123456789"
IDLE_TARGET_MS = 20.0
BUSY_TARGET = 10_000.0  # reminders/s claimed and queued
FLAT_MEMORY_MIB = 16.0  # peak RSS growth from the warm-up tick to the busy tick that is "flat"
PAST_DAYS = 10  # appointments start from 10 days before `now` to 80 days after
SPAN_DAYS = 90
FILL_CHUNK = 50_000
INDEXES = (
    "ix_reminders_planned_due",
    "ix_reminders_status_due",
    "ix_reminders_in_flight",
    "ix_reminders_clinic_id",
    "pk_reminders",
)

err = Console(stderr=True)


# --------------------------------------------------------------------------------------------
# Database and process helpers


database_url = bench_database_url


def drop_database(url: str) -> None:
    parsed = make_url(url)
    quoted = '"' + str(parsed.database).replace('"', '""') + '"'
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
    finally:
        admin.dispose()


def memory_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    values: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


class MachineLoad:
    """How busy the whole machine was (all processes, all cores) while the block ran: other
    work on the machine distorts latencies, so the figures say how quiet it was."""

    def __enter__(self) -> MachineLoad:
        self.start_busy, self.start = machine_busy_seconds(), time.monotonic()
        self.percent = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        wall = (time.monotonic() - self.start) * (os.cpu_count() or 1)
        self.percent = 100 * (machine_busy_seconds() - self.start_busy) / wall if wall else 0.0


def wait_for_quiet(max_busy_pct: float, timeout: float = 600.0) -> None:
    """Waits until the machine is quiet (other sessions' work distorts latencies): busy below
    `max_busy_pct` over 3 seconds. 0 does not wait."""
    if max_busy_pct <= 0:
        return
    deadline = time.monotonic() + timeout
    while True:
        with MachineLoad() as load:
            time.sleep(3.0)  # a window over which to judge the machine's load
        if load.percent < max_busy_pct:
            return
        if time.monotonic() > deadline:
            err.print(f"[yellow]the machine is still {load.percent:.0f}% busy: measuring anyway")
            return
        err.print(f"machine {load.percent:.0f}% busy; waiting for it to be quiet...")


def check_redis_url(url: str) -> None:
    db = redis.Redis.from_url(url).connection_pool.connection_kwargs.get("db", 0)
    if int(db or 0) not in (14, 15):
        raise SetupError(f"--redis-url must name Redis db 14 or 15 (it is flushed), not {db}")


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


# --------------------------------------------------------------------------------------------
# Filling the database with SQL

PATIENTS_SQL = """
INSERT INTO patients (id, clinic_id, external_id, name, phone_e164, sms_capable,
                      language_requested, language, language_fallback)
SELECT p, 1 + p % :clinics, 'P' || p, 'Patient ' || p, '+336' || lpad(p::text, 8, '0'), true,
       l.lang, l.lang, false
FROM generate_series(CAST(:lo AS int), CAST(:hi AS int)) AS p
CROSS JOIN LATERAL (
    SELECT CASE WHEN p % 100 < 85 THEN 'fr' WHEN p % 100 < 93 THEN 'en'
                WHEN p % 100 < 97 THEN 'ru' ELSE 'zh' END AS lang
) AS l
"""

# h: a multiplicative hash of the id, for deterministic spread; starts 08:00-18:45 local.
APPOINTMENTS_SQL = """
INSERT INTO appointments (id, clinic_id, external_id, patient_id, starts_at, duration_minutes,
                          practitioner, location, kind, status, confirmation, outcome,
                          booked_at, decided_at, holdout, link_token)
SELECT k.i, c.id, 'A' || k.i, k.p, s.starts_at, (ARRAY[15, 20, 30, 45])[1 + k.h % 4],
       'Dr ' || (ARRAY['Martin', 'Bernard', 'Dubois', 'Nguyen', 'Moreau'])[1 + k.h % 5],
       'Cabinet ' || (1 + k.h % 4), 'consultation',
       CASE WHEN k.h % 25 = 0 THEN 'cancelled' ELSE 'booked' END,
       CASE WHEN s.starts_at - interval '72 hours' > :now THEN 'unconfirmed'
            WHEN k.h % 50 = 1 THEN 'cancelled_by_patient'
            WHEN k.h % 10 < 4 THEN 'confirmed' ELSE 'unconfirmed' END,
       CASE WHEN s.starts_at > :now OR k.h % 25 = 0 THEN NULL
            WHEN k.h % 20 = 3 THEN 'no_show' ELSE 'attended' END,
       LEAST(s.starts_at - make_interval(days => 7 + (k.h % 50)::int), CAST(:now AS timestamptz)),
       CASE WHEN s.starts_at - interval '72 hours' <= :now AND k.h % 10 < 4
            THEN s.starts_at - interval '70 hours' END,
       false,
       substr(md5(k.i::text), 1, 4) || lpad(to_hex(k.i), 8, '0')
FROM generate_series(CAST(:lo AS int), CAST(:hi AS int)) AS g(i)
CROSS JOIN LATERAL (
    SELECT g.i AS i, (g.i + 1) / 2 AS p, (g.i::bigint * 2654435761) % 4294967296 AS h
) AS k
JOIN clinics AS c ON c.id = 1 + k.p % :clinics
CROSS JOIN LATERAL (
    SELECT (date_trunc('day', CAST(:now AS timestamptz) AT TIME ZONE c.timezone)
            + make_interval(days => (k.h % :span)::int - :past)
            + make_interval(mins => 480 + ((k.h / :span) % 44)::int * 15)
           ) AT TIME ZONE c.timezone AS starts_at
) AS s
"""

REMINDERS_SQL = """
INSERT INTO reminders (id, clinic_id, appointment_id, phone_e164, kind, rule,
                       appointment_starts_at, due_at, send_by, status, skip_reason, error,
                       attempts, claimed_at, sent_at, provider_message_id, text, encoding,
                       segments, price)
SELECT a.id * 2 - 1 + r.n, a.clinic_id, a.id, pt.phone_e164, 'reminder', r.rule, a.starts_at,
       d.due_at, a.starts_at - interval '2 hours', st.status, st.reason,
       CASE WHEN st.status = 'failed' THEN 'status 6: Invalid Message' END,
       CASE WHEN st.status IN ('sent', 'failed') THEN 1 ELSE 0 END,
       CASE WHEN st.status IN ('sent', 'failed') THEN d.due_at END,
       CASE WHEN st.status = 'sent' THEN d.due_at + interval '3 seconds' END,
       CASE WHEN st.status = 'sent' THEN upper(substr(md5('m' || a.id || r.rule), 1, 16)) END,
       CASE WHEN st.status = 'sent' THEN
           'Rappel : RDV ' || to_char(a.starts_at, 'DD/MM HH24:MI') || ' avec ' || a.practitioner
           || '. Repondez 1 pour confirmer, 2 pour annuler. https://rdv.example.org/c/'
           || a.link_token END,
       CASE WHEN st.status = 'sent' THEN 'GSM-7' END,
       CASE WHEN st.status = 'sent' THEN 1 END,
       CASE WHEN st.status = 'sent' THEN 0.0333 END
FROM appointments AS a
JOIN patients AS pt ON pt.id = a.patient_id
CROSS JOIN (VALUES (0, '72h', interval '72 hours'), (1, '24h:unconfirmed', interval '24 hours'))
    AS r(n, rule, before)
CROSS JOIN LATERAL (SELECT a.starts_at - r.before AS due_at) AS d
CROSS JOIN LATERAL (
    SELECT CASE
        WHEN d.due_at > :now AND (a.status = 'cancelled'
                                  OR a.confirmation = 'cancelled_by_patient') THEN 'skipped'
        WHEN d.due_at > :now THEN 'planned'
        WHEN r.n = 1 AND a.confirmation <> 'unconfirmed' THEN 'skipped'
        WHEN a.status = 'cancelled' AND a.id % 2 = 0 THEN 'skipped'
        WHEN a.id % 97 = 0 THEN 'failed'
        ELSE 'sent' END AS status,
    CASE
        WHEN d.due_at > :now AND (a.status = 'cancelled'
                                  OR a.confirmation = 'cancelled_by_patient') THEN 'cancelled'
        WHEN d.due_at > :now THEN NULL
        WHEN r.n = 1 AND a.confirmation <> 'unconfirmed' THEN 'confirmed'
        WHEN a.status = 'cancelled' AND a.id % 2 = 0 THEN 'cancelled'
        END AS reason
) AS st
WHERE a.id BETWEEN :lo AND :hi
"""


def create_clinics(count: int, capped: int) -> list[int]:
    """`count` clinics (most in Paris, a few elsewhere); the last `capped` have a daily cap."""
    from reminders.clinics import ClinicOptions, create_clinic
    from reminders.db import session_scope

    zones = ["Europe/Paris"] * 6 + ["Europe/London", "America/Montreal"]
    countries = {"Europe/Paris": "FR", "Europe/London": "GB", "America/Montreal": "CA"}
    ids: list[int] = []
    with session_scope() as session:
        for index in range(count):
            zone = zones[index % len(zones)]
            options = ClinicOptions(
                name=f"Clinique {index + 1}",
                timezone=zone,
                country=countries[zone],
                language="fr",
                sender="+33939000000" if countries[zone] == "FR" else "Clinic",
                daily_cap=5000 if index >= count - capped else None,
            )
            clinic, _ = create_clinic(session, options)
            ids.append(clinic.id)
    if ids != list(range(1, count + 1)):
        raise SetupError(f"expected clinic ids 1..{count} in a fresh database, got {ids[:5]}...")
    return ids


def fill(engine: Engine, lo: int, hi: int, clinics: int, now: dt.datetime) -> None:
    """Appointments lo..hi (ids), their new patients and their reminder rows, in chunks."""
    with progress() as bar:
        task = bar.add_task(f"filling appointments {lo:,}-{hi:,}", total=hi - lo + 1)
        for start in range(lo, hi + 1, FILL_CHUNK):
            end = min(start + FILL_CHUNK - 1, hi)
            params: dict[str, Any] = {
                "now": now,
                "clinics": clinics,
                "span": SPAN_DAYS,
                "past": PAST_DAYS,
            }
            with engine.begin() as connection:
                connection.execute(text("SET LOCAL synchronous_commit = off"))
                first_patient, last_patient = start // 2 + 1, (end + 1) // 2
                if last_patient >= first_patient:
                    connection.execute(
                        text(PATIENTS_SQL), {**params, "lo": first_patient, "hi": last_patient}
                    )
                connection.execute(text(APPOINTMENTS_SQL), {**params, "lo": start, "hi": end})
                connection.execute(text(REMINDERS_SQL), {**params, "lo": start, "hi": end})
            bar.advance(task, end - start + 1)
    with engine.connect() as connection:
        for table in ("patients", "appointments", "reminders"):
            connection.execute(
                text(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))")
            )
        connection.commit()
    vacuum(engine)


def vacuum(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM (ANALYZE) patients, appointments, reminders"))


def table_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT status, count(*) FROM reminders GROUP BY status ORDER BY status")
        ).all()
        appointments = connection.scalar(text("SELECT count(*) FROM appointments")) or 0
        size = connection.scalar(text("SELECT pg_total_relation_size('reminders')")) or 0
    counts = {f"reminders_{status}": int(n) for status, n in rows}
    counts["appointments"] = int(appointments)
    counts["reminders"] = sum(int(n) for _, n in rows)
    counts["reminders_total_mib"] = int(size) // (1024 * 1024)
    return counts


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Timing:
    runs: int
    median_ms: float
    p99_ms: float
    max_ms: float

    @staticmethod
    def of(samples: Sequence[float]) -> Timing:
        ordered = sorted(samples)
        rank = max(1, -(-99 * len(ordered) // 100))  # nearest-rank p99
        return Timing(
            runs=len(ordered),
            median_ms=statistics.median(ordered) * 1000,
            p99_ms=ordered[rank - 1] * 1000,
            max_ms=ordered[-1] * 1000,
        )


@dataclass
class IdleResult:
    appointments: int
    reminders: int
    planned: int
    table_mib: int
    tick: Timing
    parts: dict[str, Timing]
    machine_busy_pct: float

    @property
    def ok(self) -> bool:
        return self.tick.p99_ms < IDLE_TARGET_MS


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    samples: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def measure_idle(engine: Engine, now: dt.datetime, runs: int) -> IdleResult:
    from reminders import dispatch, heap, scheduler
    from reminders.db import session_scope

    def tick() -> None:
        queued = scheduler.tick(lambda: now)
        if queued:
            raise SetupError(f"an idle tick queued {len(queued)} reminders: the data is wrong")

    def expire() -> None:
        with session_scope() as session:
            dispatch.expire(session, now)

    def sweep() -> None:
        with session_scope() as session:
            dispatch.sweep(session, now)

    def claim() -> None:
        with session_scope() as session:
            dispatch.claim_due(session, now, scheduler.BATCH)

    timed(tick, 5)  # warm-up: connections, compiled statement cache, buffers
    # As `reminders scheduler` does once started (reminders/heap.py): without it, a full
    # collection of this process's heap (the benchmark's own objects too) paused one tick in 50.
    heap.settle()
    ticks: list[float] = []
    parts: dict[str, list[float]] = {"expire": [], "sweep": [], "claim_due": []}
    with progress() as bar, MachineLoad() as load:
        task = bar.add_task("idle ticks", total=runs)
        for _ in range(runs):
            ticks += timed(tick, 1)
            parts["expire"] += timed(expire, 1)
            parts["sweep"] += timed(sweep, 1)
            parts["claim_due"] += timed(claim, 1)
            bar.advance(task)
    counts = table_counts(engine)
    return IdleResult(
        appointments=counts["appointments"],
        reminders=counts["reminders"],
        planned=counts.get("reminders_planned", 0),
        table_mib=counts["reminders_total_mib"],
        tick=Timing.of(ticks),
        parts={name: Timing.of(samples) for name, samples in parts.items()},
        machine_busy_pct=load.percent,
    )


@contextlib.contextmanager
def captured_statements(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every SQL statement (and its parameters) the engine runs inside the block."""
    statements: list[tuple[str, Any]] = []

    def record(
        conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def explain(engine: Engine, statement: str, parameters: Any) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) in a transaction that is rolled back (claims are UPDATEs)."""
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            rows = connection.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters
            ).all()
        finally:
            transaction.rollback()
    return [str(row[0]) for row in rows]


def plan_summary(lines: list[str]) -> str:
    scans = [
        line.strip().removeprefix("->  ").split("  (")[0]
        for line in lines
        if ("Scan" in line and "->" in line) or "Scan" in line.split("(")[0]
    ]
    total = next((line for line in lines if line.startswith("Execution Time")), "")
    return f"{total.removeprefix('Execution Time: ')}: " + "; ".join(dict.fromkeys(scans))


@dataclass
class Explained:
    claim_sql: str
    claim_plan: list[str]
    other: list[tuple[str, str]] = field(default_factory=list)  # (statement head, summary)
    index_scans: dict[str, int] = field(default_factory=dict)


def index_scans(engine: Engine, *, flush: bool = False) -> dict[str, int]:
    """idx_scan of every index on reminders (pg_stat_user_indexes). With `flush`, the app's
    connections are closed first: a backend flushes its statistics when it exits."""
    if flush:
        from reminders.db import get_engine

        get_engine().dispose()
        time.sleep(0.5)  # the backends exit asynchronously
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT indexrelname, idx_scan FROM pg_stat_user_indexes "
                "WHERE relname = 'reminders' ORDER BY indexrelname"
            )
        ).all()
    return {str(name): int(count or 0) for name, count in rows}


def explain_tick(engine: Engine, now: dt.datetime) -> Explained:
    """Captures the SQL of a real idle tick and explains each statement."""
    from reminders import scheduler
    from reminders.db import get_engine

    app_engine = get_engine()
    with captured_statements(app_engine) as statements:
        scheduler.tick(lambda: now)
    interesting = [
        (sql, params)
        for sql, params in statements
        if sql.lstrip().upper().startswith(("SELECT", "UPDATE", "WITH")) and "reminders" in sql
    ]
    claim = next((s for s in interesting if "FOR UPDATE" in s[0] and "planned" in str(s)), None)
    if claim is None:
        claim = next(s for s in interesting if "SKIP LOCKED" in s[0])
    result = Explained(claim_sql=claim[0], claim_plan=explain(engine, *claim))
    for sql, params in interesting:
        if (sql, params) == claim:
            continue
        head = " ".join(sql.split())[:90]
        result.other.append((head, plan_summary(explain(engine, sql, params))))
    return result


@dataclass
class BusyResult:
    due: int
    claimed: int
    in_redis: int
    seconds: float
    enqueue_seconds: float
    messages: int
    rate: float
    rss_before_mib: float
    rss_after_warmup_mib: float
    rss_after_mib: float
    hwm_before_mib: float
    hwm_after_warmup_mib: float
    hwm_after_mib: float
    warmup: int
    machine_busy_pct: float

    @property
    def flat(self) -> bool:
        return self.hwm_after_mib - self.hwm_after_warmup_mib < FLAT_MEMORY_MIB

    @property
    def ok(self) -> bool:
        return self.rate >= BUSY_TARGET and self.flat and self.claimed == self.due


def make_due(engine: Engine, count: int, now: dt.datetime) -> int:
    """Moves the `count` earliest planned reminders of uncapped clinics into the past hour."""
    with engine.begin() as connection:
        moved = connection.execute(
            text(
                """
                UPDATE reminders SET due_at = :now - make_interval(secs => (id % 3600))
                WHERE id IN (
                    SELECT r.id FROM reminders AS r JOIN clinics AS c ON c.id = r.clinic_id
                    WHERE r.status = 'planned' AND r.due_at > :now AND c.daily_cap IS NULL
                    ORDER BY r.due_at LIMIT :count
                )
                """
            ),
            {"now": now, "count": count},
        ).rowcount
    with engine.connect() as connection:
        connection.execute(text("ANALYZE reminders"))
        connection.commit()
    return int(moved)


class EnqueueTimer:
    """Times (and counts) the broker's enqueues during a tick: the queueing part of it."""

    def __init__(self) -> None:
        from reminders import actors

        self.broker = actors.send_reminder.broker
        self.original: Callable[..., Any] = self.broker.enqueue
        self.seconds = 0.0
        self.messages = 0

    def __enter__(self) -> EnqueueTimer:
        original = self.original

        def enqueue(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.messages += 1

        setattr(self.broker, "enqueue", enqueue)  # noqa: B010 (an instance attribute, on purpose)
        return self

    def __exit__(self, *exc: object) -> None:
        delattr(self.broker, "enqueue")


def measure_busy(
    engine: Engine,
    client: redis.Redis,
    now: dt.datetime,
    count: int,
    warmup: int,
) -> BusyResult:
    from reminders import scheduler

    rss_before, hwm_before = memory_mib()
    if warmup:
        make_due(engine, warmup, now)
        warm = scheduler.tick(lambda: now)
        if len(warm) != warmup:
            raise SetupError(f"the warm-up tick queued {len(warm)} of {warmup}")
    client.flushdb()
    rss_warm, hwm_warm = memory_mib()
    due = make_due(engine, count, now)
    err.print(f"busy hour: {due:,} reminders due; claiming and queueing them...")
    with EnqueueTimer() as timer, MachineLoad() as load:
        start = time.perf_counter()
        queued = scheduler.tick(lambda: now)
        seconds = time.perf_counter() - start
    rss_after, hwm_after = memory_mib()
    in_redis = int(client.hlen("dramatiq:sms.msgs"))
    return BusyResult(
        due=due,
        claimed=len(queued),
        in_redis=in_redis,
        seconds=seconds,
        enqueue_seconds=timer.seconds,
        messages=timer.messages,
        rate=len(queued) / seconds if seconds else 0.0,
        rss_before_mib=rss_before,
        rss_after_warmup_mib=rss_warm,
        rss_after_mib=rss_after,
        hwm_before_mib=hwm_before,
        hwm_after_warmup_mib=hwm_warm,
        hwm_after_mib=hwm_after,
        warmup=warmup,
        machine_busy_pct=load.percent,
    )


# --------------------------------------------------------------------------------------------
# Reporting


def print_report(
    idle: list[IdleResult],
    explained: Explained | None,
    busy: BusyResult | None,
    out: TextIO,
) -> None:
    console = Console(file=out, width=160)
    table = Table(title=f"Idle tick (nothing due), target < {IDLE_TARGET_MS:.0f} ms")
    for column in (
        "appointments",
        "reminder rows",
        "planned",
        "table MiB",
        "tick median",
        "tick p99",
        "tick max",
        "expire p50",
        "sweep p50",
        "claim_due p50",
        "machine busy",
        "ok",
    ):
        table.add_column(column, justify="right")
    for r in idle:
        table.add_row(
            f"{r.appointments:,}",
            f"{r.reminders:,}",
            f"{r.planned:,}",
            f"{r.table_mib:,}",
            f"{r.tick.median_ms:.2f} ms",
            f"{r.tick.p99_ms:.2f} ms",
            f"{r.tick.max_ms:.2f} ms",
            f"{r.parts['expire'].median_ms:.2f} ms",
            f"{r.parts['sweep'].median_ms:.2f} ms",
            f"{r.parts['claim_due'].median_ms:.2f} ms",
            f"{r.machine_busy_pct:.0f}%",
            "yes" if r.ok else "NO",
        )
    console.print(table)
    if idle:
        console.print(
            f"({idle[-1].tick.runs} runs per size; tick = reminders.scheduler.tick: expire + "
            "sweep in one transaction, claim_due in another; parts timed alone, each in its "
            "own transaction; machine busy = all processes on all cores during the runs)"
        )
    if explained is not None:
        console.print("\n[bold]EXPLAIN (ANALYZE, BUFFERS) of the claim query, idle, largest size")
        console.print(" ".join(explained.claim_sql.split()), markup=False, highlight=False)
        for line in explained.claim_plan:
            console.print("  " + line, markup=False, highlight=False)
        used = [name for name in INDEXES if any(name in line for line in explained.claim_plan)]
        partial = "yes" if "ix_reminders_planned_due" in used else "NO"
        console.print(
            f"claim query uses: {', '.join(used) or 'no reminders index'}; partial index "
            f"ix_reminders_planned_due used: {partial}"
        )
        if explained.index_scans:
            console.print(
                "\n[bold]Index scans on reminders during the idle runs at the largest size"
                "[/bold] (pg_stat_user_indexes; psycopg prepares a statement server-side after "
                "5 runs, and PostgreSQL may then use a generic plan, which cannot use a partial "
                "index whose predicate is a bound parameter)"
            )
            for name, count in explained.index_scans.items():
                console.print(f"  {name:60} {count:>8,}", markup=False, highlight=False)
        console.print("\n[bold]The other statements of an idle tick (execution time: scans)")
        for head, summary in explained.other:
            console.print(f"  {head}...\n      {summary}", markup=False, highlight=False)
    if busy is not None:
        table = Table(title=f"Busy hour: claim + queue into Redis, target >= {BUSY_TARGET:,.0f}/s")
        for column in (
            "due",
            "claimed",
            "messages (in Redis)",
            "seconds",
            "of which enqueue",
            "reminders/s",
            "machine busy",
            "ok",
        ):
            table.add_column(column, justify="right")
        table.add_row(
            f"{busy.due:,}",
            f"{busy.claimed:,}",
            f"{busy.messages:,} ({busy.in_redis:,})",
            f"{busy.seconds:.3f}",
            f"{busy.enqueue_seconds:.3f}",
            f"{busy.rate:,.0f}",
            f"{busy.machine_busy_pct:.0f}%",
            "yes" if busy.rate >= BUSY_TARGET and busy.claimed == busy.due else "NO",
        )
        console.print(table)
        table = Table(title="Bench process memory (MiB), VmRSS / VmHWM (peak)")
        for column in (
            "",
            "before",
            f"after warm-up tick ({busy.warmup:,})",
            f"after busy tick ({busy.claimed:,})",
            "peak growth",
            "flat",
        ):
            table.add_column(column, justify="right")
        table.add_row(
            "VmRSS",
            f"{busy.rss_before_mib:.1f}",
            f"{busy.rss_after_warmup_mib:.1f}",
            f"{busy.rss_after_mib:.1f}",
            "",
            "",
        )
        table.add_row(
            "VmHWM",
            f"{busy.hwm_before_mib:.1f}",
            f"{busy.hwm_after_warmup_mib:.1f}",
            f"{busy.hwm_after_mib:.1f}",
            f"{busy.hwm_after_mib - busy.hwm_after_warmup_mib:+.1f}",
            "yes" if busy.flat else "NO",
        )
        console.print(table)


def profile_busy(
    engine: Engine, client: redis.Redis, now: dt.datetime, count: int
) -> cProfile.Profile:
    """One more busy tick (another block of `count`), under cProfile: not measured."""
    from reminders import scheduler

    client.flushdb()
    make_due(engine, count, now)
    profiler = cProfile.Profile()
    profiler.enable()
    scheduler.tick(lambda: now)
    profiler.disable()
    client.flushdb()
    return profiler


def print_profile(profiler: cProfile.Profile, out: TextIO) -> None:
    """The busy tick's time by function (cumulative), as cProfile saw it (cProfile slows
    Python code down, so read shares, not absolute times)."""
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("cumulative").print_stats(
        r"reminders/|sqlalchemy/engine/base|redis/|dramatiq/broker|psycopg/cursor", 30
    )
    out.write("\ncProfile of the busy tick (cumulative; filtered to reminders, SQL and Redis)\n")
    out.write(buffer.getvalue())


# --------------------------------------------------------------------------------------------
# Main


def parse_sizes(value: str) -> list[int]:
    sizes = sorted({int(part.replace("_", "")) for part in value.split(",") if part.strip()})
    if not sizes or sizes[0] < 100:
        raise argparse.ArgumentTypeError("sizes are appointment counts of at least 100")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes("10000,100000,1000000"),
        help="appointment counts to measure the idle tick at (ascending)",
    )
    parser.add_argument("--runs", type=int, default=50, help="idle ticks per size")
    parser.add_argument(
        "--busy", type=int, default=20_000, help="reminders made due for the busy hour (0: skip it)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2_000,
        help="reminders claimed by a warm-up tick before the busy one",
    )
    parser.add_argument("--clinics", type=int, default=20)
    parser.add_argument(
        "--capped",
        type=int,
        default=2,
        help="clinics (of --clinics) with a daily cap: claim_due checks each",
    )
    parser.add_argument("--database", default=DEFAULT_DATABASE)
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS,
        help="Redis for the broker: db 14 or 15 only (it is flushed)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the busy tick and print where its time goes",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=30.0,
        metavar="PERCENT",
        help="before measuring, wait (up to 10 min) until the whole machine is less busy "
        "than this (0: do not wait)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    if not 0 <= args.capped < args.clinics:
        parser.error("--capped must be below --clinics")
    return args


def configure_app(url: str, redis_url: str) -> None:
    """Points the app's settings, engine and actors at the bench database and Redis."""
    os.environ.update(
        REMINDERS_DATABASE_URL=url,
        REMINDERS_REDIS_URL=redis_url,
        REMINDERS_SECRET_KEY=SECRET_KEY,
        REMINDERS_SMS_PROVIDER="console",
    )
    from dramatiq.brokers.redis import RedisBroker

    from reminders import actors, db
    from reminders.config import get_settings
    from reminders.sms import ConsoleProvider

    db.reset()
    devnull = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    actors.configure(
        get_settings(),
        broker=RedisBroker(url=redis_url),  # type: ignore[no-untyped-call]
        provider=ConsoleProvider(devnull),
        rate_limit=False,
    )


def run(args: argparse.Namespace) -> int:
    url = database_url(args.database)
    check_redis_url(args.redis_url)
    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    err.print(f"database {make_url(url).render_as_string(hide_password=True)}; load {load}")
    recreate_database(url)
    engine = create_engine(url)
    try:
        from reminders import db

        db.migrate(engine)
        configure_app(url, args.redis_url)
        create_clinics(args.clinics, args.capped)
        now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
        idle: list[IdleResult] = []
        explained: Explained | None = None
        filled = 0
        scans: dict[str, int] = {}
        for size in args.sizes:
            fill(engine, filled + 1, size, args.clinics, now)
            filled = size
            before = index_scans(engine)
            wait_for_quiet(args.quiet)
            result = measure_idle(engine, now, args.runs)
            after = index_scans(engine, flush=True)
            scans = {name: after[name] - before.get(name, 0) for name in after}
            idle.append(result)
            err.print(
                f"{size:>10,} appointments: idle tick median {result.tick.median_ms:.2f} ms, "
                f"p99 {result.tick.p99_ms:.2f} ms"
            )
        explained = explain_tick(engine, now)
        explained.index_scans = scans
        busy = profiler = None
        if args.busy:
            wait_for_quiet(args.quiet)
            busy = measure_busy(engine, client, now, args.busy, args.warmup)
            if args.profile:
                profiler = profile_busy(engine, client, now, args.busy)
        if args.json:
            payload = {
                "now": now.isoformat(),
                "idle": [asdict(r) | {"ok": r.ok} for r in idle],
                "claim_plan": explained.claim_plan,
                "other_plans": explained.other,
                "index_scans": explained.index_scans,
                "busy": asdict(busy) | {"flat": busy.flat, "ok": busy.ok} if busy else None,
                "targets": {"idle_ms": IDLE_TARGET_MS, "busy_per_s": BUSY_TARGET},
            }
            print(json.dumps(payload, indent=2))
        else:
            print_report(idle, explained, busy, sys.stdout)
        if profiler is not None:
            print_profile(profiler, sys.stderr if args.json else sys.stdout)
        ok = all(r.ok for r in idle) and (busy is None or busy.ok)
        return 0 if ok else 1
    finally:
        client.flushdb()
        from reminders import db

        db.reset()
        engine.dispose()
        if not args.keep:
            drop_database(url)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except SetupError as exc:
        err.print(f"[red]setup failed:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
