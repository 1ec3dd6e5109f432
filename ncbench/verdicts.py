"""Statistical verdicts on one table's runs (docs/statistics.md): cell intervals, paired differences, the tied-best
group of a column and robustness scores, from seed-level values and, where recorded, per-query test ranks."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

from ncbench import stats
from ncbench.stats import Estimate

Key = tuple[bool, str]  # (uses clean data, method label)


class Evidence:
    """The runs of one table (columns clean_track, label, noise, seed, digest, value, ranks) and, for runs with
    ranks, their metric on shared bootstrap resamples of the test queries."""

    def __init__(self, runs: pd.DataFrame, metric: str, higher_is_better: bool) -> None:
        self.runs = runs.reset_index(drop=True)
        self.higher_is_better = higher_is_better
        ranked = [i for i, r in enumerate(self.runs.ranks) if r is not None]
        resampled = stats.resampled_metrics([self.runs.ranks[i] for i in ranked], metric) if ranked else []
        self._boot = dict(zip(ranked, resampled))

    def _rows(self, key: Key, noise: float) -> dict[int, int]:
        """Seed -> row of the runs of ``key`` at ``noise``."""
        runs = self.runs
        chosen = runs[(runs.clean_track == key[0]) & (runs.label == key[1]) & (runs.noise == noise)]
        return dict(zip(chosen.seed, chosen.index))

    def _estimate(self, units: list[list[int]], statistic: Callable[[np.ndarray], np.ndarray]) -> Estimate:
        """``statistic`` maps the values of each unit's runs (axis 1) to the unit's value; bootstrap where every run
        has ranks, Student's t otherwise."""
        if not units:
            return Estimate(math.nan)
        rows = np.array(units)
        values = statistic(self.runs.value.to_numpy()[rows])
        if not all(i in self._boot for unit in units for i in unit):
            return stats.estimate(values)
        boot = np.stack([[self._boot[i] for i in unit] for unit in units])  # units x runs x replicates
        return stats.estimate(values, statistic(boot))

    def cell(self, key: Key, noise: float) -> Estimate:
        """The mean over seeds with its interval."""
        return self._estimate([[row] for _, row in sorted(self._rows(key, noise).items())], lambda v: v[:, 0])

    def compared_runs(self, a: Key, b: Key, noise: float) -> tuple[list[int], list[int], bool]:
        """The rows of a and of b that a comparison uses, and whether they are paired: by seed (the seeds both have)
        when each such pair shares its noise artefact (digest); otherwise all runs, unpaired."""
        rows_a, rows_b = self._rows(a, noise), self._rows(b, noise)
        seeds = sorted(rows_a.keys() & rows_b.keys())
        digest = self.runs.digest
        if seeds and all(digest[rows_a[s]] == digest[rows_b[s]] for s in seeds):
            return [rows_a[s] for s in seeds], [rows_b[s] for s in seeds], True
        return sorted(rows_a.values()), sorted(rows_b.values()), False

    def difference(self, a: Key, b: Key, noise: float) -> Estimate:
        """a - b over ``compared_runs``: paired (t-test or bootstrap) or unpaired (Welch, seed level)."""
        rows_a, rows_b, paired = self.compared_runs(a, b, noise)
        if paired:
            return self._estimate([list(pair) for pair in zip(rows_a, rows_b)], lambda v: v[:, 0] - v[:, 1])
        return stats.welch(self.runs.value[rows_a].to_numpy(), self.runs.value[rows_b].to_numpy())

    def best_group(self, keys: list[Key], noise: float) -> set[Key]:
        """The column's best mean and every method not significantly worse than it: two-sided paired tests against
        the best, Holm-corrected over the column; a method that cannot be tested (fewer than two seeds) stays in."""
        means = {k: self.cell(k, noise).value for k in keys}
        means = {k: m for k, m in means.items() if not math.isnan(m)}
        if not means:
            return set()
        best = (max if self.higher_is_better else min)(means, key=means.get)
        others = [k for k in means if k != best]
        adjusted = stats.holm([self.difference(best, k, noise).p for k in others])
        return {best} | {k for k, p in zip(others, adjusted) if math.isnan(p) or p >= stats.ALPHA}

    def robustness(self, key: Key, ratios: list[float]) -> tuple[Estimate, Estimate]:
        """Area under the noise-stability curve and retention (metric at the highest ratio / at ratio 0), each per
        seed over the seeds run at every ratio, then averaged. Retention is nan without ratio 0."""
        per_ratio = [self._rows(key, r) for r in ratios]
        seeds = sorted(set.intersection(*(set(rows) for rows in per_ratio)))
        units = [[rows[s] for rows in per_ratio] for s in seeds]
        area = self._estimate(units, lambda v: stats.stability_area(ratios, v, axis=1))
        if ratios[0] != 0:
            return area, Estimate(math.nan)
        return area, self._estimate(units, lambda v: v[:, -1] / v[:, 0])
