"""Sending benchmark: reminders through Redis, one `reminders worker`, the real Vonage SDK.

    .venv/bin/python bench/send.py [--counts 2000,20000] [--threads 8] [--profile DIR] [--json]

For each count it creates a fresh PostgreSQL database (`reminders_bench_send`, dropped first),
migrates it (`reminders.db.migrate`), adds a clinic (Europe/Paris, a two-way sender, no quiet
hours, so the time of day does not matter) and inserts with SQL one appointment per patient
(starting in 24-34 hours, languages fr 85%, en 8%, ru 4%, zh 3%) with its `72h` reminder already
sent (history) and its `24h:unconfirmed` reminder due now. Then, in this process, it claims and
queues them exactly as the scheduler does (`reminders.scheduler.tick`) into Redis (db 15, flushed
first), and only then starts ONE `reminders worker --threads 8` process, with settings from the
environment: the vonage provider, the real SDK, and `REMINDERS_VONAGE_REST_HOST` pointing at the
local HTTPS stand-in (`tests/vonage_standin.py`, answering at once), with
`REMINDERS_SEND_RATE=10000` (the highest value the settings accept: the cap is lifted, but the
Redis-backed limiter still runs for every SMS), and its own modules byte-compiled first, as an
installed package's are (`common.byte_compile`). It polls the database until every row is final
(sent, skipped, failed), reads the worker's CPU time and peak RSS from /proc, and stops it with
SIGTERM.

The stand-in runs in its own process (started once, `--standin-server`), so that its TLS and HTTP
work does not share the bench's GIL and its CPU is accounted apart; it counts POSTs per
`client-ref` without keeping the requests.

Beside each count, in the same run, a no-op dramatiq actor's rate: the same number of messages in
Redis db 14, consumed by a process running `dramatiq.Worker(broker, worker_threads=8)` exactly as
`reminders worker` does, with an actor that does nothing (`--noop-worker`).

Printed per count: msgs/s from worker start to the last SMS (max `sent_at`) and from the first
SMS to the last, worker CPU per SMS (utime+stime of the worker and its children, startup
included, and without startup), peak RSS (VmHWM), duplicates (POSTs beyond one per client-ref,
and POSTs minus rows sent) and lost (rows not final), the no-op rate, the CPU of PostgreSQL,
Redis and the stand-in during the run, and the ratios to the Twilio sample app's baseline
(106 msgs/s, 9.7 ms CPU per SMS on this machine). Targets: >= 500 msgs/s, <= 2 ms CPU per SMS,
< 150 MB RSS, 0 duplicates, 0 lost.

`--profile DIR`: one more run of the largest count with `py-spy record` attached to the worker
(not measured: sampling slows it), printing the hottest functions and the share of CPU samples
per library.

Environment: `REMINDERS_BENCH_DATABASE_URL` (default
`postgresql+psycopg://postgres@127.0.0.1:5432/`): server and credentials; the database name is
`--database`. Exit code 0 when every target is met, 1 when one is missed, 2 when setup failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SetupError,
    bench_database_url,
    byte_compile,
    drop_database,
    machine_busy_seconds,
    peak_rss_mib,
    recreate_database,
    stat_fields,
)

ROOT = Path(__file__).resolve().parent.parent
# Workers run from elsewhere: `python -m` puts its cwd first on sys.path, before PYTHONPATH.
WORKDIR = Path(tempfile.gettempdir())
DEFAULT_DATABASE = "reminders_bench_send"
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
DEFAULT_NOOP_REDIS = "redis://127.0.0.1:6379/14"
SECRET_KEY = "bench-secret-key-not-for-production-0123456789"
API_KEY, API_SECRET, SIGNATURE_SECRET = "benchkey", "bench-api-secret", "bench-signature-secret"
NOOP_QUEUE = "noop"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FINAL = ("sent", "skipped", "failed")

BASELINE_RATE = 106.0  # msgs/s, the Twilio sample app on this machine
BASELINE_CPU_MS = 9.7  # worker CPU per SMS
TARGET_RATE = 500.0
TARGET_CPU_MS = 2.0
TARGET_RSS_MIB = 150.0

err = Console(stderr=True)


# --------------------------------------------------------------------------------------------
# /proc


def descendants(pid: int) -> list[int]:
    """The process and every process below it."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                children[int(stat_fields(int(entry.name))[1])].append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def cpu_times(pid: int, *, tree: bool = False) -> tuple[float, float]:
    """(utime, stime) of a process (with `tree`, of it and its descendants), from /proc."""
    user = system = 0.0
    for each in descendants(pid) if tree else [pid]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat_fields(each)
            user += int(fields[11]) / CLK_TCK
            system += int(fields[12]) / CLK_TCK
    return user, system


