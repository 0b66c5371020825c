"""The reply grammar: what a patient's SMS answer to a reminder means. Pure: no database, no I/O.

`parse(text)` reads a reply the conservative way. The whole reply, once normalised, must be one
of the known words below: `1` / `2`, a local word for confirm or cancel, or a carrier keyword,
optionally followed by a polite word ("oui merci", "1 thanks", "stop please"). Anything longer or
mixed ("1 2", "yes no", "Can I come at 10?") is UNCLEAR and goes to a person.

Carrier keywords are never actions (DESIGN.md rule 9): `CANCEL` opts the number out, it does not
cancel an appointment, and no local word is allowed to be a carrier keyword (checked at import).
`YES` is its own intent: an opt-in for an opted-out number, a confirmation otherwise; the caller,
which knows the opt-out state, decides.

Normalisation (`normalise`), applied to the reply and to every word in the tables:
- Unicode NFKC (full-width `１` `Ｏｕｉ`, circled `①`, ligatures), then casefold;
- typographic apostrophes (’ ‘ ʼ ` ′) become `'`; an apostrophe is kept only inside a word;
- accents are stripped from Latin letters (`annulé` -> `annule`); Cyrillic keeps its letters (`й`
  stays) except that stress marks go and `ё` reads as `е`;
- digits of any script read as ASCII digits (`١` -> `1`);
- punctuation, symbols (emoji included), separators, control and format characters, variation
  selectors and enclosing marks (the keycap of `1️⃣`) are word breaks; words are joined by one space.
So "  Oui ! 👍", "« annuler »", "1.", "1️⃣" and "ＳＴＯＰ" become "oui", "annuler", "1", "1", "stop".
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Mapping


class Intent(enum.Enum):
    CONFIRM = "confirm"
    CANCEL = "cancel"
    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"
    YES = "yes"  # carrier opt-in keyword: opt-in if the number is opted out, else a confirmation
    UNCLEAR = "unclear"
    EMPTY = "empty"


# The two digits the reminder asks for, in every language.
DIGITS: dict[str, Intent] = {"1": Intent.CONFIRM, "2": Intent.CANCEL}

# Plain words per language (written naturally; matched after normalisation, so case, accents and
# punctuation around them do not matter, and "d'accord" also matches "daccord" / "d accord").
# Deliberately short: a word missing here only means a person reads the reply.
WORDS: dict[str, dict[Intent, tuple[str, ...]]] = {
    "en": {
        Intent.CONFIRM: ("confirm", "confirmed", "i confirm", "ok", "okay", "y"),
        # "cancel" is a carrier STOP keyword (it opts out), so English cancels with 2 or "no".
        Intent.CANCEL: ("no",),
    },
    "fr": {
        Intent.CONFIRM: (
            "oui",
            "confirme",
            "confirmé",
            "confirmer",
            "je confirme",
            "d'accord",
            "ok",
        ),
        Intent.CANCEL: ("annuler", "annule", "annulé", "annulation", "j'annule", "non"),
    },
    "ru": {
        Intent.CONFIRM: ("да", "подтверждаю", "подтвердить"),
        Intent.CANCEL: ("нет", "отмена", "отменить", "отменяю"),
    },
    "zh": {
        Intent.CONFIRM: ("确认", "確認", "确定", "是", "是的", "好", "好的"),
        Intent.CANCEL: ("取消", "不"),
    },
}

# Carrier keywords (CTIA, Vonage, French and Chinese operators). Whole message only, never actions.
CARRIER_KEYWORDS: dict[Intent, tuple[str, ...]] = {
    Intent.OPT_OUT: (
        "stop",
        "stop all",
        "stopall",
        "stop sms",
        "cancel",
        "end",
        "quit",
        "unsubscribe",
        "revoke",
        "opt out",
        "optout",
        "стоп",
        "退订",
        "td",
    ),
    Intent.OPT_IN: ("start", "unstop"),
    Intent.YES: ("yes",),
}

# Polite words that may follow a reply ("oui merci", "1 thanks", "stop please", "好的谢谢"). Not
# after a bare "no" / "non" / "нет" / "不": "non merci" is "no thanks", too vague to cancel on.
POLITE_SUFFIXES: tuple[str, ...] = (
    "thanks",
    "thank you",
    "thx",
    "please",
    "merci",
    "merci beaucoup",
    "svp",
    "s'il vous plaît",
    "спасибо",
    "пожалуйста",
    "谢谢",
    "谢谢你",
    "谢谢您",
)
NO_SUFFIX_AFTER: tuple[str, ...] = ("no", "non", "нет", "不")

# A normalised reply longer than this is UNCLEAR without looking further (every known reply is far
# shorter; the cap keeps a 10 kB text cheap).
MAX_REPLY_LENGTH = 160

_APOSTROPHES = frozenset("'\u2019\u2018\u02bc\u0060\u2032\u00b4\uff07")
# After NFD: combining marks on a Latin letter (or on nothing: NFKC turns ´ ¨ ˘ into space + mark).
_LATIN_MARKS = re.compile(
    r"(?:(?<=[a-z\u00df-\u024f\u1e00-\u1eff])|(?<=\s)|^)"
    r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]+"
)
# Combining marks on a Cyrillic letter: stress marks (grave, acute) and the diaeresis of ё go,
# the breve of й stays.
_CYRILLIC_MARKS = re.compile(r"(?<=[\u0400-\u04ff])[\u0300\u0301\u0308]+")
# Once breaks are spaces, what is neither a word character nor a space is an apostrophe or a
# combining mark: neither may start a word (a mark needs a letter to sit on), and an apostrophe
# may not end one.
_WORD_EDGES = re.compile(r"(?:(?<=\s)|^)[^\w\s]+|'+(?=\s|\Z)")


class _Breaks(dict[int, str]):
    """A `str.translate` table filled on demand: word characters map to themselves (digits to
    ASCII), everything else to a space. Bounded so that odd input cannot make it grow forever."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        category = unicodedata.category(char)
        if char in _APOSTROPHES:
            value = "'"
        elif category == "Nd":
            value = str(unicodedata.decimal(char))
        elif category[0] in "LN" or (
            category in ("Mn", "Mc")
            and not (0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF)
        ):
            value = char
        else:  # punctuation, symbols (emoji), separators, controls, enclosing marks, selectors
            value = " "
        if len(self) < 20_000:
            self[code] = value
        return value


