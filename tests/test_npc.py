"""NPC (docs/methods/npc.md): the fused official step equals the unfused official structure; the memory bank; the GMM; CLI runs."""
import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from npc_official_unfused import UnfusedNPCOfficial
from sklearn.mixture import GaussianMixture

from ncbench.backbone import load_backbone
from ncbench.data import ImageNormalizer
from ncbench.errors import UserError
from ncbench.losses import pair_logits, per_pair_infonce
from ncbench.method import Context, TrainSet
from ncbench.methods.npc import NPC, NPCOfficial, confidence_weight, memory_bank, npc_clean_probability
from ncbench.noise import make_noise
from ncbench.optim import adamw
from ncbench.registry import DATASETS
from ncbench.testing import parameters, step

CACHE = Path(os.environ["NCBENCH_CACHE"])


@pytest.fixture(scope="module")
def mini():
    """synthetic-mini's training split under 40 % caption-shuffle noise, and a randomly initialised ncbench-tiny
    (seeded): each test builds its own context from them."""
    torch.manual_seed(0)
    backbone = load_backbone("ncbench-tiny", "none", CACHE)
    pairs = DATASETS.get("synthetic-mini")().load(None, CACHE)
    pairing = make_noise("caption-shuffle", pairs.train.caption_image, 0.4, 0, pairs.name)
    normalize = ImageNormalizer(backbone.mean, backbone.std, backbone.image_size, torch.device("cpu"))
    train = TrainSet(pairs.train.images, backbone.tokenize(pairs.train.captions), pairing.assigned_image, normalize)
    return train, backbone.model.train()


def build_context(mini, batch_size: int) -> Context:
    """A context as the harness builds it (lr 2e-4) over ``mini`` with a fresh copy of its model."""
    train, model = mini
    return Context.create([copy.deepcopy(model)], train, seed=0, epochs=1, batch_size=batch_size, lr=2e-4,
                          weight_decay=0.1)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


def test_fused_official_step_equals_the_unfused_reference(mini):
    """Four harness steps of ``npc-official`` (fused, one model) against main_NPC.py's structure (model copy, separate
    siamese forward, double backward, two AdamWs): same gradients, siamese moments, weights and parameters."""
    ctx = build_context(mini, batch_size=32)
    reference_model = copy.deepcopy(ctx.models[0])
    method = NPCOfficial()
    method.setup(ctx)
    method.on_epoch_start(0)
    reference = UnfusedNPCOfficial(reference_model, ctx.train, method.by_image, method.by_text, ctx.lr, ctx.weight_decay)
    fused_params, reference_params = list(ctx.models[0].parameters()), list(reference_model.parameters())
    for index in list(method.epoch_batches(0))[:4]:
        fused = step(method, index, grad_clip=NPCOfficial.run_defaults["grad_clip"])
        unfused = reference.step(ctx.train.batch(index), ctx.lr)
        assert set(fused.losses) == {"memory", "weighted"} and set(fused.report) == {"clip", "weight"}
        assert float(fused.report["weight"]) == pytest.approx(float(unfused["weight"]), abs=1e-6)
        assert float(fused.total()) == pytest.approx(float(unfused["loss"]), rel=1e-5)
        g_fused, g_ref = _flat(p.grad for p in fused_params), _flat(p.grad for p in reference_params)
        assert (g_fused - g_ref).norm() <= 1e-4 * g_ref.norm()
    moments = [method.siamese.state[p]["exp_avg"] for p in method.siamese_weights]
    reference_moments = [reference.siamese_optimizer.state[p]["exp_avg"] for p in reference.siamese.parameters()]
    m_fused, m_ref = _flat(moments), _flat(reference_moments)
    assert (m_fused - m_ref).norm() <= 1e-4 * m_ref.norm()  # the siamese AdamW saw 4 x the batch gradient in both
    # parameters: Adam turns float noise in near-zero gradients into a few % of a step (lr = 2e-4) on a few weights
    # (measured 1.5 % on the MLP-2 tiny model); a wrong weight or gradient scale moves weights by about a step
    assert (_flat(fused_params) - _flat(reference_params)).abs().max() < 5e-2 * ctx.lr


