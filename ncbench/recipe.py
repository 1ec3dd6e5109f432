"""The pretraining recipe of the tiny models' ``embedded`` weights and the key that names those weights."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ncbench.architecture import config_digest
from ncbench.seeding import stable_hash


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


def weights_key(name: str, spec: PretrainSpec) -> str:
    """12 hex digits naming the weights ``spec`` makes for tiny model ``name``: a digest of the architecture config,
    the recipe and the synthetic corpus's generator and vocabulary."""
    from ncbench.datasets import synthetic

    return stable_hash(config_digest(name), asdict(spec), synthetic.GENERATOR_VERSION, synthetic.VOCABULARY)
