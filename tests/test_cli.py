"""The `reminders` command: clinics, exit codes, one-line errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from reminders import db
from reminders.cli import app
from reminders.models import Clinic
from reminders.security import hash_api_key
from tests.conftest import appointment_body

runner = CliRunner()


def invoke(*args: str) -> Any:
    db.reset()  # each command reads the settings once, as a fresh process would
    return runner.invoke(app, list(args))


def add_clinic(*extra: str) -> dict[str, Any]:
    result = invoke(
        "clinic",
        "add",
        "Clinique Paris",
        "--timezone",
        "Europe/Paris",
        "--country",
        "FR",
        "--language",
        "fr",
        "--json",
        *extra,
    )
    assert result.exit_code == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_clinic_add_prints_the_id_and_a_key_stored_hashed(database: str) -> None:
    data = add_clinic("--sender", "+33939000000")
    assert data["id"] == 1
    assert data["api_key"].startswith("rk_")
    assert len(data["api_key"]) >= 3 + 43  # 256 random bits, base64url
    with db.session_scope() as session:
        clinic = session.get(Clinic, data["id"])
        assert clinic is not None
        assert clinic.api_key_hash == hash_api_key(data["api_key"])
        assert data["api_key"] not in clinic.api_key_hash
        assert clinic.sender == "+33939000000"
        assert (clinic.rules, clinic.deadline_minutes, clinic.holdout) == (
            "72h,24h:unconfirmed",
            120,
            0,
        )


def test_two_clinics_get_different_keys(database: str) -> None:
    assert add_clinic()["api_key"] != add_clinic()["api_key"]


def test_clinic_add_without_json_shows_the_key_once(database: str) -> None:
    result = invoke(
        "clinic", "add", "C", "--timezone", "UTC", "--country", "GB", "--language", "en"
    )
    assert result.exit_code == 0
    assert "shown once" in result.stdout
    assert "rk_" in result.stdout


def test_clinic_set_stores_every_option(database: str) -> None:
    clinic_id = str(add_clinic()["id"])
    result = invoke(
        "clinic",
        "set",
        clinic_id,
        "--rules",
        "48h, 2h:unconfirmed",
        "--quiet-hours",
        "21:30-07:45",
        "--deadline",
        "90m",
        "--holdout",
        "0.1",
        "--go-live",
        "2026-12-01",
        "--daily-cap",
        "5000",
        "--paused",
        "--sender",
        "REMIND",
        "--language",
        "en",
        "--webhook-url",
        "https://clinic.example/hooks",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rules"] == "48h,2h:unconfirmed"
    assert data["quiet_hours"] == "21:30-07:45"
    assert data["deadline"] == "90m"
    assert data["holdout"] == 0.1
    assert data["go_live"] == "2026-12-01"
    assert data["daily_cap"] == 5000
    assert data["paused"] is True
    assert data["sender"] == "REMIND"
    assert data["two_way"] is False
    assert data["language"] == "en"
    assert data["webhook_secret"].startswith("whsec_")
    with db.session_scope() as session:
        clinic = session.get(Clinic, int(clinic_id))
        assert clinic is not None
        assert clinic.webhook_secret == data["webhook_secret"]
    resumed = json.loads(invoke("clinic", "set", clinic_id, "--resumed", "--json").stdout)
    assert resumed["paused"] is False
    assert "webhook_secret" not in resumed  # shown once, when the URL was set


def test_clinic_set_can_clear_optional_settings(database: str) -> None:
    clinic_id = str(add_clinic()["id"])
    invoke("clinic", "set", clinic_id, "--daily-cap", "10", "--go-live", "2026-12-01")
    result = invoke(
        "clinic",
        "set",
        clinic_id,
        "--daily-cap",
        "0",
        "--go-live",
        "none",
        "--quiet-hours",
        "none",
        "--json",
    )
    data = json.loads(result.stdout)
    assert (data["daily_cap"], data["go_live"], data["quiet_hours"]) == (None, None, None)


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--rules", "72x", "--rules"),
        ("--rules", "24h,24h", "same offset"),
        ("--rules", "24h:confirmed", "condition"),
        ("--quiet-hours", "20:00", "--quiet-hours"),
        ("--deadline", "soon", "--deadline"),
        ("--holdout", "1", "--holdout"),
        ("--holdout", "-0.1", "--holdout"),
        ("--go-live", "2026-13-01", "--go-live"),
        ("--daily-cap", "-1", "--daily-cap"),
        ("--sender", "not a sender!", "--sender"),
        ("--language", "de", "no built-in texts"),
        ("--webhook-url", "ftp://x", "--webhook-url"),
    ],
)
def test_clinic_set_refuses_a_bad_value_with_exit_2(
    database: str, option: str, value: str, reason: str
) -> None:
    clinic_id = str(add_clinic()["id"])
    result = invoke("clinic", "set", clinic_id, option, value)
    assert result.exit_code == 2
    assert reason in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_clinic_add_refuses_a_bad_timezone_or_country(database: str) -> None:
    bad_zone = invoke(
        "clinic", "add", "C", "--timezone", "Mars/Olympus", "--country", "FR", "--language", "fr"
    )
    assert bad_zone.exit_code == 2
    assert "--timezone" in bad_zone.stderr
    bad_country = invoke(
        "clinic", "add", "C", "--timezone", "UTC", "--country", "XX", "--language", "fr"
    )
    assert bad_country.exit_code == 2
    assert "--country" in bad_country.stderr


def test_an_unknown_clinic_is_exit_2(database: str) -> None:
    result = invoke("clinic", "set", "99", "--paused")
    assert result.exit_code == 2
    assert "no clinic with id 99" in result.stderr


def test_rotate_key_stops_the_old_key_at_once(database: str) -> None:
    data = add_clinic()
    from reminders.api import create_app

    with TestClient(create_app()) as client:
        old = {"Authorization": f"Bearer {data['api_key']}"}
        assert (
            client.put("/v1/appointments/A1", json=appointment_body(), headers=old).status_code
            == 201
        )
        result = invoke("clinic", "rotate-key", str(data["id"]), "--json")
        assert result.exit_code == 0
        new_key = json.loads(result.stdout)["api_key"]
        assert new_key != data["api_key"]
        assert client.get("/v1/appointments/A1", headers=old).status_code == 401
        new = {"Authorization": f"Bearer {new_key}"}
        assert client.get("/v1/appointments/A1", headers=new).status_code == 200


def test_clinic_list_shows_settings_but_no_secrets(database: str) -> None:
    data = add_clinic()
    invoke("clinic", "set", str(data["id"]), "--webhook-url", "https://c.example/h")
    listed = json.loads(invoke("clinic", "list", "--json").stdout)["clinics"]
    assert [c["name"] for c in listed] == ["Clinique Paris"]
    text = json.dumps(listed)
    assert "whsec_" not in text
    assert data["api_key"] not in text


def test_scheduler_and_worker_refuse_to_start_without_redis(database: str) -> None:
    for part in ("scheduler", "worker"):
        result = invoke(part)
        assert result.exit_code == 2
        assert "needs REMINDERS_REDIS_URL" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_bad_configuration_is_exit_2_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMINDERS_DATABASE_URL", "::nonsense::")
    result = invoke("migrate")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(
        "reminders: configuration error: REMINDERS_DATABASE_URL"
    )
    assert len(result.stderr.strip().splitlines()) == 1


def test_migrate_upgrades_an_empty_database(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMINDERS_DATABASE_URL", f"sqlite:///{tmp_path / 'new.db'}")
    result = invoke("migrate", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"migrated": True}
    assert db.schema_is_current(db.get_engine())


def test_template_check_prints_every_language_and_kind(database: str) -> None:
    result = invoke("template", "check", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["texts"]
    assert {(r["language"], r["kind"]) for r in rows} >= {
        (lang, kind)
        for lang in ("en", "fr", "ru", "zh")
        for kind in ("reminder", "late", "moved", "ack")
    }
    french = next(r for r in rows if (r["language"], r["kind"]) == ("fr", "reminder"))
    assert (french["encoding"], french["segments"]) == ("GSM-7", 1)
    human = invoke("template", "check")
    assert "UCS-2" in human.stdout
    assert "GSM-7" in human.stdout


def test_template_set_stores_a_clinic_text_used_by_check(database: str, tmp_path: Any) -> None:
    clinic_id = str(add_clinic("--sender", "+33939000000")["id"])
    source = tmp_path / "reminder.txt"
    source.write_text("{{ clinic }} : RDV le {{ date }} à {{ time }}. {{ reply }} {{ link }}\n")
    result = invoke(
        "template",
        "set",
        "--clinic",
        clinic_id,
        "--language",
        "fr",
        "--kind",
        "reminder",
        str(source),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    stored = json.loads(result.stdout)
    assert stored["encoding"] == "GSM-7"
    assert "Répondez 1" in stored["sample"]
    rows = json.loads(invoke("template", "check", "--clinic", clinic_id, "--json").stdout)["texts"]
    own = [r for r in rows if r["own"]]
    assert [(r["language"], r["kind"]) for r in own] == [("fr", "reminder")]
    assert own[0]["text"].startswith("Clinique du Parc : RDV le") or "RDV le" in own[0]["text"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Hello {{ clinic }}", "link"),
        ("{{ patient_name }} {{ link }}", "patient_name"),
        ("{{ link }} {% if %}", "line 1"),
        ("{{ ''.__class__.__mro__ }} {{ link }}", ""),
    ],
)
def test_template_set_refuses_a_bad_text_with_exit_1(
    database: str, tmp_path: Any, text: str, reason: str
) -> None:
    clinic_id = str(add_clinic()["id"])
    source = tmp_path / "bad.txt"
    source.write_text(text)
    result = invoke(
        "template",
        "set",
        "--clinic",
        clinic_id,
        "--language",
        "en",
        "--kind",
        "reminder",
        str(source),
    )
    assert result.exit_code == 1
    assert "refused" in result.stderr
    assert reason.lower() in result.stderr.lower()
    rows = json.loads(invoke("template", "check", "--clinic", clinic_id, "--json").stdout)["texts"]
    assert not any(r["own"] for r in rows)


def test_template_set_refuses_an_unknown_language_or_kind(database: str, tmp_path: Any) -> None:
    clinic_id = str(add_clinic()["id"])
    source = tmp_path / "t.txt"
    source.write_text("{{ link }}")
    bad_language = invoke(
        "template",
        "set",
        "--clinic",
        clinic_id,
        "--language",
        "de",
        "--kind",
        "reminder",
        str(source),
    )
    assert bad_language.exit_code == 2
    assert "--language" in bad_language.stderr
    bad_kind = invoke(
        "template", "set", "--clinic", clinic_id, "--language", "fr", "--kind", "promo", str(source)
    )
    assert bad_kind.exit_code == 2
    assert "--kind" in bad_kind.stderr


def test_import_lands_good_rows_and_exits_1_with_an_errors_file(
    database: str, tmp_path: Any
) -> None:
    clinic_id = str(add_clinic()["id"])
    source = tmp_path / "export.csv"
    source.write_text(
        "external_id,starts_at,duration_minutes,patient_external_id,patient_name,phone,"
        "language,practitioner,location,kind,status\n"
        "A1,2030-03-04 09:30,20,P1,Marie Curie,06 12 34 56 78,fr,Dr Martin,Cabinet 2,consult,\n"
        "A2,2030-03-04 10:00,0,P2,Pierre,06 12 34 56 79,fr,,,,booked\n"
    )
    result = invoke("import", str(source), "--clinic", clinic_id, "--json")
    assert result.exit_code == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["created"], summary["rejected"], summary["rows"]) == (1, 1, 2)
    errors = (tmp_path / "export.errors.csv").read_text()
    assert "duration_minutes" in errors
    again = json.loads(invoke("import", str(source), "--clinic", clinic_id, "--json").stdout)
    assert again["unchanged"] == 1


def test_import_refuses_a_file_without_a_required_column(database: str, tmp_path: Any) -> None:
    clinic_id = str(add_clinic()["id"])
    source = tmp_path / "bad.csv"
    source.write_text("external_id,starts_at\nA1,2030-03-04 09:30\n")
    result = invoke("import", str(source), "--clinic", clinic_id)
    assert result.exit_code == 2
    assert "missing required column" in result.stderr
    bad_map = invoke("import", str(source), "--clinic", clinic_id, "--map", "nonsense")
    assert bad_map.exit_code == 2
    assert "--map" in bad_map.stderr
