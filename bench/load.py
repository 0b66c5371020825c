"""Load benchmark: a fixed mix of clinic and patient traffic against `reminders api`, open loop.

    .venv/bin/python bench/load.py [--seconds 60] [--rate 100] [--appointments 2000] [--json]

Set-up: a fresh PostgreSQL database (`reminders_bench_load`, dropped first; server from
`REMINDERS_BENCH_DATABASE_URL`, default `postgresql+psycopg://postgres@127.0.0.1:5432/`),
migrated with `reminders migrate`, one clinic (`reminders clinic add --json`, its API key), Redis
db 12 flushed (`REMINDERS_BENCH_REDIS_URL`), ONE `reminders api` on a spare loopback port with the
vonage provider (no worker: answers to patients stay queued in Redis), and `--appointments`
appointments booked through the batch endpoint, each with one reminder marked sent (so a reply
applies to it).

Then, for `--seconds`, requests are offered at `--rate` per second whatever the earlier ones are
doing (open loop, at most `--connections` in flight; the rest wait for a connection on the clock),
in a fixed mix of ten: 4 appointment upserts (`PUT /v1/appointments/{id}`: 2 new bookings, 2
changes of booked ones), 3 patient link pages (`GET /c/{token}`), 1 link confirmation
(`POST /c/{token}`, each booking once) and 2 signed inbound SMS (`POST /webhooks/vonage/inbound`,
Vonage's form fields and signature; "1", "OUI", "hello?" in turn, each a new messageId).
Latency is response time minus PLANNED send time, so queueing anywhere counts.

Printed: offered and achieved requests/s, per route the count, statuses, p50 and p99 latency, and
"lost": requests without a 2xx answer, new bookings missing from the database, inbound SMS not
stored once each, link confirmations not recorded. Exit code 0 when nothing was lost, 1 otherwise,
2 when set-up failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    SECRET_KEY,
    VENV_BIN,
    SetupError,
    bench_database_url,
    drop_database,
    free_port,
    recreate_database,
    reminders_cli,
    reminders_env,
)

DATABASE = "reminders_bench_load"
DEFAULT_REDIS = "redis://127.0.0.1:6379/12"
SIGNATURE_SECRET = "bench-load-signature-secret"
SENDER = "+33939000000"
# Ten: 4 upserts, 3 link pages, 1 link confirmation, 2 inbound SMS.
MIX: tuple[str, ...] = ("put_new", "put_change", "link_get", "put_new", "inbound", "link_get")
MIX += ("put_change", "link_post", "link_get", "inbound")
ROUTES = {
    "put_new": "PUT /v1/appointments/{id} (new)",
    "put_change": "PUT /v1/appointments/{id} (change)",
    "link_get": "GET /c/{token}",
    "link_post": "POST /c/{token}",
    "inbound": "POST /webhooks/vonage/inbound",
}
REPLIES = ("1", "OUI", "hello?")


def database_url() -> str:
    return bench_database_url(DATABASE)


def phone(number: int) -> str:
    return f"+336{number:08d}"


def appointment(number: int, location: str = "Cabinet 1") -> dict[str, Any]:
    starts = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=3, hours=number)
    return {
        "starts_at": starts.isoformat(),
        "duration_minutes": 15,
        "location": location,
        "patient": {"external_id": f"P{number}", "phone": phone(number), "language": "fr"},
    }


@dataclasses.dataclass
class Planned:
    route: str
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]


@dataclasses.dataclass
class Done:
    route: str
    status: int  # 0: no answer
    latency: float


def inbound(number: int, message_id: str, reply: str) -> Planned:
    if str(ROOT) not in sys.path:  # once: a longer sys.path slows every later import
        sys.path.insert(0, str(ROOT))
    from tests.vonage_standin import sign

    now = time.time()
    params = {
        "msisdn": phone(number).lstrip("+"),
        "to": SENDER.lstrip("+"),
        "messageId": message_id,
        "text": reply,
        "type": "text",
        "message-timestamp": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)),
        "timestamp": str(int(now)),
        "nonce": message_id,
    }
    params["sig"] = sign(params, SIGNATURE_SECRET)
    form = {"content-type": "application/x-www-form-urlencoded"}
    body = urllib.parse.urlencode(params).encode()
    return Planned("inbound", "POST", "/webhooks/vonage/inbound", body, form)


def patient_address(n: int, first: str = "10") -> str:
    """A patient's address as the proxy in front reports it: one per 20 link requests, so the
    per-address limit (60 a minute) lets them through as real patients' phones would be."""
    group = n // 20
    return f"{first}.{group >> 16 & 255}.{group >> 8 & 255}.{group & 255}"


