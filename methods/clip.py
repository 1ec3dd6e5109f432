"""Plain CLIP fine-tuning: symmetric InfoNCE on every pair, noisy or not (docs/methods/clip.md)."""
from __future__ import annotations

from torch import Tensor

from ncbench.distributed import gather_features
from ncbench.losses import infonce, pair_logits
from ncbench.method import Batch, Method


class CLIPFineTune(Method):
    """The baseline every noisy-correspondence method must beat: the NPC repository's ``main_CLIP.py``."""

    name = "clip"
    description = "plain CLIP fine-tuning with symmetric InfoNCE (no noise handling)"
    supports_distributed = True  # the loss sees the global batch: features gathered over the processes

    def training_step(self, batch: Batch) -> Tensor:
        model = self.ctx.models[0]
        image, text = gather_features(*model(batch.images, batch.tokens)[:2])
        return infonce(pair_logits(image, text, model.logit_scale))
