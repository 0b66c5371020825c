"""Replies benchmark: signed Vonage inbound SMS and patient-link GETs, offered open loop.

    .venv/bin/python bench/replies.py [--seconds 30] [--inbound-rate 300] [--link-rate 200]
                                      [--patients 12000] [--api-workers 2] [--profile DIR]
                                      [--json]

Set-up: a fresh PostgreSQL database (`reminders_bench_replies`, dropped first; server and
credentials from `REMINDERS_BENCH_DATABASE_URL`, default
`postgresql+psycopg://postgres@127.0.0.1:5432/`), migrated with `reminders migrate`, one clinic
made with `reminders clinic add ... --sender +33939000000 --json`, then, in bulk SQL, N patients
(one mobile number each), one appointment each (2 to 9 days ahead, with its link token computed
by `reminders.security.link_token`), its `72h` reminder already `sent` to the patient (so a reply
applies to it) and its `24h:unconfirmed` reminder still planned (so a cancel drops it). Redis db 13
is flushed. reminders' modules are byte-compiled, as an installed package's are
(`common.byte_compile`). Then ONE `reminders api` (`--api-workers N`: `reminders api --workers N`,
its CPU counted over all its processes) and ONE `reminders worker --threads 8` start with the
vonage provider (the worker at nice 5, `--worker-nice`: a third of the API's share of a busy CPU,
as deploy/ gives it, since a webhook's answer cannot wait and a reply's application can), the
worker sending to a local HTTPS Vonage stand-in (`tests/vonage_standin.py`, run in a child process
so its TLS work does not share this process's GIL; it counts POSTs per `client-ref`), so every
acknowledgement really goes out.

Phase 1: signed inbound SMS (form POSTs, SMS API fields, `sig` as Vonage computes it) offered
open loop at `--inbound-rate` for `--seconds`: each a distinct patient and `messageId`, the texts
"1", "2", "OUI", "ANNULER", "STOP" and "hello?" in turn. Each request is sent at its planned
time whatever the earlier ones are doing (asyncio + aiohttp, a bounded connection pool), and its
latency is response time minus PLANNED send time, so queueing anywhere counts (requests
beyond the connection pool wait for a connection on the clock). The webhook only stores a reply
and answers 200 `received`; the worker applies it. So the bench then waits until every reply
is applied and every answer SMS is final (the drain, timed), and checks "applied exactly once":
every request 200 `received`, one inbound row per messageId with the result its text means
(read from the database), the expected events by type and no appointment with two
`appointment.confirmed` or two `appointment.cancelled`, the expected answers by kind all sent,
one stand-in POST per answer. It prints how long application lagged behind receipt
(`applied_at - received_at`: p50, p99, max) and the worker's CPU per reply from the phase's
start to the end of the drain. Then it re-sends `--duplicates` of them (same messageId, signed
again) and checks that all get `duplicate` and that nothing in the database or at the stand-in
changes.

Phase 2: `GET /c/{token}` offered open loop at `--link-rate` for `--seconds`, over all patients'
tokens, with an `X-Forwarded-For` address per 20 requests (the API trusts 127.0.0.1 as a proxy),
so the per-address limiter (60 a minute) lets all of them through.

Before each phase 40 concurrent `GET /readyz` open the client's connections and the API's
database pool (not measured); before phase 2 the tables phase 1 changed are vacuumed and
analysed (so autovacuum does not start during it). Printed per phase: offered and achieved
rates, statuses, latency p50/p90/p99/max in ms against the target (inbound p99 < 100 ms, link
GET p99 < 50 ms) and per 5 s window, how late the generator itself sent (its own lag), CPU
seconds of the API, the worker, PostgreSQL (the backends of this database), Redis, the
stand-in and the bench, the machine's busy share, the CPU of other processes and the load
average (other benchmarks may be running). `--profile DIR` also records the API with two
`py-spy record --format raw --nonblocking` during each phase (DIR/<phase>.cpu.raw: threads
holding the GIL; DIR/<phase>.wall.raw: every thread, idle included) and prints where the CPU
goes and where request handlers wait.

`REMINDERS_SEND_RATE` is 10000, the highest value the settings accept (the brief's 100000 is
refused with exit code 2): the cap is lifted, the Redis-backed limiter still runs per SMS.

Exit code 0 when every target is met and every check passes, 1 otherwise, 2 when set-up failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import httpx
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
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SetupError,
    bench_database_url,
    byte_compile,
    drop_database,
    free_port,
    machine_busy_seconds,
    recreate_database,
    stat_fields,
)

ROOT = Path(__file__).resolve().parent.parent
REMINDERS = [sys.executable, "-m", "reminders"]
DATABASE = "reminders_bench_replies"
REDIS_URL = "redis://127.0.0.1:6379/13"
SECRET_KEY = "bench-replies-secret-key-not-for-production-0123456789"
API_KEY, API_SECRET = "benchkey", "bench-api-secret"
SIGNATURE_SECRET = "bench-signature-secret"
SIGNATURE_METHOD = "sha256"
SENDER = "+33939000000"
SEND_RATE = "10000"  # the settings' maximum
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGET_INBOUND_P99_MS = 100.0
TARGET_LINK_P99_MS = 50.0
TEXTS = ("1", "2", "OUI", "ANNULER", "STOP", "hello?")
ANSWER_KINDS = ("ack", "opted_out", "opted_in", "unclear")


@dataclass(frozen=True)
class Expected:
    result: str  # the result recorded on its inbound row once applied
    event: str  # the one event it writes
    answer: str  # the kind of the one SMS it sends back


EXPECTED = {
    "1": Expected("confirm:applied", "appointment.confirmed", "ack"),
    "OUI": Expected("confirm:applied", "appointment.confirmed", "ack"),
    "2": Expected("cancel:applied", "appointment.cancelled", "ack"),
    "ANNULER": Expected("cancel:applied", "appointment.cancelled", "ack"),
    "STOP": Expected("opt_out:applied", "patient.opted_out", "opted_out"),
    "hello?": Expected("needs_attention", "reply.needs_attention", "unclear"),
}

err = Console(stderr=True)


# --------------------------------------------------------------------------------------------
# /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc (0 when it is gone)."""
    try:
        fields = stat_fields(pid)
    except (OSError, ValueError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    """The children of a process, theirs, and so on (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    found += [int(child), *descendants(int(child))]
    return found


def cpu_of_named(name: str) -> dict[int, float]:
    """CPU seconds of every process whose command is `name` (postgres, redis-server)."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    found[int(entry.name)] = cpu_seconds(int(entry.name))
    return found


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def wait_for_quiet(busy_pct: float | None, longest: float) -> float:
    """With `busy_pct`, waits (at most `longest` seconds) until the whole machine was less
    than `busy_pct` % busy over 3 s (other benchmarks may be running); returns the seconds
    waited."""
    if busy_pct is None:
        return 0.0
    start = time.monotonic()
    cores = os.cpu_count() or 1
    with err.status(f"waiting for the machine to be under {busy_pct:g}% busy..."):
        while time.monotonic() - start < longest:
            before = machine_busy_seconds()
            time.sleep(3.0)  # sampling the machine's CPU use
            if 100 * (machine_busy_seconds() - before) / (3.0 * cores) < busy_pct:
                break
    return time.monotonic() - start


# --------------------------------------------------------------------------------------------
# Database


def database_url() -> str:
    return bench_database_url(DATABASE)


def connections_to(url: str) -> int:
    """Sessions connected to the benchmark's database (another run still using it)."""
    admin = create_engine(make_url(url).set(database="postgres"))
    try:
        with admin.connect() as connection:
            found = connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = :name "
                    "AND pid <> pg_backend_pid()"
                ),
                {"name": DATABASE},
            )
    except Exception as exc:
        raise SetupError(f"PostgreSQL: {exc}") from exc
    finally:
        admin.dispose()
    return int(found or 0)


