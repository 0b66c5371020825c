"""What every benchmark needs around the thing it measures: its own PostgreSQL database, free
ports, the `reminders` command, and process figures read from /proc."""

from __future__ import annotations

import compileall
import os
import socket
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SECRET_KEY = "bench-secret-key-not-for-production-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")


DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/"


class SetupError(Exception):
    """The benchmark could not set itself up (a database, a process); the reason is in the text."""


def byte_compile() -> None:
    """Byte-compiles reminders' own modules beside their sources (`__pycache__`), as an installed
    package's are (pip compiles them on install; the Dockerfile installs so), before a benchmark
    starts `reminders` processes. Where PYTHONDONTWRITEBYTECODE is set (this machine sets it),
    no import writes them, and an editable install compiles reminders' 17,000 lines again at
    each start and at the first use of each lazily imported module: CPU no deployment pays.
    The interpreter still reads them (and checks each against its source)."""
    compileall.compile_dir(str(ROOT / "reminders"), quiet=1)


def bench_database_url(name: str) -> str:
    """The benchmark database `name` on the server of `REMINDERS_BENCH_DATABASE_URL` (default
    the local PostgreSQL), with the psycopg 3 driver."""
    base = make_url(os.environ.get("REMINDERS_BENCH_DATABASE_URL") or DEFAULT_SERVER)
    if base.get_backend_name() != "postgresql":
        raise SetupError("REMINDERS_BENCH_DATABASE_URL must be a postgresql:// URL")
    if base.drivername in ("postgresql", "postgresql+psycopg2"):
        base = base.set(drivername="postgresql+psycopg")
    return base.set(database=name).render_as_string(hide_password=False)


def admin(url: str, *statements: str) -> None:
    """Runs statements on the server's `postgres` database (CREATE/DROP DATABASE)."""
    parsed = make_url(url)
    engine = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            for statement in statements:
                connection.execute(text(statement))
    except Exception as exc:
        raise SetupError(f"database {parsed.database!r}: {exc}") from exc
    finally:
        engine.dispose()


def _quoted(url: str) -> str:
    name = make_url(url).database
    if not name:
        raise SetupError("no database name in the benchmark's database URL")
    return '"' + name.replace('"', '""') + '"'


def recreate_database(url: str) -> None:
    """Drops (closing its sessions) and creates the benchmark's own database."""
    quoted = _quoted(url)
    admin(url, f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)", f"CREATE DATABASE {quoted}")


def drop_database(url: str) -> None:
    admin(url, f"DROP DATABASE IF EXISTS {_quoted(url)} WITH (FORCE)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (which may contain spaces)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set size) of a process, from /proc/<pid>/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reminders_env(database_url: str) -> dict[str, str]:
    """This environment without REMINDERS_* settings, pointed at the benchmark's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env["REMINDERS_DATABASE_URL"] = database_url
    env["REMINDERS_SECRET_KEY"] = SECRET_KEY
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def reminders_cli(args: list[str], env: dict[str, str]) -> str:
    """Runs `reminders ARGS`; its stdout, or SetupError with its stderr."""
    command = [str(VENV_BIN / "reminders"), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise SetupError(
            f"`reminders {' '.join(args)}` exited {done.returncode}: "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    return done.stdout


def machine_busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK_TCK


def postgres_cpu_seconds(database: str) -> float:
    """CPU seconds (user + system) of the PostgreSQL backends serving `database` (when the
    server runs on this machine; 0.0 otherwise)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if not cmdline.startswith(b"postgres: ") or f" {database} ".encode() not in cmdline:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process of this machine."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
