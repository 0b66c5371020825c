"""FHIR intake benchmark: Appointments per second through `PUT /fhir/Appointment/{id}`.

    .venv/bin/python bench/intake_fhir.py [--count 3000] [--concurrency 4] [--json]

Creates a fresh PostgreSQL database (`reminders_bench_fhir`, dropped first if it exists), runs
`reminders migrate`, adds a clinic (`reminders clinic add ... --json`), starts `reminders api` on
a free port and PUTs `--count` realistic R4 Appointments (each with a contained Patient, an
Epic-style body of ~1.2 KB) `--concurrency` requests at a time, twice: the first pass must answer
`created` for each, the re-run of the same bodies `unchanged`. Prints appointments/s, the
p50/p99 latency and the CPU per appointment of the API server and PostgreSQL of each pass. Exit
code 0 when every answer was the expected one, 1 otherwise, 2 when the setup failed.

Environment: `REMINDERS_BENCH_DATABASE_URL` (default
`postgresql+psycopg://postgres@127.0.0.1:5432/reminders_bench_fhir`); the database named there is
dropped and re-created through the server's `postgres` maintenance database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import httpx
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SetupError,
    free_port,
    postgres_cpu_seconds,
    process_cpu_seconds,
    recreate_database,
    reminders_cli,
    reminders_env,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/reminders_bench_fhir"
FHIR_JSON = "application/fhir+json"

GIVEN = ("Marie", "Jean", "Sophie", "Lucas", "Léa", "Hugo", "Chloé", "Inès", "Thomas", "Zoé")
FAMILY = ("Martin", "Bernard", "Dubois", "Lefèvre", "Nguyen", "Moreau", "Da Silva", "Benali")
PRACTITIONERS = ("Dr Martin", "Dr Bernard", "Dr Nguyen", "Dr Lefèvre", "Mme Petit (IDE)")
LOCATIONS = ("Cabinet 1", "Cabinet 2", "Salle de soins", "Radiologie", "Site Nord - Cabinet A")
SERVICES = (("1004", "Consultation de suivi"), ("1001", "Première consultation"), ("2001", "Bilan"))
LANGUAGES = ("fr", "fr-FR", "en", "ru", "zh-CN")


def appointment(rng: random.Random, index: int, today: dt.date) -> dict[str, Any]:
    """An Epic-style R4 Appointment with a contained Patient, 2-30 days ahead."""
    start = dt.datetime.combine(
        today + dt.timedelta(days=rng.randrange(2, 30)),
        dt.time(rng.randrange(8, 18), rng.choice((0, 15, 30, 45))),
        tzinfo=dt.timezone(dt.timedelta(hours=1)),
    )
    minutes = rng.choice((15, 20, 30, 45))
    mobile = "06 12 " + " ".join(f"{rng.randrange(100):02d}" for _ in range(3))
    code, display = rng.choice(SERVICES)
    return {
        "resourceType": "Appointment",
        "meta": {"lastUpdated": "2026-11-20T10:00:00Z"},
        "contained": [
            {
                "resourceType": "Patient",
                "id": "pat",
                "identifier": [
                    {
                        "use": "usual",
                        "system": "urn:oid:1.2.250.1.71.4.2.1",
                        "value": f"MRN{index:07d}",
                    }
                ],
                "name": [
                    {"use": "official", "family": rng.choice(FAMILY), "given": [rng.choice(GIVEN)]}
                ],
                "telecom": [
                    {"system": "phone", "value": "01 42 34 56 78", "use": "home"},
                    {"system": "phone", "value": mobile, "use": "mobile"},
                ],
                "birthDate": f"{rng.randrange(1940, 2015)}-0{rng.randrange(1, 10)}-15",
                "communication": [
                    {
                        "language": {
                            "coding": [{"system": "urn:ietf:bcp:47", "code": rng.choice(LANGUAGES)}]
                        },
                        "preferred": True,
                    }
                ],
            }
        ],
        "identifier": [
            {"system": "urn:oid:1.2.840.114350.1.13.0.1.7.3.698084.8", "value": f"CSN{index:07d}"}
        ],
        "status": "booked",
        "serviceType": [
            {
                "coding": [
                    {
                        "system": "urn:oid:1.2.840.114350.1.13.0.1.7.10.698084.30",
                        "code": code,
                        "display": display,
                    }
                ]
            }
        ],
        "start": start.isoformat(),
        "end": (start + dt.timedelta(minutes=minutes)).isoformat(),
        "participant": [
            {"actor": {"reference": "#pat"}, "required": "required", "status": "accepted"},
            {
                "actor": {
                    "reference": f"Practitioner/{rng.randrange(40)}",
                    "display": rng.choice(PRACTITIONERS),
                },
                "status": "accepted",
            },
            {
                "actor": {
                    "reference": f"Location/{rng.randrange(10)}",
                    "display": rng.choice(LOCATIONS),
                },
                "status": "accepted",
            },
        ],
    }


def wait_ready(process: subprocess.Popen[bytes], base_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SetupError(f"`reminders api` exited with code {process.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{base_url}/healthz").status_code == 200:
                    return
            time.sleep(0.1)
    raise SetupError(f"`reminders api` not ready after {timeout:.0f} s")


# `reminders api`, with the FHIR router included when create_app() does not wire it yet.
SERVE = """
import sys
from reminders import api, fhir
from reminders.cli import main