class RunLock:
    """One run at a time: a key in Redis db 13 (refreshed while the run lasts, gone 60 s after
    a crash), and no session left on the database, before Redis db 13 is flushed and the
    database dropped."""

    KEY = "bench-replies:running"

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(REDIS_URL)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time()}"
        self._stop = threading.Event()
        try:
            if not self.client.set(self.KEY, self.token, nx=True, ex=60):
                raise SetupError(
                    f"another bench/replies.py is running ({self.client.get(self.KEY)!r} holds "
                    f"{self.KEY} in {REDIS_URL}); try again when it is done"
                )
            busy = connections_to(url)
            if busy:
                self.client.delete(self.KEY)
                raise SetupError(
                    f"{busy} sessions are connected to {DATABASE}: another run is using it"
                )
            self.client.flushdb()  # also drops the key: set it again
            self.client.set(self.KEY, self.token, ex=60)
        except redis.RedisError as exc:
            raise SetupError(f"Redis {REDIS_URL}: {exc}") from exc
        self._thread = threading.Thread(target=self._refresh, daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(20):
            with contextlib.suppress(redis.RedisError):
                self.client.set(self.KEY, self.token, ex=60)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(redis.RedisError):
            if self.client.get(self.KEY) == self.token.encode():
                self.client.delete(self.KEY)
        self.client.close()


def patient_phone(number: int) -> str:
    """Patient `number`'s mobile number, E.164 (+33 6 ...)."""
    return f"+336{number:08d}"


SEED_SQL = (
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
    SELECT t.i, :clinic, 'A' || t.i, t.i,
           date_trunc('hour', CAST(:now AS timestamptz)) + interval '2 days'
               + make_interval(mins => 15 * (t.i % 672)),
           (ARRAY[15, 20, 30, 45])[1 + t.i % 4],
           'Dr ' || (ARRAY['Martin', 'Bernard', 'Dubois', 'Nguyen', 'Moreau'])[1 + t.i % 5],
           'Cabinet ' || (1 + t.i % 4), 'consultation', 'booked', 'unconfirmed',
           CAST(:now AS timestamptz) - interval '10 days', false, t.token
    FROM (
        SELECT u.token, CAST(u.i AS int) AS i
        FROM unnest(CAST(:tokens AS text[])) WITH ORDINALITY AS u(token, i)
    ) AS t
    """,
    """
    INSERT INTO reminders (id, clinic_id, appointment_id, phone_e164, kind, rule,
                           appointment_starts_at, due_at, send_by, status, attempts, claimed_at,
                           sent_at, provider_message_id, text, encoding, segments, price)
    SELECT a.id * 2 - 1, a.clinic_id, a.id, p.phone_e164, 'reminder', '72h', a.starts_at,
           s.sent_at, a.starts_at - interval '2 hours', 'sent', 1, s.sent_at,
           s.sent_at + interval '2 s', upper(substr(md5('m' || a.id), 1, 16)),
           'Rappel de rendez-vous', 'GSM-7', 1, 0.0333
    FROM appointments AS a JOIN patients AS p ON p.id = a.patient_id
    CROSS JOIN LATERAL (
        SELECT CAST(:now AS timestamptz) - make_interval(secs => 60 + a.id % 7200) AS sent_at
    ) AS s
    UNION ALL
    SELECT a.id * 2, a.clinic_id, a.id, p.phone_e164, 'reminder', '24h:unconfirmed', a.starts_at,
           a.starts_at - interval '24 hours', a.starts_at - interval '2 hours', 'planned', 0,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL
    FROM appointments AS a JOIN patients AS p ON p.id = a.patient_id
    """,
    "SELECT setval('patients_id_seq', (SELECT max(id) FROM patients))",
    "SELECT setval('appointments_id_seq', (SELECT max(id) FROM appointments))",
    "SELECT setval('reminders_id_seq', (SELECT max(id) FROM reminders))",
)


def seed(engine: Engine, clinic_id: int, count: int, now: dt.datetime) -> list[str]:
    """`count` patients, appointments and reminders; returns the link tokens (index i-1 is
    appointment `A{i}`)."""
    from reminders.security import link_token

    secret = SECRET_KEY.encode()
    tokens = [link_token(secret, clinic_id, f"A{i}") for i in range(1, count + 1)]
    if len(set(tokens)) != count:
        raise SetupError("two appointments got the same link token")
    with engine.begin() as connection:
        for statement in SEED_SQL:
            connection.execute(
                text(statement), {"clinic": clinic_id, "count": count, "now": now, "tokens": tokens}
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM (ANALYZE) patients, appointments, reminders"))
    return tokens


def rows(engine: Engine, sql: str) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql)).all()]


def scalar(engine: Engine, sql: str) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text(sql)) or 0)


def counted(engine: Engine, sql: str) -> dict[str, int]:
    """A `SELECT key, count(*) ... GROUP BY` as a dict (several key columns joined by `/`)."""
    return {"/".join(str(v) for v in row[:-1]): int(row[-1]) for row in rows(engine, sql)}


def our_backends(engine: Engine) -> list[int]:
    """PostgreSQL backends connected to the benchmark's database."""
    return [
        int(row[0])
        for row in rows(engine, f"SELECT pid FROM pg_stat_activity WHERE datname = '{DATABASE}'")
    ]


# --------------------------------------------------------------------------------------------
# Child processes: the stand-in, the API, the worker, py-spy


class StandIn:
    """The Vonage stand-in in a child process (`replies.py --standin-server`), driven by lines
    on its stdin, answering JSON lines."""

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

    def stats(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("stats\n")
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
                self.process.terminate()
                self.process.wait()


def standin_server() -> int:
    """`--standin-server`: runs the stand-in (checking the API credentials) and answers `stats`
    on stdin with the POSTs counted per `client-ref`."""
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
        print(
            json.dumps({"rest_host": server.rest_host, "ca_bundle": str(server.ca_bundle)}),
            flush=True,
        )
        for line in sys.stdin:
            if line.strip() == "stats":
                with lock:
                    stats = {
                        "posts": server.posts,
                        "refs": len(refs),
                        "extra_posts": sum(n - 1 for n in refs.values() if n > 1),
                        "without_ref": refs.get("", 0),
                    }
                print(json.dumps(stats), flush=True)
    return 0


def service_env(url: str, standin: StandIn) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(
        REMINDERS_DATABASE_URL=url,
        REMINDERS_REDIS_URL=REDIS_URL,
        REMINDERS_SECRET_KEY=SECRET_KEY,
        REMINDERS_SMS_PROVIDER="vonage",
        REMINDERS_VONAGE_API_KEY=API_KEY,
        REMINDERS_VONAGE_API_SECRET=API_SECRET,
        REMINDERS_VONAGE_SIGNATURE_SECRET=SIGNATURE_SECRET,
        REMINDERS_VONAGE_SIGNATURE_METHOD=SIGNATURE_METHOD,
        REMINDERS_VONAGE_REST_HOST=standin.rest_host,
        REMINDERS_SEND_RATE=SEND_RATE,
        REMINDERS_TRUSTED_PROXIES="127.0.0.1",
        REQUESTS_CA_BUNDLE=standin.ca_bundle,
        PYTHONUNBUFFERED="1",
    )
    return env


def cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    """Runs `reminders ARGS --json` and returns its JSON object."""
    done = subprocess.run(
        [*REMINDERS, *args, "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise SetupError(f"`reminders {' '.join(args)}` exited {done.returncode}: {done.stderr}")
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


class Service:
    """A `reminders` process whose stderr goes to a log file."""

    def __init__(
        self, name: str, args: Sequence[str], env: dict[str, str], logs: Path, nice: int = 0
    ) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*REMINDERS, *args],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        """Its CPU seconds and its live children's (`reminders api --workers N`)."""
        pid = self.process.pid
        return cpu_seconds(pid) + sum(cpu_seconds(child) for child in descendants(pid))

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise SetupError(f"{self.name} exited with {self.process.returncode}: {self.tail()}")

    def tail(self, size: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-size:]
        return ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it does not stop in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return int(self.process.returncode)


def wait_until_up(service: Service, base_url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        service.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/readyz", timeout=1, trust_env=False).status_code == 200:
                return
        time.sleep(0.1)  # polling another process's start-up
    raise SetupError(f"{service.name} did not answer /readyz in {seconds:.0f} s: {service.tail()}")


def wait_until_idle(service: Service, seconds: float = 30.0) -> None:
    """Until a process that just started stops using CPU (imports and connections done)."""
    deadline = time.monotonic() + seconds
    last = service.cpu()
    while time.monotonic() < deadline:
        time.sleep(0.5)  # sampling the process's CPU time
        service.check_alive()
        now = service.cpu()
        if now - last < 0.03:
            return
        last = now


class Spy:
    """Two `py-spy record --format raw --nonblocking` attached to a process until stopped
    (SIGINT): `<name>.cpu.raw` samples only threads holding the GIL (where CPU goes),
    `<name>.wall.raw` every thread, idle ones included (where requests wait)."""

    def __init__(self, pid: int, directory: Path, name: str, *, children: bool = False) -> None:
        self.cpu_raw = directory / f"{name}.cpu.raw"
        self.wall_raw = directory / f"{name}.wall.raw"
        self.log = (directory / f"{name}.py-spy.log").open("wb")
        spy = str(Path(sys.executable).parent / "py-spy")
        common = ["record", "--pid", str(pid), "--rate", "100", "--format", "raw"]
        if children:
            common.append("--subprocesses")
        self.processes = [
            subprocess.Popen(
                [spy, *common, "--nonblocking", *extra, "--output", str(output)],
                stdout=self.log,
                stderr=subprocess.STDOUT,
            )
            for extra, output in ((["--gil"], self.cpu_raw), (["--idle"], self.wall_raw))
        ]
        time.sleep(1.0)  # py-spy attaches

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.log.close()


def _frame_path(frame: str) -> str:
    """`function (path:line)` -> path (py-spy shortens it to the module's path)."""
    return frame.rsplit(" (", 1)[-1].rstrip(")").rsplit(":", 1)[0]


def _area(frame: str) -> str:
    """Where a frame's code lives: reminders/x.py, a third-party package, or stdlib."""
    path = _frame_path(frame)
    if path.startswith("reminders/"):
        return path
    top = path.split("/", 1)[0].removesuffix(".py")
    if path.startswith("<frozen") or top in sys.stdlib_module_names:
        return "stdlib"
    return top


def _short(frame: str, line: bool = False) -> str:
    function, _, where = frame.rpartition(" (")
    where = where.rstrip(")")
    return f"{where if line else where.rsplit(':', 1)[0]}:{function}"


def _stacks(raw: Path) -> Iterator[tuple[list[str], int]]:
    if not raw.exists():
        return
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f]
        if frames and number.isdigit():
            yield frames, int(number)


def _shares(counter: collections.Counter[str], total: int, n: int) -> list[tuple[str, float]]:
    return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(n)] if total else []


HANDLERS = ("inbound (reminders/webhooks.py", "show (reminders/links.py")


def summarise_profile(spy: Spy, top: int = 15) -> dict[str, Any]:
    """CPU (GIL held): self shares per function and per code area, inclusive shares of the
    reminders functions. Wall (all threads): in request handlers, where the time goes, by the
    deepest reminders line and the function running (or waiting) below it."""
    self_count: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    cpu = 0
    for frames, count in _stacks(spy.cpu_raw):
        cpu += count
        self_count[_short(frames[-1])] += count
        areas[_area(frames[-1])] += count
        for name in {_short(f) for f in frames if f.endswith(")") and "(reminders/" in f}:
            inclusive[name] += count
    waits: collections.Counter[str] = collections.Counter()
    wall = 0
    for frames, count in _stacks(spy.wall_raw):
        if not any(h in f for f in frames for h in HANDLERS):
            continue
        wall += count
        ours = [f for f in frames if "(reminders/" in f]
        waits[f"{_short(ours[-1], line=True)} -> {_short(frames[-1])}"] += count
    return {
        "cpu_samples": cpu,
        "cpu_self": _shares(self_count, cpu, top),
        "cpu_areas": _shares(areas, cpu, top),
        "cpu_inclusive_reminders": _shares(inclusive, cpu, top),
        "handler_wall_samples": wall,
        "handler_wall": _shares(waits, wall, top),
    }


# --------------------------------------------------------------------------------------------
# Open-loop load


@dataclass(frozen=True)
class Planned:
    """One request of a phase, built before the phase starts."""

    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]
    label: str  # the SMS text (inbound), or "" (links)
    message_id: str = ""  # inbound: its messageId


@dataclass
class Outcome:
    status: int  # 0: no response (error)
    latency: float  # seconds from the planned send time to the response
    lag: float  # seconds from the planned send time to the actual send
    at: float  # the planned send time, in seconds from the phase's start
    result: str | None = None  # the webhook's `result`
    error: str | None = None


@dataclass
class Run:
    outcomes: list[Outcome]
    seconds: float  # from the first planned send to the last response
    send_seconds: float  # from the first planned send to the last actual send


def _result_of(content_type: str, body: bytes) -> str | None:
    if not content_type.startswith("application/json"):
        return None
    with contextlib.suppress(ValueError):
        decoded = json.loads(body)
        if isinstance(decoded, dict):
            return str(decoded.get("result") or decoded.get("status"))
    return None


async def _warm_up(session: aiohttp.ClientSession, count: int = 40) -> None:
    """Opens connections (client side, and the API's database pool): not measured."""

    async def one() -> None:
        async with session.get("/readyz") as response:
            await response.read()

    await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)


async def open_loop(
    base_url: str,
    requests: Sequence[Planned],
    rate: float,
    connections: int,
    timeout_seconds: float,
    on_done: Callable[[], None],
) -> Run:
    """Sends each request at its planned time (start + i / rate), whatever the others do.

    The client is aiohttp: it shares the machine's two cores with the API, the worker and
    PostgreSQL, and costs 0.4-0.6 ms of CPU per request here, where httpx cost 1.4 ms per link
    GET and 4.1 ms per inbound request once responses lagged, a whole core at 300/s."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    async with aiohttp.ClientSession(
        base_url,
        connector=connector,
        timeout=timeout,
        trust_env=False,
        skip_auto_headers=["User-Agent"],
    ) as session:
        await _warm_up(session)
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        last_send = start

        # Requests beyond the pool wait here (still on the clock) rather than in the client's
        # pool, whose queue costs the client CPU in proportion to its length.
        gate = asyncio.Semaphore(connections)

        async def one(index: int, request: Planned, planned: float) -> None:
            nonlocal last_send
            sent = loop.time()
            last_send = max(last_send, sent)
            at = planned - start
            try:
                async with (
                    gate,
                    session.request(
                        request.method, request.path, data=request.body, headers=request.headers
                    ) as response,
                ):
                    body = await response.read()
                outcome = Outcome(
                    response.status,
                    loop.time() - planned,
                    sent - planned,
                    at,
                    _result_of(response.headers.get("content-type", ""), body),
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = Outcome(
                    0,
                    loop.time() - planned,
                    sent - planned,
                    at,
                    error=f"{type(exc).__name__}: {exc}"[:120],
                )
            outcomes[index] = outcome
            on_done()

        tasks: list[asyncio.Task[None]] = []
        for index, request in enumerate(requests):
            planned = start + index / rate
            delay = planned - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, request, planned)))
        await asyncio.gather(*tasks)
        end = loop.time()
    done = [o for o in outcomes if o is not None]
    return Run(done, end - start, last_send - start)


def run_phase(
    description: str,
    base_url: str,
    requests: Sequence[Planned],
    rate: float,
    connections: int,
    timeout_seconds: float,
) -> Run:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=len(requests))

        def advance() -> None:
            bar.advance(task)

        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(
                open_loop(base_url, requests, rate, connections, timeout_seconds, advance)
            )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the generator then costs about 12% less CPU on the machine it
    shares with the API), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    if not values:
        return float("nan")
    rank = max(1, math.ceil(share / 100 * len(values)))
    return values[rank - 1]


@dataclass
class Usage:
    """CPU seconds spent during a phase by each part, and the machine's state."""

    api: float = 0.0
    worker: float = 0.0
    postgres: float = 0.0  # backends of the benchmark's database
    redis: float = 0.0  # the whole server (shared with other users)
    standin: float = 0.0
    bench: float = 0.0
    machine_busy_pct: float = 0.0  # all processes, all cores
    other: float = 0.0  # busy CPU seconds of processes not ours
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    waited_for_quiet: float = 0.0  # seconds waited before the phase (--wait-quiet)


class Meter:
    """Takes CPU readings at the start of a phase and turns them into `Usage` at its end."""

    def __init__(self, api: Service, worker: Service, standin: StandIn, engine: Engine) -> None:
        self.api, self.worker, self.standin, self.engine = api, worker, standin, engine
        self._start: dict[str, Any] = {}

    def start(self) -> None:
        self._start = {
            "api": self.api.cpu(),
            "worker": self.worker.cpu(),
            "standin": self.standin.cpu(),
            "postgres": cpu_of_named("postgres"),
            "redis": sum(cpu_of_named("redis-server").values()),
            "bench": self_cpu_seconds(),
            "machine": machine_busy_seconds(),
            "at": time.monotonic(),
            "load": load_average(),
        }

    def started(self, name: str) -> float:
        """A CPU reading taken at the start of the phase."""
        return float(self._start[name])

    def stop(self) -> Usage:
        s = self._start
        seconds = time.monotonic() - s["at"]
        pg_before: dict[int, float] = s["postgres"]
        postgres = sum(
            cpu_seconds(pid) - pg_before.get(pid, 0.0) for pid in our_backends(self.engine)
        )
        usage = Usage(
            api=self.api.cpu() - s["api"],
            worker=self.worker.cpu() - s["worker"],
            postgres=postgres,
            redis=sum(cpu_of_named("redis-server").values()) - s["redis"],
            standin=self.standin.cpu() - s["standin"],
            bench=self_cpu_seconds() - s["bench"],
            load_before=s["load"],
            load_after=load_average(),
        )
        machine = machine_busy_seconds() - s["machine"]
        usage.machine_busy_pct = 100 * machine / (seconds * (os.cpu_count() or 1))
        ours = usage.api + usage.worker + usage.postgres + usage.redis + usage.standin + usage.bench
        usage.other = max(machine - ours, 0.0)
        return usage


@dataclass
class PhaseResult:
    name: str
    requests: int
    offered_rate: float  # as configured
    sent_rate: float  # as the generator managed to send
    throughput: float  # responses per second, first planned send to last response
    statuses: dict[str, int]
    results: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    lag_p99_ms: float  # the generator's own lateness
    lag_max_ms: float
    target_p99_ms: float
    usage: Usage
    api_cpu_ms_per_request: float
    errors: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)
    slowest: list[str] = field(default_factory=list)  # the 5 slowest: when sent, how long
    # Per window of planned send times: (start s, requests, p50 ms, p99 ms).
    timeline: list[tuple[float, int, float, float]] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return self.p99_ms < self.target_p99_ms


