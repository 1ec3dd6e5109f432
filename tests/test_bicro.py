"""BiCro on CLIP (docs/methods/bicro.md): anchor-consistency soft labels, the Beta mixture, co-divided batches.

The smoke test (setup, two harness steps, checkpoint round trip) of the default parameters is
tests/test_conformance.py, which checks every registered method.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ncbench.errors import UserError
from ncbench.losses import pair_logits, per_pair_infonce
from ncbench.methods.bicro import (BiCro, BiCroParams, anchor_confidence, bmm_clean_posterior, consistency,
                                   selected_infonce, soft_labels)
from ncbench.testing import check_method, step, tiny_context


def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_consistency_compares_the_two_modalities_at_the_nearest_anchor():
    query = torch.tensor([[0.8, 0.5], [0.3, 0.6], [0.7, 0.1]])  # similarities to 2 anchors in one modality
    other = torch.tensor([[0.4, 0.9], [0.9, 0.5], [-0.2, 0.3]])  # ... and in the other
    # nearest anchors 0, 1, 0: min(0.8/0.4, 0.4/0.8) = 0.5; min(0.6/0.5, 0.5/0.6); opposite signs: 0
    torch.testing.assert_close(consistency(query, other), torch.tensor([0.5, 0.5 / 0.6, 0.0]))


def test_anchor_confidence_by_hand():
    sim = torch.tensor([[0.9, 0.8], [0.1, 0.5]])
    # pair 0: caption cost (0.2 + 0.8 − 0.9) = 0.1, image cost (0.2 + 0.1 − 0.9)_+ = 0: means over B = 2 → 0.05, 0
    # pair 1: caption cost (0.2 + 0.1 − 0.5)_+ = 0, image cost (0.2 + 0.8 − 0.5) = 0.5: means 0, 0.25
    torch.testing.assert_close(anchor_confidence(sim, 0.2), torch.tensor([0.2 - 0.025, 0.2 - 0.125]))


def test_soft_labels_from_anchor_similarities_by_hand():
    # B = 4: one anchor (B // 10 + 1). Pair 0 is a perfect match (image = caption = e0) and the most confident.
    image = _unit([1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 3], [-1, 1, 0, 0])
    text = _unit([1, 0, 0, 0], [2, 0, 1, 0], [3, 0, 0, 1], [1, 0, 1, 0])
    assert anchor_confidence(image @ text.t(), 0.2).argmax() == 0
    # similarity to the anchor's image and caption: pair 1 (1/√2, 2/√5), pair 2 (1/√10, 3/√10), pair 3 (−1/√2, 1/√2)
    r1, r2 = (1 / math.sqrt(2)) / (2 / math.sqrt(5)), 1 / 3
    image_u = _unit([1, 0, 0, 1], [1, 1, 0, 0], [1, 1, 0, 0])
    text_u = _unit([1, 1, 0, 0], [1, 0, 2, 0], [1, 0, 3, 0])
    # unlabeled: (1/√2, 1/√2) → 1; (1/√2, 1/√5) → √2/√5 = 0.632; (1/√2, 1/√10) → √2/√10 = 0.447 ≤ 0.5 → 0
    y, y_u = soft_labels(image, text, 0.2, 0.5, image_u, text_u)
    # labeled: 0.5 + (r^{i→t} + r^{t→i})/4 (one anchor: both directions use it); pair 3's 0.5 is cut to 0
    torch.testing.assert_close(y, torch.tensor([1.0, 0.5 + 2 * r1 / 4, 0.5 + 2 * r2 / 4, 0.0]))
    torch.testing.assert_close(y_u, torch.tensor([1.0, math.sqrt(2 / 5), 0.0]))
    y_all, none = soft_labels(image, text, 0.2, 0.0)
    assert none is None and y_all[3] == 0.5  # noise_tem 0 keeps every label


def test_centring_restores_consistency_inside_a_narrow_cone():
    """Fine-tuned CLIP packs each modality into a narrow cone (here: a shared axis of length 12 on top of unit-scale
    offsets), where every within-modality cosine is high and every ratio near 1; centring on the labeled batch's
    means measures the offsets instead (docs/methods/bicro.md#bicro-a15)."""
    g = torch.Generator().manual_seed(0)
    axis = torch.zeros(33)
    axis[-1] = 12.0

    def pairs(matched: bool) -> tuple[torch.Tensor, torch.Tensor]:
        offset = torch.randn(64, 32, generator=g)
        caption = offset + 0.3 * torch.randn(64, 32, generator=g)  # a matched caption sits near its image
        caption = caption if matched else caption.roll(1, 0)
        pad = torch.zeros(64, 1)
        return (F.normalize(torch.cat([offset, pad], 1) + axis, dim=1),
                F.normalize(torch.cat([caption, pad], 1) + axis, dim=1))

    labeled, matched, mismatched = pairs(True), pairs(True), pairs(False)
    assert (labeled[0] @ labeled[0].t()).mean() > 0.8
    means = {center: [soft_labels(*labeled, 0.2, 0.0, *u, center=center)[1].mean() for u in (matched, mismatched)]
             for center in (False, True)}
    assert means[False][0] > 0.9 and means[False][1] > 0.9  # raw cosines: no separation
    assert means[True][0] > 0.7 and means[True][1] < 0.3  # centred: matched pairs consistent, mismatched not


def test_beta_mixture_finds_the_low_loss_mode():
    rng = np.random.default_rng(0)
    losses = rng.permutation(np.concatenate([rng.beta(2, 8, 700), rng.beta(8, 2, 300)]))
    w = bmm_clean_posterior(losses * 5 + 1)  # min-max normalised first
    assert w.shape == losses.shape and np.isfinite(w).all() and ((0 <= w) & (w <= 1)).all()
    assert w[losses.argmin()] > 0.5 and w[losses.argmax()] < 0.5  # the clamped extremes stay finite
    assert ((w > 0.5) == (losses < 0.5)).mean() > 0.95
    np.testing.assert_allclose(w, bmm_clean_posterior(losses), rtol=1e-9)  # affine-invariant


def test_warm_up_trains_the_smallest_share_of_each_batch():
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 4.0, 0], [3.0, 0, 0, 0]])
    loss = per_pair_infonce(logits)
    torch.testing.assert_close(selected_infonce(logits, 0.5), (loss[0] + loss[2]) / 4)


