"""The ``ncbench`` command line: parses, calls the library, renders with rich."""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ncbench.errors import UserError
from ncbench.lock import RUN_LOCKED_EXIT, RunLocked

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Benchmark suite for noisy-correspondence learning.")
out = Console()
err = Console(stderr=True)

DEFAULT_CACHE = Path(os.environ.get("NCBENCH_CACHE", Path.home() / ".cache" / "ncbench"))


def _writable_dir(path: Path, flag: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ncbench-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path}: not a writable folder ({e.strerror or e})") from None
    return path


def _parse_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--param {item!r}: expected name=value")
        params[key.strip()] = value.strip()
    return params


# Options shared by `run` and `sweep` (one definition, so their flags cannot drift apart).
_RUN_DATASET = typer.Option("synthetic", help="dataset adapter; default: the embedded synthetic world")
_DATA_ROOT = typer.Option(None, help="folder of a real dataset")
_EPOCHS = typer.Option(None, help="fine-tuning epochs [default 5]")
_BATCH_SIZE = typer.Option(None, help="training batch size [default 128]")
_LR = typer.Option(None, help="peak learning rate [default 5e-4]")
_RUN_MODEL = typer.Option(None, help="open_clip architecture [default ncbench-tiny]")
_RUN_PRETRAINED = typer.Option(None, help="weights: open_clip tag, checkpoint path, embedded or none")
_SELECTION = typer.Option(None, help="model selection: best-dev-rsum or last")
_PRECISION = typer.Option(None, help="autocast: auto (bf16 on CUDA, full precision on the CPU), bf16 or fp32 "
                          "[default auto]")
_LOG = typer.Option(None, "--log", help="follow losses and metrics in tensorboard or mlflow (extras: ncbench[tensorboard], "
                    "ncbench[mlflow]); not part of the run id")
_KEEP_MODEL = typer.Option(False, "--keep-model", help="keep the selected model beside the record, for `ncbench export`")
_PLUGIN = typer.Option([], "--plugin", help="Python file whose Method/Dataset classes to register (repeatable)")
_RUNS_OUT = typer.Option(Path("results/runs"), "--out", help="folder of run records")
_RUN_CACHE = typer.Option(DEFAULT_CACHE, help="cache of generated data and pretrained models")


@app.command()
def run(
    method: str = typer.Option("clip", help="method name (see `ncbench list`) or package.module:Class"),
    noise: float = typer.Option(0.0, help="fraction of training captions re-paired by the noise protocol, in [0, 1)"),
    noise_protocol: Optional[str] = typer.Option(
        None, help="caption-shuffle, image-shuffle, hard (docs/noise.md) or an imported file-<digest> [default caption-shuffle]"),
    noise_file: Optional[Path] = typer.Option(
        None, help="use exactly this noise: an NCR/BiCro index (.npy) or NPC noisy captions (.txt) of the train split"),
    seed: int = typer.Option(0, help="run seed: noise, data order and method randomness"),
    dataset: str = _RUN_DATASET,
    data_root: Optional[Path] = _DATA_ROOT,
    epochs: Optional[int] = _EPOCHS,
    batch_size: Optional[int] = _BATCH_SIZE,
    lr: Optional[float] = _LR,
    model: Optional[str] = _RUN_MODEL,
    pretrained: Optional[str] = _RUN_PRETRAINED,
    selection: Optional[str] = _SELECTION,
    precision: Optional[str] = _PRECISION,
    preset: Optional[str] = typer.Option(
        None, help="named settings per method and dataset family, under explicit flags: paper (ncbench/presets.py)"),
    clean_fraction: Optional[float] = typer.Option(
        None, help="training pairs kept clean for methods that use clean data [default 0.02 for them, else 0]"),
    param: List[str] = typer.Option([], "--param", "-p", help="method hyper-parameter name=value (repeatable)"),
    plugin: List[Path] = _PLUGIN,
    log: Optional[str] = _LOG,
    keep_model: bool = _KEEP_MODEL,
    out_dir: Path = _RUNS_OUT,
    cache_dir: Path = _RUN_CACHE,
) -> None:
    """Fine-tune a CLIP model with one method on noisy data; evaluate; write one result record."""
    from ncbench.registry import METHODS, load_plugin_file

    for path in plugin:
        load_plugin_file(path)
    method_cls = METHODS.get(method)
    from ncbench import config, harness  # after the method: a bad one is reported without importing open_clip

    flags = dict(noise=noise, noise_protocol=noise_protocol, seed=seed, dataset=dataset, epochs=epochs, batch_size=batch_size, lr=lr,
                 model=model, pretrained=pretrained, selection=selection, precision=precision, preset=preset,
                 clean_fraction=clean_fraction, data_root=str(data_root) if data_root else None)
    cfg = config.resolve(method_cls, flags, _parse_params(param))
    if noise_file is not None:
        cfg = _with_noise_file(cfg, noise_file, noise_protocol, cache_dir)
    record = harness.run(cfg, _writable_dir(out_dir, "--out"), _writable_dir(cache_dir, "--cache-dir"),
                         config.RunOptions(log, keep_model))
    if record is not None:  # None: a torchrun rank other than 0, which writes nothing
        _show_record(record, out_dir)


