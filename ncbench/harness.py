"""The training loop of one run: data, noise, backbone, method hooks, evaluation, checkpoints, record."""
from __future__ import annotations

import copy
import dataclasses
import resource
import time
from pathlib import Path

import numpy as np
import torch

from ncbench import checkpoint, distributed, evaluate
from ncbench.backbone import input_size, load_backbone, weights_source
from ncbench.config import RunConfig, check_clean_fraction
from ncbench.data import ImageNormalizer, Pairs, Split
from ncbench.device import autocast_for, select_device
from ncbench.errors import UserError
from ncbench.method import Batch, Context, Method, TrainSet
from ncbench.noise import NoisyPairing, obtain
from ncbench.optim import adamw, set_lr, warmup_cosine
from ncbench.progress import progress_bar
from ncbench.registry import DATASETS, METHODS
from ncbench.results import CHECKPOINT, RECORD, SCHEMA_VERSION, environment, load_record, write_json_atomic
from ncbench.seeding import derive_seed, seed_everything


def run(cfg: RunConfig, out_root: Path, cache_dir: Path) -> dict | None:
    """Run ``cfg`` (resuming from its checkpoint if one exists) and return its record; a done run is not rerun.

    Under torchrun (``WORLD_SIZE`` > 1) every process trains its slice of each global batch and only rank 0
    evaluates, writes the checkpoints and the record; the other ranks return None.
    """
    run_dir = Path(out_root) / cfg.run_id
    done = load_record(run_dir)
    if done is not None and done.get("status") == "complete":
        return done
    world = distributed.world()
    distributed.check_run(METHODS.get(cfg.method), cfg.batch_size, world)
    dataset_cls = DATASETS.get(cfg.dataset)
    data_root = Path(cfg.data_root) if cfg.data_root else None
    dataset_cls.check_run(data_root, cfg.noise)  # before anything is written
    resolution = input_size(cfg.model)
    weights_source(cfg.model, cfg.pretrained)  # missing weights fail before hours of image decoding
    run_dir.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    clock = time.perf_counter()

    method_cls = METHODS.get(cfg.method)
    method: Method = method_cls(method_cls.Params(**cfg.params))
    check_clean_fraction(method_cls, cfg.clean_fraction)
    with distributed.main_first(world):  # rank 0 builds the caches the others then read
        pairs: Pairs = dataset_cls().load(data_root, cache_dir, resolution)  # real images decoded at the model's size
        pairs, clean = carve_clean_subset(pairs, cfg.clean_fraction, cfg.seed)  # before the noise touches train
        noise = _noise(cfg, pairs, cache_dir)
        timing["data_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        backbone = load_backbone(cfg.model, cfg.pretrained, cache_dir)
        timing["backbone_s"] = time.perf_counter() - clock

    seed_everything(derive_seed("run", cfg.seed))
    device = select_device()
    autocast = autocast_for(device)
    normalize = ImageNormalizer(backbone.mean, backbone.std, backbone.image_size, device)
    splits = {name: (getattr(pairs, name), backbone.tokenize(getattr(pairs, name).captions)) for name in ("train", "dev", "test")}
    train = TrainSet(pairs.train.images, splits["train"][1], noise.assigned_image, normalize)
    clean_subset = None if clean is None else TrainSet(clean.images, backbone.tokenize(clean.captions),
                                                       clean.caption_image, normalize)
    models = distributed.wrap([copy.deepcopy(backbone.model).to(device).train() for _ in range(method_cls.num_models)],
                              world)
    optimizers = [adamw(m.parameters(), cfg.lr, cfg.weight_decay) for m in models]
    ctx = Context(models=models, train=train, clean_subset=clean_subset, device=device, autocast=autocast,
                  rng=np.random.default_rng(derive_seed("method", cfg.seed)), seed=cfg.seed, epochs=cfg.epochs,
                  batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                  make_optimizer=lambda params: adamw(params, cfg.lr, cfg.weight_decay), optimizers=optimizers)

    def test_metrics(eval_models: list[torch.nn.Module]) -> dict[str, dict[str, float]]:
        img, txt = evaluate.embed(eval_models, splits["test"][0].images, splits["test"][1], normalize, autocast)
        caption_image = torch.from_numpy(splits["test"][0].caption_image)
        return {p: evaluate.evaluate_protocol(p, img, txt, caption_image) for p in pairs.test_protocols}

    def dev_metrics(eval_models: list[torch.nn.Module]) -> dict[str, float]:
        img, txt = evaluate.embed(eval_models, splits["dev"][0].images, splits["dev"][1], normalize, autocast)
        return evaluate.evaluate_protocol("1k", img, txt, torch.from_numpy(splits["dev"][0].caption_image))

    state = checkpoint.load(run_dir / CHECKPOINT)
    method.setup(ctx)
    if state is None:
        clock = time.perf_counter()
        state = {"epoch": 0, "history": [], "best": None, "zero_shot": test_metrics(models[:1]) if world.is_main else None}
        timing["zero_shot_eval_s"] = time.perf_counter() - clock
    else:
        for model, saved in zip(models, state["models"]):
            model.load_state_dict(saved)
        for optimizer, saved in zip(optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        method.load_state_dict(state["method"])
        ctx.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])

    warmup = cfg.warmup_steps / max(cfg.epochs * (len(train) // cfg.batch_size), 1)
    for epoch in range(state["epoch"], cfg.epochs):
        clock = time.perf_counter()
        method.on_epoch_start(epoch)
        batches = list(method.epoch_batches(epoch))
        sums: dict[str, float] = {}
        with progress_bar(f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", len(batches)) as advance:
            for i, index in enumerate(batches):
                lr = cfg.lr * warmup_cosine((epoch + i / len(batches)) / cfg.epochs, warmup)
                losses = train_step(method, train.batch(distributed.shard(index, world)), optimizers, lr, cfg.grad_clip)
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                advance(**{k: float(v.detach()) for k, v in losses.items()})
        train_s = time.perf_counter() - clock
        if not world.is_main:
            continue
        entry = {"epoch": epoch + 1, "steps": len(batches), "train_s": round(train_s, 2),
                 "losses": {k: v / max(len(batches), 1) for k, v in sums.items()}}
        scores = method.clean_scores()
        if scores is not None and pairs.has_clean_mask:
            entry["detection"] = evaluate.detection_metrics(np.asarray(scores), noise.clean, method.clean_threshold())
        clock = time.perf_counter()
        entry["dev"] = dev_metrics(method.eval_models())
        entry["eval_s"] = round(time.perf_counter() - clock, 2)
        state["history"].append(entry)
        if cfg.selection == "last" or state["best"] is None or entry["dev"]["rsum"] >= state["best"]["dev_rsum"]:
            state["best"] = {"epoch": epoch + 1, "dev_rsum": entry["dev"]["rsum"],
                             "models": [_cpu_state(m) for m in method.eval_models()]}
        state["epoch"] = epoch + 1
        _save_checkpoint(run_dir / CHECKPOINT, state, models, optimizers, method, ctx)
    if not world.is_main:
        return None

    clock = time.perf_counter()
    eval_models = method.eval_models()
    for model, saved in zip(eval_models, state["best"]["models"]):
        model.load_state_dict(saved)
    test = test_metrics(eval_models)
    timing["test_eval_s"] = time.perf_counter() - clock
    timing["train_s"] = sum(e["train_s"] for e in state["history"])
    timing["dev_eval_s"] = sum(e["eval_s"] for e in state["history"])
    record = {
        "schema": SCHEMA_VERSION,
        "run_id": cfg.run_id,
        "status": "complete",
        "config": cfg.identity(),
        "method": {"name": method_cls.name, "version": method_cls.version, "uses_clean_subset": method_cls.uses_clean_subset,
                   "num_models": method_cls.num_models, "evaluated_models": len(eval_models),
                   "clean_subset_pairs": clean.n_captions if clean else 0, "clean_subset_images": clean.n_images if clean else 0},
        "dataset": {"name": pairs.name, "train_pairs": len(train), "test_protocols": list(pairs.test_protocols),
                    "has_clean_mask": pairs.has_clean_mask, "meta": pairs.meta},
        "noise": {"protocol": noise.protocol, "ratio": noise.ratio, "realised_ratio": noise.realised_ratio,
                  "digest": noise.digest},
        "selection": {"rule": cfg.selection, "epoch": state["best"]["epoch"]},
        "distributed": {"world_size": world.size, "backend": world.backend, "global_batch": cfg.batch_size,
                        "batch_per_process": cfg.batch_size // world.size},
        "zero_shot": state["zero_shot"],
        "test": test,
        "epochs": state["history"],
        "timing": {k: round(v, 2) for k, v in timing.items()},
        "peak_memory_mb": _peak_memory_mb(device),
        "environment": environment(),
    }
    write_json_atomic(run_dir / RECORD, record)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return record


CLEAN_SUBSET_BOUNDS = (1_000, 10_000)  # mscn.md §7.5 meta_frac: clean pairs, before the 10 % cap below
CLEAN_SUBSET_MAX_SHARE = 0.1  # the lower bound never takes more than this share of a small training split


def clean_subset_size(n_pairs: int, fraction: float) -> int:
    """Clean pairs to carve: ``fraction`` of the training pairs clipped to [1,000, 10,000] (mscn.md §7.5, §7.6),
    the lower bound capped at 10 % of the pairs so that a small split (synthetic-mini) keeps most of its data."""
    low, high = CLEAN_SUBSET_BOUNDS
    return int(min(max(round(fraction * n_pairs), min(low, int(CLEAN_SUBSET_MAX_SHARE * n_pairs))), high))


def carve_clean_subset(pairs: Pairs, fraction: float, seed: int) -> tuple[Pairs, Split | None]:
    """Move whole training images, with all their captions, out of ``pairs.train`` into a clean split (mscn.md §7.6).

    Images are taken in an order seeded by (dataset, seed), so smaller fractions are prefixes of larger ones,
    until :func:`clean_subset_size` captions are reached. The clean split holds a copy of its images with captions
    re-indexed; the training split keeps its image array (no copy of a memory map) and loses those captions, so no
    training pair can show a clean image. ``fraction == 0`` returns ``pairs`` unchanged and no clean split.
    """
    if fraction <= 0:
        return pairs, None
    if not pairs.has_clean_mask:
        raise UserError(f"--clean-fraction {fraction:g}: dataset {pairs.name} has real noise, so its training pairs "
                        "cannot serve as clean data")
    train = pairs.train
    order = np.random.default_rng(derive_seed("clean-subset", pairs.name, seed)).permutation(train.n_images)
    captions = np.cumsum(np.bincount(train.caption_image, minlength=train.n_images)[order])
    n_images = min(int(np.searchsorted(captions, clean_subset_size(train.n_captions, fraction))) + 1, train.n_images - 1)
    chosen = np.zeros(train.n_images, dtype=bool)
    chosen[order[:n_images]] = True
    in_clean = chosen[train.caption_image]
    image_ids = np.sort(order[:n_images])
    clean = Split(train.images[image_ids], tuple(c for c, k in zip(train.captions, in_clean) if k),
                  np.searchsorted(image_ids, train.caption_image[in_clean]))
    rest = Split(train.images, tuple(c for c, k in zip(train.captions, in_clean) if not k), train.caption_image[~in_clean])
    return dataclasses.replace(pairs, train=rest), clean


def train_step(method: Method, batch: Batch, optimizers: list[torch.optim.Optimizer], lr: float,
               grad_clip: float) -> dict[str, torch.Tensor]:
    """One optimisation step of ``method.ctx.models``: set ``lr``, zero the gradients, run the method's step under
    autocast, back-propagate ``"loss"`` unless the method ``computes_gradients``, clip each model to ``grad_clip``
    (0: off) and step its AdamW. Returns the method's named losses."""
    for optimizer in optimizers:
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
    with method.ctx.autocast():
        losses = method.training_step(batch)
    if not method.computes_gradients:
        losses["loss"].backward()
    for model, optimizer in zip(method.ctx.models, optimizers):
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return losses


def _noise(cfg: RunConfig, pairs: Pairs, cache_dir: Path) -> NoisyPairing:
    """The run's noise: the shared artefact of (dataset, split, protocol, ratio, seed) in the cache, made once."""
    return obtain(pairs, cfg.noise_protocol, cfg.noise, cfg.seed, cache_dir, model=cfg.model, pretrained=cfg.pretrained)[0]


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_checkpoint(path: Path, state: dict, models, optimizers, method: Method, ctx: Context) -> None:
    checkpoint.save(path, {**state, "models": [_cpu_state(m) for m in models],
                           "optimizers": [o.state_dict() for o in optimizers], "method": method.state_dict(),
                           "rng": ctx.rng.bit_generator.state, "torch_rng": torch.get_rng_state()})


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