def test_each_model_trains_on_the_peers_division_with_unlabeled_batches_in_the_second_half():
    ctx = tiny_context(BiCro)  # 150 pairs, batch 8, 2 epochs
    n = len(ctx.train)
    w_a = np.where(np.arange(n) % 2 == 0, 0.9, 0.1)  # A's division: 75 clean
    w_b = np.where(np.arange(n) < 100, 0.8, 0.2)  # B's: 100 clean
    method = BiCro()
    method.setup(ctx)
    method.load_state_dict({"w": np.stack([w_a, w_b])})
    first = list(method.epoch_batches(0))
    assert all(set(b) == {"a", "b"} for b in first[:9]) and all(set(b) == {"a"} for b in first[9:])
    assert len(first) == 100 // 8
    second = list(method.epoch_batches(1))
    a = np.concatenate([b["a"] for b in second])
    assert set(a) <= set(np.flatnonzero(w_b > 0.5)) and len(set(a)) == len(a) == 96
    assert set(np.concatenate([b["a_unlabeled"] for b in second])) <= set(np.flatnonzero(w_b < 0.5))
    assert set(np.concatenate([b["b"] for b in second if "b" in b])) <= set(np.flatnonzero(w_a > 0.5))
    assert set(np.concatenate([b["b_unlabeled"] for b in second if "b" in b])) <= set(np.flatnonzero(w_a < 0.5))
    out = step(method, second[-1])  # B's epoch is over: only A trains
    assert set(out.losses) == {"a"} and all(p.grad is None for p in ctx.models[1].parameters())
    np.testing.assert_allclose(method.clean_scores(), (w_a + w_b) / 2)
    assert method.eval_models() == ctx.models


def test_labeled_loss_weights_infonce_by_the_peers_soft_labels():
    ctx = tiny_context(BiCro)
    method = BiCro()
    method.setup(ctx)
    method.load_state_dict({"w": np.full((2, len(ctx.train)), 0.9)})
    batch = ctx.train.batch(np.arange(8))
    net, peer = ctx.models
    with torch.no_grad():
        y, _ = soft_labels(*peer.eval()(batch.images, batch.tokens)[:2], 0.2, 0.5, center=True)
        peer.train()
        expected = (y * per_pair_infonce(pair_logits(*net(batch.images, batch.tokens)[:2], net.logit_scale))).mean()
        out = method.training_step({"a": batch})
    torch.testing.assert_close(out.losses["a"], expected)
    assert out.report["a_y"] == y.mean() and peer.training


def test_warm_up_epochs_use_the_small_loss_selection():
    ctx = tiny_context(BiCro)
    method = BiCro(BiCroParams(warmup_epochs=1))
    method.setup(ctx)
    method.on_epoch_start(0)
    assert method.clean_scores() is None
    batches = list(method.epoch_batches(0))
    assert all(set(b) == {"a", "b"} for b in batches) and len(batches) == len(ctx.train) // 8
    batch = ctx.train.batch(batches[0]["a"])
    net = ctx.models[0]
    with torch.no_grad():
        expected = selected_infonce(pair_logits(*net(batch.images, batch.tokens)[:2], net.logit_scale), 0.3)
        torch.testing.assert_close(method.training_step({"a": batch}).losses["a"], expected)


@pytest.mark.parametrize("bad", [{"mixture": "kmeans"}, {"noise_tem": 1.0}, {"warmup_rate": 0}, {"alpha": 0}])
def test_bad_params_name_the_flag(bad):
    with pytest.raises(UserError, match=f"--param {next(iter(bad))}="):
        BiCroParams(**bad)


def test_bicro_with_ncr_gmm_keeps_the_method_contract(tmp_path):
    """The default (bmm) is checked with every registered method in test_conformance.py."""
    check_method(BiCro, tmp_path, BiCroParams(mixture="gmm"))
