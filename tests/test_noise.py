"""caption-shuffle noise: exact count, the true mask, determinism (docs/noise.md#caption-shuffle)."""
import numpy as np
import pytest

from ncbench.errors import UserError
from ncbench.noise import NoisyPairing, caption_shuffle, make_noise

CAPTION_IMAGE = np.repeat(np.arange(200), 5)


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.4, 0.6, 0.95])
def test_exactly_floor_ratio_rows_are_shuffled(ratio):
    noise = caption_shuffle(CAPTION_IMAGE, ratio, seed=3)
    moved = noise.assigned_image != CAPTION_IMAGE
    n = int(ratio * len(CAPTION_IMAGE))
    assert moved.sum() <= n
    # shuffled rows that land on their own image are clean; only a handful do (docs/noise.md#caption-shuffle-fixed-points: ~1 + (c-1)r)
    assert n - moved.sum() <= max(10, 0.02 * n)
    # a permutation among the selected rows: every image keeps its number of captions
    assert np.array_equal(np.bincount(noise.assigned_image, minlength=200), np.full(200, 5))


def test_mask_is_the_true_clean_mask():
    noise = caption_shuffle(CAPTION_IMAGE, 0.5, seed=1)
    np.testing.assert_array_equal(noise.clean, noise.assigned_image == CAPTION_IMAGE)
    assert noise.realised_ratio == pytest.approx(1 - noise.clean.mean())
    assert 0.48 < noise.realised_ratio <= 0.5


def test_deterministic_by_seed_and_named_by_parts():
    a = make_noise("caption-shuffle", CAPTION_IMAGE, 0.4, seed=0, dataset="d")
    b = make_noise("caption-shuffle", CAPTION_IMAGE, 0.4, seed=0, dataset="d")
    c = make_noise("caption-shuffle", CAPTION_IMAGE, 0.4, seed=1, dataset="d")
    d = make_noise("caption-shuffle", CAPTION_IMAGE, 0.4, seed=0, dataset="other")
    assert a.digest == b.digest
    assert len({a.digest, c.digest, d.digest}) == 3


def test_zero_noise_is_identity():
    noise = caption_shuffle(CAPTION_IMAGE, 0.0, seed=0)
    assert noise.clean.all() and np.array_equal(noise.assigned_image, CAPTION_IMAGE)


def test_save_load_round_trip(tmp_path):
    noise = make_noise("caption-shuffle", CAPTION_IMAGE, 0.6, seed=2, dataset="d")
    noise.save(tmp_path / "noise.npz")
    again = NoisyPairing.load(tmp_path / "noise.npz")
    assert again.digest == noise.digest and again.protocol == "caption-shuffle" and again.ratio == 0.6


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        caption_shuffle(CAPTION_IMAGE, ratio, seed=0)


def test_unknown_protocol_is_refused():
    with pytest.raises(UserError, match="unknown noise protocol"):
        make_noise("nope", CAPTION_IMAGE, 0.2, seed=0, dataset="d")
