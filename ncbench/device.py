"""Where runs compute, and the kernels and precision they use there."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch


def select_device() -> torch.device:
    """CUDA when present, else the CPU with the math attention kernel.

    On the CPU, PyTorch's flash attention kernel is slower than the math kernel for the tiny models' 17- and
    32-token sequences (benchmarks/train_step.py: about 7 % of a step); the switch is global and the CPU
    dispatcher reads it despite its name.
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.backends.cuda.enable_flash_sdp(False)
    return torch.device("cpu")


def autocast_for(device: torch.device, precision: str = "auto") -> Callable[[], AbstractContextManager]:
    """The autocast of ``precision`` on ``device``: ``auto`` is bf16 on CUDA and full precision on the CPU, where
    bf16 autocast is about 10x slower here; ``bf16`` and ``fp32`` force one."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext
