"""GMM small-loss filtering on one CLIP model, re-fit every epoch (docs/methods/gmm-filter.md), and its soft variant."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch import Tensor

from ncbench.losses import pair_logits, per_pair_infonce
from ncbench.method import Batch, Context, Method, shuffled_batches
from ncbench.methods.clip import CLIPFineTune
from ncbench.mixture import DivisionParams, divide, division_threshold


class GmmFilter(CLIPFineTune):
    """``gmm-filter`` (docs/methods/gmm-filter.md): at each epoch start, a 2-component GMM on the min-max normalised
    per-pair InfoNCE (eval mode, seeded random batches) gives each pair's clean posterior ``w``; the epoch then
    trains plain symmetric InfoNCE on shuffled batches of the pairs with ``w`` above the threshold only."""

    name = "gmm-filter"
    description = "per-epoch GMM on per-pair InfoNCE; train only on pairs judged clean (NCR's division, one model)"
    Params = DivisionParams
    supports_distributed = False  # unlike its parent clip: each process would fit its own GMM over every pair

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.w: np.ndarray | None = None  # clean posterior of the latest division

    def on_epoch_start(self, epoch: int) -> None:
        if self.params.fits_at(epoch):
            self.w = divide(self.ctx, self.ctx.models[0], epoch, self.params)

    def epoch_batches(self, epoch: int) -> Iterator[np.ndarray]:
        if self.w is None:  # warm-up: every pair
            return super().epoch_batches(epoch)
        kept = np.flatnonzero(self.w > self.clean_threshold())
        return shuffled_batches(self.ctx.rng, kept, self.ctx.batch_size)

    def clean_scores(self) -> np.ndarray | None:
        """The clean posterior that divided this epoch's pairs (None during warm-up)."""
        return self.w

    def clean_threshold(self) -> float:
        """The threshold of the division actually used (it moves when every pair would be kept)."""
        if self.w is None:
            return self.params.p_threshold
        return division_threshold(self.w, self.params.p_threshold, self.params.min_noisy_frac)

    def state_dict(self) -> dict:
        return {"w": self.w}

    def load_state_dict(self, state: dict) -> None:
        self.w = state["w"]


class GmmWeight(GmmFilter):
    """``gmm-weight`` (docs/methods/gmm-weight.md): every pair is trained, its per-pair InfoNCE weighted by the
    clean posterior ``w`` and normalised by the batch size (not by the sum of ``w``)."""

    name = "gmm-weight"
    description = "per-epoch GMM on per-pair InfoNCE; weight every pair's InfoNCE by its clean posterior"

    def epoch_batches(self, epoch: int) -> Iterator[np.ndarray]:
        return Method.epoch_batches(self, epoch)

    def training_step(self, batch: Batch) -> Tensor:
        if self.w is None:
            return super().training_step(batch)
        model = self.ctx.models[0]
        image, text = model(batch.images, batch.tokens)[:2]
        loss = per_pair_infonce(pair_logits(image, text, model.logit_scale))
        weight = loss.new_tensor(self.w[batch.index.numpy()])
        return (weight * loss).mean()
