"""Time one training step of ``clip``, ``npc``, ``npc-official`` and the unfused official reference (docs/methods/npc.md#cost).

All four start from the same ncbench-tiny (randomly initialised, or with ``--pretrained embedded`` the weights a
run fine-tunes) and take the same batches (batch 128) of the embedded synthetic world at 20 % caption-shuffle
noise, in one process. The methods' steps run through the
harness's ``train_step`` (the reference, tests/npc_official_unfused.py, runs its own), interleaved batch by batch
so that load changes on a shared machine hit all alike; after the warm-up steps the median per method is reported.
The two NPC methods share one encoding of the training set for their memory banks. The last lines are the ratios.

The bank, and with it the memory batches, depend on the initial weights: the random model's ``npc-official`` bank
(norms kept) sends the pairs to few clean pairs (about 125 distinct images and 127 captions per step at batch 128),
the pretrained model's, the one a run builds, to about 200 images and 227 captions, so ``--pretrained embedded``
gives the per-step cost of a run (docs/methods/npc.md#cost). The counts printed are ``npc-official``'s.

    NCBENCH_CACHE=.ncbench-cache python benchmarks/npc_step.py [--steps 8] [--warmup 2] [--threads 1] \
        [--pretrained embedded]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ncbench.backbone import load_backbone
from ncbench.cli import DEFAULT_CACHE
from ncbench.config import RunConfig
from ncbench.data import ImageNormalizer
from ncbench.harness import train_step
from ncbench.method import Context, Method, TrainSet
from ncbench.methods.clip import CLIPFineTune
from ncbench.methods.npc import NPC, NPCOfficial
from ncbench.noise import make_noise
from ncbench.registry import DATASETS

BATCH = 128  # the embedded default's batch size (RunConfig.batch_size)
REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "npc_official_unfused.py"


def _load_reference() -> type:
    """``UnfusedNPCOfficial`` from the tests' reference module, imported by its file path."""
    spec = importlib.util.spec_from_file_location("npc_official_unfused", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UnfusedNPCOfficial


def _train_set(pretrained: str = "none") -> tuple[TrainSet, torch.nn.Module]:
    """The embedded synthetic world's training split at 20 % caption-shuffle noise, and ncbench-tiny with
    ``pretrained`` weights ("none": randomly initialised, seeded)."""
    torch.manual_seed(0)
    backbone = load_backbone("ncbench-tiny", pretrained, DEFAULT_CACHE)
    pairs = DATASETS.get("synthetic")().load(None, DEFAULT_CACHE)
    pairing = make_noise("caption-shuffle", pairs.train.caption_image, 0.2, 0, pairs.name)
    normalize = ImageNormalizer(backbone.mean, backbone.std, backbone.image_size, torch.device("cpu"))
    train = TrainSet(pairs.train.images, backbone.tokenize(pairs.train.captions), pairing.assigned_image, normalize)
    return train, backbone.model.train()


def _context(train: TrainSet, initial: torch.nn.Module, lr: float) -> Context:
    """A harness context over ``train`` with its own copy of the initial model and a fresh AdamW at ``lr``."""
    return Context.create([copy.deepcopy(initial)], train, seed=0, epochs=1, batch_size=BATCH, lr=lr,
                          weight_decay=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--pretrained", default="none", help="initial weights: none (random) or embedded (a run's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train, initial = _train_set(args.pretrained)
    lr = {cls: cls.run_defaults.get("lr", RunConfig.lr) for cls in (CLIPFineTune, NPC, NPCOfficial)}
    methods: dict[str, Method] = {}
    for name, cls in (("clip", CLIPFineTune), ("npc", NPC), ("npc-official", NPCOfficial)):
        methods[name] = cls()
        methods[name].setup(_context(train, initial, lr[cls]))
    clock = time.perf_counter()
    embeddings = methods["clip"].ctx.encode_train(initial, unit=False)
    for name in ("npc", "npc-official"):
        methods[name].bank_from_embeddings(*embeddings, epoch=0)
    official = methods["npc-official"]
    print(f"memory banks: {time.perf_counter() - clock:.1f} s; clean set {int((official.clean_prob > 0.9).sum())} "
          f"of {len(official.clean_prob)} pairs")
    reference = _load_reference()(copy.deepcopy(initial), train, official.by_image, official.by_text, lr[NPCOfficial],
                                  official.ctx.weight_decay, NPCOfficial.run_defaults["grad_clip"])

    times: dict[str, list[float]] = {name: [] for name in (*methods, "reference")}
    distinct = []
    for step, index in enumerate(methods["clip"].epoch_batches(0)):
        if step == args.warmup + args.steps:
            break
        batch = train.batch(index)
        rows = official.memory_rows(batch)
        images, captions = np.unique(train.pair_image[rows]), np.unique(rows)
        distinct.append((len(images), len(captions), len(np.setdiff1d(images, train.pair_image[batch.index.numpy()])),
                         len(np.setdiff1d(captions, batch.index.numpy()))))
        for name, method in methods.items():
            clock = time.perf_counter()
            train_step(method, batch, method.ctx.lr, method.run_defaults.get("grad_clip", 0.0))
            times[name].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        reference.step(batch, lr[NPCOfficial])
        times["reference"].append(time.perf_counter() - clock)

    median = {name: statistics.median(t[args.warmup:]) for name, t in times.items()}
    images, captions, new_images, new_captions = np.mean(distinct, axis=0)
    print(f"per step, memory pairs {2 * BATCH}: {images:.0f} distinct images, {captions:.0f} distinct captions; "
          f"beyond the batch's: {new_images:.0f} images, {new_captions:.0f} captions")
    print(f"median step over {args.steps} steps after {args.warmup} warm-up, {args.threads} thread(s), "
          f"initial weights {args.pretrained}: "
          + ", ".join(f"{name} {1000 * t:.0f} ms" for name, t in median.items()))
    gap = max((a - b).abs().max().item() for a, b in zip(official.ctx.models[0].parameters(), reference.model.parameters()))
    print(f"npc-official vs reference after {len(times['clip'])} steps: max |parameter difference| {gap:.1e}")
    print(f"ratio npc/clip = {median['npc'] / median['clip']:.2f}")
    print(f"ratio npc-official/clip = {median['npc-official'] / median['clip']:.2f}")
    print(f"ratio reference/npc-official = {median['reference'] / median['npc-official']:.2f}")


if __name__ == "__main__":
    main()
