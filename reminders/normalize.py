"""Phone numbers and language tags, normalised the same way for every intake feed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import phonenumbers
from phonenumbers import PhoneNumberType

# Languages with built-in texts. Any Chinese tag uses the Simplified texts.
SUPPORTED_LANGUAGES = ("en", "fr", "ru", "zh")

# Types that can never receive an SMS. Everything else (mobile, "fixed line or mobile" where the
# numbering plan cannot tell, VoIP, personal numbers...) is given the benefit of the doubt.
_NOT_SMS = {
    PhoneNumberType.FIXED_LINE,
    PhoneNumberType.TOLL_FREE,
    PhoneNumberType.PREMIUM_RATE,
    PhoneNumberType.SHARED_COST,
    PhoneNumberType.UAN,
    PhoneNumberType.VOICEMAIL,
}


@dataclass(frozen=True)
class Phone:
    e164: str
    sms_capable: bool


@dataclass(frozen=True)
class LanguageChoice:
    requested: str | None
    used: str
    fallback: bool


# Spaces, dots and dashes between digits: phonenumbers skips them, after a slow scan of its own.
# (From three digits: it reads "1.0" as no number at all, "10" as an invalid one.)
_SEPARATORS = str.maketrans("", "", " .-")
_PLAIN = re.compile(r"\+?(?:[0-9][ .\-]*){3,}")


@lru_cache(maxsize=65536)  # exports repeat numbers; a big import re-pushes them all
def parse_phone(raw: str, country: str) -> Phone:
    """Parses a number written the local way (default region `country`) or in +E.164.

    Raises ValueError with the reason for anything that is not a valid number.
    """
    if len(raw) > 40:
        raise ValueError("too long to be a phone number")
    if _PLAIN.fullmatch(raw):  # the usual forms: "06 12 34 56 78", "+33 6.12.34.56.78"
        raw = raw.translate(_SEPARATORS)
    try:
        number = phonenumbers.parse(raw, country)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {exc._msg}") from None
    # The type is UNKNOWN exactly when is_valid_number is false (both match the number against
    # its region's patterns, the costly part of a parse): one call does both.
    kind = phonenumbers.number_type(number)
    if kind == PhoneNumberType.UNKNOWN:
        region = phonenumbers.region_code_for_number(number) or country
        raise ValueError(f"not a valid phone number for {region}")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return Phone(e164=e164, sms_capable=kind not in _NOT_SMS)


def canonical_language(tag: str) -> str:
    """The standard form of a BCP 47 tag or ISO 639 code (`fre` -> `fr`, `fr_FR` -> `fr-FR`).

    Raises ValueError when it is not a valid tag.
    """
    import langcodes  # only intake needs it: the worker starts faster without its tables

    cleaned = tag.strip().replace("_", "-")
    if not cleaned or len(cleaned) > 35 or not langcodes.tag_is_valid(cleaned):
        raise ValueError(f"{tag!r} is not a valid BCP 47 language tag or ISO 639 code")
    return str(langcodes.standardize_tag(cleaned))


def base_language(tag: str) -> str | None:
    """The language subtag of a valid tag (`zh-Hans-CN` -> `zh`), None for `und`."""
    import langcodes

    language: str | None = langcodes.Language.get(canonical_language(tag)).language
    return language


@lru_cache(maxsize=4096)
def choose_language(requested: str | None, clinic_language: str) -> LanguageChoice:
    """The language whose texts the patient gets: theirs when built in, else the clinic's."""
    if requested is None or not requested.strip():
        return LanguageChoice(requested=None, used=clinic_language, fallback=False)
    canonical = canonical_language(requested)
    base = base_language(canonical)
    if base in SUPPORTED_LANGUAGES:
        return LanguageChoice(requested=canonical, used=base, fallback=False)
    return LanguageChoice(requested=canonical, used=clinic_language, fallback=True)


def supported_language(tag: str) -> str:
    """A clinic's language: must have built-in texts. Raises ValueError otherwise."""
    base = base_language(tag)
    if base not in SUPPORTED_LANGUAGES:
        raise ValueError(
            f"{tag!r} has no built-in texts: use one of {', '.join(SUPPORTED_LANGUAGES)}"
        )
    return base
