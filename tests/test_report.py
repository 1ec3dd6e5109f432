"""Leaderboards and plots from committed fixture records (tests/fixtures/records): 3 methods (clip at two lrs,
gmm-filter with detection, mscn using clean data, one of its seeds missing at 60 %) x 2 noise ratios x 2 seeds,
plus one run under another noise protocol."""
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ncbench import report
from ncbench.cli import main
from ncbench.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
RECORDS = FIXTURES / "records"


@pytest.mark.parametrize("fmt, ext", [("md", "md"), ("csv", "csv"), ("latex", "tex")])
def test_leaderboard_matches_golden(tmp_path, fmt, ext):
    """The CLI's leaderboard equals the committed golden file. After an intended change, regenerate with

        for f in md csv latex; do e=$f; [ $f = latex ] && e=tex; ncbench leaderboard --results tests/fixtures/records \
            --format $f --out tests/fixtures/golden/leaderboard.$e; done

    and review the diff.
    """
    target = tmp_path / f"leaderboard.{ext}"
    main(["leaderboard", "--results", str(RECORDS), "--format", fmt, "--out", str(target)])
    assert target.read_text() == (FIXTURES / "golden" / f"leaderboard.{ext}").read_text()


def test_cells_are_mean_std_and_t_interval_over_seeds():
    (table, _) = report.tables(report.load_runs(RECORDS), "rsum")
    cell = table.cell(False, "gmm-filter", 0.6)
    assert (cell.mean, cell.n) == (403.5, 2) and cell.std == pytest.approx(2 ** 0.5 * 3.5)  # 407 and 400: ddof=1
    assert (cell.lo, cell.hi) == pytest.approx((403.5 - 12.7062 * 3.5, 403.5 + 12.7062 * 3.5), abs=1e-3)  # t(1) quantile
    assert table.cell(True, "mscn", 0.6).n == 1 and table.rows(True) == ["mscn"]
    # 60 %: gmm-filter (407, 400) beats clip at lr 5e-4 (352, 342) by 55 and 58 on the same noise: paired t p = 0.017
    assert [label for label in table.rows(False) if table.cell(False, label, 0.6).best] == ["clip (lr=0.0001)", "gmm-filter"]


def test_csv_keeps_raw_columns():
    frame = pd.read_csv(io.StringIO(report.leaderboard(RECORDS, "csv")))
    row = frame[(frame.method == "gmm-filter") & (frame.noise_protocol == "caption-shuffle")].iloc[0]
    assert row["noise0.6_mean"] == 403.5
    assert row["noise0.6_lo"] == pytest.approx(403.5 - 12.7062 * 3.5, abs=1e-3) and row["noise0.6_seeds"] == 2
    assert bool(row["noise0.6_group"]) and row.auc == pytest.approx((454 + 403.5) / 2)  # trapezoid over 20-60 %
    assert math.isnan(row.retention)  # no 0 % column


def test_settings_are_never_mixed(tmp_path):
    """A record with other epochs becomes its own table, not a third seed of its method's cell."""
    shutil.copytree(RECORDS, tmp_path / "records")
    path = next(p for p in (tmp_path / "records").glob("gmm-filter_*n0.2_s0_*/result.json"))
    record = json.loads(path.read_text())
    record["config"]["epochs"] = 3
    path.write_text(json.dumps(record))
    tables = report.tables(report.load_runs(tmp_path / "records"), "rsum")
    assert sorted(t.setting["epochs"] for t in tables) == [2, 2, 3]
    assert [t.setting["noise_protocol"] for t in tables if t.setting["epochs"] == 2] == ["caption-shuffle", "hard"]


def test_only_complete_records_count(tmp_path):
    shutil.copytree(RECORDS, tmp_path / "records")
    for path in (tmp_path / "records").glob("mscn_*/result.json"):
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "status": "running"}))
    assert "mscn" not in report.leaderboard(tmp_path / "records")


def test_a_run_recorded_twice_is_refused(tmp_path):
    shutil.copytree(RECORDS, tmp_path / "a")
    shutil.copytree(RECORDS / next(p.name for p in RECORDS.iterdir()), tmp_path / "b" / "copy")
    with pytest.raises(UserError, match="more than one record"):
        report.load_runs(tmp_path)


