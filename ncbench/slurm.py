"""The ``slurm`` launcher: a sweep's runs without a record become one Slurm job array, submitted through submitit
(the ``ncbench[slurm]`` extra); and the state of submitted runs, read from the results folder and the queue.

A preempted job, or one that reaches its time limit, is requeued by submitit and its run resumes from its last
epoch checkpoint. The job id of each submitted run is kept in ``<out>/.slurm/jobs.json`` (written atomically),
beside submitit's pickles and logs. The results folder stays the truth: a run with a record is done; the queue
only tells whether a run without one is queued, running, or gone from the queue (failed).
"""
from __future__ import annotations

import contextlib
import getpass
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ncbench.errors import UserError
from ncbench.jobs import Job, Launch, State, prepare_caches, run_state
from ncbench.jobs import statuses as folder_statuses
from ncbench.progress import console
from ncbench.results import write_json_atomic

FOLDER = ".slurm"  # in the results folder: the job ids, submitit's pickles and logs (ignored by git)
JOBS = "jobs.json"
MAX_TIMEOUTS = 10  # requeues after reaching --time before submitit gives a run up (preemptions do not count)
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED"}  # else queued
POLL_S = (1.0, 30.0)  # squeue every 1 s after a change, backing off to every 30 s while nothing moves


@dataclass(frozen=True)
class Options:
    """The Slurm settings of a sweep's jobs."""

    partition: str | None = None  # None: the cluster's default partition
    gpus_per_run: int = 1  # GPUs, and processes, of one run (on one node); 0: a CPU-only run
    time_min: int = 240  # each job's time limit; a run that needs longer is requeued and resumes
    array_parallelism: int | None = None  # runs at a time; None: submitit's default (256)

    def __post_init__(self) -> None:
        if self.gpus_per_run < 0:
            raise UserError(f"--gpus-per-run must be >= 0, got {self.gpus_per_run}")
        if self.time_min < 1:
            raise UserError(f"--time must be >= 1 (minutes), got {self.time_min}")
        if self.array_parallelism is not None and self.array_parallelism < 1:
            raise UserError(f"--array-parallelism must be >= 1, got {self.array_parallelism}")


