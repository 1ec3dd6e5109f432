"""GMM division (docs/methods/gmm-filter.md), gmm-filter / gmm-weight, and NCR's co-divide and soft labels (docs/methods/ncr.md)."""
import json

import numpy as np
import pytest
import torch
from conftest import NCR_ABLATION_PLUGIN

from ncbench.errors import UserError
from ncbench.losses import infonce, pair_logits, per_pair_infonce, per_pair_soft_infonce
from ncbench.method import Batch, Context, Method
from ncbench.methods.gmm_filter import GmmFilter, GmmWeight
from ncbench.methods.ncr import NCR, NCRParams, ncr_confidence
from ncbench.mixture import DivisionParams, clean_posterior, division_threshold
from ncbench.registry import METHODS, load_plugin_file
from ncbench.testing import parameters, step, tiny_context


# --- the mixture -------------------------------------------------------------------------------------------------
def test_clean_posterior_picks_the_low_loss_mode():
    rng = np.random.default_rng(0)
    clean, noisy = rng.normal(1.0, 0.15, 700), rng.normal(3.0, 0.3, 300)
    losses = rng.permutation(np.concatenate([clean, noisy]))
    w = clean_posterior(losses, seed=0)
    assert w.shape == losses.shape and ((0 <= w) & (w <= 1)).all()
    assert (w[losses < 1.6] > 0.99).all() and (w[losses > 2.4] < 0.01).all()
    assert ((w > 0.5) == (losses < 2.0)).mean() > 0.99
    np.testing.assert_array_equal(w, clean_posterior(losses, seed=0))  # deterministic by seed
    np.testing.assert_allclose(clean_posterior(7 * losses - 3, seed=0), w, atol=1e-6)  # min-max normalised
    # the clean mode is the low one even when it is the smaller component
    flipped = np.concatenate([rng.normal(1.0, 0.15, 200), rng.normal(3.0, 0.3, 800)])
    assert clean_posterior(flipped, seed=1)[:200].min() > 0.99


def test_division_threshold_forces_a_noisy_share_when_every_pair_looks_clean():
    assert division_threshold(np.array([0.2, 0.9, 0.6]), 0.5, 0.01) == 0.5
    w = np.linspace(0.6, 1.0, 1000)
    threshold = division_threshold(w, 0.5, 0.01)
    assert threshold > 0.6 and (w > threshold).mean() == pytest.approx(0.99, abs=0.002)


@pytest.mark.parametrize("bad", [{"p_threshold": 1.0}, {"min_noisy_frac": -0.1}, {"refit_every": 0},
                                 {"loss_batch": -1}, {"gmm_max_iter": 0}])
def test_bad_division_params_name_the_flag(bad):
    with pytest.raises(UserError, match=f"--param {next(iter(bad))}="):
        DivisionParams(**bad)
    with pytest.raises(UserError, match="--param soft_loss=margin"):
        NCRParams(soft_loss="margin")


# --- NCR's losses ---------------------------------------------------------------------------------------------------
def test_ncr_confidence_is_one_for_a_clear_match_and_zero_for_a_mismatch():
    sim = torch.full((10, 10), 0.1)
    sim.fill_diagonal_(0.8)
    sim[3, 3] = -0.5  # pair 3: its image and caption match everything else better than each other
    conf = ncr_confidence(sim, 0.2)
    assert conf[3] == 0 and torch.allclose(conf[torch.arange(10) != 3], torch.ones(9))
    hopeless = torch.ones(4, 4) - 2 * torch.eye(4)  # every pair scores below all its negatives
    assert (ncr_confidence(hopeless, 0.2) == 0).all()  # no confident pair: 0, not a division by zero


def test_soft_target_loss_is_infonce_at_one_and_neutral_at_zero():
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(per_pair_soft_infonce(logits, torch.ones(6)), per_pair_infonce(logits))
    y = torch.ones(6)
    y[2] = 0  # pair 2's targets are uniform in both directions: its own logit is one negative among others
    uniform = lambda v: torch.logsumexp(v, 0) - v.mean()  # noqa: E731  CE of v against a uniform target
    soft = per_pair_soft_infonce(logits, y)
    torch.testing.assert_close(soft[2], 0.5 * (uniform(logits[2]) + uniform(logits[:, 2])))
    torch.testing.assert_close(soft[y == 1], per_pair_infonce(logits)[y == 1])  # a pair's target is its own y


# --- the methods on a real tiny CLIP --------------------------------------------------------------------------------
def _context(method_cls: type[Method], epochs: int = 2) -> Context:
    """20 synthetic images (100 pairs, clean pairing), batch 8; random-init tiny CLIP copies."""
    return tiny_context(method_cls, n_images=20, noise=0.0, batch_size=8, epochs=epochs)


def _batches(ctx: Context, index: dict[str, np.ndarray]) -> dict[str, Batch]:
    return {name: ctx.train.batch(part) for name, part in index.items()}


