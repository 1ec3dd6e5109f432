"""DECL, Deep Evidential Cross-modal Learning, on CLIP (docs/methods/decl.md).

Qin, Peng, Peng, Wang, Hu, "Deep Evidential Learning with Noisy Correspondence for Cross-Modal Retrieval",
ACM MM 2022 (doi:10.1145/3503161.3547922); official code https://github.com/QinYang79/DECL
(``2022-ACMMM-DECL/model/DECL.py``: ``mse_loss``, ``KL``, ``RDH_loss``, ``train_batch``; ``train.py``:
``get_correspondence``). Each row (column) of a batch's similarity matrix is a B-way classification whose evidence
``exp(S/τ_e)`` parameterises a Dirichlet; the EDL loss with a one-hot target (all zeros for a pair judged noisy)
plus a robust dynamic hinge (RDH) on pairs judged clean; once per epoch, a pair is judged clean when its own
bidirectional evidence is the largest of its row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ncbench.errors import UserError
from ncbench.method import Batch, Context, Method, StepOutput
from ncbench.seeding import derive_seed

KEPT_RATIO = 1.0 - 1e-6  # a pair is kept (judged clean) when its evidence ratio is 1, i.e. above this


@dataclass(frozen=True)
class DECLParams:
    """DECL's hyper-parameters (docs/methods/decl.md#hyper-parameters); defaults are the paper's unless noted."""

    tau: float = 0.1  # τ of the evidence exp(S/τ) (DECL: 0.1, on tanh of SGRAF scores; here on CLIP cosines)
    lambda1: float = 0.8  # weight of the RDH term
    lambda2: float = 0.1  # weight of the KL term of the EDL loss
    margin: float = 0.2  # RDH hinge margin
    mu: int = 5  # the fewest hardest negatives RDH anneals to
    anneal_frac: float = 0.5  # ncbench: k reaches mu after this fraction of all steps; 0 uses the fixed eta
    eta: float = 0.025  # DECL's annealing step (negatives dropped per step); only used when anneal_frac = 0
    warmup_epochs: int = 0  # epochs treating every pair as clean before the first division (DECL F30K: 2-5 of 40)

    def __post_init__(self) -> None:
        for name, ok, expected in (
            ("tau", self.tau > 0, "> 0"),
            ("lambda1", self.lambda1 >= 0, ">= 0"),
            ("lambda2", self.lambda2 >= 0, ">= 0"),
            ("margin", self.margin >= 0, ">= 0"),
            ("mu", self.mu >= 1, ">= 1"),
            ("anneal_frac", 0.0 <= self.anneal_frac <= 1.0, "in [0, 1]"),
            ("eta", self.eta >= 0, ">= 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
        ):
            if not ok:
                raise UserError(f"--param {name}={getattr(self, name)}: expected {expected}")


def evidence(sim: Tensor, tau: float) -> Tensor:
    """DECL's evidence ``e_ij = exp(S_ij / τ)`` of a cosine matrix (float32: exp(1/τ) overflows half precision)."""
    return torch.exp(sim.float() / tau)


def kl_to_uniform_dirichlet(alpha: Tensor) -> Tensor:
    """Per row, KL(Dir(α) ‖ Dir(1, ..., 1)) over the C columns of ``alpha`` (DECL ``KL``)."""
    strength = alpha.sum(1)
    return (torch.lgamma(strength) - torch.lgamma(alpha).sum(1) - math.lgamma(alpha.shape[1])
            + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(strength)[:, None])).sum(1))


def edl_loss(alpha: Tensor, target: Tensor, lambda2: float) -> Tensor:
    """Per row, DECL's EDL loss (``mse_loss``) of Dirichlet parameters ``alpha`` (B, C) against ``target`` (B, C):

    ``Σ_k (y_k − m_k)² + Σ_k m_k(1 − m_k)/(S + 1) + λ2·KL(Dir(α̃) ‖ Dir(1))`` with ``S = Σ_k α_k``, ``m = α/S`` and
    ``α̃ = (α − 1)(1 − y) + 1`` (the target's evidence removed)."""
    strength = alpha.sum(1, keepdim=True)
    m = alpha / strength
    tilde = (alpha - 1) * (1 - target) + 1
    return ((target - m) ** 2).sum(1) + (m * (1 - m) / (strength + 1)).sum(1) + lambda2 * kl_to_uniform_dirichlet(tilde)


def rdh(sim: Tensor, margin: float, k: int) -> Tensor:
    """Per pair, the robust dynamic hinge (``RDH_loss``): the mean of the ``k`` largest hinge costs
    ``(m + S_ij − S_ii)_+`` over captions j plus that of the ``k`` largest ``(m + S_ji − S_ii)_+`` over images j."""
    diag = sim.diag()
    off = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    cost_i2t = (margin + sim - diag[:, None]).clamp(min=0).masked_fill(off, 0)
    cost_t2i = (margin + sim.t() - diag[:, None]).clamp(min=0).masked_fill(off, 0)
    return (cost_i2t.topk(k, dim=1).values.sum(1) + cost_t2i.topk(k, dim=1).values.sum(1)) / k


