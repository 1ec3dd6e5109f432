"""Optimiser and learning-rate schedule shared by pretraining and fine-tuning."""
from __future__ import annotations

import math
from typing import Iterable

import torch


ADAM_BETAS, ADAM_EPS = (0.9, 0.98), 1e-6


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as CLIP fine-tuning uses it: betas (0.9, 0.98), eps 1e-6, one group (docs/methods/clip.md#official-recipe); the fused
    implementation, about 5 % of a CPU step faster than the for-each one (benchmarks/train_step.py)."""
    return torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay, fused=True)


def warmup_cosine(progress: float, warmup: float) -> float:
    """LR multiplier at ``progress`` in [0, 1] of training: linear warm-up over ``warmup``, then cosine to 0."""
    if progress < warmup:
        return (progress + 1e-9) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / max(1.0 - warmup, 1e-9)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
