"""The `reminders` command. Exit codes: 0 success; 1 some items rejected; 2 bad usage or
configuration, with a one-line reason on stderr."""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import dramatiq
import typer
from dramatiq.brokers.stub import StubBroker
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from reminders import actors, broker, clinics, db, dispatch, heap, scheduler, texts
from reminders.broker import QUEUE, QUEUES, REPLIES_QUEUE, WEBHOOK_QUEUE
from reminders.config import ConfigError, Settings, get_settings
from reminders.models import Clinic
from reminders.security import secret_key

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler
    from fastapi import FastAPI

    from reminders.serving import Server

# Each command imports what only it needs (uvicorn and the web stack, APScheduler, rich tables)
# inside it: a worker or scheduler then starts in a fraction of the time.

app = typer.Typer(
    name="reminders",
    help="Two-way SMS appointment reminders that cut no-shows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
clinic_app = typer.Typer(help="Create and configure clinics (tenants).", no_args_is_help=True)
app.add_typer(clinic_app, name="clinic")
template_app = typer.Typer(help="Check and set the SMS texts.", no_args_is_help=True)
app.add_typer(template_app, name="template")

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
HostOption = Annotated[str, typer.Option(help="Address to listen on.")]
PortOption = Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")]


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"reminders: {message}", err=True)
    raise typer.Exit(code)


def settings() -> Settings:
    try:
        return get_settings()
    except ConfigError as exc:
        fail(f"configuration error: {exc}")


def emit(as_json: bool, data: dict[str, Any], human: str) -> None:
    typer.echo(json.dumps(data, default=str) if as_json else human)


def prepare_database(config: Settings, *, auto_migrate: bool) -> None:
    """Migrates on SQLite (embedded defaults); elsewhere refuses a schema that is behind."""
    engine = db.get_engine()
    try:
        if auto_migrate and config.is_sqlite:
            db.migrate(engine)
        elif not db.schema_is_current(engine):
            fail("the database schema is not up to date: run `reminders migrate` first")
        with db.session_scope() as session:
            secret_key(session, config)  # embedded mode: made once, kept in the database
    except OperationalError as exc:
        fail(f"cannot reach the database: {exc.orig}")


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def make_server(host: str, port: int) -> Server:
    from reminders.serving import make_server as make

    _logging()
    return make(host, port)


def _jobs() -> BackgroundScheduler:
    """The scheduler's jobs, started."""
    from apscheduler.schedulers.background import BackgroundScheduler

    jobs = scheduler.add_jobs(BackgroundScheduler(timezone=dt.UTC))
    jobs.start()
    return jobs


