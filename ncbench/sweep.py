"""Sweeps: a grid of runs (method × noise ratio × seed), each run's state read from its folder, and launchers.

A run is named by its config's run id exactly as ``ncbench run`` names it (both go through
:func:`ncbench.config.resolve`), so a sweep and single runs share records. A run whose record exists is
done and skipped; a run folder with a checkpoint but no record is incomplete and resumes from that
checkpoint (the harness does this at epoch granularity); anything else has not started.

A launcher is a plain function ``launcher(jobs, launch)`` in :data:`LAUNCHERS`: it runs every job, calling
``launch.progress.started(job)`` and ``launch.progress.finished(job, error)`` around each. Success is
read afterwards from the run folders, not taken from the launcher. ``local`` runs here; ``slurm``
(ncbench/slurm.py) submits a job array and follows it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ncbench import config
from ncbench.config import RunOptions
from ncbench.errors import UserError
from ncbench.jobs import Job, Launch, State, prepare_caches, run_state, statuses
from ncbench.lock import RUN_LOCKED_EXIT, RunLocked
from ncbench.progress import console
from ncbench.registry import METHODS

LOG = "run.log"  # a worker's stdout and stderr, beside its run (ignored by git)


def expand(methods: Sequence[str], noise: Sequence[float], seeds: Sequence[int], settings: dict,
           plugins: Sequence[Path] = (), options: RunOptions = RunOptions()) -> list[Job]:
    """The grid ``methods × noise × seeds`` in that order, each run resolved as ``ncbench run`` resolves it.

    ``settings`` are the other harness flags, shared by every run (unset ones ``None``); a run named twice
    (the same run id) appears once.
    """
    from ncbench.registry import DATASETS

    jobs: dict[str, Job] = {}
    for method in methods:
        method_cls = METHODS.get(method)
        for ratio in noise:
            for seed in seeds:
                flags = {"noise": float(ratio), "seed": int(seed), **settings}
                job = Job(method, flags, config.resolve(method_cls, flags),
                          tuple(str(Path(p).resolve()) for p in plugins), options)
                DATASETS.get(job.config.dataset).check_run(Path(job.config.data_root) if job.config.data_root else None,
                                                           job.config.noise)
                jobs.setdefault(job.run_id, job)
    return list(jobs.values())


def parse_list(text: str, kind: type, flag: str) -> list:
    """``"a,b,c"`` as a list of ``kind``; a one-line error naming ``flag`` otherwise."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = [kind(item) for item in items]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values") from None
    if not values:
        raise UserError(f"{flag}: expected at least one value")
    return list(dict.fromkeys(values))


class SweepProgress:
    """One display for the whole sweep: runs done / total and the runs in flight (a rich live display on a
    terminal, one plain line per event otherwise). Epoch bars of in-process runs nest under it."""

    def __init__(self, total: int, done: int):
        self.interactive = console.is_terminal
        self.total, self.done = total, done
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                                 TimeElapsedColumn(), console=console, disable=not self.interactive)
        self.overall = self.progress.add_task("[bold]sweep", total=total, completed=done, count=f"{done}/{total} runs")
        self.current: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.held: set[str] = set()  # runs another process was running

    def __enter__(self) -> "SweepProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def started(self, job: Job) -> None:
        self.current[job.run_id] = self.progress.add_task(f"  {job.run_id}", total=None, count="running")
        if not self.interactive:
            console.print(f"start  {job.run_id}", highlight=False, soft_wrap=True)

    def elsewhere(self, job: Job) -> None:
        """``job`` is being (or was just) run by another process, another sweep on this folder: not run here."""
        self.progress.remove_task(self.current.pop(job.run_id))
        self.held.add(job.run_id)
        console.print(f"held   {job.run_id}: run by another process", highlight=False, soft_wrap=True)

    def finished(self, job: Job, error: str | None) -> None:
        self.progress.remove_task(self.current.pop(job.run_id))
        self.done += 1
        self.progress.update(self.overall, completed=self.done, count=f"{self.done}/{self.total} runs")
        if error:
            self.errors[job.run_id] = error
        console.print(f"failed {job.run_id}: {error}" if error else f"done   {job.run_id}", highlight=False,
                      soft_wrap=True)


Launcher = Callable[[Sequence[Job], Launch], None]


def local(jobs: Sequence[Job], launch: Launch) -> None:
    """Run on this machine: one at a time in this process, or ``workers`` ``ncbench run`` subprocesses, each
    with cores / workers torch threads and its output in ``<run>/run.log``."""
    if launch.workers == 1:
        _in_process(jobs, launch)
    else:
        _subprocesses(jobs, launch)


