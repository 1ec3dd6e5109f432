"""Tests of the procedural shapes world (ncbench.datasets.synthetic)."""
import re

import numpy as np
import pytest

from ncbench.datasets import synthetic as S

N = 600


def tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z]+|[,.]", caption)


@pytest.fixture(scope="module")
def pre():
    return S.generate("pretrain", N, seed=1)


@pytest.fixture(scope="module")
def down():
    return S.generate("downstream", N, seed=1)


def colour_shape_pairs(captions):
    """(shape, colour) for every adjacent 'colour shape' in pretraining wording."""
    return {(b, a) for c in captions for a, b in zip(c.split(), c.split()[1:]) if a in S.COLOURS and b in S.SHAPES}


def test_shapes_and_dtypes(pre, down):
    for split in (pre, down):
        assert split.images.shape == (N, 32, 32, 3) and split.images.dtype == np.uint8
        assert len(split.captions) == 5 * N and all(isinstance(c, str) for c in split.captions)
        assert split.caption_image.dtype == np.int64
        np.testing.assert_array_equal(split.caption_image, np.repeat(np.arange(N), 5))
    assert S.generate("downstream", 3, 0, image_size=48).images.shape == (3, 48, 48, 3)
    with pytest.raises(ValueError):
        S.generate("other", 3, 0)


def test_deterministic_by_seed():
    a, b, c = (S.generate("downstream", 50, seed) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    assert not np.array_equal(a.images, c.images) and a.captions != c.captions


def test_vocabulary_is_complete(pre, down):
    assert list(S.VOCABULARY) == sorted(set(S.VOCABULARY))
    assert set(S.PRETRAIN_VOCABULARY) < set(S.VOCABULARY)
    for split in (pre, down):
        for c in split.captions:
            assert re.fullmatch(r"[a-z]+([,.]? [a-z]+)*", c), c
            assert set(tokens(c)) <= set(S.VOCABULARY), c
    assert {t for c in pre.captions for t in tokens(c)} <= set(S.PRETRAIN_VOCABULARY)


def flat_background(images):
    """Per image: the share of pixels equal to its top-left pixel (flat backgrounds cover most of an image)."""
    return (images == images[:, :1, :1]).all(-1).mean(axis=(1, 2))


def test_pretrain_has_flat_backgrounds_and_no_held_out_combo(pre, down):
    assert flat_background(pre.images).min() > 0.5  # black or gray, never grainy
    gray = (pre.images[:, 0, 0] > 0).any(-1).mean()
    assert 0.15 < gray < 0.35
    grainy = (flat_background(down.images) < 0.5).mean()
    assert 0.2 < grainy < 0.45
    assert not colour_shape_pairs(pre.captions) & S.HELD_OUT
    assert len(colour_shape_pairs(pre.captions)) == 48 - len(S.HELD_OUT)
    assert colour_shape_pairs(down.captions) & S.HELD_OUT


@pytest.mark.parametrize("wording", [0.0, 0.5, 1.0])
def test_downstream_mixes_pretraining_and_shifted_wording(wording):
    split = S.generate("downstream", 400, seed=2, pretrain_wording=wording)
    in_pretrain_words = np.mean([set(tokens(c)) <= set(S.PRETRAIN_VOCABULARY) for c in split.captions])
    assert abs(in_pretrain_words - wording) < 0.06


def test_cache_round_trips(tmp_path, monkeypatch):
    world = S.SyntheticWorld(n_train=40, n_dev=10, n_test=12, seed=5)
    first = world.load(None, tmp_path)
    corpus = S.pretrain_corpus(tmp_path, n_images=20)
    assert sorted(p.suffix for p in (tmp_path / "synthetic").iterdir()) == [".npz"] * 4
    monkeypatch.setattr(S, "generate", lambda *a, **k: pytest.fail("cache miss"))
    again = world.load(None, tmp_path)
    for a, b in [(first.train, again.train), (first.dev, again.dev), (first.test, again.test),
                 (corpus, S.pretrain_corpus(tmp_path, n_images=20))]:
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.caption_image, b.caption_image)
        assert a.captions == b.captions and all(type(c) is str for c in b.captions)
    assert (first.name, first.test_protocols, first.test.n_images) == ("synthetic", ("1k",), 12)
    assert first.train.captions[:50] != first.dev.captions[:50] != first.test.captions[:50]