def _until_signal() -> None:
    """Blocks until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _worker(broker: dramatiq.Broker, threads: int) -> dramatiq.Worker:
    # In-process queues are cheap to poll: a short timeout makes stopping quick.
    timeout = 100 if isinstance(broker, StubBroker) else 1000
    worker = dramatiq.Worker(
        broker, worker_threads=threads, queues=set(QUEUES), worker_timeout=timeout
    )
    worker.start()
    return worker


@app.command()
def run(host: HostOption = "127.0.0.1", port: PortOption = 8000) -> None:
    """HTTP API, scheduler and worker in one process (embedded defaults need nothing else)."""
    config = settings()
    prepare_database(config, auto_migrate=True)
    server = make_server(host, port)
    worker = _worker(actors.configure(config), threads=4)
    jobs = _jobs()
    heap.settle()
    try:
        server.run()  # until SIGTERM/SIGINT: in-flight requests finish, then we return
    finally:
        jobs.shutdown(wait=False)
        worker.stop(timeout=10_000)


@app.command()
def api(
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Processes serving the port (each with its own database pool and rate limiter).",
        ),
    ] = 1,
) -> None:
    """The HTTP API alone (production: run `reminders migrate` first)."""
    config = settings()
    prepare_database(config, auto_migrate=False)
    if workers == 1:
        broker.install(config)  # answers to patients are queued straight from the webhooks
        server = make_server(host, port)
        heap.settle()
        server.run()
        return
    from reminders.serving import serve_processes

    _logging()
    serve_processes("reminders.cli:api_app", host, port, workers)  # each builds `api_app`


def api_app() -> FastAPI:
    """The app of one `reminders api --workers N` process."""
    from reminders.api import create_app

    _logging()
    broker.install(settings())
    created = create_app()
    heap.settle()
    return created


def _needs_redis(part: str) -> Settings:
    config = settings()
    if config.embedded:
        fail(f"`reminders {part}` needs REMINDERS_REDIS_URL; without Redis use `reminders run`")
    prepare_database(config, auto_migrate=False)
    return config


@app.command("scheduler")
def scheduler_command() -> None:
    """Claims due reminders and queues them (needs Redis; any number may run)."""
    config = _needs_redis("scheduler")
    _logging()
    actors.configure(config)
    jobs = _jobs()
    heap.settle()
    _until_signal()
    jobs.shutdown(wait=True)


@app.command()
def worker(
    threads: Annotated[int, typer.Option(min=1, max=64, help="Sending threads.")] = 8,
) -> None:
    """Sends queued SMS and applies stored replies (needs Redis; any number may run)."""
    config = _needs_redis("worker")
    _logging()
    running = _worker(actors.configure(config), threads)
    heap.settle()
    _until_signal()
    running.stop(timeout=30_000)


def _parse_now(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        now = dt.datetime.fromisoformat(value)
    except ValueError:
        fail(f"--now: {value!r} is not an ISO 8601 time like 2026-11-23T08:00:00+01:00")
    if now.utcoffset() is None:
        fail("--now: must carry a UTC offset, e.g. 2026-11-23T08:00:00+01:00")
    return now.astimezone(dt.UTC)


@app.command()
def tick(
    now: Annotated[str | None, typer.Option(help="The clock of the whole command.")] = None,
    as_json: JsonOption = False,
) -> None:
    """One scheduling pass; in embedded mode it then waits until the SMS it queued are done."""
    config = settings()
    prepare_database(config, auto_migrate=config.is_sqlite)
    fixed = _parse_now(now)
    clock = (lambda: fixed) if fixed is not None else actors.real_clock
    broker = actors.configure(config, clock=clock)
    running = _worker(broker, threads=4) if config.embedded else None
    ids = scheduler.tick(clock)
    scheduler.queue_reports(clock)
    if running is not None:
        assert isinstance(broker, StubBroker)
        broker.join(REPLIES_QUEUE, fail_fast=False)  # its answers go to QUEUE
        broker.join(QUEUE, fail_fast=False)
        broker.join(WEBHOOK_QUEUE, fail_fast=False)
        running.join()
        running.stop()
    outcomes = dispatch.outcomes(ids)
    human = f"queued {len(ids)} SMS" + (
        ": " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) if ids else ""
    )
    emit(as_json, {"queued": len(ids), "outcomes": outcomes}, human)


@app.command()
def migrate(as_json: JsonOption = False) -> None:
    """Upgrades the database schema to the newest version."""
    settings()
    try:
        db.migrate(db.get_engine())
    except OperationalError as exc:
        fail(f"cannot reach the database: {exc.orig}")
    emit(as_json, {"migrated": True}, "database schema is up to date")


def _clinic_options(**values: Any) -> clinics.ClinicOptions:
    return clinics.ClinicOptions(**values)


@clinic_app.command("add")
def clinic_add(
    name: Annotated[str, typer.Argument(help="The clinic's name.")],
    timezone: Annotated[str, typer.Option(help="IANA time zone, e.g. Europe/Paris.")],
    country: Annotated[str, typer.Option(help="ISO 3166 alpha-2 code: default phone region.")],
    language: Annotated[str, typer.Option(help="Default language: en, fr, ru or zh.")],
    sender: Annotated[
        str | None, typer.Option(help="Phone number (two-way) or alphanumeric id.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Creates a clinic and prints its id and API key (shown once, stored hashed)."""
    settings()
    options = _clinic_options(
        name=name, timezone=timezone, country=country, language=language, sender=sender
    )
    try:
        with db.session_scope() as session:
            clinic, key = clinics.create_clinic(session, options)
            clinic_id = clinic.id
    except clinics.ClinicError as exc:
        fail(str(exc))
    emit(
        as_json,
        {"id": clinic_id, "api_key": key},
        f"clinic {clinic_id} created\nAPI key (shown once, store it now): {key}",
    )


