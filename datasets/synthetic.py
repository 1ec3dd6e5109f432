"""Procedural shapes world: deterministic image–caption splits for pretraining and a shifted downstream task.

Images show 1–3 coloured shapes on a 3x3 grid; each has five lossy template captions. The ``pretrain``
distribution has black (75 %) or gray backgrounds, 12 held-out shape–colour combos and base wording only.
``downstream`` adds every combo, grainy backgrounds (a third of the images), and with probability ``1 - pretrain_wording`` per caption new
templates and synonyms.
"""
from __future__ import annotations

import random
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ncbench.atomic import atomic_write
from ncbench.seeding import derive_seed
from ncbench.data import Dataset, Pairs, Split

GENERATOR_VERSION = 2
PRETRAIN_WORDING = 0.5  # downstream: probability that a caption uses pretraining templates and words
CAPTIONS_PER_IMAGE = 5

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "purple", "orange", "white")
HELD_OUT = frozenset({  # (shape, colour) never drawn in the pretrain distribution; 2 per shape
    ("circle", "red"), ("circle", "yellow"), ("square", "green"), ("square", "cyan"),
    ("triangle", "blue"), ("triangle", "purple"), ("diamond", "yellow"), ("diamond", "orange"),
    ("cross", "cyan"), ("cross", "white"), ("ring", "purple"), ("ring", "red"),
})
_RGB = np.array([(220, 40, 40), (40, 180, 60), (50, 90, 230), (230, 220, 50),
                 (40, 210, 220), (150, 60, 210), (240, 140, 30), (235, 235, 235)], np.float32)
_RADIUS = np.array([0.26, 0.42], np.float32)  # small, large; in grid-cell units
_JITTER = 0.07  # maximum centre offset, in cell units
_BLACK, _GRAY, _NOISY = 0, 1, 2  # background ids, in _BG_W order
_PRETRAIN_GRAY = 0.25  # pretraining sees some gray backgrounds, never grainy ones: the visual shift stays partial

# Wording: (pretraining word, shifted synonym) per attribute value.
_SIZE_W = (("small", "tiny"), ("large", "big"))
_COLOUR_W = (("red", "crimson"), ("green", "emerald"), ("blue", "azure"), ("yellow", "golden"),
             ("cyan", "teal"), ("purple", "violet"), ("orange", "amber"), ("white", "ivory"))
_SHAPE_W = (("circle", "disk"), ("square", "block"), ("triangle", "wedge"), ("diamond", "rhombus"),
            ("cross", "plus"), ("ring", "hoop"))
_CELL_W = (("in the top left", "in the upper left corner"), ("at the top", "near the top"),
           ("in the top right", "in the upper right corner"), ("on the left", "on the left side"),
           ("in the center", "in the middle"), ("on the right", "on the right side"),
           ("in the bottom left", "in the lower left corner"), ("at the bottom", "near the bottom"),
           ("in the bottom right", "in the lower right corner"))
_BG_W = (("black", "dark"), ("gray", "grey"), ("noisy", "grainy"))
_P_DROP_SIZE, _P_DROP_CELL, _P_SYNONYM = 0.3, 0.5, 0.5
_SHAPES_N = ("", "one shape", "two shapes", "three shapes")
_OBJECTS_N = ("", "one object", "two objects", "three objects")
_PRETRAIN_T = ("{objs}", "there is {objs}", "{shapes}. {objs}", "an image of {objs}",
               "this image shows {objs}", "we see {objs}")
_SHIFTED_T = ("a picture of {objs}", "{objs}, {bg} background", "{objects} including {objs}",
              "{rel}", "a scene containing {objs}", "{bg} background with {objs}")
_RELATION_W = ("above", "below", "to the left of", "to the right of")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+|[,.]", re.sub(r"\{\w+\}", " ", text)))


def _vocabulary(shifted: bool) -> tuple[str, ...]:
    pairs = _SIZE_W + _COLOUR_W + _SHAPE_W + _CELL_W
    texts = [p[0] for p in pairs] + list(_SHAPES_N + _PRETRAIN_T) + ["a an and ,"]
    if shifted:
        texts += [p[1] for p in pairs] + [" ".join(p) for p in _BG_W] + list(_OBJECTS_N + _SHIFTED_T + _RELATION_W)
    return tuple(sorted(set().union(*map(_words, texts))))


