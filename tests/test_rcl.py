"""RCL on CLIP (docs/methods/rcl.md): the complementary contrastive loss on a hand-computed 3x3 case.

The smoke test (setup, two harness steps, checkpoint round trip) of the default parameters is
tests/test_conformance.py, which checks every registered method.
"""
import math

import numpy as np
import pytest
import torch

from ncbench.errors import UserError
from ncbench.losses import pair_logits
from ncbench.methods.rcl import RCL, RCLParams, ccl, complementary, negative_mask
from ncbench.testing import tiny_context

LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0]])


def _softmax(values: list[float]) -> list[float]:
    z = [math.exp(v) for v in values]
    return [v / sum(z) for v in z]


def test_ccl_log_on_a_3x3_logit_matrix_by_hand():
    rows = [_softmax([2, 0, 0]), _softmax([0, 1, 0]), _softmax([1, 0, 3])]  # image i over captions
    cols = [_softmax([2, 0, 1]), _softmax([0, 1, 0]), _softmax([0, 0, 3])]  # caption j over images
    i2t = sum(-math.log(1 - p[j]) for i, p in enumerate(rows) for j in range(3) if j != i) / 3
    t2i = sum(-math.log(1 - p[i]) for j, p in enumerate(cols) for i in range(3) if i != j) / 3
    mask = negative_mask(3, -1.0, np.random.default_rng(0))
    assert mask.tolist() == [[False, True, True], [True, False, True], [True, True, False]]
    torch.testing.assert_close(ccl(LOGITS, mask), torch.tensor(i2t + t2i))
    # e.g. row 0 alone: P = (e², 1, 1)/(e² + 2), its two negatives cost 2·ln((e² + 2)/(e² + 1))
    e2 = math.e ** 2
    assert -2 * math.log(1 - 1 / (e2 + 2)) == pytest.approx(2 * math.log((e2 + 2) / (e2 + 1)))


def test_complementary_forms_by_hand():
    p = torch.tensor([0.0, 0.5])
    torch.testing.assert_close(complementary(p, "log"), torch.tensor([0.0, math.log(2)]))
    torch.testing.assert_close(complementary(p, "tan"), torch.tensor([0.0, math.tan(0.5)]))
    torch.testing.assert_close(complementary(p, "abs"), p)
    torch.testing.assert_close(complementary(p, "exp"), torch.tensor([math.exp(-1), math.exp(-0.5)]))
    torch.testing.assert_close(complementary(p, "gce", 0.2), torch.tensor([0.0, (1 - 0.5 ** 0.2) / 0.2]))


def test_a_partial_ratio_draws_that_many_negatives_per_row():
    mask = negative_mask(10, 0.35, np.random.default_rng(0))
    assert (mask.sum(1) == 3).all() and not mask.diagonal().any()
    assert not torch.equal(mask, negative_mask(10, 0.35, np.random.default_rng(1)))


def test_training_step_uses_the_logit_scale_or_a_fixed_tau():
    ctx = tiny_context(RCL)
    batch = ctx.train.batch(np.arange(8))
    model = ctx.models[0]
    with torch.no_grad():
        image, text = model(batch.images, batch.tokens)[:2]
        mask = negative_mask(8, -1.0, ctx.rng)
        for params, logits in ((RCLParams(), pair_logits(image, text, model.logit_scale)),
                               (RCLParams(tau=0.05), image @ text.t() / 0.05)):
            method = RCL(params)
            method.setup(ctx)
            torch.testing.assert_close(method.training_step(batch), ccl(logits, mask))
    assert method.clean_scores() is None


@pytest.mark.parametrize("bad", [{"form": "hinge"}, {"tau": -0.1}, {"q": 0}])
def test_bad_params_name_the_flag(bad):
    with pytest.raises(UserError, match=f"--param {next(iter(bad))}="):
        RCLParams(**bad)
