"""A run's epoch checkpoint: plain data only, so that loading one can never execute code.

The file is read with ``torch.load(weights_only=True)``, which unpickles tensors, numbers, strings, lists and
dicts and refuses everything else. Method state often holds numpy arrays: they are stored as tensors under a
marker key and given back as arrays, so methods keep their own types. A file that is not a checkpoint at all
(empty, truncated, garbage) is moved aside and the run restarts; a file that asks to run code is refused.
"""
from __future__ import annotations

import os
import pickle
import struct
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncbench.atomic import atomic_write
from ncbench.errors import UserError

_ARRAY = "__ncbench_ndarray__"


def to_plain(value: Any) -> Any:
    """``value`` with every numpy array or scalar turned into a tensor or Python number (recursively)."""
    if isinstance(value, np.ndarray):
        return {_ARRAY: torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    return value


def from_plain(value: Any) -> Any:
    """The inverse of :func:`to_plain`."""
    if isinstance(value, dict):
        if set(value) == {_ARRAY}:
            return value[_ARRAY].numpy()
        return {k: from_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_plain(v) for v in value)
    return value


def save(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` through a temporary file in the same folder and a rename."""
    plain = to_plain(state)
    atomic_write(path, lambda tmp: torch.save(plain, tmp))


def load(path: Path) -> dict | None:
    """The checkpoint at ``path``, or None when there is none or it was unreadable (then it is moved aside).

    Raises :class:`UserError` when the file holds objects other than plain data (a pickle that would run code).
    """
    if not path.is_file():
        return None
    try:
        return from_plain(torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # it names a callable to import: a pickle payload, not a damaged file
            raise UserError(f"{path}: holds objects other than tensors and plain data, which ncbench never writes; "
                            "refusing to load it (delete it to restart the run)") from None
        reason = e
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, AttributeError, struct.error) as e:
        reason = e
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    warnings.warn(f"{path}: unreadable checkpoint ({type(reason).__name__}); moved to {aside.name}, "
                  "the run restarts from the beginning")
    return None
