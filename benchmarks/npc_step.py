"""Time one training step of ``clip``, ``npc``, ``npc-official`` and the unfused official reference (npc.md §8).

All four start from the same randomly initialised ncbench-tiny and take the same batches (batch 128) of the
embedded synthetic world at 20 % caption-shuffle noise, in one process. The methods' steps run through the
harness's ``train_step`` (the reference runs its own), interleaved batch by batch so that load changes on a shared
machine hit all alike; after the warm-up steps the median per method is reported. The two NPC methods share one
encoding of the training set for their memory banks. The last two lines are the ratios.

    NCBENCH_CACHE=.ncbench-cache python benchmarks/npc_step.py [--steps 8] [--warmup 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from npc_reference import UnfusedNPCOfficial, build_context  # noqa: E402

from ncbench.cli import DEFAULT_CACHE  # noqa: E402
from ncbench.config import RunConfig  # noqa: E402
from ncbench.harness import train_step  # noqa: E402
from ncbench.method import Context, Method  # noqa: E402
from ncbench.methods.clip import CLIPFineTune  # noqa: E402
from ncbench.methods.npc import NPC, NPCOfficial  # noqa: E402
from ncbench.optim import adamw  # noqa: E402

BATCH = 128  # the embedded default's batch size (RunConfig.batch_size)


def _context_for(base: Context, cls: type[Method], lr: float) -> Context:
    """``base`` with its own copy of the initial model and a fresh harness AdamW at the method's lr."""
    model = copy.deepcopy(base.models[0])
    return dataclasses.replace(base, models=[model], lr=lr, optimizers=[adamw(model.parameters(), lr, base.weight_decay)],
                               make_optimizer=lambda params: adamw(params, lr, base.weight_decay))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = build_context(DEFAULT_CACHE, dataset="synthetic", noise=0.2, batch_size=BATCH)
    lr = {cls: cls.run_defaults.get("lr", RunConfig.lr) for cls in (CLIPFineTune, NPC, NPCOfficial)}
    methods: dict[str, Method] = {}
    for name, cls in (("clip", CLIPFineTune), ("npc", NPC), ("npc-official", NPCOfficial)):
        methods[name] = cls()
        methods[name].setup(_context_for(base, cls, lr[cls]))
    clock = time.perf_counter()
    embeddings = base.encode_train(base.models[0], unit=False)
    for name in ("npc", "npc-official"):
        methods[name].bank_from_embeddings(*embeddings, epoch=0)
    official = methods["npc-official"]
    print(f"memory banks: {time.perf_counter() - clock:.1f} s; clean set {int((official.clean_prob > 0.9).sum())} "
          f"of {len(official.clean_prob)} pairs")
    reference = UnfusedNPCOfficial(copy.deepcopy(base.models[0]), base.train, official.by_image, official.by_text,
                                   lr[NPCOfficial], base.weight_decay, NPCOfficial.run_defaults["grad_clip"])

    times: dict[str, list[float]] = {name: [] for name in (*methods, "reference")}
    distinct = []
    for step, index in enumerate(methods["clip"].epoch_batches(0)):
        if step == args.warmup + args.steps:
            break
        batch = base.train.batch(index)
        rows = official.memory_rows(batch)
        distinct.append((len(np.unique(base.train.pair_image[rows])), len(np.unique(rows))))
        for name, method in methods.items():
            clock = time.perf_counter()
            train_step(method, batch, method.ctx.optimizers, method.ctx.lr, method.run_defaults.get("grad_clip", 0.0))
            times[name].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        reference.step(batch, lr[NPCOfficial])
        times["reference"].append(time.perf_counter() - clock)

    median = {name: statistics.median(t[args.warmup:]) for name, t in times.items()}
    images, captions = np.mean(distinct, axis=0)
    print(f"per step, memory pairs {2 * BATCH}: {images:.0f} distinct images, {captions:.0f} distinct captions")
    print(f"median step over {args.steps} steps after {args.warmup} warm-up, {args.threads} thread(s): "
          + ", ".join(f"{name} {1000 * t:.0f} ms" for name, t in median.items()))
    gap = max((a - b).abs().max().item() for a, b in zip(official.ctx.models[0].parameters(), reference.model.parameters()))
    print(f"npc-official vs reference after {len(times['clip'])} steps: max |parameter difference| {gap:.1e}")
    print(f"ratio npc/clip = {median['npc'] / median['clip']:.2f}")
    print(f"ratio npc-official/clip = {median['npc-official'] / median['clip']:.2f}")
    print(f"ratio reference/npc-official = {median['reference'] / median['npc-official']:.2f}")


if __name__ == "__main__":
    main()
