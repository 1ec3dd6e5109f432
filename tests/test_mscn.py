"""MSCN-style meta-correction (docs/methods/mscn.md) and the harness's clean subset (docs/methods/mscn.md#meta-data)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ncbench import config, harness
from ncbench.backbone import tiny_tokenizer
from ncbench.data import Pairs
from ncbench.datasets.synthetic import generate
from ncbench.errors import UserError
from ncbench.losses import infonce, pair_logits
from ncbench.method import Context
from ncbench.methods.clip import CLIPFineTune
from ncbench.methods.mscn import MSCN, MetaNet, MSCNParams, fit_beta, meta_bce, purify, virtual_projections
from ncbench.registry import DATASETS
from ncbench.testing import tiny_context

MINI = ("--dataset", "synthetic-mini", "--epochs", "1")


# --- the bi-level math -------------------------------------------------------------------------------------------
def _tiny_problem(v_hat: bool):
    """A float64 toy: pooled features, projections, meta pairs and a meta network with every weight random."""
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    pooled, meta_pooled = (randn(6, 5), randn(6, 5)), (randn(8, 5), randn(8, 5))
    proj = [0.5 * randn(5, 4), 0.5 * randn(5, 4)]
    labels = torch.arange(8, dtype=torch.float64) % 2
    net = MetaNet(4, 3).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(randn(*p.shape))
    hat = [randn(5, 4).square() + 0.1, randn(5, 4).square() + 0.1] if v_hat else None

    def meta_loss(second_order: bool = True) -> torch.Tensor:
        virtual = virtual_projections(net, pooled, proj, torch.tensor(2.0, dtype=torch.float64), 0.3, hat, 1e-6)
        return meta_bce(net, meta_pooled, virtual if second_order else proj, labels)[0]

    return net, meta_loss


@pytest.mark.parametrize("adam", [True, False], ids=["adam-virtual-step", "sgd-virtual-step"])
def test_meta_gradient_flows_through_the_virtual_step_and_matches_central_differences(adam):
    """docs/methods/mscn.md#checks (2): autograd's d L_meta / d θ through P'(θ) equals central differences along random directions."""
    net, meta_loss = _tiny_problem(adam)
    params = list(net.parameters())
    full = torch.autograd.grad(meta_loss(), params)
    direct = torch.autograd.grad(meta_loss(second_order=False), params)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        values = []
        for step in (1e-6, -2e-6, 1e-6):  # θ + εd, θ − εd, back to θ
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(step * d)
            values.append(meta_loss().item())
        numeric = (values[0] - values[1]) / 2e-6
        analytic = sum(float((a * d).sum()) for a, d in zip(full, direction))
        first_order = sum(float((a * d).sum()) for a, d in zip(direct, direction))
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
        # the second-order path (θ -> weights -> g -> P') carries a real share of the hyper-gradient
        assert abs(analytic - first_order) > 1e-2 * abs(analytic)


# --- the method on a real tiny CLIP ------------------------------------------------------------------------------
def _context(batch_size: int = 32) -> Context:
    """60 synthetic images (300 pairs, clean pairing), 6 of them carved out as the clean subset; random tiny CLIP."""
    return tiny_context(MSCN, n_images=60, noise=0.0, batch_size=batch_size, epochs=2)


def _meta_state(method: MSCN) -> torch.Tensor:
    return torch.cat([p.detach().ravel().clone() for p in method.meta_net.parameters()])


def test_warmup_loss_is_clip_loss_and_meta_step_leaves_clip_gradients_alone():
    """docs/methods/mscn.md#checks (1): with w ≡ 1 the loss is CLIP's InfoNCE; the meta update writes no gradient into the CLIP model."""
    ctx = _context()
    method = MSCN()
    method.setup(ctx)
    method.on_epoch_start(0)
    batch = ctx.train.batch(np.arange(32))
    model = ctx.models[0]
    before = _meta_state(method)
    out = method.training_step(batch)
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(before, _meta_state(method))
    assert set(out.losses) == {"loss"} and set(out.report) == {"meta_bce", "meta_acc"}
    image, text = model(batch.images, batch.tokens)[:2]
    torch.testing.assert_close(out.losses["loss"], infonce(pair_logits(image, text, model.logit_scale)))
    clip = CLIPFineTune()
    clip.setup(ctx)
    torch.testing.assert_close(out.losses["loss"], clip.training_step(batch))


