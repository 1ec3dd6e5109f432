"""Per-step cost of ``mscn`` relative to ``clip`` (docs/methods/mscn.md#cost) at the embedded default's size.

ncbench-tiny (random weights: the cost does not depend on them), batch 128, harness steps (zero_grad,
training_step, backward, AdamW step) on a clean synthetic split with a clean subset (ncbench.testing.tiny_context). The two methods' steps are interleaved so that both see the same machine
load; the median of each is reported, plus mscn's warm-up step and one purification pass.

    .venv/bin/python benchmarks/mscn_step.py --steps 8 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ncbench.method import Context, Method
from ncbench.methods.clip import CLIPFineTune
from ncbench.methods.mscn import MSCN
from ncbench.testing import step, tiny_context


def make_context(n_images: int, batch_size: int) -> Context:
    """A clean synthetic training split less its clean subset (10 %), a fresh ncbench-tiny and its AdamW."""
    return tiny_context(MSCN, n_images=n_images, noise=0.0, batch_size=batch_size, epochs=5)


def timed_step(method: Method, index: np.ndarray) -> float:
    """One harness step; seconds."""
    clock = time.perf_counter()
    step(method, index)
    return time.perf_counter() - clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method (after 2 untimed)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=600, help="training images (5 captions each)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    clip_ctx, mscn_ctx = make_context(args.images, args.batch_size), make_context(args.images, args.batch_size)
    clip, mscn = CLIPFineTune(), MSCN()
    clip.setup(clip_ctx)
    mscn.setup(mscn_ctx)
    rng = np.random.default_rng(1)
    draw = lambda: rng.choice(len(clip_ctx.train), args.batch_size, replace=False)  # noqa: E731

    warm = [timed_step(mscn, draw()) for _ in range(2 + args.steps)][2:]  # warm-up stage, first order
    clock = time.perf_counter()
    mscn.on_epoch_start(mscn.params.warmup_epochs)  # purification pass, then the main stage
    purify_s = time.perf_counter() - clock
    times: dict[str, list[float]] = {"clip": [], "mscn": []}
    for i in range(2 + args.steps):
        index = draw()
        for name, method in (("clip", clip), ("mscn", mscn)):
            seconds = timed_step(method, index)
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
