"""Image–caption data as the harness sees it: splits of uint8 images and captions, and torch views."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ncbench.errors import UserError


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


class Dataset:
    """Base class of a dataset adapter; subclasses are registered under ``ncbench.datasets``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    needs_root: ClassVar[bool] = True

    def load(self, root: Path | None, cache_dir: Path) -> Pairs:
        raise NotImplementedError


class ImageNormalizer:
    """uint8 (B, H, W, 3) arrays -> normalised float (B, 3, S, S) tensors on the model's device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int, device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.size, self.device = size, device

    def __call__(self, images: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return (x - self.mean) / self.std
