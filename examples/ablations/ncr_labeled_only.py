"""Ablation plugin: ``ncr`` without its co-guessed term, i.e. the peer's noisy pairs never train.

Everything else is ``ncr``'s: the same co-divide, the same soft labels on the peer's clean pairs and the same
batch orders (the order seeds are ``ncr``'s), so a difference from ``ncr`` is the co-guessed term's
(docs/methods/ncr.md#co-guessing). Run it as any plugin::

    ncbench run --plugin examples/ablations/ncr_labeled_only.py --method ncr-labeled-only --noise 0.2 \\
        --noise-protocol image-shuffle
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ncbench.methods.ncr import NCR


class NCRLabeledOnly(NCR):
    name = "ncr-labeled-only"
    description = "ncr without the co-guessed unlabeled batches (ablation)"

    def epoch_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        for batch in super().epoch_batches(epoch):
            yield {name: index for name, index in batch.items() if not name.endswith("_unlabeled")}