def plan(count: int, booked: int, tokens: Sequence[str], key: str) -> list[Planned]:
    """`count` requests in the fixed mix; new bookings get ids after the `booked` ones."""
    auth = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    counters: collections.Counter[str] = collections.Counter()
    planned: list[Planned] = []
    for index in range(count):
        route = MIX[index % len(MIX)]
        n = counters[route]
        counters[route] += 1
        if route == "put_new":
            number = booked + 1 + n
            body = json.dumps(appointment(number)).encode()
            planned.append(Planned(route, "PUT", f"/v1/appointments/A{number}", body, auth))
        elif route == "put_change":
            number = 1 + n % booked
            body = json.dumps(appointment(number, f"Cabinet {2 + n // booked}")).encode()
            planned.append(Planned(route, "PUT", f"/v1/appointments/A{number}", body, auth))
        elif route == "link_get":
            proxy = {"x-forwarded-for": patient_address(n)}
            planned.append(Planned(route, "GET", f"/c/{tokens[n % booked]}", None, proxy))
        elif route == "link_post":
            # From the end of the list, each booking once (inbound replies start at the front).
            form = {"content-type": "application/x-www-form-urlencoded"}
            form["x-forwarded-for"] = patient_address(n, "11")
            token = tokens[booked - 1 - n % booked]
            planned.append(Planned(route, "POST", f"/c/{token}", b"action=confirm", form))
        else:
            planned.append(inbound(1 + n % booked, f"load-{n}", REPLIES[n % len(REPLIES)]))
    return planned


async def open_loop(
    base_url: str, requests: Sequence[Planned], rate: float, connections: int
) -> list[Done]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    done: list[Done] = []
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=httpx.Timeout(30.0), trust_env=False
    ) as client:
        await asyncio.gather(*(client.get("/readyz") for _ in range(connections)))
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        gate = asyncio.Semaphore(connections)

        async def one(request: Planned, planned: float) -> None:
            try:
                async with gate:
                    response = await client.request(
                        request.method, request.path, content=request.body, headers=request.headers
                    )
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            done.append(Done(request.route, status, loop.time() - planned))

        tasks = []
        for index, request in enumerate(requests):
            planned = start + index / rate
            delay = planned - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request, planned)))
        await asyncio.gather(*tasks)
    return done


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


class Api:
    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "reminders"), "api", "--port", str(port)],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SetupError(f"reminders api exited: {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise SetupError("reminders api did not start within 60 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def seed(base_url: str, key: str, count: int) -> None:
    """`count` bookings through the batch endpoint, each with one reminder marked sent."""
    auth = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base_url, timeout=120, trust_env=False) as client:
        for first in range(1, count + 1, 1000):
            items = [
                {"external_id": f"A{n}", **appointment(n)}
                for n in range(first, min(count, first + 999) + 1)
            ]
            response = client.post(
                "/v1/appointments/batch", json={"appointments": items}, headers=auth
            )
            if response.status_code != 200:
                raise SetupError(f"seeding: {response.status_code} {response.text[:300]}")