def _pair_losses(model, batch) -> torch.Tensor:
    image, text = model(batch.images, batch.tokens)[:2]
    return per_pair_infonce(pair_logits(image, text, model.logit_scale))


def test_paper_step_equals_an_unfused_paper_step(mini):
    """One harness step of ``npc`` (fused) against the paper's step written out with a real model copy: A' = A takes
    one AdamW step on the batch-mean loss (docs/methods/npc.md#npc-3); w from the memory losses of A and A'; A's gradient is that of
    mean(w_i l_i) (docs/methods/npc.md#npc-1) plus the memory losses computed by A with gradient (docs/methods/npc.md#npc-2), clipped at 10."""
    ctx = build_context(mini, batch_size=32)
    method = NPC()
    method.setup(ctx)
    method.on_epoch_start(0)
    index = next(iter(method.epoch_batches(0)))
    batch = ctx.train.batch(index)
    model = copy.deepcopy(ctx.models[0])
    siamese = copy.deepcopy(model)
    siamese_optimizer = adamw(siamese.parameters(), ctx.lr, ctx.weight_decay)
    _pair_losses(siamese, batch).mean().backward()
    siamese_optimizer.step()
    memory_image, memory_text = ctx.train.batch(method.by_image[index]), ctx.train.batch(method.by_text[index])
    with torch.no_grad():
        after_image, after_text = _pair_losses(siamese, memory_image), _pair_losses(siamese, memory_text)
    before_image, before_text = _pair_losses(model, memory_image), _pair_losses(model, memory_text)
    weight = confidence_weight(before_image.detach(), after_image, before_text.detach(), after_text)
    loss = (weight * _pair_losses(model, batch)).mean() + before_image.mean() + before_text.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)

    fused = step(method, index, grad_clip=NPC.run_defaults["grad_clip"])
    assert set(fused.losses) == {"weighted", "memory"} and set(fused.report) == {"weight"}
    assert float(fused.total().detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float(fused.report["weight"]) == pytest.approx(float(weight.mean()), abs=1e-6)
    g_fused, g_ref = _flat(p.grad for p in ctx.models[0].parameters()), _flat(p.grad for p in model.parameters())
    assert (g_fused - g_ref).norm() <= 1e-4 * g_ref.norm()
    m_fused = _flat(method.siamese.state[p]["exp_avg"] for p in method.siamese_weights)
    m_ref = _flat(siamese_optimizer.state[p]["exp_avg"] for p in siamese.parameters())
    assert (m_fused - m_ref).norm() <= 1e-5 * m_ref.norm()


def test_official_resumes_from_its_state_dict_with_the_same_next_step(mini):
    """The siamese AdamW moments and the bank travel in ``state_dict``: a fresh method loaded from it (with the
    model and optimiser states, as the harness resumes) takes exactly the step the original takes."""
    ctx = build_context(mini, batch_size=16)
    method = NPCOfficial()
    method.setup(ctx)
    method.on_epoch_start(0)
    first, second, third = list(method.epoch_batches(0))[:3]
    for index in (first, second):
        step(method, index, grad_clip=10.0)
    saved = copy.deepcopy({"model": ctx.models[0].state_dict(), "optimizer": ctx.optimizers[0].state_dict(),
                           "method": method.state_dict()})
    model = copy.deepcopy(ctx.models[0])
    model.load_state_dict(saved["model"])
    resumed = NPCOfficial()
    resumed.setup(Context.create([model], ctx.train, seed=ctx.seed, epochs=ctx.epochs, batch_size=ctx.batch_size,
                                 lr=ctx.lr, weight_decay=ctx.weight_decay))
    resumed.ctx.optimizers[0].load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["method"])
    resumed.on_epoch_start(1)  # frozen bank: not rebuilt
    assert (resumed.by_image == method.by_image).all() and (resumed.by_text == method.by_text).all()
    for m in (method, resumed):
        step(m, third, grad_clip=10.0)
    torch.testing.assert_close(parameters([model]), parameters(ctx.models), rtol=0, atol=0)