VOCABULARY = _vocabulary(shifted=True)  # every token a caption of either distribution can contain
PRETRAIN_VOCABULARY = _vocabulary(shifted=False)  # the tokens of pretraining wording


class _Scenes(NamedTuple):
    """Scene parameters; per-object arrays are (n, 3), slots ``>= n_objects`` unused."""

    n_objects: np.ndarray
    shape: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    cell: np.ndarray
    offset: np.ndarray  # (n, 3, 2) x/y centre offset in cell units
    rgb: np.ndarray  # (n, 3, 3) jittered colour
    background: np.ndarray


def _sample_scenes(distribution: str, n: int, rng: np.random.Generator) -> _Scenes:
    if distribution == "pretrain":
        n_objects = rng.choice([1, 2, 3], n, p=[0.3, 0.45, 0.25])
        allowed = np.array([(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))
                            if (SHAPES[s], COLOURS[c]) not in HELD_OUT])
        shape, colour = np.moveaxis(allowed[rng.integers(len(allowed), size=(n, 3))], -1, 0)
        background = rng.choice([_BLACK, _GRAY], n, p=[1 - _PRETRAIN_GRAY, _PRETRAIN_GRAY])
    elif distribution == "downstream":
        n_objects = rng.integers(2, 4, n)
        shape, colour = rng.integers(len(SHAPES), size=(n, 3)), rng.integers(len(COLOURS), size=(n, 3))
        background = rng.integers(3, size=n)
    else:
        raise ValueError(f"unknown distribution {distribution!r}; expected 'pretrain' or 'downstream'")
    cell = np.argsort(rng.random((n, 9)), axis=1)[:, :3]  # distinct cells per image
    rgb = np.clip(_RGB[colour] + rng.integers(-20, 21, (n, 3, 3)), 0, 255).astype(np.float32)
    return _Scenes(n_objects, shape, colour, rng.integers(2, size=(n, 3)), cell,
                   rng.uniform(-_JITTER, _JITTER, (n, 3, 2)).astype(np.float32), rgb, background)


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of shape ``SHAPES[shape]`` with unit radius at offsets ``u`` (x) and ``v`` (y, down) from its centre."""
    au, av = np.abs(u), np.abs(v)
    if shape == 0:
        return u * u + v * v <= 1
    if shape == 1:
        return (au <= 0.8) & (av <= 0.8)
    if shape == 2:
        return (v <= 0.75) & (au * 1.75 <= v + 1)
    if shape == 3:
        return au + av <= 1.05
    if shape == 4:
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    d2 = u * u + v * v
    return (d2 <= 1) & (d2 >= 0.3)


def _render(sc: _Scenes, size: int, rng: np.random.Generator, chunk: int = 512) -> np.ndarray:
    """Anti-aliased images: each shape's coverage from a 2x supersampled mask, composited over the background."""
    n, ss = len(sc.n_objects), 2 * size
    t = (np.arange(ss, dtype=np.float32) + 0.5) * (3 / ss)  # supersampled pixel centres, cell units
    out = np.empty((n, size, size, 3), np.uint8)
    for lo in range(0, n, chunk):
        idx = np.arange(lo, min(n, lo + chunk))
        k, bg = len(idx), sc.background[idx, None, None, None]
        level = rng.uniform(60, 150, (k, 1, 1, 1)).astype(np.float32)
        grain = rng.normal(0, 30, (k, size, size, 1)).astype(np.float32)
        img = np.where(bg == _BLACK, 0, level + np.where(bg == _NOISY, grain, 0)) * np.ones(3, np.float32)
        for j in range(3):
            cover = np.zeros((k, size, size, 1), np.float32)
            cx = (sc.cell[idx, j] % 3 + 0.5 + sc.offset[idx, j, 0]).astype(np.float32)
            cy = (sc.cell[idx, j] // 3 + 0.5 + sc.offset[idx, j, 1]).astype(np.float32)
            r = _RADIUS[sc.size[idx, j]]
            for s in range(len(SHAPES)):
                g = np.flatnonzero((sc.n_objects[idx] > j) & (sc.shape[idx, j] == s))
                if len(g):
                    u = (t[None, None, :] - cx[g, None, None]) / r[g, None, None]
                    v = (t[None, :, None] - cy[g, None, None]) / r[g, None, None]
                    m = _shape_mask(s, u, v).view(np.uint8)
                    hits = m[:, 0::2, 0::2] + m[:, 1::2, 0::2] + m[:, 0::2, 1::2] + m[:, 1::2, 1::2]
                    cover[g, ..., 0] = hits * np.float32(0.25)
            img += cover * (sc.rgb[idx, j, None, None, :] - img)
        out[idx] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return out


def _phrase(obj: tuple[int, int, int, int], shifted: bool, u: Callable[[], float]) -> str:
    """'a large red circle in the top left', with size and position left out at random."""
    size, colour, shape, cell = obj
    pick = lambda pair: pair[shifted and u() < _P_SYNONYM]  # noqa: E731
    words = [pick(_SIZE_W[size])] if u() >= _P_DROP_SIZE else []
    words += [pick(_COLOUR_W[colour]), pick(_SHAPE_W[shape])]
    if u() >= _P_DROP_CELL:
        words.append(pick(_CELL_W[cell]))
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _relation(a: int, b: int) -> str:
    """Where grid cell ``a`` lies relative to cell ``b``."""
    if a // 3 != b // 3:
        return _RELATION_W[0] if a // 3 < b // 3 else _RELATION_W[1]
    return _RELATION_W[2] if a % 3 < b % 3 else _RELATION_W[3]


def _captions(sc: _Scenes, pretrain_wording: float, seed: int) -> list[str]:
    """Five captions per image, image-major; each uses shifted wording with probability ``1 - pretrain_wording``."""
    u = random.Random(seed).random  # only random() has a cross-version stability guarantee
    shuffled = lambda xs: sorted(xs, key=lambda _: u())  # noqa: E731
    cols = [a.tolist() for a in (sc.size, sc.colour, sc.shape, sc.cell)]
    out = []
    for i, (n, bg) in enumerate(zip(sc.n_objects.tolist(), sc.background.tolist())):
        objs = [tuple(col[i][j] for col in cols) for j in range(n)]
        templates = {False: shuffled(_PRETRAIN_T), True: shuffled(_SHIFTED_T)}
        for c in range(CAPTIONS_PER_IMAGE):
            shifted = u() >= pretrain_wording
            order = shuffled(objs)
            phrases = [_phrase(o, shifted, u) for o in order]
            rel = f"{phrases[0]} {_relation(order[0][3], order[1][3])} {_join(phrases[1:])}" if n > 1 else ""
            fields = dict(objs=_join(phrases), shapes=_SHAPES_N[n], objects=_OBJECTS_N[n],
                          bg=_BG_W[bg][u() < _P_SYNONYM], rel=rel)
            pool = templates[shifted]
            out.append(pool[c % len(pool)].format(**fields))
    return out


def generate(distribution: str, n_images: int, seed: int, image_size: int = 32,
             pretrain_wording: float = PRETRAIN_WORDING) -> Split:
    """``n_images`` images with five captions each; ``pretrain_wording`` matters for ``downstream`` only."""
    if distribution == "pretrain":
        pretrain_wording = 1.0
    rng = np.random.default_rng(seed)
    scenes = _sample_scenes(distribution, n_images, rng)
    images = _render(scenes, image_size, np.random.default_rng(rng.integers(2**63)))
    captions = _captions(scenes, pretrain_wording, int(rng.integers(2**63)))
    return Split(images, tuple(captions), np.repeat(np.arange(n_images, dtype=np.int64), CAPTIONS_PER_IMAGE))


def image_attributes(distribution: str, n_images: int, seed: int) -> np.ndarray:
    """What the images of ``generate(distribution, n_images, seed)`` show, as rows whose inner product counts
    the attribute values two scenes share (with multiplicity): the similarity of ncbench's ``hard`` noise.

    Per image: how many objects have each shape, colour, size, cell and (shape, colour); its background
    and its number of objects. Each count ``n`` is coded as ``[n >= 1, n >= 2, n >= 3]``, so the inner
    product of two rows is the sum over values of ``min(n_a, n_b)``. Float32, (n_images, 3 * 80).
    """
    sc = _sample_scenes(distribution, n_images, np.random.default_rng(seed))  # the draws ``generate`` makes first
    present = np.arange(3) < sc.n_objects[:, None]
    kinds = ((sc.shape, len(SHAPES)), (sc.colour, len(COLOURS)), (sc.size, len(_RADIUS)), (sc.cell, 9),
             (sc.shape * len(COLOURS) + sc.colour, len(SHAPES) * len(COLOURS)),
             (sc.background[:, None], len(_BG_W)), (sc.n_objects[:, None], 4))
    counts = np.concatenate([((values[..., None] == np.arange(k)) & present[:, :values.shape[1], None]).sum(1)
                             for values, k in kinds], axis=1)
    return (counts[..., None] >= np.arange(1, 4)).reshape(n_images, -1).astype(np.float32)


def _cached(cache_dir: Path, distribution: str, n_images: int, seed: int, image_size: int,
            pretrain_wording: float) -> Split:
    """``generate`` with its result stored once as ``cache_dir/synthetic/<key>.npz``."""
    wording = "" if distribution == "pretrain" else f"-pw{float(pretrain_wording)!r}"
    key = f"{distribution}-n{n_images}-s{seed}-px{image_size}{wording}-v{GENERATOR_VERSION}"
    path = Path(cache_dir) / "synthetic" / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return Split(z["images"], tuple(z["captions"].tolist()), z["caption_image"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # ncbench made it: rebuild it
            warnings.warn(f"{path}: unreadable synthetic-data cache ({type(e).__name__}); rebuilding it")
    split = generate(distribution, n_images, seed, image_size, pretrain_wording)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=split.images, captions=np.array(split.captions),
                                caption_image=split.caption_image)

    atomic_write(path, write)
    return split


def pretrain_corpus(cache_dir: Path, n_images: int = 40_000, seed: int = 0, image_size: int = 32) -> Split:
    """The clean pretraining corpus (``pretrain`` distribution), cached."""
    return _cached(cache_dir, "pretrain", n_images, derive_seed("pretrain", seed), image_size, 1.0)


@dataclass(frozen=True)
class SyntheticWorld(Dataset):
    """The downstream shapes task: train/dev/test splits from distinct derived seeds."""

    name = "synthetic"
    description = "procedural shapes world (numpy), shifted from the pretrain_corpus distribution"
    needs_root = False

    n_train: int = 5000
    n_dev: int = 1000
    n_test: int = 1000
    seed: int = 0
    image_size: int = 32
    pretrain_wording: float = PRETRAIN_WORDING

    def load(self, root: Path | None, cache_dir: Path, resolution: int = 224) -> Pairs:
        """Rendered at ``image_size`` whatever the model's ``resolution`` (the harness resizes)."""
        sizes = {"train": self.n_train, "dev": self.n_dev, "test": self.n_test}
        splits = {s: _cached(cache_dir, "downstream", n, derive_seed(s, self.seed), self.image_size,
                             self.pretrain_wording) for s, n in sizes.items()}
        attributes = {s: image_attributes("downstream", n, derive_seed(s, self.seed)) for s, n in sizes.items()}
        return Pairs(self.name, **splits, test_protocols=("1k",),
                     meta={**asdict(self), "generator_version": GENERATOR_VERSION}, image_attributes=attributes)


@dataclass(frozen=True)
class SyntheticMini(SyntheticWorld):
    """A small version of the shapes task for smoke tests and quick demos (minutes become seconds)."""

    name = "synthetic-mini"
    description = "the synthetic world at 400 train / 200 dev / 200 test images, for smoke tests"
    n_train: int = 400
    n_dev: int = 200
    n_test: int = 200
