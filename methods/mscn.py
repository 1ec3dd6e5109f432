"""MSCN-style meta-correction on CLIP (docs/methods/mscn.md), a method of the "uses clean data" track.

Original: Han et al., "Noisy Correspondence Learning with Meta Similarity Correction", CVPR 2023 (docs/methods/mscn.md#original).
A meta network V_θ on pair features is trained by a bi-level step (virtual step of the projections, binary
cross-entropy on clean positive and negative meta pairs through it, second order) and gives each training pair
a weight γ̂(s) in the InfoNCE; after the warm-up, a Beta mixture initialised from the meta pairs' scores and
fitted by EM on the training scores drops the pairs it judges noisy. It is "MSCN-style" because CLIP's cosine
stays the retrieval score: V_θ only weights the loss and filters data (docs/methods/mscn.md#mscn-a1).

Meta data: the harness's clean subset (``--clean-fraction``, docs/methods/mscn.md#meta-data). Negative meta pairs re-pair a meta
caption with another meta image (the paper's recipe, docs/methods/mscn.md#mscn-15): they are true non-matches by construction and
share captions and images with the positives, so only the pairing tells the classes apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from scipy.special import logsumexp
from torch import Tensor, nn
from torch.func import functional_call

from ncbench.errors import UserError
from ncbench.losses import infonce, pair_logits, weighted_infonce
from ncbench.method import Batch, Context, Method, StepOutput, TrainSet, shuffled_batches
from ncbench.optim import set_lr

SCORE_CLAMP = 1e-3  # docs/methods/mscn.md#purification: scores clamped to [1e-3, 1 - 1e-3] before the Beta fits
CALIBRATION_RIDGE = 1e-4  # on the cosine scale a of V_θ's initial logistic calibration
EM_ITERS, EM_TOL = 10, 1e-2  # docs/methods/mscn.md#purification: at most 10 EM iterations, stop when the log-likelihood gains less than 1e-2
# The "proj" virtual scope (docs/methods/mscn.md#virtual-scope): names of the final image / text projection matrices of open_clip ViT CLIPs.
PROJECTIONS = (("visual.proj",), ("text_projection", "text.text_projection"))


@dataclass(frozen=True)
class MSCNParams:
    """docs/methods/mscn.md#hyper-parameters defaults; MSCN's own values in the comments' brackets."""

    warmup_epochs: int = 1  # [5] plain InfoNCE on every pair; V_θ learns from the meta pairs by direct BCE
    meta_hidden: int = 64  # [64]
    meta_lr: float = 1e-4  # [1.7e-5] Adam on θ in the main stage, scaled by the main lr schedule
    meta_warmup_lr: float = 1e-3  # [2e-4] the same during the warm-up
    meta_batch_size: int = 128  # [64] capped at the training batch; half positives, half negatives
    meta_interval: int = 1  # [1] training steps between meta updates
    meta_order: int = 2  # [2] second order through the virtual step; 1: direct BCE only (an ablation, not MSCN)
    virtual_step: str = "adam"  # adam: P - η·g/(√v̂ + ε) with the real optimizer's moments; sgd: P - η·g [MSCN]
    min_keep_frac: float = 0.2  # purification keeps at least this share of the pairs (the highest scores)

    def __post_init__(self) -> None:
        for name, ok, expected in (
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("meta_hidden", self.meta_hidden >= 1, ">= 1"),
            ("meta_lr", self.meta_lr > 0, "> 0"),
            ("meta_warmup_lr", self.meta_warmup_lr > 0, "> 0"),
            ("meta_batch_size", self.meta_batch_size >= 2, ">= 2"),
            ("meta_interval", self.meta_interval >= 1, ">= 1"),
            ("meta_order", self.meta_order in (1, 2), "1 or 2"),
            ("virtual_step", self.virtual_step in ("adam", "sgd"), "adam or sgd"),
            ("min_keep_frac", 0.0 <= self.min_keep_frac <= 1.0, "in [0, 1]"),
        ):
            if not ok:
                raise UserError(f"--param {name}={getattr(self, name)}: expected {expected}")


