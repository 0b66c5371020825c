"""Proves the weekly report's effect interval on simulated clinics with a known truth.

100 seeds with a true relative effect of 0.4: `relative_ci95` must contain 0.4 in at least 90.
100 seeds with no effect: at most 10 may claim `significant`. SQLite in a temporary directory.

    .venv/bin/python bench/validate_report.py [--seeds 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from reminders import db
from reminders.simulate import validate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--effect", type=float, default=0.4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'validate.db'}"
        engine = db.make_engine(url)
        db.migrate(engine)
        engine.dispose()
        real = validate(url, args.seeds, args.effect)
        null = validate(url, args.seeds, 0.0, first_seed=args.seeds + 1)
    need_cover = -(-9 * args.seeds // 10)
    ok_cover = real.covered >= need_cover
    ok_null = null.significant <= args.seeds // 10
    print(
        f"effect {args.effect}: relative_ci95 covers it in {real.covered}/{args.seeds} "
        f"(need >= {need_cover}; {real.undefined} undefined; significant {real.significant}) "
        f"[{real.seconds} s] {'ok' if ok_cover else 'FAILED'}"
    )
    print(
        f"effect 0: significant in {null.significant}/{args.seeds} (need <= {args.seeds // 10}; "
        f"covers 0 in {null.covered}) [{null.seconds} s] {'ok' if ok_null else 'FAILED'}"
    )
    return 0 if ok_cover and ok_null else 1


if __name__ == "__main__":
    sys.exit(main())