def summarise(
    name: str, run: Run, offered: float, target: float, usage: Usage, requests: int
) -> PhaseResult:
    latencies = sorted(o.latency * 1000 for o in run.outcomes)
    lags = sorted(o.lag * 1000 for o in run.outcomes)
    statuses = collections.Counter(str(o.status) if o.status else "error" for o in run.outcomes)
    results = collections.Counter(o.result for o in run.outcomes if o.result is not None)
    errors = collections.Counter(
        o.error.split(":", 1)[0] for o in run.outcomes if o.error is not None
    )
    first_errors = [
        f"at {o.at:.2f} s after {o.latency * 1000:.0f} ms: {o.error}"
        for o in sorted(run.outcomes, key=lambda o: o.at)
        if o.error is not None
    ][:5]
    return PhaseResult(
        name=name,
        requests=requests,
        offered_rate=offered,
        sent_rate=(requests - 1) / run.send_seconds if run.send_seconds > 0 else float("nan"),
        throughput=len(run.outcomes) / run.seconds if run.seconds > 0 else 0.0,
        statuses=dict(sorted(statuses.items())),
        results=dict(sorted(results.items())),
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
        max_ms=latencies[-1] if latencies else float("nan"),
        lag_p99_ms=percentile(lags, 99),
        lag_max_ms=lags[-1] if lags else float("nan"),
        target_p99_ms=target,
        usage=usage,
        api_cpu_ms_per_request=usage.api / max(requests, 1) * 1000,
        errors=dict(errors),
        first_errors=first_errors,
        slowest=[
            f"{o.latency * 1000:,.0f} ms at {o.at:.2f} s"
            for o in sorted(run.outcomes, key=lambda o: -o.latency)[:5]
        ],
        timeline=timeline(run.outcomes),
    )