def _with_noise_file(cfg, path: Path, protocol: str | None, cache_dir: Path):
    """``--noise-file``: store the file's noise as an artefact; the run then names it (ratio, ``file-<digest>``)."""
    import dataclasses

    from ncbench.noise import import_file

    if protocol is not None:
        raise UserError("--noise-file and --noise-protocol: give one of them (the file is the protocol)")
    pairs = _load_pairs(cfg.dataset, Path(cfg.data_root) if cfg.data_root else None, cache_dir, cfg.model)
    imported, _ = import_file(path, pairs, cache_dir, ratio=cfg.noise or None)
    return dataclasses.replace(cfg, noise=imported.ratio, noise_protocol=imported.protocol)


def _load_pairs(dataset: str, data_root: Path | None, cache_dir: Path, model: str):
    """The dataset as a run of ``model`` loads it (real images decoded at the model's input size)."""
    from ncbench.backbone import input_size
    from ncbench.registry import DATASETS

    return DATASETS.get(dataset)().load(data_root, _writable_dir(cache_dir, "--cache-dir"), input_size(model))


def _show_record(record: dict, out_dir: Path) -> None:
    table = Table(title=f"{record['run_id']}  (noise {record['noise']['ratio']:g}, "
                        f"realised {record['noise']['realised_ratio']:.3f}, selected epoch {record['selection']['epoch']})")
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    table.add_column("")
    for key in keys:
        table.add_column(key.replace("_", " ").upper().replace("RSUM", "rSum"), justify="right")
    for label, block in (("zero-shot", record["zero_shot"]), ("test", record["test"])):
        for protocol, metrics in block.items():
            table.add_row(f"{label} {protocol}", *(f"{metrics[k]:.1f}" for k in keys))
    out.print(table)
    detection = record["epochs"][-1].get("detection") if record["epochs"] else None
    if detection:
        out.print("clean-pair detection (last epoch): " + ", ".join(f"{k} {v:.3f}" for k, v in detection.items()))
    out.print(f"record: {out_dir / record['run_id'] / 'result.json'}  ({sum(record['timing'].values()):.0f} s)")