def test_main_stage_step_weights_pairs_and_uses_the_second_order_meta_gradient():
    states = {}
    for order in (2, 1):
        ctx = _context()
        method = MSCN(MSCNParams(warmup_epochs=0, meta_order=order))
        method.setup(ctx)
        method.on_epoch_start(0)
        assert method.clean_scores() is not None and len(method.clean_scores()) == len(ctx.train)
        assert method.keep.sum() >= 0.2 * len(ctx.train)
        batch = ctx.train.batch(next(iter(method.epoch_batches(0))))
        out = method.training_step(batch)
        assert set(out.report) == {"weight", "kept", "em_used", "meta_bce", "meta_acc"}
        assert 0 < float(out.report["weight"]) < 1 and torch.isfinite(out.losses["loss"])
        assert all(p.grad is None for p in ctx.models[0].parameters())
        out.total().backward()
        assert all(p.grad is not None for p in method.proj)
        states[order] = _meta_state(method)
    assert not torch.allclose(states[2], states[1], rtol=0, atol=1e-9)


def test_negative_meta_pairs_are_true_mismatches_and_resampled():
    ctx = _context()
    method = MSCN()
    method.setup(ctx)
    first = method.neg_image.copy()
    assert (first != ctx.clean_subset.pair_image).all()
    method.on_epoch_start(0)
    assert (method.neg_image != ctx.clean_subset.pair_image).all() and not np.array_equal(first, method.neg_image)
    batch, labels = method._meta_batch()
    assert labels.sum() == len(labels) // 2


# --- purification ------------------------------------------------------------------------------------------------
def test_beta_moments_recover_parameters():
    x = np.random.default_rng(0).beta(2.0, 5.0, 200_000)
    a, b = fit_beta(x)
    assert a == pytest.approx(2.0, rel=0.03) and b == pytest.approx(5.0, rel=0.03)


def test_em_recovers_a_30_70_mixture_from_a_rough_meta_initialisation():
    rng = np.random.default_rng(0)
    clean = rng.random(20_000) < 0.7
    scores = np.where(clean, rng.beta(8, 2, 20_000), rng.beta(2, 8, 20_000))
    # meta scores a little off the training distribution (meta pairs are scored more confidently)
    p_clean, keep, used_em = purify(scores, rng.beta(12, 2, 500), rng.beta(2, 12, 500), min_keep_frac=0.2)
    assert used_em
    assert p_clean.mean() == pytest.approx(0.7, abs=0.02)
    assert keep.mean() == pytest.approx(0.7, abs=0.02)
    assert (keep == clean).mean() > 0.97


def test_min_keep_guard_keeps_the_highest_scores():
    rng = np.random.default_rng(0)
    scores = rng.beta(2, 8, 1000)  # everything looks like the negatives
    p_clean, keep, _ = purify(scores, rng.beta(8, 2, 200), rng.beta(2, 8, 200), min_keep_frac=0.25)
    assert keep.sum() == 250
    assert scores[keep].min() >= scores[~keep].max()


# --- the clean subset --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_pairs, fraction, expected", [(145_000, 0.02, 2_900), (25_000, 0.02, 1_000),
                                                         (2_000, 0.02, 200), (1_000_000, 0.02, 10_000),
                                                         (25_000, 0.05, 1_250)])
def test_clean_subset_size_rule(n_pairs, fraction, expected):
    assert harness.clean_subset_size(n_pairs, fraction) == expected


def test_carve_takes_whole_images_deterministically_and_nested():
    split = generate("downstream", 100, seed=1)
    pairs = Pairs("toy", split, split, split)
    assert harness.carve_clean_subset(pairs, 0.0, 0) == (pairs, None)
    rest, clean = harness.carve_clean_subset(pairs, 0.02, 0)
    assert clean.n_captions == 50 and clean.n_images == 10
    assert np.bincount(clean.caption_image).tolist() == [5] * 10  # all captions of each chosen image
    assert rest.train.n_captions + clean.n_captions == split.n_captions
    assert np.array_equal(rest.train.images, split.images)  # the image array is shared, not copied
    chosen = {split.images[i].tobytes() for i in range(split.n_images)} & {im.tobytes() for im in clean.images}
    assert len(chosen) == 10
    assert not {split.images[i].tobytes() for i in rest.train.caption_image} & chosen
    for c, i in zip(clean.captions, clean.caption_image):  # clean pairs are true pairs
        originals = [j for j, text in zip(split.caption_image, split.captions) if text == c]
        assert any(np.array_equal(split.images[j], clean.images[i]) for j in originals)
    again = harness.carve_clean_subset(pairs, 0.02, 0)[1]
    assert again.captions == clean.captions and np.array_equal(again.images, clean.images)
    bigger = harness.carve_clean_subset(pairs, 0.3, 0)[1]
    assert {im.tobytes() for im in clean.images} <= {im.tobytes() for im in bigger.images}
    assert harness.carve_clean_subset(pairs, 0.02, 1)[1].captions != clean.captions
    with pytest.raises(UserError, match="real noise"):  # CC-like data: its training pairs are not known clean
        harness.carve_clean_subset(Pairs("cc-like", split, split, split, has_clean_mask=False), 0.02, 0)


