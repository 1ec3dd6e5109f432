"""Image–caption data as the harness sees it: splits of uint8 images and captions, and torch views."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ncbench.atomic import atomic_write
from ncbench.errors import UserError
from ncbench.progress import progress_bar
from ncbench.seeding import stable_hash

IMAGE_CACHE_VERSION = 1  # bump when decode_image changes its output


@dataclass(frozen=True)
class Split:
    """One split: ``images[caption_image[c]]`` is the true image of caption ``c``."""

    images: np.ndarray  # uint8 (n_images, H, W, 3); may be a read-only memory map
    captions: tuple[str, ...]
    caption_image: np.ndarray  # int64 (n_captions,)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise UserError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if len(self.captions) != len(self.caption_image):
            raise UserError(f"{len(self.captions)} captions but {len(self.caption_image)} image ids")
        if len(self.caption_image) and not (0 <= self.caption_image.min() and self.caption_image.max() < len(self.images)):
            raise UserError("caption_image holds an index outside the image array")

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_captions(self) -> int:
        return len(self.captions)


@dataclass(frozen=True)
class Pairs:
    """A dataset: train/dev/test splits plus how its test split is evaluated."""

    name: str
    train: Split
    dev: Split
    test: Split
    test_protocols: tuple[str, ...] = ("1k",)
    has_clean_mask: bool = True  # False for real-noise data (CC), where the noise is unknown
    meta: dict = field(default_factory=dict)
    # split -> (n_images, F) rows whose inner product says how alike two images are (the synthetic world's
    # scene attributes); the ``hard`` noise protocol uses them, else a pretrained model's embeddings
    image_attributes: dict = field(default_factory=dict, repr=False)


class Dataset:
    """Base class of a dataset adapter; subclasses are registered under ``ncbench.datasets``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    needs_root: ClassVar[bool] = True
    family: ClassVar[str] = ""  # what presets are keyed on: "f30k", "coco", "cc" ("" = no preset applies)
    real_noise: ClassVar[bool] = False  # the data's own noise is unknown (CC): no clean mask, runs only at --noise 0
    layout: ClassVar[str] = ""  # the on-disk layout's name, for messages (datasets/README.md)
    markers: ClassVar[tuple[str, ...]] = ()  # paths under the data root, any of which identifies the layout

    def load(self, root: Path | None, cache_dir: Path, resolution: int = 224) -> Pairs:
        """The dataset's splits; adapters that decode image files store them at ``resolution`` (the model's
        square input size) in the image cache, generated data may keep its own size (the harness resizes)."""
        raise NotImplementedError

    @classmethod
    def check_run(cls, root: Path | None, noise: float) -> None:
        """Refuse, in one line and before anything is written, a run this adapter cannot serve."""
        if cls.real_noise and noise != 0:
            raise UserError(f"--noise {noise:g}: --dataset {cls.name} has real, unlabelled noise; run it with --noise 0")
        if not cls.needs_root:
            return
        if root is None:
            raise UserError(f"--dataset {cls.name} needs --data-root PATH (the {cls.layout} layout, datasets/README.md)")
        if not Path(root).is_dir():
            raise UserError(f"--data-root {root}: no such folder")
        if cls.markers and not any((Path(root) / m).exists() for m in cls.markers):
            raise UserError(f"--data-root {root}: not the {cls.layout} layout that --dataset {cls.name} reads "
                            f"(no {cls.markers[0]}); {_layout_hint(Path(root))}")


# names the registered datasets whose layout a folder matches; ncbench.registry installs it on import (it imports
# this module, so this module cannot import it)
_layout_matcher: Callable[[Path], list[str]] | None = None


def set_layout_matcher(matcher: Callable[[Path], list[str]]) -> None:
    """Install how :meth:`Dataset.check_run` finds the registered datasets whose layout a folder matches."""
    global _layout_matcher
    _layout_matcher = matcher


def _layout_hint(root: Path) -> str:
    """Which registered adapters' layouts ``root`` matches, as advice for an error message."""
    if _layout_matcher is None:
        return "see datasets/README.md for the layouts"
    matches = _layout_matcher(root)
    if matches:
        return f"it looks like the layout of --dataset {' or '.join(matches)}"
    return "it matches no known layout (see datasets/README.md)"