@clinic_app.command("set")
def clinic_set(
    clinic_id: Annotated[int, typer.Argument(metavar="ID", help="The clinic's id.")],
    rules: Annotated[str | None, typer.Option(help="e.g. 72h,24h:unconfirmed")] = None,
    quiet_hours: Annotated[str | None, typer.Option(help="e.g. 20:00-08:00, or none")] = None,
    deadline: Annotated[
        str | None, typer.Option(help="Nothing later than this before the start, e.g. 2h")
    ] = None,
    holdout: Annotated[
        float | None, typer.Option(help="Share of patients never reminded, 0 to <1")
    ] = None,
    go_live: Annotated[
        str | None, typer.Option(help="The day reminders started, e.g. 2026-12-01")
    ] = None,
    daily_cap: Annotated[
        int | None, typer.Option(help="At most this many SMS a day (0: no cap)")
    ] = None,
    paused: Annotated[
        bool | None, typer.Option("--paused/--resumed", help="Pause or resume sending")
    ] = None,
    sender: Annotated[
        str | None, typer.Option(help="Phone number (two-way) or alphanumeric id")
    ] = None,
    language: Annotated[str | None, typer.Option(help="Default language: en, fr, ru or zh")] = None,
    webhook_url: Annotated[
        str | None, typer.Option(help="Where events are POSTed (none to remove)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Changes a clinic's settings; a new webhook URL prints its signing secret once."""
    settings()
    options = _clinic_options(
        rules=rules,
        quiet_hours=quiet_hours,
        deadline=deadline,
        holdout=holdout,
        go_live=go_live,
        daily_cap=daily_cap,
        paused=paused,
        sender=sender,
        language=language,
        webhook_url=webhook_url,
    )
    try:
        with db.session_scope() as session:
            clinic, secret = clinics.update_clinic(session, clinic_id, options)
            described = clinics.describe(clinic)
    except clinics.ClinicError as exc:
        fail(str(exc))
    if secret is not None:
        described["webhook_secret"] = secret
    lines = [f"{key}: {value}" for key, value in described.items() if key != "webhook_secret"]
    if secret is not None:
        lines.append(f"webhook signing secret (shown once, store it now): {secret}")
    emit(as_json, described, "\n".join(lines))


@clinic_app.command("rotate-key")
def clinic_rotate_key(
    clinic_id: Annotated[int, typer.Argument(metavar="ID", help="The clinic's id.")],
    as_json: JsonOption = False,
) -> None:
    """Prints a new API key (shown once); the old one stops working at once."""
    settings()
    try:
        with db.session_scope() as session:
            key = clinics.rotate_key(session, clinic_id)
    except clinics.ClinicError as exc:
        fail(str(exc))
    emit(
        as_json,
        {"id": clinic_id, "api_key": key},
        f"new API key for clinic {clinic_id} (shown once; the old one no longer works): {key}",
    )


@clinic_app.command("list")
def clinic_list(as_json: JsonOption = False) -> None:
    """Lists the clinics and their settings."""
    settings()
    with db.session_scope() as session:
        rows = [clinics.describe(c) for c in session.scalars(select(Clinic).order_by(Clinic.id))]
    human = "\n".join(f"{r['id']}\t{r['name']}\t{r['timezone']}\t{r['language']}" for r in rows)
    emit(as_json, {"clinics": rows}, human or "no clinics yet: `reminders clinic add`")


ClinicOption = Annotated[int, typer.Option("--clinic", metavar="ID", help="The clinic's id.")]


@app.command("import")
def import_command(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The CSV export.")],
    clinic_id: ClinicOption,
    mapping: Annotated[
        str | None, typer.Option("--map", help="Rename the file's columns: old=new,...")
    ] = None,
    errors: Annotated[
        Path | None, typer.Option(help="Where rejected rows go (default FILE.errors.csv).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Check everything, write nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Bulk appointments from CSV: good rows land, bad rows go to the errors file (exit 1)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from reminders import csv_import

    config = settings()
    prepare_database(config, auto_migrate=config.is_sqlite)
    try:
        columns = csv_import.parse_mapping(mapping) if mapping else None
        with db.session_scope() as session:
            clinics.get_clinic(session, clinic_id)
    except (ValueError, clinics.ClinicError) as exc:
        fail(f"--map: {exc}" if isinstance(exc, ValueError) and mapping else str(exc))
    size = file.stat().st_size
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=as_json,
    )
    try:
        with bar:
            task = bar.add_task(f"importing {file.name}", total=size)
            summary = csv_import.import_csv(
                file,
                clinic_id,
                mapping=columns,
                errors_path=errors,
                dry_run=dry_run,
                now=actors.real_clock(),
                progress=lambda done: bar.update(task, completed=done),
            )
    except csv_import.CsvError as exc:
        fail(str(exc))
    except csv_import.ImportAborted as exc:
        typer.echo(f"reminders: import stopped: {exc}", err=True)
        summary = exc.summary
    result = {
        "rows": summary.rows,
        "created": summary.created,
        "updated": summary.updated,
        "unchanged": summary.unchanged,
        "stale": summary.stale,
        "rejected": summary.rejected,
        "errors": str(summary.errors_path) if summary.errors_path else None,
        "dry_run": dry_run,
    }
    human = ", ".join(f"{k} {v}" for k, v in result.items() if isinstance(v, int)) + (
        f"; rejected rows in {summary.errors_path}" if summary.rejected else ""
    )
    emit(as_json, result, ("dry run: " if dry_run else "") + human)
    if summary.rejected:
        raise typer.Exit(1)


@app.command()
def mllp(
    clinic_id: ClinicOption,
    host: HostOption = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 2575,
) -> None:
    """An HL7v2 SIU listener (MLLP) for one clinic; each message is acknowledged AA/AE/AR."""
    from reminders import siu

    config = settings()
    prepare_database(config, auto_migrate=config.is_sqlite)
    _logging()
    try:
        with db.session_scope() as session:
            clinics.get_clinic(session, clinic_id)
    except clinics.ClinicError as exc:
        fail(str(exc))
    heap.settle()
    siu.run(clinic_id, host, port)


@app.command("report")
def report_command(
    clinic_id: ClinicOption,
    week: Annotated[
        str | None, typer.Option(help="ISO week, e.g. 2026-W47 (default: the last complete one).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="html, json or csv.")] = "html",
    out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
) -> None:
    """The weekly no-show report: rates, the effect of reminders against the holdout, trends."""
    from reminders import report
    from reminders.report import render as report_render

    config = settings()
    fmt = "json" if as_json else fmt
    if fmt not in report_render.FORMATS:
        fail(f"--format: one of {', '.join(report_render.FORMATS)}")
    prepare_database(config, auto_migrate=config.is_sqlite)
    try:
        with db.session_scope() as session:
            clinic = clinics.get_clinic(session, clinic_id)
            data = report.report_for(session, clinic, week, actors.real_clock())
    except clinics.ClinicError as exc:
        fail(str(exc))
    except report.ReportError as exc:
        fail(f"--{exc.field}: {exc.reason}")
    text = report_render.render(data, fmt)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"report {data['week']} for clinic {clinic_id} written to {out}", err=True)


@app.command()
def simulate(
    clinic_id: ClinicOption,
    weeks: Annotated[int, typer.Option(min=2, max=520, help="Weeks of history.")] = 52,
    baseline: Annotated[float, typer.Option(help="No-show rate without reminders.")] = 0.15,
    effect: Annotated[float, typer.Option(help="True relative cut by reminders.")] = 0.4,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same history).")] = 7,
    as_json: JsonOption = False,
) -> None:
    """Fills a clinic with a simulated history whose true effect is known (to test the report)."""
    from reminders import simulate as sim

    config = settings()
    prepare_database(config, auto_migrate=config.is_sqlite)
    try:
        with db.session_scope() as session:
            clinic = clinics.get_clinic(session, clinic_id)
            truth = sim.simulate(
                session,
                clinic,
                secret_key(session, config),
                actors.real_clock(),
                weeks=weeks,
                baseline=baseline,
                effect=effect,
                seed=seed,
            )
    except (clinics.ClinicError, sim.SimulationError) as exc:
        fail(str(exc))
    human = (
        f"clinic {clinic_id}: {truth.appointments} appointments of {truth.patients} patients, "
        f"{truth.first_week} to {truth.last_week}, go-live {truth.go_live}, holdout "
        f"{truth.holdout}, true effect {truth.effect}\n"
        f"reminders report --clinic {clinic_id} --week {truth.last_week}"
    )
    emit(as_json, truth.as_dict(), human)


@template_app.command("check")
def template_check(
    clinic_id: Annotated[
        int | None, typer.Option("--clinic", metavar="ID", help="Use this clinic's texts.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Prints each language's texts for a sample appointment with encoding, length, segments."""
    settings()
    own: dict[tuple[str, str], str] = {}
    two_way = True
    if clinic_id is not None:
        try:
            with db.session_scope() as session:
                clinic = clinics.get_clinic(session, clinic_id)
                two_way = dispatch.sender_of(clinic).startswith("+")
                own = clinics.templates_of(session, clinic_id)
        except clinics.ClinicError as exc:
            fail(str(exc))
    report = texts.check_report(templates=own, two_way=two_way)
    rows = [
        {
            "language": r.language,
            "kind": r.kind,
            "own": (r.kind, r.language) in own,
            "encoding": r.encoding,
            "length": r.length,
            "segments": r.segments,
            "text": r.text,
        }
        for r in report
    ]
    if as_json:
        emit(True, {"texts": rows}, "")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("lang", "kind", "encoding", "length", "segments", "text", show_lines=True)
    for row in rows:
        kind = f"{row['kind']} (own)" if row["own"] else str(row["kind"])
        table.add_row(
            str(row["language"]),
            kind,
            str(row["encoding"]),
            str(row["length"]),
            str(row["segments"]),
            str(row["text"]),
        )
    Console(width=160).print(table)


@template_app.command("set")
def template_set(
    clinic_id: ClinicOption,
    language: Annotated[str, typer.Option(help="en, fr, ru or zh.")],
    kind: Annotated[str, typer.Option(help="reminder, late, moved or ack.")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Jinja2 text.")],
    as_json: JsonOption = False,
) -> None:
    """Stores a clinic's own text after the same check (exit 1 if the text is refused)."""
    settings()
    if language not in texts.LANGUAGES:
        fail(f"--language: one of {', '.join(texts.LANGUAGES)}")
    if kind not in texts.TEMPLATE_KINDS:
        fail(f"--kind: one of {', '.join(texts.TEMPLATE_KINDS)}")
    try:
        source = file.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        fail(f"{file}: not UTF-8 text")
    try:
        texts.check_template(source, kind)
    except texts.TemplateError as exc:
        fail(f"{file}: refused: {exc}", code=1)
    try:
        with db.session_scope() as session:
            clinics.save_template(session, clinic_id, kind, language, source)
    except clinics.ClinicError as exc:
        fail(str(exc))
    context = texts.sample_context(language)
    sample = texts.render(kind, context, source)
    segments = texts.count_segments(sample)
    emit(
        as_json,
        {
            "clinic": clinic_id,
            "kind": kind,
            "language": language,
            "sample": sample,
            "encoding": segments.encoding,
            "segments": segments.count,
        },
        f"stored; sample ({segments.encoding}, {segments.count} segment(s)): {sample}",
    )


def main() -> None:
    try:
        app()
    except ConfigError as exc:  # raised lazily by a module that reads the settings
        typer.echo(f"reminders: configuration error: {exc}", err=True)
        sys.exit(2)
