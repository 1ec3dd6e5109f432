"""The compact tokenizer of the tiny built-in models: open_clip's BPE remapped onto the synthetic world's words."""
from __future__ import annotations

import numpy as np
import open_clip
import torch
from torch import Tensor

from ncbench.architecture import BackboneError, model_config


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


def tiny_tokenizer(name: str) -> CompactTokenizer:
    """The compact tokenizer of tiny model ``name`` over the synthetic world's vocabulary."""
    from ncbench.datasets.synthetic import VOCABULARY

    text = model_config(name)["text_cfg"]
    return CompactTokenizer(VOCABULARY, text["vocab_size"], text["context_length"])
