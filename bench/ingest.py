"""Ingestion benchmark: 100,000 appointments through `POST /v1/appointments/batch`, twice.

    .venv/bin/python bench/ingest.py [--count 100000] [--batch 1000] [--concurrency 2] [--json]

It creates a fresh PostgreSQL database (`reminders_bench`, dropped first if it exists), runs
`reminders migrate`, adds a clinic, starts `reminders api` on a free port and posts realistic,
deterministic appointments in batches, `--concurrency` requests at a time:

- first pass: every result must be `created` (target: >= 3,000 appointments/s);
- re-run of exactly the same batches: every result must be `unchanged` (target: >= 2x faster).

It prints the throughput of each pass, the CPU seconds of the API server, of the PostgreSQL
backends serving the bench database (when PostgreSQL runs on this machine) and of the whole
machine (other work on it skews the figures), and the API server's peak RSS. Exit code 0 when
every result was the expected one, 1 otherwise (the unexpected results are printed), 2 when the
setup failed.

Concurrency: 2 requests at a time by default, so that the API's Python work (one process, the
GIL) overlaps PostgreSQL's. Batches that create the same new patient at once are retried by the
API (a unique violation or a deadlock, re-run with the rows now visible), so every result is still
the expected one; more than 2 does not help on 2 cores.

Environment: `REMINDERS_BENCH_DATABASE_URL` (default
`postgresql+psycopg://postgres@127.0.0.1:5432/reminders_bench`); the database named there is
dropped and re-created, through the server's `postgres` maintenance database.
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
import subprocess
import sys
import tempfile
import time
import zoneinfo
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

import httpx
import phonenumbers
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SetupError,
    free_port,
    machine_busy_seconds,
    peak_rss_mib,
    recreate_database,
    reminders_cli,
    reminders_env,
    stat_fields,
)

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/reminders_bench"
TIMEZONE = "Europe/Paris"
FIRST_TARGET = 3000.0  # appointments/s
RERUN_TARGET = 2.0  # re-run speed-up over the first pass
DEFAULT_CONCURRENCY = 2  # see "Concurrency" in the docstring
CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_PRINTED_ERRORS = 20

console = Console(stderr=True)


# --------------------------------------------------------------------------------------------
# Realistic, deterministic data


FIRST_NAMES_FR = (
    "Marie",
    "Jean",
    "Pierre",
    "Sophie",
    "Camille",
    "Lucas",
    "Léa",
    "Hugo",
    "Chloé",
    "Louis",
    "Emma",
    "Gabriel",
    "Manon",
    "Jules",
    "Inès",
    "Thomas",
    "Sarah",
    "Nicolas",
    "Julie",
    "Éric",
    "Amélie",
    "François",
    "Hélène",
    "Benoît",
    "Zoé",
    "Noémie",
    "Théo",
    "Anaïs",
    "Mathis",
    "Yasmine",
)
LAST_NAMES_FR = (
    "Martin",
    "Bernard",
    "Dubois",
    "Thomas",
    "Robert",
    "Richard",
    "Petit",
    "Durand",
    "Leroy",
    "Moreau",
    "Simon",
    "Laurent",
    "Lefèvre",
    "Michel",
    "Garcia",
    "David",
    "Bertrand",
    "Roux",
    "Vincent",
    "Fournier",
    "Morel",
    "Girard",
    "André",
    "Lefebvre",
    "Mercier",
    "Dupont",
    "Lambert",
    "Bonnet",
    "François",
    "Martinez",
    "N'Diaye",
    "Benali",
    "Nguyen",
    "Le Gall",
    "Da Silva",
)
NAMES_EN = (
    "Oliver Smith",
    "Amelia Jones",
    "George Taylor",
    "Isla Brown",
    "Harry Williams",
    "Ava Wilson",
    "Jack Evans",
    "Mia Thomas",
    "Charlie Roberts",
    "Emily Johnson",
)
NAMES_RU = (
    "Иван Петров",
    "Анна Смирнова",
    "Дмитрий Иванов",
    "Ольга Кузнецова",
    "Сергей Попов",
    "Елена Соколова",
    "Алексей Лебедев",
    "Наталья Козлова",
    "Михаил Новиков",
    "Мария Морозова",
)
NAMES_ZH = ("王伟", "李娜", "张敏", "刘洋", "陈静", "杨磊", "赵丽", "黄强", "周杰", "吴芳")
PRACTITIONERS = (
    "Dr Martin",
    "Dr Bernard",
    "Dr Dubois",
    "Dr Lefèvre",
    "Dr Nguyen",
    "Dr Moreau",
    "Dr Girard",
    "Dr Benali",
    "Dr Fournier",
    "Dr Roux",
    "Dr Chevalier",
    "Dr Lambert",
    "Mme Petit (IDE)",
    "M. Garnier (kiné)",
    "Mme Rousseau (sage-femme)",
    "Dr Da Silva",
)
LOCATIONS = (
    "Cabinet 1",
    "Cabinet 2",
    "Cabinet 3",
    "Cabinet 4",
    "Salle de soins",
    "Téléconsultation",
    "Site Nord - Cabinet A",
    "Site Nord - Cabinet B",
    "Radiologie",
    "Kinésithérapie",
)
KINDS = (
    ("consultation", 50),
    ("suivi", 15),
    ("première consultation", 8),
    ("vaccination", 6),
    ("téléconsultation", 6),
    ("bilan", 5),
    ("soins infirmiers", 4),
    ("échographie", 3),
    ("kinésithérapie", 3),
)
DURATIONS = ((10, 5), (15, 30), (20, 25), (30, 25), (45, 10), (60, 5))
# (language sent, weight) for French patients; foreign numbers get their own language mostly.
LANGUAGES_FR = (("fr", 80), ("fre", 6), (None, 6), ("en", 4), ("ru", 2), ("zh-CN", 2))


def _weighted(rng: random.Random, choices: Sequence[tuple[Any, int]]) -> Any:
    return rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(n))


def _french_mobile(rng: random.Random) -> str:
    """A French mobile number written one of the ways clinic software stores them."""
    if rng.random() < 0.8:
        national = "6" + _digits(rng, 8)
    else:
        national = "7" + str(rng.randrange(3, 10)) + _digits(rng, 7)
    pairs = [national[1:][i : i + 2] for i in range(0, 8, 2)]
    style = rng.random()
    if style < 0.45:
        return f"0{national[0]} " + " ".join(pairs)  # 06 12 34 56 78
    if style < 0.65:
        return "0" + national  # 0612345678
    if style < 0.75:
        return f"0{national[0]}." + ".".join(pairs)  # 06.12.34.56.78
    if style < 0.80:
        return f"0{national[0]}-" + "-".join(pairs)  # 06-12-34-56-78
    if style < 0.90:
        return f"+33 {national[0]} " + " ".join(pairs)  # +33 6 12 34 56 78
    if style < 0.95:
        return "+33" + national  # +33612345678
    if style < 0.98:
        return f"0033 {national[0]} " + " ".join(pairs)  # 0033 6 12 34 56 78
    return f"(0){national[0]} " + " ".join(pairs)  # (0)6 12 34 56 78


def _french_landline(rng: random.Random) -> str:
    national = str(rng.randrange(1, 6)) + _digits(rng, 8)
    return f"0{national[0]} " + " ".join(national[1:][i : i + 2] for i in range(0, 8, 2))


def _uk_mobile(rng: random.Random) -> str:
    number = "7" + str(rng.choice((4, 5, 7, 8, 9))) + _digits(rng, 8)
    return rng.choice((f"+44 {number[:4]} {number[4:]}", f"+44{number}", f"0044 {number}"))


def _russian_mobile(rng: random.Random) -> str:
    number = "9" + str(rng.choice((0, 1, 2, 3, 5, 6, 8))) + _digits(rng, 8)
    return rng.choice(
        (
            f"+7 {number[:3]} {number[3:6]}-{number[6:8]}-{number[8:]}",
            f"+7{number}",
            f"+7 ({number[:3]}) {number[3:6]} {number[6:8]} {number[8:]}",
        )
    )


def _chinese_mobile(rng: random.Random) -> str:
    number = "1" + str(rng.choice((3, 5, 8))) + _digits(rng, 9)
    return rng.choice((f"+86 {number[:3]} {number[3:7]} {number[7:]}", f"+86{number}"))


def _valid(rng: random.Random, make: Callable[[random.Random], str]) -> str:
    """A number from `make` that is valid (some ranges are unassigned or overseas): every
    appointment of the benchmark must be accepted."""
    while True:
        number = make(rng)
        if phonenumbers.is_valid_number(phonenumbers.parse(number, "FR")):
            return number


def _patient(rng: random.Random, index: int) -> dict[str, Any]:
    origin = rng.random()
    name: str | None
    phone: str | None
    if origin < 0.90:
        phone = _valid(rng, _french_mobile if rng.random() < 0.93 else _french_landline)
        language = _weighted(rng, LANGUAGES_FR)
        name = f"{rng.choice(FIRST_NAMES_FR)} {rng.choice(LAST_NAMES_FR)}"
    elif origin < 0.94:
        phone, language = _valid(rng, _uk_mobile), rng.choice(("en", "en", "fr"))
        name = rng.choice(NAMES_EN)
    elif origin < 0.97:
        phone, language = _valid(rng, _russian_mobile), rng.choice(("ru", "ru", "fr"))
        name = rng.choice(NAMES_RU)
    else:
        phone, language = _valid(rng, _chinese_mobile), rng.choice(("zh-CN", "zh-CN", "fr"))
        name = rng.choice(NAMES_ZH)
    if rng.random() < 0.01:
        phone = None  # no number on file: stored, never reminded
    if rng.random() < 0.02:
        name = None
    patient: dict[str, Any] = {"external_id": f"PAT{index:07d}", "name": name, "phone": phone}
    if language is not None:
        patient["language"] = language
    return patient


def generate(count: int, seed: int, today: dt.date) -> list[dict[str, Any]]:
    """`count` appointments over the 90 days after `today`, ~1.5 per patient, in a shuffled
    order (patients are shared across batches, as in a real export)."""
    rng = random.Random(seed)
    tz = zoneinfo.ZoneInfo(TIMEZONE)
    patients_count = max(1, round(count / 1.5))
    patients = [_patient(rng, i) for i in range(patients_count)]
    # Each patient gets 1 or 2 appointments (the mean is 1.5), then the order is shuffled.
    owners = list(range(patients_count))
    owners += rng.sample(owners, min(patients_count, count - patients_count))
    while len(owners) < count:
        owners.append(rng.randrange(patients_count))
    owners = owners[:count]
    rng.shuffle(owners)
    updated_base = dt.datetime.combine(today, dt.time(6, 0), tz)
    appointments = []
    for index, owner in enumerate(owners):
        day = today + dt.timedelta(days=rng.randrange(1, 91))
        if day.weekday() == 6:  # closed on Sundays
            day += dt.timedelta(days=1)
        last_hour = 12 if day.weekday() == 5 else 19
        minutes = rng.randrange(8 * 60, last_hour * 60, 5)
        start = dt.datetime.combine(day, dt.time(minutes // 60, minutes % 60), tz)
        item: dict[str, Any] = {
            "external_id": f"RDV-{index + 1:08d}",
            "starts_at": start.isoformat(),  # the offset changes with daylight saving time
            "duration_minutes": _weighted(rng, DURATIONS),
            "patient": patients[owner],
            "practitioner": rng.choice(PRACTITIONERS),
            "location": rng.choice(LOCATIONS),
            "kind": _weighted(rng, KINDS),
            "status": "booked",
        }
        if rng.random() < 0.7:
            updated = updated_base - dt.timedelta(seconds=rng.randrange(0, 30 * 86400))
            item["source_updated_at"] = updated.isoformat()
        appointments.append(item)
    return appointments


def encode_batches(appointments: list[dict[str, Any]], size: int) -> list[tuple[list[str], bytes]]:
    """The request bodies, encoded once so that both passes send the very same bytes."""
    batches = []
    for start in range(0, len(appointments), size):
        chunk = appointments[start : start + size]
        body = json.dumps({"appointments": chunk}, ensure_ascii=False).encode()
        batches.append(([a["external_id"] for a in chunk], body))
    return batches


# --------------------------------------------------------------------------------------------
# Processes: database, CLI, server


def wait_ready(process: subprocess.Popen[bytes], base_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SetupError(f"`reminders api` exited with code {process.returncode}")
            try:
                response = client.get(f"{base_url}/readyz")
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.TransportError as exc:
                last = type(exc).__name__
            time.sleep(0.1)
    raise SetupError(f"`reminders api` not ready after {timeout:.0f} s: {last}")


def stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM (uvicorn finishes in-flight requests), SIGKILL if it does not stop in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _postgres_processes() -> dict[int, float]:
    """CPU seconds of every readable process named `postgres` on this machine, by pid."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if (entry / "comm").read_text().strip() == "postgres":
                found[int(entry.name)] = cpu_seconds(int(entry.name))
    return found


