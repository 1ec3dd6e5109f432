"""Small-loss division with a two-component Gaussian mixture (docs/methods/gmm-filter.md#division).

``clean_posterior`` turns per-pair losses into each pair's probability of being clean; ``division_threshold``
is the score above which a pair is kept; ``divide`` runs both on a model's per-pair InfoNCE over the training set.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch import nn

from ncbench.errors import UserError
from ncbench.method import Context
from ncbench.seeding import derive_seed


def clean_posterior(losses: np.ndarray, seed: int, *, max_iter: int = 10, tol: float = 1e-2,
                    reg_covar: float = 5e-4) -> np.ndarray:
    """Posterior of the lower-mean component of a 2-component GMM fit on min-max normalised ``losses``.

    NCR's settings (docs/methods/gmm-filter.md#ncr-division): ``max_iter=10, tol=1e-2, reg_covar=5e-4``; ``seed`` is the
    ``random_state`` of the k-means initialisation. With so few EM iterations sklearn often warns that
    the fit did not converge; as in NCR, the result is used anyway and the warning is silenced.
    """
    losses = np.asarray(losses, dtype=np.float64).ravel()
    if len(losses) < 2 or not np.isfinite(losses).all():
        raise ValueError("clean_posterior needs at least 2 finite losses")
    span = losses.max() - losses.min()
    x = ((losses - losses.min()) / span if span > 0 else np.zeros_like(losses))[:, None]
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x)
        return gmm.predict_proba(x)[:, int(np.argmin(gmm.means_.ravel()))]


def division_threshold(w: np.ndarray, p_threshold: float = 0.5, min_noisy_frac: float = 0.01) -> float:
    """The score above which a pair is kept: ``p_threshold``, or, when every ``w`` exceeds it, the
    ``min_noisy_frac`` quantile of ``w``, so that about that fraction is judged noisy (NCR ``split_prob``)."""
    w = np.asarray(w)
    return float(np.quantile(w, min_noisy_frac)) if (w > p_threshold).all() else p_threshold


@dataclass(frozen=True)
class DivisionParams:
    """Hyper-parameters of the epoch-start GMM division (docs/methods/gmm-filter.md#hyper-parameters)."""

    warmup_epochs: int = 0  # epochs of plain InfoNCE on every pair before the first division
    p_threshold: float = 0.5  # keep pairs whose clean posterior exceeds this
    min_noisy_frac: float = 0.01  # if every pair is kept, judge this quantile noisy instead
    loss_batch: int = 0  # batch size of the per-pair loss pass; 0: the training batch size
    refit_every: int = 1  # epochs between GMM fits (the last division is reused in between)
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    gmm_reg_covar: float = 5e-4

    def __post_init__(self) -> None:
        for name, ok, expected in (
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("p_threshold", 0.0 <= self.p_threshold < 1.0, "in [0, 1)"),
            ("min_noisy_frac", 0.0 <= self.min_noisy_frac < 1.0, "in [0, 1)"),
            ("loss_batch", self.loss_batch >= 0, ">= 0"),
            ("refit_every", self.refit_every >= 1, ">= 1"),
            ("gmm_max_iter", self.gmm_max_iter >= 1, ">= 1"),
            ("gmm_tol", self.gmm_tol > 0, "> 0"),
            ("gmm_reg_covar", self.gmm_reg_covar >= 0, ">= 0"),
        ):
            if not ok:
                raise UserError(f"--param {name}={getattr(self, name)}: expected {expected}")

    def fits_at(self, epoch: int) -> bool:
        """Whether a new division is made at the start of ``epoch`` (0-based)."""
        return epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % self.refit_every == 0


def divide(ctx: Context, model: nn.Module, epoch: int, params: DivisionParams) -> np.ndarray:
    """Clean posterior of every training pair under ``model``: per-pair InfoNCE in eval mode inside random
    batches seeded by (run seed, epoch), min-max normalised, GMM (docs/methods/gmm-filter.md#division)."""
    losses = ctx.per_pair_loss(model, params.loss_batch or None, seed=derive_seed("per-pair-loss", ctx.seed, epoch))
    return clean_posterior(losses, derive_seed("gmm", ctx.seed, epoch), max_iter=params.gmm_max_iter,
                           tol=params.gmm_tol, reg_covar=params.gmm_reg_covar)
