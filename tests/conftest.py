"""Shared fixtures: a session cache with a tiny, fast pretraining (tests check mechanics, not accuracy), and the
``ncbench`` command line in this process (``cli``) or as a real process (``ncbench``)."""
import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("NCBENCH_CACHE", str(Path(__file__).resolve().parents[1] / ".ncbench-cache"))
os.environ["NCBENCH_PRETRAIN_IMAGES"] = "2000"
os.environ["NCBENCH_PRETRAIN_EPOCHS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread per process avoids oversubscribing the cores


def ncbench(*args: str, cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real ``ncbench`` command line in a subprocess (``env``: variables to add or override)."""
    return subprocess.run([sys.executable, "-m", "ncbench", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


@dataclass
class Result:
    """What an in-process ``ncbench`` call left: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    """Run ``ncbench args`` through its entry point ``ncbench.cli.main`` in this process, capturing what it prints.
    ``env``: variables set for the call only; a ``PYTHONPATH`` there also goes on ``sys.path``, as a new process
    would see it."""
    from ncbench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
        for key, value in (env or {}).items():
            patch.setenv(key, value)
            if key == "PYTHONPATH":
                patch.syspath_prepend(value)
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    """:func:`invoke`: the command line in this process."""
    return invoke


RUN_FLAGS = ("--dataset", "synthetic-mini", "--epochs", "1", "--noise", "0.4", "--lr", "2e-3", "--batch-size", "128",
             "--cache-dir", os.environ["NCBENCH_CACHE"])
CLIP_RUN = ("run", "--method", "clip", *RUN_FLAGS)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NCR_ABLATION_PLUGIN = EXAMPLES / "ablations" / "ncr_labeled_only.py"  # ncr less its co-guessed term


@pytest.fixture(scope="session")
def clip_run(tmp_path_factory) -> tuple[Path, Result]:
    """``ncbench run CLIP_RUN`` (1 epoch of clip on synthetic-mini at 40 % noise) in this process, once per session
    for the tests that only read it: its ``--out`` folder and what it printed."""
    out = tmp_path_factory.mktemp("clip-run")
    return out, invoke(*CLIP_RUN, "--out", out)