def test_bad_npc_params_are_one_line_user_errors():
    with pytest.raises(UserError, match="bank_refresh=never"):
        NPC.make_params({"bank_refresh": "never"})
    with pytest.raises(UserError, match="clean_threshold"):
        NPCOfficial.make_params({"clean_threshold": "1.5"})


def test_memory_bank_maps_each_pair_to_its_nearest_clean_pair():
    """Pairs (image, caption): 0 (img0, t0) noisy; 1 (img1, t1), 2 (img2, t2), 3 (img0, t3) clean. img1 has norm 3
    and cosine 0.6 with img0; t2 has norm 0.5 and is the closest direction to t0."""
    image_emb = torch.tensor([[1.0, 0.0], [1.8, 2.4], [0.0, 1.0]])
    text_emb = torch.tensor([[1.0, 0.1], [0.0, 1.0], [0.5, 0.0], [0.7, 0.7]])
    pair_image = np.array([0, 1, 2, 0])
    clean = np.array([False, True, True, True])
    by_image, by_text = memory_bank(image_emb, text_emb, pair_image, clean, cosine=True)
    assert by_image.tolist() == [3, 1, 2, 3]  # pairs of one image share the entry; a clean pair of the same image
    assert by_text.tolist() == [2, 1, 2, 3]  # a clean caption maps to itself
    by_image, by_text = memory_bank(image_emb, text_emb, pair_image, clean, cosine=False)
    assert by_image.tolist() == [1, 1, 1, 1]  # official (docs/methods/npc.md#npc-9): the bank keeps its norms, the long img1 wins
    assert by_text.tolist() == [3, 1, 3, 3]
    with pytest.raises(RuntimeError, match="no training pair"):
        memory_bank(image_emb, text_emb, pair_image, np.zeros(4, dtype=bool), cosine=True)


def test_gmm_picks_the_low_loss_mode():
    rng = np.random.default_rng(0)
    low, high = rng.normal(1.0, 0.2, 700), rng.normal(4.0, 0.5, 300)
    losses = rng.permutation(np.concatenate([low, high]))
    p = npc_clean_probability(losses, seed=3)
    assert (p[losses < 1.5] > 0.9).mean() > 0.99 and (p[losses > 3.0] < 0.1).mean() > 0.99
    gmm = GaussianMixture(n_components=2, max_iter=100, tol=1e-2, reg_covar=5e-4, random_state=3).fit(losses[:, None])
    direct = gmm.predict_proba(losses[:, None])[:, gmm.means_.argmin()]
    np.testing.assert_allclose(p, direct, atol=1e-6)  # same model as get_mbank's fit on the raw losses


def test_confidence_weight_is_tanh_of_the_mean_ratio_below_one_and_one_above():
    before, after = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0])
    w = confidence_weight(before, after, before, after)
    torch.testing.assert_close(w, torch.tensor([float(np.tanh(0.5)), 1.0, 1.0]))


@pytest.mark.slow
def test_npc_runs_end_to_end_through_the_cli(cli, tmp_path):
    for method, lr in (("npc", 5e-4), ("npc-official", 2e-4)):
        proc = cli("run", "--method", method, "--noise", "0.4", "--dataset", "synthetic-mini", "--epochs", "1",
                   "--out", tmp_path / method)
        assert proc.returncode == 0, proc.stderr
        (record_path,) = (tmp_path / method).glob("*/result.json")
        record = json.loads(record_path.read_text())
        assert record["status"] == "complete" and record["method"]["name"] == method
        assert record["config"]["grad_clip"] == 10.0 and record["config"]["lr"] == pytest.approx(lr)
        (epoch,) = record["epochs"]
        assert 0.0 <= epoch["detection"]["auroc"] <= 1.0 and 0.0 < epoch["report"]["weight"] <= 1.0
        assert epoch["losses"]["loss"] == pytest.approx(epoch["losses"]["weighted"] + epoch["losses"]["memory"])
