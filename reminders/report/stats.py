"""Rates with Wilson intervals, and the effect of reminders with cluster-robust intervals.

The variance of each arm's ratio estimator sum(no_show)/sum(n) comes from per-patient sums (the
patients are the clusters: one who misses often counts once, not once per appointment); the
difference takes the delta method, the relative reduction the log scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

Z95 = NormalDist().inv_cdf(0.975)
MIN_ARM = 20  # appointments with an outcome per arm before an effect is worth stating


def rate(events: int, n: int) -> dict[str, Any]:
    """`{"value", "ci95", "n"}` with a Wilson interval; value and interval None when n is 0."""
    if n <= 0:
        return {"value": None, "ci95": None, "n": 0}
    p = events / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return {
        "value": round(p, 4),
        "ci95": [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)],
        "n": n,
    }


@dataclass(frozen=True)
class Arm:
    """Per-patient sums of one arm: patients, appointments with an outcome, no-shows, and the
    sums of squares the cluster-robust variance needs."""

    patients: int = 0
    n: int = 0
    y: int = 0
    yy: float = 0.0
    ny: float = 0.0
    nn: float = 0.0

    @property
    def ratio(self) -> float:
        return self.y / self.n if self.n else math.nan

    def variance(self) -> float:
        """Cluster-robust variance of the ratio sum(y)/sum(n), with the G/(G-1) correction."""
        if self.patients < 2 or self.n == 0:
            return math.nan
        r = self.ratio
        spread = self.yy - 2 * r * self.ny + r * r * self.nn
        return self.patients / (self.patients - 1) * max(spread, 0.0) / (self.n * self.n)


def effect(reminded: Arm, holdout: Arm) -> dict[str, Any]:
    """Reminded minus holdout no-show rate, and the relative reduction, with 95% intervals."""
    out: dict[str, Any] = {
        "difference": None,
        "ci95": None,
        "relative": None,
        "relative_ci95": None,
        "significant": False,
    }
    if min(reminded.n, holdout.n) < MIN_ARM or min(reminded.patients, holdout.patients) < 2:
        out["note"] = (
            f"not enough data: each arm needs {MIN_ARM} appointments with an outcome "
            f"(reminded {reminded.n}, holdout {holdout.n})"
        )
        return out
    r1, r0 = reminded.ratio, holdout.ratio
    v1, v0 = reminded.variance(), holdout.variance()
    difference = r1 - r0
    half = Z95 * math.sqrt(v1 + v0)
    out["difference"] = round(difference, 4)
    out["ci95"] = [round(difference - half, 4), round(difference + half, 4)]
    out["significant"] = bool(difference + half < 0 or difference - half > 0)
    if r0 > 0 and r1 > 0:
        log_ratio = math.log(r1 / r0)
        spread = Z95 * math.sqrt(v1 / (r1 * r1) + v0 / (r0 * r0))
        out["relative"] = round(1 - r1 / r0, 4)
        out["relative_ci95"] = [
            round(1 - math.exp(log_ratio + spread), 4),
            round(1 - math.exp(log_ratio - spread), 4),
        ]
    elif r0 > 0:
        out["relative"] = 1.0
        out["note"] = "no no-show at all in the reminded arm: the relative interval is undefined"
    else:
        out["note"] = "no no-show at all in the holdout: the relative effect is undefined"
    return out
