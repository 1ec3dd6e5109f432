"""Statistics with known answers: metrics from ranks, t and bootstrap intervals and tests, Holm, tied-best groups,
robustness scores, interval coverage on simulated benchmarks, and the query bootstrap reached from records."""
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ncbench import report, stats
from ncbench.cli import main
from ncbench.results import write_ranks
from ncbench.verdicts import Evidence

RECORDS = Path(__file__).parent / "fixtures" / "records"
T_975 = {1: 12.706205, 2: 4.302653}  # Student t quantiles (tables)
K = (1, 5, 10)


def _runs(values: dict[str, list[float]], ranks: dict[str, list] | None = None, noise: float = 0.2) -> pd.DataFrame:
    """A table's runs: method -> its value per seed 0, 1, ...; every seed's runs share one noise artefact."""
    return pd.DataFrame([{"clean_track": False, "label": label, "noise": noise, "seed": seed, "digest": f"d{noise}-{seed}",
                          "value": v, "ranks": ranks[label][seed] if ranks else None}
                         for label, vs in values.items() for seed, v in enumerate(vs)])


def _simulated_ranks(rng, lam: np.ndarray, u: np.ndarray, scale: float, redraw: float = 0.1) -> np.ndarray:
    """1 + Poisson(scale * lambda) per query by inversion of u (shared by methods: paired); a seed redraws u for a
    fraction ``redraw`` of the queries (runs differ on a few queries, as trained models do)."""
    u = np.where(rng.random(len(u)) < redraw, rng.random(len(u)), u)
    return 1 + sps.poisson.ppf(u, scale * lam).astype(np.int64)


def _true_rsum(theta: float) -> float:
    """rSum of ranks 1 + Poisson(lambda), lambda ~ Exponential(theta): 1 + Geometric, P(rank <= k) = 1 - q**k."""
    q = theta / (1 + theta)
    return 2 * sum(100 * (1 - q ** k) for k in K)


def test_metrics_from_ranks_by_hand():
    i2t, t2i = np.array([1, 2, 6, 11]), np.array([1, 1, 3, 20, 5, 7, 10, 2])
    # i2t R@1,5,10 = 25, 50, 75; t2i = 25, 62.5, 87.5
    assert stats.metric_from_ranks("rsum", i2t, t2i) == pytest.approx(325.0)
    assert stats.metric_from_ranks("t2i_r5", i2t, t2i) == 62.5
    assert stats.metric_from_ranks("i2t_medr", i2t, t2i) == 4  # floor(median(1, 2, 6, 11) = 4)
    with pytest.raises(ValueError, match="auroc"):
        stats.metric_from_ranks("auroc", i2t, t2i)


def test_t_interval_by_hand():
    e = stats.estimate(np.array([407.0, 400.0]))  # mean 403.5, s = 4.95, s / sqrt(2) = 3.5
    assert (e.value, e.n, e.how) == (403.5, 2, "t")
    assert (e.lo, e.hi) == pytest.approx((403.5 - T_975[1] * 3.5, 403.5 + T_975[1] * 3.5))
    assert math.isnan(stats.estimate(np.array([5.0])).lo)  # one seed: no interval


def test_welch_by_hand():
    """a = 459, 464 (var 12.5); b = 452, 456, 450 (var 9.333): se = sqrt(12.5/2 + 9.333/3) = 3.0596, t = 2.887,
    Welch-Satterthwaite df = 9.361**2 / (6.25**2 / 1 + 3.111**2 / 2) = 1.996."""
    e = stats.welch(np.array([459.0, 464.0]), np.array([452.0, 456.0, 450.0]))
    df, se = 1.996, 3.0596
    assert (e.value, e.n, e.how) == (pytest.approx(8.8333, abs=1e-4), 2, "welch")
    assert e.p == pytest.approx(2 * sps.t.sf(8.8333 / se, df), abs=1e-3)
    assert (e.hi - e.lo) / 2 == pytest.approx(sps.t.ppf(0.975, df) * se, rel=1e-3)


def test_holm_by_hand():
    # sorted 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 -> 0.06 (monotone); nan is outside the family
    assert stats.holm([0.01, 0.04, 0.03, math.nan])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.01, math.nan])[0] == pytest.approx(0.01) and math.isnan(stats.holm([math.nan])[0])