class PostgresCpu:
    """CPU seconds used by the PostgreSQL backends serving one database during a pass.

    Other databases on the same server (other sessions' tests) are left out: the backends are
    those connected to `database` at the end of the pass. None when PostgreSQL runs elsewhere.
    """

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        self.database = url.database
        self.admin = create_engine(url.set(database="postgres"), poolclass=NullPool)
        self.before: dict[int, float] = {}

    def start(self) -> None:
        self.before = _postgres_processes()

    def stop(self) -> float | None:
        after = _postgres_processes()
        try:
            with self.admin.connect() as connection:
                pids = (
                    connection.execute(
                        text("SELECT pid FROM pg_stat_activity WHERE datname = :name"),
                        {"name": self.database},
                    )
                    .scalars()
                    .all()
                )
        except Exception:  # statistics are a bonus: never fail the benchmark for them
            return None
        used = [after[pid] - self.before.get(pid, 0.0) for pid in pids if pid in after]
        return sum(used) if used else None


# --------------------------------------------------------------------------------------------
# The passes


@dataclass
class PassResult:
    name: str
    expected: str
    appointments: int
    seconds: float
    rate: float
    results: dict[str, int]
    errors: int
    http_errors: int
    server_cpu_seconds: float
    postgres_cpu_seconds: float | None
    client_cpu_seconds: float
    machine_cpu_seconds: float
    latency_p50_ms: float
    latency_max_ms: float
    samples: list[str] = field(default_factory=list)


