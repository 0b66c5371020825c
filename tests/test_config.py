"""Configuration: the contract's variables, X_FILE secrets, one-line errors."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from reminders.config import ConfigError, load_settings


def test_embedded_defaults_need_nothing() -> None:
    settings = load_settings()
    assert settings.database_url == "sqlite:///reminders.db"
    assert settings.embedded
    assert settings.sms_provider == "console"
    assert settings.public_url == "http://127.0.0.1:8000"
    assert settings.send_rate == 30
    assert settings.secret_key is None
    assert settings.trusted_proxies == ()


def test_a_plain_postgresql_url_uses_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMINDERS_DATABASE_URL", "postgresql://u:p@db:5432/reminders")
    monkeypatch.setenv("REMINDERS_SECRET_KEY", "x" * 32)
    assert load_settings().database_url == "postgresql+psycopg://u:p@db:5432/reminders"


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"REMINDERS_DATABASE_URL": "not a url"}, "REMINDERS_DATABASE_URL: not a SQLAlchemy"),
        ({"REMINDERS_DATABASE_URL": "mysql://x/y"}, "REMINDERS_DATABASE_URL: unsupported"),
        ({"REMINDERS_DATABASE_URL": "postgresql://db/r"}, "REMINDERS_SECRET_KEY is required"),
        ({"REMINDERS_REDIS_URL": "redis://r:6379/0"}, "REMINDERS_SECRET_KEY is required"),
        (
            {"REMINDERS_REDIS_URL": "http://r", "REMINDERS_SECRET_KEY": "x" * 20},
            "REMINDERS_REDIS_URL: must start with redis://",
        ),
        ({"REMINDERS_SMS_PROVIDER": "twilio"}, "REMINDERS_SMS_PROVIDER"),
        ({"REMINDERS_SMS_PROVIDER": "vonage"}, "REMINDERS_VONAGE_API_KEY is required"),
        (
            {
                "REMINDERS_SMS_PROVIDER": "vonage",
                "REMINDERS_VONAGE_API_KEY": "k",
                "REMINDERS_VONAGE_API_SECRET": "s",
            },
            "REMINDERS_VONAGE_SIGNATURE_SECRET is required",
        ),
        ({"REMINDERS_VONAGE_SIGNATURE_METHOD": "sha384"}, "REMINDERS_VONAGE_SIGNATURE_METHOD"),
        ({"REMINDERS_SEND_RATE": "0"}, "REMINDERS_SEND_RATE: Input should be greater than 0"),
        ({"REMINDERS_SEND_RATE": "fast"}, "REMINDERS_SEND_RATE"),
        ({"REMINDERS_PUBLIC_URL": "example.org"}, "REMINDERS_PUBLIC_URL: must be an http"),
        ({"REMINDERS_TRUSTED_PROXIES": "10.0.0.1,nonsense"}, "REMINDERS_TRUSTED_PROXIES"),
        ({"REMINDERS_SECRET_KEY": "short"}, "at least 16 characters"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_secrets_can_come_from_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-a-file-0123456789\n")
    (tmp_path / "vonage").write_text("vonage-secret")
    monkeypatch.setenv("REMINDERS_SECRET_KEY_FILE", str(tmp_path / "secret"))
    monkeypatch.setenv("REMINDERS_SMS_PROVIDER", "vonage")
    monkeypatch.setenv("REMINDERS_VONAGE_API_KEY", "key")
    monkeypatch.setenv("REMINDERS_VONAGE_API_SECRET_FILE", str(tmp_path / "vonage"))
    monkeypatch.setenv("REMINDERS_VONAGE_SIGNATURE_SECRET_FILE", str(tmp_path / "vonage"))
    settings = load_settings()
    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == "from-a-file-0123456789"
    assert settings.vonage_api_secret is not None
    assert settings.vonage_api_secret.get_secret_value() == "vonage-secret"


def test_a_missing_secret_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REMINDERS_SECRET_KEY_FILE", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="REMINDERS_SECRET_KEY_FILE: cannot read"):
        load_settings()


def test_a_value_and_its_file_together_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "secret").write_text("x" * 20)
    monkeypatch.setenv("REMINDERS_SECRET_KEY", "y" * 20)
    monkeypatch.setenv("REMINDERS_SECRET_KEY_FILE", str(tmp_path / "secret"))
    with pytest.raises(ConfigError, match="both set"):
        load_settings()


def test_trusted_proxies_are_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMINDERS_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8,::1")
    assert load_settings().trusted_proxies == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


def test_secrets_do_not_show_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMINDERS_SECRET_KEY", "very-secret-value-123")
    assert "very-secret-value-123" not in repr(load_settings())
