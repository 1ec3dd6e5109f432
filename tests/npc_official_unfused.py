"""The official NPC step, unfused (docs/methods/npc.md#official-step, as written): the yardstick that ``npc-official``'s
fused step must match (tests/test_npc.py), not part of the package; benchmarks/npc_step.py times it too."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncbench.losses import pair_logits, per_pair_infonce
from ncbench.method import Batch, TrainSet
from ncbench.optim import adamw, set_lr


class UnfusedNPCOfficial:
    """main_NPC.py's step with its own two models and two AdamWs (docs/methods/npc.md#official-step, steps 1-10): copy A into A', A''s
    "before" memory losses, A' and A forwards on the batch, two A' backwards of the two-direction sum, the siamese
    AdamW step, A''s "after" memory losses, the weight, A's backward of the batch-mean loss times mean(w) plus the
    no-grad memory term, clipping at ``grad_clip``, A's AdamW step."""

    def __init__(self, model: nn.Module, train: TrainSet, by_image: np.ndarray, by_text: np.ndarray, lr: float,
                 weight_decay: float, grad_clip: float = 10.0):
        self.model, self.siamese = model, copy.deepcopy(model)
        self.optimizer = adamw(self.model.parameters(), lr, weight_decay)
        self.siamese_optimizer = adamw(self.siamese.parameters(), lr, weight_decay)
        self.train, self.by_image, self.by_text, self.grad_clip = train, by_image, by_text, grad_clip

    def _memory_loss(self, rows: np.ndarray) -> Tensor:
        """Per-pair CE of A' on the B memory pairs ``rows`` (one full forward, duplicates included)."""
        memory = self.train.batch(rows)
        image, text = self.siamese(memory.images, memory.tokens)[:2]
        return per_pair_infonce(pair_logits(image, text, self.siamese.logit_scale))

    def step(self, batch: Batch, lr: float) -> dict[str, Tensor]:
        for optimizer in (self.optimizer, self.siamese_optimizer):
            set_lr(optimizer, lr)
        index = batch.index.numpy()
        self.siamese.load_state_dict(self.model.state_dict())
        self.siamese.eval()
        with torch.no_grad():
            before_image, before_text = self._memory_loss(self.by_image[index]), self._memory_loss(self.by_text[index])
        target = torch.arange(len(index))
        siamese_logits = pair_logits(*self.siamese(batch.images, batch.tokens)[:2], self.siamese.logit_scale)
        logits = pair_logits(*self.model(batch.images, batch.tokens)[:2], self.model.logit_scale)
        siamese_loss = F.cross_entropy(siamese_logits, target) + F.cross_entropy(siamese_logits.t(), target)
        self.siamese_optimizer.zero_grad()
        siamese_loss.backward(retain_graph=True)
        siamese_loss.backward()
        self.siamese_optimizer.step()
        with torch.no_grad():
            after_image, after_text = self._memory_loss(self.by_image[index]), self._memory_loss(self.by_text[index])
        ratio = 0.5 * (before_image / after_image + before_text / after_text)
        weight = torch.where(ratio < 1, torch.tanh(ratio), torch.ones_like(ratio))
        batch_loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        loss = (before_image + before_text).mean() + (weight * batch_loss).mean()
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return {"loss": loss.detach(), "weight": weight.mean()}
