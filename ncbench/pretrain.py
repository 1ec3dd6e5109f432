"""Pretraining of the tiny built-in models on the synthetic corpus, run once and cached by config hash."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch

from ncbench.data import ImageNormalizer
from ncbench.device import select_device
from ncbench.losses import infonce, pair_logits
from ncbench.optim import adamw, set_lr, warmup_cosine
from ncbench.progress import progress_bar
from ncbench.seeding import seed_everything, stable_hash


@dataclass(frozen=True)
class PretrainSpec:
    """Clean contrastive pretraining on the 'pretrain' distribution; one random caption per image per epoch."""

    corpus_images: int = 40_000
    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    seed: int = 0


def current_spec() -> PretrainSpec:
    """The default spec; ``NCBENCH_PRETRAIN_IMAGES`` / ``NCBENCH_PRETRAIN_EPOCHS`` shrink it for smoke tests."""
    return PretrainSpec(corpus_images=int(os.environ.get("NCBENCH_PRETRAIN_IMAGES", PretrainSpec.corpus_images)),
                        epochs=int(os.environ.get("NCBENCH_PRETRAIN_EPOCHS", PretrainSpec.epochs)))


def pretrained_state(name: str, cache_dir: Path, spec: PretrainSpec | None = None) -> dict:
    """The cached pretrained weights of tiny model ``name``; pretrains first if absent."""
    from ncbench.backbone import config_digest
    from ncbench.datasets import synthetic

    spec = spec or current_spec()
    key = stable_hash(config_digest(name), asdict(spec), synthetic.GENERATOR_VERSION, synthetic.VOCABULARY)
    path = cache_dir / "backbones" / f"{name}-{key}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    corpus = synthetic.pretrain_corpus(cache_dir, n_images=spec.corpus_images, seed=spec.seed)
    state = _pretrain(name, corpus, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return state


def _pretrain(name: str, corpus, spec: PretrainSpec) -> dict:
    from ncbench.backbone import OPENAI_MEAN, OPENAI_STD, _image_size, model_config, tiny_tokenizer

    seed_everything(spec.seed)
    device = select_device()
    model = open_clip.create_model(name).to(device).train()
    tokens = tiny_tokenizer(name)(corpus.captions)
    normalize = ImageNormalizer(OPENAI_MEAN, OPENAI_STD, _image_size(model_config(name)), device)
    first_caption = np.searchsorted(corpus.caption_image, np.arange(corpus.n_images))
    per_image = np.bincount(corpus.caption_image, minlength=corpus.n_images)
    rng = np.random.default_rng(spec.seed)
    optimizer = adamw(model.parameters(), spec.lr, spec.weight_decay)
    steps_per_epoch = corpus.n_images // spec.batch_size
    total = spec.epochs * steps_per_epoch
    with progress_bar(f"pretraining {name} (once, cached)", total) as advance:
        for epoch in range(spec.epochs):
            order = rng.permutation(corpus.n_images)
            captions = first_caption + rng.integers(0, per_image)
            for i in range(steps_per_epoch):
                step = epoch * steps_per_epoch + i
                set_lr(optimizer, spec.lr * warmup_cosine(step / total, spec.warmup_steps / total))
                idx = np.sort(order[i * spec.batch_size:(i + 1) * spec.batch_size])
                img, txt = model(normalize(corpus.images[idx]), tokens[captions[idx]].to(device))[:2]
                loss = infonce(pair_logits(img, txt, model.logit_scale))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                advance(loss=loss.item())
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
