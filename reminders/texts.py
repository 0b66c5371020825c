"""SMS texts: GSM-7 / UCS-2 segment counting and localized rendering.

`render(kind, ctx)` renders a built-in text (kinds `reminder`, `late`, `moved`, `ack`, which a
clinic may override with its own Jinja2 template, and the built-in-only `opted_out`, `opted_in`,
`unclear`) in `en`, `fr`, `ru` or `zh` (Simplified). Templates run in a Jinja2 sandbox with
StrictUndefined and see only these variables:

- `clinic`: the clinic's name (one line, at most 40 characters)
- `date`: weekday, day and month, no year, in the clinic's timezone and the patient's language
  ("Monday 23 November", "lundi 23 novembre", "пн, 23 ноября", "11月23日星期一")
- `time`: the start time ("9:30 AM", "09:30"); `weekday`: the weekday alone ("Monday")
- `link`: the patient's confirm/cancel link
- `reply`: "Reply 1 to confirm, 2 to cancel." in the language when the sender takes replies, else ""
- `two_way`: whether the sender takes replies (a phone number, not an alphanumeric sender)
- `practitioner`, `location`: as the clinic sent them (one line, at most 40 characters), or ""
- `old_date`, `old_time`: the previous start, for `moved` ("" otherwise)
- `decision`: `confirmed` or `cancelled`, for `ack` ("" otherwise)

Clinic templates may not loop, assign, call methods, reach private attributes or use filters other
than a few harmless ones, and must carry `{{ link }}` (except `ack`). English and French texts are
cleaned to GSM-7 (typographic quotes, dashes, ellipses, no-break spaces, and letters such as
â ê î ô û ç œ that GSM-7 lacks) so that one stray character never doubles the cost of an SMS;
Russian and Chinese are UCS-2 anyway and left as they are.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, replace
from datetime import date, datetime, time
from functools import lru_cache
from itertools import product
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.dates import format_date, format_time
from jinja2 import StrictUndefined, Template, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

# GSM 03.38 default alphabet (without ESC) and its extension table (each costs two septets).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED = frozenset("^{}\\[~]|€\f")

Encoding = Literal["GSM-7", "UCS-2"]


@dataclass(frozen=True)
class Segments:
    encoding: Encoding
    length: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    count: int

    @property
    def vonage_type(self) -> Literal["text", "unicode"]:
        return "text" if self.encoding == "GSM-7" else "unicode"


def is_gsm7(text: str) -> bool:
    return all(c in GSM7_BASIC or c in GSM7_EXTENDED for c in text)


def _split(units: list[int], single: int, multi: int) -> int:
    """Segments for characters costing `units` each, never splitting one character."""
    total = sum(units)
    if total <= single:
        return 1
    count, used = 1, 0
    for cost in units:
        if used + cost > multi:
            count, used = count + 1, 0
        used += cost
    return count


def count_segments(text: str) -> Segments:
    """Encoding, length and number of SMS parts, as a handset and Vonage would split them.

    GSM-7: 160 septets in one part, 153 per part when concatenated. UCS-2: 70 code units,
    67 per part. Extension characters take two septets and astral characters (emoji) two code
    units; neither is split across parts.
    """
    if is_gsm7(text):
        units = [2 if c in GSM7_EXTENDED else 1 for c in text]
        return Segments("GSM-7", sum(units), _split(units, 160, 153) if text else 0)
    units = [2 if ord(c) > 0xFFFF else 1 for c in text]
    return Segments("UCS-2", sum(units), _split(units, 70, 67))


_TYPOGRAPHY = str.maketrans({
    **dict.fromkeys("’‘‚‛′`´", "'"), **dict.fromkeys("«»“”„‟″", '"'),
    **dict.fromkeys("‐‑‒–—―−", "-"), "…": "...", "œ": "oe", "Œ": "OE",
    **dict.fromkeys("\t\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008", " "),
    **dict.fromkeys("\u2009\u200a\u202f\u205f\u3000", " "),
    **dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff", ""),  # zero-width characters
})  # fmt: skip


def clean_gsm7(text: str) -> str:
    """Replaces what GSM-7 cannot encode by its plain equivalent ("août" -> "aout", ’ -> ').

    Characters with no GSM-7 equivalent (Cyrillic, Chinese, emoji) are kept as they are.
    """
    out: list[str] = []
    for char in text.translate(_TYPOGRAPHY):
        if char in GSM7_BASIC or char in GSM7_EXTENDED:
            out.append(char)
            continue
        base = "".join(
            c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c)
        )
        out.append(base if base and is_gsm7(base) else char)
    return "".join(out)


def single_line(value: str | None, limit: int = 40) -> str:
    """A clinic-supplied value on one line: control characters become spaces, whitespace is
    collapsed, and the result is cut to `limit` characters."""
    if not value:
        return ""
    spaced = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in value)
    return " ".join(spaced.split())[:limit].rstrip()


TEMPLATE_KINDS = ("reminder", "late", "moved", "ack")
BUILTIN_KINDS = ("opted_out", "opted_in", "unclear")
LANGUAGES = ("en", "fr", "ru", "zh")
VARIABLES = frozenset({
    "clinic", "date", "time", "weekday", "link", "reply", "two_way", "practitioner", "location",
    "old_date", "old_time", "decision",
})  # fmt: skip
DECISIONS = ("confirmed", "cancelled")
_LATIN = frozenset({"en", "fr"})

# "@tail" is the reply sentence when two-way (else a label) and the link; "@label" the label only.
_TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "date": "EEEE d MMMM",
        "reply": "Reply 1 to confirm, 2 to cancel.",
        "label": "Confirm or cancel:",
        "reminder": "{{ clinic }}: your appointment is on {{ date }} at {{ time }}. @tail",
        "late": "{{ clinic }}: appointment booked for {{ date }} at {{ time }}. @tail",
        "moved": "{{ clinic }}: appointment moved to {{ date }} at {{ time }}. @tail",
        "confirmed": "{{ clinic }}: your appointment on {{ date }} at {{ time }} is confirmed. "
        "Thank you!",
        "cancelled": "{{ clinic }}: your appointment on {{ date }} at {{ time }} is cancelled. "
        "Thank you for letting us know.",
        "opted_out": "You will receive no more messages from {{ clinic }}. "
        "Reply START to opt back in.",
        "opted_in": "You will receive messages from {{ clinic }} again. Reply STOP to opt out.",
        "unclear": "{{ clinic }}: sorry, we did not understand your reply. "
        "We will get back to you.",
    },
    "fr": {
        "date": "EEEE d MMMM",
        "reply": "Répondez 1 pour confirmer, 2 pour annuler.",
        "label": "Confirmer ou annuler :",
        "reminder": "{{ clinic }} : votre RDV est le {{ date }} à {{ time }}. @tail",
        "late": "{{ clinic }} : RDV pris pour le {{ date }} à {{ time }}. @tail",
        "moved": "{{ clinic }} : RDV déplacé au {{ date }} à {{ time }}. @tail",
        "confirmed": "{{ clinic }} : votre RDV du {{ date }} à {{ time }} est confirmé. Merci !",
        "cancelled": "{{ clinic }} : votre RDV du {{ date }} à {{ time }} est annulé. "
        "Merci de nous avoir prévenus.",
        "opted_out": "Vous ne recevrez plus de SMS de {{ clinic }}. "
        "Répondez START pour les recevoir à nouveau.",
        "opted_in": "Vous recevrez à nouveau les SMS de {{ clinic }}. "
        "Répondez STOP pour ne plus les recevoir.",
        "unclear": "{{ clinic }} : nous n'avons pas compris votre réponse. "
        "Nous vous recontacterons.",
    },
    "ru": {
        "date": "EEE, d MMMM",
        "reply": "Ответьте 1 — подтвердить, 2 — отменить.",
        "label": "Подтвердить или отменить:",
        "reminder": "{{ clinic }}: приём {{ date }} в {{ time }}. @tail",
        "late": "{{ clinic }}: приём {{ date }} в {{ time }}. @tail",  # no room for more
        "moved": "{{ clinic }}: приём перенесён на {{ date }}, {{ time }}. @label {{ link }}",
        "confirmed": "{{ clinic }}: приём {{ date }} в {{ time }} подтверждён. Спасибо!",
        "cancelled": "{{ clinic }}: приём {{ date }} в {{ time }} отменён. "
        "Спасибо, что предупредили.",
        "opted_out": "Вы больше не будете получать сообщения от {{ clinic }}. "
        "Чтобы снова их получать, ответьте START.",
        "opted_in": "Вы снова будете получать сообщения от {{ clinic }}. "
        "Чтобы отказаться, ответьте СТОП.",
        "unclear": "{{ clinic }}: мы не поняли Ваш ответ. Мы свяжемся с Вами.",
    },
    "zh": {
        "date": "M月d日EEEE",
        "reply": "回复1确认，回复2取消。",
        "label": "确认或取消：",
        "reminder": "【{{ clinic }}】提醒：您的预约时间为{{ date }} {{ time }}。@tail",
        "late": "【{{ clinic }}】您已预约{{ date }} {{ time }}。@tail",
        "moved": "【{{ clinic }}】您的预约已改至{{ date }} {{ time }}。@tail",
        "confirmed": "【{{ clinic }}】您{{ date }} {{ time }}的预约已确认，谢谢。",
        "cancelled": "【{{ clinic }}】您{{ date }} {{ time }}的预约已取消，感谢告知。",
        "opted_out": "【{{ clinic }}】您将不再收到我们的短信。回复START可重新订阅。",
        "opted_in": "【{{ clinic }}】您将重新收到我们的短信。回复TD退订。",
        "unclear": "【{{ clinic }}】抱歉，我们未能理解您的回复，诊所将尽快与您联系。",
    },
}


def _builtin(kind: str, language: str) -> str:
    texts = _TEXTS[language]
    if kind == "ack":
        source = (
            f"{{% if decision == 'confirmed' %}}{texts['confirmed']}"
            f"{{% else %}}{texts['cancelled']}{{% endif %}}"
        )
    else:
        source = texts[kind]
    sep = "" if language == "zh" else " "
    tail = f"{{% if two_way %}}{{{{ reply }}}}{{% else %}}{texts['label']}{{% endif %}}{sep}"
    return source.replace("@tail", tail + "{{ link }}").replace("@label", texts["label"])


@dataclass(frozen=True)
class MessageContext:
    clinic: str
    timezone: str  # IANA
    language: str  # one of LANGUAGES
    starts_at: datetime  # aware
    link: str
    two_way: bool
    practitioner: str | None = None
    location: str | None = None
    old_starts_at: datetime | None = None  # for `moved`
    decision: str | None = None  # for `ack`: "confirmed" or "cancelled"

    def __post_init__(self) -> None:
        if self.language not in LANGUAGES:
            raise ValueError(f"no built-in texts for {self.language!r}: use one of {LANGUAGES}")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {self.timezone!r}") from None
        for moment in (self.starts_at, self.old_starts_at):
            if moment is not None and moment.utcoffset() is None:
                raise ValueError("appointment times must carry a timezone")
        if self.decision is not None and self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, not {self.decision!r}")


def _when(moment: datetime | None, ctx: MessageContext) -> tuple[str, str, str]:
    """Date, time and weekday of `moment` in the clinic's zone and the patient's language."""
    if moment is None:
        return "", "", ""
    local = moment.astimezone(ZoneInfo(ctx.timezone))
    day, weekday = _day_words(local.date(), ctx.language)
    return day, _time_words(local.time(), ctx.language), weekday


# Babel's formatting is a sizeable share of a worker's CPU per SMS, and appointments share their
# days and slot times: each is formatted once per language.
@lru_cache(maxsize=4096)
def _day_words(day: date, lang: str) -> tuple[str, str]:
    return format_date(day, _TEXTS[lang]["date"], locale=lang), format_date(
        day, "EEEE", locale=lang
    )


@lru_cache(maxsize=4096)
def _time_words(at: time, lang: str) -> str:
    return format_time(at, "short", locale=lang)


def variables(ctx: MessageContext) -> dict[str, Any]:
    """The template variables for `ctx` (see the module docstring)."""
    date, time, weekday = _when(ctx.starts_at, ctx)
    old_date, old_time, _ = _when(ctx.old_starts_at, ctx)
    return {
        "clinic": single_line(ctx.clinic),
        "date": date,
        "time": time,
        "weekday": weekday,
        "link": ctx.link,
        "reply": _TEXTS[ctx.language]["reply"] if ctx.two_way else "",
        "two_way": ctx.two_way,
        "practitioner": single_line(ctx.practitioner),
        "location": single_line(ctx.location),
        "old_date": old_date,
        "old_time": old_time,
        "decision": ctx.decision or "",
    }


class TemplateError(ValueError):
    """A template that cannot be used, with the reason."""


_MAX_SOURCE, _MAX_TEXT = 2000, 1000
_FILTERS = frozenset({
    "capitalize", "d", "default", "first", "last", "length", "lower", "string", "title", "trim",
    "truncate", "upper",
})  # fmt: skip
_FORBIDDEN = (
    nodes.For, nodes.Macro, nodes.CallBlock, nodes.Extends, nodes.Include, nodes.Import,
    nodes.FromImport, nodes.FilterBlock, nodes.With, nodes.Assign, nodes.AssignBlock,
)  # fmt: skip


class _Sandbox(SandboxedEnvironment):
    """No globals, no method calls, a few filters, and no operator that can blow up memory."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
        self.globals.clear()
        self.filters = {name: f for name, f in self.filters.items() if name in _FILTERS}

    def is_safe_callable(self, obj: Any) -> bool:
        return False

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" or (operator == "%" and isinstance(left, str)):
            raise SecurityError(f"the operator {operator!r} is not allowed in SMS templates")
        if operator == "*":
            sizes = [len(x) for x in (left, right) if isinstance(x, str | list | tuple)]
            counts = [x for x in (left, right) if isinstance(x, int)]
            if sizes and counts and sizes[0] * counts[0] > _MAX_TEXT:
                raise SecurityError("repetition too long for an SMS")
        return super().call_binop(context, operator, left, right)


_ENV = _Sandbox()


def _refuse_unsafe(tree: nodes.Template) -> None:
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Call, *_FORBIDDEN)):
        if isinstance(node, nodes.Call):
            raise TemplateError("calling functions or methods is not allowed; use filters")
        if isinstance(node, _FORBIDDEN):
            raise TemplateError(f"{{% {type(node).__name__.lower()} %}} is not allowed")
        name: object = node.attr if isinstance(node, nodes.Getattr) else None
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value
        if isinstance(name, str) and name.startswith("_"):
            raise TemplateError(f"the attribute {name!r} is not allowed")


