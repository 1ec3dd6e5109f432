"""One process per run: an exclusive file lock held while a run trains, so that two sweeps sharing an output
folder run each run once. The lock files live in ``<out>/.locks/`` (the run folder is made only once a run
is known to be runnable); the operating system releases a lock when its process dies, so a killed run never
leaves a stale one."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from ncbench.errors import UserError

LOCKS = ".locks"
RUN_LOCKED_EXIT = 75  # exit code of `ncbench run` when another process holds the run (EX_TEMPFAIL)


class RunLocked(UserError):
    """The run is being trained by another process."""


class FinishedElsewhere(RunLocked):
    """Another process finished the run between this process's first look and its taking the lock."""


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / LOCKS / f"{run_dir.name}.lock"


@contextmanager
def hold(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the run's lock for the block; :class:`RunLocked` at once if another process holds it."""
    if not enabled:
        yield
        return
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunLocked(f"run {run_dir.name} is running in another process (lock {path})") from None
    try:
        yield
    finally:
        lock.release()


def is_held(run_dir: Path) -> bool:
    """Whether another process holds the run's lock now."""
    path = lock_path(run_dir)
    if not path.is_file():
        return False
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False
