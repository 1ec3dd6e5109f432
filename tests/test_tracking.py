"""``ncbench.tracking``: TensorBoard event files and an MLflow file store, written and read back with their own readers."""
from __future__ import annotations

import sys

import pytest

from ncbench.errors import UserError
from ncbench.tracking import MLFLOW_RUN_FILE, check_tracker, open_tracker

CONFIG = {"method": "clip", "params": {"tau": 0.05}, "lr": 0.0005, "dataset": "synthetic-mini", "seed": 0}
TEST = {"1k": {"rsum": 312.5, "i2t_r1": 40.0}}


def log_a_run(kind: str, run_dir, resumed_steps=0, steps=range(1, 11), finish=True):
    with open_tracker(kind, run_dir, CONFIG, resumed_steps=resumed_steps) as tracker:
        for step in steps:
            tracker.step(step, {"loss": 1.0 / step, "lr": 1e-4})
        tracker.epoch(1, {"dev": {"rsum": 250.0}, "detection": {"auroc": 0.9, "ap": None}, "losses": {"loss": 0.5}})
        if finish:
            tracker.finish(TEST)


def scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "runs" / "clip_x"
    log_a_run("tensorboard", run_dir)
    got = scalars(run_dir)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 11)) and got["train/loss"][1][1] == pytest.approx(0.5)
    assert got["epoch/dev/rsum"] == [(1, 250.0)] and got["epoch/detection/auroc"][0][1] == pytest.approx(0.9)
    assert "epoch/detection/ap" not in got  # None (undefined) is not logged
    assert got["test/1k/rsum"] == [(1, 312.5)]


def test_tensorboard_resume_drops_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "clip_x"
    log_a_run("tensorboard", run_dir, finish=False)  # interrupted after step 10
    log_a_run("tensorboard", run_dir, resumed_steps=4, steps=range(5, 8))  # resumed from the checkpoint at step 4
    losses = scalars(run_dir)["train/loss"]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6, 7]


def test_mlflow_file_store_read_back_and_resumed(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "runs" / "clip_x"
    with pytest.raises(RuntimeError):
        with open_tracker("mlflow", run_dir, CONFIG) as tracker:
            tracker.step(1, {"loss": 2.0})
            raise RuntimeError("the run crashed")
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    run_id = (run_dir / MLFLOW_RUN_FILE).read_text()
    assert client.get_run(run_id).info.status == "FAILED"
    log_a_run("mlflow", run_dir)  # resumed: the same MLflow run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "clip_x"
    assert run.data.params["params.tau"] == "0.05" and run.data.params["method"] == "clip"
    assert run.data.metrics["test/1k/rsum"] == 312.5 and "epoch/detection/ap" not in run.data.metrics
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, *range(1, 11)]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "ncbench" and len(client.search_runs([experiment.experiment_id])) == 1


def test_mlflow_tracking_uri_is_honoured(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "elsewhere").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    log_a_run("mlflow", tmp_path / "runs" / "clip_x")
    client = MlflowClient(tracking_uri=(tmp_path / "elsewhere").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert run.data.metrics["epoch/dev/rsum"] == 250.0 and not (tmp_path / "runs" / "mlruns").exists()


def test_no_tracker_and_bad_kinds(tmp_path, monkeypatch):
    with open_tracker(None, tmp_path, CONFIG) as tracker:
        tracker.step(1, {"loss": 1.0})
        tracker.finish(TEST)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="--log wandb: expected one of tensorboard, mlflow"):
        open_tracker("wandb", tmp_path, CONFIG)
    for kind, module in (("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")):
        monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
        with pytest.raises(UserError, match=rf"--log {kind} needs the {kind} package: pip install 'ncbench\[{kind}\]'"):
            check_tracker(kind)
        with pytest.raises(UserError, match=rf"pip install 'ncbench\[{kind}\]'"):
            open_tracker(kind, tmp_path, CONFIG)
