"""The README's findings are what the committed records say: each figure is recomputed here."""
from __future__ import annotations

from pathlib import Path

import pytest

from ncbench import report
from ncbench.results import iter_records

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "reference"


@pytest.fixture(scope="module")
def findings() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### What the benchmark finds")
    return " ".join(text[start:text.index("How to read the statistics", start)].split())


def _compare(a: str, b: str, noise_protocol: str = "caption-shuffle"):
    frame = report.compare(REFERENCE, a, b, noise_protocol=noise_protocol)
    return {round(r.noise, 2): r for r in frame.itertuples()}


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def _interval(r) -> str:
    return f"{_signed(r.difference)} [{_signed(r.lo)}, {_signed(r.hi)}]"


def test_filtering_pays_off_more_the_noisier_the_data(findings):
    rows = _compare("gmm-filter", "clip")
    for ratio in (0.2, 0.4, 0.6):
        assert _interval(rows[ratio]) in findings and rows[ratio].lo > 0
    assert f"at 60 % (Holm p = {max(rows[r].p_holm for r in (0.2, 0.4, 0.6)):.3f} each)" in findings
    assert len({f"{rows[r].p_holm:.3f}" for r in (0.2, 0.4, 0.6)}) == 1
    assert _interval(rows[0.0]) in findings and rows[0.0].p > 0.05
    images = _compare("gmm-filter", "clip", "image-shuffle")
    assert f"{_interval(images[0.2])} at 20 %, {_interval(images[0.4])} at 40 % and {_interval(images[0.6])}" in findings
    assert f"at 60 % (Holm p = {max(images[r].p_holm for r in (0.2, 0.4, 0.6)):.3f}), but" in findings
    assert min(images[r].lo for r in (0.2, 0.4, 0.6)) > 0
    hard = _compare("gmm-filter", "clip", "hard")
    assert f"{_interval(hard[0.2])} at 20 % (Holm p = {hard[0.2].p_holm:.3f})" in findings and hard[0.2].lo > 0
    assert _interval(hard[0.4]) in findings and _interval(hard[0.6]) in findings
    assert f"(p = {hard[0.4].p:.3f} and {hard[0.6].p:.3f}, Holm {hard[0.6].p_holm:.3f})" in findings
    gains = [hard[r].difference for r in (0.2, 0.4, 0.6)]
    assert max(gains) - min(gains) < 1.5  # "does not grow with the noise"
    assert hard[0.4].p_holm == hard[0.6].p_holm and hard[0.6].difference < images[0.4].difference / 10


def test_weighting_and_filtering_are_not_separable(findings):
    rows = _compare("gmm-weight", "gmm-filter")
    assert _interval(rows[0.6]) in findings and f"p = {rows[0.6].p:.3f}" in findings
    assert max(abs(r.difference) for r in rows.values()) == pytest.approx(rows[0.6].difference)
    assert f"p ≥ {min(r.p for r in rows.values()):.3f}" in findings
    images = _compare("gmm-weight", "gmm-filter", "image-shuffle")
    assert _interval(images[0.6]) in findings and images[0.6].hi < 0
    assert f"image-shuffle (Holm p = {images[0.6].p_holm:.3f})" in findings


def test_ncr_trails_one_filtered_model(findings):
    rows = _compare("ncr", "gmm-filter")
    assert (f"{_interval(rows[0.2])} at 20 %, {_interval(rows[0.4])} at 40 % and {_interval(rows[0.6])} at 60 % "
            f"(Holm p = {max(rows[r].p_holm for r in (0.2, 0.4, 0.6)):.3f})") in findings
    assert all(rows[r].hi < 0 for r in (0.2, 0.4, 0.6))
    images = _compare("ncr", "gmm-filter", "image-shuffle")
    for ratio, percent in ((0.2, 20), (0.4, 40)):
        row = images[ratio]
        assert f"{_interval(row)} at {percent} % (Holm p = {row.p_holm:.3f})" in findings and row.hi < 0
    assert f"level at 60 % ({_interval(images[0.6])})" in findings and images[0.6].lo < 0 < images[0.6].hi


