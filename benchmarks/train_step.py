"""Time one ``clip`` training step (forward, InfoNCE, backward, clipping, AdamW) under the choices that set its cost.

Variants, each on its own copy of one randomly initialised model and the same batches (batch 128) of the embedded
synthetic world, interleaved batch by batch so that load changes on a shared machine hit all alike:

- attention kernel: PyTorch's CPU flash kernel vs the math kernel (``torch.backends.cuda.enable_flash_sdp``
  is a global switch that the CPU dispatcher also reads);
- AdamW: the for-each implementation vs the fused one;
- MLP width of the tiny model's blocks (``--mlp-ratios``; the built-in config uses the first).

After the warm-up the median per variant is printed, in milliseconds.

    NCBENCH_CACHE=.ncbench-cache python benchmarks/train_step.py [--steps 10] [--warmup 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import open_clip
import torch

from ncbench.backbone import load_backbone
from ncbench.cli import DEFAULT_CACHE
from ncbench.data import ImageNormalizer
from ncbench.losses import infonce, pair_logits
from ncbench.method import TrainSet
from ncbench.registry import DATASETS

BATCH = 128


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainSet, index: np.ndarray) -> None:
    batch = train.batch(index)
    optimizer.zero_grad(set_to_none=True)
    image, text = model(batch.images, batch.tokens)[:2]
    infonce(pair_logits(image, text, model.logit_scale)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--mlp-ratios", default="2,4", help="comma-separated MLP ratios of the tiny model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backbone = load_backbone("ncbench-tiny", "none", DEFAULT_CACHE)
    pairs = DATASETS.get("synthetic")().load(None, DEFAULT_CACHE)
    normalize = ImageNormalizer(backbone.mean, backbone.std, backbone.image_size, torch.device("cpu"))
    train = TrainSet(pairs.train.images, backbone.tokenize(pairs.train.captions), pairs.train.caption_image, normalize)

    variants = {}
    for ratio in (float(r) for r in args.mlp_ratios.split(",")):
        cfg = copy.deepcopy(open_clip.get_model_config("ncbench-tiny"))
        cfg["vision_cfg"]["mlp_ratio"] = cfg["text_cfg"]["mlp_ratio"] = ratio
        torch.manual_seed(0)
        initial = open_clip.model.CLIP(**cfg).train()
        for flash in (True, False):
            for fused in (False, True):
                model = copy.deepcopy(initial)
                optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                                              weight_decay=0.1, fused=fused)
                name = f"mlp {ratio:g}, {'flash' if flash else 'math'} attention, {'fused' if fused else 'foreach'} AdamW"
                variants[name] = (flash, model, optimizer)

    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        index = rng.choice(len(train), BATCH, replace=False)
        for name, (flash, model, optimizer) in variants.items():
            torch.backends.cuda.enable_flash_sdp(flash)
            clock = time.perf_counter()
            step(model, optimizer, train, index)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - clock)
    for name, samples in times.items():
        print(f"{name}: {1000 * statistics.median(samples):.1f} ms")


if __name__ == "__main__":
    main()