@app.command("list")
def list_(
    kind: Optional[str] = typer.Argument(None, help="methods, datasets or noises [default: all three]"),
    plugin: List[Path] = _PLUGIN,
) -> None:
    """List the registered methods, datasets and noise protocols; a broken plugin is one warning line."""
    from ncbench.registry import REGISTRIES, RegistryError, load_plugin_file

    if kind is not None and kind not in REGISTRIES:
        raise UserError(f"ncbench list {kind}: expected one of {', '.join(REGISTRIES)}")
    for path in plugin:
        try:
            load_plugin_file(path)
        except UserError as e:
            err.print(f"[yellow]warning:[/yellow] {e}", highlight=False, soft_wrap=True)
    for name in [kind] if kind else REGISTRIES:
        registry = REGISTRIES[name]
        table = Table("name", "version", "origin", *(["clean data"] if name == "methods" else []), "description",
                      title=name)
        for entry in sorted(registry.entries().values(), key=lambda e: e.name):
            try:
                obj = registry.load(entry)
            except RegistryError as e:
                err.print(f"[yellow]warning:[/yellow] {e}", highlight=False, soft_wrap=True)
                continue
            clean = ["yes" if getattr(obj, "uses_clean_subset", False) else ""] if name == "methods" else []
            description = getattr(obj, "description", "") or (obj.__doc__ or "").strip().partition("\n")[0]
            table.add_row(entry.name, str(getattr(obj, "version", "")), entry.origin, *clean, description)
        out.print(table)


noise_app = typer.Typer(no_args_is_help=True, help="Noise artefacts: make, show, export (NCR/NPC files) and import.")
app.add_typer(noise_app, name="noise")
_NOISE_PROTOCOL = typer.Option("caption-shuffle", help="caption-shuffle, image-shuffle, hard or an imported file-<digest>")
_NOISE = typer.Option(0.2, help="nominal noise ratio, in [0, 1)")
_SEED = typer.Option(0, help="run seed the noise belongs to")
_DATASET = typer.Option("synthetic", help="dataset adapter")
_MODEL = typer.Option("ncbench-tiny", help="open_clip architecture of the runs: real images are decoded at its input size, and `hard` uses its image embeddings on data without attributes")
_PRETRAINED = typer.Option("embedded", help="its weights: open_clip tag, checkpoint path or embedded")
_CACHE = typer.Option(DEFAULT_CACHE, help="cache of generated data, models and noise artefacts")


def _noise_artefact(protocol: str, noise: float, seed: int, dataset: str, data_root: Path | None, model: str,
                    pretrained: str, cache_dir: Path, mode: str):
    from ncbench.noise import obtain

    pairs = _load_pairs(dataset, data_root, cache_dir, model)
    from ncbench.backbone import ModelImageEmbedder

    artefact, path = obtain(pairs, protocol, noise, seed, cache_dir, embedder=ModelImageEmbedder(model, pretrained, cache_dir),
                            mode=mode)
    return pairs, artefact, path


def _show_noise(pairs, artefact, path: Path) -> None:
    from ncbench.noise import examples

    n = len(artefact.clean)
    out.print(f"{artefact.protocol} noise on {pairs.name} {artefact.split}: nominal {artefact.ratio:g}, realised "
              f"{artefact.realised_ratio:.4f} ({int((~artefact.clean).sum())} of {n} captions), seed {artefact.seed}")
    out.print(f"digest {artefact.digest}" + (f"  source {artefact.source}" if artefact.source else ""))
    out.print(f"artefact {path}", soft_wrap=True)
    table = Table("caption", "its text", "paired with image", "a true caption of that image",
                  title="examples of mismatched pairs")
    for c, text, image, truth in examples(artefact, pairs.train):
        table.add_row(str(c), text, str(image), truth)
    out.print(table)


@noise_app.command("make")
def noise_make(noise_protocol: str = _NOISE_PROTOCOL, noise: float = _NOISE, seed: int = _SEED, dataset: str = _DATASET,
               data_root: Optional[Path] = _DATA_ROOT, model: str = _MODEL, pretrained: str = _PRETRAINED,
               cache_dir: Path = _CACHE) -> None:
    """Build the artefact of (dataset, train split, protocol, ratio, seed), store it (or check the stored one); show it."""
    _show_noise(*_noise_artefact(noise_protocol, noise, seed, dataset, data_root, model, pretrained, cache_dir, "make"))