def slurm(jobs: Sequence[Job], launch: Launch) -> None:
    """Submit to Slurm as one job array through submitit and follow it (ncbench/slurm.py)."""
    from ncbench import slurm as slurm_launcher

    slurm_launcher.submit_and_wait(jobs, launch)


LAUNCHERS: dict[str, Launcher] = {"local": local, "slurm": slurm}


def _in_process(jobs: Sequence[Job], launch: Launch) -> None:
    from ncbench import harness

    for job in jobs:
        launch.progress.started(job)
        if run_state(launch.out_dir / job.run_id) is State.DONE:  # another sweep on this folder ran it meanwhile
            launch.progress.elsewhere(job)
            continue
        error = None
        try:
            harness.run(job.config, launch.out_dir, launch.cache_dir, job.options)
        except RunLocked:
            launch.progress.elsewhere(job)
            continue
        except Exception as e:  # one failed run must not stop the sweep; its traceback goes to its log
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            run_dir = launch.out_dir / job.run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / LOG, "a") as log:
                log.write(f"== {datetime.now().isoformat(timespec='seconds')} in-process run failed\n")
                log.write(traceback.format_exc())
            error += f" (log: {run_dir / LOG})"
        launch.progress.finished(job, error)


def _subprocesses(jobs: Sequence[Job], launch: Launch) -> None:
    threads = str(max(1, cpu_count() // launch.workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    prepare_caches(jobs, launch.cache_dir)  # once here, not once per worker at the same time
    pending, running = list(jobs), {}
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if main_thread else None  # SIGTERM stops the workers too
    try:
        while pending or running:
            while pending and len(running) < launch.workers:
                job = pending.pop(0)
                if run_state(launch.out_dir / job.run_id) is State.DONE:  # another sweep ran it meanwhile
                    launch.progress.started(job)
                    launch.progress.elsewhere(job)
                    continue
                run_dir = launch.out_dir / job.run_id
                run_dir.mkdir(parents=True, exist_ok=True)
                argv = job.argv(launch.out_dir, launch.cache_dir)
                log = open(run_dir / LOG, "a")
                log.write(f"== {datetime.now().isoformat(timespec='seconds')} {' '.join(argv)}\n")
                log.flush()
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                running[proc] = (job, log)
                launch.progress.started(job)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                job, log = running.pop(proc)
                log.close()
                error = None
                if proc.returncode == RUN_LOCKED_EXIT:
                    launch.progress.elsewhere(job)
                    continue
                if proc.returncode != 0:
                    error = f"exit code {proc.returncode}: {_last_line(Path(log.name))} (log: {log.name})"
                launch.progress.finished(job, error)
    finally:
        for proc, (_, log) in running.items():  # interrupted: stop the workers this sweep started
            proc.terminate()
            proc.wait()
            log.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_signal(signum: int, frame) -> None:
    sys.exit(128 + signum)


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def cpu_count() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Summary:
    """What a sweep did."""

    total: int
    skipped: int  # already done
    resumed: int  # were incomplete when the sweep began
    ran: int
    failed: dict[str, str] = field(default_factory=dict)  # run id -> why
    elsewhere: int = 0  # held by another process (another sweep on the same folder) when their turn came


def sweep(jobs: Sequence[Job], out_dir: Path, cache_dir: Path, workers: int = 1, launcher: str = "local",
          options: Any = None) -> Summary:
    """Run every job not yet done with the named launcher (``options``: its own settings); returns what happened."""
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher {launcher!r}: unknown; available: {', '.join(LAUNCHERS)}")
    if workers < 1:
        raise UserError(f"--jobs must be >= 1, got {workers}")
    states = statuses(jobs, out_dir)
    todo = [job for job, state in states if state is not State.DONE]
    resumed = sum(state is State.INCOMPLETE for _, state in states)
    with SweepProgress(len(jobs), len(jobs) - len(todo)) as progress:
        if todo:
            LAUNCHERS[launcher](todo, Launch(out_dir, cache_dir, min(workers, len(todo)), progress, options))
    failed = dict(progress.errors)
    for job in todo:
        if (job.run_id not in failed and job.run_id not in progress.held
                and run_state(out_dir / job.run_id) is not State.DONE):
            failed[job.run_id] = f"finished without a record in {out_dir / job.run_id}"
    held = len(progress.held)
    return Summary(len(jobs), len(jobs) - len(todo), resumed, len(todo) - held, failed, held)