_BREAKS = _Breaks()


class _Letters(dict[int, str | None]):
    """A `str.translate` table that keeps letters and digits only: a cheap lower bound of the
    length of the normalised text."""

    def __missing__(self, code: int) -> str | None:
        char = chr(code)
        keep = unicodedata.category(char)[0] in "LN" and char not in _APOSTROPHES  # ʼ is a letter
        value = char if keep else None
        if len(self) < 20_000:
            self[code] = value
        return value


_LETTERS = _Letters()


def normalise(text: str) -> str:
    """The reply as it is matched: see the module docstring. Never raises on any `str`."""
    # Symbols become breaks before NFKC, so that "№" or "™" never turn into letters.
    s = unicodedata.normalize("NFKC", text.translate(_BREAKS)).casefold()
    s = unicodedata.normalize("NFD", s)
    s = _LATIN_MARKS.sub("", s)
    s = _CYRILLIC_MARKS.sub("", s)
    s = unicodedata.normalize("NFKC", s).translate(_BREAKS)
    return " ".join(_WORD_EDGES.sub("", s).split())


def _variants(word: str) -> set[str]:
    key = normalise(word)
    if "'" not in key:
        return {key}
    return {key, key.replace("'", ""), key.replace("'", " ")}


def _build_table() -> dict[str, Intent]:
    table: dict[str, Intent] = {}
    for intent, keywords in CARRIER_KEYWORDS.items():
        for word in keywords:
            table.update(dict.fromkeys(_variants(word), intent))
    actions: dict[str, Intent] = dict(DIGITS)
    for language in WORDS.values():
        for intent, words in language.items():
            if intent not in (Intent.CONFIRM, Intent.CANCEL):
                raise ValueError(f"WORDS may only hold CONFIRM and CANCEL words, not {intent}")
            for word in words:
                for key in _variants(word):
                    if key in table:
                        raise ValueError(f"{word!r} is a carrier keyword and cannot be an action")
                    if actions.setdefault(key, intent) is not intent:
                        raise ValueError(f"{word!r} both confirms and cancels")
    table.update(actions)
    return table


_TABLE: Mapping[str, Intent] = _build_table()
_NO_SUFFIX_AFTER = frozenset(normalise(w) for w in NO_SUFFIX_AFTER)
# Longest first, so "thank you" is tried before a shorter suffix could match part of it.
_SUFFIXES = sorted({normalise(w) for w in POLITE_SUFFIXES}, key=len, reverse=True)


def _is_cjk(char: str) -> bool:
    return "\u3400" <= char <= "\u9fff" or "\uf900" <= char <= "\ufaff"


def _without_polite_suffix(key: str) -> str | None:
    for suffix in _SUFFIXES:
        if key.endswith(" " + suffix):
            return key[: -len(suffix) - 1]
        # Chinese is written without spaces: "好的谢谢".
        if _is_cjk(suffix[0]) and key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)]
    return None


def parse(text: str) -> Intent:
    """What a patient's reply means. EMPTY when nothing but spaces, punctuation or emoji is left;
    UNCLEAR unless the whole reply is a known word (optionally followed by a polite word)."""
    # Letters and digits all survive normalisation, so many of them cannot make a known reply: a
    # long text is turned down after one pass in C, without the per-word work of `normalise`.
    if len(text) > MAX_REPLY_LENGTH and len(text.translate(_LETTERS)) > MAX_REPLY_LENGTH:
        return Intent.UNCLEAR
    key = normalise(text)
    if not key:
        return Intent.EMPTY
    if len(key) > MAX_REPLY_LENGTH:
        return Intent.UNCLEAR
    intent = _TABLE.get(key)
    if intent is not None:
        return intent
    base = _without_polite_suffix(key)
    if base is None or base in _NO_SUFFIX_AFTER:
        return Intent.UNCLEAR
    return _TABLE.get(base, Intent.UNCLEAR)
