"""The slurm launcher against a real single-node Slurm cluster started for these tests (tests/slurm_cluster.py):
one job array for the runs without a record, status from the results folder and the queue, a cancelled array
resubmitted for its missing runs only, and a preempted job requeued and resumed from its checkpoint.

The cluster tests need submitit (``pip install ncbench[slurm]``) and are slow (``-m slow``): starting the cluster,
and installing Slurm with apt-get where it is absent, takes minutes. The launcher's option checks run without them."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import torch

from ncbench import slurm, sweep
from ncbench.cli import main
from ncbench.results import CHECKPOINT, RECORD, write_json_atomic

CACHE = os.environ["NCBENCH_CACHE"]
SETTINGS = {"noise_protocol": None, "dataset": "synthetic-mini", "data_root": None, "epochs": 1, "batch_size": None,
            "lr": None, "model": None, "pretrained": None, "selection": None, "preset": None}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A private Slurm cluster on this host (installed with apt-get if absent), stopped after the module."""
    pytest.importorskip("submitit", reason="the slurm launcher needs submitit: pip install ncbench[slurm]")
    why = slurm_cluster.unavailable()
    if why:
        pytest.skip(why)
    slurm_cluster.install()
    cluster = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    """Slurm's commands in this process and its children go to the test cluster."""
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    return cluster


def _sweep_args(out: Path, noise: str, *extra: str, epochs: int = 1) -> list[str]:
    return ["sweep", "--launcher", "slurm", "--methods", "clip", "--noise", noise, "--seeds", "0", "--dataset",
            "synthetic-mini", "--epochs", str(epochs), "--out", str(out), "--cache-dir", CACHE, *extra]


