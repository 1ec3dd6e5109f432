"""Live run tracking for ``ncbench run/sweep --log tensorboard|mlflow``: the harness reports, a tracker writes.

The harness calls, for one run (``run_dir`` = ``<out>/<run-id>``)::

    check_tracker(kind)                                              # before any data is read: kind, package
    with open_tracker(kind, run_dir, record_config, resumed_steps=steps_done) as tracker:
        tracker.step(global_step, {"loss": ..., "lr": ...})         # every few optimiser steps
        tracker.epoch(epoch, {"dev": {...}, "detection": {...}})    # after each epoch's dev evaluation
        tracker.finish({"1k": {"rsum": ..., ...}})                  # the record's test metrics

Nested dicts are flattened with ``/`` (``dev/rsum``), so TensorBoard groups them; a None, nan or infinite value
(AUROC on clean data) is not logged. ``kind`` None is a no-op tracker. TensorBoard event files go to
``<run_dir>/tensorboard/``; MLflow logs to ``MLFLOW_TRACKING_URI`` if set, else to the file store ``<out>/mlruns``,
experiment ``MLFLOW_EXPERIMENT_NAME`` or ``ncbench``, one MLflow run per ncbench run (a resumed run continues it).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from ncbench.errors import UserError

KINDS = ("tensorboard", "mlflow")
MLFLOW_RUN_FILE = "mlflow_run_id"  # beside the record: the MLflow run a resumed ncbench run continues
MLFLOW_EXPERIMENT = "ncbench"


def flatten(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(name, value)`` of every finite number in ``values``, nested keys joined with ``/``."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield name, float(value)


class Tracker:
    """No tracking; the base of the real trackers, and a context manager that closes them."""

    def step(self, global_step: int, values: Mapping[str, Any]) -> None:
        """Training values (losses, learning rate) at optimiser step ``global_step`` (from 1)."""

    def epoch(self, epoch: int, values: Mapping[str, Any]) -> None:
        """Values at the end of ``epoch`` (1-based): dev metrics, detection metrics, epoch means."""

    def finish(self, test: Mapping[str, Mapping[str, float]]) -> None:
        """The test metrics of the selected models, per protocol; marks the run as complete."""

    def close(self, failed: bool = False) -> None:
        """Flush and release; a run closed without :meth:`finish` is marked failed (MLflow) when ``failed``."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


class TensorBoardTracker(Tracker):
    """Event files under ``<run_dir>/tensorboard/``, read by ``tensorboard --logdir <out>``."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter  # open_tracker checked it is installed

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge_step)
        self.last_epoch = 0
        if not purge_step:
            self.writer.add_text("config", f"```\n{json.dumps(dict(config), indent=2, default=str)}\n```", 0)

    def step(self, global_step: int, values: Mapping[str, Any]) -> None:
        for name, value in flatten(values, "train/"):
            self.writer.add_scalar(name, value, global_step)

    def epoch(self, epoch: int, values: Mapping[str, Any]) -> None:
        self.last_epoch = epoch
        for name, value in flatten(values, "epoch/"):
            self.writer.add_scalar(name, value, epoch)
        self.writer.flush()

    def finish(self, test: Mapping[str, Mapping[str, float]]) -> None:
        for name, value in flatten(test, "test/"):
            self.writer.add_scalar(name, value, self.last_epoch)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """One MLflow run per ncbench run, through ``MlflowClient`` (no global active run, safe beside other code)."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]):
        from mlflow import MlflowClient  # open_tracker checked it is installed

        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri(Path(run_dir).parent)
        self.client, self.finished, self.last_epoch = MlflowClient(tracking_uri=uri), False, 0
        id_file = Path(run_dir) / MLFLOW_RUN_FILE
        if id_file.is_file():  # a resumed run: log into the MLflow run it started
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=Path(run_dir).name, tags={"ncbench.run_id": Path(run_dir).name})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in _flat_params(config)]
        for lo in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[lo:lo + 100])
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id)

    def _log(self, values: Mapping[str, Any], prefix: str, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in flatten(values, prefix)]
        for lo in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[lo:lo + 1000])

    def step(self, global_step: int, values: Mapping[str, Any]) -> None:
        self._log(values, "train/", global_step)

    def epoch(self, epoch: int, values: Mapping[str, Any]) -> None:
        self.last_epoch = epoch
        self._log(values, "epoch/", epoch)

    def finish(self, test: Mapping[str, Mapping[str, float]]) -> None:
        self._log(test, "test/", self.last_epoch)
        self.finished = True

    def close(self, failed: bool = False) -> None:
        status = "FINISHED" if self.finished else "FAILED" if failed else "KILLED"
        self.client.set_terminated(self.run_id, status=status)


def default_mlflow_uri(out_root: Path) -> str:
    """``<out>/mlruns`` as an MLflow file store. MLflow 3 keeps that backend in maintenance and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE`` is true, which is set here (for this default only): a folder per run needs no server
    or database and takes parallel sweep workers."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path(out_root) / "mlruns").resolve().as_uri()


def _flat_params(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of the run's config, nested keys joined with ``.`` (``params.tau``)."""
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            yield from _flat_params(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_tracker(kind: str | None) -> None:
    """Refuse, in one line, an unknown ``--log`` kind or one whose package is not installed."""
    if kind is None:
        return
    if kind not in KINDS:
        raise UserError(f"--log {kind}: expected one of {', '.join(KINDS)}")
    try:
        __import__("torch.utils.tensorboard" if kind == "tensorboard" else "mlflow")
    except ImportError:
        raise UserError(f"--log {kind} needs the {kind} package: pip install 'ncbench[{kind}]'") from None


def open_tracker(kind: str | None, run_dir: Path, config: Mapping[str, Any], resumed_steps: int = 0) -> Tracker:
    """The tracker of ``--log kind`` for the run in ``run_dir``; ``config`` is logged as its parameters.
    ``resumed_steps``: the optimiser steps a resumed run had done at its checkpoint (TensorBoard drops what an
    interrupted process logged after them; MLflow keeps every value, so redone steps appear twice in its history)."""
    check_tracker(kind)
    if kind is None:
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, config, resumed_steps + 1 if resumed_steps else None)
    return MLflowTracker(run_dir, config)
