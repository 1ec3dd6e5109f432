"""The resolved configuration of one run and its id.

Precedence: harness defaults < the method's ``run_defaults`` < a preset's values (ncbench/presets.py)
< explicit flags. The run id hashes the resolved, machine-independent config (no data path, no output
folder, not the preset's name).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field

from ncbench.errors import UserError
from ncbench.seeding import stable_hash

SELECTION_RULES = ("best-dev-rsum", "last")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # method, dataset and protocol names: safe in a run folder's name
DEFAULT_CLEAN_FRACTION = 0.02  # docs/methods/mscn.md#meta-data: the clean subset of methods that use one
PRECISIONS = ("auto", "bf16", "fp32")  # ncbench/device.py: autocast_for


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
    clean_fraction: float = 0.0  # training pairs carved out as a clean subset before noise (docs/methods/mscn.md#meta-data)
    selection: str = "best-dev-rsum"
    precision: str = "auto"  # autocast of training and evaluation: auto is bf16 on CUDA and full precision on the CPU
    preset: str | None = None  # the preset whose values were applied (recorded; not part of the id)
    data_root: str | None = field(default=None, compare=False)  # where the data lives: not part of the id

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise < 1.0:
            raise UserError(f"--noise must be in [0, 1), got {self.noise}")
        if self.selection not in SELECTION_RULES:
            raise UserError(f"--selection must be one of {', '.join(SELECTION_RULES)}, got {self.selection!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("method", "dataset", "noise_protocol"):
            if not NAME.fullmatch(getattr(self, name)):
                raise UserError(f"{name.replace('_', ' ')} name {getattr(self, name)!r}: expected letters, digits, "
                                "'.', '_' or '-' (it becomes part of a folder name)")
        for name in ("lr", "weight_decay", "grad_clip"):
            value, positive = getattr(self, name), name == "lr"
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise UserError(f"--{name.replace('_', '-')} {value}: expected a finite number "
                                f"{'> 0' if positive else '>= 0'}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.clean_fraction < 0.5:
            raise UserError(f"--clean-fraction must be in [0, 0.5), got {self.clean_fraction}")

    def named_fields(self) -> dict:
        """The config's own fields that name the run: no data path, and no field at the value it had before the field
        existed (a clean fraction of 0, precision auto), so earlier runs keep their ids."""
        fields = {k: v for k, v in asdict(self).items() if k != "data_root"}
        for name, before in (("clean_fraction", 0.0), ("precision", "auto")):
            if fields[name] == before:
                del fields[name]
        return fields

    def identity(self) -> dict:
        """The fields that name the run, plus a digest of the model's architecture config (the built-in tiny
        configs can change between versions) and the pretraining recipe of embedded weights."""
        from ncbench.architecture import config_digest
        from ncbench.recipe import current_spec

        fields = self.named_fields()
        fields["architecture"] = stable_hash(config_digest(self.model), length=10)
        if self.pretrained == "embedded":
            fields["pretrain"] = asdict(current_spec())
        return fields

    @property
    def run_id(self) -> str:
        named = {k: v for k, v in self.identity().items() if k != "preset"}
        return f"{self.method}_{self.dataset}_n{self.noise:g}_s{self.seed}_{stable_hash(named, length=10)}"


@dataclass(frozen=True)
class RunOptions:
    """How a run is watched and what it keeps; never part of the run id (the numbers do not depend on them)."""

    log: str | None = None  # tracker of losses and metrics: tensorboard, mlflow or None (ncbench/tracking.py)
    keep_model: bool = False  # keep the selected model beside the record, for `ncbench export`

    def argv(self) -> list[str]:
        """These options as `ncbench run` flags."""
        return (["--log", self.log] if self.log else []) + (["--keep-model"] if self.keep_model else [])


HARNESS_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in ("method", "params", "method_version"))


def resolve(method_cls, flags: dict, param_overrides: dict[str, str] | None = None) -> RunConfig:
    """Build the config of ``method_cls`` from explicit ``flags`` (unset ones are ``None``; ``preset`` names a
    preset) and ``--param``s."""
    unknown = set(flags) - set(HARNESS_FIELDS)
    if unknown:
        raise UserError(f"unknown run settings: {', '.join(sorted(unknown))}")
    clean_default = DEFAULT_CLEAN_FRACTION if getattr(method_cls, "uses_clean_subset", False) else 0.0
    values = {"clean_fraction": clean_default, **getattr(method_cls, "run_defaults", {})}
    if flags.get("preset"):
        from ncbench.presets import preset_values

        values.update(preset_values(flags["preset"], method_cls.name, flags.get("dataset") or RunConfig.dataset))
    values.update({k: v for k, v in flags.items() if v is not None})
    check_clean_fraction(method_cls, values["clean_fraction"])
    params = method_cls.make_params(param_overrides or {})
    return RunConfig(method=method_cls.name, params=asdict(params), method_version=method_cls.version, **values)


def check_clean_fraction(method_cls, fraction: float) -> None:
    """A clean subset is carved exactly for the methods that declare ``uses_clean_subset`` (docs/methods/mscn.md#meta-data)."""
    uses_clean = getattr(method_cls, "uses_clean_subset", False)
    if (fraction > 0) != uses_clean:
        raise UserError(f"--clean-fraction {fraction:g}: method {method_cls.name} "
                        + ("needs a clean subset (> 0)" if uses_clean else "does not use a clean subset (0 only)"))
