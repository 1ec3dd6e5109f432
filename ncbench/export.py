"""A run's fine-tuned model as a file open_clip loads: ``ncbench export RUN --out model.pt``.

A run keeps its selected model(s) only when asked (``<run_dir>/model.safetensors``, written by
:func:`save_run_model`; each evaluated model's state dict under the prefix ``<i>.``, the architecture in the file's
metadata). :func:`export_model` writes one state dict where open_clip finds it:

- ``--out model.pt`` / ``.pth`` / ``.bin`` (a plain state dict, read with ``weights_only=True``) or
  ``--out model.safetensors``: ``open_clip.create_model_and_transforms(ARCH, pretrained="model.pt")``. For ncbench's
  own tiny architectures the config is written beside it as ``<ARCH>.json``: ``import ncbench.architecture`` first (it
  registers them), or ``open_clip.add_model_config("<ARCH>.json")``.
- ``--out FOLDER`` (no suffix): open_clip's hub layout, ``open_clip_config.json`` + ``open_clip_model.safetensors``,
  loaded with ``open_clip.create_model_and_transforms("local-dir:FOLDER")`` and nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ncbench.atomic import atomic_write
from ncbench.errors import UserError
from ncbench.results import RECORD, read_record

RUN_MODEL = "model.safetensors"  # beside the record, when the run kept its model
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
HUB_CONFIG, HUB_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"  # open_clip's local-dir/hf-hub names


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:  # a dependency of open_clip_torch; only a broken install lacks it
        raise UserError("ncbench export needs the safetensors package: pip install safetensors") from None
    return safetensors.torch


def _plain_state(model: nn.Module) -> dict[str, Tensor]:
    """A model's state dict on the CPU, contiguous, without a DistributedDataParallel ``module.`` wrapper."""
    model = getattr(model, "module", model)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_run_model(run_dir: Path, models: Sequence[nn.Module], model_name: str) -> str:
    """Keep the run's evaluated ``models`` (the selected epoch's) as ``<run_dir>/model.safetensors``; returns the
    file's name for the record. A method that tests the averaged similarity of several models keeps them all."""
    state = {f"{i}.{k}": v for i, model in enumerate(models) for k, v in _plain_state(model).items()}
    meta = {"model": model_name, "evaluated_models": str(len(models)), "format": "ncbench-run-model-1"}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(run_dir) / RUN_MODEL, lambda tmp: _safetensors().save_file(state, str(tmp), metadata=meta))
    return RUN_MODEL


def load_run_model(run_dir: Path, member: int = 0) -> tuple[str, int, dict[str, Tensor]]:
    """(architecture, number of evaluated models, state dict of model ``member``) kept by :func:`save_run_model`."""
    path = Path(run_dir) / RUN_MODEL
    if not path.is_file():
        raise UserError(f"{run_dir}: the run kept no model ({RUN_MODEL}); rerun it with --keep-model to export it")
    st = _safetensors()
    try:
        with st.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = st.load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a damaged header or data
        raise UserError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())[:200]})") from None
    if "model" not in meta or not meta.get("evaluated_models", "").isdigit():
        raise UserError(f"{path}: metadata lacks the architecture; not a model kept by ncbench")
    count = int(meta["evaluated_models"])
    if not 0 <= member < count:
        raise UserError(f"--member {member}: the run kept {count} model{'s' if count > 1 else ''} (0..{count - 1})")
    prefix = f"{member}."
    return meta["model"], count, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def export_model(state: Mapping[str, Tensor], model_name: str, out: Path) -> list[Path]:
    """Write ``state`` (an open_clip model's state dict of architecture ``model_name``) as ``out`` (a weights file,
    plus the config beside it for the tiny architectures) or as the folder ``out`` in open_clip's hub layout;
    returns the files written."""
    from ncbench.architecture import TINY_MODELS, model_config

    cfg = model_config(model_name)
    out = Path(out)
    state = {k: v.contiguous() for k, v in state.items()}
    if out.suffix and out.suffix not in FILE_SUFFIXES:
        raise UserError(f"--out {out}: expected a {', '.join(FILE_SUFFIXES)} file or a folder (no suffix)")
    try:
        if not out.suffix:
            out.mkdir(parents=True, exist_ok=True)
            hub = {"model_cfg": cfg, "preprocess_cfg": _preprocess_cfg(model_name)}
            config = atomic_write(out / HUB_CONFIG, lambda tmp: tmp.write_text(json.dumps(hub, indent=2)))
            weights = atomic_write(out / HUB_WEIGHTS, lambda tmp: _safetensors().save_file(state, str(tmp)))
            return [config, weights]
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".safetensors":
            atomic_write(out, lambda tmp: _safetensors().save_file(state, str(tmp), metadata={"model": model_name}))
        else:
            atomic_write(out, lambda tmp: torch.save(dict(state), tmp))
        written = [out]
        if model_name in TINY_MODELS:  # open_clip knows its own architectures; ncbench's need their config
            config = out.parent / f"{model_name}.json"
            written.append(atomic_write(config, lambda tmp: tmp.write_text(json.dumps(cfg, indent=2))))
        return written
    except OSError as err:
        raise UserError(f"--out {out}: cannot write ({err.strerror or err})") from None