def hardness(step: int, batch_size: int, eta: float, mu: int, rows: int) -> int:
    """RDH's number of negatives at 1-based ``step``: ``max(⌊B − η·step⌋, μ)``, at most ``rows − 1``."""
    return max(min(max(int(batch_size - eta * step), mu), rows - 1), 1)


def uncertainty(e: Tensor) -> Tensor:
    """Per pair, DECL's uncertainty ``u = B/S^{i2t} + B/S^{t2i}`` of an evidence matrix, with ``S`` the Dirichlet
    strength ``Σ(e + 1)`` of the pair's row (image to captions) and of its column (caption to images)."""
    b = e.shape[1]
    return b / (e + 1).sum(1) + b / (e + 1).sum(0)


def evidence_ratio(sim: Tensor, tau: float) -> Tensor:
    """Per pair of one batch, ``Ē_ii / max_j Ē_ij`` with ``Ē = E + Eᵀ``, the bidirectional evidence of
    ``get_correspondence``.

    DECL judges pair i clean iff ``argmax_j Ē_ij = i``, i.e. iff the ratio is 1; ncbench keeps the ratio as the clean
    score (DECL's own ``norm_e`` diagonal divides by the row sum instead and is not thresholded)."""
    both = evidence(sim, tau)
    both = both + both.t()
    return both.diag() / both.max(1).values


class DECL(Method):
    """``decl``: one model; per epoch DECL's evidential division of every pair (eval mode, seeded random batches of
    the training batch size); each step the EDL loss in both directions (noisy pairs' targets all zero) plus λ1 × the
    RDH of the batch's clean pairs, summed over them as in the official code."""

    name = "decl"
    description = "DECL: evidential (Dirichlet) loss on cosine evidence, annealed hard-negative hinge, argmax division"
    Params = DECLParams

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.step = 0  # DECL's step counter; it runs across warm-up and training and drives RDH's annealing
        self.ratio: np.ndarray | None = None  # evidence ratio of the latest division (clean iff 1)
        steps = ctx.epochs * (len(ctx.train) // ctx.batch_size)
        p = self.params
        self.eta = (ctx.batch_size - p.mu) / max(p.anneal_frac * steps, 1.0) if p.anneal_frac > 0 else p.eta

    @torch.no_grad()
    def on_epoch_start(self, epoch: int) -> None:
        if epoch < self.params.warmup_epochs:
            return
        img, txt = self.ctx.encode_train(self.ctx.models[0])
        pair_image = torch.from_numpy(self.ctx.train.pair_image).to(self.ctx.device)
        order = np.random.default_rng(derive_seed("decl-division", self.ctx.seed, epoch)).permutation(len(txt))
        ratio = torch.empty(len(txt))
        for chunk in torch.from_numpy(order).split(self.ctx.batch_size):
            rows = chunk.to(self.ctx.device)
            ratio[chunk] = evidence_ratio(img[pair_image[rows]] @ txt[rows].t(), self.params.tau).cpu()
        self.ratio = ratio.numpy()

    def training_step(self, batch: Batch) -> StepOutput:
        p = self.params
        self.step += 1
        model = self.ctx.models[0]
        image, text = model(batch.images, batch.tokens)[:2]
        sim = image.float() @ text.float().t()
        rows = len(sim)
        clean = (torch.ones(rows, dtype=torch.bool) if self.ratio is None
                 else torch.from_numpy(self.ratio[batch.index.numpy()] > KEPT_RATIO)).to(sim.device)
        target = torch.diag(clean.float())
        e = evidence(sim, p.tau)
        loss_edl = (edl_loss(e + 1, target, p.lambda2) + edl_loss(e.t() + 1, target, p.lambda2)).mean()
        k = hardness(self.step, self.ctx.batch_size, self.eta, p.mu, rows)
        loss_rdh = p.lambda1 * rdh(sim, p.margin, k)[clean].sum()
        return StepOutput(losses={"edl": loss_edl, "rdh": loss_rdh},
                          report={"hardness": float(k), "clean_frac": clean.float().mean(),
                                  "uncertainty": uncertainty(e.detach()).mean()})

    def clean_scores(self) -> np.ndarray | None:
        """The evidence ratio ``Ē_ii / max_j Ē_ij`` of the latest division (None during warm-up)."""
        return self.ratio

    def clean_threshold(self) -> float:
        """Kept = judged clean by the division: ratio 1."""
        return KEPT_RATIO

    def state_dict(self) -> dict:
        return {"step": self.step, "ratio": self.ratio}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.ratio = state["step"], state["ratio"]