class MetaNet(nn.Module):
    """V_θ (docs/methods/mscn.md#meta-net): z = a·cos(u, v) + b + MLP([u ⊙ v; |u − v|]); σ(z) is the probability that the pair corresponds.

    The MLP's last layer starts at zero, so V_θ starts as a logistic calibration of CLIP's cosine. It always
    runs in its own precision (fp32), outside autocast (docs/methods/mscn.md#precision).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        """Logits of the pairs (u_i, v_i) of L2-normalised embeddings."""
        with torch.autocast(u.device.type, enabled=False):
            u, v = u.to(self.bias.dtype), v.to(self.bias.dtype)
            pair = torch.cat([u * v, (u - v).abs()], dim=-1)
            return self.scale * (u * v).sum(-1) + self.bias + self.mlp(pair).squeeze(-1)


def gamma_hat(s: Tensor) -> Tensor:
    """MSCN's self-adaptive margin shape γ̂(s) = s² / (s² + (1 − s)²) (docs/methods/mscn.md#self-adaptive-margin), here a pair's loss weight (docs/methods/mscn.md#weights)."""
    return s.square() / (s.square() + (1 - s).square())


def project(pooled: Tensor, proj: Tensor) -> Tensor:
    """L2-normalised embeddings from a tower's pooled features and its projection matrix."""
    return F.normalize(pooled @ proj, dim=-1)


def virtual_projections(meta_net: MetaNet, pooled: Sequence[Tensor], proj: Sequence[Tensor], logit_scale: Tensor,
                        lr: float, v_hat: Sequence[Tensor | None] | None, eps: float) -> list[Tensor]:
    """STEP 1 (MSCN paper Eq. 7; docs/methods/mscn.md#virtual-step): the virtual projections P' as a differentiable function of θ.

    g = ∂L/∂P of the γ̂(σ(V_θ))-weighted InfoNCE, with the graph kept (``create_graph``); P' = P − η·g/(√v̂ + ε)
    (Adam-preconditioned; a ``None`` entry of ``v_hat`` uses g², Adam's first step) or, with ``v_hat=None``,
    P − η·g (MSCN's SGD). The trunk features, P, v̂ and the logit scale enter as constants: only g carries θ.
    """
    leaves = [p.detach().requires_grad_() for p in proj]
    u, v = (project(x.detach(), p) for x, p in zip(pooled, leaves))
    w = gamma_hat(torch.sigmoid(meta_net(u.detach(), v.detach())))
    grads = torch.autograd.grad(weighted_infonce(pair_logits(u, v, logit_scale.detach()), w), leaves, create_graph=True)
    if v_hat is None:
        return [p.detach() - lr * g for p, g in zip(proj, grads)]
    return [p.detach() - lr * g / ((g.detach().square() if vh is None else vh).sqrt() + eps)
            for p, g, vh in zip(proj, grads, v_hat)]


def meta_bce(meta_net: MetaNet, pooled: Sequence[Tensor], proj: Sequence[Tensor],
             labels: Tensor) -> tuple[Tensor, Tensor]:
    """STEP 2's loss (MSCN paper Eq. 8; docs/methods/mscn.md#meta-update): BCE of V_θ on meta pairs embedded with ``proj`` (virtual or current); the logits."""
    z = meta_net(project(pooled[0], proj[0]), project(pooled[1], proj[1]))
    return F.binary_cross_entropy_with_logits(z, labels.to(z.dtype)), z


def fit_beta(x: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """Beta (α, β) by the (weighted) method of moments (docs/methods/mscn.md#purification): α = μ·c, β = (1 − μ)·c, c = μ(1 − μ)/σ² − 1."""
    mean = float(np.average(x, weights=weights))
    var = max(float(np.average((x - mean) ** 2, weights=weights)), 1e-12)
    common = mean * (1 - mean) / var - 1
    return mean * common, (1 - mean) * common


def _mixture_posterior(x: np.ndarray, beta: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Responsibilities (N, 2) of [noisy, clean] and the total log-likelihood."""
    log_joint = np.log(weights) + stats.beta.logpdf(x[:, None], beta[:, 0], beta[:, 1])
    total = logsumexp(log_joint, axis=1)
    return np.exp(log_joint - total[:, None]), float(total.sum())


def purify(scores: np.ndarray, meta_pos: np.ndarray, meta_neg: np.ndarray,
           min_keep_frac: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """Data purification (docs/methods/mscn.md#purification): each training pair's clean posterior, the kept mask, and whether EM was used.

    Scores are clamped to [1e-3, 1 − 1e-3]; Betas fitted by moments to the negative and positive meta scores
    make an equal-weight [noisy, clean] mixture, refined by EM on the training scores (≤ 10 iterations, stop
    at a log-likelihood gain < 1e-2); pairs with posterior > 0.5 are kept. Guards (docs/methods/mscn.md#purification): if EM yields
    non-finite or non-positive parameters, or a clean mean below the noisy one, the meta-initialised mixture is
    used as is; if fewer than ``min_keep_frac`` of the pairs are kept, the highest-scoring share is kept.
    """
    x, pos, neg = (np.clip(np.asarray(a, dtype=np.float64), SCORE_CLAMP, 1 - SCORE_CLAMP)
                   for a in (scores, meta_pos, meta_neg))
    init = np.array([fit_beta(neg), fit_beta(pos)]), np.array([0.5, 0.5])
    beta, weights = init
    resp, ll = _mixture_posterior(x, beta, weights)
    for _ in range(EM_ITERS):
        beta = np.array([fit_beta(x, resp[:, k]) for k in range(2)])
        weights = resp.mean(axis=0)
        if not (np.isfinite(beta).all() and (beta > 0).all() and (weights > 0).all()):
            break
        resp, new_ll = _mixture_posterior(x, beta, weights)
        if new_ll - ll < EM_TOL:
            break
        ll = new_ll
    means = beta[:, 0] / beta.sum(axis=1)
    used_em = bool(np.isfinite(beta).all() and (beta > 0).all() and (weights > 0).all() and means[1] >= means[0]
                   and np.isfinite(resp).all())
    if not used_em:
        resp, _ = _mixture_posterior(x, *init)
    p_clean = resp[:, 1]
    keep = p_clean > 0.5
    least = math.ceil(min_keep_frac * len(x))
    if keep.sum() < least:
        keep = np.zeros(len(x), dtype=bool)
        keep[np.argsort(-x, kind="stable")[:least]] = True
    return p_clean, keep, used_em


def projection_names(model: nn.Module) -> list[str]:
    """The image and text projection matrices of an open_clip ViT CLIP (the "proj" virtual scope, docs/methods/mscn.md#virtual-scope)."""
    params = dict(model.named_parameters())
    names = [next((n for n in options if n in params and params[n].ndim == 2), None) for options in PROJECTIONS]
    if None in names:
        raise UserError(f"mscn: model {type(model).__name__} lacks the projection matrices {PROJECTIONS}; "
                        "its virtual step needs an open_clip ViT CLIP (--model)")
    return names


class _Towers(nn.Module):
    """Both encoders of an open_clip model, unnormalised; with identity projections they give the pooled features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.encode_image(images), self.model.encode_text(tokens)


class MSCN(Method):
    """MSCN-style meta-correction (docs/methods/mscn.md#one-step): warm-up, then per epoch purification and bi-level steps."""

    name = "mscn"
    description = "MSCN-style meta-correction: meta-learned pair weights and Beta-mixture purification (clean data)"
    Params = MSCNParams
    uses_clean_subset = True

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        if ctx.clean_subset is None or len(ctx.clean_subset.images) < 2:
            raise UserError("mscn needs a clean subset of at least 2 images (--clean-fraction > 0)")
        model = ctx.models[0]
        names = projection_names(model)
        params = dict(model.named_parameters())
        self.proj = [params[n] for n in names]
        self.towers = _Towers(model)
        self.identity = {f"model.{n}": torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
                         for n, p in zip(names, self.proj)}
        self.meta_net = MetaNet(self.proj[0].shape[1], self.params.meta_hidden).to(ctx.device)
        self.meta_opt = torch.optim.Adam(self.meta_net.parameters(), lr=self.params.meta_warmup_lr)
        self.n_meta = len(ctx.clean_subset)
        self.labels = torch.cat([torch.ones(self.n_meta), torch.zeros(self.n_meta)]).to(ctx.device)
        self.epoch, self.step = 0, 0
        self.keep, self.p_clean = np.ones(len(ctx.train), dtype=bool), None
        self._resample_negatives()
        self._calibrate()

    # --- meta data -----------------------------------------------------------------------------------------
    def _resample_negatives(self) -> None:
        """One negative per meta caption: another meta image, uniformly (docs/methods/mscn.md#meta-data: 1:1, resampled every epoch)."""
        clean = self.ctx.clean_subset
        other = self.ctx.rng.integers(len(clean.images) - 1, size=self.n_meta)
        self._set_negatives(other + (other >= clean.pair_image))

    def _set_negatives(self, neg_image: np.ndarray) -> None:
        """The meta set: pairs 0..M-1 the clean positives, M..2M-1 their captions on the images ``neg_image``."""
        clean = self.ctx.clean_subset
        self.neg_image = neg_image
        self.meta = TrainSet(clean.images, torch.cat([clean.tokens, clean.tokens]),
                             np.concatenate([clean.pair_image, neg_image]), clean.normalize)

    def _meta_batch(self) -> tuple[Batch, Tensor]:
        """A stratified meta batch: half positives, half negatives, each drawn without replacement."""
        half = min(self.params.meta_batch_size, self.ctx.batch_size) // 2
        half = max(min(half, self.n_meta), 1)
        index = np.concatenate([self.ctx.rng.choice(self.n_meta, half, replace=False),
                                self.n_meta + self.ctx.rng.choice(self.n_meta, half, replace=False)])
        return self.meta.batch(index), self.labels[torch.from_numpy(index).to(self.ctx.device)]

    @torch.no_grad()
    def _embed_meta(self) -> tuple[Tensor, Tensor]:
        """Embeddings (u, v) of every meta pair, positives then negatives, in eval mode."""
        img, txt = self.ctx.encode(self.ctx.models[0], self.ctx.clean_subset)
        return img[torch.from_numpy(self.meta.pair_image).to(img.device)], torch.cat([txt, txt])

    def _calibrate(self) -> None:
        """Initial (a, b): logistic regression of the meta labels on CLIP's cosines of the meta pairs (docs/methods/mscn.md#meta-net), with a
        tiny ridge on a that keeps it finite when CLIP already separates the meta pairs."""
        u, v = self._embed_meta()
        cos = (u * v).sum(-1)
        ab = [self.meta_net.scale, self.meta_net.bias]
        lbfgs = torch.optim.LBFGS(ab, max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            lbfgs.zero_grad()
            loss = F.binary_cross_entropy_with_logits(ab[0] * cos + ab[1], self.labels) + CALIBRATION_RIDGE * ab[0] ** 2
            loss.backward()
            return loss

        lbfgs.step(closure)
        lbfgs.zero_grad()

    # --- hooks ---------------------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Purify with the current negatives after the warm-up (docs/methods/mscn.md#purification), then resample the negatives (docs/methods/mscn.md#one-step)."""
        self.epoch = epoch
        if epoch >= self.params.warmup_epochs:
            self._purify()
        self._resample_negatives()

    @torch.no_grad()
    def _purify(self) -> None:
        img, txt = self.ctx.encode_train(self.ctx.models[0])
        scores = torch.sigmoid(self.meta_net(img[torch.from_numpy(self.ctx.train.pair_image).to(img.device)], txt))
        meta = torch.sigmoid(self.meta_net(*self._embed_meta()))
        self.p_clean, self.keep, self.used_em = purify(scores.cpu().numpy(), meta[:self.n_meta].cpu().numpy(),
                                                       meta[self.n_meta:].cpu().numpy(), self.params.min_keep_frac)

    def epoch_batches(self, epoch: int) -> Iterator[np.ndarray]:
        return shuffled_batches(self.ctx.rng, np.flatnonzero(self.keep), self.ctx.batch_size)

    def _pooled(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled features before the projections: the towers run with identity matrices in their place."""
        return functional_call(self.towers, self.identity, (images, tokens))

    def training_step(self, batch: Batch) -> StepOutput:
        """Meta update every ``meta_interval`` steps (STEPS 1–2), then the real loss with the new θ (STEP 3)."""
        model = self.ctx.models[0]
        main = self.epoch >= self.params.warmup_epochs
        pooled = self._pooled(batch.images, batch.tokens)  # the trunk runs once, for the meta step and the real step
        logs = self._meta_update(pooled, main) if self.step % self.params.meta_interval == 0 else {}
        self.step += 1
        u, v = (project(x, p) for x, p in zip(pooled, self.proj))
        if not main:
            return StepOutput({"loss": infonce(pair_logits(u, v, model.logit_scale))}, logs)
        with torch.no_grad():
            w = gamma_hat(torch.sigmoid(self.meta_net(u, v)))
        return StepOutput({"loss": weighted_infonce(pair_logits(u, v, model.logit_scale), w)},
                          {"weight": w.mean(), "kept": float(self.keep.mean()), "em_used": float(self.used_em), **logs})

    def _meta_update(self, pooled: tuple[Tensor, Tensor], main: bool) -> dict[str, Tensor]:
        """STEPS 1–2 (MSCN paper Eq. 7–8; docs/methods/mscn.md#one-step): P' from a virtual step (main stage, ``meta_order`` 2; otherwise P), BCE
        of V_θ on a meta batch at P', one Adam step on θ. No gradient reaches the CLIP model."""
        lr = self.ctx.current_lr
        proj = [p.detach() for p in self.proj]
        if main and self.params.meta_order == 2:
            v_hat = None if self.params.virtual_step == "sgd" else [self.ctx.second_moment(p) for p in self.proj]
            proj = virtual_projections(self.meta_net, pooled, self.proj, self.ctx.models[0].logit_scale, lr,
                                       v_hat, self.ctx.adam_eps)
        batch, labels = self._meta_batch()
        with torch.no_grad():
            pooled_meta = self._pooled(batch.images, batch.tokens)
        loss, z = meta_bce(self.meta_net, pooled_meta, proj, labels)
        base = self.params.meta_lr if main else self.params.meta_warmup_lr
        set_lr(self.meta_opt, base * lr / self.ctx.lr)  # the main lr schedule (docs/methods/mscn.md#hyper-parameters)
        self.meta_opt.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.meta_net.parameters()))
        self.meta_opt.step()
        return {"meta_bce": loss.detach(), "meta_acc": ((z.detach() > 0) == (labels > 0.5)).float().mean()}

    def clean_scores(self) -> np.ndarray | None:
        """The purification's clean posterior of every training pair (None during the warm-up)."""
        return self.p_clean

    def state_dict(self) -> dict:
        return {"meta_net": self.meta_net.state_dict(), "meta_opt": self.meta_opt.state_dict(), "step": self.step,
                "neg_image": self.neg_image, "keep": self.keep, "p_clean": self.p_clean}

    def load_state_dict(self, state: dict) -> None:
        self.meta_net.load_state_dict(state["meta_net"])
        self.meta_opt.load_state_dict(state["meta_opt"])
        self.step, self.keep, self.p_clean = state["step"], state["keep"], state["p_clean"]
        self._set_negatives(state["neg_image"])