def cpu_seconds(pid: int, *, tree: bool = False) -> float:
    """utime + stime of a process (with `tree`, of it and its descendants)."""
    return sum(cpu_times(pid, tree=tree))


def wait_for_quiet(max_busy_pct: float, timeout: float = 600.0) -> None:
    """Waits until the machine is quiet (other sessions' work distorts the figures): busy below
    `max_busy_pct` over 3 seconds. 0 does not wait."""
    if max_busy_pct <= 0:
        return
    deadline = time.monotonic() + timeout
    while True:
        before, start = machine_busy_seconds(), time.monotonic()
        time.sleep(3.0)  # a window over which to judge the machine's load
        wall = (time.monotonic() - start) * (os.cpu_count() or 1)
        percent = 100 * (machine_busy_seconds() - before) / wall
        if percent < max_busy_pct:
            return
        if time.monotonic() > deadline:
            err.print(f"[yellow]the machine is still {percent:.0f}% busy: measuring anyway")
            return
        err.print(f"machine {percent:.0f}% busy; waiting for it to be quiet...")


def cpu_by_pid(*names: str) -> dict[int, float]:
    """CPU seconds of every process whose command is one of `names` (postgres, redis-server)."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if (entry / "comm").read_text().strip() in names:
                    found[int(entry.name)] = cpu_seconds(int(entry.name))
    return found


def cpu_since(before: dict[int, float], *names: str) -> float:
    """CPU those processes used since `before` (new ones in full; ones gone since are lost)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in cpu_by_pid(*names).items())


# --------------------------------------------------------------------------------------------
# Database


database_url = bench_database_url


FILL_SQL = (
    """
    INSERT INTO patients (id, clinic_id, external_id, name, phone_e164, sms_capable,
                          language_requested, language, language_fallback)
    SELECT p, :clinic, 'P' || p, 'Patient ' || p, '+336' || lpad(p::text, 8, '0'), true,
           l.lang, l.lang, false
    FROM generate_series(1, CAST(:count AS int)) AS p
    CROSS JOIN LATERAL (
        SELECT CASE WHEN p % 100 < 85 THEN 'fr' WHEN p % 100 < 93 THEN 'en'
                    WHEN p % 100 < 97 THEN 'ru' ELSE 'zh' END AS lang
    ) AS l
    """,
    """
    INSERT INTO appointments (id, clinic_id, external_id, patient_id, starts_at, duration_minutes,
                              practitioner, location, kind, status, confirmation, booked_at,
                              holdout, link_token)
    SELECT i, :clinic, 'A' || i, i,
           date_trunc('minute', CAST(:now AS timestamptz)) + interval '24 hours'
               + make_interval(mins => 15 * (i % 40)),
           (ARRAY[15, 20, 30, 45])[1 + i % 4],
           'Dr ' || (ARRAY['Martin', 'Bernard', 'Dubois', 'Nguyen', 'Moreau'])[1 + i % 5],
           'Cabinet ' || (1 + i % 4), 'consultation', 'booked', 'unconfirmed',
           CAST(:now AS timestamptz) - interval '10 days', false,
           substr(md5(i::text), 1, 4) || lpad(to_hex(i), 8, '0')
    FROM generate_series(1, CAST(:count AS int)) AS i
    """,
    """
    INSERT INTO reminders (id, clinic_id, appointment_id, phone_e164, kind, rule,
                           appointment_starts_at, due_at, send_by, status, attempts, claimed_at,
                           sent_at, provider_message_id, text, encoding, segments, price)
    SELECT a.id * 2 - 1, a.clinic_id, a.id, p.phone_e164, 'reminder', '72h', a.starts_at,
           a.starts_at - interval '72 hours', a.starts_at - interval '2 hours', 'sent', 1,
           a.starts_at - interval '72 hours', a.starts_at - interval '72 hours' + interval '2 s',
           upper(substr(md5('m' || a.id), 1, 16)), 'Rappel (historique)', 'GSM-7', 1, 0.0333
    FROM appointments AS a JOIN patients AS p ON p.id = a.patient_id
    UNION ALL
    SELECT a.id * 2, a.clinic_id, a.id, p.phone_e164, 'reminder', '24h:unconfirmed', a.starts_at,
           CAST(:now AS timestamptz) - make_interval(secs => a.id % 60),
           a.starts_at - interval '2 hours', 'planned', 0, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL
    FROM appointments AS a JOIN patients AS p ON p.id = a.patient_id
    """,
    "SELECT setval('patients_id_seq', (SELECT max(id) FROM patients))",
    "SELECT setval('appointments_id_seq', (SELECT max(id) FROM appointments))",
    "SELECT setval('reminders_id_seq', (SELECT max(id) FROM reminders))",
)


