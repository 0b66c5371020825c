"""The patient link `/c/{token}`: a small page to confirm or cancel an appointment.

GET (and HEAD) only show: phones, scanners and link previews open links on their own (DESIGN
rule 8). POST `action=confirm|cancel` (a form, or JSON) applies the decision once through
`replies.decide` and shows the result. Tokens that are malformed or unknown get the same 404
page; from the appointment's start the link answers 410. A per-address rate limit slows down
anyone trying tokens. Every page is self-contained HTML (no script, no external asset) in the
patient's language, and never cached, indexed or framed.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import json
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from typing import Annotated
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

from babel import Locale
from babel.dates import format_date, format_time
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from reminders import broker
from reminders.config import IpNetwork, get_settings
from reminders.db import get_engine, session_scope
from reminders.models import Appointment, Clinic, Patient
from reminders.replies import Action, decide

router = APIRouter(tags=["patient links"], include_in_schema=False)

TOKEN = re.compile(r"[A-Za-z0-9_-]{12}")
MAX_FORM_BYTES = 2048  # a real form sends about 15 bytes
ACTIONS: dict[str, Action] = {"confirm": "confirm", "cancel": "cancel"}
HEADERS = {
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}

# Formal register throughout (vous / Вы / 您). Error texts are "heading|sentence".
_NB = "\u00a0"  # French puts a no-break space before ":"
TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "title": "Your appointment", "date": "Date", "time": "Time", "practitioner": "With",
        "place": "Place", "state": "Status", "unconfirmed": "Not confirmed yet",
        "confirmed": "Confirmed", "cancelled_by_patient": "Cancelled at your request",
        "cancelled_by_clinic": "Cancelled by the clinic", "confirm": "Confirm my appointment",
        "cancel": "Cancel my appointment",
        "hint": "If you cannot come, please cancel: someone else can then have this time.",
        "done_confirm": "Thank you: your appointment is confirmed.",
        "done_cancel": "Your appointment is cancelled. Thank you for letting us know.",
        "unchanged": "Nothing has changed: your appointment was already in this state.",
        "stays_cancelled": "This appointment is cancelled and stays cancelled. Please contact the "
        "clinic to book again.",
        "not_found": "Link not found|This link is not valid. Please check the link in your text "
        "message, or contact the clinic.",
        "expired": "This link has expired|The appointment has started or is over. Please contact "
        "the clinic.",
        "too_many": "Too many requests|Please wait a minute, then try again.",
        "bad_request": "Request not understood|Please use the buttons on the appointment page.",
    },
    "fr": {
        "title": "Votre rendez-vous", "date": "Date", "time": "Heure", "practitioner": "Avec",
        "place": "Lieu", "state": "État", "unconfirmed": "Pas encore confirmé",
        "confirmed": "Confirmé", "cancelled_by_patient": "Annulé à votre demande",
        "cancelled_by_clinic": "Annulé par l'établissement", "confirm": "Confirmer mon rendez-vous",
        "cancel": "Annuler mon rendez-vous",
        "hint": f"Si vous ne pouvez pas venir, merci d'annuler{_NB}: ce créneau pourra être "
        "proposé à un autre patient.",
        "done_confirm": f"Merci{_NB}: votre rendez-vous est confirmé.",
        "done_cancel": "Votre rendez-vous est annulé. Merci de nous avoir prévenus.",
        "unchanged": f"Aucun changement{_NB}: votre rendez-vous était déjà dans cet état.",
        "stays_cancelled": "Ce rendez-vous est annulé et le reste. Pour un nouveau rendez-vous, "
        "veuillez contacter l'établissement.",
        "not_found": "Lien introuvable|Ce lien n'est pas valide. Veuillez vérifier le lien reçu "
        "par SMS, ou contacter l'établissement.",
        "expired": "Ce lien a expiré|Le rendez-vous a commencé ou est passé. Veuillez contacter "
        "l'établissement.",
        "too_many": "Trop de demandes|Veuillez patienter une minute, puis réessayer.",
        "bad_request": "Demande incomprise|Veuillez utiliser les boutons de la page du "
        "rendez-vous.",
    },
    "ru": {
        "title": "Ваш приём", "date": "Дата", "time": "Время", "practitioner": "Врач",
        "place": "Место", "state": "Статус", "unconfirmed": "Ещё не подтверждён",
        "confirmed": "Подтверждён", "cancelled_by_patient": "Отменён по Вашей просьбе",
        "cancelled_by_clinic": "Отменён клиникой", "confirm": "Подтвердить приём",
        "cancel": "Отменить приём",
        "hint": "Если Вы не сможете прийти, пожалуйста, отмените приём: это время смогут "
        "предложить другому пациенту.",
        "done_confirm": "Спасибо! Ваш приём подтверждён.",
        "done_cancel": "Ваш приём отменён. Спасибо, что предупредили.",
        "unchanged": "Ничего не изменилось: Ваш приём уже был в этом состоянии.",
        "stays_cancelled": "Этот приём отменён и останется отменённым. Чтобы записаться снова, "
        "свяжитесь с клиникой.",
        "not_found": "Ссылка не найдена|Эта ссылка недействительна. Проверьте ссылку в SMS или "
        "свяжитесь с клиникой.",
        "expired": "Срок действия ссылки истёк|Приём уже начался или прошёл. Пожалуйста, "
        "свяжитесь с клиникой.",
        "too_many": "Слишком много запросов|Пожалуйста, подождите минуту и попробуйте снова.",
        "bad_request": "Запрос не распознан|Пожалуйста, воспользуйтесь кнопками на странице "
        "приёма.",
    },
    "zh": {
        "title": "您的预约", "date": "日期", "time": "时间", "practitioner": "医生",
        "place": "地点", "state": "状态", "unconfirmed": "尚未确认", "confirmed": "已确认",
        "cancelled_by_patient": "已应您的要求取消", "cancelled_by_clinic": "已被诊所取消",
        "confirm": "确认预约", "cancel": "取消预约",
        "hint": "如果您无法前来，请取消预约，以便将该时段留给其他患者。",
        "done_confirm": "谢谢！您的预约已确认。",
        "done_cancel": "您的预约已取消，感谢您告知我们。",
        "unchanged": "没有变化：您的预约已处于此状态。",
        "stays_cancelled": "此预约已取消，并将保持取消状态。如需重新预约，请联系诊所。",
        "not_found": "未找到链接|此链接无效。请核对短信中的链接，或联系诊所。",
        "expired": "此链接已过期|预约已开始或已结束。请联系诊所。",
        "too_many": "请求过多|请稍候一分钟再试。",
        "bad_request": "无法识别的请求|请使用预约页面上的按钮。",
    },
}  # fmt: skip
DATE_FORMATS = {"en": "EEEE d MMMM y", "fr": "full", "ru": "full", "zh": "full"}

_PAGE = """<!doctype html>
<html lang="{{ lang }}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{{ title }}</title>
<style>
body{margin:0;background:#f3f4f6;color:#111;font:1.125rem/1.5 system-ui,-apple-system,
"Segoe UI",Roboto,"Noto Sans","PingFang SC","Microsoft YaHei",sans-serif}
main{max-width:34rem;margin:0 auto;padding:1rem}h1{font-size:1.5rem}h2{font-size:1.25rem}
section{background:#fff;border-radius:.75rem;padding:1.25rem;margin:0 0 1rem}
h1,h2,form,dd{margin:0}.clinic{margin:0 0 1rem;font-weight:600;color:#333}dd{font-weight:600}
dl,.notice{margin:0 0 1rem}dt{font-size:.95rem;color:#444;margin-top:.5rem}.hint{font-size:.95rem}
.notice{background:#e7f0fb;padding:.75rem;border-left:.3rem solid #1a56a6}
button{display:block;width:100%;min-height:3rem;margin:.75rem 0 0;padding:.75rem 1rem;font:inherit;
font-weight:700;border-radius:.5rem;border:2px solid #0b5d2a;cursor:pointer}
.confirm{background:#0b5d2a;color:#fff}.cancel{background:#fff;color:#9b1c1c;border-color:#9b1c1c}
button:focus-visible{outline:3px solid #1a56a6;outline-offset:2px}
</style>
</head>
<body>
<main>
{%- if appointment %}{% set a = appointment %}
<section>
<h1>{{ t.title }}</h1>
<p class="clinic">{{ a.clinic }}</p>
{%- if notice %}
<p class="notice" role="status">{{ notice }}</p>
{%- endif %}
<dl>
<dt>{{ t.date }}</dt><dd>{{ a.date }}</dd>
<dt>{{ t.time }}</dt><dd>{{ a.time }}</dd>
{%- if a.practitioner %}
<dt>{{ t.practitioner }}</dt><dd>{{ a.practitioner }}</dd>
{%- endif %}{% if a.location %}
<dt>{{ t.place }}</dt><dd>{{ a.location }}</dd>
{%- endif %}
<dt>{{ t.state }}</dt><dd data-state="{{ a.state }}">{{ t[a.state] }}</dd>
</dl>
{%- if a.state == "unconfirmed" %}
<form method="post"><input type="hidden" name="action" value="confirm">
<button type="submit" class="confirm">{{ t.confirm }}</button></form>
{%- endif %}{% if a.state in ("unconfirmed", "confirmed") %}
<form method="post"><input type="hidden" name="action" value="cancel">
<button type="submit" class="cancel">{{ t.cancel }}</button></form>
<p class="hint">{{ t.hint }}</p>
{%- endif %}
</section>
{%- endif %}
{%- for s in sections %}
<section lang="{{ s.lang }}">
{% if loop.first %}<h1>{{ s.heading }}</h1>{% else %}<h2>{{ s.heading }}</h2>{% endif %}
<p>{{ s.body }}</p>
</section>
{%- endfor %}
</main>
</body>
</html>
"""
_TEMPLATE = Environment(autoescape=True).from_string(_PAGE)


@dataclass(frozen=True)
class View:
    """What the page shows of one appointment."""

    lang: str
    clinic: str
    date: str
    time: str
    practitioner: str
    location: str
    state: str  # unconfirmed, confirmed, cancelled_by_patient or cancelled_by_clinic


def view_of(appointment: Appointment, clinic: Clinic) -> View:
    return _view(
        appointment.patient.language,
        appointment.starts_at,
        clinic.timezone,
        clinic.name,
        appointment.confirmation,
        appointment.status,
        appointment.practitioner,
        appointment.location,
    )


def _view(
    language: str,
    starts_at: dt.datetime,
    timezone: str,
    clinic: str,
    confirmation: str,
    status: str,
    practitioner: str | None,
    location: str | None,
) -> View:
    lang = language if language in TEXTS else "en"
    local = starts_at.astimezone(ZoneInfo(timezone))
    state = confirmation
    if state != "cancelled_by_patient" and status != "booked":
        state = "cancelled_by_clinic"
    locale = _locale(lang)
    return View(
        lang=lang,
        clinic=clinic,
        date=format_date(local, DATE_FORMATS[lang], locale=locale),
        time=format_time(local, "short", tzinfo=local.tzinfo, locale=locale),
        practitioner=practitioner or "",
        location=location or "",
        state=state,
    )


@cache
def _locale(lang: str) -> Locale:
    return Locale.parse(lang)


class RateLimiter:
    """At most about `limit` requests per `window` seconds per client, in THIS PROCESS only
    (each API process counts on its own, so N processes let through up to N times the limit).

    A sliding window approximated from two fixed windows: the previous window's count, weighted
    by how much of it the sliding window still covers, plus the current one's. Two integers per
    client, at most `max_clients` clients; the least recently seen are forgotten first. Refused
    requests are not counted; a client that bursts may wait up to two windows. Thread-safe;
    `now` is a monotonic time in seconds.
    """

    def __init__(self, limit: int = 60, window: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit, self.window, self.max_clients = limit, window, max_clients
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, tuple[int, int, int]] = OrderedDict()

    def reset(self) -> None:
        with self._lock:
            self._clients.clear()

    def hit(self, client: str, now: float) -> int | None:
        """Counts a request; None when allowed, else the seconds to wait (Retry-After)."""
        index = int(now // self.window)
        elapsed = now - index * self.window
        with self._lock:
            seen, current, previous = self._clients.pop(client, (index, 0, 0))
            if seen != index:
                previous, current = (current if seen == index - 1 else 0), 0
            weight = 1 - elapsed / self.window
            allowed = previous * weight + current + 1 <= self.limit
            self._clients[client] = (index, current + allowed, previous)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        return None if allowed else self._wait(current, previous, elapsed)

    def _wait(self, current: int, previous: int, elapsed: float) -> int:
        room = self.limit - 1
        if current <= room:  # the previous window's share must fade out enough
            until = (1 - (room - current) / previous) * self.window
        else:  # only in the next window, as this one's share fades
            until = self.window + (1 - room / current) * self.window
        return max(1, math.ceil(until - elapsed))


limiter = RateLimiter()


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        return None


def client_address(request: Request, trusted: tuple[IpNetwork, ...]) -> str:
    """The peer's address; behind a trusted proxy, the first X-Forwarded-For address from the
    right that is not a trusted proxy (malformed entries are skipped)."""
    peer = request.client.host if request.client is not None else "unknown"
    address = _address(peer)
    if address is None or not any(address in network for network in trusted):
        return peer
    hops = [h for v in request.headers.getlist("x-forwarded-for") for h in v.split(",")]
    for hop in reversed(hops):
        found = _address(hop)
        if found is None:
            continue
        address = found
        if not any(found in network for network in trusted):
            break
    return str(address)


def limit_key(address: str) -> str:
    """IPv6 clients are counted per /64 (one subscriber's usual allocation)."""
    found = _address(address)
    if isinstance(found, ipaddress.IPv6Address) and found.ipv4_mapped is None:
        return str(ipaddress.IPv6Network(f"{found}/64", strict=False))
    return address


def _throttled(request: Request) -> HTMLResponse | None:
    address = client_address(request, get_settings().trusted_proxies)
    wait = limiter.hit(limit_key(address), time.monotonic())
    if wait is None:
        return None
    return error_page("too_many", 429, None, {"Retry-After": str(wait)})


def _respond(
    html: str, status: int, lang: str, extra: dict[str, str] | None = None
) -> HTMLResponse:
    headers = {**HEADERS, "Content-Language": lang, **(extra or {})}
    return HTMLResponse(html, status_code=status, headers=headers)


def error_page(
    kind: str, status: int, lang: str | None, extra: dict[str, str] | None = None
) -> HTMLResponse:
    """In the patient's language and English; in every language when the patient is unknown."""
    langs = list(TEXTS) if lang is None else list(dict.fromkeys([lang, "en"]))
    sections = []
    for code in langs:
        heading, body = TEXTS[code][kind].split("|")
        sections.append({"lang": code, "heading": heading, "body": body})
    html = _TEMPLATE.render(lang=langs[0], title=sections[0]["heading"], sections=sections)
    return _respond(html, status, langs[0], extra)


def appointment_page(view: View, notice: str | None = None) -> HTMLResponse:
    t = TEXTS[view.lang]
    title = f"{t['title']} – {view.clinic}"
    html = _TEMPLATE.render(lang=view.lang, title=title, t=t, appointment=view, notice=notice)
    return _respond(html, 200, view.lang)


def find(session: Session, token: str) -> tuple[Appointment, Clinic] | None:
    """The appointment of a link token, with its clinic: one indexed lookup."""
    if TOKEN.fullmatch(token) is None:
        return None
    row = session.execute(
        select(Appointment, Clinic)
        .join(Clinic, Clinic.id == Appointment.clinic_id)
        .where(Appointment.link_token == token)
    ).first()
    if row is None:
        return None
    appointment, clinic = row
    stored = appointment.link_token or ""
    if not hmac.compare_digest(stored.encode(), token.encode()):
        return None  # e.g. a case-insensitive collation matched
    return appointment, clinic


async def form_action(request: Request) -> str | None:
    """The `action` of a small form-encoded or JSON body; None for anything else."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return None
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    value: object = None
    try:
        if kind == "application/json":
            data = json.loads(body)
            value = data.get("action") if isinstance(data, dict) else None
        else:
            fields = parse_qsl(body.decode("utf-8", "replace"), max_num_fields=16)
            value = next((v for k, v in fields if k == "action"), None)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


@router.api_route("/c/{token}", methods=["GET", "HEAD"])
def show(token: str, request: Request) -> HTMLResponse:
    """Shows the appointment. Never changes anything: one query, outside any transaction."""
    now = dt.datetime.now(dt.UTC)
    refused = _throttled(request)
    if refused is not None:
        return refused
    row = None
    if TOKEN.fullmatch(token) is not None:
        with get_engine().connect() as connection:
            autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
            row = autocommit.execute(_PAGE_QUERY, {"token": token}).first()
    if row is None or not hmac.compare_digest(row.link_token.encode(), token.encode()):
        return error_page("not_found", 404, None)  # (or a case-insensitive collation matched)
    view = _view(
        row.language,
        row.starts_at,
        row.timezone,
        row.name,
        row.confirmation,
        row.status,
        row.practitioner,
        row.location,
    )
    if now >= row.starts_at:
        return error_page("expired", 410, view.lang)
    return appointment_page(view)


# What the page shows, read in one statement built once.
_PAGE_QUERY = (
    select(
        Appointment.link_token,
        Appointment.starts_at,
        Appointment.confirmation,
        Appointment.status,
        Appointment.practitioner,
        Appointment.location,
        Patient.language,
        Clinic.name,
        Clinic.timezone,
    )
    .join(Patient, Patient.id == Appointment.patient_id)
    .join(Clinic, Clinic.id == Appointment.clinic_id)
    .where(Appointment.link_token == bindparam("token"))
)


@router.post("/c/{token}")
def act(
    token: str, request: Request, action: Annotated[str | None, Depends(form_action)]
) -> HTMLResponse:
    """Applies `confirm` or `cancel` once and shows the result."""
    now = dt.datetime.now(dt.UTC)
    refused = _throttled(request)
    if refused is not None:
        return refused
    with session_scope() as session:
        opened = _open(session, token, now)
        if isinstance(opened, HTMLResponse):
            return opened
        appointment, clinic, before = opened
        chosen = ACTIONS.get(action or "")
        if chosen is None:
            return error_page("bad_request", 400, before.lang)
        decision = decide(session, appointment, chosen, "link", now)
        view = view_of(appointment, clinic)
    if decision.answer_id is not None:
        broker.enqueue_sends([decision.answer_id], 1)  # if that fails, the sweep sends it
    return appointment_page(view, _notice(chosen, decision.changed, view))


def _open(
    session: Session, token: str, now: dt.datetime
) -> tuple[Appointment, Clinic, View] | HTMLResponse:
    """The token's appointment, its clinic and its view; or the 404 / 410 page."""
    found = find(session, token)
    if found is None:
        return error_page("not_found", 404, None)
    appointment, clinic = found
    view = view_of(appointment, clinic)
    if now >= appointment.starts_at:
        return error_page("expired", 410, view.lang)
    return appointment, clinic, view


def _notice(action: Action, changed: bool, view: View) -> str:
    t = TEXTS[view.lang]
    if changed:
        return t[f"done_{action}"]
    if action == "confirm" and view.state.startswith("cancelled"):
        return t["stays_cancelled"]
    return t["unchanged"]
