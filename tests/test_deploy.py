"""The deployment files in deploy/ checked against the code they run, without Docker or systemd:
every command they start parses in the `reminders` CLI, every REMINDERS_* variable they name is
a setting, and the services, units and secrets are wired as the README says."""

from __future__ import annotations

import json
import re
import shlex
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.core
import typer.main
import yaml
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from reminders.cli import app
from reminders.config import PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
ENV_EXAMPLE = DEPLOY / "reminders.env.example"
SYSTEMD = DEPLOY / "systemd"

PARTS = ("api", "scheduler", "worker")  # long-running, one command each
APP_SERVICES = ("migrate", *PARTS)  # compose services built from deploy/Dockerfile
UNITS = tuple(f"reminders-{name}.service" for name in APP_SERVICES)
SECRET_FIELDS = frozenset(
    name
    for name, field in Settings.model_fields.items()
    if field.annotation is SecretStr or SecretStr in typing.get_args(field.annotation)
)
VARIABLE = re.compile(r"\bREMINDERS_[A-Z0-9_]*[A-Z0-9]")
INTERPOLATION = re.compile(r"\$\{[^}]*\}")


class CliError(ValueError):
    """A command line that `reminders` would refuse."""


# --- the command line ---------------------------------------------------------------------------


def parse_cli(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The command path (e.g. "clinic add") and parsed parameters of `argv`, program name first,
    as the real `reminders` CLI parses them (the command itself is not run)."""
    line = shlex.join(argv)
    if not argv or Path(argv[0]).name != "reminders":
        raise CliError(f"{line!r} does not run the reminders program")
    command = typer.main.get_command(app)
    context = typer.Context(command, info_name="reminders")
    args = list(argv[1:])
    path: list[str] = []
    while isinstance(command, typer.core.TyperGroup):
        if not args or args[0].startswith("-"):
            raise CliError(f"{line!r} names no command after {' '.join(['reminders', *path])!r}")
        name = args.pop(0)
        found = command.get_command(context, name)
        if found is None:
            raise CliError(f"{line!r}: unknown command {name!r}")
        path.append(name)
        parent, command = context, found
        context = typer.Context(command, info_name=name, parent=parent)
    try:
        parsed = command.make_context(context.info_name, args, parent=context.parent)
    except Exception as exc:  # click's UsageError and friends, whichever click typer carries
        raise CliError(f"{line!r}: {exc}") from exc
    return " ".join(path), dict(parsed.params)


def cli_problems(argv: Sequence[str]) -> list[str]:
    """Why `argv` would not parse as a `reminders` command; empty when it would."""
    try:
        parse_cli(argv)
    except CliError as exc:
        return [str(exc)]
    return []


# --- compose and the Dockerfile -----------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    found = load_compose()["services"]
    assert isinstance(found, dict)
    return found


def dockerfile_final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def image_entrypoint() -> list[str]:
    entrypoints = [args for name, args in dockerfile_final_stage() if name == "ENTRYPOINT"]
    assert entrypoints, "the image has no ENTRYPOINT"
    entrypoint = json.loads(entrypoints[-1])
    assert isinstance(entrypoint, list)
    return [str(part) for part in entrypoint]


def as_argv(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def compose_argv(service: Mapping[str, Any]) -> list[str]:
    """What a container of this service runs: entrypoint, then command."""
    entrypoint = as_argv(service["entrypoint"]) if "entrypoint" in service else image_entrypoint()
    return entrypoint + as_argv(service.get("command", []))


def compose_environment(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(key): str(value) for key, value in environment.items()}


def interpolated(value: str) -> str:
    """`${VAR:?message}` and friends replaced by a stand-in, as compose would with a value."""
    return INTERPOLATION.sub("stand-in", value)


def secret_targets(service: Mapping[str, Any]) -> dict[str, str]:
    """Secret name -> path in the container, for short and long syntax alike."""
    targets: dict[str, str] = {}
    for entry in service.get("secrets", []):
        if isinstance(entry, str):
            targets[entry] = f"/run/secrets/{entry}"
        else:
            target = str(entry.get("target", entry["source"]))
            if not target.startswith("/"):
                target = f"/run/secrets/{target}"
            targets[str(entry["source"])] = target
    return targets


def port_pairs(service: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(published, container port) of each `ports` entry (short or long syntax)."""
    pairs: list[tuple[str, int]] = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            pairs.append((str(entry.get("published", "")), int(entry["target"])))
        else:
            published, _, target = str(entry).rpartition(":")
            pairs.append((published, int(target.split("/")[0])))
    return pairs


# --- systemd and env files ----------------------------------------------------------------------

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> (key, value) in order; repeated keys kept (configparser would merge them)."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        if raw.strip().endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        assert section is not None, f"{line!r} is outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"{line!r} is not KEY=VALUE"
        section.append((key.strip(), value.strip()))
    return unit


def unit_values(unit: Unit, section: str, key: str) -> list[str]:
    return [value for name, value in unit.get(section, []) if name == key]


def unit_value(unit: Unit, section: str, key: str) -> str:
    values = unit_values(unit, section, key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def load_unit(name: str) -> Unit:
    return parse_unit((SYSTEMD / name).read_text(encoding="utf-8"))


def unit_argv(unit: Unit) -> list[str]:
    argv = shlex.split(unit_value(unit, "Service", "ExecStart"))
    argv[0] = argv[0].lstrip("-@+!:")  # systemd's prefixes
    return argv


def unit_environment(unit: Unit) -> dict[str, str]:
    environment: dict[str, str] = {}
    for value in unit_values(unit, "Service", "Environment"):
        for assignment in shlex.split(value):
            key, _, val = assignment.partition("=")
            environment[key] = val
    return environment


def unit_credentials(unit: Unit) -> dict[str, str]:
    """LoadCredential= name -> source path."""
    credentials: dict[str, str] = {}
    for value in unit_values(unit, "Service", "LoadCredential"):
        name, _, source = value.partition(":")
        credentials[name] = source
    return credentials


def env_file(text: str) -> tuple[dict[str, str], set[str]]:
    """The assignments of an env file, and the names of the commented-out ones."""
    active: dict[str, str] = {}
    commented: set[str] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if match := re.fullmatch(r"#\s*([A-Z][A-Z0-9_]*)=.*", line):
            commented.add(match[1])
        elif line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"bad env line {line!r}"
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"bad env line {line!r}"
            # quotes and spaces are read differently by systemd and compose
            assert value == value.strip(), key
            assert not value.startswith(("'", '"')), key
            active[key] = value
    return active, commented


def field_of(variable: str) -> str:
    return variable.removeprefix(PREFIX).removesuffix("_FILE").lower()


def unknown_variables(text: str) -> set[str]:
    """The REMINDERS_* names in `text` (X or X_FILE) that are no field of Settings."""
    return {name for name in VARIABLE.findall(text) if field_of(name) not in Settings.model_fields}


def deploy_texts() -> dict[str, str]:
    return {
        str(path.relative_to(ROOT)): path.read_text(encoding="utf-8")
        for path in sorted(DEPLOY.rglob("*"))
        if path.is_file()
    }


def load_settings_from(environment: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    return load_settings()


# --- the command line of every process ----------------------------------------------------------


def test_every_compose_command_exists_in_the_cli() -> None:
    built = {name for name, service in services().items() if "build" in service}
    assert built == set(APP_SERVICES)
    for name in APP_SERVICES:
        assert cli_problems(compose_argv(services()[name])) == [], name


def test_every_systemd_exec_start_exists_in_the_cli() -> None:
    assert sorted(path.name for path in SYSTEMD.glob("*.service")) == sorted(UNITS)
    for name in UNITS:
        unit = load_unit(name)
        assert len(unit_values(unit, "Service", "ExecStart")) == 1, name
        assert cli_problems(unit_argv(unit)) == [], name


def test_each_process_runs_the_command_it_is_named_after() -> None:
    for name in APP_SERVICES:
        assert parse_cli(compose_argv(services()[name]))[0] == name
        assert parse_cli(unit_argv(load_unit(f"reminders-{name}.service")))[0] == name


def test_systemd_runs_the_virtualenv_the_readme_installs() -> None:
    for name in UNITS:
        assert unit_argv(load_unit(name))[0] == "/opt/reminders/.venv/bin/reminders", name


@pytest.mark.parametrize(
    "line",
    [
        "reminders nosuchcommand",
        "reminders api --nosuch 1",
        "reminders api --port not-a-port",
        "reminders api --port 70000",
        "reminders worker extra-argument",
        "reminders clinic",
        "reminders clinic nosuch",
        "reminders --host 0.0.0.0",
        "python -m reminders api",
        "",
    ],
)
def test_the_command_checker_flags_what_the_cli_would_refuse(line: str) -> None:
    problems = cli_problems(shlex.split(line))
    assert len(problems) == 1
    if "nosuchcommand" in line:
        assert "unknown command 'nosuchcommand'" in problems[0]


def test_the_command_checker_accepts_a_real_command_and_reads_its_options() -> None:
    argv = shlex.split(
        "reminders clinic add 'Cabinet Martin' --timezone Europe/Paris "
        "--country FR --language fr --json"
    )
    assert cli_problems(argv) == []
    path, params = parse_cli(argv)
    assert path == "clinic add"
    assert params["name"] == "Cabinet Martin"
    assert params["as_json"] is True


# --- compose ------------------------------------------------------------------------------------


def test_compose_has_the_database_the_broker_the_migration_and_the_three_parts() -> None:
    found = services()
    assert {"postgres", "redis", *APP_SERVICES} <= set(found)
    assert str(found["postgres"]["image"]).startswith("postgres:16")
    assert str(found["redis"]["image"]).startswith("redis:7")
    assert found["migrate"].get("restart") in ("no", None)  # one-shot: never restarted


def test_app_services_wait_for_postgres_redis_and_the_migration() -> None:
    found = services()
    expected = {
        "postgres": "service_healthy",
        "redis": "service_healthy",
        "migrate": "service_completed_successfully",
    }
    for name in PARTS:
        depends_on = found[name]["depends_on"]
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        assert {key: value.get("condition") for key, value in depends_on.items()} == expected
    assert found["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("postgres", "redis"):  # service_healthy never comes without a healthcheck
        assert found[name]["healthcheck"]["test"], name


def test_app_services_are_built_from_the_deploy_dockerfile() -> None:
    for name in APP_SERVICES:
        build = services()[name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE, name
        assert context == ROOT, name  # the Dockerfile copies the project from the repository root


def test_the_image_installs_the_project_as_a_non_root_user_with_reminders_as_entrypoint() -> None:
    stage = dockerfile_final_stage()
    assert [args for name, args in stage if name == "FROM"] == ["python:3.11-slim"]
    users = [args for name, args in stage if name == "USER"]
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert image_entrypoint() == ["reminders"]
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"pip install\b", text)
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.MULTILINE):
        *sources, _target = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context"


def test_the_api_listens_on_every_interface_at_the_published_port() -> None:
    api = services()["api"]
    _, params = parse_cli(compose_argv(api))
    assert params["host"] == "0.0.0.0"  # 127.0.0.1 inside a container is unreachable
    assert any(target == params["port"] for _, target in port_pairs(api))


def test_compose_points_the_app_at_its_own_postgres_and_redis() -> None:
    found = services()
    postgres = compose_environment(found["postgres"])
    for name in APP_SERVICES:
        environment = compose_environment(found[name])
        database = make_url(interpolated(environment["REMINDERS_DATABASE_URL"]))
        assert database.drivername == "postgresql+psycopg", name
        assert database.host == "postgres", name
        assert database.database == postgres["POSTGRES_DB"], name
        assert database.username == postgres["POSTGRES_USER"], name
        redis = environment["REMINDERS_REDIS_URL"]
        assert re.fullmatch(r"redis://redis(:6379)?(/\d+)?", redis), name


def test_compose_passes_every_secret_as_a_docker_secret_file() -> None:
    assert {"secret_key", "vonage_api_secret", "vonage_signature_secret"} == SECRET_FIELDS
    declared = set(load_compose()["secrets"])
    for name in APP_SERVICES:
        service = services()[name]
        environment = compose_environment(service)
        targets = secret_targets(service)
        assert set(targets) <= declared, name
        for field in SECRET_FIELDS:
            variable = f"{PREFIX}{field.upper()}"
            assert variable not in environment, f"{name}: {variable} in plain text"
            assert environment[f"{variable}_FILE"] in targets.values(), f"{name}: {variable}"
    for secret in declared:
        assert (COMPOSE.parent / load_compose()["secrets"][secret]["file"]).parent.name == "secrets"


def test_the_compose_configuration_loads_into_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    active, _ = env_file(ENV_EXAMPLE.read_text(encoding="utf-8"))  # stands in for reminders.env
    for name in APP_SERVICES:
        service = services()[name]
        environment = dict(active)
        for key, value in compose_environment(service).items():  # wins over env_file
            environment[key] = interpolated(value)
        for secret, target in secret_targets(service).items():  # Docker mounts the files
            local = tmp_path / name / secret
            local.parent.mkdir(exist_ok=True)
            local.write_text(f"{secret}-value-0123456789\n", encoding="utf-8")
            environment = {k: str(local) if v == target else v for k, v in environment.items()}
        with monkeypatch.context() as patch:
            settings = load_settings_from(environment, patch)
        assert not settings.embedded, name
        assert not settings.is_sqlite, name
        assert settings.sms_provider == "vonage", name
        assert settings.secret_key is not None
        assert settings.secret_key.get_secret_value() == "secret_key-value-0123456789"


# --- systemd ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNITS)
def test_every_systemd_unit_has_the_required_keys(name: str) -> None:
    unit = load_unit(name)
    assert unit_value(unit, "Unit", "Description")
    expected = {
        "Type": "oneshot" if name == "reminders-migrate.service" else "simple",
        "User": "reminders",
        "EnvironmentFile": "/etc/reminders/reminders.env",
        "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
    }
    if name != "reminders-migrate.service":
        expected["Restart"] = "on-failure"
    for key, value in expected.items():
        assert unit_value(unit, "Service", key) == value, f"{name}: {key}"
    assert re.fullmatch(r"\d+(s|min)", unit_value(unit, "Service", "TimeoutStopSec"))
    assert unit_value(unit, "Install", "WantedBy") == "reminders.target"


def test_a_busy_cpu_goes_to_the_api_before_the_worker() -> None:
    """Webhook answers cannot wait (Vonage retries), a worker's work can: systemd weighs the
    worker's cgroup below the API's (default 100), compose its CPU shares (default 1024)."""

    def weight(name: str) -> int:
        found = unit_values(load_unit(name), "Service", "CPUWeight")
        return int(found[-1]) if found else 100

    assert weight("reminders-worker.service") < weight("reminders-api.service")
    shares = {name: int(service.get("cpu_shares", 1024)) for name, service in services().items()}
    assert shares["worker"] < shares["api"]


@pytest.mark.parametrize("name", UNITS)
def test_every_secret_reaches_each_unit_as_a_systemd_credential(name: str) -> None:
    unit = load_unit(name)
    environment = unit_environment(unit)
    credentials = unit_credentials(unit)
    for field in SECRET_FIELDS:
        variable = f"{PREFIX}{field.upper()}"
        assert variable not in environment, f"{variable} in plain text"
        path = environment[f"{variable}_FILE"]
        assert path.startswith("%d/"), f"{variable}_FILE is not in the credentials directory"
        assert path.removeprefix("%d/") in credentials, f"{path} is never loaded"
    assert all(source.startswith("/etc/reminders/") for source in credentials.values())


def test_the_parts_start_only_after_a_successful_migration() -> None:
    migrate = load_unit("reminders-migrate.service")
    assert unit_value(migrate, "Service", "RemainAfterExit") == "yes"
    for name in PARTS:
        unit = load_unit(f"reminders-{name}.service")
        for key in ("Requires", "After"):
            listed = " ".join(unit_values(unit, "Unit", key)).split()
            assert "reminders-migrate.service" in listed, f"{name}: {key}"


def test_the_target_starts_every_unit() -> None:
    target = parse_unit((SYSTEMD / "reminders.target").read_text(encoding="utf-8"))
    assert set(" ".join(unit_values(target, "Unit", "Wants")).split()) == set(UNITS)
    assert unit_value(target, "Install", "WantedBy") == "multi-user.target"


def test_the_systemd_configuration_loads_into_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    active, _ = env_file(ENV_EXAMPLE.read_text(encoding="utf-8"))
    for name in UNITS:
        unit = load_unit(name)
        credentials = tmp_path / name  # what systemd makes of LoadCredential=, as %d
        credentials.mkdir()
        for credential in unit_credentials(unit):
            (credentials / credential).write_text(f"{credential}-0123456789", encoding="utf-8")
        environment = {
            key: value.replace("%d", str(credentials))
            for key, value in unit_environment(unit).items()
        }
        environment.update(active)  # EnvironmentFile= wins over Environment=
        with monkeypatch.context() as patch:
            settings = load_settings_from(environment, patch)
        assert not settings.embedded, name
        assert not settings.is_sqlite, name
        assert settings.vonage_api_secret is not None
        assert settings.vonage_api_secret.get_secret_value() == "vonage_api_secret-0123456789"


# --- variables ----------------------------------------------------------------------------------


def test_every_reminders_variable_in_the_deploy_files_is_a_setting() -> None:
    texts = deploy_texts()
    assert {"deploy/compose.yaml", "deploy/reminders.env.example", "deploy/README.md"} <= set(texts)
    named = {name for text in texts.values() for name in VARIABLE.findall(text)}
    assert {f"{PREFIX}DATABASE_URL", f"{PREFIX}SECRET_KEY_FILE"} <= named  # the scan sees them
    for path, text in texts.items():
        assert unknown_variables(text) == set(), path


def test_the_variable_checker_flags_an_unknown_variable() -> None:
    text = "REMINDERS_NOSUCH=1\nREMINDERS_SECRET_KEY_FILE=/run/secrets/secret_key\n"
    assert unknown_variables(text) == {"REMINDERS_NOSUCH"}
    assert unknown_variables("${REMINDERS_NOSUCH_FILE}") == {"REMINDERS_NOSUCH_FILE"}


def test_the_env_example_names_every_setting_and_keeps_secrets_out() -> None:
    active, commented = env_file(ENV_EXAMPLE.read_text(encoding="utf-8"))
    named = set(active) | commented
    for field in Settings.model_fields:
        variable = f"{PREFIX}{field.upper()}"
        if field in SECRET_FIELDS:
            assert variable not in named, f"{variable}: a secret belongs in a file"
            assert f"{variable}_FILE" in commented, f"{variable}_FILE is not shown"
            # systemd's EnvironmentFile= would override the units' credential paths
            assert f"{variable}_FILE" not in active
        else:
            assert variable in named, f"{variable} is missing from the example"


def test_the_env_example_holds_production_values() -> None:
    active, _ = env_file(ENV_EXAMPLE.read_text(encoding="utf-8"))
    assert active[f"{PREFIX}DATABASE_URL"].startswith("postgresql+psycopg://")
    assert active[f"{PREFIX}REDIS_URL"].startswith(("redis://", "rediss://"))
    assert active[f"{PREFIX}PUBLIC_URL"].startswith("https://")
    assert active[f"{PREFIX}SMS_PROVIDER"] == "vonage"
    assert float(active[f"{PREFIX}SEND_RATE"]) > 0
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    for variable in active:  # each setting explained by a comment just above it
        assert re.search(rf"#[^\n]*\n(#[^\n]*\n)*{variable}=", text), variable
