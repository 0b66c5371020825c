"""What the fault suite runs and breaks: its own PostgreSQL cluster and Redis server (both on
spare local ports, so it may restart or kill them), the real `reminders api`, `scheduler` and
`worker` processes, and the Vonage stand-in posting delivery receipts back to the API.

A scenario books a burst of due reminders, starts the processes, does its damage while they send,
waits until every reminder has an outcome (or a time limit passes) and counts:

- lost: not sent, not skipped with a reason, not failed with a reason; or marked sent though the
  stand-in never took it;
- late: taken by the stand-in, or marked sent, after its deadline (`send_by`);
- duplicates: messages the stand-in took beyond the first for one `client-ref`.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import datetime as dt
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from tests import vonage_standin as standin

ROOT = Path(__file__).resolve().parents[2]
SECRET_KEY = "faults-secret-key-0123456789"
SIGNATURE_SECRET = "faults-signature-secret"
# The sweep's timings, shortened (see launch.py); the production values are minutes. A send may
# take the client's 10 s timeout, so `sending` goes stale only after 15 s.
TIMINGS = (
    "scheduler.TICK_SECONDS=1,dispatch.SENDING_STALE=15,dispatch.UNKNOWN_GRACE=10,"
    "dispatch.CLAIM_STALE=20"
)
TIGHT_EVERY = 10  # every 10th reminder has a deadline a minute after the burst starts
TIGHT_DEADLINE = dt.timedelta(seconds=60)


class SetupError(Exception):
    """The suite could not build its world (a binary missing, a server not starting)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the suite's process dies (no strays left)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def wait_for(condition: Callable[[], bool], seconds: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)  # polling other processes' progress
    return condition()


# --- the servers it owns -----------------------------------------------------------------------