def prepare_database(url: str, count: int, now: dt.datetime) -> None:
    """A fresh, migrated database with one clinic and `count` reminders due at `now`."""
    from reminders import db
    from reminders.clinics import ClinicOptions, create_clinic

    recreate_database(url)
    engine = create_engine(url)
    try:
        db.migrate(engine)
    finally:
        engine.dispose()
    db.reset()
    with db.session_scope() as session:
        clinic, _ = create_clinic(
            session,
            ClinicOptions(
                name="Clinique du Parc",
                timezone="Europe/Paris",
                country="FR",
                language="fr",
                sender="+33939000000",
                quiet_hours="none",
            ),
        )
        clinic_id = clinic.id
    with db.get_engine().begin() as connection:
        for statement in FILL_SQL:
            connection.execute(text(statement), {"clinic": clinic_id, "count": count, "now": now})
    with db.get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE) patients, appointments, reminders"))


def bench_rows(engine: Engine) -> dict[str, Any]:
    """Statuses and sent_at range of the benchmark's reminders (the 24h rows)."""
    with engine.connect() as connection:
        statuses: dict[Any, Any] = dict(
            connection.execute(
                text(
                    "SELECT status, count(*) FROM reminders WHERE rule = '24h:unconfirmed' "
                    "GROUP BY status"
                )
            ).all()
        )
        first, last, segments = connection.execute(
            text(
                "SELECT min(sent_at), max(sent_at), coalesce(sum(segments), 0) FROM reminders "
                "WHERE rule = '24h:unconfirmed' AND status = 'sent'"
            )
        ).one()
    return {
        "statuses": {str(k): int(v) for k, v in statuses.items()},
        "first": first,
        "last": last,
        "segments": int(segments),
    }


def final_count(engine: Engine) -> int:
    with engine.connect() as connection:
        value = connection.scalar(
            text(
                "SELECT count(*) FROM reminders WHERE rule = '24h:unconfirmed' "
                "AND status IN ('sent', 'skipped', 'failed')"
            )
        )
    return int(value or 0)


# --------------------------------------------------------------------------------------------
# Child processes: the stand-in, the no-op worker, the reminders worker


