"""MLLP intake benchmark: SIU messages per second over one connection, sequential ACKs.

    .venv/bin/python bench/intake_mllp.py [--count 3000] [--json]

It re-creates the PostgreSQL database `reminders_bench_mllp` (dropped first if it exists),
migrates it, adds a clinic (Europe/Paris), starts `reminders.siu.run` in a subprocess on a free
port and sends `--count` SIU messages on one connection, each waiting for its ACK: S12 for new
appointments (distinct patients, French mobiles, times in the coming weeks), with one in ten an
S14 (new room) for an appointment sent earlier. It prints messages/s and the p50/p99 ACK latency
(target: >= 300 messages/s), and the CPU per message of the server and of the PostgreSQL backends
(the machine's other work slows the wall-clock figures, less these). Exit code 0 when every ACK
was AA, 1 otherwise, 2 when the setup failed.

Environment: `REMINDERS_BENCH_DATABASE_URL` (default
`postgresql+psycopg://postgres@127.0.0.1:5432/reminders_bench_mllp`); the database named there is
dropped and re-created through the server's `postgres` maintenance database.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reminders.clinics import ClinicOptions, create_clinic  # noqa: E402
from reminders.db import make_engine, migrate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SetupError,
    free_port,
    postgres_cpu_seconds,
    process_cpu_seconds,
    recreate_database,
)

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/reminders_bench_mllp"
SECRET_KEY = "bench-secret-key-not-for-production-0123456789"
TARGET = 300.0  # messages/s
SB, EB, CR = b"\x0b", b"\x1c", b"\r"

TEMPLATE = "\r".join(
    [
        "MSH|^~\\&|EPIC|CHU_PARIS|REMINDERS|CLINIQUE|{sent}+0100||SIU^{trigger}^SIU_S12|{control}"
        "|P|2.5.1|||AL|NE||UNICODE UTF-8",
        "SCH|PL{n}^EPIC|FL{n}^EPIC||||ROUTINE^Routine^HL70276|CARDIO^Cardiologie^LOCAL"
        "|NORMAL^Routine^HL70277||||||||||||||||||Booked^Booked^HL70278",
        "TQ1|1||||||{start}|{end}",
        "PID|1||P{n}^^^CHU_PARIS^MR||PATIENT{n}^Marie^^^Mme^^L||19850315|F|||12 rue de la Paix"
        "^^Paris^^75002^FRA^H||^PRN^PH^^33^1^42123456~^PRN^CP^^33^6^{mobile}||fr^French^ISO639",
        "PV1|1|O|CARDIO^^^CHU_PARIS",
        "RGS|1|A",
        "AIS|1|A|CS-CARDIO^Consultation de cardiologie^LOCAL|{start}|||20|min",
        "AIL|1|A|CARDIO^S{room}^^CHU_PARIS^^^B^2^Cardiologie salle {room}",
        "AIP|1|A|12345^MARTIN^Jean^^^Dr|ATT^Attending^HL70443",
    ]
)


def database_url() -> str:
    return os.environ.get("REMINDERS_BENCH_DATABASE_URL", DEFAULT_URL)


def setup(url: str) -> int:
    """A fresh, migrated database with one clinic; returns its id."""
    recreate_database(url)
    engine = make_engine(url)
    try:
        migrate(engine)
        with Session(engine) as session, session.begin():
            clinic, _ = create_clinic(
                session,
                ClinicOptions(
                    name="Bench MLLP",
                    timezone="Europe/Paris",
                    country="FR",
                    language="fr",
                    sender="+33939000000",
                ),
            )
            return clinic.id
    finally:
        engine.dispose()


def messages(count: int) -> list[str]:
    """Deterministic SIU messages: S12s, and one S14 in ten for an earlier appointment."""
    base = dt.datetime.now().replace(hour=8, minute=0, second=0, microsecond=0)
    sent = dt.datetime(2026, 1, 1, 8, 0)
    out = []
    created = 0
    for i in range(count):
        if i % 10 == 9 and created:
            n, trigger, room = created - 5 if created > 5 else 1, "S14", 9
        else:
            created += 1
            n, trigger, room = created, "S12", 3
        start = base + dt.timedelta(days=3 + n % 40, minutes=20 * (n % 30))
        out.append(
            TEMPLATE.format(
                n=100000 + n,
                trigger=trigger,
                control=f"B{i:08d}",
                sent=(sent + dt.timedelta(seconds=i)).strftime("%Y%m%d%H%M%S"),
                start=start.strftime("%Y%m%d%H%M%S"),
                end=(start + dt.timedelta(minutes=20)).strftime("%Y%m%d%H%M%S"),
                mobile=f"{12000000 + n % 87999999:08d}",
                room=room,
            )
        )
    return out


def wait_ready(process: subprocess.Popen[bytes], port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SetupError(f"the MLLP server exited with code {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SetupError(f"the MLLP server did not listen within {timeout:.0f} s")


def read_ack(sock: socket.socket, pending: bytearray) -> bytes:
    while True:
        end = pending.find(EB + CR)
        if end >= 0:
            ack = bytes(pending[: end + 2])
            del pending[: end + 2]
            return ack
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        pending += chunk


def run(count: int) -> dict[str, float]:
    """Runs the benchmark; returns messages_per_s, p50_ms, p99_ms, count, not_aa."""
    url = database_url()
    clinic_id = setup(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(REMINDERS_DATABASE_URL=url, REMINDERS_SECRET_KEY=SECRET_KEY, PYTHONUNBUFFERED="1")
    port = free_port()
    code = f"from reminders.siu import run; run({clinic_id}, '127.0.0.1', {port})"
    payloads = [SB + m.encode() + EB + CR for m in messages(count)]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", code], env=env, cwd=ROOT, stdout=log, stderr=log
        )
        try:
            wait_ready(process, port)
            latencies: list[float] = []
            not_aa = 0
            pending = bytearray()
            database = make_url(url).database or ""
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                server_cpu = process_cpu_seconds(process.pid)
                pg_cpu = postgres_cpu_seconds(database)
                began = time.perf_counter()
                for payload in payloads:
                    sent = time.perf_counter()
                    sock.sendall(payload)
                    ack = read_ack(sock, pending)
                    latencies.append(time.perf_counter() - sent)
                    if b"MSA|AA|" not in ack:
                        not_aa += 1
                        if not_aa <= 5:
                            print(ack.decode(errors="replace").strip(), file=sys.stderr)
                elapsed = time.perf_counter() - began
                server_cpu = process_cpu_seconds(process.pid) - server_cpu
                pg_cpu = postgres_cpu_seconds(database) - pg_cpu
        except Exception:
            log.seek(0)
            print(log.read()[-4000:], file=sys.stderr)
            raise
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "count": float(count),
        "seconds": elapsed,
        "messages_per_s": count / elapsed,
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
        "not_aa": float(not_aa),
        "server_cpu_ms_per_message": 1000 * server_cpu / count,
        "postgres_cpu_ms_per_message": 1000 * pg_cpu / count,
        "load_average_1m": os.getloadavg()[0],
        "target_messages_per_s": TARGET,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="messages to send (3000)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    try:
        result = run(args.count)
    except SetupError as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        verdict = "ok" if result["messages_per_s"] >= TARGET else "BELOW TARGET"
        print(
            f"MLLP SIU intake: {result['count']:.0f} messages in {result['seconds']:.1f} s = "
            f"{result['messages_per_s']:.0f} messages/s (target >= {TARGET:.0f}: {verdict}); "
            f"ACK latency p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms; "
            f"not AA: {result['not_aa']:.0f}\n"
            f"CPU per message: MLLP server {result['server_cpu_ms_per_message']:.2f} ms, "
            f"PostgreSQL {result['postgres_cpu_ms_per_message']:.2f} ms "
            f"(machine load average {result['load_average_1m']:.1f} on 2 cores)"
        )
    return 0 if result["not_aa"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