def read_lines(path: Path) -> list[str]:
    """The stripped lines of a UTF-8 text file, split as Python's text mode splits them (as the NPC code reads)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f]
    except FileNotFoundError:
        raise UserError(f"missing file {path} (layouts: datasets/README.md)") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_json_object(path: Path, expected: str = "a JSON object", layouts: str = "datasets/README.md") -> dict:
    """The JSON object in ``path``; a missing file, bad JSON or another value is a one-line error naming ``path``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"missing file {path} (layouts: {layouts})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {expected}")
    return data


def check_captions(captions: Sequence[str], source: Path | str) -> None:
    """Every caption has text: an empty one names ``source`` and its position (1-based)."""
    for n, caption in enumerate(captions, 1):
        if not caption.strip():
            raise UserError(f"{source}: caption {n} is empty; every caption needs text")


def inside(folder: Path, path: Path, source: Path | str) -> Path:
    """``path``, refused when its name climbs out of ``folder`` (``../x`` from ``source``); a symbolic link inside
    the folder may point anywhere, as a data layout built with links does."""
    normal, base = Path(os.path.normpath(path)), Path(os.path.normpath(folder))
    if normal != base and base not in normal.parents:
        raise UserError(f"{source}: image {path} lies outside {base}; names must stay inside the data root")
    return normal


def index_images(ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Per-caption image ids -> (distinct ids in order of first appearance, caption -> image index)."""
    first: dict[str, int] = {}
    caption_image = np.fromiter((first.setdefault(i, len(first)) for i in ids), dtype=np.int64, count=len(ids))
    return list(first), caption_image


@lru_cache(maxsize=None)
def _val_geometry(size: int) -> Callable[[Image.Image], Image.Image]:
    """open_clip's val transform without its last two steps (ToTensor, Normalize): bicubic resize of the
    shortest side to ``size``, center crop to ``size`` x ``size``, convert to RGB (docs/methods/clip.md#clip-a5)."""
    import open_clip
    from torchvision.transforms import Compose

    return Compose(open_clip.image_transform(size, is_train=False).transforms[:-2])


def decode_image(path: Path, size: int) -> np.ndarray:
    """uint8 (size, size, 3): the image file as open_clip's val preprocessing sees it before normalisation."""
    try:
        with Image.open(path) as image:
            return np.asarray(_val_geometry(size)(image), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None


def cached_images(files: Sequence[Path], size: int, cache_dir: Path, label: str) -> np.ndarray:
    """The decoded ``files`` as a read-only memory map (N, size, size, 3) under ``cache_dir/images``.

    Built once per (``label`` = dataset-split, ``size``, files): the key hashes every file's path, byte size
    and modification time, so changed data is decoded again. Written to a temporary file, then renamed.
    """
    stats, missing = [], []
    for f in files:
        try:
            st = os.stat(f)
            stats.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            missing.append(f)
    if missing:
        raise UserError(f"{label}: {len(missing)} of {len(files)} image files missing, e.g. {missing[0]}")
    path = Path(cache_dir) / "images" / f"{label}-{size}px-{stable_hash(IMAGE_CACHE_VERSION, size, stats, length=16)}.npy"
    if not path.is_file():
        _build_image_cache(files, size, path, label)
    return np.load(path, mmap_mode="r")


def _build_image_cache(files: Sequence[Path], size: int, path: Path, label: str, block: int = 1024) -> None:
    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
        with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool, \
                progress_bar(f"decoding {label} at {size}px (once, cached)", len(files)) as advance:
            for lo in range(0, len(files), block):  # bounded memory: one block of decoded images at a time
                for i, image in enumerate(pool.map(lambda f: decode_image(f, size), files[lo:lo + block]), lo):
                    out[i] = image
                    advance()
        out.flush()
        del out

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


class ImageNormalizer:
    """uint8 (B, H, W, 3) arrays -> normalised float (B, 3, S, S) tensors on the model's device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int, device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.size, self.device = size, device

    def __call__(self, images: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.require(images, requirements=("C", "W"))).to(self.device, non_blocking=True)  # copies memmap rows
        x = x.permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return (x - self.mean) / self.std


def decode_bytes(data: bytes, size: int, source: str) -> np.ndarray:
    """:func:`decode_image` of an encoded image held in memory (a tar member, a parquet cell); errors name ``source``."""
    from io import BytesIO

    try:
        with Image.open(BytesIO(data)) as image:
            return np.asarray(_val_geometry(size)(image), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{source}: cannot decode image ({type(err).__name__}: {err})") from None
