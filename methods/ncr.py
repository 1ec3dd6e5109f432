"""NCR on CLIP: two models, co-divide, soft correspondence labels inside InfoNCE (docs/methods/ncr.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ncbench.errors import UserError
from ncbench.losses import infonce, pair_logits, per_pair_soft_infonce, weighted_infonce
from ncbench.method import Batch, Context, Method, StepOutput, shuffled_batches
from ncbench.mixture import DivisionParams, divide, division_threshold
from ncbench.seeding import derive_seed

SOFT_LOSSES = ("weighted", "soft_target")
MODELS = ("a", "b")  # the two networks' names in a step's batches and losses


@dataclass(frozen=True)
class NCRParams(DivisionParams):
    """The division of ``gmm-filter`` plus NCR's rectification (docs/methods/ncr.md#hyper-parameters)."""

    alpha: float = 0.2  # hinge margin of the confidence ``conf``
    soft_loss: str = "weighted"  # how a soft label y enters InfoNCE: weighted or soft_target

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha <= 0:
            raise UserError(f"--param alpha={self.alpha}: expected > 0")
        if self.soft_loss not in SOFT_LOSSES:
            raise UserError(f"--param soft_loss={self.soft_loss}: expected one of {', '.join(SOFT_LOSSES)}")


def ncr_confidence(sim: Tensor, alpha: float) -> Tensor:
    """NCR's correspondence confidence of each pair of a batch from its cosine matrix (docs/methods/ncr.md#confidence).

    ``p_i = clamp(α − ½(mean_j h^s_ij + mean_j h^im_ji), 0, α)`` with the diagonal counted as 0 in both means,
    divided by the mean of its top ``B//10 + 1`` values and clipped to at most 1.
    """
    sim = sim.float()
    diag = sim.diag()
    cost_s = (alpha + sim - diag[:, None]).clamp(min=0).fill_diagonal_(0)  # image i vs negative captions j
    cost_im = (alpha + sim - diag[None, :]).clamp(min=0).fill_diagonal_(0)  # caption j vs negative images i
    p = (alpha - 0.5 * (cost_s.mean(1) + cost_im.mean(0))).clamp(0, alpha)
    top = p.topk(len(p) // 10 + 1).values.mean()
    return (p / top.clamp(min=torch.finfo(p.dtype).tiny)).clamp(max=1)


class CoDivided(Method):
    """Two models, each trained on the division its peer makes (NCR's co-divide, shared by ``ncr`` and ``bicro``):
    the soft-label loss, the pair scores, the ensemble evaluation and the state they share."""

    num_models = 2
    order_label: ClassVar[str]  # seeds each model's batch order (kept per method: its records' batches stay the same)

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.w: np.ndarray | None = None  # (2, N): w[m] is the clean posterior under model m

    def on_epoch_start(self, epoch: int) -> None:
        if self.params.fits_at(epoch):  # both divisions before either model trains
            self.w = np.stack([self.divide(model, epoch) for model in self.ctx.models])

    def divide(self, model: nn.Module, epoch: int) -> np.ndarray:
        """Every training pair's clean posterior under ``model``."""
        raise NotImplementedError

    def epoch_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """Each model's own batch order: every pair during warm-up; then its peer's clean pairs (setting its epoch
        length) and, from epoch ``epochs // 2`` on, as many batches cycled from its peer's noisy pairs."""
        size, n = self.ctx.batch_size, len(self.ctx.train)
        plans: dict[str, list[np.ndarray]] = {}
        for m, net in enumerate(MODELS):
            rng = np.random.default_rng(derive_seed(self.order_label, self.ctx.seed, epoch, m))
            if self.w is None:
                plans[net] = list(shuffled_batches(rng, n, size))
                continue
            w = self.w[1 - m]
            clean = w > division_threshold(w, self.params.p_threshold, self.params.min_noisy_frac)
            plans[net] = list(shuffled_batches(rng, np.flatnonzero(clean), size))
            noisy = np.flatnonzero(~clean)
            if epoch >= self.ctx.epochs // 2 and len(noisy) > 0:
                plans[f"{net}_unlabeled"] = cycled(rng, noisy, size, len(plans[net]))
        for k in range(max(len(plans[net]) for net in MODELS)):
            yield {name: batches[k] for name, batches in plans.items() if k < len(batches)}

    def _soft_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        if self.params.soft_loss == "weighted":
            return weighted_infonce(logits, y)
        return per_pair_soft_infonce(logits, y).mean()

    def clean_scores(self) -> np.ndarray | None:
        """Mean of A's and B's clean posteriors (each model's division trains the other); None during warm-up."""
        return None if self.w is None else self.w.mean(0)

    def clean_threshold(self) -> float:
        return self.params.p_threshold

    def eval_models(self) -> list[nn.Module]:
        """Both models: the harness evaluates their averaged cosine similarity (NCR's ensemble; BiCro's ``validate``)."""
        return list(self.ctx.models)

    def state_dict(self) -> dict:
        return {"w": self.w}

    def load_state_dict(self, state: dict) -> None:
        self.w = state["w"]


class NCR(CoDivided):
    """``ncr`` (docs/methods/ncr.md): models A and B; at each epoch start each one's GMM division (as ``gmm-filter``).

    Co-divide: A trains on B's division and B on A's. A model's labeled batches (the peer's clean pairs; they
    set its epoch length) get the soft label ``y = w_peer + (1 − w_peer)·conf(net)``; from epoch ``epochs // 2``
    on, an unlabeled batch cycled from the peer's noisy pairs gets ``y = ½(conf(net) + conf(peer))``. ``y`` is a
    constant (no gradient); ``conf(peer)`` comes from an eval-mode forward, ``conf(net)`` from the detached
    embeddings of net's training forward (the CLIP backbones have no dropout or batch norm, so it equals NCR's
    eval-mode forward and saves two forwards per model and step). Each model has its own batch order.

    Each step takes the named batches ``a``, ``a_unlabeled``, ``b``, ``b_unlabeled`` (each model's labeled and
    unlabeled pairs) and updates both models; a model whose epoch is done gets no batch and idles (no gradient,
    so its AdamW skips it). Unlike the release, which trains A's whole epoch and then B's, both step together, so
    peer confidences come from the peer's current weights. Evaluation averages A's and B's cosine similarities
    (NCR's ensemble).
    """

    name = "ncr"
    description = "NCR on CLIP: two models, co-divided by per-epoch GMMs, soft correspondence labels in InfoNCE"
    Params = NCRParams
    order_label = "ncr-order"

    def divide(self, model: nn.Module, epoch: int) -> np.ndarray:
        """The GMM clean posterior of every training pair under ``model`` (as ``gmm-filter``)."""
        return divide(self.ctx, model, epoch, self.params)

    def training_step(self, batch: dict[str, Batch]) -> StepOutput:
        return StepOutput({f"loss_{net}": self._model_loss(m, batch[net], batch.get(f"{net}_unlabeled"))
                           for m, net in enumerate(MODELS) if net in batch})

    def _model_loss(self, m: int, labeled: Batch, unlabeled: Batch | None) -> Tensor:
        """Loss of model ``m`` on its labeled (peer-clean) and unlabeled (peer-noisy) batches."""
        net, peer = self.ctx.models[m], self.ctx.models[1 - m]
        image, text = net(labeled.images, labeled.tokens)[:2]
        logits = pair_logits(image, text, net.logit_scale)
        if self.w is None:
            return infonce(logits)
        w = torch.as_tensor(self.w[1 - m][labeled.index.numpy()], dtype=torch.float32, device=self.ctx.device)
        loss = self._soft_loss(logits, w + (1 - w) * self._confidence(image, text))
        if unlabeled is not None:
            image, text = net(unlabeled.images, unlabeled.tokens)[:2]
            with torch.no_grad():
                was_training = peer.training
                peer.eval()
                peer_conf = self._confidence(*peer(unlabeled.images, unlabeled.tokens)[:2])
                y = 0.5 * (self._confidence(image, text) + peer_conf)
                peer.train(was_training)
            loss = loss + self._soft_loss(pair_logits(image, text, net.logit_scale), y)
        return loss

    def _confidence(self, image: Tensor, text: Tensor) -> Tensor:
        return ncr_confidence(image.detach().float() @ text.detach().float().t(), self.params.alpha)


def cycled(rng: np.random.Generator, pairs: np.ndarray, size: int, count: int) -> list[np.ndarray]:
    """``count`` shuffled batches of ``min(size, len(pairs))`` from ``pairs``, reshuffled at each pass."""
    size = min(size, len(pairs))
    out: list[np.ndarray] = []
    while len(out) < count:
        out.extend(shuffled_batches(rng, pairs, size))
    return out[:count]
