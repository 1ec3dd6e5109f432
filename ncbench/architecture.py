"""open_clip architecture configs: the built-in tiny models, what they take as input, and the digest naming a config.

Importing this module registers the tiny configs (ncbench/model_configs) with open_clip and sends open_clip's log
messages to the ``open_clip`` logger (warnings off); the root logger is left to the application.
"""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import open_clip

from ncbench.errors import UserError

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BPE_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer vocabulary; smaller text vocabularies use CompactTokenizer
OPEN_CLIP_LOGGER = logging.getLogger("open_clip")


class BackboneError(UserError):
    """A model or its weights cannot be had; the message is one line for the user."""


def _quiet_open_clip() -> None:
    """open_clip logs through the module-level ``logging.warning`` etc., i.e. the root logger (which that call also
    configures), warning for every model built without weights: give its modules the ``open_clip`` logger instead."""
    OPEN_CLIP_LOGGER.setLevel(logging.ERROR)
    for name in ("factory", "model", "timm_model"):
        module = importlib.import_module(f"open_clip.{name}")
        if getattr(module, "logging", None) is logging:
            module.logging = OPEN_CLIP_LOGGER


open_clip.add_model_config(CONFIG_DIR)
_quiet_open_clip()


def model_config(name: str) -> dict:
    """open_clip's config of architecture ``name``; a :class:`BackboneError` for an unknown name."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise BackboneError(f"unknown model {name!r}; built-in tiny models: {', '.join(TINY_MODELS)}, "
                            f"or any of open_clip.list_models()")
    return cfg


def image_size(cfg: dict) -> int:
    """The square image size of an architecture config."""
    size = cfg["vision_cfg"].get("image_size", 224)
    return size if isinstance(size, int) else size[0]


def input_size(name: str) -> int:
    """The square image size architecture ``name`` takes."""
    return image_size(model_config(name))


def has_compact_vocabulary(name: str) -> bool:
    """A built-in tiny config with a vocabulary smaller than open_clip's BPE: the synthetic world's tokenizer."""
    return name in TINY_MODELS and model_config(name)["text_cfg"]["vocab_size"] < BPE_VOCAB_SIZE


def config_digest(name: str) -> str:
    """Canonical JSON of an architecture's config: hashed into run ids and the embedded weights' key."""
    return json.dumps(model_config(name), sort_keys=True)
