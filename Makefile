# One Makefile drives set-up, the daemon, tests, lint and types.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint fmt types check faults bench-ingest bench-scan bench-send bench-replies bench-formats bench-report bench-load validate-report clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project with its dev tools

run: $(STAMP)  ## start the daemon on embedded defaults (SQLite file, in-process broker, console SMS)
	$(BIN)/reminders run

# PostgreSQL and Redis tests run when REMINDERS_TEST_DATABASE_URL / REMINDERS_TEST_REDIS_URL
# are set, and skip otherwise; PYTEST_ARGS=--require-services turns those skips into failures.
test: $(STAMP)  ## run the test suite
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)  ## mypy --strict
	$(BIN)/mypy --strict

fmt: $(STAMP)  ## format and fix what ruff can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check: lint types test  ## everything CI runs

# The fault suite (tests/faults): its own PostgreSQL cluster and Redis, real processes, 2,000
# reminders per scenario; CI runs the short form (500) from .ci/run.
faults: $(STAMP)  ## nothing lost, late or sent twice while workers, Redis, PostgreSQL, Vonage fail
	REMINDERS_FAULTS=full $(BIN)/pytest -m faults tests/faults -p no:cacheprovider $(PYTEST_ARGS)

bench-ingest: $(STAMP)  ## appointments/s through the batch endpoint into PostgreSQL
	$(BIN)/python bench/ingest.py

bench-scan: $(STAMP)  ## idle tick and busy-hour claim rate over 1M appointments (PostgreSQL, Redis)
	$(BIN)/python bench/scan.py

bench-send: $(STAMP)  ## SMS/s, CPU and memory of one worker through Redis and the Vonage stand-in
	$(BIN)/python bench/send.py

bench-replies: $(STAMP)  ## signed replies and link pages under an open-loop load: latency
	$(BIN)/python bench/replies.py

bench-formats: $(STAMP)  ## MLLP messages/s, FHIR appointments/s, CSV rows/s and memory
	$(BIN)/python bench/intake_formats.py

bench-report: $(STAMP)  ## the weekly report over 2M appointments in PostgreSQL: time and memory
	$(BIN)/python bench/report.py

validate-report: $(STAMP)  ## 100 simulated clinics: the effect interval covers the truth
	$(BIN)/python bench/validate_report.py --seeds 100

bench-load: $(STAMP)  ## upserts, link pages and signed webhooks at a fixed rate: p50/p99, lost
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