def test_gmm_filter_trains_only_on_pairs_above_the_division_threshold():
    ctx = _context(GmmFilter)
    method = GmmFilter()
    method.setup(ctx)
    method.on_epoch_start(0)
    w = method.clean_scores()
    assert w.shape == (len(ctx.train),) and method.clean_threshold() >= 0.5
    kept = set(np.flatnonzero(w > method.clean_threshold()))
    batches = list(method.epoch_batches(0))
    assert 0 < len(kept) < len(ctx.train)
    assert len(batches) == len(kept) // ctx.batch_size and all(len(b) == ctx.batch_size for b in batches)
    seen = np.concatenate(batches)
    assert set(seen) <= kept and len(set(seen)) == len(seen)
    # a division made at epoch start is deterministic by seed
    again = GmmFilter()
    again.setup(_context(GmmFilter))
    again.on_epoch_start(0)
    np.testing.assert_array_equal(again.clean_scores(), w)


def test_gmm_filter_warms_up_on_every_pair_without_scores():
    ctx = _context(GmmFilter)
    method = GmmFilter(DivisionParams(warmup_epochs=1))
    method.setup(ctx)
    method.on_epoch_start(0)
    assert method.clean_scores() is None
    assert len(list(method.epoch_batches(0))) == len(ctx.train) // ctx.batch_size


def test_gmm_weight_scales_each_pair_by_its_posterior_over_the_batch_size():
    ctx = _context(GmmWeight)
    method = GmmWeight()
    method.setup(ctx)
    model = ctx.models[0]
    batch = ctx.train.batch(np.arange(8))
    plain = infonce(pair_logits(*model(batch.images, batch.tokens)[:2], model.logit_scale))
    w = np.zeros(len(ctx.train))
    w[:4] = 1.0
    method.load_state_dict({"w": w})
    assert len(list(method.epoch_batches(0))) == len(ctx.train) // ctx.batch_size  # every pair is visited
    per_pair = per_pair_infonce(pair_logits(*model(batch.images, batch.tokens)[:2], model.logit_scale))
    torch.testing.assert_close(method.training_step(batch), per_pair[:4].sum() / 8)
    method.load_state_dict({"w": np.ones(len(ctx.train))})
    torch.testing.assert_close(method.training_step(batch), plain)


def test_ncr_trains_each_model_on_the_division_made_by_the_other():
    ctx = _context(NCR, epochs=2)
    n = len(ctx.train)  # 100
    w_a = np.where(np.arange(n) % 2 == 0, 0.9, 0.1)  # A's division: even pairs clean (50)
    w_b = np.where(np.arange(n) < 75, 0.8, 0.2)  # B's division: the first 75 pairs clean
    method = NCR()
    method.setup(ctx)
    method.load_state_dict({"w": np.stack([w_a, w_b])})
    clean_a, clean_b = set(np.flatnonzero(w_a > 0.5)), set(np.flatnonzero(w_b > 0.5))

    batches = list(method.epoch_batches(1))  # second half: unlabeled batches on
    assert len(batches) == 75 // 8  # A's labeled batches (B's clean set) set the length
    # B's labeled batches (A's clean set) end after 6 steps, and B's unlabeled ones with them
    both, a_only = {"a", "a_unlabeled", "b", "b_unlabeled"}, {"a", "a_unlabeled"}
    assert [set(index) for index in batches] == [both] * 6 + [a_only] * 3
    assert all(len(part) == 8 for index in batches for part in index.values())
    seen = {key: np.concatenate([index[key] for index in batches if key in index])
            for key in ("a", "a_unlabeled", "b", "b_unlabeled")}
    assert set(seen["a"]) <= clean_b and len(seen["a"]) == 72 == len(set(seen["a"]))
    assert set(seen["a_unlabeled"]) <= set(range(n)) - clean_b and len(seen["a_unlabeled"]) == 72  # cycled noisy pairs
    assert set(seen["b"]) <= clean_a and len(seen["b"]) == 48 == len(set(seen["b"]))
    assert set(seen["b_unlabeled"]) <= set(range(n)) - clean_a and len(seen["b_unlabeled"]) == 48
    assert method.clean_threshold() == 0.5
    np.testing.assert_allclose(method.clean_scores(), (w_a + w_b) / 2)

    # each step updates exactly the models that have a batch in it; B idles once its 6 batches are done
    before = parameters(ctx.models)
    for i, index in enumerate(batches):
        out = step(method, index)
        has_grad = [any(p.grad is not None for p in m.parameters()) for m in ctx.models]
        assert has_grad == [True, i < 6], i
        assert set(out.losses) == ({"loss_a", "loss_b"} if i < 6 else {"loss_a"})
        assert torch.isfinite(out.total())
    after = parameters(ctx.models)
    n_a = len(list(ctx.models[0].parameters()))
    assert not all(torch.equal(b, a) for b, a in zip(before[:n_a], after[:n_a]))
    assert not all(torch.equal(b, a) for b, a in zip(before[n_a:], after[n_a:]))

    first_half = list(method.epoch_batches(0))  # epoch 0 < epochs // 2: no unlabeled batches
    assert all(set(index) <= {"a", "b"} for index in first_half) and len(first_half) == 9
    assert method.eval_models() == ctx.models


