"""The method contract: what a noisy-correspondence method implements and what the harness gives it.

The harness owns data, loops, optimisers of the trained models, evaluation and files. A method owns its math:
it receives a :class:`Context` in :meth:`Method.setup`, may choose which pairs an epoch visits (one batch per
step, or named batches such as one per model), returns its losses from :meth:`Method.training_step` (the
harness back-propagates their sum, clips and steps), and may score each training pair's chance of being clean.
docs/writing-a-method.md walks through it.
"""
from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Union

import numpy as np
import torch
from torch import Tensor, nn

from ncbench.data import ImageNormalizer
from ncbench.errors import UserError
from ncbench.evaluate import embed
from ncbench.losses import pair_logits, per_pair_infonce
from ncbench.optim import ADAM_EPS, adamw
from ncbench.seeding import derive_seed


@dataclass(frozen=True)
class NoParams:
    """Hyper-parameters of a method that has none."""


@dataclass
class Batch:
    """Training pairs ``index`` (rows of the noisy training set) as model inputs on the device."""

    index: Tensor  # int64 (B,), on the CPU
    images: Tensor  # float (B, 3, S, S)
    tokens: Tensor  # int64 (B, context)


class TrainSet:
    """The noisy training set (or the clean subset), indexable by pair: pair ``p`` is
    (image ``pair_image[p]``, caption ``p``)."""

    def __init__(self, images: np.ndarray, tokens: Tensor, pair_image: np.ndarray, normalize: ImageNormalizer):
        self.images, self.tokens, self.pair_image, self.normalize = images, tokens, pair_image, normalize

    def __len__(self) -> int:
        return len(self.pair_image)

    def batch(self, index: np.ndarray | Tensor) -> Batch:
        index = torch.as_tensor(index, dtype=torch.long)
        image_rows = self.pair_image[index.numpy()]
        unique, inverse = np.unique(image_rows, return_inverse=True)
        images = self.normalize(self.images[unique])[torch.from_numpy(inverse).to(self.normalize.device)]
        return Batch(index, images, self.tokens[index].to(self.normalize.device))


@dataclass
class StepOutput:
    """What :meth:`Method.training_step` returns: losses, whose sum the harness back-propagates, apart from
    values that are only logged (weights, counts, accuracies)."""

    losses: dict[str, Tensor]
    report: dict[str, Tensor | float] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, value: Union[Tensor, "StepOutput"]) -> "StepOutput":
        """A bare loss tensor is the single loss ``"loss"``."""
        return value if isinstance(value, StepOutput) else cls({"loss": value})

    def total(self) -> Tensor:
        """The sum of the losses."""
        return sum(self.losses.values())


BatchIndex = Union[np.ndarray, Mapping[str, np.ndarray]]  # what epoch_batches yields per step
StepBatch = Union[Batch, dict[str, Batch]]  # what training_step receives


