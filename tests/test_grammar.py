"""The reply grammar: realistic replies in each language, carrier keywords, and properties on any
text (never raises, stays fast, carrier keywords never act, decoration and case do not matter)."""

from __future__ import annotations

import time
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reminders import grammar
from reminders.grammar import (
    CARRIER_KEYWORDS,
    DIGITS,
    POLITE_SUFFIXES,
    WORDS,
    Intent,
    normalise,
    parse,
)
from reminders.normalize import SUPPORTED_LANGUAGES

CONFIRM, CANCEL, UNCLEAR, EMPTY = Intent.CONFIRM, Intent.CANCEL, Intent.UNCLEAR, Intent.EMPTY
OPT_OUT, OPT_IN, YES = Intent.OPT_OUT, Intent.OPT_IN, Intent.YES

ACTION_WORDS = [
    (word, intent)
    for language in WORDS.values()
    for intent, words in language.items()
    for word in words
]
CARRIER_WORDS = [(word, intent) for intent, words in CARRIER_KEYWORDS.items() for word in words]
KNOWN_WORDS = ACTION_WORDS + CARRIER_WORDS + list(DIGITS.items())
# Carrier keywords that are one word once normalised ("stop", "cancel", "стоп", "td"...).
CARRIER_TOKENS = {normalise(word) for word, _ in CARRIER_WORDS if " " not in normalise(word)}


def decoration_char(char: str) -> bool:
    """Spaces, punctuation and symbols that stay out of words even after NFKC."""
    return not any(c.isalnum() for c in unicodedata.normalize("NFKC", char))


DECORATION = st.text(
    st.characters(
        categories=("Zs", "Po", "Ps", "Pe", "Pi", "Pf", "Pd", "So", "Sk", "Sm", "Sc")
    ).filter(decoration_char),
    max_size=6,
)
ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)
# Texts made of known words, polite words and decoration: the replies most likely to be misread.
VOCABULARY_TEXT = st.lists(
    st.one_of(
        st.sampled_from([word for word, _ in KNOWN_WORDS]),
        st.sampled_from(POLITE_SUFFIXES),
        DECORATION,
        st.text(max_size=4),
    ),
    max_size=4,
).map(" ".join)


@pytest.mark.parametrize(
    ("reply", "intent"),
    [
        # The digits the reminder asks for, however they are typed.
        ("1", CONFIRM),
        ("2", CANCEL),
        ("２", CANCEL),
        ("１", CONFIRM),
        (" 1. ", CONFIRM),
        ("  2 ", CANCEL),
        ("1!", CONFIRM),
        ("2)", CANCEL),
        ("1 👍", CONFIRM),
        ("1️⃣", CONFIRM),
        ("①", CONFIRM),
        ("١", CONFIRM),
        ("1\n", CONFIRM),
        ("1 merci", CONFIRM),
        ("2, thanks", CANCEL),
        # English
        ("ok", CONFIRM),
        ("OK 👍", CONFIRM),
        ("Okay.", CONFIRM),
        ("Confirmed", CONFIRM),
        ("I confirm", CONFIRM),
        ("Y", CONFIRM),
        ("ok thanks", CONFIRM),
        ("Confirm, thank you!", CONFIRM),
        ("No", CANCEL),
        ("no.", CANCEL),
        # French
        ("Oui", CONFIRM),
        ("OUI!", CONFIRM),
        ("oui merci", CONFIRM),
        ("Oui, merci beaucoup !", CONFIRM),
        ("ouі svp", UNCLEAR),  # a Cyrillic і inside: not the French word
        ("Je confirme", CONFIRM),
        ("confirmé", CONFIRM),
        ("D’accord", CONFIRM),
        ("daccord", CONFIRM),
        ("Annuler", CANCEL),
        ("ANNULÉ", CANCEL),
        ("« annuler »", CANCEL),
        ("annulation", CANCEL),
        ("J'annule", CANCEL),
        ("j’annule svp", CANCEL),
        ("non", CANCEL),
        ("Non.", CANCEL),
        # Russian
        ("ДА", CONFIRM),
        ("да", CONFIRM),
        ("Да!", CONFIRM),
        ("да́", CONFIRM),
        ("да, спасибо", CONFIRM),
        ("Подтверждаю", CONFIRM),
        ("подтвердить", CONFIRM),
        ("Отмена", CANCEL),
        ("отменить", CANCEL),
        ("ОТМЕНЯЮ.", CANCEL),
        ("нет", CANCEL),
        ("Нет", CANCEL),
        # Chinese
        ("确认", CONFIRM),
        ("確認", CONFIRM),
        ("好的", CONFIRM),
        ("是", CONFIRM),
        ("确认。", CONFIRM),
        ("好的谢谢", CONFIRM),
        ("确认，谢谢！", CONFIRM),
        ("取消", CANCEL),
        ("取消。", CANCEL),
        ("不", CANCEL),
    ],
)
def test_realistic_replies_confirm_or_cancel(reply: str, intent: Intent) -> None:
    assert parse(reply) is intent