def timeline(
    outcomes: Sequence[Outcome], window: float = 5.0
) -> list[tuple[float, int, float, float]]:
    """Latency per window of planned send times: does it stay level, grow, or spike?"""
    windows: dict[int, list[float]] = collections.defaultdict(list)
    for outcome in outcomes:
        windows[int(outcome.at // window)].append(outcome.latency * 1000)
    found = []
    for key in sorted(windows):
        values = sorted(windows[key])
        found.append(
            (
                key * window,
                len(values),
                round(percentile(values, 50), 1),
                round(percentile(values, 99), 1),
            )
        )
    return found


# --------------------------------------------------------------------------------------------
# The requests


def inbound_request(patient: int, text_: str, message_id: str, nonce: str) -> Planned:
    """A signed inbound SMS as Vonage's SMS API posts it (form fields)."""
    from tests.vonage_standin import sign

    now = time.time()
    params = {
        "msisdn": patient_phone(patient).lstrip("+"),
        "to": SENDER.lstrip("+"),
        "messageId": message_id,
        "text": text_,
        "type": "text",
        "keyword": text_.split()[0].upper() if text_.split() else "",
        "api-key": API_KEY,
        "message-timestamp": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)),
        "timestamp": str(int(now)),
        "nonce": nonce,
    }
    params["sig"] = sign(params, SIGNATURE_SECRET, SIGNATURE_METHOD)
    return Planned(
        "POST",
        "/webhooks/vonage/inbound",
        urllib.parse.urlencode(params).encode(),
        {"content-type": "application/x-www-form-urlencoded"},
        text_,
        message_id,
    )


