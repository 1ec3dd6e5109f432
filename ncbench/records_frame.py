"""Run records as one pandas DataFrame (:func:`load_records`) and the JSON Schema of a record (``record.schema.json``)."""
from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ncbench.errors import UserError
from ncbench.results import RECORD, read_record

if TYPE_CHECKING:
    import pandas

IDENTITY = ("run_id", "method", "method_version", "dataset", "protocol", "ratio", "realised_ratio", "seed", "model",
            "pretrained", "epochs", "selection", "selected_epoch", "has_clean_mask", "train_pairs")


def record_schema() -> dict:
    """The JSON Schema (draft 2020-12) of ``result.json``, schema 1 and 2, shipped as ``ncbench/record.schema.json``."""
    return json.loads(files("ncbench").joinpath("record.schema.json").read_text(encoding="utf-8"))


def _protocol(name: str) -> str:
    """A test protocol as a column-name part: ``coco-5k`` -> ``coco_5k``."""
    return name.replace("-", "_")


def record_row(record: dict, path: Path) -> dict[str, Any]:
    """One record as a flat row (the columns :func:`load_records` documents)."""
    cfg, noise, epochs = record["config"], record["noise"], record["epochs"]
    last = epochs[-1] if epochs else {}
    selected = next((e for e in epochs if e["epoch"] == record["selection"]["epoch"]), {})
    row: dict[str, Any] = {
        "run_id": record["run_id"], "method": record["method"]["name"], "method_version": record["method"]["version"],
        "dataset": record["dataset"]["name"], "protocol": noise["protocol"], "ratio": noise["ratio"],
        "realised_ratio": noise["realised_ratio"], "seed": cfg["seed"], "model": cfg["model"],
        "pretrained": cfg["pretrained"], "epochs": cfg["epochs"], "selection": record["selection"]["rule"],
        "selected_epoch": record["selection"]["epoch"], "has_clean_mask": record["dataset"]["has_clean_mask"],
        "train_pairs": record["dataset"]["train_pairs"]}
    for block in ("test", "zero_shot"):
        for protocol, metrics in record[block].items():
            row |= {f"{block}_{_protocol(protocol)}_{k}": v for k, v in metrics.items()}
    row |= {f"dev_{k}": v for k, v in selected.get("dev", {}).items()}
    row |= {f"detection_{k}": v for k, v in (last.get("detection") or {}).items()}
    row |= {f"param_{k}": v for k, v in cfg["params"].items()}
    row |= {f"timing_{k}": v for k, v in record["timing"].items()}
    row |= {"peak_memory_mb": record["peak_memory_mb"], "resumes": record.get("resumes"), "schema": record["schema"],
            "path": str(path.parent)}
    return row


def load_records(path: str | Path) -> pandas.DataFrame:
    """Every complete run record under ``path`` (a results folder, searched recursively, a run folder or a
    ``result.json``) as a DataFrame, one row per run, sorted by run id::

        df = ncbench.load_records("results/reference")
        df.groupby(["method", "ratio"])["test_1k_rsum"].agg(["mean", "std"])
        df[df.protocol == "caption-shuffle"].pivot_table("test_1k_rsum", "method", "ratio")

    Columns: ``run_id``, ``method``, ``method_version``, ``dataset``, ``protocol`` (noise protocol), ``ratio``
    (nominal noise), ``realised_ratio``, ``seed``, ``model``, ``pretrained``, ``epochs``, ``selection``,
    ``selected_epoch``, ``has_clean_mask``, ``train_pairs``; ``test_<protocol>_<metric>`` and
    ``zero_shot_<protocol>_<metric>`` (protocol with ``-`` as ``_``: ``test_1k_rsum``, ``test_coco_5k_i2t_r1``);
    ``dev_<metric>`` at the selected epoch; ``detection_<metric>`` of the last epoch; ``param_<name>`` (the method's
    hyper-parameters); ``timing_<name>`` (seconds); ``peak_memory_mb``, ``resumes`` (None in schema 1), ``schema``
    and ``path`` (the run folder). A metric a run does not have (another protocol, no detection) is NaN.
    """
    import pandas as pd

    root = Path(path)
    if root.is_file():
        paths = [root]
    elif root.is_dir():
        paths = sorted(root.rglob(RECORD))
    else:
        raise UserError(f"{root}: no such file or folder of run records")
    rows = []
    for file in paths:
        record = read_record(file)
        if record is None or record.get("status") != "complete":
            continue
        try:
            rows.append(record_row(record, file))
        except (KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{file}: not an ncbench run record (missing or malformed {err})") from None
    if not rows:
        return pd.DataFrame(columns=list(IDENTITY))
    frame = pd.DataFrame(rows)
    return frame[sorted(frame.columns, key=_column_rank)].sort_values("run_id", ignore_index=True)


def _column_rank(column: str) -> int:
    """Identity columns in their order, then the metric groups, then the rest (stable within a group)."""
    if column in IDENTITY:
        return IDENTITY.index(column)
    groups = ("test_", "zero_shot_", "dev_", "detection_", "param_", "timing_")
    return len(IDENTITY) + next((i for i, prefix in enumerate(groups) if column.startswith(prefix)), len(groups))
