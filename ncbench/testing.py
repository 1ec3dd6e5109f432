"""A kit for testing methods: a tiny real open_clip model on a tiny synthetic training set, a :class:`Context`
built as the harness builds it, the harness's own step, and :func:`check_method`, the conformance check every
registered method passes. ncbench's tests and benchmarks use it; so can a plugin's own tests::

    from ncbench.testing import check_method
    def test_my_method_conforms(tmp_path):
        check_method(MyMethod, tmp_path)
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ncbench import checkpoint
from ncbench.backbone import load_backbone
from ncbench.data import ImageNormalizer, Pairs, Split
from ncbench.datasets.synthetic import generate
from ncbench.device import autocast_for
from ncbench.distributed import World
from ncbench.harness import carve_clean_subset, make_batch, train_step
from ncbench.method import BatchIndex, Context, Method, StepOutput, TrainSet


def tiny_context(method_cls: type[Method] | None = None, *, n_images: int = 30, noise: float = 0.3,
                 batch_size: int = 8, epochs: int = 2, seed: int = 0, lr: float = 5e-4, model: str = "ncbench-tiny",
                 pretrained: str = "none", cache_dir: Path | None = None, device: torch.device | None = None,
                 precision: str = "auto") -> Context:
    """A context over ``n_images`` synthetic images (5 captions each, rendered at the model's input size) whose pairs
    a share ``noise`` of captions re-paired to random other images, with ``method_cls.num_models`` copies of the
    open_clip ``model`` (random init unless ``pretrained``) on ``device`` (the CPU unless given) under
    ``precision``'s autocast, and a 10 % clean subset carved first when the method uses one."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    backbone = load_backbone(model, pretrained, cache_dir)
    split = _synthetic_split(n_images, seed, backbone.image_size)
    clean = None
    if method_cls is not None and method_cls.uses_clean_subset:
        pairs, clean = carve_clean_subset(Pairs("tiny", split, split, split), 0.1, seed)
        split = pairs.train
    normalize = ImageNormalizer(backbone.mean, backbone.std, backbone.image_size, device)
    pair_image = split.caption_image.copy()
    rng = np.random.default_rng(seed)
    noisy = rng.choice(len(pair_image), int(noise * len(pair_image)), replace=False)
    pair_image[noisy] = (pair_image[noisy] + rng.integers(1, split.n_images, len(noisy))) % split.n_images
    train = TrainSet(split.images, backbone.tokenize(split.captions), pair_image, normalize)
    clean_subset = None if clean is None else TrainSet(clean.images, backbone.tokenize(clean.captions),
                                                       clean.caption_image, normalize)
    num_models = method_cls.num_models if method_cls is not None else 1
    models = [copy.deepcopy(backbone.model).to(device).train() for _ in range(num_models)]
    return Context.create(models, train, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=0.1,
                          clean_subset=clean_subset, device=device, autocast=autocast_for(device, precision))


@functools.lru_cache(maxsize=4)
def _synthetic_split(n_images: int, seed: int, image_size: int) -> Split:
    """A tiny context's synthetic images and captions, rendered once per size and seed (contexts only read them)."""
    return generate("downstream", n_images, seed=seed, image_size=image_size)


def step(method: Method, index: BatchIndex, lr: float | None = None, grad_clip: float = 0.0) -> StepOutput:
    """One harness step of ``method`` on the batch (or named batches) ``index``, in this process."""
    ctx = method.ctx
    return train_step(method, make_batch(ctx.train, index, World()), ctx.lr if lr is None else lr, grad_clip)


def parameters(models: list[nn.Module]) -> list[torch.Tensor]:
    """Detached copies of every parameter of ``models``."""
    return [p.detach().clone() for m in models for p in m.parameters()]


def check_method(method_cls: type[Method], tmp_path: Path, params: object = None) -> None:
    """Assert that ``method_cls`` keeps the contract on a tiny problem.

    At its last epoch (past any warm-up): ``epoch_batches`` yields index arrays or ``name -> index`` mappings of
    valid pair indices; two harness steps give finite losses and change the trained parameters;
    ``clean_scores`` is None or one finite score per training pair; and after a checkpoint round trip through a
    real file (read with ``weights_only=True``) into a fresh method, one more step gives exactly the parameters
    of the uninterrupted run.
    """
    def fresh() -> Method:
        method = method_cls(params if params is not None else method_cls.Params())
        method.setup(tiny_context(method_cls))
        return method

    method = fresh()
    ctx = method.ctx
    epoch = ctx.epochs - 1
    method.on_epoch_start(epoch)
    batches = list(method.epoch_batches(epoch))
    assert len(batches) >= 3, f"{method_cls.name}: fewer than 3 batches on the tiny problem"
    for index in batches:
        parts = [index] if isinstance(index, np.ndarray) else list(index.values())
        assert parts and all(len(p) and 0 <= p.min() and p.max() < len(ctx.train) for p in parts), \
            f"{method_cls.name}: a batch holds no pairs or an index outside the training set"
    before = parameters(ctx.models)
    for index in batches[:2]:
        out = step(method, index)
        assert out.losses and all(torch.isfinite(v).all() for v in out.losses.values()), \
            f"{method_cls.name}: non-finite or missing losses {out.losses}"
    assert any(not torch.equal(a, b) for a, b in zip(before, parameters(ctx.models))), \
        f"{method_cls.name}: two steps left every trained parameter unchanged"
    scores = method.clean_scores()
    if scores is not None:
        scores = np.asarray(scores)
        assert scores.shape == (len(ctx.train),) and np.isfinite(scores).all(), \
            f"{method_cls.name}: clean_scores must give one finite score per training pair, got {scores.shape}"

    # as the harness resumes: a checkpoint at the end of an epoch, then the next epoch's hook and its first step
    path = tmp_path / f"{method_cls.name}.pt"
    checkpoint.save(path, {"models": [m.state_dict() for m in ctx.models],
                           "optimizers": [o.state_dict() for o in ctx.optimizers], "method": method.state_dict(),
                           "rng": ctx.rng.bit_generator.state, "torch_rng": torch.get_rng_state()})
    expected = _next_epoch_step(method, epoch)
    saved = checkpoint.load(path)
    resumed = fresh()
    for model, state in zip(resumed.ctx.models, saved["models"]):
        model.load_state_dict(state)
    for optimizer, state in zip(resumed.ctx.optimizers, saved["optimizers"]):
        optimizer.load_state_dict(state)
    resumed.load_state_dict(saved["method"])
    resumed.ctx.rng.bit_generator.state = saved["rng"]
    torch.set_rng_state(saved["torch_rng"])
    for a, b in zip(expected, _next_epoch_step(resumed, epoch)):
        torch.testing.assert_close(b, a, rtol=0, atol=0,
                                   msg=f"{method_cls.name}: a resumed step differs from the uninterrupted one")


def _next_epoch_step(method: Method, epoch: int) -> list[torch.Tensor]:
    """The epoch hook, the first of the epoch's batches, one step; the trained parameters after it."""
    method.on_epoch_start(epoch)
    step(method, next(iter(method.epoch_batches(epoch))))
    return parameters(method.ctx.models)