@noise_app.command("show")
def noise_show(noise_protocol: str = _NOISE_PROTOCOL, noise: float = _NOISE, seed: int = _SEED, dataset: str = _DATASET,
               data_root: Optional[Path] = _DATA_ROOT, model: str = _MODEL, pretrained: str = _PRETRAINED,
               cache_dir: Path = _CACHE) -> None:
    """Show a stored artefact: realised ratio, digest and example mismatched pairs."""
    _show_noise(*_noise_artefact(noise_protocol, noise, seed, dataset, data_root, model, pretrained, cache_dir, "load"))


@noise_app.command("export")
def noise_export(fmt: str = typer.Option(..., "--format", help="ncr (<dataset>_<r>.npy) or npc ({r}_noise_train_caps.txt)"),
                 out_dir: Path = typer.Option(Path("."), "--out", help="folder to write the file into"),
                 noise_protocol: str = _NOISE_PROTOCOL, noise: float = _NOISE, seed: int = _SEED,
                 dataset: str = _DATASET, data_root: Optional[Path] = _DATA_ROOT, model: str = _MODEL,
                 pretrained: str = _PRETRAINED, cache_dir: Path = _CACHE) -> None:
    """Write an artefact (made if needed) in the file format NCR/BiCro or NPC read."""
    from ncbench.noise import export_ncr, export_npc_captions

    if fmt not in ("ncr", "npc"):
        raise UserError(f"--format {fmt}: expected ncr or npc")
    pairs, artefact, _ = _noise_artefact(noise_protocol, noise, seed, dataset, data_root, model, pretrained,
                                         cache_dir, "get")
    folder = _writable_dir(out_dir, "--out")
    path = export_ncr(artefact, folder) if fmt == "ncr" else export_npc_captions(artefact, pairs.train, folder)
    out.print(f"{path}  ({artefact.protocol}, realised {artefact.realised_ratio:.4f}, digest {artefact.digest[:12]})",
              soft_wrap=True)


@noise_app.command("import")
def noise_import(path: Path = typer.Argument(..., help="an NCR/BiCro index (.npy, also RCL's per-image form) or NPC noisy captions (.txt)"),
                 noise: Optional[float] = typer.Option(None, help="nominal ratio [default: from the file name, else realised]"),
                 dataset: str = _DATASET, data_root: Optional[Path] = _DATA_ROOT, model: str = _MODEL,
                 cache_dir: Path = _CACHE) -> None:
    """Store a paper's noise file as an artefact; runs use it with --noise-protocol file-<digest>."""
    from ncbench.noise import import_file

    pairs = _load_pairs(dataset, data_root, cache_dir, model)
    artefact, stored = import_file(path, pairs, cache_dir, ratio=noise, flag="ncbench noise import")
    _show_noise(pairs, artefact, stored)
    out.print(f"use it with: ncbench run --dataset {dataset} --noise-protocol {artefact.protocol} --noise {artefact.ratio:g}")


