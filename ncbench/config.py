"""The resolved configuration of one run and its id.

Precedence: harness defaults < the method's ``run_defaults`` < explicit flags. The run id hashes the
resolved, machine-independent config (no data path, no output folder).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from ncbench.errors import UserError
from ncbench.seeding import stable_hash

SELECTION_RULES = ("best-dev-rsum", "last")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's numbers."""

    method: str = "clip"
    params: dict = field(default_factory=dict)  # the method's resolved hyper-parameters
    method_version: str = "1"
    dataset: str = "synthetic"
    noise: float = 0.0
    noise_protocol: str = "caption-shuffle"
    seed: int = 0
    model: str = "ncbench-tiny"
    pretrained: str = "embedded"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 0.0  # max L2 norm of each trained model's gradient; 0 disables clipping
    selection: str = "best-dev-rsum"
    data_root: str | None = field(default=None, compare=False)  # where the data lives: not part of the id

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise < 1.0:
            raise UserError(f"--noise must be in [0, 1), got {self.noise}")
        if self.selection not in SELECTION_RULES:
            raise UserError(f"--selection must be one of {', '.join(SELECTION_RULES)}, got {self.selection!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def identity(self) -> dict:
        """The fields that name the run."""
        return {k: v for k, v in asdict(self).items() if k != "data_root"}

    @property
    def run_id(self) -> str:
        return f"{self.method}_{self.dataset}_n{self.noise:g}_s{self.seed}_{stable_hash(self.identity(), length=10)}"


HARNESS_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in ("method", "params", "method_version"))


def resolve(method_cls, flags: dict, param_overrides: dict[str, str] | None = None) -> RunConfig:
    """Build the config of ``method_cls`` from explicit ``flags`` (unset ones are ``None``) and ``--param``s."""
    unknown = set(flags) - set(HARNESS_FIELDS)
    if unknown:
        raise UserError(f"unknown run settings: {', '.join(sorted(unknown))}")
    values = dict(getattr(method_cls, "run_defaults", {}))
    values.update({k: v for k, v in flags.items() if v is not None})
    params = method_cls.make_params(param_overrides or {})
    return RunConfig(method=method_cls.name, params=asdict(params), method_version=method_cls.version, **values)