class _Captured(Exception):
    """Raised by the probes' setup to hand the harness's context to the test without training."""

    def __init__(self, ctx: Context):
        super().__init__("captured")
        self.ctx = ctx


class ProbeClean(CLIPFineTune):
    name = "probe-clean"
    uses_clean_subset = True

    def setup(self, ctx: Context) -> None:
        raise _Captured(ctx)


class ProbePlain(ProbeClean):
    name = "probe-plain"
    uses_clean_subset = False


def _captured_context(method: str, tmp_path: Path, **flags) -> Context:
    from ncbench.registry import METHODS

    cfg = config.resolve(METHODS.get(f"test_mscn:{method}"), {"dataset": "synthetic-mini", "noise": 0.6, **flags})
    with pytest.raises(_Captured) as caught:
        harness.run(cfg, tmp_path, Path(os.environ["NCBENCH_CACHE"]))
    return caught.value.ctx


def _pair_keys(images: np.ndarray, tokens: torch.Tensor, pair_image: np.ndarray) -> list[tuple[bytes, bytes]]:
    return [(images[i].tobytes(), tokens[p].numpy().tobytes()) for p, i in enumerate(pair_image)]


def test_harness_carves_a_clean_subset_before_noise_for_declaring_methods_only(tmp_path):
    raw = DATASETS.get("synthetic-mini")().load(None, Path(os.environ["NCBENCH_CACHE"])).train
    true_pairs = set(_pair_keys(raw.images, tiny_tokenizer("ncbench-tiny")(raw.captions), raw.caption_image))

    ctx = _captured_context("ProbeClean", tmp_path)
    clean, train = ctx.clean_subset, ctx.train
    assert len(clean) == harness.clean_subset_size(raw.n_captions, config.DEFAULT_CLEAN_FRACTION) == 200
    assert len(clean) + len(train) == raw.n_captions
    assert set(_pair_keys(clean.images, clean.tokens, clean.pair_image)) <= true_pairs  # no noise in the subset
    noisy = _pair_keys(train.images, train.tokens, train.pair_image)
    assert 0.55 < 1 - np.mean([key in true_pairs for key in noisy]) <= 0.6  # while the training pairs got it
    clean_images = {im.tobytes() for im in clean.images}
    assert not clean_images & {train.images[i].tobytes() for i in np.unique(train.pair_image)}

    plain = _captured_context("ProbePlain", tmp_path)
    assert plain.clean_subset is None and len(plain.train) == raw.n_captions
    with pytest.raises(UserError, match="does not use a clean subset"):
        _captured_context("ProbePlain", tmp_path, clean_fraction=0.05)
    with pytest.raises(UserError, match="needs a clean subset"):
        _captured_context("ProbeClean", tmp_path, clean_fraction=0.0)


def test_runs_without_clean_data_keep_their_ids():
    cfg = config.RunConfig(method="clip", noise=0.2)
    assert "clean_fraction" not in cfg.identity()
    assert "clean_fraction" in config.RunConfig(method="mscn", clean_fraction=0.02).identity()
    with pytest.raises(UserError, match="--clean-fraction"):
        config.RunConfig(clean_fraction=0.7)


def test_cli_rejects_clean_fraction_for_a_method_without_clean_data(cli, tmp_path):
    proc = cli("run", "--method", "clip", "--clean-fraction", "0.05", *MINI, "--out", tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--clean-fraction 0.05: method clip does not use a clean subset" in " ".join(proc.stderr.split())
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_mscn_run_writes_a_record_with_clean_subset_and_detection(cli, tmp_path):
    proc = cli("run", "--method", "mscn", "--noise", "0.4", *MINI, "--param", "warmup_epochs=0", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    (record_path,) = tmp_path.glob("*/result.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "complete" and record["config"]["clean_fraction"] == 0.02
    assert record["method"]["uses_clean_subset"] and record["method"]["clean_subset_pairs"] == 200
    assert record["dataset"]["train_pairs"] == 1800
    (epoch,) = record["epochs"]
    assert set(epoch["losses"]) == {"loss"}
    assert set(epoch["report"]) == {"meta_bce", "meta_acc", "weight", "kept", "em_used"}
    assert 0.2 <= epoch["detection"]["kept_frac"] <= 1
