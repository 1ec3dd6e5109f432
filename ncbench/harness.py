"""The training loop of one run: data, noise, backbone, method hooks, evaluation, checkpoints, record."""
from __future__ import annotations

import copy
import dataclasses
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ncbench import checkpoint, distributed, evaluate, export, lock, tracking
from ncbench.backbone import ModelImageEmbedder, input_size, load_backbone, weights_digest, weights_source
from ncbench.config import RunConfig, RunOptions, check_clean_fraction
from ncbench.data import ImageNormalizer, Pairs, Split
from ncbench.device import autocast_for, select_device
from ncbench.errors import UserError
from ncbench.method import BatchIndex, Context, Method, StepBatch, StepOutput, TrainSet
from ncbench.noise import NoisyPairing, obtain
from ncbench.optim import set_lr, warmup_cosine
from ncbench.progress import plain_line, progress_bar
from ncbench.registry import DATASETS, METHODS
from ncbench.results import CHECKPOINT, RECORD, RunRecord, environment, load_record, write_json_atomic, write_ranks
from ncbench.seeding import derive_seed, seed_everything

PROGRESS_EVERY = 20  # steps between progress-bar loss updates (each one reads the loss off the device)


@dataclass
class Prepared:
    """Everything a run trains and evaluates with, built once per process."""

    cfg: RunConfig
    pairs: Pairs
    clean: Split | None
    noise: NoisyPairing
    method: Method
    ctx: Context
    tokens: dict[str, torch.Tensor]  # tokenised captions of the dev and test splits
    weights: str  # SHA-256 of the pretrained weights the models started from
    world: distributed.World
    timing: dict[str, float]

    def embed(self, split: str, models: list[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
        data = getattr(self.pairs, split)
        return evaluate.embed(models, data.images, self.tokens[split], self.ctx.train.normalize, self.ctx.autocast)

    def dev_metrics(self, models: list[torch.nn.Module]) -> dict[str, float]:
        img, txt = self.embed("dev", models)
        return evaluate.evaluate_protocol("1k", img, txt, torch.from_numpy(self.pairs.dev.caption_image))

    def test_metrics(self, models: list[torch.nn.Module]) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
        """Metrics per test protocol, and the per-query ranks behind them (``"<protocol>.i2t"``, ``".t2i"``)."""
        img, txt = self.embed("test", models)
        caption_image = torch.from_numpy(self.pairs.test.caption_image)
        metrics, ranks = {}, {}
        for protocol in self.pairs.test_protocols:
            metrics[protocol], ranks[f"{protocol}.i2t"], ranks[f"{protocol}.t2i"] = \
                evaluate.evaluate_protocol_with_ranks(protocol, img, txt, caption_image)
        return metrics, ranks


def run(cfg: RunConfig, out_root: Path, cache_dir: Path, options: RunOptions = RunOptions()) -> dict | None:
    """Run ``cfg`` (resuming from its checkpoint if one exists) and return its record; a done run is not rerun.
    ``options`` choose a tracker for the losses and metrics and whether the selected model is kept.

    Under torchrun (``WORLD_SIZE`` > 1) every process trains its slice of each global batch and only rank 0
    evaluates, writes the checkpoints and the record; the other ranks return None.
    """
    run_dir = Path(out_root) / cfg.run_id
    done = load_record(run_dir)
    if done is not None and done.get("status") == "complete":
        return done
    world = distributed.world()
    check(cfg, world)
    tracking.check_tracker(options.log)
    record = _train_and_record(cfg, run_dir, cache_dir, options, world)
    distributed.close(world)  # the models went with _train_and_record's frame
    return record


def _train_and_record(cfg: RunConfig, run_dir: Path, cache_dir: Path, options: RunOptions,
                      world: distributed.World) -> dict | None:
    """The run under its lock: prepare, train (resuming), evaluate and write the record (rank 0 only)."""
    with lock.hold(run_dir, enabled=world.is_main):  # a second process on the same run stops here
        done = load_record(run_dir)
        if done is not None and done.get("status") == "complete":
            raise lock.FinishedElsewhere(f"run {cfg.run_id} was finished by another process meanwhile; "
                                         f"its record: {run_dir / RECORD}")
        saved = checkpoint.load(run_dir / CHECKPOINT)  # a refused checkpoint stops the run before any work
        prep = prepare(cfg, cache_dir, world)
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused configuration leaves no folder behind
        state = start_or_resume(prep, saved)
        steps_done = sum(e["steps"] for e in state["history"])
        with tracking.open_tracker(options.log if world.is_main else None, run_dir, cfg.identity(),
                                   resumed_steps=steps_done) as tracker:
            for epoch in range(state["epoch"], cfg.epochs):
                entry = train_epoch(prep, epoch, tracker, steps_done)
                steps_done += entry["steps"]
                if world.is_main:
                    end_epoch(prep, state, entry)
                    tracker.epoch(entry["epoch"], {k: entry[k] for k in ("losses", "report", "dev", "detection")
                                                   if k in entry})
                    _save_checkpoint(run_dir / CHECKPOINT, state, prep)
            if not world.is_main:
                return None
            record = finish(prep, state, run_dir, options.keep_model)
            tracker.finish(record["test"])
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
        return record


def check(cfg: RunConfig, world: distributed.World) -> None:
    """Refuse, before anything is loaded or written, what cannot run: the method under this world size, the
    dataset's files, missing pretrained weights."""
    method_cls = METHODS.get(cfg.method)
    distributed.check_run(method_cls, cfg.batch_size, world)
    check_clean_fraction(method_cls, cfg.clean_fraction)
    DATASETS.get(cfg.dataset).check_run(Path(cfg.data_root) if cfg.data_root else None, cfg.noise)
    weights_source(cfg.model, cfg.pretrained)  # missing weights fail before hours of image decoding


def prepare(cfg: RunConfig, cache_dir: Path, world: distributed.World) -> Prepared:
    """Data, clean subset, noise and backbone (rank 0 builds the caches first), then the models, the context and
    the method, set up."""
    timing: dict[str, float] = {}
    clock = time.perf_counter()
    method_cls = METHODS.get(cfg.method)
    with distributed.main_first(world):
        pairs = DATASETS.get(cfg.dataset)().load(Path(cfg.data_root) if cfg.data_root else None, cache_dir,
                                                 input_size(cfg.model))  # real images decoded at the model's size
        pairs, clean = carve_clean_subset(pairs, cfg.clean_fraction, cfg.seed)  # before the noise touches train
        if cfg.batch_size > pairs.train.n_captions:
            raise UserError(f"--batch-size {cfg.batch_size}: larger than the {pairs.train.n_captions} training pairs "
                            f"of {cfg.dataset}; no step could be taken")
        noise = obtain(pairs, cfg.noise_protocol, cfg.noise, cfg.seed, cache_dir,
                       embedder=ModelImageEmbedder(cfg.model, cfg.pretrained, cache_dir))[0]
        timing["data_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        backbone = load_backbone(cfg.model, cfg.pretrained, cache_dir)
        timing["backbone_s"] = time.perf_counter() - clock

    seed_everything(derive_seed("run", cfg.seed))
    device = select_device()
    normalize = ImageNormalizer(backbone.mean, backbone.std, backbone.image_size, device)
    train = TrainSet(pairs.train.images, backbone.tokenize(pairs.train.captions), noise.assigned_image, normalize)
    clean_subset = None if clean is None else TrainSet(clean.images, backbone.tokenize(clean.captions),
                                                       clean.caption_image, normalize)
    models = distributed.wrap([copy.deepcopy(backbone.model).to(device).train() for _ in range(method_cls.num_models)],
                              world)
    ctx = Context.create(models, train, seed=cfg.seed, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                         weight_decay=cfg.weight_decay, clean_subset=clean_subset, device=device,
                         autocast=autocast_for(device, cfg.precision))
    method = method_cls(method_cls.Params(**cfg.params))
    method.setup(ctx)
    tokens = {split: backbone.tokenize(getattr(pairs, split).captions) for split in ("dev", "test")}
    return Prepared(cfg, pairs, clean, noise, method, ctx, tokens, weights_digest(backbone.model), world, timing)


def start_or_resume(prep: Prepared, state: dict | None) -> dict:
    """The loop state: from the run's checkpoint ``state`` (models, optimisers, method, RNGs restored), or fresh
    with the zero-shot test metrics when there is none. Setup timings add up over every process that worked on
    the run."""
    if state is None:
        clock = time.perf_counter()
        zero_shot = prep.test_metrics(prep.ctx.models[:1])[0] if prep.world.is_main else None
        prep.timing["zero_shot_eval_s"] = time.perf_counter() - clock
        return {"epoch": 0, "history": [], "best": None, "zero_shot": zero_shot, "timing": dict(prep.timing),
                "resumes": 0}
    ctx = prep.ctx
    for model, saved in zip(ctx.models, state["models"]):
        model.load_state_dict(saved)
    for optimizer, saved in zip(ctx.optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    prep.method.load_state_dict(state["method"])
    ctx.rng.bit_generator.state = state["rng"]
    torch.set_rng_state(state["torch_rng"])
    state["resumes"] = state.get("resumes", 0) + 1
    state["timing"] = {k: state.get("timing", {}).get(k, 0.0) + prep.timing.get(k, 0.0)
                       for k in {*state.get("timing", {}), *prep.timing}}
    return state


def train_epoch(prep: Prepared, epoch: int, tracker: tracking.Tracker, steps_before: int) -> dict:
    """One epoch: the method's epoch hook and batches, a harness step per batch; the epoch's log entry. The
    tracker gets the running loss and the lr every ``PROGRESS_EVERY`` steps (``steps_before``: earlier epochs)."""
    cfg, method, ctx = prep.cfg, prep.method, prep.ctx
    clock = time.perf_counter()
    method.on_epoch_start(epoch)
    batches = list(method.epoch_batches(epoch))
    warmup = cfg.warmup_steps / max(cfg.epochs * (len(ctx.train) // cfg.batch_size), 1)
    sums: dict[str, dict[str, torch.Tensor | float]] = {"losses": {}, "report": {}}
    with progress_bar(f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", len(batches)) as advance:
        for i, index in enumerate(batches):
            lr = cfg.lr * warmup_cosine((epoch + i / len(batches)) / cfg.epochs, warmup)
            out = train_step(method, make_batch(ctx.train, index, prep.world), lr, cfg.grad_clip)
            for kind, values in (("losses", _logged_losses(out)), ("report", out.report)):
                for key, value in values.items():
                    value = value.detach().double() if isinstance(value, torch.Tensor) else value
                    sums[kind][key] = sums[kind].get(key, 0.0) + value
            if (i + 1) % PROGRESS_EVERY == 0 or i + 1 == len(batches):
                loss = float(sums["losses"]["loss"]) / (i + 1)
                tracker.step(steps_before + i + 1, {"loss": loss, "lr": lr})
                advance(loss=loss)
            else:
                advance()
    steps = max(len(batches), 1)
    return {"epoch": epoch + 1, "steps": len(batches), "train_s": round(time.perf_counter() - clock, 2),
            **{kind: {k: float(v) / steps for k, v in values.items()} for kind, values in sums.items()}}


def make_batch(train: TrainSet, index: BatchIndex, world: distributed.World) -> StepBatch:
    """The step's model inputs: this process's slice of the batch, or of each named batch."""
    if isinstance(index, np.ndarray):
        return train.batch(distributed.shard(index, world))
    return {name: train.batch(distributed.shard(part, world)) for name, part in index.items()}


def train_step(method: Method, batch: StepBatch, lr: float, grad_clip: float) -> StepOutput:
    """One optimisation step of ``method.ctx.models``: set ``lr``, zero the gradients, run the method's step under
    autocast, back-propagate the sum of its losses unless the method ``computes_gradients``, clip each model to
    ``grad_clip`` (0: off), step its AdamW, then the method's ``on_step_end``."""
    ctx = method.ctx
    ctx.current_lr = lr
    for optimizer in ctx.optimizers:
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
    with ctx.autocast():
        out = StepOutput.of(method.training_step(batch))
    if not method.computes_gradients:
        out.total().backward()
    for model, optimizer in zip(ctx.models, ctx.optimizers):
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    method.on_step_end()
    return out


def _logged_losses(out: StepOutput) -> dict[str, torch.Tensor]:
    """The step's losses as logged: each named term and their sum as ``"loss"``."""
    if "loss" in out.losses and len(out.losses) > 1:
        raise ValueError("training_step: the loss name 'loss' is the harness's total; name the terms otherwise")
    return {**out.losses, "loss": out.total()}


def end_epoch(prep: Prepared, state: dict, entry: dict) -> None:
    """Detection metrics of the method's clean scores, dev metrics, model selection; appended to ``state``."""
    method, cfg = prep.method, prep.cfg
    scores = method.clean_scores()
    if scores is not None and prep.pairs.has_clean_mask:
        entry["detection"] = evaluate.detection_metrics(np.asarray(scores), prep.noise.clean, method.clean_threshold())
    clock = time.perf_counter()
    entry["dev"] = prep.dev_metrics(method.eval_models())
    entry["eval_s"] = round(time.perf_counter() - clock, 2)
    state["history"].append(entry)
    if cfg.selection == "last" or state["best"] is None or entry["dev"]["rsum"] >= state["best"]["dev_rsum"]:
        state["best"] = {"epoch": entry["epoch"], "dev_rsum": entry["dev"]["rsum"],
                         "models": [_cpu_state(m) for m in method.eval_models()]}
    state["epoch"] = entry["epoch"]
    elapsed = sum(e["train_s"] + e["eval_s"] for e in state["history"])
    plain_line(f"{cfg.method} epoch {entry['epoch']}/{cfg.epochs}: train loss {entry['losses'].get('loss', math.nan):.4f}, "
               f"dev rSum {entry['dev']['rsum']:.1f}, {entry['train_s'] + entry['eval_s']:.0f} s (elapsed {elapsed:.0f} s)")


def finish(prep: Prepared, state: dict, run_dir: Path, keep_model: bool = False) -> dict:
    """Test the selected models, write the per-query ranks (and the models when ``keep_model``), then the record
    (atomically, last)."""
    cfg, method, pairs, noise, world = prep.cfg, prep.method, prep.pairs, prep.noise, prep.world
    clock = time.perf_counter()
    eval_models = method.eval_models()
    for model, saved in zip(eval_models, state["best"]["models"]):
        model.load_state_dict(saved)
    test, ranks = prep.test_metrics(eval_models)
    timing = {**state["timing"], "test_eval_s": time.perf_counter() - clock,
              "train_s": sum(e["train_s"] for e in state["history"]),
              "dev_eval_s": sum(e["eval_s"] for e in state["history"])}
    method_cls = type(method)
    record = RunRecord(
        run_id=cfg.run_id,
        config=cfg.identity(),
        method={"name": method_cls.name, "version": method_cls.version, "uses_clean_subset": method_cls.uses_clean_subset,
                "num_models": method_cls.num_models, "evaluated_models": len(eval_models),
                "clean_subset_pairs": prep.clean.n_captions if prep.clean else 0,
                "clean_subset_images": prep.clean.n_images if prep.clean else 0},
        dataset={"name": pairs.name, "train_pairs": len(prep.ctx.train), "test_protocols": list(pairs.test_protocols),
                 "has_clean_mask": pairs.has_clean_mask, "meta": pairs.meta},
        noise={"protocol": noise.protocol, "ratio": noise.ratio, "realised_ratio": noise.realised_ratio,
               "digest": noise.digest},
        selection={"rule": cfg.selection, "epoch": state["best"]["epoch"]},
        distributed={"world_size": world.size, "backend": world.backend, "global_batch": cfg.batch_size,
                     "batch_per_process": cfg.batch_size // world.size},
        zero_shot=state["zero_shot"],
        test=test,
        epochs=state["history"],
        timing={k: round(v, 2) for k, v in timing.items()},
        resumes=state["resumes"],
        weights_sha256=prep.weights,
        peak_memory_mb=_peak_memory_mb(prep.ctx.device),
        environment=environment(),
        ranks_file=write_ranks(run_dir, ranks),
        model_file=export.save_run_model(run_dir, eval_models, cfg.model) if keep_model else None,
    ).to_dict()
    write_json_atomic(run_dir / RECORD, record)
    return record


CLEAN_SUBSET_BOUNDS = (1_000, 10_000)  # docs/methods/mscn.md#meta-data: clean pairs, before the 10 % cap below
CLEAN_SUBSET_MAX_SHARE = 0.1  # the lower bound never takes more than this share of a small training split


def clean_subset_size(n_pairs: int, fraction: float) -> int:
    """Clean pairs to carve: ``fraction`` of the training pairs clipped to [1,000, 10,000] (docs/methods/mscn.md#meta-data),
    the lower bound capped at 10 % of the pairs so that a small split (synthetic-mini) keeps most of its data."""
    low, high = CLEAN_SUBSET_BOUNDS
    return int(min(max(round(fraction * n_pairs), min(low, int(CLEAN_SUBSET_MAX_SHARE * n_pairs))), high))


def carve_clean_subset(pairs: Pairs, fraction: float, seed: int) -> tuple[Pairs, Split | None]:
    """Move whole training images, with all their captions, out of ``pairs.train`` into a clean split (docs/methods/mscn.md#meta-data).

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


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_checkpoint(path: Path, state: dict, prep: Prepared) -> None:
    ctx = prep.ctx
    checkpoint.save(path, {**state, "models": [_cpu_state(m) for m in ctx.models],
                           "optimizers": [o.state_dict() for o in ctx.optimizers], "method": prep.method.state_dict(),
                           "rng": ctx.rng.bit_generator.state, "torch_rng": torch.get_rng_state()})


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
