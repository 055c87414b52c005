"""Verdicts over test rooms: paired bootstrap intervals of the differences between feature sets.

docs/method.md, "Verdicts over rooms". Rooms (test groups), not probe seeds, are what a conclusion
generalises over, so every comparison is made room by room:
- each feature set's score in a room is the probe's metric over that room's test views (the
  `<key>@<room>` entries of the results), averaged over probe seeds;
- the difference A - B is taken per room (paired: both sets see the same views and pairs), and
  its mean over rooms is the reported difference;
- its 95% interval is the percentile bootstrap of that mean, resampling rooms with replacement
  (`BOOTSTRAP` resamples, a fixed seed, so a report is reproducible);
- the words follow the interval: "better" / "worse" only when it excludes zero (in the metric's
  good / bad direction), "no clear difference" otherwise; with fewer than `MIN_ROOMS` rooms
  (e.g. a rotation bin few test rooms have pairs in) the bootstrap has too few distinct resamples
  to mean anything (2 rooms: 3 distinct means), so the word is "too few rooms".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fit3d.eval.report import METRICS

BOOTSTRAP = 10000
"""Bootstrap resamples of the rooms per interval."""
LEVEL = 0.95
"""Coverage of the intervals."""
MIN_ROOMS = 5
"""Fewest rooms a comparison needs for a verdict word other than "too few rooms"."""
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("fine-tuned", "original"),
    ("assembled", "original"),
    ("assembled", "control"),
)
"""(A, B) pairs of feature sets whose difference A - B gets a verdict."""
VERDICT_KEYS: tuple[str, ...] = (
    "eval/seg/miou",
    "eval/depth/rmse",
    "eval/depth_dpt/rmse",
    "eval/normals/within_30",
    "eval/normals_dpt/within_30",
    "eval/corr/recall_10px",
    "eval/corr/recall_10px_rot0-15",
    "eval/corr/recall_10px_rot15-30",
    "eval/corr/recall_10px_rot30-60",
    "eval/corr/recall_10px_rot60-180",
    "eval/corr/recall_2cm",
)
"""Metrics compared room by room (each probe keeps these per test room, `<key>@<room>`)."""


def bootstrap_interval(
    diffs: Sequence[float], resamples: int = BOOTSTRAP, level: float = LEVEL, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval (lo, hi) of the mean of `diffs` [n rooms], resampling the
    rooms with replacement. One room gives (d, d): no spread can be estimated from it."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)  # [resamples]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Verdict:
    """One comparison A - B on one metric, over the test rooms."""

    a: str
    b: str
    key: str
    diff: float
    """Mean over rooms of the per-room difference A - B (metric units, not display units)."""
    lo: float
    hi: float
    rooms: int
    higher_is_better: bool

    @property
    def word(self) -> str:
        """`better`, `worse` (A than B; the interval excludes zero), `no clear difference`, or
        `too few rooms` (fewer than `MIN_ROOMS`)."""
        if self.rooms < MIN_ROOMS:
            return "too few rooms"
        if math.isnan(self.lo) or self.lo <= 0 <= self.hi:
            return "no clear difference"
        up = self.lo > 0
        return "better" if up == self.higher_is_better else "worse"

    def to_dict(self) -> dict:
        return asdict(self) | {"word": self.word}


def room_scores(stats: dict, key: str) -> dict[str, float]:
    """Room -> seed-averaged score of metric `key` from one feature set's summaries
    ({`<key>@<room>`: {"mean", ...}}); rooms without a finite value are left out."""
    out = {}
    for k, stat in stats.items():
        if k.startswith(key + "@") and stat and stat.get("mean") is not None:
            mean = float(stat["mean"])
            if math.isfinite(mean):
                out[k[len(key) + 1 :]] = mean
    return out


def compare(metrics: dict, a: str, b: str, key: str, higher: bool) -> Verdict | None:
    """Verdict for A - B on `key` over the rooms both sets have a score in; None without any."""
    sa, sb = room_scores(metrics.get(a, {}), key), room_scores(metrics.get(b, {}), key)
    rooms = [r for r in sa if r in sb]
    if not rooms:
        return None
    diffs = [sa[r] - sb[r] for r in rooms]
    lo, hi = bootstrap_interval(diffs)
    return Verdict(a, b, key, float(np.mean(diffs)), lo, hi, len(rooms), higher)


def verdicts(metrics: dict) -> list[Verdict]:
    """Every comparison of `COMPARISONS` x `VERDICT_KEYS` the results allow, in that order
    (whether higher is better: `fit3d.eval.report.METRICS`)."""
    out = []
    for a, b in COMPARISONS:
        for key in VERDICT_KEYS:
            v = compare(metrics, a, b, key, METRICS[key][1])
            if v is not None:
                out.append(v)
    return out
