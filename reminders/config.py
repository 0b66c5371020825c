"""Settings from the environment: read once, validated, with one-line errors.

Every variable `REMINDERS_X` may instead be given as `REMINDERS_X_FILE`, a path whose content
(stripped of surrounding whitespace) is the value: the usual way to pass secrets from Docker or
systemd credentials. Giving both is an error.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

PREFIX = "REMINDERS_"
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A configuration problem, worded as one line for an operator."""


class FileSecretsSource(PydanticBaseSettingsSource):
    """Reads `REMINDERS_X_FILE` for every field X."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        variable = f"{PREFIX}{field_name.upper()}"
        path = os.environ.get(f"{variable}_FILE")
        if path is None:
            return None, field_name, False
        if variable in os.environ:
            raise ConfigError(f"{variable} and {variable}_FILE are both set: keep one")
        try:
            return Path(path).read_text(encoding="utf-8").strip(), field_name, False
        except OSError as exc:
            raise ConfigError(f"{variable}_FILE: cannot read {path}: {exc.strerror}") from exc

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)

    database_url: str = "sqlite:///reminders.db"
    redis_url: str | None = None
    secret_key: SecretStr | None = None
    public_url: str = "http://127.0.0.1:8000"
    sms_provider: Literal["vonage", "console"] = "console"
    vonage_api_key: str | None = None
    vonage_api_secret: SecretStr | None = None
    vonage_signature_secret: SecretStr | None = None
    vonage_signature_method: Literal["sha256", "sha512", "sha1", "md5"] = "sha256"
    vonage_rest_host: str | None = None
    vonage_api_host: str | None = None
    send_rate: float = Field(default=30.0, gt=0, le=10_000)
    trusted_proxies: Annotated[tuple[IpNetwork, ...], NoDecode] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        assert isinstance(env_settings, EnvSettingsSource)
        return (init_settings, env_settings, FileSecretsSource(settings_cls))

    @field_validator("database_url")
    @classmethod
    def _parse_database_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(
                "not a SQLAlchemy database URL (e.g. sqlite:///reminders.db)"
            ) from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(
                f"unsupported database {url.get_backend_name()!r}: use sqlite or postgresql"
            )
        if url.drivername in ("postgresql", "postgresql+psycopg2"):
            # We ship psycopg 3; a plain postgresql:// URL means "the default driver".
            url = url.set(drivername="postgresql+psycopg")
        return url.render_as_string(hide_password=False)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or len(value.split("//", 1)[1]) == 0:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_proxies(cls, value: object) -> tuple[IpNetwork, ...]:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                return tuple(ipaddress.ip_network(p, strict=False) for p in parts)
            except ValueError as exc:
                raise ValueError(
                    f"a comma-separated list of addresses or networks: {exc}"
                ) from None
        return value  # type: ignore[return-value]

    @model_validator(mode="after")
    def _check_required(self) -> Settings:
        if self.sms_provider == "vonage":
            for name in ("vonage_api_key", "vonage_api_secret", "vonage_signature_secret"):
                if not getattr(self, name):
                    raise ValueError(f"{PREFIX}{name.upper()} is required with the vonage provider")
        if self.secret_key is None and not self.embedded_sqlite:
            raise ValueError(
                f"{PREFIX}SECRET_KEY is required unless running on SQLite in embedded mode"
            )
        if self.secret_key is not None and len(self.secret_key.get_secret_value()) < 16:
            raise ValueError(f"{PREFIX}SECRET_KEY must be at least 16 characters")
        return self

    @property
    def url(self) -> URL:
        return make_url(self.database_url)

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @property
    def embedded(self) -> bool:
        """No Redis: everything runs in one process with an in-process broker."""
        return self.redis_url is None

    @property
    def embedded_sqlite(self) -> bool:
        return self.embedded and self.is_sqlite


def format_error(exc: ValidationError) -> str:
    """One line naming the variable and the reason."""
    first = exc.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["loc"]:
        return f"{PREFIX}{str(first['loc'][0]).upper()}: {message}"
    return message


def load_settings() -> Settings:
    """Reads and validates the environment, raising ConfigError with a one-line reason."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(format_error(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