def test_ncr_without_its_co_guessed_term_gains_and_reaches_gmm_filter(findings):
    over_ncr = {p: _compare("ncr-labeled-only", "ncr", p) for p in ("image-shuffle", "hard")}
    images, hard = over_ncr["image-shuffle"], over_ncr["hard"]
    assert f"{_interval(images[0.2])} and {_interval(images[0.4])} at 20 and 40 % image-shuffle" in findings
    assert f"image-shuffle (Holm p = {max(images[r].p_holm for r in (0.2, 0.4)):.3f})" in findings
    assert f"{_interval(hard[0.4])} at 40 % hard (p = {hard[0.4].p:.3f})" in findings
    assert all(row.lo > 0 for rows in over_ncr.values() for row in rows.values())
    over_filter = [_compare("ncr-labeled-only", "gmm-filter", "image-shuffle")[r] for r in (0.2, 0.4)]
    over_filter.append(_compare("ncr-labeled-only", "gmm-filter", "hard")[0.4])
    assert "({})".format(", ".join(_interval(row) for row in over_filter)) in findings
    assert all(row.difference > 0 for row in over_filter)  # level with or above


def test_npc_leads_clip_but_trails_a_filtered_model(findings):
    rows = _compare("npc", "clip")
    assert f"{_interval(rows[0.2])} at 20 % (Holm p = {rows[0.2].p_holm:.3f})" in findings
    assert f"{_interval(rows[0.4])} at 40 % and {_interval(rows[0.6])} at 60 % (Holm p = " \
           f"{max(rows[r].p_holm for r in (0.4, 0.6)):.3f})" in findings
    assert min(rows[r].lo for r in (0.2, 0.4, 0.6)) > 0
    assert f"without noise ({_interval(rows[0.0])})" in findings and rows[0.0].lo < 0 < rows[0.0].hi
    behind = _compare("npc", "gmm-filter")
    assert f"by {_interval(behind[0.2])} at 20 % and {_interval(behind[0.6])} at 60 % (Holm p = " \
           f"{max(behind[r].p_holm for r in (0.2, 0.4, 0.6)):.3f})" in findings
    assert max(behind[r].hi for r in (0.2, 0.4, 0.6)) < 0  # "at every noisy ratio"


@pytest.mark.parametrize("noise_protocol, methods", [("caption-shuffle", ("clip", "gmm-filter", "gmm-weight")),
                                                     ("image-shuffle", ("clip", "gmm-filter", "rcl"))])
def test_retention(findings, noise_protocol, methods):
    frame = report.load_runs(REFERENCE)
    (table,) = report.tables(frame[frame.noise_protocol == noise_protocol], "rsum")
    for method in methods:
        retention = table.robustness[(False, method)][1]
        stated = f"{100 * retention.value:.1f} % [{100 * retention.lo:.1f}, {100 * retention.hi:.1f}]"
        assert stated in findings, (method, stated)


def test_rcl_beats_the_filters(findings):
    rows = _compare("rcl", "gmm-filter")
    assert _interval(rows[0.4]) in findings and _interval(rows[0.6]) in findings
    assert f"at 60 % (Holm p = {max(rows[0.4].p_holm, rows[0.6].p_holm):.3f}) and" in findings
    assert rows[0.4].lo > 0 and rows[0.6].lo > 0 and f"{rows[0.4].p_holm:.3f}" == f"{rows[0.6].p_holm:.3f}"
    assert _interval(_compare("rcl", "clip")[0.6]) in findings
    images = _compare("rcl", "gmm-filter", "image-shuffle")
    assert _interval(images[0.4]) in findings and _interval(images[0.6]) in findings
    assert f"(Holm p ≤ {max(images[r].p_holm for r in (0.4, 0.6)):.3f})," in findings
    assert images[0.4].lo > 0 and images[0.6].lo > 0
    hard = _compare("rcl", "gmm-filter", "hard")
    assert _interval(hard[0.4]) in findings and _interval(hard[0.6]) in findings and hard[0.6].lo > 0
    assert f"(Holm p = {hard[0.4].p_holm:.3f})" in findings and f"(p = {hard[0.6].p:.3f})" in findings


def _mean_auroc(method: str, noise_protocol: str, noise: float) -> float:
    runs = report.load_runs(REFERENCE)
    chosen = runs[(runs.method == method) & (runs.noise_protocol == noise_protocol) & (runs.noise.round(2) == noise)]
    assert len(chosen) == 3
    return float(chosen.auroc.mean())