def test_ncr_warm_up_gives_each_model_its_own_order_over_every_pair():
    ctx = _context(NCR)
    method = NCR(NCRParams(warmup_epochs=1))
    method.setup(ctx)
    method.on_epoch_start(0)
    assert method.clean_scores() is None
    batches = list(method.epoch_batches(0))
    assert all(set(index) == {"a", "b"} and len(index["a"]) == len(index["b"]) == 8 for index in batches)
    assert len(batches) == len(ctx.train) // 8
    order_a = np.concatenate([index["a"] for index in batches])
    order_b = np.concatenate([index["b"] for index in batches])
    assert not np.array_equal(order_a, order_b) and len(set(order_a)) == len(set(order_b)) == len(order_a)
    out = method.training_step(_batches(ctx, batches[0]))
    model = ctx.models[0]
    first = ctx.train.batch(batches[0]["a"])
    torch.testing.assert_close(out.losses["loss_a"], infonce(pair_logits(*model(first.images, first.tokens)[:2],
                                                                          model.logit_scale)))


@pytest.mark.parametrize("soft_loss", ["weighted", "soft_target"])
def test_ncr_labeled_loss_is_infonce_when_the_peer_is_sure_and_soft_otherwise(soft_loss):
    ctx = _context(NCR, epochs=2)
    method = NCR(NCRParams(soft_loss=soft_loss))
    method.setup(ctx)
    n = len(ctx.train)
    sure = np.where(np.arange(n) < 50, 1.0, 0.0)  # pairs 0..49 certainly clean, the rest certainly noisy
    method.load_state_dict({"w": np.stack([sure, sure])})
    index = next(method.epoch_batches(0))  # first half: labeled batches only
    assert set(index) == {"a", "b"}
    losses = method.training_step(_batches(ctx, index)).losses
    for m, net in enumerate(("a", "b")):
        part = ctx.train.batch(index[net])
        model = ctx.models[m]
        torch.testing.assert_close(losses[f"loss_{net}"], infonce(pair_logits(*model(part.images, part.tokens)[:2],
                                                                              model.logit_scale)))
    unsure = np.where(np.arange(n) < 50, 0.6, 0.4)  # the same division, but y = 0.6 + 0.4·conf
    method.load_state_dict({"w": np.stack([unsure, unsure])})
    again = next(method.epoch_batches(0))
    assert set(again) == set(index) and all(np.array_equal(again[k], index[k]) for k in index)
    soft = method.training_step(_batches(ctx, index)).losses
    assert all(torch.isfinite(v) for v in soft.values()) and not torch.allclose(soft["loss_a"], losses["loss_a"])
    if soft_loss == "weighted":
        assert soft["loss_a"] < losses["loss_a"]


# --- end to end: detection metrics in the record and on screen ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method, evaluated", [("gmm-filter", 1), ("ncr", 2)])
def test_cli_records_detection_metrics_each_epoch(cli, tmp_path, method, evaluated):
    proc = cli("run", "--method", method, "--noise", "0.4", "--dataset", "synthetic-mini", "--epochs", "1",
               "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    (record_path,) = tmp_path.glob("*/result.json")
    record = json.loads(record_path.read_text())
    assert record["method"]["num_models"] == evaluated and record["method"]["evaluated_models"] == evaluated
    (epoch,) = record["epochs"]
    detection = epoch["detection"]
    assert {"auroc", "precision", "recall", "f1", "kept_frac"} <= set(detection)
    assert 0 <= detection["auroc"] <= 1 and 0 < detection["kept_frac"] < 1
    for key in ("auroc", "precision", "recall", "f1"):
        assert f"{key} {detection[key]:.3f}" in " ".join(proc.stdout.split())


def test_the_co_guessing_ablation_is_ncr_without_its_unlabeled_batches():
    """examples/ablations/ncr_labeled_only.py (docs/methods/ncr.md#co-guessing): ncr's batches, orders included,
    less the co-guessed ones."""
    load_plugin_file(NCR_ABLATION_PLUGIN)
    ctx = _context(NCR, epochs=2)
    w = np.stack([np.where(np.arange(len(ctx.train)) % 2 == 0, 0.9, 0.1), np.full(len(ctx.train), 0.8)])
    w[1, :10] = 0.2  # B's division leaves A ten noisy pairs
    plans = []
    for method in (NCR(), METHODS.get("ncr-labeled-only")()):
        method.setup(ctx)
        method.load_state_dict({"w": w})
        plans.append(list(method.epoch_batches(1)))
    ncr, ablation = plans
    assert {"a_unlabeled", "b_unlabeled"} <= set().union(*ncr)
    assert len(ablation) == len(ncr)
    for full, kept in zip(ncr, ablation):
        assert set(kept) == {name for name in full if not name.endswith("_unlabeled")}
        assert all(np.array_equal(kept[name], full[name]) for name in kept)
