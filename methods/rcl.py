"""RCL, Robust Cross-modal Learning by complementary contrastive learning, on CLIP (docs/methods/rcl.md).

Hu, Huang, Peng, Wang, Peng, "Cross-Modal Retrieval With Partially Mismatched Pairs", IEEE TPAMI 45(8), 2023;
official code https://github.com/penghu-cs/RCL (``RCL-SGRAF/model.py``: ``CCL.forward``). Instead of pulling each
positive up, the loss pushes down the softmax probability of every in-batch negative ("caption j is not image i's
match", a complementary label that is almost never wrong); a mismatched positive then gets only a bounded gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ncbench.errors import UserError
from ncbench.losses import pair_logits
from ncbench.method import Batch, Method

EPS = 1e-10  # as in CCL.forward: inside log(1 − P + eps)
FORMS = ("log", "tan", "abs", "exp", "gce")


@dataclass(frozen=True)
class RCLParams:
    """RCL's hyper-parameters (docs/methods/rcl.md#hyper-parameters)."""

    form: str = "log"  # complementary loss h(P) of a negative's probability: log (RCL's default), tan, abs, exp, gce
    tau: float = 0.0  # 0: CLIP's own logit scale is 1/τ (ncbench default); > 0: fixed τ on cosines (RCL: 0.05)
    ratio: float = -1.0  # share of each row's negatives used; outside (0, 1): all of them (RCL's default -1)
    q: float = 0.2  # exponent of the gce form (RCL passes its --margin, 0.2)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise UserError(f"--param form={self.form}: expected one of {', '.join(FORMS)}")
        if self.tau < 0:
            raise UserError(f"--param tau={self.tau}: expected >= 0")
        if not 0 < self.q <= 1:
            raise UserError(f"--param q={self.q}: expected in (0, 1]")


def complementary(p: Tensor, form: str, q: float = 0.2) -> Tensor:
    """RCL's complementary penalty of a negative's softmax probability ``p`` (``CCL.forward``): log ``−log(1 − p)``,
    tan ``tan p``, abs ``p``, exp ``exp(−(1 − p))``, gce ``(1 − (1 − p)^q)/q``; each grows with p."""
    if form == "log":
        return -torch.log(1 - p + EPS)
    if form == "tan":
        return torch.tan(p)
    if form == "abs":
        return p
    if form == "exp":
        return torch.exp(p - 1)
    return (1 - (1 - p + EPS) ** q) / q


def negative_mask(rows: int, ratio: float, rng: np.random.Generator) -> Tensor:
    """Which off-diagonal entries each row penalises: all of them, or ``⌊ratio·B⌋`` drawn per row when
    ``0 < ratio < 1``."""
    mask = ~torch.eye(rows, dtype=torch.bool)
    if not 0 < ratio < 1:
        return mask
    keys = rng.random((rows, rows))
    np.fill_diagonal(keys, -1.0)  # as CCL.forward: random keys, the diagonal below every other, top ⌊ratio·B⌋ per row
    chosen = torch.zeros(rows, rows, dtype=torch.bool)
    chosen[torch.arange(rows)[:, None], torch.from_numpy(np.argsort(-keys, axis=1)[:, :int(ratio * rows)])] = True
    return chosen


def ccl(logits: Tensor, mask: Tensor, form: str = "log", q: float = 0.2) -> Tensor:
    """Complementary contrastive loss: ``mean_i Σ_{j∈N_i} h(P^{i2t}_ij) + mean_j Σ_{i∈N_j} h(P^{t2i}_ji)`` with
    ``P^{i2t} = softmax`` over each row of ``logits`` (image to captions) and ``P^{t2i}`` over each column; the two
    directions are summed, not averaged, as in ``CCL.forward``. ``mask`` marks each row's negatives (both directions
    use it, indexed by the anchor)."""
    logits = logits.float()
    mask = mask.to(logits.device)
    i2t = complementary(logits.softmax(1), form, q)
    t2i = complementary(logits.t().softmax(1), form, q)
    return (i2t * mask).sum(1).mean() + (t2i * mask).sum(1).mean()


class RCL(Method):
    """``rcl``: one model, every pair, CCL instead of InfoNCE on ``s·cos`` (s = CLIP's trained logit scale, or
    1/τ when ``tau`` > 0). Nothing else changes: no division, no warm-up, no second model."""

    name = "rcl"
    description = "RCL: complementary contrastive loss (push every in-batch negative down, never pull the positive)"
    Params = RCLParams

    def training_step(self, batch: Batch) -> Tensor:
        p = self.params
        model = self.ctx.models[0]
        image, text = model(batch.images, batch.tokens)[:2]
        if p.tau > 0:
            logits = image.float() @ text.float().t() / p.tau
        else:
            logits = pair_logits(image.float(), text.float(), model.logit_scale.float())
        return ccl(logits, negative_mask(len(logits), p.ratio, self.ctx.rng), p.form, p.q)
