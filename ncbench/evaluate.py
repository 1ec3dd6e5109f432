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


def _ranks(block: Callable[[int, int], Tensor], q_label: Tensor, g_label: Tensor, chunk: int) -> Tensor:
    """Rank of each query: 1 + #gallery items scoring strictly above its best ground-truth item.

    ``block(a, b)`` returns the (b - a, n_gallery) scores of queries a..b-1; query r's ground truth is every
    gallery item j with ``g_label[j] == q_label[r]``. Ties therefore go to the ground truth.
    """
    out = []
    for a in range(0, len(q_label), chunk):
        s = block(a, a + chunk).float()
        r, j = (q_label[a : a + chunk, None].to(s.device) == g_label[None, :].to(s.device)).nonzero(as_tuple=True)
        best = s.new_full((len(s),), -math.inf).scatter_reduce_(0, r, s[r, j], "amax")
        out.append(1 + (s > best[:, None]).sum(dim=1).cpu())
    return torch.cat(out)


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


def _metrics(sim_rows: Callable[[int, int], Tensor], sim_cols: Callable[[int, int], Tensor], n_images: int,
             caption_image: Tensor, ks: Sequence[int], chunk: int) -> dict[str, float]:
    """Both directions from row blocks of sim (images as queries) and of sim.T (captions as queries)."""
    caption_image = _check(n_images, caption_image)
    images = torch.arange(n_images)
    i2t = _ranks(sim_rows, images, caption_image, chunk)
    t2i = _ranks(sim_cols, caption_image, images, chunk)
    return _summarise(i2t, t2i, ks)


def recall_at_k(sim: Tensor, caption_image: Tensor, ks: Sequence[int] = (1, 5, 10),
                chunk: int = 1024) -> dict[str, float]:
    """Retrieval metrics from a full (n_images, n_captions) similarity matrix.

    Rank = 1 + number of candidates with a strictly higher score (ties go to the ground truth).
    i2t: an image's rank is the best rank among its ground-truth captions; R@K = % of images with rank <= K.
    t2i: a caption's rank is that of its ground-truth image among all images; R@K = % of captions.
    Returns ``{i2t,t2i}_r{K}`` (0-100), ``rsum`` (sum of those) and ``{i2t,t2i}_medr`` (floor of median rank).
    """
    return _metrics(lambda a, b: sim[a:b], lambda a, b: sim[:, a:b].T, sim.shape[0], caption_image, ks, chunk)


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, caption_image: Tensor, ks: Sequence[int] = (1, 5, 10),
                      chunk: int = 1024) -> dict[str, float]:
    """Same as ``recall_at_k`` with sim = image_emb @ text_emb.T (fp32), computed ``chunk`` query rows at a time."""
    image_emb, text_emb = image_emb.float(), text_emb.float()
    return _metrics(lambda a, b: image_emb[a:b] @ text_emb.T, lambda a, b: text_emb[a:b] @ image_emb.T,
                    len(image_emb), caption_image, ks, chunk)


def evaluate_protocol(protocol: str, image_emb: Tensor, text_emb: Tensor, caption_image: Tensor) -> dict[str, float]:
    """Metrics of one test protocol: ``1k`` / ``coco-5k`` use the whole split; ``coco-1k`` averages 5 folds.

    COCO 1K fold f holds images [1000f, 1000f + 1000) and exactly the captions of those images; every metric
    (rsum included, which equals the sum of the averaged recalls) is averaged over the folds.
    """
    if protocol in ("1k", "coco-5k"):
        return retrieval_metrics(image_emb, text_emb, caption_image)
    if protocol != "coco-1k":
        raise UserError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if len(image_emb) != 5000:
        raise UserError(f"coco-1k needs exactly 5000 images, got {len(image_emb)}")
    caption_image = torch.as_tensor(caption_image, dtype=torch.long)
    folds = []
    for f in range(5):
        keep = (caption_image >= 1000 * f) & (caption_image < 1000 * (f + 1))
        folds.append(retrieval_metrics(image_emb[1000 * f : 1000 * (f + 1)], text_emb[keep.to(text_emb.device)],
                                       caption_image[keep] - 1000 * f))
    return {k: sum(m[k] for m in folds) / 5 for k in folds[0]}


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
