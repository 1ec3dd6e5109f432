"""Evaluation: image–text retrieval recall (1K, COCO 1K 5-fold, COCO 5K) and clean-vs-noisy detection metrics."""
from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import Tensor, nn

from ncbench.data import ImageNormalizer
from ncbench.errors import UserError

PROTOCOLS: tuple[str, ...] = ("1k", "coco-1k", "coco-5k")

METRICS: dict[str, bool] = {
    **{f"{d}_r{k}": True for d in ("i2t", "t2i") for k in (1, 5, 10)},
    "rsum": True,
    "i2t_medr": False,
    "t2i_medr": False,
    "auroc": True,
    "ap": True,
    "precision": True,
    "recall": True,
    "f1": True,
}


_GROUP = 255  # 0/1 flags summed as uint8 without overflow


def _row_counts(above: Tensor) -> Tensor:
    """Per row, the number of True in a bool matrix (int64); summed as uint8 in groups of ``_GROUP`` (torch's bool
    to int64 sum is several times slower than the comparison that made the flags)."""
    flags = above.view(torch.uint8)
    whole = flags.shape[1] // _GROUP * _GROUP
    grouped = flags[:, :whole].reshape(len(flags), whole // _GROUP, _GROUP).sum(2, dtype=torch.uint8)
    return grouped.sum(1, dtype=torch.int64) + flags[:, whole:].sum(1, dtype=torch.int64)


def _add_column_counts(total: Tensor, above: Tensor) -> None:
    """Add the number of True in each column of a bool matrix to ``total`` (int64), one row at a time (a strided
    reduction over rows is slower still)."""
    partial = torch.zeros(above.shape[1], dtype=torch.int32, device=above.device)
    for row in above.view(torch.uint8):
        partial += row
    total += partial


def _ranks(sim: Tensor, caption_image: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """1-based ranks of every image (i2t) and every caption (t2i) from one (n_images, n_captions) score matrix.

    A query's rank is 1 + the number of gallery items scoring strictly above its best ground-truth item, so ties go
    to the ground truth. The ground-truth scores are gathered by index, ``sim[caption_image[c], c]``; an image's best
    is their maximum over its captions. ``chunk`` image rows are compared at a time; both directions come from the
    same scores, so a tie is a tie in both.
    """
    n_images, n_captions = sim.shape
    caption_image = caption_image.to(sim.device)
    truth = sim[caption_image, torch.arange(n_captions, device=sim.device)]
    best = truth.new_full((n_images,), -math.inf).scatter_reduce_(0, caption_image, truth, "amax")
    i2t = torch.empty(n_images, dtype=torch.int64, device=sim.device)
    t2i = torch.ones(n_captions, dtype=torch.int64, device=sim.device)
    above = torch.empty((min(chunk, n_images), n_captions), dtype=torch.bool, device=sim.device)
    for a in range(0, n_images, chunk):
        block = sim[a:a + chunk]
        flags = above[:len(block)]
        _add_column_counts(t2i, torch.gt(block, truth, out=flags))
        i2t[a:a + chunk] = 1 + _row_counts(torch.gt(block, best[a:a + chunk, None], out=flags))
    return i2t.cpu(), t2i.cpu()


def _check(n_images: int, caption_image: Tensor) -> Tensor:
    """Validate ``caption_image`` (int64 on cpu) and return it."""
    caption_image = torch.as_tensor(caption_image, dtype=torch.long).cpu()
    if caption_image.ndim != 1 or len(caption_image) == 0:
        raise ValueError("caption_image must be a non-empty 1-D tensor")
    if caption_image.min() < 0 or caption_image.max() >= n_images:
        raise ValueError("caption_image holds an index outside the image range")
    if torch.bincount(caption_image, minlength=n_images).min() < 1:
        raise ValueError("every image needs at least one caption")
    return caption_image


def _summarise(i2t: Tensor, t2i: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """R@K (percent), rsum and MedR (floor of the median rank, as NCR) from 1-based ranks."""
    out = {f"{d}_r{k}": 100.0 * (r <= k).double().mean().item() for d, r in (("i2t", i2t), ("t2i", t2i)) for k in ks}
    out["rsum"] = sum(out.values())
    out["i2t_medr"] = float(np.floor(np.median(i2t.numpy())))
    out["t2i_medr"] = float(np.floor(np.median(t2i.numpy())))
    return out


def recall_at_k(sim: Tensor, caption_image: Tensor, ks: Sequence[int] = (1, 5, 10),
                chunk: int = 1024) -> dict[str, float]:
    """Retrieval metrics from a full (n_images, n_captions) similarity matrix.

    Rank = 1 + number of candidates with a strictly higher score (ties go to the ground truth).
    i2t: an image's rank is the best rank among its ground-truth captions; R@K = % of images with rank <= K.
    t2i: a caption's rank is that of its ground-truth image among all images; R@K = % of captions.
    Returns ``{i2t,t2i}_r{K}`` (0-100), ``rsum`` (sum of those) and ``{i2t,t2i}_medr`` (floor of median rank).
    """
    return _summarise(*_ranks(sim, _check(sim.shape[0], caption_image), chunk), ks)


def _similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """(n_images, n_captions) fp32 scores, one matrix product (memory: 4 bytes per image-caption pair)."""
    return image_emb.float() @ text_emb.float().T


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, caption_image: Tensor, ks: Sequence[int] = (1, 5, 10),
                      chunk: int = 1024) -> dict[str, float]:
    """Same as ``recall_at_k`` with sim = image_emb @ text_emb.T (fp32), compared ``chunk`` image rows at a time."""
    caption_image = _check(len(image_emb), caption_image)
    return _summarise(*_ranks(_similarity(image_emb, text_emb), caption_image, chunk), ks)


def evaluate_protocol_with_ranks(protocol: str, image_emb: Tensor, text_emb: Tensor,
                                 caption_image: Tensor) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Metrics of one test protocol and the per-query 1-based ranks they come from (int64 arrays).

    ``1k`` / ``coco-5k`` use the whole split: i2t ranks one per image, t2i ranks one per caption, in their order.
    ``coco-1k`` averages 5 folds: fold f holds images [1000f, 1000f + 1000) and exactly the captions of those
    images; every metric (rsum included, which equals the sum of the averaged recalls) is averaged over the
    folds, and the ranks (within a fold) are the folds' ranks concatenated in fold order, a fold's captions in
    their original order.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    caption_image = _check(len(image_emb), caption_image)
    if protocol != "coco-1k":
        i2t, t2i = _ranks(_similarity(image_emb, text_emb), caption_image, 1024)
        return _summarise(i2t, t2i, (1, 5, 10)), i2t.numpy(), t2i.numpy()
    if len(image_emb) != 5000:
        raise UserError(f"coco-1k needs exactly 5000 images, got {len(image_emb)}")
    folds, i2t_all, t2i_all = [], [], []
    for f in range(5):
        keep = (caption_image >= 1000 * f) & (caption_image < 1000 * (f + 1))
        sim = _similarity(image_emb[1000 * f:1000 * (f + 1)], text_emb[keep.to(text_emb.device)])
        i2t, t2i = _ranks(sim, caption_image[keep] - 1000 * f, 1024)
        folds.append(_summarise(i2t, t2i, (1, 5, 10)))
        i2t_all.append(i2t)
        t2i_all.append(t2i)
    metrics = {k: sum(m[k] for m in folds) / 5 for k in folds[0]}
    return metrics, torch.cat(i2t_all).numpy(), torch.cat(t2i_all).numpy()


def evaluate_protocol(protocol: str, image_emb: Tensor, text_emb: Tensor, caption_image: Tensor) -> dict[str, float]:
    """The metrics of :func:`evaluate_protocol_with_ranks`."""
    return evaluate_protocol_with_ranks(protocol, image_emb, text_emb, caption_image)[0]


def detection_metrics(scores: np.ndarray, clean: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Clean-vs-noisy separation; clean is the positive class, higher score = more likely clean.

    ``auroc``/``ap`` are nan when ``clean`` holds a single class. The kept set is {scores > threshold}:
    ``precision`` is nan when it is empty, ``recall`` nan when there is no clean sample,
    ``f1`` = 2 TP / (|kept| + |clean|) (0 when TP = 0, nan when both sets are empty).
    """
    scores, clean = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(clean, dtype=bool).ravel()
    if scores.shape != clean.shape:
        raise ValueError(f"scores {scores.shape} and clean {clean.shape} differ in shape")
    two_classes = 0 < clean.sum() < len(clean)
    kept = scores > threshold
    tp, n_kept, n_clean = float((kept & clean).sum()), float(kept.sum()), float(clean.sum())
    return {
        "auroc": float(roc_auc_score(clean, scores)) if two_classes else math.nan,
        "ap": float(average_precision_score(clean, scores)) if two_classes else math.nan,
        "precision": tp / n_kept if n_kept else math.nan,
        "recall": tp / n_clean if n_clean else math.nan,
        "f1": 2 * tp / (n_kept + n_clean) if n_kept + n_clean else math.nan,
        "kept_frac": n_kept / len(kept) if len(kept) else math.nan,
    }


@torch.no_grad()
def embed(models: Sequence[nn.Module], images: np.ndarray, tokens: Tensor, normalize: ImageNormalizer,
                autocast: Callable[[], AbstractContextManager], chunk: int = 512, unit: bool = True) -> tuple[Tensor, Tensor]:
    """Embeddings of ``images`` (uint8, each once) and of caption ``tokens``, in eval mode.

    With several models each one's L2-normalised embeddings are concatenated and scaled by
    1/sqrt(k), so ``image_emb @ text_emb.T`` is the models' averaged cosine similarity (NCR's ensemble).
    ``unit=False`` keeps the encoders' raw outputs (no L2 normalisation).
    """
    scale = len(models) ** -0.5
    image_embs, text_embs = [], []
    for model in models:
        was_training = model.training
        model.eval()
        with autocast():
            image_embs.append(torch.cat([model.encode_image(normalize(images[i:i + chunk]), normalize=unit).float()
                                         for i in range(0, len(images), chunk)]))
            text_embs.append(torch.cat([model.encode_text(tokens[i:i + chunk].to(normalize.device), normalize=unit).float()
                                        for i in range(0, len(tokens), chunk)]))
        model.train(was_training)
    return torch.cat(image_embs, 1) * scale, torch.cat(text_embs, 1) * scale

