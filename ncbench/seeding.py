"""Seeds derived from named parts by a stable hash, so adding a part never reshuffles the others."""
from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import torch


def stable_hash(*parts: object, length: int = 12) -> str:
    """Hex digest of the JSON of ``parts``; identical across processes and machines."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def derive_seed(*parts: object) -> int:
    """A 31-bit seed named by ``parts`` (e.g. ``derive_seed("noise", dataset, ratio, seed)``)."""
    return int(stable_hash(*parts, length=8), 16) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed python, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
