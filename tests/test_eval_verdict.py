"""Room bootstrap intervals and verdict words, on planted per-room values with known intervals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fit3d.eval.report import summarize
from fit3d.eval.verdict import MIN_ROOMS, bootstrap_interval, compare, verdicts


def _exact_quantiles(d: list[float], level: float = 0.95) -> tuple[float, float]:
    """Quantiles of the exact bootstrap distribution of the mean: all n^n ordered resamples."""
    means = sorted(np.mean(c) for c in itertools.product(d, repeat=len(d)))
    tail = (1 - level) / 2
    n = len(means)
    return means[math.floor(tail * n)], means[math.ceil((1 - tail) * n) - 1]


def test_interval_of_a_constant_difference_is_that_constant():
    assert bootstrap_interval([0.25] * 7) == pytest.approx((0.25, 0.25))


def test_interval_matches_the_enumerated_bootstrap_distribution():
    # 3 rooms: 27 equally likely resamples; P(mean = 0) = P(mean = 2) = 1/27 > 2.5%, so the
    # exact 95% interval is [0, 2]; for 5 rooms the enumeration gives an interior interval
    assert _exact_quantiles([0.0, 1.0, 2.0]) == (0.0, 2.0)
    assert bootstrap_interval([0.0, 1.0, 2.0]) == pytest.approx((0.0, 2.0))
    d = [0.0, 1.0, 3.0, 4.0, 10.0]
    lo, hi = bootstrap_interval(d, resamples=200_000)
    ex_lo, ex_hi = _exact_quantiles(d)
    step = 1 / len(d)  # the mean of a resample moves in steps of (value gap) / n
    assert abs(lo - ex_lo) <= step and abs(hi - ex_hi) <= step
    assert 0 < lo < np.mean(d) < hi < 10


def test_interval_width_follows_the_standard_error_for_many_rooms():
    rng = np.random.default_rng(3)
    d = rng.normal(0.5, 2.0, size=400)
    lo, hi = bootstrap_interval(d)
    se = d.std() / math.sqrt(len(d))  # the bootstrap's own standard error (ddof 0)
    assert (lo + hi) / 2 == pytest.approx(d.mean(), abs=0.1 * se)
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.05)


def _stats(per_room: dict[str, list[float]], key: str) -> dict:
    """One feature set's summaries: per-room values over seeds as `<key>@<room>`."""
    return {f"{key}@{r}": summarize(v) for r, v in per_room.items()}


def test_verdict_words_follow_the_interval_and_the_direction():
    key = "eval/depth/rmse"  # lower is better
    rooms = [f"room{i}" for i in range(6)]
    base = {r: [0.50, 0.52] for r in rooms}  # seed-averaged 0.51 in every room
    better = {r: [0.40 + 0.01 * i, 0.42 + 0.01 * i] for i, r in enumerate(rooms)}
    mixed = {r: [0.51 + (0.05 if i % 2 else -0.05)] * 2 for i, r in enumerate(rooms)}
    m = {"original": _stats(base, key), "a": _stats(better, key), "b": _stats(mixed, key)}
    v = compare(m, "a", "original", key, higher=False)
    assert v.rooms == 6 and v.diff == pytest.approx(np.mean([-0.1 + 0.01 * i for i in range(6)]))
    assert v.hi < 0 and v.word == "better"  # lower RMSE in every room
    assert compare(m, "original", "a", key, higher=False).word == "worse"
    mixed_v = compare(m, "b", "original", key, higher=False)
    assert mixed_v.lo < 0 < mixed_v.hi and mixed_v.word == "no clear difference"


def test_rooms_missing_a_score_are_left_out_and_too_few_rooms_decide_nothing():
    key = "eval/corr/recall_10px_rot60-180"
    a = _stats({"r0": [0.5], "r1": [0.6], "r2": [math.nan]}, key)
    b = _stats({"r0": [0.4], "r1": [0.3], "r3": [0.1]}, key)
    v = compare({"x": a, "y": b}, "x", "y", key, higher=True)
    assert v.rooms == 2 and v.diff == pytest.approx(0.2)
    assert v.lo > 0 and v.word == "too few rooms"  # +0.1, +0.3: an interval, but of 3 means
    one = compare({"x": _stats({"r0": [0.9]}, key), "y": b}, "x", "y", key, higher=True)
    assert one.rooms == 1 and one.word == "too few rooms"
    # MIN_ROOMS rooms that all agree do get a word
    many = {f"r{i}": [0.5 + 0.01 * i] for i in range(MIN_ROOMS)}
    low = {f"r{i}": [0.4] for i in range(MIN_ROOMS)}
    v = compare({"x": _stats(many, key), "y": _stats(low, key)}, "x", "y", key, higher=True)
    assert v.rooms == MIN_ROOMS and v.word == "better"
    assert compare({"x": a, "y": {}}, "x", "y", key, higher=True) is None


def test_verdicts_cover_each_comparison_present():
    key = "eval/seg/miou"
    rooms = {f"r{i}": [0.3 + 0.01 * i] for i in range(5)}
    up = {r: [v[0] + 0.05] for r, v in rooms.items()}
    metrics = {
        "original": _stats(rooms, key),
        "fine-tuned": _stats(up, key),
        "assembled": _stats(up, key),
    }
    got = verdicts(metrics)
    assert [(v.a, v.b) for v in got] == [("fine-tuned", "original"), ("assembled", "original")]
    assert all(v.word == "better" and v.diff == pytest.approx(0.05) for v in got)
