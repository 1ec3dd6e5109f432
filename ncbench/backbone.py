"""CLIP dual encoders from open_clip: the tiny built-in models and any named architecture.

Two axes, as in open_clip: an architecture name and where its weights come from (``pretrained``):
an open_clip tag (``openai``), a local checkpoint file, ``embedded`` (the tiny models, pretrained
here on the synthetic corpus and cached) or ``none`` (random initialisation).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
from torch import Tensor, nn

from ncbench.errors import UserError

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)
logging.getLogger().setLevel(logging.ERROR)  # open_clip warns at root level for every model built without weights
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class BackboneError(UserError):
    """A model or its weights cannot be had; the message is one line for the user."""


class CompactTokenizer:
    """open_clip's SimpleTokenizer, remapped onto a small vocabulary of known words.

    Ids: 0 padding, 1 unknown, 2.. the BPE tokens of ``vocabulary`` (sorted), then start-of-text,
    then end-of-text as the largest id, so open_clip's argmax text pooling still finds it.
    """

    def __init__(self, vocabulary: tuple[str, ...], vocab_size: int, context_length: int):
        self.inner = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        tokens = sorted({t for word in vocabulary for t in self.inner.encode(word)})
        if len(tokens) + 4 > vocab_size:
            raise BackboneError(f"vocabulary needs {len(tokens) + 4} ids but the model has {vocab_size}")
        lookup = np.ones(len(self.inner.encoder), dtype=np.int64)  # unknown -> 1
        lookup[0] = 0
        lookup[tokens] = np.arange(2, len(tokens) + 2)
        lookup[self.inner.sot_token_id] = vocab_size - 2
        lookup[self.inner.eot_token_id] = vocab_size - 1
        self.lookup = torch.from_numpy(lookup)
        self.context_length = context_length

    def __call__(self, texts: list[str] | tuple[str, ...]) -> Tensor:
        return self.lookup[self.inner(list(texts), context_length=self.context_length)]


@dataclass
class Backbone:
    """A CLIP model plus what turns raw data into its inputs."""

    name: str
    pretrained: str
    model: nn.Module
    tokenize: Callable[[list[str]], Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def model_config(name: str) -> dict:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise BackboneError(f"unknown model {name!r}; built-in tiny models: {', '.join(TINY_MODELS)}, "
                            f"or any of open_clip.list_models()")
    return cfg


def _image_size(cfg: dict) -> int:
    size = cfg["vision_cfg"].get("image_size", 224)
    return size if isinstance(size, int) else size[0]


def tiny_tokenizer(name: str) -> CompactTokenizer:
    from ncbench.datasets.synthetic import VOCABULARY

    text = model_config(name)["text_cfg"]
    return CompactTokenizer(VOCABULARY, text["vocab_size"], text["context_length"])


def load_backbone(name: str, pretrained: str, cache_dir: Path) -> Backbone:
    """Build ``name`` with weights from ``pretrained`` (tag, file path, ``embedded`` or ``none``)."""
    cfg = model_config(name)
    path = Path(pretrained).expanduser()
    if name in TINY_MODELS:
        tokenize: Callable = tiny_tokenizer(name)
        model = open_clip.create_model(name)
        if pretrained == "embedded":
            from ncbench.pretrain import pretrained_state

            model.load_state_dict(pretrained_state(name, cache_dir))
        elif pretrained not in ("none", ""):
            model.load_state_dict(_read_checkpoint(path))
    else:
        tokenize = open_clip.get_tokenizer(name)
        try:
            tag = None if pretrained in ("none", "") else (str(path) if path.is_file() else pretrained)
            model = open_clip.create_model(name, pretrained=tag, cache_dir=str(cache_dir / "open_clip"))
        except Exception as err:  # open_clip raises many kinds for missing weights offline
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BackboneError(f"cannot load weights {pretrained!r} for {name} ({reason}); "
                                f"this machine may be offline: pass a local checkpoint with --pretrained PATH") from None
    pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    return Backbone(name, pretrained, model, tokenize, _image_size(cfg),
                    tuple(pre.get("mean", OPENAI_MEAN)), tuple(pre.get("std", OPENAI_STD)))


def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise BackboneError(f"--pretrained: no such checkpoint file {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def config_digest(name: str) -> str:
    """Hash of an architecture's config, part of the pretraining cache key."""
    return json.dumps(model_config(name), sort_keys=True)