@pytest.mark.parametrize("with_ranks", [False, True])
def test_identical_methods_are_not_different(with_ranks):
    rng = np.random.default_rng(1)
    ranks = [(1 + rng.poisson(2.0, 200), 1 + rng.poisson(2.0, 400)) for _ in range(3)]
    values = [float(stats.metric_from_ranks("rsum", *r)) for r in ranks]
    runs = _runs({"a": values, "b": values}, {"a": ranks, "b": ranks} if with_ranks else None)
    e = Evidence(runs, "rsum", True).difference((False, "a"), (False, "b"), 0.2)
    assert e.how == ("bootstrap" if with_ranks else "t")
    assert e.value == 0 and e.lo <= 0 <= e.hi and e.p == 1.0


def test_a_constant_shift_is_significant_at_seed_level():
    """Three seeds with a large seed effect shared by both methods; A = B + 3 rSum + N(0, 0.3): the paired t-test
    finds it although the seed-to-seed spread (sd 5) dwarfs the shift."""
    rng = np.random.default_rng(2)
    b = 520 + rng.normal(0, 5, 3)
    a = b + 3 + rng.normal(0, 0.3, 3)
    e = Evidence(_runs({"a": list(a), "b": list(b)}), "rsum", True).difference((False, "a"), (False, "b"), 0.2)
    assert e.how == "t" and e.p < 0.05 and 0 < e.lo < 3 < e.hi


def test_a_constant_shift_is_significant_with_ranks():
    """A's ranks are B's with 2 % of the queries of each direction moved to rank 1 (a different 2 % per seed):
    a shift of a few rSum that the paired bootstrap over seeds and queries finds."""
    rng = np.random.default_rng(3)
    ranks_a, ranks_b = [], []
    for _ in range(3):
        b = (1 + rng.poisson(1.5, 1000), 1 + rng.poisson(1.5, 5000))
        a = tuple(np.where(rng.random(len(r)) < 0.02, 1, r) for r in b)
        ranks_a.append(a)
        ranks_b.append(b)
    runs = _runs({"a": [float(stats.metric_from_ranks("rsum", *r)) for r in ranks_a],
                  "b": [float(stats.metric_from_ranks("rsum", *r)) for r in ranks_b]}, {"a": ranks_a, "b": ranks_b})
    e = Evidence(runs, "rsum", True).difference((False, "a"), (False, "b"), 0.2)
    assert e.how == "bootstrap" and 2 < e.value < 8 and e.p < 0.01 and e.lo > 0


# 200 intervals at 95 %: the covering count is Binomial(200, 0.95), mean 190, sd 3.1; we allow 181..199 (about 3 sd).
COVERAGE_RANGE = (181, 199)


def test_paired_t_intervals_cover_the_true_difference():
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(200):
        seed_effect = rng.normal(0, 5, 3)
        diff = 2.0 + rng.normal(0, 1.5, 3)  # true mean difference 2
        e = stats.estimate((530 + seed_effect + diff) - (530 + seed_effect))
        covered += e.lo <= 2.0 <= e.hi
    assert COVERAGE_RANGE[0] <= covered <= COVERAGE_RANGE[1], covered


def test_bootstrap_intervals_cover_the_true_difference():
    """Simulated benchmarks: each draws a fresh test set of 300 images and 300 captions (difficulty lambda ~
    Exponential(1), shared by both methods and 3 seeds per method); ranks are 1 + Poisson(lambda) for A and
    1 + Poisson(1.3 lambda) for B, paired through shared uniforms. Ranks are then 1 + Geometric, so the true rSum
    difference has a closed form. The crossed bootstrap errs on the safe side where runs differ on many queries
    (docs/statistics.md), hence a realistic 10 % of queries redrawn per seed."""
    rng = np.random.default_rng(5)
    truth = _true_rsum(1.0) - _true_rsum(1.3)
    covered = 0
    for sim in range(200):
        lam, u = [rng.exponential(1.0, 300) for _ in "ab"], [rng.random(300) for _ in "ab"]
        runs = [tuple(_simulated_ranks(rng, x, v, scale) for x, v in zip(lam, u)) for scale in (1.0, 1.3) for _ in range(3)]
        boot = stats.resampled_metrics(runs, "rsum", replicates=400, seed=sim)
        values = np.array([stats.metric_from_ranks("rsum", *r) for r in runs])
        e = stats.estimate(values[:3] - values[3:], boot[:3] - boot[3:], seed=sim)
        covered += e.lo <= truth <= e.hi
    assert COVERAGE_RANGE[0] <= covered <= COVERAGE_RANGE[1], covered


