"""Noise protocols: which image each training caption is paired with, and which pairs are truly clean.

A protocol maps the true ``caption_image`` array to ``assigned_image``: training pair ``c`` is
(image ``assigned_image[c]``, caption ``c``). A pair is clean when its caption lands on its own
image (siblings that land back on their image count as clean, as in NPC's protocol).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ncbench.errors import UserError
from ncbench.seeding import derive_seed


@dataclass(frozen=True)
class NoisyPairing:
    """The realised noise of one (dataset, protocol, ratio, seed)."""

    protocol: str
    ratio: float
    seed: int
    assigned_image: np.ndarray  # int64 (n_captions,)
    clean: np.ndarray  # bool (n_captions,)

    @property
    def realised_ratio(self) -> float:
        return float(1.0 - self.clean.mean()) if len(self.clean) else 0.0

    @property
    def digest(self) -> str:
        """sha256 of the assignment and the mask: names this noise exactly."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.assigned_image, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.clean, dtype=np.bool_).tobytes())
        return h.hexdigest()

    def save(self, path: Path) -> None:
        """Write atomically as ``.npz``."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, protocol=self.protocol, ratio=self.ratio, seed=self.seed,
                     assigned_image=self.assigned_image, clean=self.clean)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "NoisyPairing":
        with np.load(path) as z:
            return cls(str(z["protocol"]), float(z["ratio"]), int(z["seed"]),
                       z["assigned_image"].astype(np.int64), z["clean"].astype(bool))


def caption_shuffle(caption_image: np.ndarray, ratio: float, seed: int) -> NoisyPairing:
    """NCR/NPC protocol (npc.md §2): ``floor(ratio·N)`` random caption rows swap captions among themselves.

    Row ``r`` keeps its image and receives the caption of another selected row, so in
    caption -> image form the caption of row ``selected[j]`` is assigned the image of row
    ``selected[perm[j]]``. The permutation is not a derangement: a caption may land on its own image.
    """
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"noise ratio must be in [0, 1), got {ratio}")
    n = len(caption_image)
    rng = np.random.default_rng(seed)
    selected = rng.permutation(n)[: int(ratio * n)]
    assigned = caption_image.astype(np.int64).copy()
    assigned[selected] = caption_image[selected[rng.permutation(len(selected))]]
    return NoisyPairing("caption-shuffle", ratio, seed, assigned, assigned == caption_image)


PROTOCOLS = {"caption-shuffle": caption_shuffle}


def make_noise(protocol: str, caption_image: np.ndarray, ratio: float, seed: int, dataset: str) -> NoisyPairing:
    """Build the named protocol's noise, seeded by (dataset, protocol, ratio, seed)."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown noise protocol {protocol!r}; available: {', '.join(PROTOCOLS)}")
    noise = PROTOCOLS[protocol](caption_image, ratio, derive_seed("noise", dataset, protocol, ratio, seed))
    return NoisyPairing(noise.protocol, ratio, seed, noise.assigned_image, noise.clean)