@lru_cache(maxsize=512)
def _compile(source: str) -> Template:
    if len(source) > _MAX_SOURCE:
        raise TemplateError(f"template longer than {_MAX_SOURCE} characters")
    try:
        tree = _ENV.parse(source)
        _refuse_unsafe(tree)
        unknown = meta.find_undeclared_variables(tree) - VARIABLES
        if unknown:
            raise TemplateError(
                f"unknown variable(s) {', '.join(sorted(unknown))}; "
                f"use {', '.join(sorted(VARIABLES))}"
            )
        return _ENV.from_string(tree)
    except TemplateError:
        raise
    except Exception as exc:  # jinja2 syntax/assertion errors: unknown filter, bad tag...
        line, message = getattr(exc, "lineno", None), getattr(exc, "message", None) or exc
        raise TemplateError(f"{f'line {line}: ' if line else ''}{message}") from None


def render(kind: str, ctx: MessageContext, template: str | None = None) -> str:
    """The SMS text of `kind` for `ctx`, from the clinic's own `template` when given."""
    if kind not in TEMPLATE_KINDS + BUILTIN_KINDS:
        raise ValueError(f"unknown text kind {kind!r}")
    if template is not None and kind not in TEMPLATE_KINDS:
        raise ValueError(f"{kind!r} texts cannot be replaced by a clinic's template")
    if kind == "ack" and ctx.decision is None:
        raise ValueError("an acknowledgement needs the decision")
    compiled = _compile(template if template is not None else _builtin(kind, ctx.language))
    try:
        text = compiled.render(variables(ctx)).strip()
    except Exception as exc:  # the sandbox, StrictUndefined, or plain errors such as 1/0
        raise TemplateError(f"cannot render the {kind} template: {exc}") from None
    if len(text) > _MAX_TEXT:
        raise TemplateError(f"the {kind} text is longer than {_MAX_TEXT} characters")
    return clean_gsm7(text) if ctx.language in _LATIN else text


