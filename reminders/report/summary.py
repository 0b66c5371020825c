"""The report in plain sentences a clinic manager can act on."""

from __future__ import annotations

from typing import Any


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%".replace(".0%", "%")


def summary(report: dict[str, Any]) -> list[str]:
    """What a clinic manager can act on, in plain sentences."""
    lines = []
    week_rate = report["no_show_rate"]
    if week_rate["n"] == 0:
        lines.append(
            f"Not enough data for {report['week']}: no appointment that week has an outcome "
            "recorded yet (send them with POST /v1/appointments/{id}/outcome or the CSV "
            "`outcome` column)."
        )
    else:
        lines.append(
            f"In {report['week']}, {report['no_show']} of {week_rate['n']} appointments with an "
            f"outcome were no-shows ({_pct(week_rate['value'])})."
        )
    base = report["baseline"]
    if base is None:
        lines.append(
            "No go-live date is set, so there is no before/after comparison: set it with "
            "`reminders clinic set ID --go-live YYYY-MM-DD`."
        )
    elif base["no_show_rate"]["n"]:
        lines.append(
            f"In the 12 weeks before reminders started ({base['from']} to {base['to']}), the "
            f"no-show rate was {_pct(base['no_show_rate']['value'])}."
        )
    else:
        lines.append("There are no outcomes from the 12 weeks before go-live to compare with.")
    lines.extend(_effect_sentences(report))
    freed = report["slots_freed"]
    if freed["count"]:
        lines.append(
            f"Patients cancelled {freed['count']} appointments themselves, on average "
            f"{freed['mean_hours_ahead']:.0f} hours ahead: slots you could offer again."
        )
    sms = report["sms"]
    if sms["sent"]:
        lines.append(
            f"{sms['sent']} SMS were sent ({sms['segments']} segments, cost {sms['cost']:.2f}); "
            f"{sms['delivered']} were confirmed delivered and {sms['failed']} failed."
        )
    return lines


def _effect_sentences(report: dict[str, Any]) -> list[str]:
    effect_ = report["effect"]
    if report["go_live"] is None:
        return []
    if report["holdout_share"] <= 0 and report["holdout"]["with_outcome"] == 0:
        return [
            "No patients are held out, so the effect of reminders cannot be measured apart from "
            "seasons and other changes: a holdout of 0.05 to 0.1 (`--holdout`) makes it measurable."
        ]
    if effect_["difference"] is None:
        return [
            "Not enough data yet to measure the effect of reminders: "
            + effect_.get("note", "").removeprefix("not enough data: ")
            + "."
        ]
    reminded, holdout = report["reminded"]["no_show_rate"], report["holdout"]["no_show_rate"]
    lines = [
        f"Since go-live, reminded patients missed {_pct(reminded['value'])} of their appointments "
        f"and patients held out at random missed {_pct(holdout['value'])}."
    ]
    relative, interval = effect_["relative"], effect_["relative_ci95"]
    if effect_["significant"] and effect_["difference"] < 0:
        text = "Reminders cut no-shows"
        if relative is not None and interval is not None:
            text += (
                f" by {_pct(relative)} (95% interval {_pct(interval[0])} to {_pct(interval[1])})"
            )
        lines.append(text + ": a real effect, not chance.")
    elif effect_["significant"]:
        lines.append(
            "Reminded patients missed more appointments than those held out, beyond chance: "
            "check the texts and timing."
        )
    else:
        lines.append(
            "The difference between the two groups is within what chance alone could give; "
            "more weeks of data will tell."
        )
    return lines