def lost(
    url: str, requests: Sequence[Planned], done: Sequence[Done], booked: int
) -> dict[str, int]:
    """What the service dropped: non-2xx answers, and writes missing from the database."""
    counts = collections.Counter(r.route for r in requests)
    confirmed_ids = sorted({r.path for r in requests if r.route == "link_post"})
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            appointments = connection.scalar(text("SELECT count(*) FROM appointments")) or 0
            inbound_rows = connection.scalar(text("SELECT count(*) FROM inbound_messages")) or 0
            confirmed = connection.scalar(
                text(
                    "SELECT count(*) FROM appointments "
                    "WHERE link_token = ANY(:tokens) AND confirmation = 'confirmed'"
                ),
                {"tokens": [path.removeprefix("/c/") for path in confirmed_ids]},
            )
    finally:
        engine.dispose()
    return {
        "answers_not_2xx": sum(1 for d in done if not 200 <= d.status < 300),
        "bookings_missing": booked + counts["put_new"] - appointments,
        "inbound_not_stored": counts["inbound"] - inbound_rows,
        "confirmations_missing": len(confirmed_ids) - (confirmed or 0),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    url = database_url()
    redis_url = os.environ.get("REMINDERS_BENCH_REDIS_URL") or DEFAULT_REDIS
    recreate_database(url)
    redis.Redis.from_url(redis_url).flushdb()
    env = reminders_env(url) | {
        "REMINDERS_REDIS_URL": redis_url,
        "REMINDERS_SMS_PROVIDER": "vonage",
        "REMINDERS_VONAGE_API_KEY": "bench",
        "REMINDERS_VONAGE_API_SECRET": "bench-secret",
        "REMINDERS_VONAGE_SIGNATURE_SECRET": SIGNATURE_SECRET,
        "REMINDERS_TRUSTED_PROXIES": "127.0.0.1",
    }
    reminders_cli(["migrate"], env)
    added = json.loads(
        reminders_cli(
            ["clinic", "add", "Clinique du Parc", "--timezone", "Europe/Paris",
             "--country", "FR", "--language", "fr", "--sender", SENDER, "--json"],
            env,
        )
    )  # fmt: skip
    key, clinic_id = added["api_key"], added["id"]
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-load-api-{os.getpid()}.log"
    api = Api(env, port, log)
    try:
        seed(base_url, key, args.appointments)
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "UPDATE reminders SET status = 'sent', sent_at = now() WHERE id IN "
                    "(SELECT min(id) FROM reminders GROUP BY appointment_id)"
                )
            )
        engine.dispose()
        from reminders.security import link_token

        tokens = [
            link_token(SECRET_KEY.encode(), clinic_id, f"A{n}")
            for n in range(1, args.appointments + 1)
        ]
        requests = plan(int(args.rate * args.seconds), args.appointments, tokens, key)
        started = time.monotonic()
        done = asyncio.run(open_loop(base_url, requests, args.rate, args.connections))
        elapsed = time.monotonic() - started
    finally:
        api.stop()
    missing = lost(url, requests, done, args.appointments)
    if not args.keep:
        drop_database(url)
    routes: dict[str, Any] = {}
    for route, label in ROUTES.items():
        mine = [d for d in done if d.route == route]
        routes[label] = {
            "count": len(mine),
            "statuses": dict(collections.Counter(str(d.status) for d in mine)),
            "p50_ms": round(percentile([d.latency for d in mine], 0.50) * 1000, 1),
            "p99_ms": round(percentile([d.latency for d in mine], 0.99) * 1000, 1),
        }
    return {
        "seconds": round(elapsed, 1),
        "offered_per_second": args.rate,
        "achieved_per_second": round(len(done) / elapsed, 1),
        "requests": len(done),
        "routes": routes,
        "lost": missing,
        "nothing_lost": not any(missing.values()),
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        f"load: {report['requests']} requests in {report['seconds']} s; offered "
        f"{report['offered_per_second']}/s, achieved {report['achieved_per_second']}/s"
    )
    print(f"{'route':<36} {'count':>6} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    for label, figures in report["routes"].items():
        print(
            f"{label:<36} {figures['count']:>6} {figures['p50_ms']:>8} {figures['p99_ms']:>8}  "
            f"{figures['statuses']}"
        )
    verdict = "nothing lost" if report["nothing_lost"] else "LOST"
    print(f"{verdict}: {report['lost']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second offered")
    parser.add_argument("--connections", type=int, default=32, help="at most this many in flight")
    parser.add_argument("--appointments", type=int, default=2000, help="booked before the load")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.appointments < 1:
        parser.error("--rate, --seconds and --appointments must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the api on the way out
    try:
        report = run(args)
    except SetupError as exc:
        print(f"bench/load.py: set-up failed: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0 if report["nothing_lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
