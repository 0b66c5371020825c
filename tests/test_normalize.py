"""Phone numbers and language tags, including property tests on arbitrary input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reminders.normalize import choose_language, parse_phone, supported_language


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
