"""The result record of a run: ``<out>/<run-id>/result.json``, written atomically and last."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from ncbench.atomic import atomic_write

SCHEMA_VERSION = 2  # 2: per-query ranks file, resume count, epoch losses apart from logged values
RECORD = "result.json"
CHECKPOINT = "checkpoint.pt"
RANKS = "ranks.npz"  # per-query test ranks beside the record: "<protocol>.i2t" (per image), "<protocol>.t2i" (per caption)


@dataclass
class RunRecord:
    """The record of one complete run, ``result.json``; docs/records.md describes every field."""

    run_id: str
    config: dict  # RunConfig.identity(): the resolved settings the run id hashes
    method: dict  # name, version, uses_clean_subset, num_models, evaluated_models, clean_subset_pairs/images
    dataset: dict  # name, train_pairs, test_protocols, has_clean_mask, meta
    noise: dict  # protocol, ratio (nominal), realised_ratio, digest of the noise artefact
    selection: dict  # rule, epoch (the epoch whose models were tested)
    distributed: dict  # world_size, backend, global_batch, batch_per_process
    zero_shot: dict  # protocol -> metrics of the pretrained model
    test: dict  # protocol -> metrics of the selected models
    epochs: list  # per epoch: epoch, steps, train_s, losses, report, detection, dev, eval_s
    timing: dict  # seconds: data_s, backbone_s, zero_shot_eval_s (summed over resumed processes), train_s, ...
    resumes: int  # how many times the run was resumed from a checkpoint
    weights_sha256: str  # SHA-256 of the pretrained weights the models started from (backbone.weights_digest)
    peak_memory_mb: float
    environment: dict  # python, platform, packages, device, torch_threads
    ranks_file: str | None = None  # per-query test ranks beside the record (RANKS)
    model_file: str | None = None  # the selected model(s) beside the record, with --keep-model (ncbench export)
    status: str = "complete"
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        """The record as written: ``schema``, ``run_id`` and ``status`` first."""
        data = asdict(self)
        return {k: data.pop(k) for k in ("schema", "run_id", "status")} | data


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
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(strict_json(data), f, indent=2, sort_keys=False, allow_nan=False)

    atomic_write(path, write)


def read_record(path: Path) -> dict | None:
    """The record at ``path``; None, with a warning naming the file, when it cannot be read as a JSON object."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"{path}: unreadable record ({type(e).__name__}: {e}); skipped")
        return None
    if not isinstance(record, dict):
        warnings.warn(f"{path}: not a record (a JSON object was expected); skipped")
        return None
    return record


def load_record(run_dir: Path) -> dict | None:
    """The record of the run in ``run_dir``, or None when it has none or an unreadable one."""
    path = run_dir / RECORD
    return read_record(path) if path.is_file() else None


def write_ranks(run_dir: Path, ranks: dict[str, np.ndarray]) -> str:
    """Store per-query 1-based test ranks (``"<protocol>.i2t"``, ``"<protocol>.t2i"``) beside the record, compressed,
    in the smallest unsigned type that holds them; return the file's name for the record."""
    def compact(r: np.ndarray) -> np.ndarray:
        r = np.asarray(r)
        return r.astype(np.uint16 if r.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32)

    atomic_write(run_dir / RANKS, lambda tmp: np.savez_compressed(tmp, **{k: compact(v) for k, v in ranks.items()}))
    return RANKS


def load_ranks(run_dir: Path, record: dict) -> dict[str, np.ndarray] | None:
    """The record's per-query test ranks as int64 arrays, or None for a record without them."""
    name = record.get("ranks_file")
    if not name or not (run_dir / name).is_file():
        return None
    with np.load(run_dir / name) as data:
        return {k: data[k].astype(np.int64) for k in data.files}


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
        record = read_record(path)
        if record is not None and record.get("status") == "complete":
            yield record
