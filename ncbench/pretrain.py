"""The ``embedded`` weights of the tiny built-in models: shipped with the package, else pretrained here and cached.

Weights are named by :func:`ncbench.recipe.weights_key` (architecture config, pretraining recipe, corpus generator).
The default recipe's weights ship as ``ncbench/weights/<model>-<key>.safetensors``, an exact copy of what
pretraining writes to ``<cache>/backbones/<model>-<key>.pt``; any other recipe (the test suite's tiny one) or a
changed architecture is pretrained on the synthetic corpus once and cached. ``ncbench pretrain`` forces pretraining.
"""
from __future__ import annotations

import math
import pickle
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors.torch import load_file

from ncbench.architecture import OPENAI_MEAN, OPENAI_STD, BackboneError, has_compact_vocabulary, input_size
from ncbench.atomic import atomic_write
from ncbench.data import ImageNormalizer, Split
from ncbench.device import select_device
from ncbench.losses import infonce, pair_logits
from ncbench.optim import adamw, set_lr, warmup_cosine
from ncbench.progress import plain_line, progress_bar
from ncbench.recipe import PretrainSpec, current_spec, weights_key
from ncbench.seeding import seed_everything
from ncbench.tokenizer import tiny_tokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped_weights(name: str, spec: PretrainSpec) -> Path | None:
    """The package's weights file for ``name`` under ``spec``, or None when none ships for that key."""
    path = WEIGHTS_DIR / f"{name}-{weights_key(name, spec)}.safetensors"
    return path if path.is_file() else None


def cache_path(name: str, cache_dir: Path, spec: PretrainSpec) -> Path:
    """Where pretraining caches the weights of ``name`` under ``spec``."""
    return Path(cache_dir) / "backbones" / f"{name}-{weights_key(name, spec)}.pt"


def pretrained_state(name: str, cache_dir: Path, spec: PretrainSpec | None = None) -> dict[str, torch.Tensor]:
    """The ``embedded`` weights of tiny model ``name``: shipped, else cached, else pretrained now and cached."""
    spec = spec or current_spec()
    shipped = shipped_weights(name, spec)
    if shipped is not None:
        return load_file(shipped)
    path = cache_path(name, cache_dir, spec)
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, struct.error) as e:  # ncbench made it: make it again
            warnings.warn(f"{path}: unreadable pretrained-weights cache ({type(e).__name__}); pretraining again")
    return pretrain(name, cache_dir, spec)


def pretrain(name: str, cache_dir: Path, spec: PretrainSpec | None = None) -> dict[str, torch.Tensor]:
    """Pretrain ``name`` under ``spec`` (default: the current one) and write the weights to the cache, replacing
    any cached copy."""
    from ncbench.datasets import synthetic

    if not has_compact_vocabulary(name):
        raise BackboneError(f"--model {name}: only the built-in tiny models with a compact vocabulary are pretrained "
                            f"here")
    spec = spec or current_spec()
    corpus = synthetic.pretrain_corpus(cache_dir, n_images=spec.corpus_images, seed=spec.seed)
    state = _train(name, corpus, spec)
    path = cache_path(name, cache_dir, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return state


def compare_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """Whether two state dicts are bitwise identical, and their largest absolute difference (inf when their keys or
    shapes differ)."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return False, math.inf
    identical = all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    return identical, max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def _train(name: str, corpus: Split, spec: PretrainSpec) -> dict[str, torch.Tensor]:
    """Contrastive pretraining of a fresh ``name`` on ``corpus``; one line per epoch when stderr is no terminal."""
    seed_everything(spec.seed)
    device = select_device()
    model = open_clip.create_model(name).to(device).train()
    tokens = tiny_tokenizer(name)(corpus.captions)
    normalize = ImageNormalizer(OPENAI_MEAN, OPENAI_STD, input_size(name), device)
    first_caption = np.searchsorted(corpus.caption_image, np.arange(corpus.n_images))
    per_image = np.bincount(corpus.caption_image, minlength=corpus.n_images)
    rng = np.random.default_rng(spec.seed)
    optimizer = adamw(model.parameters(), spec.lr, spec.weight_decay)
    steps_per_epoch = corpus.n_images // spec.batch_size
    total = spec.epochs * steps_per_epoch
    start = time.perf_counter()
    with progress_bar(f"pretraining {name} (once, cached)", total) as advance:
        for epoch in range(spec.epochs):
            order = rng.permutation(corpus.n_images)
            captions = first_caption + rng.integers(0, per_image)
            loss_sum = 0.0
            for i in range(steps_per_epoch):
                step = epoch * steps_per_epoch + i
                set_lr(optimizer, spec.lr * warmup_cosine(step / total, spec.warmup_steps / total))
                idx = np.sort(order[i * spec.batch_size:(i + 1) * spec.batch_size])
                img, txt = model(normalize(corpus.images[idx]), tokens[captions[idx]].to(device))[:2]
                loss = infonce(pair_logits(img, txt, model.logit_scale))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = loss.item()
                loss_sum += value
                advance(loss=value)
            plain_line(f"pretraining {name}: epoch {epoch + 1}/{spec.epochs}, mean loss "
                       f"{loss_sum / max(steps_per_epoch, 1):.4f}, {time.perf_counter() - start:.0f} s")
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
