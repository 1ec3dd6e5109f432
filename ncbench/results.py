"""The result record of a run: ``<out>/<run-id>/result.json``, written atomically and last."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SCHEMA_VERSION = 1
RECORD = "result.json"
CHECKPOINT = "checkpoint.pt"


def strict_json(value):
    """``value`` with every nan or infinite float replaced by None, so that it dumps as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` as strict JSON (an undefined number, such as AUROC when every pair is
    clean, becomes null) through a temporary file in the same folder and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(strict_json(data), f, indent=2, sort_keys=False, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_record(run_dir: Path) -> dict | None:
    path = run_dir / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def environment() -> dict:
    """Versions and machine facts stored in every record."""
    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: ver(p) for p in ("ncbench", "torch", "open_clip_torch", "numpy", "scikit-learn")},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
    }


def iter_records(root: Path):
    """Every complete record under ``root`` (any depth)."""
    for path in sorted(Path(root).rglob(RECORD)):
        record = json.loads(path.read_text())
        if record.get("status") == "complete":
            yield record
