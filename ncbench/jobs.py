"""A sweep's runs as launchers see them: jobs, their state read from their folders, and what a launcher is given.

Shared by the sweep (ncbench/sweep.py) and the launchers that are not part of it (ncbench/slurm.py).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, Sequence

from ncbench import lock
from ncbench.config import RunConfig, RunOptions
from ncbench.results import CHECKPOINT, load_record


class State(str, Enum):
    """Where a run stands, read from its folder (and, for a submitted run, the scheduler's queue)."""

    DONE = "done"  # a complete record exists
    RUNNING = "running"  # held by another process here, or started on a scheduler (slurm)
    QUEUED = "queued"  # submitted to a scheduler, waiting there (slurm)
    FAILED = "failed"  # submitted to a scheduler, gone from its queue without a record (slurm)
    INCOMPLETE = "incomplete"  # a checkpoint but no record: resumes from the checkpoint
    NOT_STARTED = "not started"  # nothing to reuse


def run_state(run_dir: Path) -> State:
    """The state of the run in ``run_dir``."""
    record = load_record(run_dir)
    if record is not None and record.get("status") == "complete":
        return State.DONE
    if lock.is_held(run_dir):
        return State.RUNNING
    return State.INCOMPLETE if (run_dir / CHECKPOINT).is_file() else State.NOT_STARTED


@dataclass(frozen=True)
class Job:
    """One run of a sweep: its resolved config and the ``ncbench run`` arguments that reproduce it."""

    method: str  # as the user named it: registered name or package.module:Class
    flags: dict  # the explicit harness settings given to config.resolve (unset ones are None)
    config: RunConfig
    plugins: tuple[str, ...] = ()  # --plugin files, as absolute paths
    options: RunOptions = RunOptions()  # how the run is watched and what it keeps (not part of its id)

    @property
    def run_id(self) -> str:
        return self.config.run_id

    def argv(self, out_dir: Path, cache_dir: Path) -> list[str]:
        """The ``ncbench run`` command line of this job (the run id it makes is the job's)."""
        args = [sys.executable, "-m", "ncbench", "run", "--method", self.method]
        for name, value in self.flags.items():
            if value is not None:
                args += [f"--{name.replace('_', '-')}", repr(value) if isinstance(value, float) else str(value)]
        for plugin in self.plugins:
            args += ["--plugin", plugin]
        return args + self.options.argv() + ["--out", str(out_dir), "--cache-dir", str(cache_dir)]


class LaunchProgress(Protocol):
    """How a launcher reports each job (the sweep's display)."""

    def started(self, job: Job) -> None: ...

    def finished(self, job: Job, error: str | None) -> None: ...

    def elsewhere(self, job: Job) -> None: ...


@dataclass
class Launch:
    """What a launcher gets besides its jobs."""

    out_dir: Path
    cache_dir: Path
    workers: int  # runs at a time
    progress: LaunchProgress
    options: Any = None  # the launcher's own settings (slurm.Options for slurm)


def statuses(jobs: Sequence[Job], out_dir: Path) -> list[tuple[Job, State]]:
    """Each job with its state as read from its folder."""
    return [(job, run_state(out_dir / job.run_id)) for job in jobs]


def prepare_caches(jobs: Sequence[Job], cache_dir: Path) -> None:
    """Build each dataset's and each embedded backbone's cache once, before parallel workers need them."""
    from ncbench.architecture import input_size
    from ncbench.backbone import load_backbone
    from ncbench.registry import DATASETS

    for model, pretrained in dict.fromkeys((j.config.model, j.config.pretrained) for j in jobs):
        load_backbone(model, pretrained, cache_dir)
    for dataset, root, model in dict.fromkeys((j.config.dataset, j.config.data_root, j.config.model) for j in jobs):
        DATASETS.get(dataset)().load(Path(root) if root else None, cache_dir, input_size(model))