async def run_pass(
    name: str,
    expected: str,
    base_url: str,
    api_key: str,
    batches: list[tuple[list[str], bytes]],
    concurrency: int,
    server_pid: int,
    postgres: PostgresCpu,
) -> PassResult:
    counts: Counter[str] = Counter()
    samples: list[str] = []  # batch-level failures, then item-level ones grouped by kind
    unexpected: Counter[str] = Counter()  # item-level, by what came back
    examples: dict[str, list[str]] = {}
    latencies: list[float] = []
    http_errors = 0
    queue: asyncio.Queue[tuple[list[str], bytes]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    total = sum(len(ids) for ids, _ in batches)

    def sample(message: str) -> None:
        if len(samples) < MAX_PRINTED_ERRORS:
            samples.append(message)

    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    progress = Progress(
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("appointments"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=httpx.Timeout(300.0)
    ) as client:

        async def worker(task: Any) -> None:
            nonlocal http_errors
            while True:
                try:
                    ids, body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/appointments/batch", content=body)
                except httpx.HTTPError as exc:
                    http_errors += 1
                    counts["http error"] += len(ids)
                    sample(f"batch {ids[0]}..{ids[-1]}: {type(exc).__name__}: {exc}")
                    progress.advance(task, len(ids))
                    continue
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    http_errors += 1
                    counts[f"http {response.status_code}"] += len(ids)
                    sample(
                        f"batch {ids[0]}..{ids[-1]}: HTTP {response.status_code}: "
                        f"{response.text[:300]}"
                    )
                else:
                    results = response.json()["results"]
                    if len(results) != len(ids):
                        sample(
                            f"batch {ids[0]}..{ids[-1]}: {len(results)} results "
                            f"for {len(ids)} appointments"
                        )
                        counts["missing"] += max(0, len(ids) - len(results))
                    for sent_id, result in zip(ids, results, strict=False):
                        outcome = result.get("result")
                        counts[str(outcome)] += 1
                        if outcome != expected or result.get("external_id") != sent_id:
                            kind = _describe_unexpected(result, sent_id)
                            unexpected[kind] += 1
                            examples.setdefault(kind, [])
                            if len(examples[kind]) < 3:
                                examples[kind].append(sent_id)
                progress.advance(task, len(ids))

        server_cpu = cpu_seconds(server_pid)
        postgres.start()
        machine_cpu = machine_busy_seconds()
        client_cpu = time.process_time()
        with progress:
            task = progress.add_task(name, total=total)
            started = time.perf_counter()
            await asyncio.gather(*(worker(task) for _ in range(concurrency)))
            seconds = time.perf_counter() - started
        server_cpu = cpu_seconds(server_pid) - server_cpu
        postgres_cpu = postgres.stop()
        machine_cpu = machine_busy_seconds() - machine_cpu
        client_cpu = time.process_time() - client_cpu

    latencies.sort()
    for kind, n in unexpected.most_common(MAX_PRINTED_ERRORS):
        samples.append(f"{n} x {kind} (e.g. {', '.join(examples[kind])})")
    errors = max(total - counts[expected], sum(unexpected.values()))
    return PassResult(
        name=name,
        expected=expected,
        appointments=total,
        seconds=seconds,
        rate=total / seconds if seconds > 0 else float("inf"),
        results=dict(counts),
        errors=errors,
        http_errors=http_errors,
        server_cpu_seconds=server_cpu,
        postgres_cpu_seconds=postgres_cpu,
        client_cpu_seconds=client_cpu,
        machine_cpu_seconds=machine_cpu,
        latency_p50_ms=1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
        latency_max_ms=1000 * latencies[-1] if latencies else float("nan"),
        samples=samples,
    )


def _describe_unexpected(result: dict[str, Any], sent_id: str) -> str:
    kind = f"result {result.get('result')!r}"
    if result.get("external_id") != sent_id:
        kind += f" for external_id {result.get('external_id')!r}"
    error = result.get("error")
    if isinstance(error, dict):
        kind += f": {error.get('detail') or error.get('title')}"
    return kind


# --------------------------------------------------------------------------------------------
# Reporting


def describe_pass(p: PassResult, out: TextIO) -> None:
    other = sum(v for k, v in p.results.items() if k != p.expected)
    postgres = ""
    if p.postgres_cpu_seconds is not None:
        postgres = f", PostgreSQL (this database) {p.postgres_cpu_seconds:.1f} s"
    flag = f"  <-- {other} unexpected" if other else ""
    print(f"  {p.name}: results {p.results}{flag}", file=out)
    print(
        f"    CPU: API server {p.server_cpu_seconds:.1f} s"
        f" ({100 * p.server_cpu_seconds / p.seconds:.0f}% of one core){postgres},"
        f" bench client {p.client_cpu_seconds:.1f} s, whole machine {p.machine_cpu_seconds:.1f} s"
        f" of {p.seconds * (os.cpu_count() or 1):.1f} s available",
        file=out,
    )
    print(
        f"    batch latency: median {p.latency_p50_ms:.0f} ms, max {p.latency_max_ms:.0f} ms",
        file=out,
    )
    for line in p.samples:
        print(f"    ! {line}", file=out)


def report(
    first: PassResult, rerun: PassResult, peak_rss: float, args: argparse.Namespace, out: TextIO
) -> None:
    ratio = rerun.rate / first.rate
    first_ok = "ok" if first.rate >= FIRST_TARGET else "MISSED"
    rerun_ok = "ok" if ratio >= RERUN_TARGET else "MISSED"
    print(
        f"ingest benchmark: {args.count} appointments, batches of {args.batch}, "
        f"{args.concurrency} concurrent request(s), {os.cpu_count()} cores",
        file=out,
    )
    print(
        f"first pass: {first.appointments} appointments in {first.seconds:.1f} s = "
        f"{first.rate:.0f} appointments/s (target >= {FIRST_TARGET:.0f}: {first_ok})",
        file=out,
    )
    print(
        f"re-run (all unchanged): {rerun.appointments} appointments in {rerun.seconds:.1f} s = "
        f"{rerun.rate:.0f} appointments/s, {ratio:.2f}x the first pass "
        f"(target >= {RERUN_TARGET:.0f}x: {rerun_ok})",
        file=out,
    )
    print(
        f"API server: {first.server_cpu_seconds:.1f} + {rerun.server_cpu_seconds:.1f} CPU s, "
        f"peak RSS {peak_rss:.0f} MiB",
        file=out,
    )
    describe_pass(first, out)
    describe_pass(rerun, out)
    errors = first.errors + rerun.errors
    print(f"errors: {errors}" + (" (see the ! lines above)" if errors else ""), file=out)


# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=100_000, help="appointments (default 100000)")
    parser.add_argument("--batch", type=int, default=1000, help="per request, at most 1000")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"requests at a time (default {DEFAULT_CONCURRENCY}, see the docstring)",
    )
    parser.add_argument("--seed", type=int, default=20261124, help="data seed")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument(
        "--keep-log", type=Path, default=None, help="also copy the API server's log to this file"
    )
    args = parser.parse_args(argv)
    if args.count < 1 or not 1 <= args.batch <= 1000 or args.concurrency < 1:
        parser.error("--count and --concurrency must be >= 1, --batch between 1 and 1000")
    return args


@contextlib.contextmanager
def api_server(env: dict[str, str], port: int, log: IO[str]) -> Iterator[subprocess.Popen[bytes]]:
    command = [str(VENV_BIN / "reminders"), "api", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        stop(process)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (and SIGINT, even when started in the background) unwind through the `finally`
    # blocks, so the API server is always stopped.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    database_url = os.environ.get("REMINDERS_BENCH_DATABASE_URL", DEFAULT_URL)
    env = reminders_env(database_url)

    started = time.perf_counter()
    appointments = generate(args.count, args.seed, dt.date.today())
    batches = encode_batches(appointments, args.batch)
    patients = len({a["patient"]["external_id"] for a in appointments})
    console.print(
        f"generated {len(appointments)} appointments for {patients} patients "
        f"in {time.perf_counter() - started:.1f} s "
        f"({sum(len(b) for _, b in batches) / 1e6:.1f} MB of JSON)"
    )

    log = tempfile.NamedTemporaryFile("w+", prefix="reminders-api-", suffix=".log")  # noqa: SIM115
    try:
        recreate_database(database_url)
        reminders_cli(["migrate"], env)
        clinic = json.loads(
            reminders_cli(
                [
                    "clinic",
                    "add",
                    "Bench",
                    "--timezone",
                    TIMEZONE,
                    "--country",
                    "FR",
                    "--language",
                    "fr",
                    "--json",
                ],
                env,
            )
        )
        postgres = PostgresCpu(database_url)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        with api_server(env, port, log) as server:
            wait_ready(server, base_url)
            console.print(
                f"reminders api (pid {server.pid}) ready at {base_url}, clinic {clinic['id']}"
            )
            first = asyncio.run(
                run_pass(
                    "first pass",
                    "created",
                    base_url,
                    clinic["api_key"],
                    batches,
                    args.concurrency,
                    server.pid,
                    postgres,
                )
            )
            rerun = asyncio.run(
                run_pass(
                    "re-run",
                    "unchanged",
                    base_url,
                    clinic["api_key"],
                    batches,
                    args.concurrency,
                    server.pid,
                    postgres,
                )
            )
            peak_rss = peak_rss_mib(server.pid)
    except SetupError as exc:
        console.print(f"[red]bench: {exc}[/red]")
        _show_log(log)
        return 2
    finally:
        if args.keep_log is not None:
            log.flush()
            args.keep_log.write_text(Path(log.name).read_text())

    failed = first.errors + rerun.errors > 0
    if failed:
        _show_log(log)
    log.close()
    if args.json:
        ratio = rerun.rate / first.rate
        print(
            json.dumps(
                {
                    "count": args.count,
                    "batch": args.batch,
                    "concurrency": args.concurrency,
                    "cores": os.cpu_count(),
                    "peak_rss_mib": peak_rss,
                    "rerun_speedup": ratio,
                    "targets": {
                        "first_rate": FIRST_TARGET,
                        "rerun_speedup": RERUN_TARGET,
                        "first_met": first.rate >= FIRST_TARGET,
                        "rerun_met": ratio >= RERUN_TARGET,
                    },
                    "first": asdict(first),
                    "rerun": asdict(rerun),
                },
                indent=2,
            )
        )
    else:
        report(first, rerun, peak_rss, args, sys.stdout)
    return 1 if failed else 0


def _show_log(log: Any) -> None:
    log.flush()
    tail = Path(log.name).read_text().splitlines()[-30:]
    if tail:
        console.print("[dim]last lines of the API server's log:[/dim]")
        for line in tail:
            console.print(line, markup=False, highlight=False)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        console.print(f"bench: interrupted ({exc or 'SIGINT'}); the API server was stopped")
        sys.exit(130)
