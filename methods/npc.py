"""NPC, Negative Pre-aware Cross-modal matching (docs/methods/npc.md): ``npc`` (paper-faithful) and ``npc-official``.

Both share the memory bank of docs/methods/npc.md#memory-bank (a 2-component GMM on the per-pair loss of the model at the start of
fine-tuning, clean set = posterior > 0.9, every pair mapped to its nearest clean pair by image and by caption) and
the siamese step of docs/methods/npc.md#official-step: copy A, take one AdamW step on the batch loss with a separate optimiser whose moments
persist, and weight each pair by how the step changed the losses of its two memory pairs. Both run fused (docs/methods/npc.md#fused-step): the
siamese model A' is never built; its parameters are a virtual set (one parameter-size buffer) that receives A's
weights, is stepped by the siamese AdamW and evaluated through ``torch.func.functional_call``; right after the copy
A' equals A, so A's own batch forward and gradient stand in for A''s, and the "before" memory losses are A's own
(reused from the batch forward where a memory image or caption is in the batch); every distinct image and caption of
a memory batch is encoded once. A' runs in eval mode in the official code and A here in train mode: the same for
open_clip's CLIP models, which have no dropout (docs/methods/npc.md#npc-8). The bank's per-pair losses use seeded random batches of the
training batch size (the official code leaves them open: docs/methods/npc.md#npc-a2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from ncbench.config import RunConfig
from ncbench.errors import UserError
from ncbench.losses import pair_logits, per_pair_infonce
from ncbench.method import Batch, Context, Method, StepOutput
from ncbench.mixture import clean_posterior
from ncbench.optim import set_lr
from ncbench.seeding import derive_seed

BANK_REFRESH = ("frozen", "epoch")


@dataclass(frozen=True)
class NPCParams:
    """Hyper-parameters shared by both NPC variants (docs/methods/npc.md#hyper-parameters)."""

    bank_refresh: str = "frozen"  # "frozen": built once at the start of fine-tuning (docs/methods/npc.md#npc-5); "epoch": rebuilt each epoch
    clean_threshold: float = 0.9  # memory-bank clean set: GMM clean posterior > this (docs/methods/npc.md#memory-bank)
    siamese_lr_scale: float = 1.0  # siamese AdamW lr / the main model's scheduled lr (official: equal, docs/methods/npc.md#npc-4)

    def __post_init__(self) -> None:
        if self.bank_refresh not in BANK_REFRESH:
            raise UserError(f"--param bank_refresh={self.bank_refresh}: expected one of {', '.join(BANK_REFRESH)}")
        if not 0.0 <= self.clean_threshold < 1.0:
            raise UserError(f"--param clean_threshold={self.clean_threshold}: expected a value in [0, 1)")
        if self.siamese_lr_scale < 0:
            raise UserError(f"--param siamese_lr_scale={self.siamese_lr_scale}: expected >= 0")


def npc_clean_probability(losses: np.ndarray, seed: int) -> np.ndarray:
    """Clean posterior of each pair as ``get_mbank`` fits it (docs/methods/npc.md#memory-bank): 2 components, max_iter 100,
    tol 1e-2, reg_covar 5e-4 on the raw losses; the posterior of the lower-mean component.

    :func:`ncbench.mixture.clean_posterior` fits min-max normalised losses; dividing ``reg_covar`` by the squared
    loss span makes that the same model as a fit on the raw losses (EM, k-means init and tol are affine-invariant).
    """
    span = float(np.ptp(losses))
    return clean_posterior(losses, seed, max_iter=100, tol=1e-2, reg_covar=5e-4 / span**2 if span > 0 else 5e-4)


def _nearest(query: Tensor, bank: Tensor, chunk: int = 4096) -> Tensor:
    """Index of the ``bank`` row with the largest dot product with each ``query`` row (the first on ties)."""
    return torch.cat([(query[i:i + chunk] @ bank.T).argmax(dim=1) for i in range(0, len(query), chunk)])


def memory_bank(image_emb: Tensor, text_emb: Tensor, pair_image: np.ndarray, clean: np.ndarray,
                cosine: bool) -> tuple[np.ndarray, np.ndarray]:
    """Memory entries ``(by_image, by_text)`` of every training pair (docs/methods/npc.md#memory-bank).

    ``image_emb`` (one row per image) and ``text_emb`` (one row per pair) are the encoders' raw outputs; pair ``p``
    is (image ``pair_image[p]``, caption ``p``) and ``clean`` marks the bank. ``by_image[p]`` is the clean pair whose
    image is nearest to ``p``'s image (so all pairs of one image share it), ``by_text[p]`` the clean pair whose
    caption is nearest to ``p``'s caption. Queries are L2-normalised; the bank too when ``cosine`` (the paper's
    reading, docs/methods/npc.md#npc-9), otherwise it keeps its norms as in the official code (docs/methods/npc.md#npc-9).
    """
    bank = np.flatnonzero(clean)
    if len(bank) == 0:
        raise RuntimeError("NPC memory bank: no training pair has a GMM clean posterior above the threshold")
    bank_image, bank_text = image_emb[torch.from_numpy(pair_image[bank])], text_emb[torch.from_numpy(bank)]
    if cosine:
        bank_image, bank_text = F.normalize(bank_image, dim=-1), F.normalize(bank_text, dim=-1)
    by_image = bank[_nearest(F.normalize(image_emb, dim=-1), bank_image).cpu().numpy()][pair_image]
    by_text = bank[_nearest(F.normalize(text_emb, dim=-1), bank_text).cpu().numpy()]
    return by_image, by_text


def confidence_weight(before_image: Tensor, after_image: Tensor, before_text: Tensor, after_text: Tensor) -> Tensor:
    """``w = tanh(r)`` if ``r < 1`` else 1, with ``r`` the mean of the before/after loss ratios of the two memory
    pairs (docs/methods/npc.md#npc-7)."""
    ratio = 0.5 * (before_image / after_image + before_text / after_text)
    return torch.where(ratio < 1, torch.tanh(ratio), torch.ones_like(ratio))


def _gather(query: np.ndarray, known_ids: np.ndarray, known_emb: Tensor | None,
            encode: Callable[[np.ndarray], Tensor]) -> Tensor:
    """Embeddings of ``query`` ids: the rows of ``known_emb`` (ids ``known_ids``) where present, every other
    distinct id encoded once."""
    missing = np.setdiff1d(query, known_ids)
    ids = np.concatenate([known_ids, missing])
    if known_emb is None:
        emb = encode(missing)
    else:
        emb = torch.cat([known_emb, encode(missing)]) if len(missing) else known_emb
    sorter = np.argsort(ids, kind="stable")
    position = sorter[np.searchsorted(ids, query, sorter=sorter)]
    return emb[torch.from_numpy(position).to(emb.device)]


class _NPCBase(Method):
    """The memory bank, the siamese optimiser and the fused memory-loss passes shared by both variants."""

    Params = NPCParams
    version = "1"
    cosine_bank: ClassVar[bool]

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.model = ctx.models[0]
        self.weights = list(self.model.parameters())
        self.names = [name for name, _ in self.model.named_parameters()]
        # A''s parameters as a virtual set (never a second module) and its AdamW: own moments, kept across steps (docs/methods/npc.md#npc-4)
        self.siamese_weights = [w.detach().clone().requires_grad_(True) for w in self.weights]
        self.siamese = ctx.make_optimizer(self.siamese_weights)
        self.clean_prob: np.ndarray | None = None
        self.by_image: np.ndarray | None = None
        self.by_text: np.ndarray | None = None

    def on_epoch_start(self, epoch: int) -> None:
        if self.by_image is None or self.params.bank_refresh == "epoch":
            self.build_bank(epoch)

    def build_bank(self, epoch: int) -> None:
        """The memory bank from the current model (docs/methods/npc.md#memory-bank)."""
        self.bank_from_embeddings(*self.ctx.encode_train(self.model, unit=False), epoch=epoch)

    def bank_from_embeddings(self, image_emb: Tensor, text_emb: Tensor, epoch: int) -> None:
        """GMM on the per-pair loss (seeded random batches) of the current model's raw training embeddings
        (:meth:`Context.encode_train` with ``unit=False``), then the nearest clean pairs (docs/methods/npc.md#memory-bank)."""
        unit = (F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1))
        losses = self.ctx.per_pair_loss(self.model, seed=derive_seed("npc-bank-order", self.ctx.seed, epoch),
                                        embeddings=unit)
        self.clean_prob = npc_clean_probability(losses, derive_seed("npc-gmm", self.ctx.seed, epoch))
        self.by_image, self.by_text = memory_bank(image_emb, text_emb, self.ctx.train.pair_image,
                                                  self.clean_prob > self.params.clean_threshold, self.cosine_bank)

    def memory_rows(self, batch: Batch) -> np.ndarray:
        """The 2B memory pairs of a batch: its image-side entries, then its caption-side entries."""
        index = batch.index.numpy()
        return np.concatenate([self.by_image[index], self.by_text[index]])

    def memory_losses(self, rows: np.ndarray, known: tuple[Batch, Tensor, Tensor] | None = None,
                      weights: dict[str, Tensor] | None = None) -> Tensor:
        """Per-pair InfoNCE of the memory pairs ``rows``, each B-sized half (image side, caption side) with its own
        in-batch negatives (docs/methods/npc.md#npc-10), under the model's weights or the virtual set ``weights``. ``known`` = (batch, its
        image and caption embeddings at the same weights) lends embeddings; every other distinct image and caption
        is encoded once."""
        train, device = self.ctx.train, self.ctx.device

        def forward(images: Tensor | None, tokens: Tensor | None) -> tuple:
            return self.model(images, tokens) if weights is None else functional_call(self.model, weights, (images, tokens))

        index = known[0].index.numpy() if known else np.empty(0, dtype=np.int64)
        image = _gather(train.pair_image[rows], train.pair_image[index], known[1] if known else None,
                        lambda ids: forward(train.normalize(train.images[ids]), None)[0])
        text = _gather(rows, index, known[2] if known else None,
                       lambda ids: forward(None, train.tokens[ids].to(device))[1])
        half = len(rows) // 2
        scale = self.model.logit_scale if weights is None else weights["logit_scale"]
        return torch.cat([per_pair_infonce(pair_logits(image[:half], text[:half], scale)),
                          per_pair_infonce(pair_logits(image[half:], text[half:], scale))])

    @torch.no_grad()
    def siamese_after(self, rows: np.ndarray, grads: list[Tensor]) -> Tensor:
        """Memory losses under A'_{s+1}: copy A's weights into the virtual set, step it with the siamese AdamW on
        ``grads`` (docs/methods/npc.md#official-step, steps 2 and 6) and evaluate the memory pairs with it (docs/methods/npc.md#fused-step, rewrites 1 and 5)."""
        for virtual, w, g in zip(self.siamese_weights, self.weights, grads):
            virtual.copy_(w)
            virtual.grad = g.contiguous()  # the fused AdamW kernel reads grads as dense memory
        set_lr(self.siamese, self.ctx.current_lr * self.params.siamese_lr_scale)
        self.siamese.step()
        for virtual in self.siamese_weights:
            virtual.grad = None
        return self.memory_losses(rows, weights=dict(zip(self.names, self.siamese_weights)))

    def clean_scores(self) -> np.ndarray | None:
        """The GMM clean posterior of every training pair behind the current memory bank."""
        return self.clean_prob

    def clean_threshold(self) -> float:
        return self.params.clean_threshold

    def state_dict(self) -> dict:
        return {"siamese": self.siamese.state_dict(), "clean_prob": self.clean_prob,
                "by_image": self.by_image, "by_text": self.by_text}

    def load_state_dict(self, state: dict) -> None:
        self.siamese.load_state_dict(state["siamese"])
        self.clean_prob, self.by_image, self.by_text = state["clean_prob"], state["by_image"], state["by_text"]


class NPC(_NPCBase):
    """``npc``: the paper's reading (docs/methods/npc.md#variants). Per-pair weights multiply per-pair losses (docs/methods/npc.md#npc-1),
    the memory-pair loss is computed by A with gradient and trained (docs/methods/npc.md#npc-2), one siamese step on the batch-mean
    loss (docs/methods/npc.md#npc-3) with a persistent AdamW (docs/methods/npc.md#npc-4), cosine nearest neighbours (docs/methods/npc.md#npc-9), gradient clipping at 10 (docs/methods/npc.md#npc-6).
    The lr is the harness lr, as for ``clip`` (the paper's lr is unknown, docs/methods/npc.md#npc-14).

    Forwards per step: the batch (with graph), the memory images and captions not in the batch (with graph), the
    memory pairs after the siamese step (no grad). Backwards: the batch loss alone (siamese gradient), then the
    weighted loss plus the memory loss (by the harness).
    """

    name = "npc"
    description = "NPC as the paper describes it: per-pair confidence weights, trained memory-bank loss"
    cosine_bank = True
    run_defaults: ClassVar[dict] = {"grad_clip": 10.0}

    def training_step(self, batch: Batch) -> StepOutput:
        image, text = self.model(batch.images, batch.tokens)[:2]
        pair_loss = per_pair_infonce(pair_logits(image, text, self.model.logit_scale))
        rows = self.memory_rows(batch)
        memory = self.memory_losses(rows, known=(batch, image, text))
        before = memory.detach()
        grads = torch.autograd.grad(pair_loss.mean(), self.weights, retain_graph=True, materialize_grads=True)
        after = self.siamese_after(rows, list(grads))
        half = len(rows) // 2
        weight = confidence_weight(before[:half], after[:half], before[half:], after[half:])
        weighted, memory_loss = (weight * pair_loss).mean(), memory[:half].mean() + memory[half:].mean()
        return StepOutput({"weighted": weighted, "memory": memory_loss}, {"weight": weight.mean().detach()})


class NPCOfficial(_NPCBase):
    """``npc-official``: the official code's step (docs/methods/npc-official.md), fused (docs/methods/npc.md#fused-step). The weight multiplies
    the batch-mean loss (docs/methods/npc.md#npc-1), the memory loss is a logged constant (docs/methods/npc.md#npc-2), the siamese AdamW sees 4 x the
    gradient of the batch loss as the official double backward of the two-direction sum gives (docs/methods/npc.md#npc-3), the bank
    keeps its norms (docs/methods/npc.md#npc-9); clipping at 10 on A only (docs/methods/npc.md#npc-6).

    Learning rate: the official NPC lr is 2e-7 against 5e-7 for its CLIP baseline (docs/methods/npc-official.md#learning-rate, docs/methods/npc.md#npc-14); the harness lr is the
    embedded ``clip`` lr, so the default here is 2/5 of it, for both optimisers as in the official code.

    Per step: one forward and one backward of the batch (``.grad`` = g); the memory images and captions not in the
    batch (no grad, "before"); the siamese AdamW steps the virtual set A' = copy of A with 4g; all memory pairs
    under A' (no grad, "after"); ``.grad`` x mean(w). The harness then clips and steps A's AdamW.
    """

    name = "npc-official"
    description = "NPC as the official code runs it: batch-mean weight, memory loss without gradient"
    cosine_bank = False
    computes_gradients = True
    run_defaults: ClassVar[dict] = {"grad_clip": 10.0, "lr": RunConfig.lr * 2 / 5}

    def training_step(self, batch: Batch) -> StepOutput:
        image, text = self.model(batch.images, batch.tokens)[:2]
        loss = per_pair_infonce(pair_logits(image, text, self.model.logit_scale)).mean()
        loss.backward()
        rows = self.memory_rows(batch)
        with torch.no_grad():
            before = self.memory_losses(rows, known=(batch, image.detach(), text.detach()))
            after = self.siamese_after(rows, [4.0 * w.grad for w in self.weights])
            half = len(rows) // 2
            weight = confidence_weight(before[:half], after[:half], before[half:], after[half:]).mean()
            for w in self.weights:
                w.grad.mul_(weight)
        memory_loss = before[:half].mean() + before[half:].mean()
        return StepOutput({"memory": memory_loss, "weighted": weight * loss.detach()},
                          {"clip": loss.detach(), "weight": weight})
