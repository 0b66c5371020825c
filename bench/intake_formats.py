"""The three other intake feeds side by side: SIU messages per second over MLLP (one
connection, sequential ACKs), FHIR Appointments per second, and CSV rows per second for a large
file with its peak memory. Each part can also be run alone (bench/intake_mllp.py, ...).

    .venv/bin/python bench/intake_formats.py [--mllp 3000] [--fhir 3000] [--csv-rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import intake_csv
import intake_fhir
import intake_mllp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mllp", type=int, default=3000, help="SIU messages")
    parser.add_argument("--fhir", type=int, default=3000, help="FHIR Appointments")
    parser.add_argument("--csv-rows", type=int, default=1_000_000, help="CSV rows")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    results = {
        "mllp": intake_mllp.run(args.mllp),
        "fhir": intake_fhir.run(args.fhir),
        "csv": intake_csv.run(args.csv_rows),
    }
    if args.json:
        print(json.dumps(results))
        return
    print("\nintake formats (targets: MLLP >= 300 messages/s, CSV >= 5,000 rows/s, flat memory)")
    for name, figures in results.items():
        shown = ", ".join(f"{key} {value:,.1f}" for key, value in figures.items())
        print(f"  {name}: {shown}")


if __name__ == "__main__":
    main()
