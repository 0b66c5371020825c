"""Keys and secrets: API keys stored hashed, the service's secret key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from reminders.config import Settings
from reminders.models import AppSetting

API_KEY_PREFIX = "rk_"
_SECRET_KEY_SETTING = "secret_key"  # noqa: S105 (a row name, not a secret)


def new_api_key() -> str:
    """A clinic API key: 256 random bits, prefixed so leaked keys are easy to grep for."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough (a slow KDF guards low-entropy
    # passwords) and lets every request find its clinic by an indexed lookup.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_webhook_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def sign(secret: str, body: bytes) -> str:
    """`sha256=<hex>` HMAC of a body: the X-Reminders-Signature header."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def secret_key(session: Session, settings: Settings) -> bytes:
    """REMINDERS_SECRET_KEY, or in embedded SQLite mode one made once and kept in the database."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    if not settings.embedded_sqlite:
        raise RuntimeError("REMINDERS_SECRET_KEY is required outside embedded SQLite mode")
    stored = session.scalar(select(AppSetting.value).where(AppSetting.key == _SECRET_KEY_SETTING))
    if stored is None:
        stored = secrets.token_urlsafe(48)
        session.add(AppSetting(key=_SECRET_KEY_SETTING, value=stored))
        session.flush()
    return stored.encode()


def _keyed(secret: bytes, *parts: object) -> bytes:
    message = "\x00".join(str(p) for p in parts).encode("utf-8", "surrogatepass")
    return hmac.new(secret, message, hashlib.sha256).digest()


def link_token(secret: bytes, clinic_id: int, external_id: str) -> str:
    """The patient link's token: 72 bits of a keyed hash, 12 URL-safe characters (short, since
    it costs SMS characters; unguessable, and the link routes are rate limited)."""
    return base64.urlsafe_b64encode(_keyed(secret, "link", clinic_id, external_id))[:12].decode()


def in_holdout(secret: bytes, clinic_id: int, patient_external_id: str, share: float) -> bool:
    """Whether a patient belongs to the clinic's holdout: random, stable for the patient, and
    unpredictable without the secret key."""
    if share <= 0:
        return False
    draw = int.from_bytes(_keyed(secret, "holdout", clinic_id, patient_external_id)[:8], "big")
    return draw / 2**64 < share


_secret_cache: dict[str, bytes] = {}


def process_secret_key(settings: Settings) -> bytes:
    """The secret key, read (or made, in embedded mode) once per process and database."""
    cached = _secret_cache.get(settings.database_url)
    if cached is None:
        from reminders.db import session_scope

        with session_scope() as session:
            cached = _secret_cache[settings.database_url] = secret_key(session, settings)
    return cached