def _preprocess_cfg(model_name: str) -> dict:
    """The image normalisation open_clip gives ``model_name`` (mean, std, size), as its hub configs hold it."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(open_clip.create_model(model_name, device="meta"))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def find_run(run: str, results: Path | None) -> Path:
    """``RUN`` as a folder with a record, or as a run id searched for under ``results``."""
    path = Path(run)
    if (path / RECORD).is_file():
        return path
    if results is None:
        raise UserError(f"{run}: not a run folder (no {RECORD}); for a run id, pass --results DIR")
    found = sorted(p.parent for p in Path(results).rglob(RECORD) if p.parent.name == run)
    if not found:
        raise UserError(f"{run}: no run of that id under --results {results}")
    if len(found) > 1:
        raise UserError(f"{run}: {len(found)} runs of that id under --results {results} ({found[0]}, {found[1]}); "
                        f"pass the run folder")
    return found[0]


def export_run(run_dir: Path, out: Path, member: int = 0) -> tuple[list[Path], list[str]]:
    """Export the model kept by the run in ``run_dir``; returns the files written and notes for the user (how to
    load it, what it is)."""
    record = read_record(Path(run_dir) / RECORD)
    if record is None or record.get("status") != "complete":
        raise UserError(f"{run_dir}: the run is not complete; only a finished run's selected model is exported")
    model_name, count, state = load_run_model(run_dir, member)
    if model_name != record["config"]["model"]:
        raise UserError(f"{run_dir / RUN_MODEL}: holds a {model_name} but the record names {record['config']['model']}")
    from ncbench.architecture import config_digest
    from ncbench.seeding import stable_hash

    digest = stable_hash(config_digest(model_name), length=10)
    if record["config"].get("architecture") not in (None, digest):
        raise UserError(f"{run_dir}: the run's {model_name} config (digest {record['config']['architecture']}) differs "
                        f"from this ncbench's ({digest}); export with the ncbench version that ran it")
    files = export_model(state, model_name, out)
    return files, usage_notes(model_name, out, len(files), count, member)


def usage_notes(model_name: str, out: Path, n_files: int, count: int, member: int) -> list[str]:
    """How to load an export, and what differs from the run's tested model."""
    from ncbench.architecture import has_compact_vocabulary

    if Path(out).suffix:
        config = "  (import ncbench.architecture first, or open_clip.add_model_config on the .json)" if n_files > 1 else ""
        notes = [f'load: open_clip.create_model_and_transforms("{model_name}", pretrained="{out}"){config}']
    else:
        notes = [f'load: open_clip.create_model_and_transforms("local-dir:{out}")']
    if has_compact_vocabulary(model_name):
        notes.append(f"note: {model_name} reads token ids of ncbench.backbone.tiny_tokenizer({model_name!r}), "
                     f"not of open_clip's tokenizer")
    if count > 1:
        notes.append(f"note: the run's test metrics are of {count} models' averaged similarity; this is model {member} alone")
    return notes
