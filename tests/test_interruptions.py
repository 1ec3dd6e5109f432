"""Runs killed at random moments resume to the record of an uninterrupted run; two sweeps sharing a results
folder run each run once. Real ``ncbench`` processes, so these are slow (``-m slow``)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

RUN = ("run", "--method", "gmm-filter", "--noise", "0.4", "--dataset", "synthetic-mini", "--epochs", "3")


def _start(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ncbench", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _numbers(record: dict) -> dict:
    """What a run computed: everything but timings, resume counts and the machine."""
    epochs = [{k: v for k, v in e.items() if not k.endswith("_s")} for e in record["epochs"]]
    return {"test": record["test"], "zero_shot": record["zero_shot"], "selection": record["selection"],
            "noise": record["noise"], "epochs": epochs}


def test_killed_at_random_moments_the_run_resumes_to_the_uninterrupted_record(tmp_path):
    clock = time.perf_counter()
    whole = _start(*RUN, "--out", tmp_path / "whole")
    assert whole.wait(timeout=900) == 0, whole.stderr.read()
    wall = time.perf_counter() - clock
    (expected,) = (json.loads(p.read_text()) for p in (tmp_path / "whole").glob("*/result.json"))

    rng = np.random.default_rng(20261201)
    kills = 0
    for _ in range(12):  # each attempt either completes or is killed at a random moment
        proc = _start(*RUN, "--out", tmp_path / "killed")
        try:
            proc.wait(timeout=float(rng.uniform(0.2, 1.0)) * wall)
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
    else:
        pytest.fail("the run never completed")
    assert proc.returncode == 0, proc.stderr.read()
    (record,) = (json.loads(p.read_text()) for p in (tmp_path / "killed").glob("*/result.json"))
    assert kills >= 1 and record["resumes"] <= kills
    assert _numbers(record) == _numbers(expected)


def test_two_sweeps_on_one_folder_run_each_run_once(tmp_path):
    sweep = ("sweep", "--methods", "clip,gmm-filter", "--noise", "0.2,0.4", "--seeds", "0", "--dataset",
             "synthetic-mini", "--epochs", "1", "--out", tmp_path)
    first, second = _start(*sweep), _start(*sweep)
    outputs = [p.communicate(timeout=900) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    ran = [line for out, err in outputs for line in (out + err).splitlines() if line.startswith("done ")]
    assert len(ran) == 4 and len(set(ran)) == 4, outputs  # four runs, each done by exactly one sweep
    assert len(list(tmp_path.glob("*/result.json"))) == 4
