"""Atomic file writes: readers see the old file or the complete new one, never a partial one."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Create or replace ``path`` with what ``write(tmp)`` writes to ``tmp``; returns ``path``.

    ``tmp`` is a hidden file in the same folder whose name ends like ``path`` (``np.save`` keeps a ``.npy`` name
    as it is). It is flushed to disk, then renamed over ``path``; if ``write`` fails it is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
