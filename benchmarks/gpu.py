"""The GPU path in one call: training throughput of ncbench's methods against open_clip's own training step, peak
memory per method, and the embedded benchmark end to end in bf16 and fp32.

**Steps.** A randomly initialised ``--model`` (ViT-B-32: no download) on a synthetic training set rendered at the
model's input size with 20 % caption noise (``ncbench.testing.tiny_context`` on the device), batch
``--batch-size``. Each method runs alone on the device: set-up, its once-per-epoch work at the last epoch (the
GMM divisions, NPC's memory bank), ``--warmup`` untimed steps, then ``--steps`` timed harness steps
(``ncbench.testing.step``: the batch gathered from uint8 images on the host and normalised on the device, autocast,
the method's losses, backward, fused AdamW), every method on the same pairs (``ncr``: each model's labeled batch
is them, its unlabeled batch the next round's pairs). Peak memory is the device's high-water mark from set-up to
the last step. ``open_clip`` is its training script's step: the same pairs, normalised beforehand into pinned host
memory and copied in the step as its data loader hands them over, ``ClipLoss``, AdamW without weight decay on gains,
biases and the logit scale, the same autocast, the logit scale clamped to ln 100 after the step. Pairs/s is the
batch size over the median step.

**End to end** (``--runs``): ``ncbench run --method M --noise 0.6`` for ``clip`` and ``npc-official``, by default
(bf16 autocast on CUDA) and with ``--precision fp32``, as real processes; wall time and test rSum, beside the CPU
record (full precision) of the same configuration in ``--reference`` when one exists with the same starting
weights.

    python benchmarks/gpu.py --runs                 # on a GPU machine: everything, in about 5 minutes
    python benchmarks/gpu.py --model ncbench-tiny --batch-size 16 --images 60 --steps 2 --warmup 1 --runs \
        --run-flags "--dataset synthetic-mini --epochs 1"       # a smoke test on the CPU
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch

from ncbench.device import select_device
from ncbench.method import BatchIndex, Method
from ncbench.methods.clip import CLIPFineTune
from ncbench.methods.gmm_filter import GmmFilter
from ncbench.methods.ncr import NCR
from ncbench.methods.npc import NPC, NPCOfficial
from ncbench.testing import step, tiny_context

METHODS: tuple[type[Method], ...] = (CLIPFineTune, NPCOfficial, NPC, NCR, GmmFilter)
RUNS = [(method, precision) for method in ("clip", "npc-official") for precision in ("auto", "fp32")]


def synchronized(device: torch.device, work: Callable[[], object]) -> float:
    """Seconds ``work`` takes, with the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - clock


def reset_peak(device: torch.device) -> None:
    """Release cached blocks and start a new memory high-water mark (CUDA only)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: torch.device) -> float | None:
    """The device's memory high-water mark since :func:`reset_peak`; None on the CPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def _cell(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def open_clip_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: open_clip.ClipLoss,
                   autocast: Callable, images: torch.Tensor, tokens: torch.Tensor, device: torch.device) -> None:
    """One step as open_clip's training script takes it (``train_one_epoch``, bf16 or fp32 without a grad scaler)."""
    images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
    optimizer.zero_grad()
    with autocast():
        image, text, scale = model(images, tokens)[:3]
        total = loss(image, text, scale)
    total.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


