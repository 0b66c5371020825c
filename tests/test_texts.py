"""SMS texts: segment counting, GSM-7 cleaning, localized rendering and clinic templates."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reminders.texts import (
    BUILTIN_KINDS,
    GSM7_BASIC,
    LANGUAGES,
    TEMPLATE_KINDS,
    MessageContext,
    TemplateError,
    check_report,
    check_template,
    clean_gsm7,
    count_segments,
    is_gsm7,
    render,
    sample_context,
    variables,
)

PARIS = ZoneInfo("Europe/Paris")
LINK = "https://rdv.example.fr/c/Ab3dEf9hJk2MnPq"
CLINIC = "Cabinet Saint-Michel"
TIMES = [(0, 5), (9, 30), (12, 0), (14, 45), (23, 59)]


def context(language: str, starts_at: datetime, **changes: object) -> MessageContext:
    ctx = MessageContext(
        clinic=CLINIC,
        timezone="Europe/Paris",
        language=language,
        starts_at=starts_at,
        link=LINK,
        two_way=True,
        old_starts_at=starts_at - timedelta(days=3),
        decision="confirmed",
    )
    return replace(ctx, **changes)  # type: ignore[arg-type]


def year_of_appointments() -> list[datetime]:
    days = [date(2026, 1, 1) + timedelta(days=n) for n in range(365)]
    return [datetime(d.year, d.month, d.day, h, m, tzinfo=PARIS) for d in days for h, m in TIMES]


def test_the_fixtures_are_the_sizes_the_targets_name() -> None:
    assert len(LINK) == 40
    assert len(CLINIC) == 20


# --- segment counting ---------------------------------------------------------------------------


def test_gsm7_fits_160_septets_in_one_segment_and_153_per_part_beyond() -> None:
    assert count_segments("a" * 160) == count_segments("a" * 160).__class__("GSM-7", 160, 1)
    assert count_segments("a" * 161).count == 2
    assert count_segments("a" * 306).count == 2
    assert count_segments("a" * 307).count == 3
    assert count_segments("").count == 0


def test_gsm7_extension_characters_count_two_septets_and_are_never_split() -> None:
    assert count_segments("€" * 80).length == 160
    assert count_segments("€" * 80).count == 1
    assert count_segments("€" * 81).count == 2
    # 306 septets would fit two parts of 153, but the euro sign cannot straddle them.
    straddling = "a" * 152 + "€" + "a" * 152
    assert count_segments(straddling).length == 306
    assert count_segments(straddling).count == 3


def test_ucs2_fits_70_code_units_in_one_segment_and_67_per_part_beyond() -> None:
    assert count_segments("я" * 70).count == 1
    assert count_segments("я" * 70).encoding == "UCS-2"
    assert count_segments("я" * 71).count == 2
    assert count_segments("я" * 134).count == 2
    assert count_segments("я" * 135).count == 3
    assert count_segments("я").vonage_type == "unicode"
    assert count_segments("a").vonage_type == "text"


def test_an_emoji_counts_two_code_units_and_is_never_split() -> None:
    assert count_segments("😀" * 35) == count_segments("я" * 70)
    assert count_segments("😀" * 35 + "a").count == 2
    straddling = "я" * 66 + "😀" + "я" * 66
    assert count_segments(straddling).length == 134
    assert count_segments(straddling).count == 3


def test_one_character_outside_gsm7_makes_the_whole_text_ucs2() -> None:
    assert count_segments("a" * 100 + "’").encoding == "UCS-2"
    assert count_segments("a" * 100 + "’").count == 2


# --- cleaning -----------------------------------------------------------------------------------


def test_cleaning_turns_babels_aout_into_aout() -> None:
    assert clean_gsm7("août") == "aout"
    ctx = context("fr", datetime(2026, 8, 24, 9, 30, tzinfo=PARIS))
    text = render("reminder", ctx)
    assert "lundi 24 aout" in text
    assert is_gsm7(text)


def test_cleaning_replaces_the_narrow_no_break_space_in_english_times() -> None:
    ctx = context("en", datetime(2026, 11, 23, 9, 30, tzinfo=PARIS))
    text = render("reminder", ctx)
    assert "at 9:30 AM." in text
    assert "\u202f" not in text
    assert is_gsm7(text)


def test_cleaning_replaces_typographic_punctuation_and_spaces() -> None:
    assert clean_gsm7("« Bonjour » l’été… – c‘est “ça” — œuvre\u00a0Œ\u2009x") == (
        '" Bonjour " l\'été... - c\'est "ca" - oeuvre OE x'
    )


def test_cleaning_strips_accents_gsm7_lacks_and_keeps_those_it_has() -> None:
    kept = "éèàùìòÉÇÄÖÑÜäöñüßÆæØøÅå€"
    assert clean_gsm7(kept) == kept
    assert all(c in GSM7_BASIC for c in "éèàùìòÉÇÄÖÑÜäöñüßÆæØøÅå")
    assert clean_gsm7("âêîôûëïÿçÂÊÎÔÛËÏŸÀÈ") == "aeiouei" + "ycAEIOUEIYAE"


def test_cleaning_keeps_what_has_no_gsm7_equivalent() -> None:
    assert clean_gsm7("Приём 预约 😀") == "Приём 预约 😀"


def test_russian_and_chinese_texts_are_left_as_they_are() -> None:
    ru = render("reminder", sample_context("ru"))
    assert "—" in ru  # a real dash, not cleaned to "-"
    assert "приём" in ru
    zh = render("reminder", sample_context("zh"))
    assert "，" in zh
    assert "。" in zh


# --- every month and weekday ---------------------------------------------------------------------


@pytest.mark.parametrize("language", ["en", "fr"])
@pytest.mark.parametrize("kind", ["reminder", "late", "moved"])
def test_latin_texts_are_one_gsm7_segment_every_day_of_the_year(language: str, kind: str) -> None:
    seen_months, seen_weekdays = set(), set()
    for starts_at in year_of_appointments():
        seen_months.add(starts_at.month)
        seen_weekdays.add(starts_at.weekday())
        for two_way in (True, False):
            text = render(kind, context(language, starts_at, two_way=two_way))
            segments = count_segments(text)
            assert segments.encoding == "GSM-7", text
            assert segments.length <= 160, text
            assert segments.count == 1
            assert text.count(LINK) == 1
    assert seen_months == set(range(1, 13))
    assert seen_weekdays == set(range(7))


@pytest.mark.parametrize("language", ["en", "fr"])
def test_latin_acknowledgements_are_one_gsm7_segment_every_day(language: str) -> None:
    for starts_at in year_of_appointments()[::5]:  # every day, one time each
        for decision in ("confirmed", "cancelled"):
            text = render("ack", context(language, starts_at, decision=decision))
            assert count_segments(text).encoding == "GSM-7", text
            assert count_segments(text).count == 1, text


@pytest.mark.parametrize("language", ["ru", "zh"])
@pytest.mark.parametrize("kind", TEMPLATE_KINDS)
def test_russian_and_chinese_texts_fit_two_ucs2_segments_every_day(
    language: str, kind: str
) -> None:
    for starts_at in year_of_appointments():
        for two_way in (True, False):
            ctx = context(language, starts_at, two_way=two_way)
            text = render(kind, ctx)
            segments = count_segments(text)
            assert segments.encoding == "UCS-2"
            assert segments.length <= 134, text
            assert segments.count <= 2
            if kind != "ack":
                assert text.count(LINK) == 1


def test_french_dates_read_naturally_for_every_month() -> None:
    months = [
        render("reminder", context("fr", datetime(2026, m, 15, 10, 0, tzinfo=PARIS)))
        for m in range(1, 13)
    ]
    expected = ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "aout"]
    expected += ["septembre", "octobre", "novembre", "décembre"]
    for text, month in zip(months, expected, strict=True):
        assert f" 15 {month} à 10:00." in text


# --- rendering ----------------------------------------------------------------------------------


def test_the_sample_texts_read_as_written() -> None:
    assert render("reminder", sample_context("fr")) == (
        "Clinique du Parc : votre RDV est le lundi 23 novembre à 09:30. "
        f"Répondez 1 pour confirmer, 2 pour annuler. {LINK}"
    )
    assert render("reminder", sample_context("en", two_way=False)) == (
        f"Clinique du Parc: your appointment is on Monday 23 November at 9:30 AM. "
        f"Confirm or cancel: {LINK}"
    )
    assert render("reminder", sample_context("ru")) == (
        "Clinique du Parc: приём пн, 23 ноября в 09:30. "
        f"Ответьте 1 — подтвердить, 2 — отменить. {LINK}"
    )
    assert render("reminder", sample_context("zh")) == (
        "【Clinique du Parc】提醒：您的预约时间为11月23日星期一 09:30。"
        f"回复1确认，回复2取消。{LINK}"
    )


def test_the_reply_sentence_appears_only_when_the_sender_takes_replies() -> None:
    for language in LANGUAGES:
        reply = variables(sample_context(language))["reply"]
        assert reply
        assert variables(sample_context(language, two_way=False))["reply"] == ""
        two_way = render("reminder", sample_context(language, two_way=True))
        one_way = render("reminder", sample_context(language, two_way=False))
        if language in ("en", "fr"):
            reply = clean_gsm7(reply)
        assert reply in two_way
        assert reply not in one_way
        assert one_way.endswith(LINK)
        assert two_way.endswith(LINK)


def test_times_are_shown_in_the_clinics_timezone() -> None:
    utc = datetime(2026, 7, 1, 13, 30, tzinfo=ZoneInfo("UTC"))
    assert "mercredi 1 juillet à 15:30" in render("reminder", context("fr", utc))
    winter = datetime(2026, 1, 5, 14, 0, tzinfo=ZoneInfo("UTC"))
    ny = context("en", winter, timezone="America/New_York")
    assert "Monday 5 January at 9:00 AM" in render("reminder", ny)
    assert "1月5日星期一 09:00" in render("reminder", replace(ny, language="zh"))


def test_the_moved_text_names_the_new_time_and_the_acknowledgement_the_decision() -> None:
    ctx = sample_context("en")
    assert "moved to Monday 23 November at 9:30 AM" in render("moved", ctx)
    assert "is confirmed" in render("ack", ctx)
    assert "is cancelled" in render("ack", replace(ctx, decision="cancelled"))
    assert "est annulé" in render("ack", replace(ctx, language="fr", decision="cancelled"))
    with pytest.raises(ValueError, match="decision"):
        render("ack", replace(ctx, decision=None))


def test_built_in_texts_stay_discreet() -> None:
    for language in LANGUAGES:
        ctx = replace(sample_context(language), practitioner="Dr Zorg", location="Oncologie")
        for kind in TEMPLATE_KINDS:
            text = render(kind, ctx)
            assert "Zorg" not in text
            assert "Oncologie" not in text
            assert "Clinique du Parc" in text


@pytest.mark.parametrize("language", LANGUAGES)
def test_opt_out_opt_in_and_unclear_answers_exist_in_every_language(language: str) -> None:
    ctx = sample_context(language)
    assert "START" in render("opted_out", ctx)
    assert "Clinique du Parc" in render("opted_out", ctx)
    assert any(word in render("opted_in", ctx) for word in ("STOP", "СТОП", "TD"))
    assert "Clinique du Parc" in render("unclear", ctx)
    for kind in BUILTIN_KINDS:
        assert count_segments(render(kind, ctx)).count <= 2
        with pytest.raises(ValueError, match="cannot be replaced"):
            render(kind, ctx, "{{ link }}")


def test_a_clinic_name_with_newlines_and_a_url_stays_on_one_line_and_is_truncated() -> None:
    name = "Centre\nmédical\r\n\t https://evil.example/login?next=1 Call 0800 000 000 now"
    ctx = replace(sample_context("fr"), clinic=name, practitioner="Dr\u2028Who\x00\x1b[2J")
    text = render("reminder", ctx)
    assert "\n" not in text
    assert "\r" not in text
    assert text.startswith("Centre médical https://evil.example/logi : ")  # 40 characters
    assert "0800" not in text
    custom = render("reminder", ctx, "{{ practitioner }}|{{ link }}")
    assert custom == f"Dr Who [2J|{LINK}"


def test_contexts_refuse_naive_times_unknown_languages_and_bad_decisions() -> None:
    ctx = sample_context("fr")
    with pytest.raises(ValueError, match="timezone"):
        replace(ctx, starts_at=datetime(2026, 11, 23, 9, 30))
    with pytest.raises(ValueError, match="no built-in texts"):
        replace(ctx, language="de")
    with pytest.raises(ValueError, match="decision"):
        replace(ctx, decision="maybe")
    with pytest.raises(ValueError, match="unknown timezone"):
        replace(ctx, timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="unknown text kind"):
        render("birthday", ctx)


# --- clinic templates ---------------------------------------------------------------------------


def test_a_good_custom_template_renders_with_the_same_cleaning() -> None:
    source = (
        "{{ clinic }} : « RDV » {{ weekday }} {{ date }} à {{ time }} avec {{ practitioner }}"
        "{% if location %} ({{ location }}){% endif %}… {{ reply }} {{ link }}"
    )
    check_template(source, "reminder")
    text = render("reminder", sample_context("fr"), source)
    assert text == (
        'Clinique du Parc : " RDV " lundi lundi 23 novembre à 09:30 avec Dr Martin (Cabinet 2)... '
        f"Répondez 1 pour confirmer, 2 pour annuler. {LINK}"
    )
    assert is_gsm7(text)


def test_a_custom_moved_template_may_name_the_old_time() -> None:
    source = "{{ clinic|upper }}: {{ old_date }} {{ old_time }} -> {{ date }} {{ time }} {{ link }}"
    check_template(source, "moved")
    text = render("moved", sample_context("en"), source)
    assert (
        text == f"CLINIQUE DU PARC: Friday 20 November 2:00 PM -> Monday 23 November 9:30 AM {LINK}"
    )


def test_an_acknowledgement_template_may_leave_out_the_link() -> None:
    check_template(
        "{{ clinic }}: {% if decision == 'confirmed' %}OK{% else %}noted{% endif %}", "ack"
    )


def test_check_template_refuses_unknown_variables() -> None:
    with pytest.raises(TemplateError, match=r"unknown variable.*patient_name"):
        check_template("{{ patient_name }} {{ link }}", "reminder")


@pytest.mark.parametrize("kind", ["reminder", "late", "moved"])
def test_check_template_refuses_a_template_without_the_link(kind: str) -> None:
    with pytest.raises(TemplateError, match="link"):
        check_template("{{ clinic }}: see you {{ date }}", kind)
    with pytest.raises(TemplateError, match=r"empty|link"):
        check_template("{% if false %}{{ link }}{% endif %}", kind)


def test_check_template_refuses_syntax_errors_and_unknown_kinds() -> None:
    with pytest.raises(TemplateError, match="line 1"):
        check_template("{{ clinic }: {{ link }}", "reminder")
    with pytest.raises(TemplateError, match="line 1"):
        check_template("{% if two_way %}{{ link }}", "reminder")
    with pytest.raises(TemplateError, match="unknown template kind"):
        check_template("{{ link }}", "opted_out")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }} {{ link }}",
        "{{ link.__class__ }}",
        "{{ link['__class__'] }}",
        "{{ link|attr('__class__') }}",
        "{{ link.upper() }}",
        "{{ link.format(1) }}",
        "{% for c in link %}{{ c }}{% endfor %}{{ link }}",
        "{% set x = link %}{{ x }}",
        "{% macro m() %}{% endmacro %}{{ link }}",
        "{{ link * 100000 }}",
        "{{ 9 ** 9 ** 9 }}{{ link }}",
        "{{ '%999999999s' % link }}",
        "{{ link|center(99999999) }}",
        "{{ range(10) }}{{ link }}",
        "{{ 1 / 0 }}{{ link }}",
    ],
)
def test_check_template_refuses_sandbox_escapes_and_blow_ups(source: str) -> None:
    with pytest.raises(TemplateError):
        check_template(source, "reminder")
    with pytest.raises(TemplateError):
        render("reminder", sample_context("en"), source)


def test_check_report_lists_every_language_with_encoding_and_segments() -> None:
    report = check_report()
    assert [(r.language, r.kind) for r in report] == [
        (language, kind) for language in LANGUAGES for kind in TEMPLATE_KINDS
    ]
    for row in report:
        segments = count_segments(row.text)
        assert (row.encoding, row.length, row.segments) == (
            segments.encoding,
            segments.length,
            segments.count,
        )
        expected = "GSM-7" if row.language in ("en", "fr") else "UCS-2"
        assert row.encoding == expected
    custom = check_report(["reminder"], {("reminder", "fr"): "Hop : {{ link }}"}, two_way=False)
    assert len(custom) == len(LANGUAGES)
    assert {r.language: r.text for r in custom}["fr"] == f"Hop : {LINK}"


# --- properties ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    clinic=st.text(max_size=80),
    practitioner=st.text(max_size=80),
    location=st.one_of(st.none(), st.text(max_size=80)),
    language=st.sampled_from(["en", "fr"]),
    two_way=st.booleans(),
)
def test_clinic_values_never_break_lines_or_repeat_the_link(
    clinic: str, practitioner: str, location: str | None, language: str, two_way: bool
) -> None:
    ctx = replace(
        sample_context(language, two_way=two_way),
        clinic=clinic,
        practitioner=practitioner,
        location=location,
    )
    custom = "{{ clinic }} {{ practitioner }} {{ location }} {{ date }} {{ time }} {{ link }}"
    for text in (render("reminder", ctx), render("reminder", ctx, custom)):
        assert "\n" not in text
        assert "\r" not in text
        assert text.count(LINK) == 1
