"""BiCro, Bi-directional Cross-modal similarity consistency, on CLIP (docs/methods/bicro.md).

Yang, Xu, Wang, You, Yao, Liu, Xu, "BiCro: Noisy Correspondence Rectification for Multi-modality Data via
Bi-directional Cross-modal Similarity Consistency", CVPR 2023; official code https://github.com/xu5zhao/BiCro
(``co_train.py``: ``BetaMixture1D``, ``eval_train``, ``train``, ``split_prob``; ``model.py``: ``ContrastiveLoss``
modes ``predict_clean``/``warmup_sele``, ``SGRAF.predict``, ``SIM_PAIR``, ``SIM_SELE``). NCR's co-divided pair of
models (methods/ncr.py) with a Beta mixture for the division and soft labels from anchor consistency: a pair is
probably matched when its image and its caption are as similar to a confident anchor pair's image and caption.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from scipy.special import logsumexp
from torch import Tensor, nn

from ncbench.errors import UserError
from ncbench.losses import pair_logits, per_pair_infonce
from ncbench.method import Batch, StepOutput
from ncbench.methods.mscn import fit_beta
from ncbench.methods.ncr import MODELS, CoDivided, NCRParams
from ncbench.mixture import divide as gmm_divide
from ncbench.seeding import derive_seed

MIXTURES = ("bmm", "gmm")
BMM_CLAMP = 1e-4  # BetaMixture1D.fit: losses clamped to [1e-4, 1 − 1e-4]


@dataclass(frozen=True)
class BiCroParams(NCRParams):
    """The division and soft-loss parameters of ``ncr`` (``alpha`` is the anchor confidence's margin) plus BiCro's
    (docs/methods/bicro.md#hyper-parameters; defaults of the official ``train_f30k.sh``)."""

    mixture: str = "bmm"  # the division's mixture: bmm (BiCro) or gmm (NCR's, with the gmm_* settings)
    bmm_max_iter: int = 10  # EM iterations of the Beta mixture
    noise_tem: float = 0.5  # soft labels at or below this are set to 0 (BiCro's noise_soft); 0 keeps them all
    warmup_rate: float = 0.3  # warm-up trains only this share of each batch's smallest losses
    center: bool = True  # ncbench: consistency cosines of embeddings centred on the labeled batch's means

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixture not in MIXTURES:
            raise UserError(f"--param mixture={self.mixture}: expected one of {', '.join(MIXTURES)}")
        for name, ok, expected in (
            ("bmm_max_iter", self.bmm_max_iter >= 1, ">= 1"),
            ("noise_tem", 0.0 <= self.noise_tem < 1.0, "in [0, 1)"),
            ("warmup_rate", 0.0 < self.warmup_rate <= 1.0, "in (0, 1]"),
        ):
            if not ok:
                raise UserError(f"--param {name}={getattr(self, name)}: expected {expected}")


def bmm_clean_posterior(losses: np.ndarray, max_iter: int = 10) -> np.ndarray:
    """Clean posterior of each pair under BiCro's 2-component Beta mixture (``BetaMixture1D``).

    Losses are min-max normalised and clamped to [1e-4, 1 − 1e-4]; EM starts at Beta(1, 2) and Beta(2, 1) with
    weights ½, ½ and fits each component by weighted moments (responsibilities floored at 1e-12, as the official
    code). The clean posterior is that of the lower-mean component, evaluated at the clamped losses.
    """
    losses = np.asarray(losses, dtype=np.float64).ravel()
    span = losses.max() - losses.min()
    x = np.clip((losses - losses.min()) / span if span > 0 else np.zeros_like(losses), BMM_CLAMP, 1 - BMM_CLAMP)
    beta, weight = np.array([[1.0, 2.0], [2.0, 1.0]]), np.array([0.5, 0.5])
    for _ in range(max_iter):
        r = np.maximum(weight[:, None] * stats.beta.pdf(x[None, :], beta[:, :1], beta[:, 1:]), 1e-12)
        r /= r.sum(0)
        beta = np.array([fit_beta(x, r[k]) for k in range(2)])
        weight = r.sum(1) / r.sum()
    log_joint = np.log(weight)[:, None] + stats.beta.logpdf(x[None, :], beta[:, :1], beta[:, 1:])
    clean = int(np.argmin(beta[:, 0] / beta.sum(1)))
    return np.exp(log_joint[clean] - logsumexp(log_joint, axis=0))


def anchor_confidence(sim: Tensor, alpha: float) -> Tensor:
    """NCR's confidence without its normalisation (``ContrastiveLoss`` mode ``predict_clean``):
    ``clamp(α − ½(mean_j h^s_ij + mean_j h^im_ji), 0, α)`` on a batch's cosine matrix (diagonal counted as 0)."""
    diag = sim.diag()
    cost_s = (alpha + sim - diag[:, None]).clamp(min=0).fill_diagonal_(0)
    cost_im = (alpha + sim - diag[None, :]).clamp(min=0).fill_diagonal_(0)
    return (alpha - 0.5 * (cost_s.mean(1) + cost_im.mean(0))).clamp(0, alpha)


def consistency(query: Tensor, other: Tensor) -> Tensor:
    """Per row n, BiCro's similarity consistency (``SIM_SELE``): with ``a* = argmax_a query[n, a]`` (the nearest
    anchor in the query modality), ``min(c_q/c_o, c_o/c_q)`` of ``c_q = query[n, a*]`` and ``c_o = other[n, a*]``,
    clipped to [0, 1] (opposite signs are inconsistent: 0)."""
    c_q, nearest = query.max(1)
    c_o = other.gather(1, nearest[:, None]).squeeze(1)
    ratio = c_q / c_o
    ratio = torch.where(ratio < 1, ratio, 1 / ratio)
    return torch.nan_to_num(ratio, nan=0.0).clamp(0, 1)


def soft_labels(image: Tensor, text: Tensor, alpha: float, noise_tem: float, image_u: Tensor | None = None,
                text_u: Tensor | None = None, center: bool = False) -> tuple[Tensor, Tensor | None]:
    """BiCro's soft labels (``SGRAF.predict``) from a model's L2-normalised embeddings of a labeled batch (and of an
    unlabeled batch).

    Anchors: the labeled batch's ``B//10 + 1`` pairs of highest :func:`anchor_confidence`; they get 1. Every other
    labeled pair n gets ``0.5 + (r^{i→t}_n + r^{t→i}_n)/4`` and every unlabeled pair ``(r^{i→t}_n + r^{t→i}_n)/2``,
    where ``r^{i→t}`` is the :func:`consistency` of the pair's image similarities to the anchor images with its
    caption's similarities to the anchor captions (nearest anchor found by image), ``r^{t→i}`` the same with the
    nearest anchor found by caption. Labels at or below ``noise_tem`` become 0. With ``center``, those within-modality
    cosines are taken after subtracting the labeled batch's mean image (caption) embedding from every image
    (caption) embedding and re-normalising (docs/methods/bicro.md#bicro-a15).
    """
    image, text = image.float(), text.float()
    anchors = anchor_confidence(image @ text.t(), alpha).topk(len(image) // 10 + 1).indices
    unlabeled = image_u is not None
    if center:
        image_mean, text_mean = image.mean(0), text.mean(0)
        image, text = F.normalize(image - image_mean, dim=1), F.normalize(text - text_mean, dim=1)
        if unlabeled:
            image_u = F.normalize(image_u.float() - image_mean, dim=1)
            text_u = F.normalize(text_u.float() - text_mean, dim=1)

    def label(img: Tensor, txt: Tensor) -> Tensor:  # r^{i→t} + r^{t→i}
        to_images, to_texts = img @ image[anchors].t(), txt @ text[anchors].t()
        return consistency(to_images, to_texts) + consistency(to_texts, to_images)

    def cut(y: Tensor) -> Tensor:
        return torch.where(y > noise_tem, y, torch.zeros_like(y))

    y = cut(0.5 + label(image, text) / 4)
    y[anchors] = 1.0
    return y, cut(label(image_u.float(), text_u.float()) / 2) if unlabeled else None


def selected_infonce(logits: Tensor, rate: float) -> Tensor:
    """BiCro's warm-up loss (``warmup_sele``) on InfoNCE: the ``⌊rate·B⌋`` smallest per-pair losses, summed and
    divided by B."""
    loss = per_pair_infonce(logits)
    keep = loss.detach().topk(int(rate * len(loss)), largest=False).indices
    return loss[keep].sum() / len(loss)


class BiCro(CoDivided):
    """``bicro``: models A and B as in ``ncr`` (co-divide at each epoch start; each trains on the other's clean pairs,
    and from epoch ``epochs // 2`` on also on a cycled batch of its noisy pairs), with BiCro's changes: a Beta
    mixture divides, and the soft labels come from anchor consistency in the peer's embeddings (eval-mode forward;
    centred on the labeled batch's means unless ``center`` is off), without the peer's clean posterior. Soft labels
    enter InfoNCE as in ``ncr`` (``soft_loss``). Steps take the named batches ``a``, ``a_unlabeled``, ``b``,
    ``b_unlabeled``; a model whose (shorter) epoch is over idles. Evaluation averages A's and B's cosine
    similarities, as BiCro's ``validate``.
    """

    name = "bicro"
    description = "BiCro on CLIP: two co-divided models, Beta-mixture division, anchor-consistency soft labels"
    Params = BiCroParams
    order_label = "bicro-order"

    def divide(self, model: nn.Module, epoch: int) -> np.ndarray:
        """The Beta-mixture (or, with ``mixture=gmm``, GMM) clean posterior of every training pair under ``model``."""
        p = self.params
        if p.mixture == "gmm":
            return gmm_divide(self.ctx, model, epoch, p)
        losses = self.ctx.per_pair_loss(model, p.loss_batch or None,
                                        seed=derive_seed("per-pair-loss", self.ctx.seed, epoch))
        return bmm_clean_posterior(losses, p.bmm_max_iter)

    def training_step(self, batch: dict[str, Batch]) -> StepOutput:
        losses, report = {}, {}
        for m, key in enumerate(MODELS):
            if key in batch:
                losses[key], labels = self._model_loss(m, batch[key], batch.get(f"{key}_unlabeled"))
                report.update({f"{key}_{name}": value for name, value in labels.items()})
        return StepOutput(losses=losses, report=report)

    def _model_loss(self, m: int, labeled: Batch, unlabeled: Batch | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of model ``m`` on its labeled (peer-clean) batch and its unlabeled (peer-noisy) batch, if any."""
        net, peer = self.ctx.models[m], self.ctx.models[1 - m]
        logits = pair_logits(*net(labeled.images, labeled.tokens)[:2], net.logit_scale)
        if self.w is None:
            return selected_infonce(logits, self.params.warmup_rate), {}
        with torch.no_grad():
            was_training = peer.training
            peer.eval()
            image_u, text_u = (None, None) if unlabeled is None else peer(unlabeled.images, unlabeled.tokens)[:2]
            y, y_u = soft_labels(*peer(labeled.images, labeled.tokens)[:2], self.params.alpha, self.params.noise_tem,
                                 image_u, text_u, self.params.center)
            peer.train(was_training)
        loss = self._soft_loss(logits, y)
        labels = {"y": y.mean()}
        if unlabeled is not None:
            loss = loss + self._soft_loss(pair_logits(*net(unlabeled.images, unlabeled.tokens)[:2], net.logit_scale),
                                          y_u)
            labels["y_unlabeled"] = y_u.mean()
        return loss, labels
