"""Interval estimates and tests on benchmark numbers (docs/statistics.md), free of records and tables.

A statistic is computed per *unit* (a seed: one run, a pair of runs, or one run per noise ratio) and averaged over
units. Without per-query ranks its 95 % interval and p-value come from Student's t over the units; with ranks for
every run, from a two-level percentile bootstrap over units and test queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.integrate import trapezoid

LEVEL = 0.95
ALPHA = 1 - LEVEL
REPLICATES = 2000
SEED = 0
_CHUNK = 4_000_000  # gathered ranks held at once while resampling queries


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` units with its 95 % interval and the two-sided p-value of a zero mean (meaningful for
    differences). ``how``: "t", "welch", "bootstrap", or "" where n < 2 leaves no interval."""

    value: float
    lo: float = math.nan
    hi: float = math.nan
    n: int = 0
    p: float = math.nan
    how: str = ""


def metric_from_ranks(metric: str, i2t: np.ndarray, t2i: np.ndarray) -> np.ndarray:
    """``metric`` from 1-based ranks along the last axis: R@K in percent, rsum (their sum), MedR (floor of the median)."""
    if metric == "rsum":
        return sum(metric_from_ranks(f"{d}_r{k}", i2t, t2i) for d in ("i2t", "t2i") for k in (1, 5, 10))
    direction, _, what = metric.partition("_")
    ranks = {"i2t": i2t, "t2i": t2i}.get(direction)
    if ranks is None or not (what == "medr" or (what[:1] == "r" and what[1:].isdigit())):
        raise ValueError(f"metric {metric!r} cannot be computed from ranks")
    if what == "medr":
        return np.floor(np.median(ranks, axis=-1))
    return 100.0 * (ranks <= int(what[1:])).mean(axis=-1)


def resampled_metrics(ranks: list[tuple[np.ndarray, np.ndarray]], metric: str, replicates: int = REPLICATES,
                      seed: int = SEED) -> np.ndarray:
    """(runs, replicates): each run's ``metric`` on the same bootstrap resamples of the test queries. Image queries
    (i2t) and caption queries (t2i) are drawn independently, with replacement; every run sees the same draws."""
    sizes = {(len(i2t), len(t2i)) for i2t, t2i in ranks}
    if len(sizes) != 1:
        raise ValueError(f"runs rank different test sets (query counts {sorted(sizes)})")
    n_i2t, n_t2i = sizes.pop()
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK // (n_i2t + n_t2i))
    out = np.empty((len(ranks), replicates))
    for start in range(0, replicates, step):
        stop = min(start + step, replicates)
        images = rng.integers(0, n_i2t, (stop - start, n_i2t))
        captions = rng.integers(0, n_t2i, (stop - start, n_t2i))
        for row, (i2t, t2i) in enumerate(ranks):
            out[row, start:stop] = metric_from_ranks(metric, i2t[images], t2i[captions])
    return out


def estimate(units: np.ndarray, replicates: np.ndarray | None = None, seed: int = SEED) -> Estimate:
    """The mean of per-unit values with a 95 % interval and the p-value of a zero mean.

    Without ``replicates``: Student's t over the units (for differences of pairs: the paired t-test). With
    ``replicates`` (units x B, each unit's value on B shared query resamples): replicate b draws units with
    replacement and averages their values on query resample b; percentile interval; p = twice the smaller tail
    share of replicates at or beyond 0, with add-one smoothing.
    """
    units = np.asarray(units, dtype=float)
    n = len(units)
    value = float(units.mean()) if n else math.nan
    if n < 2:
        return Estimate(value, n=n)
    if replicates is None:
        if np.ptp(units) == 0:  # no spread: t is undefined; a constant difference is all there is
            return Estimate(value, value, value, n, 1.0 if value == 0 else 0.0, "t")
        result = sps.ttest_1samp(units, 0.0)
        ci = result.confidence_interval(LEVEL)
        return Estimate(value, float(ci.low), float(ci.high), n, float(result.pvalue), "t")
    b = replicates.shape[1]
    draw = np.random.default_rng(seed).integers(0, n, (b, n))
    boot = replicates[draw, np.arange(b)[:, None]].mean(axis=1)
    lo, hi = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2])
    p = min(1.0, 2 * (1 + min(int((boot <= 0).sum()), int((boot >= 0).sum()))) / (b + 1))
    return Estimate(value, float(lo), float(hi), n, p, "bootstrap")


def welch(a: np.ndarray, b: np.ndarray) -> Estimate:
    """mean(a) - mean(b) for runs that cannot be paired: Welch's unequal-variance t-test and interval (statsmodels)."""
    from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    value, n = float(a.mean() - b.mean()), min(len(a), len(b))
    if n < 2:
        return Estimate(value, n=n)
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return Estimate(value, value, value, n, 1.0 if value == 0 else 0.0, "welch")
    means = CompareMeans(DescrStatsW(a), DescrStatsW(b))
    lo, hi = means.tconfint_diff(alpha=ALPHA, usevar="unequal")
    return Estimate(value, float(lo), float(hi), n, float(means.ttest_ind(usevar="unequal")[1]), "welch")


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values (statsmodels); a nan (untested) stays nan and is not counted in the family."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, math.nan)
    tested = ~np.isnan(p)
    if tested.any():
        out[tested] = multipletests(p[tested], alpha=ALPHA, method="holm")[1]
    return out.tolist()


def stability_area(ratios: list[float], values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Area under the noise-stability curve divided by the span of the ratios (trapezoid rule): the curve's mean
    height, in the metric's units."""
    r = np.asarray(ratios, dtype=float)
    return trapezoid(values, r, axis=axis) / (r[-1] - r[0])


@dataclass(frozen=True)
class RankTest:
    """Average ranks (1 = best) over blocks, Friedman's p-value, Nemenyi's pairwise p-values and the critical
    difference of average ranks at ALPHA."""

    ranks: pd.Series
    friedman_p: float
    nemenyi: pd.DataFrame
    cd: float
    blocks: int


def rank_test(blocks: pd.DataFrame, higher_is_better: bool = True) -> RankTest:
    """Friedman test (scipy) and Nemenyi post-hoc (scikit-posthocs) on blocks (rows) x methods (columns), as in
    Demšar (2006); ties share their average rank."""
    import scikit_posthocs as sp

    k, n = blocks.shape[1], blocks.shape[0]
    ranks = blocks.rank(axis=1, ascending=not higher_is_better).mean().sort_values()
    friedman = sps.friedmanchisquare(*(blocks[c].to_numpy() for c in blocks.columns))
    nemenyi = sp.posthoc_nemenyi_friedman(blocks)
    nemenyi.index = nemenyi.columns = list(blocks.columns)
    cd = sps.studentized_range.ppf(LEVEL, k, np.inf) / math.sqrt(2) * math.sqrt(k * (k + 1) / (6 * n))
    return RankTest(ranks, float(friedman.pvalue), nemenyi, float(cd), n)
