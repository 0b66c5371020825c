"""The weekly report as a self-contained HTML page (inline SVG charts), JSON or CSV.

Charts are drawn here as SVG strings from the report's JSON, so the page needs no script, no font
and no network: it can be mailed, archived or printed as it is.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

FORMATS = ("html", "json", "csv")
OVERALL, REMINDED, HOLDOUT = "#6b7280", "#2563eb", "#ea580c"


def render(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return to_csv(report)
    if fmt == "html":
        return to_html(report)
    raise ValueError(f"format: one of {', '.join(FORMATS)}")


# --- CSV: one row per figure ----------------------------------------------------------------------


def _is_rate(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"value", "ci95", "n"}


def _rows(section: str, key: str, value: Any) -> Iterator[tuple[str, str, Any, Any, Any]]:
    if _is_rate(value):
        low, high = value["ci95"] or (None, None)
        yield section, key, value["value"], low, high
        yield section, f"{key}.n" if key else "n", value["n"], None, None
    elif isinstance(value, dict):
        if "difference" in value:  # the effect: its two intervals
            low, high = value["ci95"] or (None, None)
            yield section, "difference", value["difference"], low, high
            low, high = value["relative_ci95"] or (None, None)
            yield section, "relative", value["relative"], low, high
            yield section, "significant", value["significant"], None, None
            return
        for name, item in value.items():
            yield from _rows(section, f"{key}.{name}" if key else name, item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            name = item.get("key") or item.get("week") if isinstance(item, dict) else None
            yield from _rows(section, f"{key}.{name or index}" if key else str(name or index), item)
    elif value is None or isinstance(value, (int, float, str, bool)):
        yield section, key, value, None, None


def to_csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("section", "key", "value", "low", "high"))
    for section, value in report.items():
        if isinstance(value, (dict, list)):
            writer.writerows(_rows(section, "", value))
        else:
            writer.writerow((section, "", value, None, None))
    return out.getvalue()


# --- SVG charts -----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _ceiling(values: list[float]) -> float:
    """The top of the y axis: the largest value, rounded up to 5 points."""
    top = max(values, default=0.0)
    steps = int(top * 20) + 1
    return max(0.05, steps / 20)


def series_chart(report: dict[str, Any]) -> Markup:
    """Weekly no-show rate: all patients (grey), reminded (blue) and held out (orange), with the
    go-live week marked."""
    weeks = report["series"]
    width, height, left, right, top, bottom = 760, 280, 48, 12, 16, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [
        w[arm]["value"]
        for w in weeks
        for arm in ("no_show_rate", "reminded", "holdout")
        if w.get(arm) and w[arm]["value"] is not None
    ]
    y_max = _ceiling(values)
    step = plot_w / max(1, len(weeks) - 1)

    def x(i: int) -> float:
        return left + i * step if len(weeks) > 1 else left + plot_w / 2

    def y(v: float) -> float:
        return top + plot_h * (1 - v / y_max)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Weekly no-show rate" class="chart">'
    ]
    ticks = 5
    for t in range(ticks + 1):
        v = y_max * t / ticks
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
            f'stroke="#e5e7eb"/><text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" '
            f'class="tick">{v * 100:.0f}%</text>'
        )
    every = max(1, len(weeks) // 10)
    for i, week in enumerate(weeks):
        last = i == len(weeks) - 1 and i % every >= every / 2
        if i % every == 0 or last:
            parts.append(
                f'<text x="{x(i):.1f}" y="{height - bottom + 16}" text-anchor="middle" '
                f'class="tick">{escape(week["week"][2:])}</text>'
            )
    live = [i for i, w in enumerate(weeks) if w["live"]]
    if live:
        gx = x(live[0]) - (step / 2 if live[0] > 0 else 0)
        parts.append(
            f'<line x1="{gx:.1f}" x2="{gx:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#111827" '
            f'stroke-dasharray="4 4"/><text x="{gx + 4:.1f}" y="{top + 12}" class="label">'
            "reminders start</text>"
        )
    for arm, colour in (("no_show_rate", OVERALL), ("holdout", HOLDOUT), ("reminded", REMINDED)):
        segment: list[str] = []
        segments = []
        for i, week in enumerate(weeks):
            figure = week.get(arm)
            if figure and figure["value"] is not None:
                segment.append(f"{x(i):.1f},{y(figure['value']):.1f}")
            elif segment:
                segments.append(segment)
                segment = []
        if segment:
            segments.append(segment)
        for points in segments:
            dash = ' stroke-dasharray="2 3"' if arm == "no_show_rate" and live else ""
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} '
                f'points="{" ".join(points)}"/>'
            )
            if len(points) == 1:
                cx, cy = points[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>')
    legend = (("all patients", OVERALL), ("reminded", REMINDED), ("held out", HOLDOUT))
    for n, (name, colour) in enumerate(legend):
        lx = left + n * 130
        parts.append(
            f'<rect x="{lx}" y="{height - 14}" width="12" height="4" fill="{colour}"/>'
            f'<text x="{lx + 16}" y="{height - 8}" class="tick">{name}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every value in it is a number or escaped)


def bar_chart(groups: list[dict[str, Any]], arms: bool) -> Markup:
    """Horizontal bars per group (reminded and held out, or all patients), 95% whiskers."""
    shown = [g for g in groups if g["appointments"]]
    bars = (("reminded", REMINDED), ("holdout", HOLDOUT)) if arms else (("no_show_rate", OVERALL),)
    row_h, label_w, width = 14, 150, 760
    height = max(1, len(shown)) * (row_h * len(bars) + 10) + 10
    values = [g[arm]["ci95"][1] for g in shown for arm, _ in bars if g[arm]["ci95"] is not None]
    x_max = _ceiling(values)
    plot_w = width - label_w - 90

    def x(v: float) -> float:
        return label_w + plot_w * v / x_max

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
        'class="chart bars">'
    ]
    yy = 8
    for group in shown:
        parts.append(
            f'<text x="{label_w - 8}" y="{yy + row_h * len(bars) / 2 + 4:.1f}" '
            f'text-anchor="end" class="label">{escape(group["key"])}</text>'
        )
        for arm, colour in bars:
            figure = group[arm]
            if figure["value"] is not None:
                parts.append(
                    f'<rect x="{label_w}" y="{yy + 1}" width="{x(figure["value"]) - label_w:.1f}" '
                    f'height="{row_h - 3}" fill="{colour}" opacity="0.85"/>'
                )
                low, high = figure["ci95"]
                mid = yy + row_h / 2
                parts.append(
                    f'<line x1="{x(low):.1f}" x2="{x(high):.1f}" y1="{mid:.1f}" y2="{mid:.1f}" '
                    'stroke="#111827"/>'
                )
                text = f"{_pct(figure['value'])} of {figure['n']}"
            else:
                text = "no outcomes"
            parts.append(
                f'<text x="{x(x_max) + 6:.1f}" y="{yy + row_h - 3}" class="tick">{text}</text>'
            )
            yy += row_h
        yy += 10
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every value in it is a number or escaped)


# --- HTML -----------------------------------------------------------------------------------------

_env = Environment(
    loader=PackageLoader("reminders", "templates"),
    autoescape=select_autoescape(("html", "j2")),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["pct"] = _pct


def to_html(report: dict[str, Any]) -> str:
    arms = report["holdout"]["with_outcome"] > 0 and report["reminded"]["with_outcome"] > 0
    charts = {
        name: bar_chart(report[name], arms)
        for name in ("by_kind", "by_weekday", "by_lead_time", "by_reply")
    }
    return _env.get_template("report.html.j2").render(
        r=report, series=series_chart(report), charts=charts, arms=arms
    )
