"""CLIP dual encoders from open_clip: the tiny built-in models and any named architecture.

Two axes, as in open_clip: an architecture name and where its weights come from (``pretrained``):
an open_clip tag (``openai``), a local checkpoint file (read with ``weights_only=True``), ``embedded``
(the tiny models with a compact vocabulary, pretrained here on the synthetic corpus and cached) or
``none`` (random initialisation). Models with open_clip's full BPE vocabulary (every open_clip
architecture, and the built-in ``ncbench-tiny-bpe`` for real-data tests) use open_clip's own tokenizer.
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
BPE_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer vocabulary; smaller text vocabularies use CompactTokenizer


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


def input_size(name: str) -> int:
    """The square image size architecture ``name`` takes."""
    return _image_size(model_config(name))


def has_compact_vocabulary(name: str) -> bool:
    """A built-in tiny config with a vocabulary smaller than open_clip's BPE: the synthetic world's tokenizer."""
    return name in TINY_MODELS and model_config(name)["text_cfg"]["vocab_size"] < BPE_VOCAB_SIZE


def tiny_tokenizer(name: str) -> CompactTokenizer:
    from ncbench.datasets.synthetic import VOCABULARY

    text = model_config(name)["text_cfg"]
    return CompactTokenizer(VOCABULARY, text["vocab_size"], text["context_length"])


def weights_source(name: str, pretrained: str) -> str | None:
    """Where ``pretrained`` takes ``name``'s weights from: ``"embedded"``, a checkpoint file, an open_clip tag, or
    None (random initialisation). A one-line :class:`BackboneError` when it cannot; cheap, so the harness checks
    it before reading any data."""
    model_config(name)
    if pretrained in ("none", ""):
        return None
    if pretrained == "embedded":
        if not has_compact_vocabulary(name):
            compact = ", ".join(n for n in TINY_MODELS if has_compact_vocabulary(n))
            raise BackboneError(f"--pretrained embedded: only {compact} have embedded weights; for {name} pass an "
                                f"open_clip tag, a checkpoint file (--pretrained PATH) or none")
        return "embedded"
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    tags = [] if name in TINY_MODELS else open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        if open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu") and not model_config(name).get("quick_gelu"):
            raise BackboneError(f"--pretrained {pretrained} weights were trained with QuickGELU but {name} uses GELU; "
                                f"use --model {name}-quickgelu")
        return pretrained
    if name in TINY_MODELS or any(sep in pretrained for sep in ("/", "\\")) or path.suffix:
        raise BackboneError(f"--pretrained: no such checkpoint file {path}")
    raise BackboneError(f"--pretrained {pretrained!r}: not a checkpoint file nor a tag of {name} "
                        f"(tags: {', '.join(tags) or 'none'})")


def load_backbone(name: str, pretrained: str, cache_dir: Path) -> Backbone:
    """Build ``name`` with weights from ``pretrained`` (tag, file path, ``embedded`` or ``none``)."""
    cfg = model_config(name)
    source = weights_source(name, pretrained)
    tokenize: Callable = tiny_tokenizer(name) if has_compact_vocabulary(name) else open_clip.get_tokenizer(name)
    if name in TINY_MODELS:
        model = open_clip.create_model(name)
        if source == "embedded":
            from ncbench.pretrain import pretrained_state

            model.load_state_dict(pretrained_state(name, cache_dir))
        elif source is not None:
            try:
                model.load_state_dict(_read_checkpoint(Path(source)))
            except RuntimeError as err:  # wrong architecture: missing or unexpected keys, shape mismatches
                raise BackboneError(f"--pretrained {source}: not a checkpoint of {name} "
                                    f"({' '.join(str(err).split())[:200]})") from None
    else:
        try:  # open_clip reads a checkpoint file with weights_only=True, or downloads a tag's weights once
            model = open_clip.create_model(name, pretrained=source, cache_dir=str(cache_dir / "open_clip"))
        except Exception as err:  # open_clip raises many kinds for missing weights offline or a bad file
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise BackboneError(f"cannot load weights {pretrained!r} for {name} ({reason}); "
                                f"this machine may be offline: pass a local checkpoint with --pretrained PATH") from None
    pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    return Backbone(name, pretrained, model, tokenize, _image_size(cfg),
                    tuple(pre.get("mean", OPENAI_MEAN)), tuple(pre.get("std", OPENAI_STD)))


def _read_checkpoint(path: Path) -> dict:
    """A state dict saved with ``torch.save`` (possibly under ``"state_dict"``), read with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or one that needs unpickling code
        raise BackboneError(f"--pretrained {path}: cannot read it as weights ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(state, dict):
        raise BackboneError(f"--pretrained {path}: expected a state dict, got a {type(state).__name__}")
    return state.get("state_dict", state)


def config_digest(name: str) -> str:
    """Hash of an architecture's config, part of the pretraining cache key."""
    return json.dumps(model_config(name), sort_keys=True)