@app.command()
def sweep(
    methods: str = typer.Option(..., help="comma-separated methods, e.g. clip,gmm-filter,npc"),
    noise: str = typer.Option("0,0.2,0.4,0.6", help="comma-separated noise ratios, each in [0, 1)"),
    seeds: str = typer.Option("0,1,2", help="comma-separated run seeds"),
    noise_protocol: Optional[str] = typer.Option(None, help="noise protocol of every run [default caption-shuffle]"),
    dataset: str = _RUN_DATASET,
    data_root: Optional[Path] = _DATA_ROOT,
    epochs: Optional[int] = _EPOCHS,
    batch_size: Optional[int] = _BATCH_SIZE,
    lr: Optional[float] = _LR,
    model: Optional[str] = _RUN_MODEL,
    pretrained: Optional[str] = _RUN_PRETRAINED,
    selection: Optional[str] = _SELECTION,
    precision: Optional[str] = _PRECISION,
    preset: Optional[str] = typer.Option(None, help="named settings per method and dataset family: paper"),
    plugin: List[Path] = _PLUGIN,
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="local: runs at a time: 1 runs them in this process, "
                                       "N > 1 in N `ncbench run` workers with cores/N torch threads each [default 1]"),
    launcher: str = typer.Option("local", help="where the runs execute: local (this machine) or slurm (one job array "
                                 "through submitit; needs ncbench[slurm])"),
    partition: Optional[str] = typer.Option(None, help="slurm: partition of the jobs [default: the cluster's]"),
    gpus_per_run: Optional[int] = typer.Option(None, help="slurm: GPUs (and DDP processes) of each run, on one node; "
                                               "0 for CPU-only jobs [default 1]"),
    time: Optional[int] = typer.Option(None, "--time", help="slurm: time limit of each job in minutes; a run that "
                                       "needs longer is requeued and resumes from its checkpoint [default 240]"),
    array_parallelism: Optional[int] = typer.Option(None, help="slurm: runs of the array at a time [default 256]"),
    status: bool = typer.Option(False, "--status", help="list each run as done, incomplete or not started (with "
                                "--launcher slurm also queued, running or failed); run nothing"),
    log: Optional[str] = _LOG,
    keep_model: bool = _KEEP_MODEL,
    out_dir: Path = _RUNS_OUT,
    cache_dir: Path = _RUN_CACHE,
) -> None:
    """Run the grid methods × noise × seeds: skip runs with a record, resume those with a checkpoint."""
    from ncbench import sweep as sweeps
    from ncbench.config import RunOptions
    from ncbench.registry import load_plugin_file

    for path in plugin:
        load_plugin_file(path)
    settings = dict(noise_protocol=noise_protocol, dataset=dataset, data_root=str(data_root) if data_root else None,
                    epochs=epochs, batch_size=batch_size, lr=lr, model=model, pretrained=pretrained,
                    selection=selection, precision=precision, preset=preset)
    grid = sweeps.expand(sweeps.parse_list(methods, str, "--methods"), sweeps.parse_list(noise, float, "--noise"),
                         sweeps.parse_list(seeds, int, "--seeds"), settings, plugin, RunOptions(log, keep_model))
    options = _launcher_options(launcher, jobs, partition, gpus_per_run, time, array_parallelism)
    if status:
        if launcher == "slurm":
            from ncbench import slurm

            _show_status(slurm.statuses(grid, out_dir), out_dir)
        else:
            _show_status(sweeps.statuses(grid, out_dir), out_dir)
        return
    summary = sweeps.sweep(grid, _writable_dir(out_dir, "--out"), _writable_dir(cache_dir, "--cache-dir"),
                           1 if jobs is None else jobs, launcher, options)
    elsewhere = f", {summary.elsewhere} run by another process" if summary.elsewhere else ""
    out.print(f"sweep of {summary.total} run{'s' if summary.total != 1 else ''}: {summary.skipped} already done, "
              f"{summary.ran} ran ({summary.resumed} resumed from a checkpoint){elsewhere}, "
              f"{len(summary.failed)} failed")
    for run_id, why in summary.failed.items():
        err.print(f"failed {run_id}: {why}", highlight=False, soft_wrap=True)
    if summary.failed:
        sys.exit(1)


def _launcher_options(launcher: str, jobs: int | None, partition: str | None, gpus_per_run: int | None,
                      time: int | None, array_parallelism: int | None):
    """The launcher's own settings (slurm.Options for slurm); a flag of the other launcher is an error."""
    slurm_flags = {"--partition": partition, "--gpus-per-run": gpus_per_run, "--time": time,
                   "--array-parallelism": array_parallelism}
    if launcher != "slurm":
        given = [flag for flag, value in slurm_flags.items() if value is not None]
        if given:
            hint = " (on one machine: torchrun --nproc_per_node N -m ncbench run ...)" if gpus_per_run else ""
            raise UserError(f"{given[0]}: only with --launcher slurm{hint}")
        return None
    if jobs is not None:
        raise UserError("--jobs: only with --launcher local; with slurm, --array-parallelism sets the runs at a time")
    from ncbench.slurm import Options

    defaults = Options()
    return Options(partition, defaults.gpus_per_run if gpus_per_run is None else gpus_per_run,
                   defaults.time_min if time is None else time, array_parallelism)


