"""Several processes for one run (``torchrun``, or the tasks of a Slurm job): the process group, each rank's slice of
a global batch, the models wrapped in DistributedDataParallel, and feature gathering with gradients.

With ``W`` processes every rank draws the same global batches (same seeds), trains on its ``1/W`` slice, and a
method that supports it gathers the features of the whole global batch before its loss (open_clip's
``gather_features`` with ``gather_with_grad=True, local_loss=False``): each rank computes the loss of the global
batch; the gather's backward sums the ``W`` identical losses' gradients and DDP averages over ranks, so the step is
the one-process step on the global batch. Only rank 0 evaluates and writes checkpoints and the record.
"""
from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ncbench.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run."""

    rank: int = 0
    size: int = 1
    backend: str | None = None  # None: one process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The processes of this run, from torchrun's variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``); the process group is created on the first call (NCCL on CUDA, else gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def close(world: World) -> None:
    """Tear the process group down once every rank is done; call it after the DDP models are freed. Left to the
    interpreter's exit, gloo aborted a process now and then (SIGABRT after its work was done: 5 of 40 measured)."""
    if world.size > 1:
        gc.collect()  # DDP models caught in reference cycles go too
        dist.barrier()
        dist.destroy_process_group()


def check_run(method_cls, batch_size: int, world: World) -> None:
    """Several processes need a method that supports them and a global batch they can split evenly."""
    if world.size == 1:
        return
    if not getattr(method_cls, "supports_distributed", False):
        raise UserError(f"--method {method_cls.name}: does not support several processes (world size {world.size}); "
                        "run it as one process")
    if batch_size % world.size:
        raise UserError(f"--batch-size {batch_size}: must be a multiple of the {world.size} processes")


@contextmanager
def main_first(world: World) -> Iterator[None]:
    """Rank 0 runs the block first (building the caches); the other ranks run it once it is done."""
    if not world.is_main:
        dist.barrier()
    yield
    if world.is_main and world.size > 1:
        dist.barrier()


def shard(index: np.ndarray, world: World) -> np.ndarray:
    """This rank's contiguous slice of a global batch of pair indices."""
    size = len(index) // world.size
    return index[world.rank * size:(world.rank + 1) * size]


class DistributedModel(DistributedDataParallel):
    """DDP whose forward synchronises gradients and which otherwise reads as the wrapped model: its attributes
    (``logit_scale``, ``encode_image``, ...) and its state dict (no ``module.`` prefix) are the model's."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def state_dict(self, *args, **kwargs) -> dict:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, *args, **kwargs):
        return self.module.load_state_dict(state_dict, *args, **kwargs)


def wrap(models: Sequence[nn.Module], world: World) -> list[nn.Module]:
    """The models as the method trains them: themselves for one process, DDP-wrapped for several."""
    if world.size == 1:
        return list(models)
    return [DistributedModel(m) for m in models]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather of equal-sized slices whose backward gives each rank the sum over ranks of the gradient of its
    slice (the semantics of ``torch.distributed.nn.all_gather``, whose entry point torch now deprecates)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        size = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * size:(dist.get_rank() + 1) * size]


def gather_features(*features: Tensor) -> tuple[Tensor, ...]:
    """Each tensor concatenated over the ranks in rank order (the global batch), with gradients flowing back to
    every rank's slice; unchanged for one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return features
    return tuple(_GatherWithGrad.apply(f) for f in features)
