"""Seconds of the retrieval metrics (ncbench.evaluate) for COCO-5K and COCO-1K, and their ratio to one matrix product.

5,000 images x 25,000 captions (5 per image) of random unit embeddings (width 512, fp32, CPU). Each figure is the
best of ``--repeats`` runs, since other processes may share the cores: the COCO-5K metrics, a bare
``image_emb @ text_emb.T`` of the same shapes (measured in the same process, alternating with the metrics so load
changes hit both alike), and the COCO-1K protocol (5 folds of 1,000 x 5,000). ``--module PATH`` times another copy
of evaluate.py instead (e.g. an older version, for before/after figures).

    python benchmarks/eval_speed.py [--repeats 3] [--module /tmp/evaluate_old.py]
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

import ncbench.evaluate


def load_module(path: Path | None) -> ModuleType:
    """ncbench.evaluate, or the evaluate.py at ``path`` imported under another name."""
    if path is None:
        return ncbench.evaluate
    spec = importlib.util.spec_from_file_location("evaluate_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--module", type=Path, default=None, help="an evaluate.py to time instead of ncbench's")
    args = parser.parse_args()
    evaluate = load_module(args.module)
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(5000, 512, generator=g), dim=1)
    text = torch.nn.functional.normalize(torch.randn(25000, 512, generator=g), dim=1)
    caption_image = torch.arange(5000).repeat_interleave(5)
    coco5k, matmul, coco1k = [], [], []
    for _ in range(args.repeats):
        matmul.append(seconds(lambda: image @ text.T))
        coco5k.append(seconds(lambda: evaluate.evaluate_protocol("coco-5k", image, text, caption_image)))
        coco1k.append(seconds(lambda: evaluate.evaluate_protocol("coco-1k", image, text, caption_image)))
    print(f"evaluate module: {args.module or 'ncbench.evaluate'}; torch threads {torch.get_num_threads()}; "
          f"best of {args.repeats}")
    print(f"bare matmul 5000x512 @ 512x25000: {min(matmul):.3f} s")
    print(f"coco-5k metrics: {min(coco5k):.3f} s")
    print(f"coco-1k metrics: {min(coco1k):.3f} s")
    print(f"coco-5k / matmul: {min(coco5k) / min(matmul):.2f}")


if __name__ == "__main__":
    main()
