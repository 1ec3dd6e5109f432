"""DECL on CLIP (docs/methods/decl.md): evidence, the Dirichlet loss terms, uncertainty, RDH, the division rule.

The smoke test (setup, two harness steps, checkpoint round trip) of the default parameters is
tests/test_conformance.py, which checks every registered method.
"""
import math

import numpy as np
import pytest
import torch

from ncbench.errors import UserError
from ncbench.methods.decl import (DECL, DECLParams, KEPT_RATIO, edl_loss, evidence, evidence_ratio, hardness,
                                  kl_to_uniform_dirichlet, rdh, uncertainty)
from ncbench.testing import step, tiny_context


def test_evidence_is_exp_of_cosine_over_tau():
    torch.testing.assert_close(evidence(torch.tensor([[0.3, -0.1]]), 0.1), torch.tensor([[math.e ** 3, math.e ** -1]]))


def test_edl_loss_terms_by_hand():
    alpha = torch.tensor([[3.0, 1.0]])  # evidence (2, 0): S = 4, expected probabilities m = (3/4, 1/4)
    # clean target (1, 0): squared error 2·(1/4)² = 1/8; variance Σ m(1 − m)/(S + 1) = (3/16 + 3/16)/5 = 3/40;
    # α̃ = (α − 1)(1 − y) + 1 = (1, 1): the KL to the uniform Dirichlet is 0
    torch.testing.assert_close(edl_loss(alpha, torch.tensor([[1.0, 0.0]]), 0.1), torch.tensor([1 / 8 + 3 / 40]))
    # noisy target (0, 0): squared error (3/4)² + (1/4)² = 5/8; α̃ = α: Dir(3, 1) has density 3x², so
    # KL = ln 3 + 2·E[ln x] with x ~ Beta(3, 1), E[ln x] = ψ(3) − ψ(4) = −1/3
    kl = math.log(3) - 2 / 3
    torch.testing.assert_close(kl_to_uniform_dirichlet(alpha), torch.tensor([kl]))
    torch.testing.assert_close(edl_loss(alpha, torch.zeros(1, 2), 0.1), torch.tensor([5 / 8 + 3 / 40 + 0.1 * kl]))


def test_uncertainty_is_batch_size_over_row_and_column_strengths():
    e = torch.tensor([[3.0, 1.0], [0.0, 2.0]])  # α rows (4, 2), (1, 3); α columns (4, 1), (2, 3)
    torch.testing.assert_close(uncertainty(e), torch.tensor([2 / 6 + 2 / 5, 2 / 4 + 2 / 5]))


SIM = torch.tensor([[0.5, 0.4, 0.1], [0.2, 0.6, 0.5], [0.45, 0.0, 0.3]])


def test_rdh_takes_the_k_hardest_hinge_costs_in_both_directions():
    # pair 0: captions (0.1, 0), images (0, 0.15); pair 1: captions (0, 0.1), images (0, 0); pair 2: captions
    # (0.35, 0), images (0, 0.4), with margin 0.2: cost (m + S_ij − S_ii)_+ and (m + S_ji − S_ii)_+
    torch.testing.assert_close(rdh(SIM, 0.2, 1), torch.tensor([0.1 + 0.15, 0.1, 0.35 + 0.4]))
    torch.testing.assert_close(rdh(SIM, 0.2, 2), torch.tensor([0.25, 0.1, 0.75]) / 2)


def test_division_keeps_a_pair_whose_bidirectional_evidence_tops_its_row():
    # Ē_ij = e^{10 S_ij} + e^{10 S_ji}; row 2: Ē_22 = 2e³ < Ē_21 = 1 + e⁵ (the largest)
    ratio = evidence_ratio(SIM, 0.1)
    torch.testing.assert_close(ratio, torch.tensor([1.0, 1.0, 2 * math.e ** 3 / (1 + math.e ** 5)]))
    assert (ratio > KEPT_RATIO).tolist() == [True, True, False]


def test_hardness_anneals_from_the_batch_to_mu():
    assert hardness(1, 128, 0.025, 5, 128) == 127  # ⌊128 − 0.025⌋
    assert hardness(4000, 128, 0.025, 5, 128) == 28
    assert hardness(10**6, 128, 0.025, 5, 128) == 5
    assert hardness(1, 128, 0.025, 5, 4) == 3  # a short batch: at most rows − 1
    ctx = tiny_context(DECL)  # 150 pairs, batch 8, 2 epochs: 36 steps; k reaches mu = 5 at step 18
    method = DECL()
    method.setup(ctx)
    assert method.eta == pytest.approx(3 / 18)
    assert hardness(12, 8, method.eta, 5, 8) == 6 and hardness(18, 8, method.eta, 5, 8) == 5
    assert hardness(6, 8, method.eta, 5, 8) == 7
    assert DECL(DECLParams(anneal_frac=0)).params.eta == 0.025


def test_training_step_zeroes_noisy_targets_and_hinges_only_clean_pairs():
    ctx = tiny_context(DECL)
    method = DECL()
    method.setup(ctx)
    ratio = np.ones(len(ctx.train))
    ratio[[1, 3]] = 0.5  # pairs 1 and 3 judged noisy
    method.load_state_dict({"step": 0, "ratio": ratio})
    batch = ctx.train.batch(np.arange(8))
    model = ctx.models[0]
    with torch.no_grad():
        image, text = model(batch.images, batch.tokens)[:2]
        out = method.training_step(batch)
    sim = image @ text.t()
    clean = torch.tensor([True, False, True, False, True, True, True, True])
    target = torch.diag(clean.float())
    e = torch.exp(sim / 0.1)
    edl = (edl_loss(e + 1, target, 0.1) + edl_loss(e.t() + 1, target, 0.1)).mean()
    torch.testing.assert_close(out.losses["edl"], edl)
    torch.testing.assert_close(out.losses["rdh"], 0.8 * rdh(sim, 0.2, 7)[clean].sum())  # k capped at rows − 1
    assert method.step == 1 and out.report["clean_frac"] == 0.75


def test_division_at_epoch_start_scores_every_pair():
    ctx = tiny_context(DECL)
    method = DECL()
    method.setup(ctx)
    assert method.clean_scores() is None
    method.on_epoch_start(0)
    ratio = method.clean_scores()
    assert ratio.shape == (len(ctx.train),) and (ratio > 0).all() and (ratio <= 1).all()
    assert 0 < (ratio > method.clean_threshold()).sum() < len(ratio)
    warm = DECL(DECLParams(warmup_epochs=1))
    warm.setup(ctx)
    warm.on_epoch_start(0)
    assert warm.clean_scores() is None
    step(warm, np.arange(8))
    assert warm.step == 1


@pytest.mark.parametrize("bad", [{"tau": 0}, {"mu": 0}, {"anneal_frac": 1.5}, {"lambda2": -1}])
def test_bad_params_name_the_flag(bad):
    with pytest.raises(UserError, match=f"--param {next(iter(bad))}="):
        DECLParams(**bad)