def _error_line(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with one line on stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    return stderr


@pytest.mark.parametrize("args, message", [
    (["--metric", "nope"], "--metric 'nope': expected one of i2t_medr"),
    (["--protocol", "coco-5k"], "--protocol coco-5k: dataset synthetic has test protocols 1k"),
    (["--format", "html"], "--format 'html': expected one of md, csv, latex"),
    (["--dataset", "coco"], "--dataset 'coco': no records"),
])
def test_bad_options_are_one_line(capsys, args, message):
    assert message in _error_line(capsys, ["leaderboard", "--results", str(RECORDS), *args])


def test_no_records(capsys, tmp_path):
    assert "no complete records" in _error_line(capsys, ["plot", "--results", str(tmp_path), "--out", str(tmp_path)])


def test_latex_escapes_names():
    assert report.tex_escape("a_b & 50% {x}") == r"a\_b \& 50\% \{x\}"


def test_plot_writes_stability_and_detection_figures(tmp_path):
    main(["plot", "--results", str(RECORDS), "--out", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    stems = {name.rsplit(".", 1)[0] for name in names}
    assert len(names) == 2 * len(stems) and all((tmp_path / n).stat().st_size > 1000 for n in names)
    assert sum(s.endswith("_rsum") and not s.startswith("critical-difference") for s in stems) == 2  # per noise protocol
    assert "critical-difference_rsum" in stems  # clip at two lrs and gmm-filter over two blocks (20 %, 60 %)
    assert sum(s.endswith("_detection-auroc") for s in stems) == 1  # only gmm-filter reports detection
    svg = next(tmp_path.glob("*caption-shuffle*_rsum.svg")).read_text()
    assert "gmm-filter" in svg and "mscn [clean data]" in svg and "noise ratio (%)" in svg


def test_committed_leaderboard_matches_committed_records():
    """results/leaderboard.md is what `ncbench leaderboard --results results/reference` writes (README's command)."""
    results = Path(__file__).parent.parent / "results"
    assert report.leaderboard(results / "reference") == (results / "leaderboard.md").read_text()


def test_an_ablation_adds_a_row_without_renaming_the_default():
    frame = report.load_runs(RECORDS)
    (table, _) = report.tables(frame, "rsum")
    assert {"clip", "clip (lr=0.0001)"} <= set(table.rows(False))  # the default variant (lr 5e-4) keeps the name
    default = report.default_variant("clip")
    moved = frame.assign(variant=frame.variant.where(frame.variant != default, default.replace("0.0005", "0.0003")))
    (table, _) = report.tables(moved, "rsum")
    assert {"clip (lr=0.0001)", "clip (lr=0.0003)"} <= set(table.rows(False)) and "clip" not in table.rows(False)
    assert report.default_variant("no-such-method") is None


def test_plot_lines_stay_distinct_past_the_palette():
    styles = [tuple(report.line_style(i).values()) for i in range(24)]
    assert len(set(styles)) == 24 and len({(c, m) for c, m, _ in styles}) == 24  # colour and marker alone suffice


def _copy(root: Path, source: str, protocol: str, ratio: float, rsum: float) -> None:
    """A record of ``source``'s method, seed and settings under another noise ``protocol`` and ``ratio``."""
    record = json.loads((RECORDS / source / "result.json").read_text())
    record["noise"].update(protocol=protocol, ratio=ratio, realised_ratio=ratio, digest=f"{protocol}-{ratio:g}")
    record["config"].update(noise=ratio, noise_protocol=protocol)
    record["test"]["1k"]["rsum"] = rsum
    digest = hashlib.sha256(f"{source} {protocol} {ratio}".encode()).hexdigest()[:10]
    record["run_id"] = f"{source.split('_n')[0]}_n{ratio:g}_s{record['config']['seed']}_{digest}"
    (root / record["run_id"]).mkdir()
    (root / record["run_id"] / "result.json").write_text(json.dumps(record))


def test_noise_free_runs_serve_every_protocol(tmp_path):
    """A method variant's row under a protocol without its 0 % runs takes those recorded under another protocol of
    the setting; its own come first; a variant without runs under the protocol gets no row there."""
    root = tmp_path / "records"
    shutil.copytree(RECORDS, root)
    _copy(root, "clip_synthetic_n0.2_s0_7986738a1c", "caption-shuffle", 0.0, 470.0)
    _copy(root, "clip_synthetic_n0.2_s1_32aa64bad2", "caption-shuffle", 0.0, 480.0)
    _copy(root, "clip_synthetic_n0.2_s0_bd067ab9e7", "caption-shuffle", 0.0, 465.0)  # clip at lr 1e-4: no hard runs
    _copy(root, "gmm-filter_synthetic_n0.2_s0_c5837b8ae8", "caption-shuffle", 0.0, 472.0)
    _copy(root, "gmm-filter_synthetic_n0.2_s0_c5837b8ae8", "hard", 0.2, 430.0)
    caption, hard = report.tables(report.load_runs(root), "rsum")
    assert caption.cell(False, "clip", 0.0)[:3] == (475.0, pytest.approx(50 ** 0.5), 2)
    assert hard.noise == [0.0, 0.2] and hard.rows(False) == ["clip", "gmm-filter"]
    assert hard.cell(False, "clip", 0.0)[:3] == (475.0, pytest.approx(50 ** 0.5), 2)
    assert hard.cell(False, "gmm-filter", 0.0)[:1] == (472.0,)
    retention = hard.robustness[(False, "clip")][1]  # seed 0 alone has both ratios under hard
    assert (retention.value, retention.n) == (pytest.approx(423 / 470), 1)
    assert list(report.rank_blocks([hard]).index) == [f"{hard.slug} 0.2"]  # the 0 % block is caption-shuffle's

    _copy(root, "clip_synthetic_n0.2_s0_f5f1b92c52", "hard", 0.0, 471.0)  # hard's own seed 0 comes before the copy
    caption, hard = report.tables(report.load_runs(root), "rsum")
    assert hard.cell(False, "clip", 0.0)[:1] == (475.5,) and caption.cell(False, "clip", 0.0)[:1] == (475.0,)
    assert list(report.rank_blocks([hard]).index) == [f"{hard.slug} 0", f"{hard.slug} 0.2"]