def message_id(patient: int) -> str:
    return f"1A{patient:014X}"


def inbound_requests(count: int) -> list[Planned]:
    """Patient i+1 sends TEXTS[i % 6]: each a distinct number and messageId."""
    return [
        inbound_request(i + 1, TEXTS[i % len(TEXTS)], message_id(i + 1), f"n{i + 1}")
        for i in range(count)
    ]


def link_requests(tokens: Sequence[str], count: int, per_address: int = 20) -> list[Planned]:
    """GET /c/{token} over all tokens (shuffled), a new X-Forwarded-For address every
    `per_address` requests."""
    order = list(tokens)
    random.Random(4).shuffle(order)
    planned = []
    for i in range(count):
        block = i // per_address
        address = f"10.{(block >> 16) & 255}.{(block >> 8) & 255}.{block & 255}"
        planned.append(
            Planned("GET", f"/c/{order[i % len(order)]}", None, {"x-forwarded-for": address}, "")
        )
    return planned


# --------------------------------------------------------------------------------------------
# Checks


def snapshot(engine: Engine, standin: StandIn) -> dict[str, Any]:
    """Everything a reply can change, counted."""
    inbound = rows(
        engine,
        "SELECT count(*), count(result), count(DISTINCT provider_message_id) FROM inbound_messages",
    )[0]
    kinds = ", ".join(f"'{k}'" for k in ANSWER_KINDS)
    stats = standin.stats()
    return {
        "inbound": {"rows": inbound[0], "with_result": inbound[1], "message_ids": inbound[2]},
        "inbound_results": counted(
            engine, "SELECT result, count(*) FROM inbound_messages GROUP BY 1 ORDER BY 1"
        ),
        "events": counted(engine, "SELECT type, count(*) FROM events GROUP BY 1 ORDER BY 1"),
        "appointments": counted(
            engine,
            "SELECT status, confirmation, count(*) FROM appointments GROUP BY 1, 2 ORDER BY 1, 2",
        ),
        "answers": counted(
            engine,
            f"SELECT kind, status, count(*) FROM reminders WHERE kind IN ({kinds}) "
            "GROUP BY 1, 2 ORDER BY 1, 2",
        ),
        "planned_skipped": scalar(
            engine, "SELECT count(*) FROM reminders WHERE skip_reason = 'cancelled'"
        ),
        "opt_outs": scalar(engine, "SELECT count(*) FROM opt_outs"),
        "standin_posts": int(stats["posts"]),
        "standin_refs": int(stats["refs"]),
        "standin_extra_posts": int(stats["extra_posts"]),
    }


def settled(engine: Engine) -> tuple[int, int, int]:
    """(inbound rows with a result, answers final, answers in all)."""
    kinds = ", ".join(f"'{k}'" for k in ANSWER_KINDS)
    applied = scalar(engine, "SELECT count(*) FROM inbound_messages WHERE result IS NOT NULL")
    final, total = rows(
        engine,
        "SELECT count(*) FILTER (WHERE status IN ('sent', 'skipped', 'failed')), count(*) "
        f"FROM reminders WHERE kind IN ({kinds})",
    )[0]
    return applied, int(final), int(total)


@dataclass
class Drain:
    applied_seconds: float  # until every reply answered 200 was applied
    settled_seconds: float  # until every answer SMS was final too


def wait_settled(
    engine: Engine, expected: int, services: Sequence[Service], timeout: float
) -> Drain:
    """Waits until the `expected` replies (those answered 200) are applied and every answer SMS
    is final."""
    start = time.monotonic()
    applied_at: float | None = None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("answers going out", total=None)
        while time.monotonic() - start < timeout:
            for service in services:
                service.check_alive()
            applied, final, total = settled(engine)
            bar.update(task, completed=final, total=total)
            if applied >= expected and applied_at is None:
                applied_at = time.monotonic() - start
            if applied >= expected and final >= total:
                break
            time.sleep(0.25)  # polling other processes' progress in the database
    settled_seconds = time.monotonic() - start
    return Drain(applied_at if applied_at is not None else settled_seconds, settled_seconds)


def apply_lag_ms(engine: Engine) -> dict[str, float]:
    """How long replies waited between receipt (the webhook) and application (the worker)."""
    lags = sorted(
        float(lag)
        for (lag,) in rows(
            engine,
            "SELECT EXTRACT(EPOCH FROM applied_at - received_at) * 1000 FROM inbound_messages "
            "WHERE applied_at IS NOT NULL",
        )
    )
    if not lags:
        return {}
    return {
        "p50": round(percentile(lags, 50), 1),
        "p99": round(percentile(lags, 99), 1),
        "max": round(lags[-1], 1),
    }


@dataclass
class Exactness:
    applied_once: bool
    duplicates_ignored: bool
    problems: list[str]
    expected: dict[str, Any]
    found: dict[str, Any]
    settle_seconds: float
    applied_seconds: float  # the drain: from the last response until every reply was applied
    apply_lag_ms: dict[str, float]  # applied_at - received_at: p50, p99, max
    worker_ms_per_reply: float  # the worker's CPU from the phase's start to the drain's end
    duplicates_sent: int
    duplicate_results: dict[str, int]
    duplicate_statuses: dict[str, int]
    changed_by_duplicates: dict[str, Any]


