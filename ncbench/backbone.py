"""CLIP dual encoders from open_clip: the tiny built-in models and any named architecture.

Two axes, as in open_clip: an architecture name and where its weights come from (``pretrained``):
an open_clip tag (``openai``), a local checkpoint file (read with ``weights_only=True``), ``embedded``
(the tiny models with a compact vocabulary, pretrained on the synthetic corpus: shipped, or made here and
cached, ncbench/pretrain.py) or ``none`` (random initialisation). Models with open_clip's full BPE vocabulary
(every open_clip architecture, and the built-in ``ncbench-tiny-bpe`` for real-data tests) use open_clip's own
tokenizer.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
from torch import Tensor, nn

from ncbench.architecture import (OPENAI_MEAN, OPENAI_STD, TINY_MODELS, BackboneError, has_compact_vocabulary,
                                  image_size, input_size, model_config)
from ncbench.data import ImageNormalizer
from ncbench.device import select_device
from ncbench.pretrain import pretrained_state
from ncbench.recipe import current_spec
from ncbench.seeding import stable_hash
from ncbench.tokenizer import tiny_tokenizer

__all__ = ["Backbone", "BackboneError", "input_size", "load_backbone", "tiny_tokenizer", "weights_source"]


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


@dataclass(frozen=True)
class ModelImageEmbedder:
    """A model's image embeddings for noise protocols (``ncbench.noise.ImageEmbedder``); loads the model on use."""

    model: str
    pretrained: str
    cache_dir: Path

    @property
    def name(self) -> str:
        spec = asdict(current_spec()) if self.pretrained == "embedded" else None
        return f"{self.model}-{stable_hash(self.model, self.pretrained, spec, length=8)}"

    def embed(self, images: np.ndarray, chunk: int = 256) -> np.ndarray:
        """L2-normalised float32 image embeddings (n_images x d), in eval mode."""
        backbone = load_backbone(self.model, self.pretrained, self.cache_dir)
        device = select_device()
        model = backbone.model.to(device).eval()
        normalize = ImageNormalizer(backbone.mean, backbone.std, backbone.image_size, device)
        with torch.no_grad():
            return torch.cat([model.encode_image(normalize(images[i:i + chunk]), normalize=True).float().cpu()
                              for i in range(0, len(images), chunk)]).numpy()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, dtypes, shapes and values, in order): which weights a run started from."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_backbone(name: str, pretrained: str, cache_dir: Path) -> Backbone:
    """Build ``name`` with weights from ``pretrained`` (tag, file path, ``embedded`` or ``none``)."""
    cfg = model_config(name)
    source = weights_source(name, pretrained)
    tokenize: Callable = tiny_tokenizer(name) if has_compact_vocabulary(name) else open_clip.get_tokenizer(name)
    if name in TINY_MODELS:
        model = open_clip.create_model(name)
        if source == "embedded":
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
    return Backbone(name, pretrained, model, tokenize, image_size(cfg),
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
