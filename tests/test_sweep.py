"""Sweeps: the grid names runs exactly as `ncbench run` does, run state is read from run folders, done runs are
skipped, failed runs do not stop the others, and a killed run resumes from its checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ncbench import config, sweep
from ncbench.cli import main
from ncbench.errors import UserError
from ncbench.lock import LOCKS
from ncbench.registry import METHODS
from ncbench.results import CHECKPOINT, RECORD

MINI = {"dataset": "synthetic-mini", "epochs": 1}
FIXTURE_RECORD = next((Path(__file__).parent / "fixtures" / "records").glob("clip_*/result.json"))
CACHE = os.environ["NCBENCH_CACHE"]


def _settings(**overrides) -> dict:
    return {"noise_protocol": None, "dataset": "synthetic", "data_root": None, "epochs": None, "batch_size": None,
            "lr": None, "model": None, "pretrained": None, "selection": None, "preset": None, **overrides}


def _sweep_args(out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return ["sweep", "--dataset", "synthetic-mini", "--epochs", str(epochs), "--out", str(out), "--cache-dir", CACHE,
            *extra]


def _place_record(run_dir: Path) -> None:
    """A complete record (a committed fixture, renamed) so the run counts as done."""
    run_dir.mkdir(parents=True)
    record = json.loads(FIXTURE_RECORD.read_text())
    (run_dir / RECORD).write_text(json.dumps({**record, "run_id": run_dir.name}))


def test_grid_is_methods_by_noise_by_seeds_resolved_like_run():
    jobs = sweep.expand(["clip", "gmm-filter"], [0.0, 0.2], [0, 1, 0], _settings(**MINI))
    assert [(j.config.method, j.config.noise, j.config.seed) for j in jobs] == [
        (m, r, s) for m in ("clip", "gmm-filter") for r in (0.0, 0.2) for s in (0, 1)]
    for job in jobs:
        flags = dict(noise=job.config.noise, noise_protocol=None, seed=job.config.seed, dataset="synthetic-mini",
                     epochs=1, batch_size=None, lr=None, model=None, pretrained=None, selection=None, preset=None,
                     clean_fraction=None, data_root=None)  # what `ncbench run` passes to config.resolve
        assert job.run_id == config.resolve(METHODS.get(job.config.method), flags).run_id
    assert len({j.run_id for j in jobs}) == 8


def test_a_job_command_names_the_same_run(cli, tmp_path):
    """`ncbench run` with a job's arguments finds the record placed under the job's run id and trains nothing."""
    (job,) = sweep.expand(["clip"], [0.2], [3], _settings(dataset="synthetic-mini", epochs=1, lr=1e-4, batch_size=64))
    _place_record(tmp_path / job.run_id)
    argv = job.argv(tmp_path, Path(CACHE))
    assert argv[:3] == [sys.executable, "-m", "ncbench"]  # a worker process runs the command line
    proc = cli(*argv[3:])
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name != LOCKS] == [job.run_id]
    assert job.run_id in proc.stdout.replace("\n", "")


def test_run_state_is_read_from_the_folder(tmp_path):
    assert sweep.run_state(tmp_path / "absent") is sweep.State.NOT_STARTED
    (tmp_path / "logged").mkdir()
    (tmp_path / "logged" / sweep.LOG).write_text("started, killed before its first checkpoint\n")
    assert sweep.run_state(tmp_path / "logged") is sweep.State.NOT_STARTED
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / CHECKPOINT).write_bytes(b"x")
    assert sweep.run_state(tmp_path / "ckpt") is sweep.State.INCOMPLETE
    _place_record(tmp_path / "done")
    assert sweep.run_state(tmp_path / "done") is sweep.State.DONE


def test_status_lists_each_run_and_runs_nothing(tmp_path, capsys):
    jobs = sweep.expand(["clip"], [0.0, 0.2, 0.4], [0], _settings(**MINI))
    _place_record(tmp_path / jobs[0].run_id)
    (tmp_path / jobs[1].run_id).mkdir()
    (tmp_path / jobs[1].run_id / CHECKPOINT).write_bytes(b"x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    main(["sweep", "--methods", "clip", "--noise", "0,0.2,0.4", "--seeds", "0", "--dataset", "synthetic-mini",
          "--epochs", "1", "--out", str(tmp_path), "--status"])
    lines = capsys.readouterr().out.splitlines()
    state = {job.run_id: next(line for line in lines if job.run_id in line) for job in jobs}
    assert "done" in state[jobs[0].run_id] and "incomplete" in state[jobs[1].run_id]
    assert "not started" in state[jobs[2].run_id]
    assert "1 done, 1 incomplete, 1 not started" in lines
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("args, message", [
    (["--methods", "clip", "--noise", "0.2,x"], "--noise '0.2,x': expected comma-separated float values"),
    (["--methods", "clip", "--seeds", "1.5"], "--seeds '1.5': expected comma-separated int values"),
    (["--methods", "clip,nope"], "unknown method 'nope'"),
    (["--methods", "clip", "--noise", "1"], "--noise must be in [0, 1)"),
    (["--methods", "clip", "--jobs", "0"], "--jobs must be >= 1"),
    (["--methods", "clip", "--launcher", "cloud"], "--launcher 'cloud': unknown; available: local, slurm"),
])
def test_bad_sweep_options_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(_sweep_args(tmp_path / "runs", *args))
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_parse_list_drops_repeats():
    assert sweep.parse_list("0, 0.2,0.2,", float, "--noise") == [0.0, 0.2]
    with pytest.raises(UserError, match="--seeds: expected at least one value"):
        sweep.parse_list(" , ", int, "--seeds")


BROKEN_METHOD = '''
from ncbench.methods.clip import CLIPFineTune


class Broken(CLIPFineTune):
    """A method whose first step fails (for the sweep's failure handling)."""

    name = "broken-step"

    def training_step(self, batch):
        raise RuntimeError("this method always fails")
'''


def test_a_failed_run_does_not_stop_the_sweep(tmp_path, capsys):
    """In-process sweep: the failing run is reported with its log, the done one is skipped, the exit code is 1."""
    plugin = tmp_path / "broken.py"
    plugin.write_text(BROKEN_METHOD)
    done = sweep.expand(["clip"], [0.2], [0], _settings(**MINI))[0]
    _place_record(tmp_path / "runs" / done.run_id)
    with pytest.raises(SystemExit) as exit_:
        main(_sweep_args(tmp_path / "runs", "--methods", "clip,broken-step", "--noise", "0.2", "--seeds", "0",
                         "--plugin", str(plugin)))
    captured = capsys.readouterr()
    assert exit_.value.code == 1
    assert "sweep of 2 runs: 1 already done, 1 ran (0 resumed from a checkpoint), 1 failed" in captured.out
    (failed,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("broken-step")]
    assert "RuntimeError: this method always fails" in captured.err and str(failed / sweep.LOG) in captured.err
    assert "this method always fails" in (failed / sweep.LOG).read_text() and not (failed / RECORD).exists()


def _records(out: Path) -> dict[str, tuple[int, dict]]:
    return {p.parent.name: (p.stat().st_mtime_ns, json.loads(p.read_text())) for p in out.glob(f"*/{RECORD}")}


@pytest.mark.slow
def test_sweep_with_workers_then_everything_is_skipped(cli, tmp_path):
    """Two `ncbench run` worker processes with cores/2 torch threads each; the second sweep and a single run redo
    nothing."""
    out = tmp_path / "runs"
    first = cli(*_sweep_args(out, "--methods", "clip", "--noise", "0,0.2", "--seeds", "0", "--jobs", "2"))
    assert first.returncode == 0, first.stderr
    assert "sweep of 2 runs: 0 already done, 2 ran (0 resumed from a checkpoint), 0 failed" in first.stdout
    records = _records(out)
    jobs = sweep.expand(["clip"], [0.0, 0.2], [0], _settings(**MINI))
    assert sorted(records) == sorted(j.run_id for j in jobs)
    threads = max(1, sweep.cpu_count() // 2)
    assert all(r["environment"]["torch_threads"] == threads for _, r in records.values())
    assert all((out / j.run_id / sweep.LOG).read_text().startswith("== ") for j in jobs)

    again = cli(*_sweep_args(out, "--methods", "clip", "--noise", "0,0.2", "--seeds", "0"))
    assert again.returncode == 0, again.stderr
    assert "sweep of 2 runs: 2 already done, 0 ran (0 resumed from a checkpoint), 0 failed" in again.stdout
    single = cli("run", "--method", "clip", "--noise", "0.2", "--dataset", "synthetic-mini", "--epochs", "1",
                     "--out", str(out))
    assert single.returncode == 0 and jobs[1].run_id in single.stdout.replace("\n", "")
    assert _records(out) == records  # same files, untouched


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint(cli, tmp_path):
    """Kill an in-process sweep after its first epoch's checkpoint; the next sweep reuses that epoch."""
    out = tmp_path / "runs"
    args = _sweep_args(out, "--methods", "clip", "--noise", "0.4", "--seeds", "0", epochs=2)
    (job,) = sweep.expand(["clip"], [0.4], [0], _settings(dataset="synthetic-mini", epochs=2))
    checkpoint = out / job.run_id / CHECKPOINT
    proc = subprocess.Popen([sys.executable, "-m", "ncbench", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (out / job.run_id / RECORD).exists(), "the run was not caught mid-way"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1

    status = cli(*args, "--status")
    assert "incomplete" in status.stdout and job.run_id in status.stdout
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "sweep of 1 run: 0 already done, 1 ran (1 resumed from a checkpoint), 0 failed" in resumed.stdout
    record = json.loads((out / job.run_id / RECORD).read_text())
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert record["epochs"][0] == saved["history"][0]  # the killed process's epoch, timings included
    assert record["zero_shot"] == saved["zero_shot"] and not checkpoint.exists()
