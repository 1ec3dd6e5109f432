"""Symmetric cross entropy on CLIP's in-batch matching (an example ncbench method plugin)."""
from __future__ import annotations

from dataclasses import dataclass

from ncbench.losses import infonce, pair_logits
from ncbench.method import Batch, Method, StepOutput


@dataclass(frozen=True)
class SCEParams:
    alpha: float = 1.0  # weight of the cross entropy (InfoNCE)
    beta: float = 1.0  # weight of the reverse cross entropy
    log_zero: float = -4.0  # A: the value log 0 is clipped to in the reverse cross entropy


class SymmetricCE(Method):
    """Symmetric cross entropy (Wang et al., "Symmetric Cross Entropy for Robust Learning with Noisy Labels",
    ICCV 2019, eq. 4-6) applied to each pair's in-batch image->text and text->image classification.

    Loss = alpha * InfoNCE + beta * RCE. The reverse cross entropy swaps prediction and label:
    ``-sum_k p(k) log q(k)`` with the one-hot label ``q`` and ``log 0 := A``, which is ``-A * (1 - p)``
    where ``p`` is the softmax probability of the pair's own partner. It is bounded, so a mismatched
    pair cannot dominate the gradient as it does under InfoNCE alone.
    """

    name = "sce"
    description = "symmetric cross entropy: InfoNCE + bounded reverse CE (Wang et al., ICCV 2019)"
    Params = SCEParams

    def training_step(self, batch: Batch) -> StepOutput:
        model = self.ctx.models[0]
        image, text = model(batch.images, batch.tokens)[:2]
        logits = pair_logits(image, text, model.logit_scale)
        ce = infonce(logits)
        partner = 0.5 * (logits.softmax(dim=1).diagonal() + logits.softmax(dim=0).diagonal())
        rce = (-self.params.log_zero * (1.0 - partner)).mean()
        return StepOutput({"ce": self.params.alpha * ce, "rce": self.params.beta * rce})
