"""Phone numbers and language tags, normalised the same way for every intake feed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache, lru_cache

import phonenumbers
from phonenumbers import PhoneNumber, PhoneNumberType

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
    number, kind = _read(raw, country)
    if kind == PhoneNumberType.UNKNOWN:
        region = phonenumbers.region_code_for_number(number) or country
        raise ValueError(f"not a valid phone number for {region}")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return Phone(e164=e164, sms_capable=kind not in _NOT_SMS)


def _read(raw: str, country: str) -> tuple[PhoneNumber, int]:
    """The number and its type; raises ValueError when it is no number at all.

    The type is UNKNOWN exactly when is_valid_number is false (both match the number against
    its region's patterns, the costly part of a parse): one call does both."""
    number = _national(raw, country)
    if number is not None:
        kind = phonenumbers.number_type(number)
        if kind != PhoneNumberType.UNKNOWN:
            return number, kind
    try:
        number = phonenumbers.parse(raw, country)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {exc._msg}") from None
    return number, phonenumbers.number_type(number)


@dataclass(frozen=True)
class _Region:
    """What reading a national number of a region takes, when it is simple."""

    country_code: int
    idd: re.Pattern[str] | None  # the prefix that dials abroad ("00")
    national_prefix: re.Pattern[str] | None  # the prefix that dials a trunk call ("0")


@cache
def _region(country: str) -> _Region | None:
    """None for an unknown region, or one whose national prefix is read with a rewriting rule
    or carries a carrier code (Argentina, Brazil, Japan...): those take phonenumbers' parser."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(country.upper(), None)
    if metadata is None or metadata.country_code is None or metadata.national_prefix_transform_rule:
        return None
    prefix = metadata.national_prefix_for_parsing
    national_prefix = re.compile(prefix) if prefix else None
    if national_prefix is not None and national_prefix.groups:
        return None
    idd = re.compile(metadata.international_prefix) if metadata.international_prefix else None
    return _Region(metadata.country_code, idd, national_prefix)


def _national(digits: str, country: str) -> PhoneNumber | None:
    """The number phonenumbers.parse reads from a national number's digits, read as it does
    but without its general text handling (two thirds of its time) - or None when it would
    read them another way (a dialling prefix for abroad, the country code without its `+`, a
    region with rewriting rules). The caller keeps the result only when it is a valid number:
    where phonenumbers keeps the national prefix (the number without it does not fit the
    region's patterns) or refuses to drop it (too short without it), the number read here,
    without it, is not valid, and the caller asks phonenumbers instead."""
    region = _region(country)
    if (
        region is None
        or not (digits.isascii() and digits.isdigit())
        or digits.startswith(str(region.country_code))
        or (region.idd is not None and region.idd.match(digits))
    ):
        return None
    national = digits
    if region.national_prefix is not None:
        found = region.national_prefix.match(digits)
        if found:
            national = digits[found.end() :]
    if not 2 <= len(national) <= 17:
        return None
    number = PhoneNumber(country_code=region.country_code, national_number=int(national))
    if len(national) > 1 and national[0] == "0":  # as phonenumbers keeps leading zeros (Italy)
        zeros = 1
        while zeros < len(national) - 1 and national[zeros] == "0":
            zeros += 1
        number.italian_leading_zero = True
        if zeros != 1:
            number.number_of_leading_zeros = zeros
    return number


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