def expected_counts(requests: Sequence[Planned]) -> dict[str, Any]:
    texts = collections.Counter(r.label for r in requests)
    results: collections.Counter[str] = collections.Counter()
    events: collections.Counter[str] = collections.Counter()
    answers: collections.Counter[str] = collections.Counter()
    for text_, n in texts.items():
        results[EXPECTED[text_].result] += n
        events[EXPECTED[text_].event] += n
        answers[EXPECTED[text_].answer] += n
    return {
        "requests": len(requests),
        "results": dict(sorted(results.items())),
        "events": dict(sorted(events.items())),
        "answers": dict(sorted(answers.items())),
    }


def check_applied(
    engine: Engine,
    requests: Sequence[Planned],
    run: Run,
    after: dict[str, Any],
) -> list[str]:
    """What is wrong with "every reply applied exactly once" (empty: nothing). Problems are
    tagged `missing` (a reply not applied, or a request not answered 200), `twice` (something
    done more than once) or `wrong` (not what the reply means)."""
    problems = []
    stored = dict(rows(engine, "SELECT provider_message_id, result FROM inbound_messages"))
    texts = {r.message_id: r.label for r in requests}
    by_id = {r.message_id: o for r, o in zip(requests, sorted_outcomes(run), strict=True)}
    statuses = collections.Counter(o.status for o in run.outcomes)
    if statuses != {200: len(requests)}:
        applied_anyway = sum(1 for m, o in by_id.items() if o.status != 200 and m in stored)
        problems.append(
            f"missing: HTTP statuses {dict(statuses)}, not all 200 ({applied_anyway} of the "
            "others were applied all the same)"
        )
    lost = [m for m, o in by_id.items() if o.status == 200 and m not in stored]
    if lost:
        problems.append(f"missing: {len(lost)} replies answered 200 but not stored: {lost[:5]}")
    strangers = set(stored) - set(texts)
    if strangers:
        problems.append(f"wrong: {len(strangers)} inbound rows the bench did not send")
    wrong = [m for m, text_ in texts.items() if m in stored and stored[m] != EXPECTED[text_].result]
    if wrong:
        problems.append(f"wrong: {len(wrong)} replies with an unexpected result: {wrong[:5]}")
    answered = [o for o in run.outcomes if o.status == 200]
    bad = [o.result for o in answered if o.result != "received"]
    if bad:
        problems.append(f"wrong: webhook results {dict(collections.Counter(bad))}")
    # What the stored replies must have done, each once.
    want = expected_counts([r for r in requests if r.message_id in stored])
    inbound = after["inbound"]
    if not inbound["rows"] == inbound["with_result"] == inbound["message_ids"]:
        problems.append(f"wrong: inbound rows {inbound}")
    for name, found, expected in (
        ("events", after["events"], want["events"]),
        (
            "answer SMS sent",
            {k.split("/")[0]: v for k, v in after["answers"].items() if k.endswith("/sent")},
            want["answers"],
        ),
    ):
        for key in sorted(set(found) | set(expected)):
            if found.get(key, 0) > expected.get(key, 0):
                problems.append(f"twice: {name} {key}: {found.get(key, 0)} for {expected[key]}")
            elif found.get(key, 0) < expected.get(key, 0):
                problems.append(f"missing: {name} {key}: {found.get(key, 0)} of {expected[key]}")
    unsent = {k: v for k, v in after["answers"].items() if not k.endswith("/sent")}
    if unsent:
        problems.append(f"missing: answer SMS not sent: {unsent}")
    twice = rows(
        engine,
        "SELECT type, count(*) FROM (SELECT appointment_external_id, type FROM events "
        "WHERE type IN ('appointment.confirmed', 'appointment.cancelled') "
        "GROUP BY 1, 2 HAVING count(*) > 1) AS t GROUP BY 1",
    )
    if twice:
        problems.append(f"twice: appointments with the same decision twice: {dict(twice)}")
    both = scalar(
        engine,
        "SELECT count(*) FROM (SELECT appointment_external_id FROM events "
        "WHERE type IN ('appointment.confirmed', 'appointment.cancelled') "
        "GROUP BY 1 HAVING count(*) > 1) AS t",
    )
    if both:
        problems.append(f"twice: {both} appointments with more than one decision event")
    sent = sum(v for k, v in after["answers"].items() if k.endswith("/sent"))
    if after["standin_extra_posts"] or after["standin_posts"] != after["standin_refs"]:
        problems.append(
            f"twice: stand-in got {after['standin_posts']} POSTs for {after['standin_refs']} "
            f"client-refs ({after['standin_extra_posts']} beyond one each)"
        )
    if after["standin_refs"] != sent:
        problems.append(f"wrong: {after['standin_refs']} client-refs at the stand-in, {sent} sent")
    confirmed = want["events"].get("appointment.confirmed", 0)
    cancelled = want["events"].get("appointment.cancelled", 0)
    states = after["appointments"]
    if (
        states.get("booked/confirmed", 0) != confirmed
        or states.get("cancelled/cancelled_by_patient", 0) != cancelled
    ):
        problems.append(f"wrong: appointment states {states}")
    if after["planned_skipped"] != cancelled:
        problems.append(
            f"wrong: {after['planned_skipped']} planned reminders dropped, not {cancelled}"
        )
    if after["opt_outs"] != want["events"].get("patient.opted_out", 0):
        problems.append(f"wrong: {after['opt_outs']} opt-outs recorded")
    return problems


def sorted_outcomes(run: Run) -> list[Outcome]:
    """The outcomes in the order of the requests (the order of their planned times)."""
    return sorted(run.outcomes, key=lambda o: o.at)


def changed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {k: {"before": before[k], "after": after[k]} for k in before if before[k] != after[k]}


# --------------------------------------------------------------------------------------------
# The whole run


@dataclass
class Report:
    config: dict[str, Any]
    load_start: list[float]
    inbound: PhaseResult
    exactness: Exactness
    link: PhaseResult
    exits: dict[str, int]
    profile: dict[str, Any]
    load_end: list[float]

    @property
    def ok(self) -> bool:
        return (
            self.inbound.met
            and self.link.met
            and self.exactness.applied_once
            and self.exactness.duplicates_ignored
            and self.link.statuses == {"200": self.link.requests}
        )