class StandIn:
    """The Vonage stand-in in its own process (`send.py --standin-server`), driven by lines of
    text on its stdin, answering with JSON lines."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--standin-server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        hello = self._read()
        self.rest_host = str(hello["rest_host"])
        self.ca_bundle = str(hello["ca_bundle"])

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SetupError(f"the stand-in exited with code {self.process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def standin_server() -> int:
    """`--standin-server`: runs the stand-in and answers `stats` and `reset` on stdin."""
    sys.path.insert(0, str(ROOT))
    from tests.vonage_standin import ReceivedRequest, Reply, VonageStandIn

    lock = threading.Lock()
    refs: collections.Counter[str] = collections.Counter()

    def count(request: ReceivedRequest) -> Reply:
        with lock:
            refs[request.form.get("client-ref", "")] += 1
        return Reply()

    with VonageStandIn(
        keep_requests=False, behaviour=count, api_key=API_KEY, api_secret=API_SECRET
    ) as server:
        reply = {"rest_host": server.rest_host, "ca_bundle": str(server.ca_bundle)}
        print(json.dumps(reply), flush=True)
        for line in sys.stdin:
            command = line.strip()
            with lock:
                if command == "reset":
                    refs.clear()
                    server.reset()
                    server.behaviour = count
                    print(json.dumps({"ok": True}), flush=True)
                elif command == "stats":
                    stats = {
                        "posts": server.posts,
                        "refs": len(refs),
                        "extra_posts": sum(n - 1 for n in refs.values() if n > 1),
                        "without_ref": refs.get("", 0),
                        "duplicated_refs": sorted(r for r, n in refs.items() if n > 1)[:20],
                    }
                    print(json.dumps(stats), flush=True)
    return 0


def noop_worker(redis_url: str, threads: int) -> int:
    """`--noop-worker`: a dramatiq worker with one actor that does nothing, run the way
    `reminders worker` runs its own (same Worker options); prints `ready`, stops on SIGTERM."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=redis_url)  # type: ignore[no-untyped-call]
    dramatiq.set_broker(broker)

    def noop(number: int) -> None:
        return None

    declare = dramatiq.actor(broker=broker, actor_name="noop", queue_name=NOOP_QUEUE, max_retries=0)
    declare(noop)
    worker = dramatiq.Worker(
        broker, worker_threads=threads, queues={NOOP_QUEUE}, worker_timeout=1000
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    print("ready", flush=True)
    stop.wait()
    worker.stop(timeout=30_000)
    return 0


def stop_process(
    process: subprocess.Popen[Any], timeout: float = 60.0, sig: int = signal.SIGTERM
) -> int:
    """SIGTERM (or `sig`), then SIGKILL if it does not stop in time; returns the exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def worker_env(url: str, redis_url: str, standin: StandIn, send_rate: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(
        REMINDERS_DATABASE_URL=url,
        REMINDERS_REDIS_URL=redis_url,
        REMINDERS_SECRET_KEY=SECRET_KEY,
        REMINDERS_SMS_PROVIDER="vonage",
        REMINDERS_VONAGE_API_KEY=API_KEY,
        REMINDERS_VONAGE_API_SECRET=API_SECRET,
        REMINDERS_VONAGE_SIGNATURE_SECRET=SIGNATURE_SECRET,
        REMINDERS_VONAGE_REST_HOST=standin.rest_host,
        REMINDERS_SEND_RATE=send_rate,
        REQUESTS_CA_BUNDLE=standin.ca_bundle,
        PYTHONUNBUFFERED="1",
    )
    return env


def check_redis_url(url: str) -> None:
    db = redis.Redis.from_url(url).connection_pool.connection_kwargs.get("db", 0)
    if int(db or 0) not in (14, 15):
        raise SetupError(f"{url}: only Redis db 14 or 15 may be used (it is flushed)")


# --------------------------------------------------------------------------------------------
# One run


@dataclass
class NoopResult:
    count: int
    seconds_from_start: float
    seconds_from_ready: float
    rate_from_start: float
    rate_from_ready: float
    cpu_ms_per_msg: float
    peak_rss_mib: float


@dataclass
class SendResult:
    count: int
    queued: int
    sent: int
    statuses: dict[str, int]
    segments: int
    lost: int
    posts: int
    extra_posts: int
    posts_minus_sent: int
    duplicated_refs: list[str]
    startup_seconds: float  # worker start -> first SMS
    seconds: float  # worker start -> last SMS
    steady_seconds: float  # first SMS -> last SMS
    final_seconds: float  # worker start -> all rows final (as polled)
    rate: float
    steady_rate: float
    worker_cpu_seconds: float
    worker_user_seconds: float
    worker_sys_seconds: float
    worker_cpu_idle_seconds: float  # after startup, before the first SMS (imports etc.)
    cpu_ms_per_sms: float
    steady_cpu_ms_per_sms: float
    peak_rss_mib: float
    worker_exit: int
    postgres_cpu: float
    redis_cpu: float
    standin_cpu: float
    bench_cpu: float
    machine_busy_pct: float  # all processes, all cores, from worker start to all final
    other_cpu: float  # machine busy CPU seconds not ours (worker, stand-in, bench, PG, Redis)
    noop: NoopResult | None = None
    profile: dict[str, Any] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return max(self.extra_posts, self.posts_minus_sent)

    def checks(self) -> dict[str, bool]:
        return {
            "rate": self.rate >= TARGET_RATE,
            "cpu": self.cpu_ms_per_sms <= TARGET_CPU_MS,
            "rss": self.peak_rss_mib < TARGET_RSS_MIB,
            "duplicates": self.duplicates == 0,
            "lost": self.lost == 0,
        }


def enqueue_due(url: str, redis_url: str) -> int:
    """Claims and queues what is due, as `reminders scheduler` does, from this process."""
    from dramatiq.brokers.redis import RedisBroker

    from reminders import actors, db, scheduler
    from reminders.config import load_settings
    from reminders.sms import ConsoleProvider

    os.environ.update(
        REMINDERS_DATABASE_URL=url,
        REMINDERS_REDIS_URL=redis_url,
        REMINDERS_SECRET_KEY=SECRET_KEY,
        REMINDERS_SMS_PROVIDER="console",
    )
    db.reset()
    broker = RedisBroker(url=redis_url)  # type: ignore[no-untyped-call]
    actors.configure(
        load_settings(), broker=broker, provider=ConsoleProvider(sys.stderr), rate_limit=False
    )
    try:
        return len(scheduler.tick())
    finally:
        broker.close()


def run_noop(redis_url: str, count: int, threads: int) -> NoopResult:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    broker = RedisBroker(url=redis_url)  # type: ignore[no-untyped-call]
    try:
        for number in range(count):
            broker.enqueue(
                dramatiq.Message(
                    queue_name=NOOP_QUEUE,
                    actor_name="noop",
                    args=(number,),
                    kwargs={},
                    options={},
                )
            )
    finally:
        broker.close()
    key = f"dramatiq:{NOOP_QUEUE}.msgs"
    start = time.monotonic()
    process = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--noop-worker",
            "--noop-redis-url",
            redis_url,
            "--threads",
            str(threads),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise SetupError("the no-op worker did not start")
        ready = time.monotonic()
        deadline = start + max(60.0, count / 50)
        while int(client.hlen(key)) > 0:
            if time.monotonic() > deadline:
                raise SetupError("the no-op worker did not finish in time")
            time.sleep(0.01)  # polling another process's progress
        done = time.monotonic()
        cpu, rss = cpu_seconds(process.pid, tree=True), peak_rss_mib(process.pid)
    finally:
        stop_process(process)
        client.flushdb()
    return NoopResult(
        count=count,
        seconds_from_start=done - start,
        seconds_from_ready=done - ready,
        rate_from_start=count / (done - start),
        rate_from_ready=count / (done - ready),
        cpu_ms_per_msg=cpu / count * 1000,
        peak_rss_mib=rss,
    )


@dataclass
class Options:
    url: str
    redis_url: str
    noop_redis_url: str
    threads: int
    send_rate: str
    timeout: float | None
    quiet: float


def run_send(
    options: Options,
    count: int,
    standin: StandIn,
    *,
    profile_to: Path | None = None,
) -> SendResult:
    from reminders import db

    now = dt.datetime.now(dt.UTC)
    client = redis.Redis.from_url(options.redis_url)
    client.flushdb()
    err.print(f"[bold]{count:,} reminders[/bold]: preparing the database...")
    os.environ["REMINDERS_DATABASE_URL"] = options.url
    os.environ["REMINDERS_SECRET_KEY"] = SECRET_KEY
    prepare_database(options.url, count, now)
    queued = enqueue_due(options.url, options.redis_url)
    if queued != count:
        raise SetupError(f"the tick queued {queued} of {count} reminders")
    standin.ask("reset")
    engine = db.get_engine()
    wait_for_quiet(options.quiet)
    env = worker_env(options.url, options.redis_url, standin, options.send_rate)
    command = [sys.executable, "-m", "reminders", "worker", "--threads", str(options.threads)]
    log = open(Path(os.devnull), "w")  # noqa: SIM115 (closed below)
    stderr_lines: collections.deque[str] = collections.deque(maxlen=50)
    pg_before, redis_before = cpu_by_pid("postgres"), cpu_by_pid("redis-server")
    standin_before = standin.cpu()
    machine_before, self_before = machine_busy_seconds(), sum(os.times()[:2])
    start_wall, start = time.time(), time.monotonic()
    process = subprocess.Popen(
        command, env=env, cwd=WORKDIR, stdout=log, stderr=subprocess.PIPE, text=True
    )
    reader = threading.Thread(target=_drain, args=(process.stderr, stderr_lines), daemon=True)
    reader.start()
    spy: subprocess.Popen[bytes] | None = None
    if profile_to is not None:
        spy = start_py_spy(process.pid, profile_to)
    try:
        final, cpu, rss, user_sys = 0, 0.0, 0.0, (0.0, 0.0)
        timeout = options.timeout or max(120.0, count / 20)
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task("sending" + (" (profiled)" if spy else ""), total=count)
            while final < count and time.monotonic() - start < timeout:
                if process.poll() is not None:
                    raise SetupError(
                        f"the worker exited with {process.returncode}: "
                        + "".join(stderr_lines)[-2000:]
                    )
                time.sleep(0.1)  # polling another process's progress in the database
                final = final_count(engine)
                user_sys, rss = cpu_times(process.pid, tree=True), peak_rss_mib(process.pid)
                cpu = sum(user_sys)
                bar.update(task, completed=final)
        done = time.monotonic()
        machine = machine_busy_seconds() - machine_before
        bench_cpu = sum(os.times()[:2]) - self_before
    finally:
        if spy is not None:
            stop_process(spy, sig=signal.SIGINT)  # py-spy writes its output on SIGINT
        exit_code = stop_process(process)
        reader.join(5)
        log.close()
    pg_cpu = cpu_since(pg_before, "postgres")  # every backend: other sessions' too
    redis_cpu = cpu_since(redis_before, "redis-server")
    standin_cpu = standin.cpu() - standin_before
    ours = cpu + pg_cpu + redis_cpu + standin_cpu + bench_cpu
    stats = standin.ask("stats")
    rows = bench_rows(engine)
    sent = rows["statuses"].get("sent", 0)
    first: dt.datetime | None = rows["first"]
    last: dt.datetime | None = rows["last"]
    startup = (first.timestamp() - start_wall) if first else float("nan")
    seconds = (last.timestamp() - start_wall) if last else float("nan")
    steady = (last - first).total_seconds() if first and last else float("nan")
    idle_cpu = startup_cpu(options, standin)
    return SendResult(
        count=count,
        queued=queued,
        sent=sent,
        statuses=rows["statuses"],
        segments=rows["segments"],
        lost=count - sum(rows["statuses"].get(s, 0) for s in FINAL),
        posts=int(stats["posts"]),
        extra_posts=int(stats["extra_posts"]),
        posts_minus_sent=int(stats["posts"]) - sent,
        duplicated_refs=list(stats["duplicated_refs"]),
        startup_seconds=startup,
        seconds=seconds,
        steady_seconds=steady,
        final_seconds=done - start,
        rate=sent / seconds if seconds > 0 else 0.0,
        steady_rate=(sent - 1) / steady if steady > 0 else 0.0,
        worker_cpu_seconds=cpu,
        worker_user_seconds=user_sys[0],
        worker_sys_seconds=user_sys[1],
        worker_cpu_idle_seconds=idle_cpu,
        cpu_ms_per_sms=cpu / max(sent, 1) * 1000,
        steady_cpu_ms_per_sms=max(cpu - idle_cpu, 0.0) / max(sent, 1) * 1000,
        peak_rss_mib=rss,
        worker_exit=exit_code,
        postgres_cpu=pg_cpu,
        redis_cpu=redis_cpu,
        standin_cpu=standin_cpu,
        bench_cpu=bench_cpu,
        machine_busy_pct=100 * machine / ((done - start) * (os.cpu_count() or 1)),
        other_cpu=max(machine - ours, 0.0),
    )


_idle_cpu_cache: dict[str, float] = {}


def startup_cpu(options: Options, standin: StandIn) -> float:
    """CPU a worker spends starting up with nothing to do (imports, connections): measured once
    on an empty queue, to give the CPU per SMS without it."""
    if "cpu" not in _idle_cpu_cache:
        client = redis.Redis.from_url(options.redis_url)
        client.flushdb()
        env = worker_env(options.url, options.redis_url, standin, options.send_rate)
        process = subprocess.Popen(
            [sys.executable, "-m", "reminders", "worker", "--threads", str(options.threads)],
            env=env,
            cwd=WORKDIR,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(3.0)  # long enough to import, connect and wait on the empty queue
            _idle_cpu_cache["cpu"] = cpu_seconds(process.pid, tree=True)
        finally:
            stop_process(process)
    return _idle_cpu_cache["cpu"]


def _drain(stream: IO[str] | None, keep: collections.deque[str]) -> None:
    if stream is None:
        return
    for line in stream:
        keep.append(line)


# --------------------------------------------------------------------------------------------
# Profiling with py-spy


def start_py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        raise SetupError("py-spy is not installed in the venv (pip install py-spy)")
    output.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            "250",
            "--gil",
            "--output",
            str(output),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


AREAS = (
    ("sqlalchemy", "SQLAlchemy"),
    ("psycopg", "psycopg"),
    ("vonage", "vonage SDK"),
    ("requests/", "requests"),
    ("urllib3", "urllib3"),
    ("ssl.py", "ssl"),
    ("http/client", "http.client"),
    ("pydantic", "pydantic"),
    ("dramatiq", "dramatiq"),
    ("redis/", "redis-py"),
    ("babel", "babel"),
    ("jinja2", "jinja2"),
    ("reminders/", "reminders"),
    ("logging", "logging"),
)


INCLUSIVE_WORDS = (
    "Session.commit",
    "Session.get",
    "Session.scalar",
    "Session.execute",
    "Pool.connect",
    "RateLimiter.wait",
    "requests/sessions.py:Session.request",
    "sms.py:Sms.send",
    "Consumer.__next__",
    "process_message",
    "texts.py:render",
    "_bootstrap>:_load",
)


def _frame_key(frame: str) -> tuple[str, str]:
    """('function (file)', area) of a py-spy frame `function (path/file.py:line)`."""
    name, _, where = frame.rpartition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(path.split("site-packages/")[-1].split("/")[-2:])
    area = next((label for needle, label in AREAS if needle in path), "other")
    return f"{short}:{name}", area


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares per function, and self shares per library, of CPU samples."""
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = [f for f in stack.split(";") if " (" in f and f.endswith(")")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        n = int(number)
        samples += n
        keys = [_frame_key(f) for f in frames]
        self_counts[keys[-1][0]] += n
        areas[keys[-1][1]] += n
        for key in dict.fromkeys(k for k, _ in keys):
            total_counts[key] += n
    if not samples:
        return {"samples": 0}

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / samples, 1)) for k, v in counter.most_common(top)]

    inclusive = [
        (key, round(100 * n / samples, 1))
        for key, n in total_counts.most_common()
        if n / samples <= 0.75  # not the thread and worker loop frames around everything
        and ("reminders/" in key or any(word in key for word in INCLUSIVE_WORDS))
    ]
    return {
        "samples": samples,
        "self": share(self_counts),
        "inclusive": inclusive[: top + 10],
        "areas": share(areas),
    }


