"""The statistics of a study (docs/design.md, "Studies over seeds"): per arm and metric every seed's value,
the mean and the standard deviation; for each arm against the reference arm the mean paired difference
with a percentile bootstrap confidence interval.

Every metric is a ratio of sums over evaluation items, `sum(num) / sum(den)` with one `[num, den]` per
item (`[1, 1]` for a correct RAG answer, `[followed, instructions]` for an IFEval prompt at instruction
level, `[KL sum, positions]` for a drift sequence). The bootstrap resamples the items within each seed,
with the same draw for both arms (the same item and seed are paired across arms), takes each seed's
difference and averages over the seeds: a fixed generator seed, `resamples` draws.
"""
from __future__ import annotations

import numpy as np


def _ratio(num, den):
    """sum(num) / sum(den) along the last axis (a den of 0 gives 0 for a num of 0)."""
    return num.sum(-1) / np.maximum(den.sum(-1), 1e-300)


def metric(items) -> float:
    """sum(num) / sum(den) of `[[num, den], ...]`."""
    a = np.asarray(items, dtype=np.float64).reshape(-1, 2)
    return float(_ratio(a[:, 0], a[:, 1]))


def summary(values: list[float]) -> dict:
    """The seeds' values, their mean and standard deviation (n - 1; 0 for one seed)."""
    v = np.asarray(values, dtype=np.float64)
    return {"values": [float(x) for x in v], "mean": float(v.mean()),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def paired_difference(arm: list, reference: list, resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """arm, reference: per seed, the items `[[num, den], ...]` of one metric, item i of a seed in both the
    same evaluation item. The mean over seeds of (arm - reference), and its bootstrap interval."""
    if len(arm) != len(reference) or not arm:
        raise ValueError(f"paired difference: {len(arm)} seeds against {len(reference)}")
    rng = np.random.default_rng(seed)
    diffs, draws = [], np.zeros(resamples)
    for a, r in zip(arm, reference):
        a, r = np.asarray(a, np.float64).reshape(-1, 2), np.asarray(r, np.float64).reshape(-1, 2)
        if a.shape != r.shape:
            raise ValueError(f"paired difference: {len(a)} items against {len(r)} in one seed")
        diffs.append(metric(a) - metric(r))
        idx = rng.integers(0, len(a), size=(resamples, len(a)))  # the same items for both arms
        draws += _ratio(a[idx, 0], a[idx, 1]) - _ratio(r[idx, 0], r[idx, 1])
    draws /= len(arm)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return {"mean": float(np.mean(diffs)), "ci": [float(low), float(high)], "level": level,
            "resamples": resamples, "excludes_zero": bool(low > 0 or high < 0)}


def recovered_share(arm: list, reference: list, base, resamples: int = 2000, seed: int = 0,
                    level: float = 0.95, higher_is_better: bool = True) -> dict | None:
    """How much of what the reference lost from the base the arm recovers: (arm - reference) / (base -
    reference), the means over seeds, with a percentile bootstrap interval that resamples the items within
    each seed with one draw for all three (the base is one model, scored on the same items). None when the
    reference did not lose (it is at or beyond the base in the metric's better direction): nothing to recover."""
    rng = np.random.default_rng(seed)
    b = np.asarray(base, np.float64).reshape(-1, 2)
    gained = lost = 0.0
    draw_gained, draw_lost = np.zeros(resamples), np.zeros(resamples)
    for a, r in zip(arm, reference):
        a, r = np.asarray(a, np.float64).reshape(-1, 2), np.asarray(r, np.float64).reshape(-1, 2)
        gained += metric(a) - metric(r)
        lost += metric(b) - metric(r)
        idx = rng.integers(0, len(a), size=(resamples, len(a)))
        ra = _ratio(r[idx, 0], r[idx, 1])
        draw_gained += _ratio(a[idx, 0], a[idx, 1]) - ra
        draw_lost += _ratio(b[idx, 0], b[idx, 1]) - ra
    if (lost if higher_is_better else -lost) <= 0:
        return None
    shares = draw_gained / np.where(draw_lost == 0, np.nan, draw_lost)
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(shares, [tail, 100 - tail])
    return {"share": gained / lost, "ci": [float(low), float(high)], "level": level, "lost": lost / len(arm)}


def items_needed(diff: dict, power_z: float = 2.8) -> float | None:
    """A power calculation from the observed spread: by how many times the evaluated items (prompts x seeds)
    would have to grow for the observed difference to be about power_z standard errors from 0 (2.8: a
    two-sided 5 % test with 80 % power), assuming the bootstrap's standard error (the interval's width / 3.92)
    falls with the square root of the items. None for a difference of 0."""
    if diff["mean"] == 0:
        return None
    se = (diff["ci"][1] - diff["ci"][0]) / (2 * 1.959964)
    return float((power_z * se / abs(diff["mean"])) ** 2)