def open_clip_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """open_clip's AdamW: no weight decay on gains, biases and the logit scale; betas (0.9, 0.98), eps 1e-6."""
    def exclude(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def step_benchmark(args: argparse.Namespace, device: torch.device) -> None:
    """The per-method step table (pairs/s, ratios, once-per-epoch work, peak memory)."""
    rounds = args.warmup + args.steps
    context = dict(n_images=args.images, noise=0.2, batch_size=args.batch_size, epochs=args.epochs, model=args.model,
                   device=device, precision=args.precision)
    n = 5 * args.images
    rng = np.random.default_rng(0)
    indices = [rng.choice(n, args.batch_size, replace=False) for _ in range(rounds + 1)]
    medians: dict[str, float] = {}
    once: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    for cls in METHODS:
        reset_peak(device)
        method = cls()
        ctx = tiny_context(cls, **context)
        once[cls.name] = synchronized(device, lambda: method.setup(ctx))
        epoch = ctx.epochs - 1  # past every warm-up: NCR divides and trains on unlabeled pairs
        once[cls.name] += synchronized(device, lambda: method.on_epoch_start(epoch))
        times = []
        for i in range(rounds):
            index: BatchIndex = indices[i]
            if cls is NCR:
                index = {"a": indices[i], "a_unlabeled": indices[i + 1], "b": indices[i], "b_unlabeled": indices[i + 1]}
            seconds = synchronized(device, lambda: step(method, index))
            if i >= args.warmup:
                times.append(seconds)
        medians[cls.name], peaks[cls.name] = statistics.median(times), peak_mib(device)
        del method, ctx

    ctx = tiny_context(CLIPFineTune, **context)
    model = ctx.models[0]
    optimizer = open_clip_optimizer(model, ctx.lr, ctx.weight_decay)
    loss = open_clip.ClipLoss()
    # the batches, made on the device one at a time and kept in host memory, as open_clip's data loader hands them over
    host = [(b.images.cpu(), b.tokens.cpu()) for b in map(ctx.train.batch, indices[:rounds])]
    if device.type == "cuda":
        host = [(images.pin_memory(), tokens.pin_memory()) for images, tokens in host]
    reset_peak(device)  # the mark starts from the model; the batches made above do not count
    times = [synchronized(device, lambda: open_clip_step(model, optimizer, loss, ctx.autocast, *batch, device))
             for batch in host]
    medians["open_clip"], peaks["open_clip"] = statistics.median(times[args.warmup:]), peak_mib(device)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.model} (random init), batch {args.batch_size}, "
          f"precision {args.precision}, median of {args.steps} steps after {args.warmup} untimed")
    print("| method | ms/step | pairs/s | × open_clip | × clip (time) | once per epoch s | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for method, seconds in medians.items():
        print(f"| {method} | {1e3 * seconds:.1f} | {args.batch_size / seconds:.0f} | "
              f"{medians['open_clip'] / seconds:.2f} | {seconds / medians['clip']:.2f} | "
              f"{_cell(once.get(method), '.2f')} | {_cell(peaks[method], '.0f')} |")
    print(f"ncbench clip throughput / open_clip throughput: {medians['open_clip'] / medians['clip']:.3f} (goal >= 0.9)")


def end_to_end(args: argparse.Namespace) -> None:
    """The embedded benchmark's clip and npc-official runs at 60 % in bf16 and fp32, beside the CPU records."""
    out = Path(args.out or tempfile.mkdtemp(prefix="ncbench-gpu-"))
    print("\n| run | precision | wall s | test rSum | CPU record rSum | GPU − CPU | peak MiB |\n|---|---|---|---|---|---|---|")
    for method, precision in RUNS:
        folder = out / f"{method}-{precision}"
        clock = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ncbench", "run", "--method", method, "--noise", "0.6",
                               "--precision", precision, *args.run_flags.split(), "--out", str(folder)],
                              capture_output=True, text=True)
        wall = time.perf_counter() - clock
        if proc.returncode != 0:
            print(f"| {method} | {precision} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
            continue
        (path,) = folder.glob("*/result.json")
        record = json.loads(path.read_text())
        rsum = record["test"]["1k"]["rsum"]
        cpu = _cpu_record(Path(args.reference), record)
        cpu_cells = "no CPU record of this configuration and starting weights | –" if cpu is None else \
            f"{cpu:.2f} | {rsum - cpu:+.2f}"
        print(f"| {method} | {precision} | {wall:.0f} | {rsum:.2f} | {cpu_cells} | {record['peak_memory_mb']:.0f} |")


def _cpu_record(reference: Path, record: dict) -> float | None:
    """Test rSum of ``reference``'s CPU record of ``record``'s configuration at the default precision (full, on the
    CPU) from the same starting weights; None without one."""
    from ncbench.config import RunConfig

    config = {k: v for k, v in record["config"].items() if k not in ("architecture", "pretrain", "precision")}
    path = reference / RunConfig(**config).run_id / "result.json"
    if not path.exists():
        return None
    cpu = json.loads(path.read_text())
    if cpu.get("weights_sha256") != record["weights_sha256"] or not cpu["environment"]["device"].startswith("cpu"):
        return None
    return cpu["test"]["1k"]["rsum"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=1000, help="training images (5 captions each)")
    parser.add_argument("--epochs", type=int, default=4, help="run length the methods plan for")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--runs", action="store_true", help="also the end-to-end runs (ncbench run, 4 of them)")
    parser.add_argument("--run-flags", default="", help="more `ncbench run` flags, e.g. for a CPU smoke test: "
                        "'--dataset synthetic-mini --epochs 1'")
    parser.add_argument("--out", help="folder of the end-to-end runs' records [default: a new temporary folder]")
    parser.add_argument("--reference", default=str(Path(__file__).resolve().parents[1] / "results" / "reference"),
                        help="folder of CPU records to compare the end-to-end runs with")
    args = parser.parse_args()
    device = select_device()
    step_benchmark(args, device)
    if args.runs:
        end_to_end(args)


if __name__ == "__main__":
    main()