# --------------------------------------------------------------------------------------------
# Reporting


def _mark(ok: bool) -> str:
    return "yes" if ok else "NO"


def print_report(results: list[SendResult], profile: dict[str, Any] | None, out: TextIO) -> None:
    console = Console(file=out, width=150)
    table = Table(title="reminders worker --threads 8: real SDK -> local HTTPS stand-in, via Redis")
    table.add_column("")
    for r in results:
        table.add_column(f"{r.count:,} reminders", justify="right")
    table.add_column("target", justify="right")

    def row(label: str, values: list[str], target: str = "") -> None:
        table.add_row(label, *values, target)

    row("sent / statuses", [f"{r.sent:,} {r.statuses}" for r in results])
    row(
        "msgs/s, worker start -> last SMS",
        [f"{r.rate:,.0f}" for r in results],
        f">= {TARGET_RATE:.0f}",
    )
    row("  worker start -> first SMS (s)", [f"{r.startup_seconds:.2f}" for r in results])
    row(
        "  first -> last SMS (s) / msgs/s",
        [f"{r.steady_seconds:.2f} / {r.steady_rate:,.0f}" for r in results],
    )
    row("  worker start -> all final (s, polled)", [f"{r.final_seconds:.2f}" for r in results])
    row(
        "worker CPU per SMS (ms)",
        [f"{r.cpu_ms_per_sms:.2f}" for r in results],
        f"<= {TARGET_CPU_MS:.1f}",
    )
    row(
        "  without startup CPU (ms)",
        [
            f"{r.steady_cpu_ms_per_sms:.2f} ({r.worker_cpu_idle_seconds:.2f} s startup)"
            for r in results
        ],
    )
    row(
        "  worker CPU total (s): user + sys",
        [
            f"{r.worker_cpu_seconds:.2f} = {r.worker_user_seconds:.2f} + {r.worker_sys_seconds:.2f}"
            for r in results
        ],
    )
    row(
        "worker peak RSS, VmHWM (MiB)",
        [f"{r.peak_rss_mib:.1f}" for r in results],
        f"< {TARGET_RSS_MIB:.0f}",
    )
    row("duplicates (extra POSTs per client-ref)", [f"{r.extra_posts}" for r in results], "0")
    row(
        "  POSTs - rows sent",
        [f"{r.posts:,} - {r.sent:,} = {r.posts_minus_sent}" for r in results],
        "0",
    )
    row("lost (rows not final)", [f"{r.lost}" for r in results], "0")
    row("SMS parts (segments)", [f"{r.segments:,}" for r in results])
    row("worker exit code after SIGTERM", [f"{r.worker_exit}" for r in results], "0")
    row(
        "no-op dramatiq actor msgs/s, start/ready",
        [
            f"{r.noop.rate_from_start:,.0f} / {r.noop.rate_from_ready:,.0f}" if r.noop else "-"
            for r in results
        ],
    )
    row(
        "  no-op CPU per msg (ms), peak RSS (MiB)",
        [
            f"{r.noop.cpu_ms_per_msg:.2f}, {r.noop.peak_rss_mib:.1f}" if r.noop else "-"
            for r in results
        ],
    )
    row(
        "CPU s in the run: PostgreSQL (all) / Redis / stand-in",
        [f"{r.postgres_cpu:.1f} / {r.redis_cpu:.1f} / {r.standin_cpu:.1f}" for r in results],
    )
    row(
        "machine busy (all cores) / CPU s not ours",
        [f"{r.machine_busy_pct:.0f}% / {r.other_cpu:.1f}" for r in results],
    )
    row(
        "msgs/s vs Twilio sample (106/s)",
        [f"{r.rate / BASELINE_RATE:.2f}x" for r in results],
        ">= 5x",
    )
    row(
        "CPU/SMS vs Twilio sample (9.7 ms)",
        [f"{r.cpu_ms_per_sms / BASELINE_CPU_MS:.2f}x" for r in results],
        "<= 0.21x",
    )
    row(
        "targets met",
        [", ".join(f"{k} {_mark(v)}" for k, v in r.checks().items()) for r in results],
    )
    console.print(table)
    for r in results:
        if r.duplicated_refs:
            console.print(f"{r.count}: duplicated client-refs (first 20): {r.duplicated_refs}")
    if profile and profile.get("samples"):
        console.print(
            f"\n[bold]py-spy profile of the worker ({profile['count']:,} reminders, "
            f"{profile['samples']:,} samples holding the GIL, at 250 Hz)"
        )
        areas = Table(title="self time by library (share of CPU samples)")
        areas.add_column("library")
        areas.add_column("%", justify="right")
        for name, share in profile["areas"]:
            areas.add_row(name, f"{share:.1f}")
        console.print(areas)
        hot = Table(title="hottest functions, self time")
        hot.add_column("function")
        hot.add_column("%", justify="right")
        for name, share in profile["self"]:
            hot.add_row(name, f"{share:.1f}")
        console.print(hot)
        inclusive = Table(title="inclusive time (reminders, vonage, dramatiq, ORM frames)")
        inclusive.add_column("function")
        inclusive.add_column("%", justify="right")
        for name, share in profile["inclusive"]:
            inclusive.add_row(name, f"{share:.1f}")
        console.print(inclusive)


