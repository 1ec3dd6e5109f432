"""The ``ncbench`` command line: parses, calls the library, renders with rich."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ncbench.errors import UserError

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


@app.command()
def run(
    method: str = typer.Option("clip", help="method name (see `ncbench list`) or package.module:Class"),
    noise: float = typer.Option(0.0, help="fraction of training captions re-paired by the noise protocol, in [0, 1)"),
    seed: int = typer.Option(0, help="run seed: noise, data order and method randomness"),
    dataset: str = typer.Option("synthetic", help="dataset adapter; default: the embedded synthetic world"),
    data_root: Optional[Path] = typer.Option(None, help="folder of a real dataset"),
    epochs: Optional[int] = typer.Option(None, help="fine-tuning epochs [default 5]"),
    batch_size: Optional[int] = typer.Option(None, help="training batch size [default 128]"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate [default 5e-4]"),
    model: Optional[str] = typer.Option(None, help="open_clip architecture [default ncbench-tiny]"),
    pretrained: Optional[str] = typer.Option(None, help="weights: open_clip tag, checkpoint path, embedded or none"),
    selection: Optional[str] = typer.Option(None, help="model selection: best-dev-rsum or last"),
    param: List[str] = typer.Option([], "--param", "-p", help="method hyper-parameter name=value (repeatable)"),
    out_dir: Path = typer.Option(Path("results/runs"), "--out", help="folder of run records"),
    cache_dir: Path = typer.Option(DEFAULT_CACHE, help="cache of generated data and pretrained models"),
) -> None:
    """Fine-tune a CLIP model with one method on noisy data; evaluate; write one result record."""
    from ncbench import config, harness
    from ncbench.registry import METHODS

    method_cls = METHODS.get(method)
    flags = dict(noise=noise, seed=seed, dataset=dataset, epochs=epochs, batch_size=batch_size, lr=lr,
                 model=model, pretrained=pretrained, selection=selection,
                 data_root=str(data_root) if data_root else None)
    cfg = config.resolve(method_cls, flags, _parse_params(param))
    record = harness.run(cfg, _writable_dir(out_dir, "--out"), _writable_dir(cache_dir, "--cache-dir"))
    _show_record(record, out_dir)


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
def list_(kind: str = typer.Argument("methods", help="methods or datasets")) -> None:
    """List the registered methods or datasets."""
    from ncbench.registry import DATASETS, METHODS

    registries = {"methods": METHODS, "datasets": DATASETS}
    if kind not in registries:
        raise UserError(f"ncbench list {kind}: expected one of {', '.join(registries)}")
    registry = registries[kind]
    table = Table("name", "version", "clean data", "description")
    for name in registry.names():
        cls = registry.get(name)
        table.add_row(name, getattr(cls, "version", ""), "yes" if getattr(cls, "uses_clean_subset", False) else "",
                      cls.description)
    out.print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors for bad input, exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
