"""The command line end to end: a real run writes a record; bad input gives one line and exit 2."""
import json

import pytest

MINI = ("--dataset", "synthetic-mini", "--epochs", "1")


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_run_writes_a_complete_record_and_is_not_rerun(cli, tmp_path):
    proc = cli("run", "--method", "clip", "--noise", "0.4", *MINI, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = tmp_path.iterdir()
    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "complete" and record["run_id"] == run_dir.name
    assert record["config"]["noise"] == 0.4 and record["noise"]["protocol"] == "caption-shuffle"
    assert 0.38 < record["noise"]["realised_ratio"] <= 0.4
    test = record["test"]["1k"]
    assert test["rsum"] == pytest.approx(sum(test[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    assert len(record["epochs"]) == 1 and "dev" in record["epochs"][0]
    assert not (run_dir / "checkpoint.pt").exists()
    assert "rSum" in proc.stdout
    mtime = (run_dir / "result.json").stat().st_mtime_ns
    again = cli("run", "--method", "clip", "--noise", "0.4", *MINI, "--out", str(tmp_path))
    assert again.returncode == 0 and (run_dir / "result.json").stat().st_mtime_ns == mtime


def test_same_config_and_seed_give_the_same_numbers(cli, tmp_path):
    for out in ("a", "b"):
        assert cli("run", "--noise", "0.2", *MINI, "--out", str(tmp_path / out)).returncode == 0
    (a,), (b,) = (list((tmp_path / out).glob("*/result.json")) for out in ("a", "b"))
    assert a.parent.name == b.parent.name
    assert json.loads(a.read_text())["test"] == json.loads(b.read_text())["test"]


def test_unknown_method(cli, tmp_path):
    line = _one_error_line(cli("run", "--method", "nope", *MINI, "--out", str(tmp_path)))
    assert "unknown method 'nope'" in line and "clip" in line


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_noise_outside_unit_interval(cli, tmp_path, ratio):
    line = _one_error_line(cli("run", "--noise", ratio, *MINI, "--out", str(tmp_path)))
    assert "--noise" in line and "[0, 1)" in line
    assert not any(tmp_path.iterdir())


def test_unwritable_out_folder(cli):
    """/proc refuses new folders even to root, so this holds in CI."""
    line = _one_error_line(cli("run", *MINI, "--out", "/proc/ncbench-runs"))
    assert "--out /proc/ncbench-runs" in line and "writable" in line


def test_out_that_is_a_file(cli, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    line = _one_error_line(cli("run", *MINI, "--out", str(target)))
    assert "--out" in line and str(target) in line


def test_bad_param(cli, tmp_path):
    line = _one_error_line(cli("run", *MINI, "--param", "nope=1", "--out", str(tmp_path)))
    assert "--param nope" in line


def test_list_shows_methods(cli):
    proc = cli("list")
    assert proc.returncode == 0 and "clip" in proc.stdout
