"""Several processes per run (torchrun, gloo on the CPU): the gathered loss gives the one-process gradient of the
global batch, a 2-process run reproduces a 1-process run with the same global batch, and methods that do not
support several processes refuse in one line."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import CLIP_RUN, RUN_FLAGS
from torch import nn

from ncbench import distributed
from ncbench.errors import UserError
from ncbench.lock import LOCKS
from ncbench.losses import infonce, pair_logits
from ncbench.registry import METHODS
from ncbench.results import RECORD

LOSS_RTOL = 1e-4  # float32 summation order only (halves of the batch, gradients all-reduced): measured ~1e-8
RSUM_TOL = 1.0  # a recall flips only when two similarities within ~1e-6 swap; 1.0 is two such flips


class TinyClip(nn.Module):
    """Two linear encoders and a logit scale: the shape of open_clip's forward, small enough to check gradients."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(6, 4), nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images, tokens):
        return nn.functional.normalize(self.image(images), dim=-1), nn.functional.normalize(self.text(tokens), dim=-1)


def _clip_loss(model, images, tokens):
    image, text = distributed.gather_features(*model(images, tokens))
    return infonce(pair_logits(image, text, model.logit_scale))


def _gradient_worker(rank: int, port: int, out: str) -> None:
    generator = torch.Generator().manual_seed(1)
    images, tokens = torch.randn(8, 6, generator=generator), torch.randn(8, 5, generator=generator)
    reference = TinyClip()
    _clip_loss(reference, images, tokens).backward()  # no process group yet: one process, the full batch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    world = distributed.world()
    (model,) = distributed.wrap([TinyClip()], world)
    index = distributed.shard(np.arange(8), world)
    loss = _clip_loss(model, images[index], tokens[index])
    loss.backward()
    torch.save({"index": index.tolist(), "loss": loss.item(), "ddp": {k: p.grad for k, p in model.module.named_parameters()},
                "one": {k: p.grad for k, p in reference.named_parameters()}}, f"{out}/{rank}.pt")
    del model, loss  # as harness.run frees them by returning
    distributed.close(world)


def test_gathered_loss_has_the_one_process_gradient_of_the_global_batch(tmp_path):
    """open_clip's gather_with_grad=True, local_loss=False under DDP: each rank's parameters get the gradient of the
    whole batch's loss (a missing sum over ranks would halve it, which AdamW alone would never reveal)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gradient_worker, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert [r["index"] for r in ranks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for r in ranks:
        for name, grad in r["ddp"].items():
            torch.testing.assert_close(grad, r["one"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert ranks[0]["loss"] == pytest.approx(ranks[1]["loss"], rel=1e-6)


def _torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ncbench", *args], capture_output=True, text=True, timeout=timeout, check=False)


def _record(out: Path) -> dict:
    (path,) = out.glob(f"*/{RECORD}")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_two_processes_reproduce_one_with_the_same_global_batch(clip_run, tmp_path):
    """torchrun's 2 processes against the session's 1-process run of the same configuration (a minute or more:
    slow; the gathered gradient and the refusal below check the processes by default)."""
    two = _torchrun(*CLIP_RUN, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    a, b = _record(clip_run[0]), _record(tmp_path / "two")
    assert a["run_id"] == b["run_id"]  # the world size is how a run is computed, not what it is
    assert a["distributed"] == {"world_size": 1, "backend": None, "global_batch": 128, "batch_per_process": 128}
    assert b["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch": 128, "batch_per_process": 64}
    assert [e["steps"] for e in b["epochs"]] == [e["steps"] for e in a["epochs"]]
    for ea, eb in zip(a["epochs"], b["epochs"]):
        assert eb["losses"]["loss"] == pytest.approx(ea["losses"]["loss"], rel=LOSS_RTOL)
        assert abs(eb["dev"]["rsum"] - ea["dev"]["rsum"]) <= RSUM_TOL
    for key, value in a["test"]["1k"].items():
        assert abs(b["test"]["1k"][key] - value) <= RSUM_TOL, key
    print(f"1 vs 2 processes: loss {a['epochs'][0]['losses']['loss']!r} vs {b['epochs'][0]['losses']['loss']!r}, "
          f"test rsum {a['test']['1k']['rsum']} vs {b['test']['1k']['rsum']}")
    runs = sorted(p.name for p in (tmp_path / "two").iterdir() if p.name != LOCKS)
    assert runs == [a["run_id"]]  # rank 1 wrote nothing of its own


def test_a_method_without_support_refuses_several_processes_in_one_line(tmp_path):
    refused = _torchrun("run", "--method", "npc", *RUN_FLAGS, "--out", str(tmp_path))
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode != 0
    assert errors == ["error: --method npc: does not support several processes (world size 2); run it as one process"]
    assert not [p for p in tmp_path.iterdir() if p.name != LOCKS]  # no run folder


def test_the_global_batch_must_split_evenly():
    world = distributed.World(rank=0, size=3, backend="gloo")
    distributed.check_run(METHODS.get("clip"), 126, world)
    with pytest.raises(UserError, match="--batch-size 128: must be a multiple of the 3 processes"):
        distributed.check_run(METHODS.get("clip"), 128, world)
    assert METHODS.get("clip").supports_distributed and not METHODS.get("gmm-filter").supports_distributed