def test_bicro_ties_ncr_until_the_noise_is_heavy_or_images_are_repaired(findings):
    rows = _compare("bicro", "ncr")
    assert f"{_interval(rows[0.2])} at 20 %, {_signed(rows[0.4].difference)} at 40 %" in findings
    level = min(rows[r].p_holm for r in (0.0, 0.2, 0.4))
    assert f"Holm p ≥ {level:.3f})" in findings and level > 0.05
    assert f"{_interval(rows[0.6])} at 60 % (Holm p = {rows[0.6].p_holm:.3f})" in findings and rows[0.6].hi < 0
    images = _compare("bicro", "ncr", "image-shuffle")
    assert (f"{_interval(images[0.2])} at 20 %, {_interval(images[0.4])} at 40 % and {_interval(images[0.6])} at 60 % "
            "image-shuffle") in findings
    assert all(images[r].hi < 0 for r in (0.2, 0.4, 0.6))
    assert f"image-shuffle (Holm p = {max(images[r].p_holm for r in (0.2, 0.4, 0.6)):.3f}), with" in findings
    detection = [_mean_auroc(m, "image-shuffle", 0.6) for m in ("bicro", "ncr")]
    assert "AUROC ({:.3f} against {:.3f} at 60 %)".format(*detection) in findings


def test_hard_noise_undoes_most_corrections(findings):
    hard = {m: _compare(m, "clip", "hard") for m in ("ncr", "osa", "decl", "bicro", "npc", "rcl", "mscn", "gmm-weight")}

    def pair(method: str) -> str:
        return f"({_signed(hard[method][0.4].difference)}, {_signed(hard[method][0.6].difference)})"

    level = [hard[m][r] for m in ("ncr", "osa") for r in (0.4, 0.6)]
    assert all(r.lo < 0 < r.hi for r in level)
    assert f"({_interval(hard['ncr'][0.4])}, {_interval(hard['ncr'][0.6])})" in findings and pair("osa") in findings
    for method in ("decl", "bicro"):
        row = hard[method][0.4]
        assert f"({_interval(row)}, Holm p = {row.p_holm:.3f})" in findings and row.hi < 0
    npc = hard["npc"]
    leads = f"({_interval(npc[0.2])}, {_interval(npc[0.4])}, Holm p ≤ {max(npc[r].p_holm for r in (0.2, 0.4)):.3f})"
    assert f"{leads} but not at 60 % ({_signed(npc[0.6].difference)})" in findings
    assert npc[0.2].lo > 0 and npc[0.4].lo > 0 and npc[0.6].lo < 0 < npc[0.6].hi
    leaders = [hard[m][r] for m in ("rcl", "mscn", "gmm-weight") for r in (0.4, 0.6)]
    assert all(pair(m) in findings for m in ("rcl", "mscn", "gmm-weight"))
    assert all(r.lo > 0 for r in leaders) and f"(Holm p ≤ {max(r.p_holm for r in leaders):.3f})" in findings


def test_decl_pays_without_noise(findings):
    rows = _compare("decl", "clip")
    assert _interval(rows[0.0]) in findings and rows[0.0].hi < 0 and _interval(rows[0.6]) in findings
    behind = _compare("decl", "gmm-filter")
    holm = {f"{r.p_holm:.3f}" for r in behind.values()}
    assert all(r.hi < 0 for r in behind.values()) and len(holm) == 1
    assert f"at every ratio (Holm p = {holm.pop()})" in findings


def test_npc_official_at_clips_learning_rate(findings):
    same_rate = _compare("npc-official", "clip (lr=0.0002)")
    low, high = min(r.difference for r in same_rate.values()), max(r.difference for r in same_rate.values())
    assert f"from {_signed(low)} to {_signed(high)} at every ratio" in findings and len(same_rate) == 4
    assert f"Holm p ≥ {min(r.p_holm for r in same_rate.values()):.3f}" in findings
    assert all(r.p_holm > 0.05 for r in same_rate.values())
    largest = same_rate[0.6]
    assert largest.difference == high and f"the largest, {_interval(largest)} at 60 %, has p = {largest.p:.3f}" in findings
    at_clip_rate = _compare("npc-official (lr=0.0005)", "clip")
    assert _interval(at_clip_rate[0.4]) in findings and _interval(at_clip_rate[0.6]) in findings
    assert f"Holm p = {min(r.p_holm for r in at_clip_rate.values()):.3f}" in findings
    assert all(r.lo < 0 < r.hi for r in at_clip_rate.values())
    hard = _compare("npc-official", "clip (lr=0.0002)", "hard")
    assert _interval(hard[0.4]) in findings and _interval(hard[0.6]) in findings
    assert all(hard[r].lo < 0 < hard[r].hi for r in (0.4, 0.6))
    assert f"Holm p ≥ {min(hard[r].p_holm for r in (0.4, 0.6)):.3f}" in findings
    images = _compare("npc-official", "clip (lr=0.0002)", "image-shuffle")
    assert _interval(images[0.4]) in findings and _interval(images[0.6]) in findings
    assert all(images[r].lo < 0 < images[r].hi for r in (0.4, 0.6))
    assert f"Holm p ≥ {min(images[r].p_holm for r in (0.4, 0.6)):.3f})" in findings