@pytest.mark.parametrize(
    ("reply", "intent"),
    [
        ("STOP", OPT_OUT),
        ("Stop", OPT_OUT),
        ("stop.", OPT_OUT),
        ("ＳＴＯＰ", OPT_OUT),
        ("stop sms", OPT_OUT),
        ("STOP SMS", OPT_OUT),
        ("STOPALL", OPT_OUT),
        ("СТОП", OPT_OUT),
        ("стоп", OPT_OUT),
        ("退订", OPT_OUT),
        ("TD", OPT_OUT),
        ("td", OPT_OUT),
        ("CANCEL", OPT_OUT),
        ("cancel", OPT_OUT),
        ("Cancel!", OPT_OUT),
        ("END", OPT_OUT),
        ("quit", OPT_OUT),
        ("Unsubscribe", OPT_OUT),
        ("revoke", OPT_OUT),
        ("OPT OUT", OPT_OUT),
        ("opt-out", OPT_OUT),
        ("optout", OPT_OUT),
        ("stop please", OPT_OUT),
        ("START", OPT_IN),
        ("start", OPT_IN),
        ("unstop", OPT_IN),
        ("UNSTOP", OPT_IN),
        ("YES", YES),
        ("yes!", YES),
        ("Yes", YES),
        ("yes please", YES),
    ],
)
def test_carrier_keywords_opt_out_or_in_and_never_act_on_an_appointment(
    reply: str, intent: Intent
) -> None:
    assert parse(reply) is intent


@pytest.mark.parametrize(
    "reply",
    [
        "Can I come at 10?",
        "1 2",
        "12",
        "0",
        "3",
        "1.5",
        "yes no",
        "oui non",
        "ok no",
        "2 stop",
        "stop 1",
        "please cancel",
        "cancel my appointment",
        "I will be 10 minutes late",
        "Je serai en retard",
        "non merci",  # "no thanks": too vague to cancel on
        "no thanks",
        "нет, спасибо",
        "不谢谢",
        "不用了",
        "merci",
        "thanks",
        "谢谢",
        "hello",
        "oui oui",
        "confirmer le rendez-vous de demain",
        "№",
    ],
)
def test_anything_else_is_unclear(reply: str) -> None:
    expected = EMPTY if reply == "№" else UNCLEAR  # "№" is a symbol, never the word "No"
    assert parse(reply) is expected


@pytest.mark.parametrize(
    "reply", ["", " ", "   \n\t", "👍", "🙂🙂", "👍🏽", "❤️", "...", "?!", "\u200b", "« »", "🇫🇷"]
)
def test_empty_whitespace_emoji_or_punctuation_only_replies_are_empty(reply: str) -> None:
    assert parse(reply) is EMPTY


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("  Oui ! 👍", "oui"),
        ("« annuler »", "annuler"),
        ("ANNULÉ", "annule"),
        ("Ｏｕｉ", "oui"),
        ("１", "1"),
        ("1️⃣", "1"),
        ("D’ACCORD", "d'accord"),
        ("'oui'", "oui"),
        ("stop   SMS", "stop sms"),
        ("opt-out", "opt out"),
        ("Ёлка и йогурт", "елка и йогурт"),
        ("Йод", "йод"),
        ("ОТМЕНА", "отмена"),
        ("确认，谢谢。", "确认 谢谢"),
        ("Can I come at 10?", "can i come at 10"),
        ("ok_ok", "ok ok"),
        ("Straße", "strasse"),
        ("\ud800", ""),
    ],
)
def test_normalise_folds_width_case_latin_accents_and_decoration_but_keeps_cyrillic_letters(
    text: str, normalised: str
) -> None:
    assert normalise(text) == normalised


