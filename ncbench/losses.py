"""Contrastive losses shared by the harness and the methods."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pair_logits(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """``s · cos`` for L2-normalised embeddings; rows are images, columns captions."""
    return logit_scale.exp() * image_emb @ text_emb.t()


def per_pair_infonce(logits: Tensor) -> Tensor:
    """Per-pair symmetric InfoNCE ``½(CE_i2t(i) + CE_t2i(i))`` with in-batch negatives (docs/methods/README.md#notation)."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.t(), target, reduction="none"))


def infonce(logits: Tensor) -> Tensor:
    """The CLIP loss: mean of :func:`per_pair_infonce` over the batch (docs/methods/clip.md#method)."""
    return per_pair_infonce(logits).mean()


def weighted_infonce(logits: Tensor, w: Tensor) -> Tensor:
    """``(1/B) Σ_i w_i · per_pair_infonce_i``: each pair's loss scaled by its weight, averaged over the batch (not over
    the weights); ``w ≡ 1`` is :func:`infonce`."""
    return (w * per_pair_infonce(logits)).mean()


def per_pair_soft_infonce(logits: Tensor, y: Tensor) -> Tensor:
    """Per-pair symmetric cross-entropy against soft targets ``T_ij = y_i·δ_ij + (1 − y_i)/B`` (docs/methods/ncr.md#ncr-a2,
    ``soft_target``): at ``y_i = 1`` it is :func:`per_pair_infonce`; at ``y_i = 0`` pair i's target is uniform."""
    logits, y = logits.float(), y.float()
    target = torch.diag(y) + ((1 - y) / logits.shape[0])[:, None]
    return 0.5 * (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.t(), target, reduction="none"))
