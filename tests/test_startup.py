"""What a worker imports at start: only the sending path (start-up time is every deploy's and
restart's, and a short run's whole cost; see bench/send.py)."""

from __future__ import annotations

import subprocess
import sys

# Modules the sending path must not need: the web stack, the scheduler's, the CLI's tables, the
# intake's schemas and language tables, and alembic (the schema check is one query).
NOT_FOR_SENDING = (
    "alembic",
    "apscheduler",
    "fastapi",
    "httpx",
    "langcodes",
    "phonenumbers",
    "reminders.planning",
    "reminders.schemas",
    "rich",
    "uvicorn",
)


def test_the_worker_path_imports_nothing_it_does_not_use() -> None:
    probe = (
        "import sys, reminders.actors, reminders.cli\n"
        f"print(','.join(m for m in {NOT_FOR_SENDING!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


def test_the_cli_itself_leaves_the_web_stack_and_the_scheduler_to_their_commands() -> None:
    probe = (
        "import sys, reminders.cli\n"
        "print(','.join(m for m in ('uvicorn', 'fastapi', 'apscheduler', 'alembic')"
        " if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
