"""The command line end to end: a real run writes a record; bad input gives one line and exit 2."""
import json

import pytest
from conftest import CLIP_RUN, ncbench

from ncbench.results import SCHEMA_VERSION, load_ranks

MINI = ("--dataset", "synthetic-mini", "--epochs", "1")


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_run_writes_a_complete_record_and_is_not_rerun(cli, clip_run):
    out, proc = clip_run
    assert proc.returncode == 0, proc.stderr
    (record_path,) = out.glob("*/result.json")
    run_dir = record_path.parent
    record = json.loads(record_path.read_text())
    assert record["status"] == "complete" and record["run_id"] == run_dir.name
    assert record["config"]["noise"] == 0.4 and record["noise"]["protocol"] == "caption-shuffle"
    assert 0.38 < record["noise"]["realised_ratio"] <= 0.4
    test = record["test"]["1k"]
    assert test["rsum"] == pytest.approx(sum(test[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    (epoch,) = record["epochs"]
    assert "dev" in epoch and set(epoch["losses"]) == {"loss"} and epoch["report"] == {}  # clip: one loss, no logs
    assert record["schema"] == SCHEMA_VERSION and record["resumes"] == 0
    ranks = load_ranks(run_dir, record)  # the per-query ranks beside the record give its recalls
    assert record["ranks_file"] == "ranks.npz" and sorted(ranks) == ["1k.i2t", "1k.t2i"]
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert test[f"{d}_r{k}"] == pytest.approx(100 * (ranks[f"1k.{d}"] <= k).mean())
    assert not (run_dir / "checkpoint.pt").exists()
    assert "rSum" in proc.stdout
    mtime = (run_dir / "result.json").stat().st_mtime_ns
    again = cli(*CLIP_RUN, "--out", out)
    assert again.returncode == 0 and (run_dir / "result.json").stat().st_mtime_ns == mtime
    assert run_dir.name in again.stdout.replace("\n", "")


def test_same_config_and_seed_give_the_same_numbers_in_a_new_process(clip_run, tmp_path):
    """The console command, as a real process: the same run id and test metrics as the run made in this process."""
    proc = ncbench(*CLIP_RUN, "--out", tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    (a,), (b,) = (list(out.glob("*/result.json")) for out in (clip_run[0], tmp_path))
    assert a.parent.name == b.parent.name
    assert json.loads(a.read_text())["test"] == json.loads(b.read_text())["test"]


def test_precision_names_the_run_and_fp32_is_the_cpu_default(cli, clip_run, tmp_path):
    """--precision fp32 is a run of its own (its id and config say so), with the numbers of the default on the CPU,
    where auto means full precision; the default keeps the ids runs had before the flag existed."""
    from ncbench.config import RunConfig

    assert "precision" not in RunConfig().identity()
    proc = cli(*CLIP_RUN, "--precision", "fp32", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    (a,), (b,) = (list(out.glob("*/result.json")) for out in (clip_run[0], tmp_path))
    auto, fp32 = json.loads(a.read_text()), json.loads(b.read_text())
    assert a.parent.name != b.parent.name and fp32["config"]["precision"] == "fp32"
    assert "precision" not in auto["config"] and fp32["test"] == auto["test"]


def test_bad_precision(cli, tmp_path):
    line = _one_error_line(cli("run", *MINI, "--precision", "fp16", "--out", tmp_path))
    assert "--precision" in line and "fp16" in line and "bf16" in line
    assert not any(tmp_path.iterdir())


def test_unknown_method(cli, tmp_path):
    line = _one_error_line(cli("run", "--method", "nope", *MINI, "--out", tmp_path))
    assert "unknown method 'nope'" in line and "clip" in line


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_noise_outside_unit_interval(cli, tmp_path, ratio):
    line = _one_error_line(cli("run", "--noise", ratio, *MINI, "--out", tmp_path))
    assert "--noise" in line and "[0, 1)" in line
    assert not any(tmp_path.iterdir())


def test_unwritable_out_folder(cli):
    """/proc refuses new folders even to root, so this holds in CI."""
    line = _one_error_line(cli("run", *MINI, "--out", "/proc/ncbench-runs"))
    assert "--out /proc/ncbench-runs" in line and "writable" in line


def test_out_that_is_a_file(cli, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    line = _one_error_line(cli("run", *MINI, "--out", target))
    assert "--out" in line and str(target) in line


def test_bad_param(cli, tmp_path):
    line = _one_error_line(cli("run", *MINI, "--param", "nope=1", "--out", tmp_path))
    assert "--param nope" in line


def test_list_shows_methods(cli):
    proc = cli("list")
    assert proc.returncode == 0 and "clip" in proc.stdout