class RunTask:
    """One run inside a Slurm job (submitit pickles it); with several GPUs each of the job's tasks is one process."""

    def __init__(self, job: Job, out_dir: Path, cache_dir: Path):
        self.job, self.out_dir, self.cache_dir = job, out_dir, cache_dir

    def __call__(self) -> str:
        import submitit

        from ncbench import harness
        from ncbench.registry import METHODS, load_plugin_file

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # the variables torchrun would set; ncbench.distributed reads them
            os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
                              MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000))
        for plugin in self.job.plugins:
            load_plugin_file(Path(plugin))
        METHODS.get(self.job.method)  # registers a package.module:Class method under its name
        harness.run(self.job.config, self.out_dir, self.cache_dir, self.job.options)
        return self.job.run_id

    def checkpoint(self):
        """Called by submitit on preemption or time-out: requeue this run, which resumes from its checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def submit_and_wait(jobs: Sequence[Job], launch: Launch) -> None:
    """Submit the jobs not already in the queue as one job array, then follow every job until it leaves the queue."""
    options = launch.options or Options()
    _require("sbatch", "--launcher slurm")
    ids = submitted(launch.out_dir)
    in_queue = queue()
    new = [job for job in jobs if ids.get(job.run_id) not in in_queue]
    if len(new) < len(jobs):
        console.print(f"still in the queue from an earlier submission, not submitted again: {len(jobs) - len(new)} of "
                      f"{len(jobs)} runs", highlight=False)
    if new:
        prepare_caches(new, launch.cache_dir)  # once here, not once per job at the same time
        ids.update(_submit(new, launch, options))
        write_json_atomic(launch.out_dir / FOLDER / JOBS, ids)
        kind = "job array" if len(new) > 1 else "job"
        console.print(f"submitted {len(new)} run{'s' if len(new) > 1 else ''} as Slurm {kind} "
                      f"{ids[new[0].run_id].partition('_')[0]} ({_describe(options)}); waiting for them "
                      "(Ctrl-C stops waiting, not the jobs; `--status` follows them)", highlight=False, soft_wrap=True)
    _wait(jobs, ids, launch)


def _submit(jobs: Sequence[Job], launch: Launch, options: Options) -> dict[str, str]:
    """Run id -> Slurm job id (``<array>_<index>``, or a plain id for a single run)."""
    submitit = _submitit()
    from submitit.core.utils import FailedJobError

    executor = submitit.SlurmExecutor(folder=launch.out_dir / FOLDER, max_num_timeout=MAX_TIMEOUTS)
    tasks = max(1, options.gpus_per_run)
    params = {"job_name": "ncbench", "time": options.time_min, "nodes": 1, "ntasks_per_node": tasks}
    if options.gpus_per_run:
        params["gpus_per_node"] = options.gpus_per_run
    if options.partition:
        params["partition"] = options.partition
    if options.array_parallelism:
        params["array_parallelism"] = options.array_parallelism
    executor.update_parameters(**params)
    try:
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():  # submitit echoes sbatch's errors
            handles = [executor.submit(RunTask(job, launch.out_dir, launch.cache_dir)) for job in jobs]
    except FailedJobError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise UserError(f"--launcher slurm: sbatch refused the jobs ({lines[-1] if lines else 'no message'})") from None
    return {job.run_id: handle.job_id for job, handle in zip(jobs, handles)}


def _describe(options: Options) -> str:
    parts = [f"partition {options.partition}" if options.partition else "default partition",
             f"{options.gpus_per_run} GPU{'s' if options.gpus_per_run != 1 else ''} per run" if options.gpus_per_run
             else "CPU only",
             f"{options.time_min} min per job"]
    if options.array_parallelism:
        parts.append(f"at most {options.array_parallelism} at a time")
    return ", ".join(parts)


def _wait(jobs: Sequence[Job], ids: dict[str, str], launch: Launch) -> None:
    """Report each job as it starts and as it leaves the queue; whether it succeeded is read from its folder."""
    pending, started = {job.run_id: job for job in jobs}, set()
    delay = POLL_S[0]
    while pending:
        in_queue, moved = queue(), False
        for run_id, job in list(pending.items()):
            state = in_queue.get(ids[run_id])
            if run_id not in started and (state is None or state in RUNNING):
                launch.progress.started(job)
                started.add(run_id)
                moved = True
            if state is None:
                done = run_state(launch.out_dir / run_id) is State.DONE
                launch.progress.finished(job, None if done else "left the queue without a record "
                                         f"(log: {launch.out_dir / FOLDER / f'{ids[run_id]}_0_log.err'})")
                del pending[run_id]
                moved = True
        if pending:
            time.sleep(delay)
            delay = POLL_S[0] if moved else min(delay * 1.5, POLL_S[1])


def statuses(jobs: Sequence[Job], out_dir: Path) -> list[tuple[Job, State]]:
    """Each run's state: done from its record; queued or running from the queue; failed when it was submitted and
    left the queue without a record; otherwise its folder's state (never submitted)."""
    ids = submitted(out_dir)
    in_queue = queue() if any(job.run_id in ids for job in jobs) else {}
    out = []
    for job, state in folder_statuses(jobs, out_dir):
        if state is not State.DONE and job.run_id in ids:
            queued = in_queue.get(ids[job.run_id])
            state = State.FAILED if queued is None else State.RUNNING if queued in RUNNING else State.QUEUED
        out.append((job, state))
    return out


def submitted(out_dir: Path) -> dict[str, str]:
    """Run id -> the Slurm job id it was last submitted as, from ``<out>/.slurm/jobs.json``."""
    path = out_dir / FOLDER / JOBS
    return json.loads(path.read_text()) if path.is_file() else {}


def queue() -> dict[str, str]:
    """Job id -> state (``PENDING``, ``RUNNING``, ...) of this user's jobs in the Slurm queue, array tasks one by one."""
    _require("squeue", "--launcher slurm")
    proc = subprocess.run(["squeue", f"--user={getpass.getuser()}", "--noheader", "--array", "--format=%i %T"],
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["no message"]
        raise UserError(f"--launcher slurm: squeue failed ({lines[-1]})")
    return dict(line.split() for line in proc.stdout.splitlines() if line.strip())


def _require(command: str, flag: str) -> None:
    if shutil.which(command) is None:
        raise UserError(f"{flag}: {command} not found; run this where Slurm's commands are (a login node)")


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher slurm needs submitit: pip install 'ncbench[slurm]'") from None
    return submitit