def _start_sweep(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ncbench", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _until(condition, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_cancelled_array_is_resubmitted_for_its_missing_runs_only(on_cluster, cli, capsys, tmp_path):
    """Three runs one at a time: after the first record the status reads done / running / queued; scancel ends the
    array (the waiting sweep reports two failed runs) and the same sweep again submits an array of those two only."""
    out = tmp_path / "runs"
    jobs = sweep.expand(["clip"], [0.0, 0.2, 0.4], [0], SETTINGS)
    first = _start_sweep(_sweep_args(out, "0,0.2,0.4", "--array-parallelism", "1", "--gpus-per-run", "0"))
    _until(lambda: (out / jobs[0].run_id / RECORD).exists() or first.poll() is not None, what="the first record")
    _until(lambda: [state for _, state in slurm.statuses(jobs, out)] == [sweep.State.DONE, sweep.State.RUNNING,
                                                                          sweep.State.QUEUED],
           timeout=60, what="done / running / queued")
    array = slurm.submitted(out)[jobs[0].run_id].split("_")[0]
    assert on_cluster.run("scancel", array).returncode == 0
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 1, stderr
    assert f"submitted 3 runs as Slurm job array {array} (default partition, CPU only, 240 min per job, at most 1 at " \
           "a time)" in stderr
    assert "--gpus-per-node" not in (out / slurm.FOLDER / f"{array}_submission.sh").read_text()
    assert "sweep of 3 runs: 0 already done, 3 ran (0 resumed from a checkpoint), 2 failed" in stdout
    assert f"failed {jobs[1].run_id}: left the queue without a record" in stderr
    main([*_sweep_args(out, "0,0.2,0.4"), "--status"])
    assert "1 done, 2 failed" in capsys.readouterr().out.splitlines()
    done = (out / jobs[0].run_id / RECORD).stat().st_mtime_ns

    again = cli(*_sweep_args(out, "0,0.2,0.4", "--array-parallelism", "2"))
    assert again.returncode == 0, again.stderr
    assert "sweep of 3 runs: 1 already done, 2 ran (0 resumed from a checkpoint), 0 failed" in again.stdout
    resubmitted = slurm.submitted(out)
    second = resubmitted[jobs[1].run_id].split("_")[0]
    assert second != array and f"submitted 2 runs as Slurm job array {second}" in again.stderr
    assert sorted(resubmitted.values()) == [f"{array}_0", f"{second}_0", f"{second}_1"]
    script = (out / slurm.FOLDER / f"{second}_submission.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --gpus-per-node=1" in script
    assert (out / jobs[0].run_id / RECORD).stat().st_mtime_ns == done  # the done run was not touched
    assert [state for _, state in slurm.statuses(jobs, out)] == [sweep.State.DONE] * 3


@pytest.mark.slow
def test_a_preempted_two_gpu_run_is_requeued_and_resumes_from_its_checkpoint(on_cluster, tmp_path):
    """A run on 2 (stand-in) GPUs is two DDP processes, the job's tasks. USR2 is the signal Slurm sends before a
    time limit or a preemption: submitit checkpoints the task and requeues the job, which resumes the run from the
    epoch it had finished."""
    out = tmp_path / "runs"
    (job,) = sweep.expand(["clip"], [0.4], [0], {**SETTINGS, "epochs": 2})
    run = _start_sweep(_sweep_args(out, "0.4", "--gpus-per-run", "2", epochs=2))
    checkpoint = out / job.run_id / CHECKPOINT
    _until(lambda: checkpoint.exists() or run.poll() is not None, what="the first epoch's checkpoint")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    job_id = slurm.submitted(out)[job.run_id]
    assert on_cluster.run("scancel", "--signal=USR2", job_id).returncode == 0
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    assert "sweep of 1 run: 0 already done, 1 ran (0 resumed from a checkpoint), 0 failed" in stdout
    assert f"submitted 1 run as Slurm job {job_id} (default partition, 2 GPUs per run" in stderr
    log = (out / slurm.FOLDER / f"{job_id}_0_log.out").read_text()
    assert "this job is preempted" in log and f"Requeued job {job_id}" in log, log
    record = json.loads((out / job.run_id / RECORD).read_text())
    assert saved["epoch"] == 1 and [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert record["epochs"][0] == saved["history"][0]  # epoch 1 came from before the preemption, timings included
    assert record["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch": 128, "batch_per_process": 64}
    assert not checkpoint.exists()


@pytest.mark.slow
def test_a_run_still_in_the_queue_is_not_submitted_twice(on_cluster, capsys, tmp_path):
    """A run whose earlier job is still queued is followed, not resubmitted (two jobs would share one run folder)."""
    out = tmp_path / "runs"
    (job,) = sweep.expand(["clip"], [0.2], [0], SETTINGS)
    earlier = on_cluster.run("sbatch", "--parsable", "--begin=now+5", "--output=/dev/null", "--wrap",
                             "true").stdout.strip()
    (out / slurm.FOLDER).mkdir(parents=True)
    write_json_atomic(out / slurm.FOLDER / slurm.JOBS, {job.run_id: earlier})
    with pytest.raises(SystemExit) as exit_:
        main(_sweep_args(out, "0.2"))
    stderr = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "still in the queue from an earlier submission, not submitted again: 1 of 1 runs" in stderr
    assert f"failed {job.run_id}: left the queue without a record" in stderr  # `true` wrote none
    assert slurm.submitted(out) == {job.run_id: earlier} and not list((out / slurm.FOLDER).glob("*.sh"))


@pytest.mark.parametrize("args, message", [
    (["--partition", "gpu"], "--partition: only with --launcher slurm"),
    (["--gpus-per-run", "2"], "--gpus-per-run: only with --launcher slurm (on one machine: torchrun"),
    (["--launcher", "slurm", "--jobs", "2"], "--jobs: only with --launcher local; with slurm, --array-parallelism"),
    (["--launcher", "slurm", "--gpus-per-run", "-1"], "--gpus-per-run must be >= 0, got -1"),
    (["--launcher", "slurm", "--time", "0"], "--time must be >= 1 (minutes), got 0"),
    (["--launcher", "slurm", "--array-parallelism", "0"], "--array-parallelism must be >= 1, got 0"),
])
def test_bad_launcher_options_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--methods", "clip", "--dataset", "synthetic-mini", "--out", str(tmp_path / "runs"), *args])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sbatch_refusing_the_array_is_one_line(on_cluster, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(_sweep_args(tmp_path / "runs", "0.2", "--partition", "nope"))
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "error: --launcher slurm: sbatch refused the jobs (" in stderr and "nvalid partition" in stderr