# --------------------------------------------------------------------------------------------
# Main


def parse_counts(value: str) -> list[int]:
    counts = [int(part.replace("_", "")) for part in value.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("counts are positive numbers, e.g. 2000,20000")
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--counts", type=parse_counts, default=parse_counts("2000,20000"))
    parser.add_argument("--threads", type=int, default=8, help="worker threads")
    parser.add_argument(
        "--send-rate",
        default="10000",
        help="REMINDERS_SEND_RATE for the worker (the settings allow <= 10000)",
    )
    parser.add_argument("--database", default=DEFAULT_DATABASE)
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS,
        help="Redis for the reminders (db 14 or 15 only: it is flushed)",
    )
    parser.add_argument(
        "--noop-redis-url",
        default=DEFAULT_NOOP_REDIS,
        help="Redis for the no-op actor (db 14 or 15 only: it is flushed)",
    )
    parser.add_argument("--no-noop", action="store_true", help="skip the no-op actor runs")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for every row to be final (default: by count)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="also profile one run of the largest count with py-spy",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=30.0,
        metavar="PERCENT",
        help="before each run, wait (up to 10 min) until the whole machine is less busy than "
        "this (0: do not wait)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--standin-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--noop-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    options = Options(
        url=database_url(args.database),
        redis_url=args.redis_url,
        noop_redis_url=args.noop_redis_url,
        threads=args.threads,
        send_rate=args.send_rate,
        timeout=args.timeout,
        quiet=args.quiet,
    )
    check_redis_url(options.redis_url)
    check_redis_url(options.noop_redis_url)
    if options.redis_url == options.noop_redis_url:
        raise SetupError("--redis-url and --noop-redis-url must differ")
    err.print(
        f"database {make_url(options.url).render_as_string(hide_password=True)}, "
        f"Redis {options.redis_url} (no-op actor: {options.noop_redis_url})"
    )
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    err.print(f"load average {load} ({os.cpu_count()} cores)")
    byte_compile()  # once: every worker this run starts reads the same compiled modules
    standin = StandIn()
    results: list[SendResult] = []
    profile: dict[str, Any] | None = None
    try:
        for count in args.counts:
            result = run_send(options, count, standin)
            if not args.no_noop:
                err.print(f"{count:,} no-op messages...")
                wait_for_quiet(options.quiet)
                result.noop = run_noop(options.noop_redis_url, count, options.threads)
            results.append(result)
            err.print(
                f"{count:,}: {result.rate:,.0f} msgs/s, {result.cpu_ms_per_sms:.2f} ms "
                f"CPU/SMS, {result.peak_rss_mib:.0f} MiB, {result.duplicates} duplicates, "
                f"{result.lost} lost"
            )
        if args.profile is not None:
            count = max(args.counts)
            raw = args.profile / f"worker-{count}.txt"
            run_send(options, count, standin, profile_to=raw)
            profile = summarize_profile(raw) | {"count": count, "raw": str(raw)}
    finally:
        standin.close()
        for url in (options.redis_url, options.noop_redis_url):
            redis.Redis.from_url(url).flushdb()
        from reminders import db

        db.reset()
        if not args.keep:
            drop_database(options.url)
    if args.json:
        payload = {
            "results": [
                asdict(r)
                | {
                    "duplicates": r.duplicates,
                    "checks": r.checks(),
                    "vs_baseline": {
                        "rate": r.rate / BASELINE_RATE,
                        "cpu": r.cpu_ms_per_sms / BASELINE_CPU_MS,
                    },
                }
                for r in results
            ],
            "profile": profile,
            "baseline": {"rate": BASELINE_RATE, "cpu_ms": BASELINE_CPU_MS},
            "targets": {"rate": TARGET_RATE, "cpu_ms": TARGET_CPU_MS, "rss_mib": TARGET_RSS_MIB},
        }
        print(json.dumps(payload, indent=2, default=str))
    else:
        print_report(results, profile, sys.stdout)
    return 0 if all(all(r.checks().values()) for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.standin_server:
        return standin_server()
    if args.noop_worker:
        return noop_worker(args.noop_redis_url, args.threads)
    try:
        return run(args)
    except SetupError as exc:
        err.print(f"[red]setup failed:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
