"""`python -m tests.faults.launch ARGS...`: the `reminders` command, with some module timings
shortened so that the fault suite sees a sweep in seconds rather than minutes.

`FAULT_TIMINGS` holds comma-separated `module.NAME=seconds` pairs (modules under `reminders`): an
int constant takes the number, a timedelta constant that many seconds. A name that no longer
exists is an error, never a silent no-op: the suite must not believe it shortened what it did not.
"""

from __future__ import annotations

import datetime as dt
import importlib
import os


def apply(spec: str) -> None:
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        target, _, raw = pair.partition("=")
        module_name, _, name = target.rpartition(".")
        module = importlib.import_module(f"reminders.{module_name}")
        if not hasattr(module, name):
            raise SystemExit(f"FAULT_TIMINGS: reminders.{module_name} has no {name}")
        current = getattr(module, name)
        if isinstance(current, dt.timedelta):
            setattr(module, name, dt.timedelta(seconds=float(raw)))
        elif isinstance(current, int):
            setattr(module, name, int(raw))
        else:
            raise SystemExit(f"FAULT_TIMINGS: reminders.{target} is neither int nor timedelta")


if __name__ == "__main__":
    apply(os.environ.get("FAULT_TIMINGS", ""))
    from reminders.cli import main

    main()