def sample_context(language: str, *, two_way: bool = True) -> MessageContext:
    """A realistic appointment: Clinique du Parc, Monday 23 November 2026, 09:30 in Paris."""
    paris = ZoneInfo("Europe/Paris")
    return MessageContext(
        clinic="Clinique du Parc",
        timezone="Europe/Paris",
        language=language,
        starts_at=datetime(2026, 11, 23, 9, 30, tzinfo=paris),
        link="https://rdv.example.fr/c/Ab3dEf9hJk2MnPq",
        two_way=two_way,
        practitioner="Dr Martin",
        location="Cabinet 2",
        old_starts_at=datetime(2026, 11, 20, 14, 0, tzinfo=paris),
        decision="confirmed",
    )


def check_template(source: str, kind: str) -> None:
    """Raises TemplateError unless `source` is a usable clinic template for `kind`."""
    if kind not in TEMPLATE_KINDS:
        raise TemplateError(f"unknown template kind {kind!r}: use one of {TEMPLATE_KINDS}")
    _compile(source)
    needs_link = kind != "ack"
    if needs_link and "link" not in meta.find_undeclared_variables(_ENV.parse(source)):
        raise TemplateError(f"a {kind} template must contain {{{{ link }}}}")
    for language, two_way, decision in product(LANGUAGES, (True, False), DECISIONS):
        ctx = replace(sample_context(language, two_way=two_way), decision=decision)
        text = render(kind, ctx, source)
        if not text:
            raise TemplateError(f"the {kind} template renders an empty text ({language})")
        if needs_link and ctx.link not in text:
            raise TemplateError(f"the {kind} template leaves out the link ({language})")


@dataclass(frozen=True)
class TemplateCheck:
    language: str
    kind: str
    text: str
    encoding: Encoding
    length: int
    segments: int


def check_report(
    kinds: list[str] | None = None,
    templates: dict[tuple[str, str], str] | None = None,
    two_way: bool = True,
) -> list[TemplateCheck]:
    """Each language's texts for the sample appointment; `templates` maps (kind, language) to a
    clinic's own source."""
    report = []
    for language in LANGUAGES:
        ctx = sample_context(language, two_way=two_way)
        for kind in kinds or list(TEMPLATE_KINDS):
            text = render(kind, ctx, (templates or {}).get((kind, language)))
            seg = count_segments(text)
            report.append(TemplateCheck(language, kind, text, seg.encoding, seg.length, seg.count))
    return report
