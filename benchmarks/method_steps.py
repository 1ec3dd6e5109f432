"""Milliseconds per training step of ``clip``, ``decl``, ``bicro``, ``rcl`` and ``osa`` on the same batches
(docs/methods/decl.md#cost, bicro.md#cost, rcl.md#cost, osa.md#cost).

One process, ncbench-tiny (random weights: the cost does not depend on them) on a synthetic training split with
20 % caption noise (``ncbench.testing.tiny_context``), batch 128, harness steps (``ncbench.testing.step``: zero_grad,
training_step, backward of the summed losses, AdamW, on_step_end). Every method gets the same batch at each round
and the methods are interleaved round by round, so load changes on a shared machine hit all alike; the first
rounds are untimed warm-up. ``bicro`` is timed twice: a first-half step (each model: its labeled batch and a
no-grad peer forward) and a second-half step (plus an unlabeled batch and its peer forward); its labeled batches
are the shared batch. The once-per-epoch work (divisions, OSA's scoring pass) is timed separately.

    nice .venv/bin/python benchmarks/method_steps.py --steps 10 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch

from ncbench.method import BatchIndex, Method
from ncbench.methods.bicro import BiCro
from ncbench.methods.clip import CLIPFineTune
from ncbench.methods.decl import DECL
from ncbench.methods.osa import OSA
from ncbench.methods.rcl import RCL
from ncbench.testing import step, tiny_context


def timed(work: Callable[[], object]) -> float:
    """Seconds ``work`` takes."""
    clock = time.perf_counter()
    work()
    return time.perf_counter() - clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of every method each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=600, help="training images (5 captions each)")
    parser.add_argument("--epochs", type=int, default=5, help="run length the methods plan for (DECL's annealing)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    methods: dict[str, Method] = {}
    once: dict[str, float] = {}
    for cls in (CLIPFineTune, DECL, BiCro, RCL, OSA):
        method = cls()
        ctx = tiny_context(cls, n_images=args.images, noise=0.2, batch_size=args.batch_size, epochs=args.epochs)
        once[f"{cls.name} setup"] = timed(lambda: method.setup(ctx))
        methods[cls.name] = method
    n = len(methods["clip"].ctx.train)
    second_half = args.epochs // 2
    once["decl division (epoch start)"] = timed(lambda: methods["decl"].on_epoch_start(0))
    once["bicro two BMM divisions (epoch start)"] = timed(lambda: methods["bicro"].on_epoch_start(second_half))
    once["osa clean scores (once per run)"] = timed(methods["osa"].clean_scores)

    rng = np.random.default_rng(1)
    names = ["clip", "decl", "bicro (1st half)", "bicro (2nd half)", "rcl", "osa"]
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.warmup + args.steps):
        index, unlabeled = (rng.choice(n, args.batch_size, replace=False) for _ in range(2))
        batches: dict[str, tuple[Method, BatchIndex]] = {
            "clip": (methods["clip"], index), "decl": (methods["decl"], index),
            "bicro (1st half)": (methods["bicro"], {"a": index, "b": index}),
            "bicro (2nd half)": (methods["bicro"], {"a": index, "a_unlabeled": unlabeled,
                                                    "b": index, "b_unlabeled": unlabeled}),
            "rcl": (methods["rcl"], index), "osa": (methods["osa"], index)}
        for name in names:
            method, batch = batches[name]
            seconds = timed(lambda: step(method, batch))
            if i >= args.warmup:
                times[name].append(seconds)

    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, {args.threads} thread(s), ncbench-tiny, batch {args.batch_size}, {n} pairs, "
          f"median of {args.steps} interleaved steps after {args.warmup} untimed")
    for name in names:
        print(f"{name:18s} {ms[name]:8.1f} ms/step   x{ms[name] / ms['clip']:.2f} clip")
    for name, seconds in once.items():
        print(f"{name:40s} {1e3 * seconds:8.1f} ms")


if __name__ == "__main__":
    main()
