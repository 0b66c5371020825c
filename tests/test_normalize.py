"""Phone numbers and language tags, including property tests on arbitrary input."""

from __future__ import annotations

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reminders.normalize import Phone, choose_language, parse_phone, supported_language


@given(st.text(max_size=60))
def test_any_text_either_parses_to_e164_or_raises_value_error(raw: str) -> None:
    try:
        phone = parse_phone(raw, "FR")
    except ValueError as exc:
        assert str(exc)
    else:
        assert phone.e164.startswith("+")
        assert phone.e164[1:].isdigit()
        assert parse_phone(phone.e164, "GB") == phone  # E.164 is read the same anywhere


def _reference_parse(raw: str, country: str) -> Phone | str:
    """The plain way to read a number: phonenumbers on the raw text, validity, then the type."""
    try:
        number = phonenumbers.parse(raw, country)
    except phonenumbers.NumberParseException:
        return "unparsable"
    if not phonenumbers.is_valid_number(number):
        return "invalid"
    kind = phonenumbers.number_type(number)
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return Phone(e164, kind not in _NO_SMS)


_NO_SMS = {
    phonenumbers.PhoneNumberType.FIXED_LINE,
    phonenumbers.PhoneNumberType.TOLL_FREE,
    phonenumbers.PhoneNumberType.PREMIUM_RATE,
    phonenumbers.PhoneNumberType.SHARED_COST,
    phonenumbers.PhoneNumberType.UAN,
    phonenumbers.PhoneNumberType.VOICEMAIL,
}


def _ours(raw: str, country: str) -> Phone | str:
    try:
        return parse_phone(raw, country)
    except ValueError as exc:
        return "unparsable" if str(exc).startswith("not a phone number") else "invalid"


@settings(max_examples=1000)
@given(
    st.from_regex(r"\A\+?[0-9][0-9 .\-]{0,20}\Z")
    | st.builds(lambda d: "0" + d, st.from_regex(r"\A[1-9][0-9]{8,9}\Z")),
    st.sampled_from(sorted(phonenumbers.SUPPORTED_REGIONS)),
)
def test_the_quick_reading_of_plain_numbers_is_the_plain_reading(raw: str, country: str) -> None:
    """Separators are dropped before parsing and the type check doubles as the validity check
    (both to save CPU on imports): the same answer as phonenumbers' own full path, in every
    region."""
    assert _ours(raw, country) == _reference_parse(raw, country)


@pytest.mark.parametrize(
    ("raw", "country"),
    [
        ("06 12 34 56 78", "FR"),
        ("+33 6.12.34.56.78", "GB"),
        ("01-42-68-53-00", "FR"),
        ("07911 123456", "GB"),
        ("(020) 7946 0958", "GB"),
        ("+39 06 6982 0000", "IT"),
        ("8 (800) 555-35-35", "RU"),
        ("011 15-2345-6789", "AR"),
        ("+1 650-253-0000", "US"),
        ("0033 6 12 34 56 78", "FR"),
        ("33 6 12 34 56 78", "FR"),
        ("0612345678 ext. 12", "FR"),
        ("12", "FR"),
    ],
)
def test_usual_forms_read_as_phonenumbers_reads_them(raw: str, country: str) -> None:
    assert _ours(raw, country) == _reference_parse(raw, country)


@given(st.text(max_size=40))
def test_any_language_text_either_chooses_a_supported_language_or_raises(raw: str) -> None:
    try:
        choice = choose_language(raw, "en")
    except ValueError as exc:
        assert "language tag" in str(exc)
    else:
        assert choice.used in ("en", "fr", "ru", "zh")


def test_chinese_variants_use_the_chinese_texts() -> None:
    for tag in ("zh", "zh-CN", "zh-Hans", "zh-Hans-CN", "chi", "zho"):
        assert choose_language(tag, "fr").used == "zh", tag


def test_the_clinic_language_must_have_texts() -> None:
    assert supported_language("fr-FR") == "fr"
    with pytest.raises(ValueError, match="no built-in texts"):
        supported_language("de")


def test_the_default_region_is_the_clinics() -> None:
    assert parse_phone("07911 123456", "GB").e164 == "+447911123456"
    assert parse_phone("06 12 34 56 78", "FR").e164 == "+33612345678"
    with pytest.raises(ValueError, match="not a valid phone number"):
        parse_phone("06 12 34 56 78", "GB")