class RedisServer:
    """A throwaway `redis-server` with nothing on disk: killing it loses everything in it."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SetupError("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.log = workdir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--logfile", str(self.log)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        if not wait_for(lambda: _pings(client), 10, 0.05):
            raise SetupError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: every queued message is gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def flush(self) -> None:
        redis.Redis(port=self.port).flushall()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        raise SetupError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return found[-1].parent


class PostgresCluster:
    """A cluster of the suite's own (never the machine's): initdb'd as the `postgres` user when
    run as root (initdb refuses root), on a spare port, with durability off for speed."""

    def __init__(self, workdir: Path) -> None:
        self.bin = postgres_bin()
        self.port = free_port()
        self.dir = workdir / "pg"
        self.dir.mkdir()
        self.log = workdir / "pg.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            for path in (workdir, self.dir):
                os.chown(path, account.pw_uid, account.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, check=False, timeout=120
        )
        if done.returncode != 0:
            raise SetupError(f"{Path(args[0]).name} failed: {done.stderr.strip()[-500:]}")

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres",
            "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C",
        )  # fmt: skip

    def _ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.log),
            "-o", options, "-w", "-t", "60", action, *extra,
        )  # fmt: skip

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        """A fast restart: every session is cut, the server is back a second or two later."""
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        self._ctl("stop", "-m", "immediate")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, *statements: str) -> None:
        engine = create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                for statement in statements:
                    connection.execute(text(statement))
        finally:
            engine.dispose()


@dataclasses.dataclass
class World:
    """The servers of one suite run, and a migrated template database to copy per scenario."""

    workdir: Path
    redis: RedisServer
    postgres: PostgresCluster

    def fresh_database(self, name: str) -> str:
        self.postgres.admin(
            f"DROP DATABASE IF EXISTS {name} WITH (FORCE)",
            f"CREATE DATABASE {name} TEMPLATE faults_template",
        )
        return self.postgres.url(name)


@contextmanager
def world() -> Iterator[World]:
    workdir = Path(tempfile.mkdtemp(prefix="reminders-faults-"))
    redis_server = RedisServer(workdir)
    cluster = PostgresCluster(workdir)
    started = False
    try:
        cluster.init()
        cluster.start()
        started = True
        cluster.admin("CREATE DATABASE faults_template")
        from reminders import db

        engine = create_engine(cluster.url("faults_template"))
        try:
            db.migrate(engine)
        finally:
            engine.dispose()
        redis_server.start()
        yield World(workdir, redis_server, cluster)
    finally:
        redis_server.kill()
        if started:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- the burst ---------------------------------------------------------------------------------

FILL_SQL = (
    """
    INSERT INTO patients (id, clinic_id, external_id, name, phone_e164, sms_capable,
                          language_requested, language, language_fallback)
    SELECT p, :clinic, 'P' || p, 'Patient Nom' || p, '+336' || lpad(p::text, 8, '0'), true,
           'fr', 'fr', false
    FROM generate_series(1, CAST(:count AS int)) AS p
    """,
    """
    INSERT INTO appointments (id, clinic_id, external_id, patient_id, starts_at, duration_minutes,
                              kind, status, confirmation, booked_at, holdout, link_token)
    SELECT i, :clinic, 'A' || i, i, CAST(:now AS timestamptz) + interval '1 day', 15,
           'consultation', 'booked', 'unconfirmed', CAST(:now AS timestamptz) - interval '1 day',
           false, substr(md5(i::text), 1, 4) || lpad(to_hex(i), 8, '0')
    FROM generate_series(1, CAST(:count AS int)) AS i
    """,
    """
    INSERT INTO reminders (id, clinic_id, appointment_id, phone_e164, kind, rule,
                           appointment_starts_at, due_at, send_by, status, attempts)
    SELECT a.id, a.clinic_id, a.id, p.phone_e164, 'reminder', '24h', a.starts_at,
           CAST(:now AS timestamptz) - make_interval(secs => a.id % 60),
           CASE WHEN a.id % :tight = 0 THEN CAST(:tight_by AS timestamptz)
                ELSE a.starts_at - interval '2 hours' END,
           'planned', 0
    FROM appointments AS a JOIN patients AS p ON p.id = a.patient_id
    """,
    "SELECT setval('patients_id_seq', (SELECT max(id) FROM patients))",
    "SELECT setval('appointments_id_seq', (SELECT max(id) FROM appointments))",
    "SELECT setval('reminders_id_seq', (SELECT max(id) FROM reminders))",
)


def book_burst(engine: Engine, count: int, now: dt.datetime) -> None:
    """One clinic (no quiet hours) and `count` reminders due now, every TIGHT_EVERY-th with a
    deadline TIGHT_DEADLINE away."""
    from reminders.clinics import ClinicOptions, create_clinic

    with Session(engine) as session:
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
        session.commit()
        clinic_id = clinic.id
    with engine.begin() as connection:
        values = {
            "clinic": clinic_id,
            "count": count,
            "now": now,
            "tight": TIGHT_EVERY,
            "tight_by": now + TIGHT_DEADLINE,
        }
        for statement in FILL_SQL:
            connection.execute(text(statement), values)


# --- the processes -----------------------------------------------------------------------------


class Fleet:
    """`reminders api`, schedulers and workers against one database, Redis and stand-in; every
    process logs to its own file (read afterwards: no phone number or name may be in them)."""

    def __init__(
        self, world: World, database_url: str, server: standin.VonageStandIn, api_port: int
    ) -> None:
        self.world = world
        self.logs = world.workdir / f"logs-{time.monotonic_ns()}"
        self.logs.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
        self.env |= {
            "REMINDERS_DATABASE_URL": database_url,
            "REMINDERS_REDIS_URL": world.redis.url,
            "REMINDERS_SECRET_KEY": SECRET_KEY,
            "REMINDERS_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
            "REMINDERS_SMS_PROVIDER": "vonage",
            "REMINDERS_VONAGE_API_KEY": "key",
            "REMINDERS_VONAGE_API_SECRET": "secret",
            "REMINDERS_VONAGE_SIGNATURE_SECRET": SIGNATURE_SECRET,
            "REMINDERS_VONAGE_REST_HOST": server.rest_host,
            "REMINDERS_SEND_RATE": "10000",
            "REQUESTS_CA_BUNDLE": str(server.ca_bundle),
            "FAULT_TIMINGS": TIMINGS,
            "PYTHONUNBUFFERED": "1",
        }
        self.api_port = api_port
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._serial = collections.Counter[str]()

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self._serial[name] += 1
        log = (self.logs / f"{name}.{self._serial[name]}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.launch", *args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self.processes[name] = process
        return process

    def start_api(self) -> None:
        self.start("api", "api", "--port", str(self.api_port))
        if not wait_for(self._api_up, 60):
            raise SetupError(f"reminders api did not start: {self.tail('api')}")

    def _api_up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.api_port), timeout=1):
                return True
        except OSError:
            return False

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.logs / f"{name}.{self._serial[name]}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- one scenario ------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    name: str
    reminders: int
    sent: int
    skipped: int
    failed: int
    lost: int
    late: int
    duplicates: int
    seconds: float
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        return (
            f"scenario={self.name} reminders={self.reminders} sent={self.sent} "
            f"skipped={self.skipped} failed={self.failed} lost={self.lost} late={self.late} "
            f"duplicates={self.duplicates} seconds={self.seconds:.0f}"
        )


@dataclasses.dataclass
class Scenario:
    name: str
    schedulers: int = 1
    workers: int = 1
    threads: int = 8
    behaviour: standin.Behaviour | None = None
    # Done while the burst goes out: given the fleet and a function returning how many messages
    # the stand-in has taken so far.
    damage: Callable[[Fleet, Callable[[], int]], None] | None = None


FINAL_SQL = """
    SELECT id, status, skip_reason, error, sent_at, send_by, delivery_status, attempts
    FROM reminders ORDER BY id