@dataclass
class Context:
    """What the harness hands a method in :meth:`Method.setup`. Build one with :meth:`Context.create`."""

    models: list[nn.Module]  # ``num_models`` fresh copies of the pretrained backbone, trained by the harness
    train: TrainSet  # the noisy training set
    clean_subset: TrainSet | None  # clean pairs kept out of ``train`` before noise; only for ``uses_clean_subset``
    device: torch.device
    autocast: Callable[[], AbstractContextManager]
    rng: np.random.Generator  # the method's own stream, derived from the run seed
    seed: int
    epochs: int
    batch_size: int
    lr: float  # the peak learning rate of the schedule
    weight_decay: float
    optimizers: list[torch.optim.Optimizer]  # harness-owned AdamW of each model; methods use the helpers below
    current_lr: float = 0.0  # the scheduled learning rate of the current step (set by the harness before it)
    adam_eps: float = ADAM_EPS  # the eps of every AdamW the harness makes

    @classmethod
    def create(cls, models: list[nn.Module], train: TrainSet, *, seed: int, epochs: int, batch_size: int, lr: float,
               weight_decay: float, clean_subset: TrainSet | None = None, device: torch.device | None = None,
               autocast: Callable[[], AbstractContextManager] = nullcontext) -> "Context":
        """A context with one harness AdamW per model and the method RNG derived from ``seed``."""
        return cls(models=models, train=train, clean_subset=clean_subset, device=device or torch.device("cpu"),
                   autocast=autocast, rng=np.random.default_rng(derive_seed("method", seed)), seed=seed,
                   epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                   optimizers=[adamw(m.parameters(), lr, weight_decay) for m in models], current_lr=lr)

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The harness's AdamW (same betas, eps and weight decay), for a method's auxiliary parameters."""
        return adamw(params, self.lr, self.weight_decay)

    def second_moment(self, param: Tensor) -> Tensor | None:
        """The bias-corrected second moment v̂ that the harness's AdamW holds for ``param`` (detached), or None
        before its first step."""
        for optimizer in self.optimizers:
            state = optimizer.state.get(param)
            if state:
                beta2 = optimizer.param_groups[0]["betas"][1]
                return state["exp_avg_sq"].detach() / (1 - beta2 ** float(state["step"]))
        return None

    def encode(self, model: nn.Module, pairs: TrainSet, unit: bool = True) -> tuple[Tensor, Tensor]:
        """Embeddings of every image of ``pairs`` (once each) and every caption, in eval mode; L2-normalised
        unless ``unit`` is False."""
        return embed([model], pairs.images, pairs.tokens, pairs.normalize, self.autocast, unit=unit)

    def encode_train(self, model: nn.Module, unit: bool = True) -> tuple[Tensor, Tensor]:
        """:meth:`encode` of the training set."""
        return self.encode(model, self.train, unit)

    @torch.no_grad()
    def per_pair_loss(self, model: nn.Module, batch_size: int | None = None, seed: int = 0,
                      embeddings: tuple[Tensor, Tensor] | None = None) -> np.ndarray:
        """Per-pair symmetric InfoNCE of every training pair inside seeded random batches (docs/methods/gmm-filter.md).

        Images and captions are encoded once (or ``embeddings``, the L2-normalised :meth:`encode_train` output, are
        used); the loss of pair ``p`` uses the in-batch negatives of the random batch ``p`` falls in, with the
        model's current logit scale.
        """
        img, txt = embeddings if embeddings is not None else self.encode_train(model)
        batch_size = batch_size or self.batch_size
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(self.train)))
        pair_image = torch.from_numpy(self.train.pair_image).to(self.device)
        loss = torch.empty(len(self.train), device=self.device)
        for chunk in order.split(batch_size):
            chunk = chunk.to(self.device)
            loss[chunk] = per_pair_infonce(pair_logits(img[pair_image[chunk]], txt[chunk], model.logit_scale.float()))
        return loss.cpu().numpy()


def shuffled_batches(rng: np.random.Generator, pairs: int | np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Batches of ``size`` from ``pairs`` (a count, or an array of pair indices), shuffled by ``rng``, last partial
    batch dropped."""
    order = rng.permutation(pairs)
    for i in range(len(order) // size):
        yield order[i * size:(i + 1) * size]


class Method:
    """Base class of every method. Subclasses set ``name`` and override the hooks they need."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"  # part of the run id: bump when the method's numbers change
    description: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams  # frozen dataclass of hyper-parameters with defaults
    uses_clean_subset: ClassVar[bool] = False
    num_models: ClassVar[int] = 1
    computes_gradients: ClassVar[bool] = False  # True: training_step fills .grad itself; the harness clips and steps
    run_defaults: ClassVar[dict] = {}  # harness settings this method changes by default, e.g. {"grad_clip": 10.0}
    # True: the method runs in several processes (torchrun): its models are DDP-wrapped, each process gets its
    # slice of every global batch, and its loss gathers features over them (ncbench.distributed.gather_features)
    supports_distributed: ClassVar[bool] = False

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()

    def setup(self, ctx: Context) -> None:
        """Called once before training, with the pretrained models."""
        self.ctx = ctx

    def on_epoch_start(self, epoch: int) -> None:
        """Per-epoch work: mixture fits, memory banks, purification."""

    def epoch_batches(self, epoch: int) -> Iterator[BatchIndex]:
        """Pair indices of each step's batch this epoch, or a mapping ``name -> pair indices`` when a step takes
        several batches (one per model, labeled and unlabeled, ...; an empty one may be left out). Default: every
        pair once, shuffled, last partial batch dropped."""
        return shuffled_batches(self.ctx.rng, len(self.ctx.train), self.ctx.batch_size)

    def training_step(self, batch: StepBatch) -> Tensor | StepOutput:
        """The step's loss, or a :class:`StepOutput` of named losses (the harness back-propagates their sum) and
        logged values. ``batch`` is a :class:`Batch`, or ``name -> Batch`` when :meth:`epoch_batches` yields
        mappings. A method that ``computes_gradients`` fills ``.grad`` itself and returns its losses detached."""
        raise NotImplementedError

    def on_step_end(self) -> None:
        """After every optimiser step (mean teachers, EMA weights, step counters)."""

    def clean_scores(self) -> np.ndarray | None:
        """Per training pair, the method's probability that the pair is clean (None if it has none)."""
        return None

    def clean_threshold(self) -> float:
        """The clean score above which a pair counts as kept in the detection metrics."""
        return 0.5

    def eval_models(self) -> list[nn.Module]:
        """The models whose averaged similarity is evaluated; default the first."""
        return self.ctx.models[:1]

    def state_dict(self) -> dict:
        """Method state beyond the trained models (arrays, auxiliary models), for resuming."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @classmethod
    def make_params(cls, overrides: dict[str, str]) -> Any:
        """Build ``Params`` from string overrides (``--param name=value``), converting to each field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        values = {}
        for key, raw in overrides.items():
            if key not in fields:
                raise UserError(f"--param {key}: unknown hyper-parameter of {cls.name}; "
                                 f"available: {', '.join(fields) or 'none'}")
            default = getattr(cls.Params(), key)
            values[key] = _convert(raw, type(default), key)
        return cls.Params(**values)


def _convert(raw: str, kind: type, key: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        return kind(raw)
    except ValueError:
        raise UserError(f"--param {key}={raw}: expected a {kind.__name__}") from None