def code_version() -> str:
    """The commit of the code under test, and whether it has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + (" + uncommitted changes" if dirty else "")


def run(args: argparse.Namespace) -> Report:
    if round(args.inbound_rate * args.seconds) > args.patients:
        raise SetupError("--patients must be at least --inbound-rate x --seconds (one reply each)")
    url = database_url()
    lock = RunLock(url)  # two runs would share Redis db 13 and drop each other's database
    try:
        return measure(args, url)
    finally:
        lock.release()


def measure(args: argparse.Namespace, url: str) -> Report:
    from reminders import db

    inbound_count = round(args.inbound_rate * args.seconds)
    link_count = round(args.link_rate * args.seconds)
    config = {
        "seconds": args.seconds,
        "inbound_rate": args.inbound_rate,
        "link_rate": args.link_rate,
        "patients": args.patients,
        "duplicates": args.duplicates,
        "connections": args.connections,
        "timeout": args.timeout,
        "wait_quiet": args.wait_quiet,
        "worker_threads": args.threads,
        "api_workers": args.api_workers,
        "worker_nice": args.worker_nice,
        "send_rate": SEND_RATE,
        "cpus": os.cpu_count(),
        "tree": code_version(),
    }
    load_start = load_average()
    err.print(f"[bold]set-up[/bold]: database {DATABASE}, {args.patients:,} patients...")
    recreate_database(url)
    os.environ["REMINDERS_DATABASE_URL"] = url  # for reminders.db in this process
    os.environ["REMINDERS_SECRET_KEY"] = SECRET_KEY
    sys.path.insert(0, str(ROOT))
    db.reset()
    standin = StandIn()
    services: list[Service] = []
    engine = create_engine(url)
    exits: dict[str, int] = {}
    profile: dict[str, Any] = {}
    spies: dict[str, Spy] = {}
    logs = Path(tempfile.mkdtemp(prefix="bench-replies-"))
    try:
        env = service_env(url, standin)
        cli(env, "migrate")
        clinic = cli(
            env,
            "clinic",
            "add",
            "Clinique du Parc",
            "--timezone",
            "Europe/Paris",
            "--country",
            "FR",
            "--language",
            "fr",
            "--sender",
            SENDER,
        )
        tokens = seed(engine, int(clinic["id"]), args.patients, dt.datetime.now(dt.UTC))
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        api_args = ["api", "--port", str(port), "--workers", str(args.api_workers)]
        byte_compile()  # as an installed package is: no process compiles our modules
        api = Service("api", api_args, env, logs)
        services.append(api)
        worker_args = ["worker", "--threads", str(args.threads)]
        worker = Service("worker", worker_args, env, logs, nice=args.worker_nice)
        services.append(worker)
        wait_until_up(api, base_url)
        wait_until_idle(worker)
        wait_until_idle(api)
        meter = Meter(api, worker, standin, engine)

        # Phase 1: inbound SMS.
        requests = inbound_requests(inbound_count)
        waited = wait_for_quiet(args.wait_quiet, args.wait_quiet_max)
        spy = (
            Spy(api.pid, args.profile, "inbound", children=args.api_workers > 1)
            if args.profile
            else None
        )
        if spy is not None:
            spies["inbound"] = spy
        meter.start()
        try:
            inbound_run = run_phase(
                f"inbound SMS at {args.inbound_rate:g}/s" + (" (profiled)" if spy else ""),
                base_url,
                requests,
                args.inbound_rate,
                args.connections,
                args.timeout,
            )
        finally:
            if spy is not None:
                spy.stop()
        inbound_usage = meter.stop()
        inbound_usage.waited_for_quiet = waited
        inbound = summarise(
            "inbound SMS (POST /webhooks/vonage/inbound)",
            inbound_run,
            args.inbound_rate,
            TARGET_INBOUND_P99_MS,
            inbound_usage,
            len(requests),
        )
        answered = sum(1 for o in inbound_run.outcomes if o.status == 200)
        drain = wait_settled(engine, answered, services, args.settle_timeout)
        worker_cpu = worker.cpu() - meter.started("worker")
        after = snapshot(engine, standin)
        problems = check_applied(engine, requests, inbound_run, after)

        # Retries: the same messageIds again (signed again, as Vonage does on each try).
        ordered = sorted_outcomes(inbound_run)
        candidates = [i for i, o in enumerate(ordered) if o.status == 200]
        picked = random.Random(7).sample(candidates, min(args.duplicates, len(candidates)))
        again = [
            inbound_request(i + 1, TEXTS[i % len(TEXTS)], message_id(i + 1), f"r{i + 1}")
            for i in sorted(picked)
        ]
        dup_run = run_phase(
            f"{len(again)} retried messageIds", base_url, again, args.inbound_rate, 16, args.timeout
        )
        time.sleep(3.0)  # anything a duplicate wrongly queued would go out meanwhile
        later = snapshot(engine, standin)
        dup_results = dict(collections.Counter(str(o.result) for o in dup_run.outcomes))
        dup_statuses = dict(collections.Counter(str(o.status) for o in dup_run.outcomes))
        difference = changed(after, later)
        duplicates_ignored = (
            dup_results == {"duplicate": len(again)}
            and dup_statuses == {"200": len(again)}
            and not difference
        )
        exactness = Exactness(
            applied_once=not problems,
            duplicates_ignored=duplicates_ignored,
            problems=problems,
            expected=expected_counts(requests),
            found=after,
            settle_seconds=round(drain.settled_seconds, 2),
            applied_seconds=round(drain.applied_seconds, 2),
            apply_lag_ms=apply_lag_ms(engine),
            worker_ms_per_reply=round(worker_cpu / max(answered, 1) * 1000, 2),
            duplicates_sent=len(again),
            duplicate_results=dup_results,
            duplicate_statuses=dup_statuses,
            changed_by_duplicates=difference,
        )

        # Phase 2: link pages. Phase 1 changed thousands of rows: vacuum and analyse them now,
        # so autovacuum does not start in the middle of phase 2.
        links = link_requests(tokens, link_count)
        wait_until_idle(worker, 10)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(
                text("VACUUM (ANALYZE) appointments, reminders, inbound_messages, events, opt_outs")
            )
        waited = wait_for_quiet(args.wait_quiet, args.wait_quiet_max)
        spy = (
            Spy(api.pid, args.profile, "link", children=args.api_workers > 1)
            if args.profile
            else None
        )
        if spy is not None:
            spies["link"] = spy
        meter.start()
        try:
            link_run = run_phase(
                f"GET /c/{{token}} at {args.link_rate:g}/s" + (" (profiled)" if spy else ""),
                base_url,
                links,
                args.link_rate,
                args.connections,
                args.timeout,
            )
        finally:
            if spy is not None:
                spy.stop()
        link_usage = meter.stop()
        link_usage.waited_for_quiet = waited
        link = summarise(
            "link pages (GET /c/{token})",
            link_run,
            args.link_rate,
            TARGET_LINK_P99_MS,
            link_usage,
            len(links),
        )
        profile = {name: summarise_profile(spy) for name, spy in spies.items()}
    finally:
        for service in reversed(services):
            exits[service.name] = service.stop()
        standin.close()
        engine.dispose()
        db.reset()
        if not args.keep_database:
            with contextlib.suppress(SetupError):
                drop_database(url)
    failed = {name: code for name, code in exits.items() if code != 0}
    if failed:
        err.print(f"[red]processes exited with {failed}; logs in {logs}[/red]")
    return Report(
        config=config,
        load_start=load_start,
        inbound=inbound,
        exactness=exactness,
        link=link,
        exits=exits,
        profile=profile,
        load_end=load_average(),
    )


# --------------------------------------------------------------------------------------------
# Output


def _ms(value: float) -> str:
    return f"{value:,.1f}"


def phase_table(phase: PhaseResult) -> Table:
    table = Table(title=phase.name, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    verdict = "[green]met[/green]" if phase.met else "[red]MISSED[/red]"
    table.add_row("offered", f"{phase.offered_rate:g}/s ({phase.requests:,} requests, open loop)")
    table.add_row(
        "sent at",
        f"{phase.sent_rate:,.1f}/s (generator lag p99 {_ms(phase.lag_p99_ms)} "
        f"ms, max {_ms(phase.lag_max_ms)} ms)",
    )
    table.add_row("achieved", f"{phase.throughput:,.1f} responses/s")
    table.add_row("statuses", ", ".join(f"{k}: {v:,}" for k, v in phase.statuses.items()))
    if phase.errors:
        table.add_row("errors", ", ".join(f"{k}: {v:,}" for k, v in phase.errors.items()))
        table.add_row("first errors", "\n".join(phase.first_errors))
    if phase.results and any(k != "None" for k in phase.results):
        table.add_row("results", ", ".join(f"{k}: {v:,}" for k, v in phase.results.items()))
    table.add_row(
        "latency ms",
        f"p50 {_ms(phase.p50_ms)}  p90 {_ms(phase.p90_ms)}  p99 {_ms(phase.p99_ms)}  "
        f"max {_ms(phase.max_ms)}",
    )
    table.add_row("target", f"p99 < {phase.target_p99_ms:g} ms: {verdict}")
    table.add_row("slowest", ", ".join(phase.slowest))
    table.add_row(
        "p50/p99 by 5 s",
        ", ".join(f"{_ms(p50)}/{_ms(p99)}" for _, _, p50, p99 in phase.timeline),
    )
    u = phase.usage
    table.add_row(
        "CPU s",
        f"api {u.api:.1f} ({phase.api_cpu_ms_per_request:.2f} ms/request), worker "
        f"{u.worker:.1f}, postgres {u.postgres:.1f}, redis {u.redis:.1f}, stand-in "
        f"{u.standin:.1f}, bench {u.bench:.1f}, others {u.other:.1f}",
    )
    table.add_row(
        "machine",
        f"busy {u.machine_busy_pct:.0f}% of {os.cpu_count()} cores; load average "
        f"{u.load_before} before, {u.load_after} after"
        + (f"; waited {u.waited_for_quiet:.0f} s for quiet" if u.waited_for_quiet else ""),
    )
    return table


def print_report(report: Report, console: Console) -> None:
    console.print(
        f"bench/replies.py: {report.config['seconds']:g} s per phase, "
        f"{report.config['patients']:,} patients, code {report.config['tree']}, "
        f"one api (--workers {report.config.get('api_workers', 1)}) + one worker "
        f"(--threads {report.config['worker_threads']}, nice "
        f"{report.config.get('worker_nice', 0)}), load average at start "
        f"{report.load_start}"
    )
    console.print(phase_table(report.inbound))
    e = report.exactness
    yes = "[green]yes[/green]" if e.applied_once else "[red]NO[/red]"
    found = e.found
    console.print(
        f"applied exactly once: {yes} — inbound rows {found['inbound']['rows']:,} "
        f"(expected {e.expected['requests']:,}), events {found['events']}, answers "
        f"{found['answers']}, stand-in POSTs {found['standin_posts']:,} "
        f"({found['standin_extra_posts']} extra), appointments {found['appointments']}, "
        f"all settled {e.settle_seconds:.1f} s after the last response"
    )
    lag = e.apply_lag_ms
    console.print(
        f"applied by the worker: all {e.applied_seconds:.1f} s after the last response (the "
        f"drain); applied_at - received_at p50 {_ms(lag.get('p50', math.nan))} ms, p99 "
        f"{_ms(lag.get('p99', math.nan))} ms, max {_ms(lag.get('max', math.nan))} ms; worker CPU "
        f"{e.worker_ms_per_reply:.2f} ms per reply (phase and drain, answers sent included)"
    )
    tags = collections.Counter(p.split(":", 1)[0] for p in e.problems)
    if e.problems:
        console.print(
            "  problems: "
            + ", ".join(f"{tag} {tags.get(tag, 0)}" for tag in ("missing", "twice", "wrong"))
        )
    for problem in e.problems:
        console.print(f"  [red]problem[/red]: {problem}")
    dup = "[green]yes[/green]" if e.duplicates_ignored else "[red]NO[/red]"
    console.print(
        f"duplicates ignored: {dup} — {e.duplicates_sent} retried messageIds: results "
        f"{e.duplicate_results}, statuses {e.duplicate_statuses}, "
        f"changed: {e.changed_by_duplicates or 'nothing'}"
    )
    console.print(phase_table(report.link))
    for phase, summary in report.profile.items():
        console.print(
            f"[bold]py-spy, api during the {phase} phase[/bold]: {summary['cpu_samples']} "
            f"samples holding the GIL, {summary['handler_wall_samples']} in request handlers"
        )
        for key, title in (
            ("cpu_self", "CPU, self"),
            ("cpu_areas", "CPU, by area"),
            ("cpu_inclusive_reminders", "CPU, reminders functions (inclusive)"),
            ("handler_wall", "handler wall time, reminders line -> below"),
        ):
            console.print(f"  {title}: " + "; ".join(f"{k} {v}%" for k, v in summary[key][:12]))
    console.print(
        f"process exits {report.exits}; load average at end {report.load_end}; "
        + ("all targets met" if report.ok else "[red]a target or a check failed[/red]")
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--inbound-rate", type=float, default=300.0, help="inbound SMS per second")
    parser.add_argument("--link-rate", type=float, default=200.0, help="link GETs per second")
    parser.add_argument("--patients", type=int, default=12_000, help="patients seeded")
    parser.add_argument("--duplicates", type=int, default=500, help="messageIds sent again")
    parser.add_argument("--connections", type=int, default=100, help="client connection pool")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a request may take (pool included)"
    )
    parser.add_argument("--threads", type=int, default=8, help="worker threads")
    parser.add_argument(
        "--api-workers", type=int, default=2, help="processes of `reminders api --workers N`"
    )
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=5,
        help="the worker's nice value: about a third of the API's share of a busy CPU, as "
        "deploy/ gives it (CPUWeight=30, cpu_shares 340); 0 for equal shares",
    )
    parser.add_argument(
        "--settle-timeout", type=float, default=300.0, help="seconds to wait for answers"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        metavar="PCT",
        help="before each phase, wait until the machine is under PCT%% busy (other benchmarks)",
    )
    parser.add_argument(
        "--wait-quiet-max", type=float, default=900.0, help="longest wait for --wait-quiet (s)"
    )
    parser.add_argument("--profile", type=Path, help="record the api with py-spy into this DIR")
    parser.add_argument("--keep-database", action="store_true", help="keep it afterwards")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--standin-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.inbound_rate <= 0 or args.link_rate <= 0:
        parser.error("--seconds and the rates must be positive")
    return args


def report_json(report: Report) -> dict[str, Any]:
    data = asdict(report)
    data["ok"] = report.ok
    data["inbound"]["met"] = report.inbound.met
    data["link"]["met"] = report.link.met
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.standin_server:
        return standin_server()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args)
    except SetupError as exc:
        err.print(f"[red]set-up failed[/red]: {exc}")
        return 2
    except Exception:
        err.print_exception()
        return 2
    if args.json:
        print(json.dumps(report_json(report), default=str, indent=1))
    else:
        print_report(report, Console())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