"""


def run(world: World, scenario: Scenario, count: int, limit_seconds: float) -> Outcome:
    """Runs one scenario on a fresh database and counts what became of the burst."""
    database = world.fresh_database(f"faults_{scenario.name.replace('-', '_')}")
    engine = create_engine(database, pool_pre_ping=True)  # it survives a PostgreSQL restart
    world.redis.flush()
    api_port = free_port()
    server = standin.VonageStandIn(
        behaviour=scenario.behaviour,
        delivery_receipts_to=f"http://127.0.0.1:{api_port}/webhooks/vonage/status",
        signature_secret=SIGNATURE_SECRET,
        receipt_attempts=8,
        keep_requests=False,
    )
    try:
        with server:
            fleet = Fleet(world, database, server, api_port)
            try:
                fleet.start_api()
                started = time.monotonic()
                book_burst(engine, count, dt.datetime.now(dt.UTC))
                for i in range(scenario.workers):
                    fleet.start(f"worker{i}", "worker", "--threads", str(scenario.threads))
                for i in range(scenario.schedulers):
                    fleet.start(f"scheduler{i}", "scheduler")

                def taken() -> int:
                    return sum(server.accepted.values())

                if scenario.damage is not None:
                    scenario.damage(fleet, taken)
                forwarded = settle(engine, limit_seconds)
                seconds = time.monotonic() - started
                time.sleep(2)  # anything still in flight shows in the counts
            finally:
                fleet.stop_all()
            logs = fleet.log_text()
            accepted, accepted_at = server.accepted, server.accepted_at
        with engine.connect() as connection:
            rows = list(connection.execute(text(FINAL_SQL)))
    finally:
        engine.dispose()
    outcome = count_outcome(scenario.name, rows, accepted, accepted_at, seconds, logs)
    outcome.detail["brought_forward"] = forwarded
    return outcome


STALLED_SECONDS = 60  # longer than any of the shortened sweep timings, and a tick
IDLE_SECONDS = 5


def settle(engine: Engine, limit_seconds: float) -> int:
    """Waits until every reminder has an outcome; gives up after `limit_seconds`, or sooner when
    nothing moved for STALLED_SECONDS (a stuck row).

    A send refused several times in a row waits for its next try (dispatch's backoff: 4 minutes
    after the third refusal, 8 after the fourth...; not shortened). When only such rows are left,
    idle and within their deadline, the suite brings their time forward (as if those minutes had
    passed) instead of sleeping through them; returns how many it brought forward."""
    deadline = time.monotonic() + limit_seconds
    last, since, forwarded = -1, time.monotonic(), 0
    while time.monotonic() < deadline:
        try:
            left, waiting = unfinished(engine)
            if left == 0:
                return forwarded
            if left != last:
                last, since = left, time.monotonic()
            elif waiting == left and time.monotonic() - since > IDLE_SECONDS:
                forwarded += bring_forward(engine)
            elif time.monotonic() - since > STALLED_SECONDS:
                return forwarded
        except OperationalError:  # PostgreSQL restarting
            pass
        time.sleep(0.5)  # polling the processes' progress
    return forwarded


def bring_forward(engine: Engine) -> int:
    with engine.begin() as connection:
        result = connection.execute(
            text(
                "UPDATE reminders SET due_at = now() "
                "WHERE status = 'planned' AND due_at > now() AND due_at <= send_by"
            )
        )
    return int(result.rowcount)


def unfinished(engine: Engine) -> tuple[int, int]:
    """Reminders without an outcome yet, and how many of them wait for a later time."""
    with engine.connect() as connection:
        left, waiting = connection.execute(
            text(
                "SELECT count(*), count(*) FILTER (WHERE status = 'planned' AND due_at > now()) "
                "FROM reminders WHERE status NOT IN ('sent', 'skipped', 'failed')"
            )
        ).one()
    return int(left), int(waiting)


def count_outcome(
    name: str,
    rows: list[Any],
    accepted: collections.Counter[str],
    accepted_at: dict[str, float],
    seconds: float,
    logs: str,
) -> Outcome:
    statuses = collections.Counter[str]()
    lost: list[int] = []
    late: list[int] = []
    for reminder_id, status, skip_reason, error, sent_at, send_by, *_ in rows:
        ref = f"r{reminder_id}"
        ended = (
            (status == "sent" and accepted[ref] > 0)
            or (status == "skipped" and bool(skip_reason))
            or (status == "failed" and bool(error))
        )
        statuses[status if ended else "lost"] += 1
        if not ended:
            lost.append(reminder_id)
        taken_at = accepted_at.get(ref)
        if (taken_at is not None and taken_at > send_by.timestamp()) or (
            sent_at is not None and sent_at > send_by
        ):
            late.append(reminder_id)
    duplicates = {ref: n for ref, n in accepted.items() if n > 1}
    leaked = re.findall(r"\+?336\d{8}|Patient Nom\d+", logs)
    return Outcome(
        name=name,
        reminders=len(rows),
        sent=statuses["sent"],
        skipped=statuses["skipped"],
        failed=statuses["failed"],
        lost=len(lost),
        late=len(late),
        duplicates=sum(n - 1 for n in duplicates.values()),
        seconds=seconds,
        detail={
            "lost": lost[:20],
            "late": late[:20],
            "duplicated": sorted(duplicates)[:20],
            "leaked_to_logs": leaked[:5],
            "states": _states(rows, lost),
        },
    )


def _states(rows: list[Any], lost: list[int]) -> dict[str, int]:
    wanted = set(lost)
    return dict(
        collections.Counter(
            f"{row[1]}/receipt={row[6]}/attempts={row[7]}" for row in rows if row[0] in wanted
        )
    )


# --- damage ------------------------------------------------------------------------------------


def when(taken: Callable[[], int], at_least: int, seconds: float = 300) -> None:
    """Waits until the stand-in has taken `at_least` messages (or `seconds` pass)."""
    wait_for(lambda: taken() >= at_least, seconds, 0.05)
