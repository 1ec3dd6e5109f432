"""OSA on CLIP (docs/methods/osa.md): the origin, the normalised logit, the weights, the frozen estimator.

The smoke test (setup, two harness steps, checkpoint round trip) of the default parameters is
tests/test_conformance.py, which checks every registered method.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from ncbench.errors import UserError
from ncbench.losses import pair_logits, weighted_infonce
from ncbench.methods.osa import OSA, OSAParams, normalised_logit, origin_logit, osa_weight
from ncbench.testing import parameters, step, tiny_context


def test_weights_of_given_estimator_logits_by_hand():
    x = normalised_logit(torch.tensor([30.0, 25.0, 20.0, 10.0]), origin=15.0)  # above origin: 15, 10, 5, 0
    torch.testing.assert_close(x, torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))
    # w = x²(1 − x²): 0 for the batch's top pair and at or below the origin
    torch.testing.assert_close(osa_weight(x), torch.tensor([0.0, (4 / 9) * (5 / 9), (1 / 9) * (8 / 9), 0.0]))
    assert osa_weight(torch.tensor(2 ** -0.5)) == pytest.approx(0.25)  # the peak
    # nothing above the origin: every weight 0 (the official code divides 0 by 0 here)
    assert (normalised_logit(torch.tensor([3.0, 5.0]), origin=15.0) == 0).all()


def test_weighted_infonce_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    ce = math.log(1 + math.exp(-2))  # every CE_i2t and CE_t2i here
    torch.testing.assert_close(weighted_infonce(logits, torch.tensor([1.0, 0.0])), torch.tensor(0.5 * (2 * ce) / 2))
    torch.testing.assert_close(weighted_infonce(logits, torch.ones(2)), torch.tensor(ce))


class _Probe(nn.Module):
    """Image embedding (1, 0), text embedding (cos θ, sin θ), logit scale 10; records its inputs."""

    def __init__(self, theta: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.theta = theta

    def forward(self, images, tokens):
        self.inputs = images, tokens
        n = len(images)
        return (torch.tensor([[1.0, 0.0]]).expand(n, 2),
                torch.tensor([[math.cos(self.theta), math.sin(self.theta)]]).expand(n, 2))


def test_origin_is_the_mean_logit_of_noise_images_and_random_tokens():
    probe = _Probe(theta=1.0)
    origin = origin_logit(probe, samples=6, image_size=16, context_length=12, seed=3, device=torch.device("cpu"))
    assert origin == pytest.approx(10 * math.cos(1.0))
    images, tokens = probe.inputs
    assert images.shape == (6, 3, 16, 16) and 0 <= images.min() and images.max() < 1  # uniform, unnormalised
    assert tokens.shape == (6, 12) and tokens.dtype == torch.long and 0 <= tokens.min() and tokens.max() < 100
    again = _Probe(theta=1.0)
    origin_logit(again, samples=6, image_size=16, context_length=12, seed=3, device=torch.device("cpu"))
    assert torch.equal(again.inputs[0], images)  # seeded: a resumed run gets the same origin


def test_the_estimator_is_a_frozen_copy_of_the_pretrained_model():
    ctx = tiny_context(OSA)
    pretrained = parameters(ctx.models)
    method = OSA()
    method.setup(ctx)
    assert not method.estimator.training and not any(p.requires_grad for p in method.estimator.parameters())
    batch = ctx.train.batch(np.arange(8))
    with torch.no_grad():  # the step's weights come from the estimator, its loss from the trained model
        img, txt = ctx.models[0](batch.images, batch.tokens)[:2]
        diag = ctx.models[0].logit_scale.exp() * (img * txt).sum(1)
        w = osa_weight(normalised_logit(diag, method.origin))
        out = method.training_step(batch)
    expected = weighted_infonce(pair_logits(img, txt, ctx.models[0].logit_scale), w)
    torch.testing.assert_close(out.losses["loss"], expected)
    for _ in range(2):
        step(method, np.arange(8))
    assert all(torch.equal(a, b) for a, b in zip(pretrained, parameters([method.estimator])))
    assert any(not torch.equal(a, b) for a, b in zip(pretrained, parameters(ctx.models)))


def test_clean_scores_are_the_estimators_normalised_logits_and_keep_pairs_above_the_origin():
    ctx = tiny_context(OSA)
    method = OSA()
    method.setup(ctx)
    scores = method.clean_scores()
    assert scores.shape == (len(ctx.train),) and scores.max() == pytest.approx(1.0) and scores.min() >= 0
    assert method.clean_threshold() == 0.0
    with torch.no_grad():
        img, txt = ctx.encode_train(method.estimator)
        diag = method.estimator.logit_scale.exp() * (img[torch.from_numpy(ctx.train.pair_image)] * txt).sum(1)
    np.testing.assert_array_equal(scores > 0, (diag > method.origin).numpy())


def test_bad_params_name_the_flag():
    with pytest.raises(UserError, match="--param origin_samples="):
        OSAParams(origin_samples=-1)
