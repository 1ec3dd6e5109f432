"""Shared fixtures: a session cache with a tiny, fast pretraining (tests check mechanics, not accuracy)."""
import os
import subprocess
import sys
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


@pytest.fixture
def cli():
    return ncbench