plain = api.create_app
def create_app():
    app = plain()
    if not any(str(getattr(r, "path", "")).startswith("/fhir") for r in app.routes):
        app.include_router(fhir.router)
    return app
api.create_app = create_app
sys.argv = ["reminders", *sys.argv[1:]]
main()
"""


@contextlib.contextmanager
def api_server(env: dict[str, str], port: int, log: IO[str]) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-c", SERVE, "api", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def run_pass(
    base_url: str, key: str, bodies: list[tuple[str, bytes]], concurrency: int, expected: str
) -> dict[str, Any]:
    """PUTs every body, `concurrency` at a time; the rate, latencies and unexpected answers."""
    latencies: list[float] = []
    results: Counter[str] = Counter()
    queue = iter(bodies)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": FHIR_JSON}

    async def worker(client: httpx.AsyncClient) -> None:
        for external_id, body in queue:
            started = time.perf_counter()
            response = await client.put(
                f"/fhir/Appointment/{external_id}", content=body, headers=headers
            )
            latencies.append(time.perf_counter() - started)
            result = response.headers.get("x-reminders-result", f"HTTP {response.status_code}")
            if result != expected and sum(n for r, n in results.items() if r != expected) < 5:
                print(
                    f"{external_id}: {response.status_code} {response.text[:300]}", file=sys.stderr
                )
            results[result] += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "rate": len(bodies) / elapsed,
        "seconds": elapsed,
        "p50_ms": cuts[49] * 1000,
        "p99_ms": cuts[98] * 1000,
        "errors": sum(n for r, n in results.items() if r != expected),
        "results": dict(results),
    }


def run(count: int, concurrency: int = 4, seed: int = 6) -> dict[str, float]:
    """Sets up a fresh database and API server, PUTs `count` Appointments twice; the figures."""
    rng = random.Random(seed)
    today = dt.date.today()
    bodies = [
        (f"CSN{i:07d}", json.dumps(appointment(rng, i, today), ensure_ascii=False).encode())
        for i in range(count)
    ]
    database_url = os.environ.get("REMINDERS_BENCH_DATABASE_URL", DEFAULT_URL)
    env = reminders_env(database_url)
    recreate_database(database_url)
    reminders_cli(["migrate"], env)
    clinic = json.loads(
        reminders_cli(
            ["clinic", "add", "Bench FHIR", "--timezone", "Europe/Paris", "--country", "FR",
             "--language", "fr", "--json"],
            env,
        )
    )  # fmt: skip
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with (
        tempfile.NamedTemporaryFile("w+", prefix="reminders-fhir-api-", suffix=".log") as log,
        api_server(env, port, log) as server,
    ):
        try:
            wait_ready(server, base_url)
        except SetupError:
            log.seek(0)
            print(log.read()[-3000:], file=sys.stderr)
            raise
        database = make_url(database_url).database or ""
        cpu: dict[str, tuple[float, float]] = {}
        passes: dict[str, dict[str, Any]] = {}
        for expected in ("created", "unchanged"):
            api_before = process_cpu_seconds(server.pid)
            pg_before = postgres_cpu_seconds(database)
            passes[expected] = asyncio.run(
                run_pass(base_url, clinic["api_key"], bodies, concurrency, expected)
            )
            cpu[expected] = (
                process_cpu_seconds(server.pid) - api_before,
                postgres_cpu_seconds(database) - pg_before,
            )
        first, rerun = passes["created"], passes["unchanged"]
    return {
        "count": float(count),
        "concurrency": float(concurrency),
        "body_bytes": sum(len(b) for _, b in bodies) / len(bodies),
        "created_per_s": first["rate"],
        "created_p50_ms": first["p50_ms"],
        "created_p99_ms": first["p99_ms"],
        "created_errors": float(first["errors"]),
        "unchanged_per_s": rerun["rate"],
        "unchanged_p50_ms": rerun["p50_ms"],
        "unchanged_p99_ms": rerun["p99_ms"],
        "unchanged_errors": float(rerun["errors"]),
        "created_api_cpu_ms": 1000 * cpu["created"][0] / count,
        "created_postgres_cpu_ms": 1000 * cpu["created"][1] / count,
        "unchanged_api_cpu_ms": 1000 * cpu["unchanged"][0] / count,
        "unchanged_postgres_cpu_ms": 1000 * cpu["unchanged"][1] / count,
        "load_average_1m": os.getloadavg()[0],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=3000, help="appointments (default 3000)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests at a time (4)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    try:
        figures = run(args.count, args.concurrency)
    except SetupError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(
            f"FHIR PUT /fhir/Appointment/{{id}}: {args.count} Appointments, "
            f"{args.concurrency} at a time, {figures['body_bytes']:.0f} bytes each, "
            f"{os.cpu_count()} cores"
        )
        for name in ("created", "unchanged"):
            print(
                f"  {name:9}: {figures[f'{name}_per_s']:7.1f} appointments/s, "
                f"p50 {figures[f'{name}_p50_ms']:6.1f} ms, "
                f"p99 {figures[f'{name}_p99_ms']:6.1f} ms, "
                f"{figures[f'{name}_errors']:.0f} unexpected; CPU per appointment: API "
                f"{figures[f'{name}_api_cpu_ms']:.2f} ms, "
                f"PostgreSQL {figures[f'{name}_postgres_cpu_ms']:.2f} ms"
            )
        print(f"  (machine load average {figures['load_average_1m']:.1f})")
    return 1 if figures["created_errors"] or figures["unchanged_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
