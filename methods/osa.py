"""OSA, One-Step Anti-noise, on CLIP (docs/methods/osa.md).

Li, Gu, Song, Zhang, Gao, "One-step Noisy Label Mitigation", arXiv:2410.01944 (2024); official code
https://github.com/leolee99/OSA (``main_clip.py``: ``weight_function``, ``CrossEn``, ``main``). A frozen copy of
the pretrained model (the estimator) scores each pair of a batch by how far its logit lies above the "origin",
the mean logit the estimator gives to random-noise images and random token strings; the score becomes a per-pair
weight on the trained model's InfoNCE.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ncbench.errors import UserError
from ncbench.losses import pair_logits, weighted_infonce
from ncbench.method import Batch, Context, Method, StepOutput
from ncbench.seeding import derive_seed

RANDOM_TOKEN_IDS = 100  # OSA: random token ids drawn from [0, 100)


@dataclass(frozen=True)
class OSAParams:
    """OSA's hyper-parameters (docs/methods/osa.md#hyper-parameters)."""

    origin_samples: int = 0  # random image/text pairs for the origin; 0: the training batch size (OSA's choice)

    def __post_init__(self) -> None:
        if self.origin_samples < 0:
            raise UserError(f"--param origin_samples={self.origin_samples}: expected >= 0")


def normalised_logit(diag: Tensor, origin: float) -> Tensor:
    """OSA's ``x_i = (l_ii − origin)_+ / max_k (l_kk − origin)_+`` over a batch (all 0 when no pair is above the
    origin, where the official code divides 0 by 0)."""
    shifted = (diag.float() - origin).clamp(min=0)
    top = shifted.max()
    return shifted / top if top > 0 else torch.zeros_like(shifted)


def osa_weight(x: Tensor) -> Tensor:
    """OSA's weight ``w = x²(1 − x²)`` (``weight_function``: ``−x²(x − 1)(x + 1)``): 0 at or below the origin
    and for the batch's most similar pair, largest (¼) at x = 1/√2."""
    return x.pow(2) * (1 - x.pow(2))


@torch.no_grad()
def origin_logit(model: nn.Module, samples: int, image_size: int, context_length: int, seed: int,
                 device: torch.device) -> float:
    """The origin: the mean logit ``s·cos`` of ``model`` over ``samples`` uniform-noise images (U[0, 1) pixels fed
    to the encoder unnormalised, as the official code does) × ``samples`` random token strings (ids in [0, 100),
    the tokenizer's context length)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(samples, 3, image_size, image_size, generator=generator).to(device)
    tokens = torch.randint(0, RANDOM_TOKEN_IDS, (samples, context_length), generator=generator).to(device)
    image, text = model(images, tokens)[:2]
    return float(pair_logits(image.float(), text.float(), model.logit_scale.float()).mean())


class OSA(Method):
    """``osa``: the trained model plus a frozen estimator, a copy of the pretrained model made in :meth:`setup`.

    The harness calls ``setup`` with the pretrained models (ncbench/harness.py, ``prepare``) and only then loads a
    checkpoint's weights into ``ctx.models`` (``start_or_resume``), so on resume the copy is the pretrained model
    again and the estimator never needs saving; the origin is recomputed from the same seed.
    """

    name = "osa"
    description = "OSA: frozen pretrained estimator weights each pair's InfoNCE by its logit above a noise origin"
    Params = OSAParams

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.estimator = copy.deepcopy(ctx.models[0]).eval().requires_grad_(False)
        samples = self.params.origin_samples or ctx.batch_size
        with ctx.autocast():
            self.origin = origin_logit(self.estimator, samples, ctx.train.normalize.size, ctx.train.tokens.shape[1],
                                       derive_seed("osa-origin", ctx.seed), ctx.device)
        self.scores: np.ndarray | None = None  # estimator's normalised logit of every pair, made on first request

    def training_step(self, batch: Batch) -> StepOutput:
        model = self.ctx.models[0]
        with torch.no_grad():
            est_image, est_text = self.estimator(batch.images, batch.tokens)[:2]
            diag = self.estimator.logit_scale.float().exp() * (est_image.float() * est_text.float()).sum(1)
            w = osa_weight(normalised_logit(diag, self.origin))
        image, text = model(batch.images, batch.tokens)[:2]
        loss = weighted_infonce(pair_logits(image.float(), text.float(), model.logit_scale.float()), w)
        return StepOutput(losses={"loss": loss}, report={"weight": w.mean(), "above_origin": (w > 0).float().mean()})

    @torch.no_grad()
    def clean_scores(self) -> np.ndarray | None:
        """The estimator's normalised logit of every training pair over the whole set,
        ``(l_pp − origin)_+ / max_q (l_qq − origin)_+``: the estimator is frozen, so it is computed once."""
        if self.scores is None:
            img, txt = self.ctx.encode_train(self.estimator)
            pair_image = torch.from_numpy(self.ctx.train.pair_image).to(self.ctx.device)
            diag = self.estimator.logit_scale.float().exp() * (img[pair_image] * txt).sum(1)
            self.scores = normalised_logit(diag, self.origin).cpu().numpy()
        return self.scores

    def clean_threshold(self) -> float:
        """Kept = above the origin (OSA gives every other pair weight 0)."""
        return 0.0