@pytest.mark.parametrize(("word", "intent"), KNOWN_WORDS)
def test_every_word_in_the_tables_reads_as_its_intent_in_any_case(
    word: str, intent: Intent
) -> None:
    assert parse(word) is intent
    assert parse(word.upper()) is intent
    assert parse(f" {word.capitalize()}! ") is intent


def test_the_words_cover_every_supported_language_and_only_confirm_or_cancel() -> None:
    assert set(WORDS) == set(SUPPORTED_LANGUAGES)
    for language in WORDS.values():
        assert set(language) == {CONFIRM, CANCEL}


def test_no_local_word_is_a_carrier_keyword() -> None:
    carrier = {normalise(word) for word, _ in CARRIER_WORDS}
    for word, _ in ACTION_WORDS:
        assert normalise(word) not in carrier, word
        assert not set(normalise(word).split()) & CARRIER_TOKENS, word


def test_a_carrier_keyword_added_to_the_words_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    words = {**WORDS, "en": {CONFIRM: ("ok",), CANCEL: ("Cancel",)}}
    monkeypatch.setattr(grammar, "WORDS", words)
    with pytest.raises(ValueError, match="carrier keyword"):
        grammar._build_table()


def test_a_word_that_both_confirms_and_cancels_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    words = {**WORDS, "en": {CONFIRM: ("ok",), CANCEL: ("OK",)}}
    monkeypatch.setattr(grammar, "WORDS", words)
    with pytest.raises(ValueError, match="both confirms and cancels"):
        grammar._build_table()


def test_a_10_kb_reply_is_unclear_and_quick() -> None:
    texts = [
        "Bonjour, je voudrais savoir si je peux venir plus tard. " * 180,
        "x" * 10_000,
        "1 " * 5_000,
        "\ufdfa" * 10_000,  # expands eighteenfold under NFKC
    ]
    for text in texts:
        started = time.perf_counter()
        assert parse(text) is UNCLEAR
        assert time.perf_counter() - started < 0.25


def test_a_keyword_padded_to_10_kb_is_still_the_whole_message() -> None:
    assert parse("STOP" + " " * 10_000) is OPT_OUT
    assert parse("\n" * 5_000 + "стоп" + "👍" * 3_000) is OPT_OUT
    assert parse("stop" + "ʼ" * 10_000) is OPT_OUT
    assert parse("1" + "!" * 10_000) is CONFIRM
    assert parse("👍" * 5_000) is EMPTY


@settings(max_examples=300)
@given(ANY_TEXT)
def test_parse_never_raises_on_any_text(text: str) -> None:
    assert isinstance(parse(text), Intent)
    assert parse(normalise(text)) is parse(text)


@settings(max_examples=300)
@given(ANY_TEXT)
def test_normalising_twice_changes_nothing(text: str) -> None:
    once = normalise(text)
    assert normalise(once) == once
    assert once == once.strip()
    assert "  " not in once


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=1, max_size=40), st.sampled_from([10_000, 20_000]))
def test_parse_stays_fast_on_long_text(piece: str, size: int) -> None:
    text = (piece * (size // len(piece) + 1))[:size]
    started = time.perf_counter()
    parse(text)
    assert time.perf_counter() - started < 0.25


@settings(max_examples=300)
@given(VOCABULARY_TEXT)
def test_carrier_keywords_never_confirm_or_cancel(text: str) -> None:
    if parse(text) in (CONFIRM, CANCEL):
        assert not set(normalise(text).split()) & CARRIER_TOKENS


@settings(max_examples=300)
@given(st.sampled_from(CARRIER_WORDS), DECORATION, DECORATION)
def test_a_decorated_carrier_keyword_keeps_its_meaning(
    keyword: tuple[str, Intent], before: str, after: str
) -> None:
    word, intent = keyword
    assert parse(before + word + after) is intent


@settings(max_examples=300)
@given(st.sampled_from(KNOWN_WORDS), DECORATION, DECORATION)
def test_surrounding_whitespace_and_punctuation_do_not_change_a_known_word(
    known: tuple[str, Intent], before: str, after: str
) -> None:
    word, intent = known
    assert parse(before + word + after) is intent


@settings(max_examples=300)
@given(VOCABULARY_TEXT, st.lists(st.booleans(), min_size=1))
def test_case_does_not_change_the_result(text: str, upper: list[bool]) -> None:
    mixed = "".join(c.upper() if upper[i % len(upper)] else c.lower() for i, c in enumerate(text))
    assert parse(mixed) is parse(text) is parse(text.upper()) is parse(text.lower())