def test_tied_best_group_on_a_constructed_table():
    """best leads; tie is 0.2 behind with seed noise of sd 1 (not separable); worse is 10 behind with the same seed
    effect (clearly worse); lone has one seed (untestable, stays in); higher is better."""
    seed_effect = [0.0, 4.0, -3.0, 2.0]
    runs = _runs({"best": [540 + s for s in seed_effect],
                  "tie": [539.8 + s + d for s, d in zip(seed_effect, [1.0, -1.2, 0.9, -0.5])],
                  "worse": [530 + s + d for s, d in zip(seed_effect, [0.3, -0.2, 0.1, -0.4])],
                  "lone": [400.0]})
    table = report.Table({}, "1k", "rsum", runs)
    assert {label for label in table.rows(False) if table.cell(False, label, 0.2).best} == {"best", "tie", "lone"}
    lower = report.Table({}, "1k", "i2t_medr", runs)  # lower is better: lone (400) is best, the rest untestable
    assert {label for label in lower.rows(False) if lower.cell(False, label, 0.2).best} == {"lone", "best", "tie", "worse"}


def test_holm_can_keep_a_method_in_the_group():
    """Three challengers, each behind the best by 2.0, 2.5 and 3.2 on its seeds (in some order): raw paired-t p = 0.018
    each, significant alone; Holm multiplies the smallest by 3 (0.054), so all three stay in the group."""
    best = 540 + np.random.default_rng(6).normal(0, 5, 3)
    gaps = {"x": [2.0, 2.5, 3.2], "y": [3.2, 2.0, 2.5], "z": [2.5, 3.2, 2.0]}
    runs = _runs({"best": list(best), **{k: list(best - np.array(g)) for k, g in gaps.items()}})
    evidence = Evidence(runs, "rsum", True)
    raw = [evidence.difference((False, "best"), (False, k), 0.2).p for k in gaps]
    assert raw == pytest.approx([0.0179] * 3, abs=1e-4) and min(stats.holm(raw)) == pytest.approx(3 * raw[0])
    assert evidence.best_group([(False, k) for k in ["best", *gaps]], 0.2) == {(False, k) for k in ["best", *gaps]}


def test_auc_and_retention_by_hand():
    """Ratios 0, 0.2, 0.6. Seed 0: 500, 490, 460 -> area (0.2 * 495 + 0.4 * 475) / 0.6 = 481.667, retention 0.92;
    seed 1: 510, 500, 450 -> (0.2 * 505 + 0.4 * 475) / 0.6 = 485, retention 450 / 510 = 0.88235."""
    runs = pd.concat([_runs({"m": [a, b]}, noise=r) for r, a, b in ((0.0, 500, 510), (0.2, 490, 500), (0.6, 460, 450))])
    table = report.Table({}, "1k", "rsum", runs)
    area, retention = table.robustness[(False, "m")]
    assert area.value == pytest.approx((481.6667 + 485) / 2, abs=1e-3) and area.n == 2
    assert retention.value == pytest.approx((0.92 + 450 / 510) / 2)
    half_width = T_975[1] * abs(481.6667 - 485) / 2  # s / sqrt(n) of two values is |a - b| / 2
    assert (area.hi - area.lo) / 2 == pytest.approx(half_width, abs=1e-3)
    assert stats.stability_area([0, 0.2, 0.6], np.array([500, 490, 460])) == pytest.approx(481.6667, abs=1e-3)


def test_rank_test_on_a_clear_order():
    """Five blocks where a > b > c always: average ranks 1, 2, 3; Friedman rejects; the CD is Demšar's for k=3, N=5
    (q = 2.343: 2.343 * sqrt(3 * 4 / 30) = 1.482)."""
    blocks = pd.DataFrame({"a": [5, 6, 7, 8, 9], "b": [4, 5, 6, 7, 8], "c": [1, 2, 3, 4, 5]}, dtype=float)
    test = stats.rank_test(blocks)
    assert test.ranks.to_dict() == {"a": 1.0, "b": 2.0, "c": 3.0} and test.friedman_p < 0.01
    assert test.cd == pytest.approx(1.482, abs=1e-3) and test.nemenyi.loc["a", "c"] < 0.05


