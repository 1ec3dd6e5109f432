"""Per-step cost of ``mscn`` relative to ``clip`` (mscn.md §7.7) at the embedded default's size.

ncbench-tiny (random weights: the cost does not depend on them), batch 128, harness-like steps (zero_grad,
training_step, backward, AdamW step). The two methods' steps are interleaved so that both see the same machine
load; the median of each is reported, plus mscn's warm-up step and one purification pass.

    .venv/bin/python benchmarks/mscn_step.py --steps 8 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch

import ncbench.backbone  # noqa: F401  (registers the tiny model configs)
from ncbench.data import ImageNormalizer, Pairs
from ncbench.datasets.synthetic import generate
from ncbench.harness import carve_clean_subset
from ncbench.method import Context, Method, TrainSet
from ncbench.methods.clip import CLIPFineTune
from ncbench.methods.mscn import MSCN
from ncbench.optim import adamw, set_lr


def make_context(n_images: int, batch_size: int, seed: int, epochs: int = 5) -> Context:
    """A clean synthetic training split with a 2 % clean subset, a fresh ncbench-tiny and its AdamW."""
    split = generate("downstream", n_images, seed)
    pairs, clean = carve_clean_subset(Pairs("bench", split, split, split), 0.02, seed)
    backbone = ncbench.backbone.load_backbone("ncbench-tiny", "none", None)
    normalize = ImageNormalizer(backbone.mean, backbone.std, backbone.image_size, torch.device("cpu"))
    train = TrainSet(pairs.train.images, backbone.tokenize(pairs.train.captions), pairs.train.caption_image, normalize)
    meta = TrainSet(clean.images, backbone.tokenize(clean.captions), clean.caption_image, normalize)
    model = backbone.model.train()
    optimizer = adamw(model.parameters(), 5e-4, 0.1)
    return Context(models=[model], train=train, clean_subset=meta, device=torch.device("cpu"), autocast=nullcontext,
                   rng=np.random.default_rng(seed), seed=seed, epochs=epochs, batch_size=batch_size, lr=5e-4,
                   weight_decay=0.1, make_optimizer=lambda p: adamw(p, 5e-4, 0.1), optimizers=[optimizer])


def timed_step(method: Method, ctx: Context, index: np.ndarray) -> float:
    """One harness-like step; seconds."""
    clock = time.perf_counter()
    optimizer = ctx.optimizers[0]
    set_lr(optimizer, ctx.lr)
    optimizer.zero_grad(set_to_none=True)
    method.training_step(ctx.train.batch(index))["loss"].backward()
    optimizer.step()
    return time.perf_counter() - clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method (after 2 untimed)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=600, help="training images (5 captions each)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    clip_ctx, mscn_ctx = make_context(args.images, args.batch_size, 0), make_context(args.images, args.batch_size, 0)
    clip, mscn = CLIPFineTune(), MSCN()
    clip.setup(clip_ctx)
    mscn.setup(mscn_ctx)
    rng = np.random.default_rng(1)
    draw = lambda: rng.choice(len(clip_ctx.train), args.batch_size, replace=False)  # noqa: E731

    warm = [timed_step(mscn, mscn_ctx, draw()) for _ in range(2 + args.steps)][2:]  # warm-up stage, first order
    clock = time.perf_counter()
    mscn.on_epoch_start(mscn.params.warmup_epochs)  # purification pass, then the main stage
    purify_s = time.perf_counter() - clock
    times: dict[str, list[float]] = {"clip": [], "mscn": []}
    for i in range(2 + args.steps):
        index = draw()
        for name, method, ctx in (("clip", clip, clip_ctx), ("mscn", mscn, mscn_ctx)):
            seconds = timed_step(method, ctx, index)
            if i >= 2:
                times[name].append(seconds)
    clip_ms, mscn_ms, warm_ms = (1e3 * statistics.median(t) for t in (times["clip"], times["mscn"], warm))
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, "
          f"{len(mscn_ctx.train)} train / {len(mscn_ctx.clean_subset)} meta pairs, median of {args.steps} steps")
    print(f"clip step            {clip_ms:8.1f} ms")
    print(f"mscn step (main)     {mscn_ms:8.1f} ms   x{mscn_ms / clip_ms:.2f}")
    print(f"mscn step (warm-up)  {warm_ms:8.1f} ms   x{warm_ms / clip_ms:.2f}")
    print(f"mscn purification    {1e3 * purify_s:8.1f} ms   (once per epoch; {len(mscn_ctx.train)} pairs)")


if __name__ == "__main__":
    main()