def _show_status(states: list, out_dir: Path) -> None:
    from collections import Counter

    from ncbench.sweep import State

    style = {State.DONE: "green", State.RUNNING: "cyan", State.QUEUED: "blue", State.FAILED: "red",
             State.INCOMPLETE: "yellow", State.NOT_STARTED: "dim"}
    table = Table("state", "run id", title=f"{len(states)} runs in {out_dir}")
    table.columns[1].no_wrap = True
    for job, state in states:
        table.add_row(f"[{style[state]}]{state.value}[/]", job.run_id)
    out.print(table)
    counts = Counter(state for _, state in states)
    out.print(", ".join(f"{counts[state]} {state.value}" for state in State if counts[state]))


_RESULTS = typer.Option(Path("results/runs"), "--results", help="folder of run records (searched recursively)")
_METRIC = typer.Option("rsum", help="test metric: rsum, i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10, i2t_medr, t2i_medr")
_PROTOCOL = typer.Option(None, help="test protocol: 1k, coco-1k or coco-5k [default: each dataset's first]")
_ONLY_DATASET = typer.Option(None, "--dataset", help="only this dataset's records")


@app.command()
def leaderboard(
    fmt: str = typer.Option("md", "--format", help="md, csv or latex (booktabs)"),
    metric: str = _METRIC,
    protocol: Optional[str] = _PROTOCOL,
    dataset: Optional[str] = _ONLY_DATASET,
    results_dir: Path = _RESULTS,
    out_file: Optional[Path] = typer.Option(None, "--out", help="file to write [default: print]"),
) -> None:
    """Tables of the mean over seeds with its 95 % interval and the tied-best group (CSV adds the sample std): one
    per setting, a row per method, a column per noise ratio, then AUC and retention."""
    from ncbench import report

    text = report.leaderboard(results_dir, fmt, metric, protocol, dataset)
    if out_file is None:
        sys.stdout.write(text)
        return
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(text)
    except OSError as e:
        raise UserError(f"--out {out_file}: cannot write ({e.strerror or e})") from None
    out.print(f"wrote {out_file}", highlight=False)


@app.command()
def compare(
    method_a: str = typer.Argument(..., help="a method as the leaderboard names it, e.g. gmm-weight"),
    method_b: str = typer.Argument(..., help="the method it is compared with"),
    fmt: str = typer.Option("table", "--format", help="table (terminal), csv or md"),
    metric: str = _METRIC,
    protocol: Optional[str] = _PROTOCOL,
    dataset: Optional[str] = _ONLY_DATASET,
    noise_protocol: Optional[str] = typer.Option(None, help="only this noise protocol's records"),
    results_dir: Path = _RESULTS,
) -> None:
    """Per setting and noise ratio: A − B paired by seed and noise artefact, its 95 % interval and p-value (docs/statistics.md)."""
    from ncbench import report

    if fmt not in report.COMPARE_FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(report.COMPARE_FORMATS)}")
    frame = report.compare(results_dir, method_a, method_b, metric, protocol, dataset, noise_protocol)
    if fmt != "table":
        sys.stdout.write(report.comparison_text(frame, fmt))
        return
    title, header, rows = report.comparison_rows(frame)
    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    out.print(table)