def _records_with_ranks(tmp_path: Path, shift_gmm: bool) -> Path:
    """The fixture records with per-query ranks written beside each record (gmm-filter better by construction)."""
    root = tmp_path / "records"
    shutil.copytree(RECORDS, root)
    for path in sorted(root.glob("*/result.json")):
        record = json.loads(path.read_text())
        rng = np.random.default_rng(record["config"]["seed"])  # the seed's test-set difficulty, shared by methods
        lam = (rng.exponential(2.0, 100), rng.exponential(2.0, 500))
        own = np.random.default_rng(int(record["run_id"].rsplit("_", 1)[1], 16))
        scale = 0.5 if shift_gmm and record["method"]["name"] == "gmm-filter" else 1.0
        ranks = {"1k.i2t": 1 + own.poisson(scale * lam[0]), "1k.t2i": 1 + own.poisson(scale * lam[1])}
        record["ranks_file"] = write_ranks(path.parent, ranks)
        path.write_text(json.dumps(record))
    return root


def test_records_with_ranks_use_the_query_bootstrap(tmp_path, capsys):
    root = _records_with_ranks(tmp_path, shift_gmm=True)
    text = report.leaderboard(root)
    assert "bootstrap over seeds and test queries" in text
    main(["compare", "gmm-filter", "clip", "--results", str(root), "--noise-protocol", "caption-shuffle",
          "--format", "csv"])
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(frame.test) == ["paired bootstrap"] * 2 and list(frame.pairs) == [2, 2]
    assert np.allclose(frame.difference, frame.mean_a - frame.mean_b) and (frame.lo > 0).all()


def test_compare_equals_the_tables_own_evidence(tmp_path):
    """compare resamples only its two rows' runs; its figures are those of the whole table's evidence."""
    root = _records_with_ranks(tmp_path, shift_gmm=True)
    frame = report.load_runs(root)
    (table,) = report.tables(frame[frame.noise_protocol == "caption-shuffle"], "rsum")
    assert len(set(table.runs.label)) > 2 and all(r is not None for r in table.runs.ranks)
    compared = report.compare(root, "gmm-filter", "clip", noise_protocol="caption-shuffle")
    assert len(compared) == 2
    for row in compared.itertuples():
        e = table.evidence.difference((False, "gmm-filter"), (False, "clip"), row.noise)
        assert (row.difference, row.lo, row.hi, row.p, row.pairs) == (e.value, e.lo, e.hi, e.p, e.n)


def test_compare_formats_and_errors(tmp_path, capsys):
    main(["compare", "gmm-filter", "clip", "--results", str(RECORDS), "--format", "md"])
    text = capsys.readouterr().out
    assert "| noise | mean A | mean B | A − B | 95% CI | p | p Holm | n | test |" in text
    assert "paired t" in text and "+9.50" in text  # 20 %: (452 - 441) and (456 - 448) -> mean 9.5
    shutil.copytree(RECORDS, tmp_path / "records")
    for path in (tmp_path / "records").glob("mscn_*/result.json"):  # as with a clean subset: other noise artefacts
        record = json.loads(path.read_text())
        record["noise"]["digest"] = "other"
        path.write_text(json.dumps(record))
    main(["compare", "mscn", "gmm-filter", "--results", str(tmp_path / "records"), "--format", "csv"])
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(frame.test) == ["Welch (unpaired)", "–"] and frame.difference[0] == pytest.approx(461.5 - 454)
    for argv, message in [(["nope", "clip"], "compare: method 'nope' has no records"),
                          (["gmm-filter", "mscn", "--format", "html"], "--format 'html': expected one of table, csv, md"),
                          (["gmm-filter", "mscn", "--noise-protocol", "x"], "--noise-protocol 'x': no records")]:
        with pytest.raises(SystemExit) as exit_:
            main(["compare", *argv, "--results", str(RECORDS)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_an_unreadable_ranks_file_is_one_line(tmp_path, capsys):
    root = _records_with_ranks(tmp_path, shift_gmm=False)
    broken = next(root.glob("gmm-filter_*/ranks.npz"))
    broken.write_bytes(b"not a zip")
    with pytest.raises(SystemExit) as exit_:
        main(["leaderboard", "--results", str(root)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "is not a readable ranks file" in err and len(err.strip().splitlines()) == 1, err