def test_the_lower_rate_is_what_costs(findings):
    rate = _compare("clip (lr=0.0002)", "clip")
    for ratio in (0.2, 0.4):
        assert _interval(rate[ratio]) in findings and rate[ratio].hi < 0
    assert f"(p = {rate[0.2].p:.3f} and {rate[0.4].p:.3f})" in findings
    hard = _compare("clip (lr=0.0002)", "clip", "hard")
    assert _interval(hard[0.4]) in findings and _interval(hard[0.6]) in findings
    assert f"hard (Holm p ≤ {max(hard[r].p_holm for r in (0.4, 0.6)):.3f})" in findings
    assert all(hard[r].hi < 0 for r in (0.4, 0.6))
    gap = _compare("npc-official", "clip")
    assert f"{_interval(gap[0.2])} at 20 % and {_interval(gap[0.4])} at 40 % caption-shuffle" in findings
    assert f"(Holm p = {max(gap[r].p_holm for r in (0.2, 0.4)):.3f})" in findings and gap[0.2].hi < 0 and gap[0.4].hi < 0
    gap = _compare("npc-official", "clip", "hard")
    assert _interval(gap[0.4]) in findings and _interval(gap[0.6]) in findings
    helps = _compare("clip (lr=0.0002)", "clip", "image-shuffle")
    assert _interval(helps[0.4]) in findings and _interval(helps[0.6]) in findings
    assert helps[0.4].lo > 0 and helps[0.6].lo > 0
    assert f"image-shuffle (Holm p = {max(helps[r].p_holm for r in (0.4, 0.6)):.3f})" in findings
    lead = _compare("npc-official", "clip", "image-shuffle")
    assert f"`npc-official` − `clip` {_interval(lead[0.4])} and {_interval(lead[0.6])}" in findings
    paper = _compare("npc", "clip (lr=0.0002)")
    assert f"{_interval(paper[0.4])} at 40 % caption-shuffle (Holm p = {paper[0.4].p_holm:.3f})" in findings
    hard = _compare("npc", "clip (lr=0.0002)", "hard")
    assert f"{_interval(hard[0.4])} at 40 % hard (Holm p = {hard[0.4].p_holm:.3f}; " in findings and hard[0.4].lo > 0
    assert f"{_signed(hard[0.6].difference)} at 60 %, p = {hard[0.6].p:.3f})" in findings and hard[0.6].lo < 0
    images = _compare("npc", "clip (lr=0.0002)", "image-shuffle")
    assert f"{_interval(images[0.4])} at 40 % and {_interval(images[0.6])} at 60 % image-shuffle (Holm" in findings
    assert images[0.4].lo > 0 and images[0.6].lo > 0 and f"p = {max(images[r].p_holm for r in (0.4, 0.6)):.3f})" in findings


def _records(method: str) -> list[dict]:
    """The method's committed records on noisy data."""
    return [r for r in iter_records(REFERENCE) if r["config"]["method"] == method and r["noise"]["ratio"] > 0]


def test_ncr_docs_state_what_the_co_guessed_term_does_to_dev_rsum():
    """docs/methods/ncr.md#co-guessing: the dev rSum change from epoch 2 to epoch 3, where the term starts."""
    text = " ".join((ROOT / "docs" / "methods" / "ncr.md").read_text().split())
    by_protocol = {"caption-shuffle": [], "other": []}
    for record in _records("ncr"):
        dev = [epoch["dev"]["rsum"] for epoch in record["epochs"]]
        group = "caption-shuffle" if record["config"]["noise_protocol"] == "caption-shuffle" else "other"
        by_protocol[group].append((dev[2] - dev[1], record["selection"]["epoch"]))
    other, caption = by_protocol["other"], by_protocol["caption-shuffle"]
    assert all(change < 0 and epoch == 2 for change, epoch in other)
    losses = sorted(-change for change, _ in other)
    assert f"every one of the {len(other)} noisy `ncr` records" in text
    assert f"by {losses[0]:.1f} to {losses[-1]:.1f}" in text
    caption_losses = [-change for change, _ in caption if change < 0]
    assert f"caption-shuffle {len(caption_losses)} of {len(caption)} lose (by at most {max(caption_losses):.1f})" in text
    assert f"and {sum(epoch == 2 for _, epoch in caption)} keep epoch 2" in text
    ablation = [record["selection"]["epoch"] for record in _records("ncr-labeled-only")]
    assert f"all {len(ablation)} of its runs are selected at epoch 4 or 5" in text and min(ablation) >= 4