@app.command()
def plot(
    metric: str = _METRIC,
    protocol: Optional[str] = _PROTOCOL,
    dataset: Optional[str] = _ONLY_DATASET,
    results_dir: Path = _RESULTS,
    out_dir: Path = typer.Option(Path("results/plots"), "--out", help="folder for the PNG and SVG files"),
) -> None:
    """Noise-stability plots (metric vs noise, ± std band) and detection AUROC vs noise, as PNG and SVG."""
    from ncbench import report

    for path in report.plot(results_dir, _writable_dir(out_dir, "--out"), metric, protocol, dataset):
        out.print(str(path), highlight=False, soft_wrap=True)


@app.command()
def pretrain(
    model: str = typer.Option("ncbench-tiny", help="a built-in tiny model with a compact vocabulary"),
    cache_dir: Path = typer.Option(DEFAULT_CACHE, help="cache the weights are written to"),
) -> None:
    """Pretrain a tiny model's embedded weights now (minutes on a CPU), even where the package ships them, and write
    them to the cache; says whether they equal the shipped file."""
    import time

    from safetensors.torch import load_file

    from ncbench import pretrain as pretraining
    from ncbench.recipe import current_spec

    spec, start = current_spec(), time.perf_counter()
    state = pretraining.pretrain(model, _writable_dir(cache_dir, "--cache-dir"), spec)
    out.print(f"wrote {pretraining.cache_path(model, cache_dir, spec)} ({time.perf_counter() - start:.0f} s)",
              highlight=False, soft_wrap=True)
    shipped = pretraining.shipped_weights(model, spec)
    if shipped is None:
        out.print("no shipped weights for this architecture and recipe", highlight=False)
        return
    identical, largest = pretraining.compare_states(state, load_file(shipped))
    verdict = "bitwise identical to" if identical else f"differs (largest absolute difference {largest:.3g}) from"
    out.print(f"{verdict} the shipped {shipped}", highlight=False, soft_wrap=True)


@app.command("export")
def export_(
    run: str = typer.Argument(..., help="a run folder, or a run id found under --results"),
    out_path: Path = typer.Option(..., "--out", help="model.pt / .safetensors (open_clip's pretrained=PATH), or a folder "
                                                    "(open_clip's local-dir:PATH)"),
    results_dir: Optional[Path] = typer.Option(None, "--results", help="folder of run records, to find a run id in"),
    member: int = typer.Option(0, help="which evaluated model, for methods that test several (co-teaching)"),
) -> None:
    """Write a run's fine-tuned (selected-epoch) model as a checkpoint open_clip loads (ncbench/export.py)."""
    from ncbench import export

    files, notes = export.export_run(export.find_run(run, results_dir), out_path, member)
    for line in [*map(str, files), *notes]:
        out.print(line, highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a plugin shadowed by another of its name) as one line on stderr."""
    err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def _click_errors() -> tuple[type, ...]:
    """Click's exception base classes: typer's bundled copy (typer >= 0.17) and click itself, whichever exist."""
    classes = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            classes.append(importlib.import_module(module).ClickException)
        except ImportError:
            pass
    return tuple(classes)


def _usage_line(e: Exception) -> str:
    """A click error as one line: the message (it names the flag, value or command) and where help is."""
    message = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    return f"{message}; see '{ctx.command_path if ctx is not None else 'ncbench'} --help'"


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input of any kind is one line on stderr and exit code 2; no traceback."""
    warnings.showwarning = _show_warning
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0, not one per process
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(RUN_LOCKED_EXIT if isinstance(e, RunLocked) else 2)
    except _click_errors() as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `ncbench` or `ncbench noise`: the help is the answer
            out.print(e.ctx.get_help(), highlight=False, markup=False)
            sys.exit(0)
        err.print("[red]error:[/red] " + escape(_usage_line(e)), highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt) as e:
        cause = e.__cause__ or e.__context__
        if cause is not None and not isinstance(cause, KeyboardInterrupt):
            raise cause  # click turns an EOFError anywhere into Abort; an internal error must not look like Ctrl-C
        sys.exit(130)
