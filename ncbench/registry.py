"""Methods, datasets and noise protocols, found through the entry-point groups ``ncbench.methods``,
``ncbench.datasets`` and ``ncbench.noises``.

ncbench's built-ins are registered in its own ``pyproject.toml`` exactly like third-party plugins.
Code that is not installed comes in as ``package.module:ClassName`` or as a file::

    METHODS.get("clip")                        # a registered name: imports its module now
    METHODS.get("my_pkg.losses:MyMethod")      # any importable class; then known by its ``name``
    load_plugin_file(Path("my_method.py"))     # registers the Method/Dataset subclasses the file defines
    METHODS.entries()                          # name -> Entry (origin, target); imports nothing

Loading is lazy: entries come from entry-point metadata, and a plugin's module is imported only when
its name is asked for, so a broken plugin breaks only what uses it. On a name clash the built-in wins
and the other is ignored with a :class:`PluginWarning`; code given on the command line wins over an
installed plugin; two installed plugins with one name make that name an error.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import re
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from ncbench.data import Dataset, set_layout_matcher
from ncbench.errors import UserError
from ncbench.method import Method
from ncbench.seeding import stable_hash

T = TypeVar("T")
BUILTIN_DISTRIBUTION = "ncbench"
PARAM_TYPES = (bool, int, float, str)  # what Method.make_params converts ``--param`` strings to


class RegistryError(UserError):
    """An unknown or broken plugin; the message is one line for the user."""


class PluginWarning(UserWarning):
    """A plugin ignored because another of the same name wins."""


@dataclass(frozen=True)
class Entry:
    """One registered name, known without importing it."""

    name: str
    origin: str  # "built-in", "<distribution> <version>", "file <path>" or "module <module:attr>"
    target: str  # where the code is: "module:attr" or "<path>:<class>"
    load: Callable[[], Any]
    problem: str | None = None  # set when the name cannot be used whatever the code does

    @property
    def builtin(self) -> bool:
        return self.origin == "built-in"

    @property
    def local(self) -> bool:
        return self.origin.startswith(("file ", "module "))

    def label(self, kind: str) -> str:
        """How messages name this plugin: its name and where its code is."""
        if self.origin.startswith("module "):
            return f"{kind} {self.target}"
        return f"{kind} {self.name!r} ({'file' if self.local else self.origin + ','} {self.target})"


class Registry(Generic[T]):
    """One kind of plugin: an entry-point group and a check of what its members must be."""

    def __init__(self, kind: str, group: str, check: Callable[[Any, str | None], str | None]):
        self.kind, self.group, self.check = kind, group, check
        self._local: dict[str, Entry] = {}  # registered in this process: --plugin files and module:Class

    def entries(self) -> dict[str, Entry]:
        """Every usable name and where it comes from, clashes resolved (see the module docstring)."""
        found: dict[str, Entry] = {}
        for ep in entry_points(group=self.group):
            self._add(found, Entry(ep.name, _distribution(ep), ep.value, ep.load))
        for entry in self._local.values():
            self._add(found, entry)
        return found

    def names(self) -> list[str]:
        return sorted(self.entries())

    def get(self, name: str) -> T:
        """The member named ``name``: a registered name or ``module:attr``, checked."""
        if ":" in name:
            return self._get_target(name)
        entries = self.entries()
        if name not in entries:
            close = difflib.get_close_matches(name, entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RegistryError(f"unknown {self.kind} {name!r}{hint}; available: {', '.join(sorted(entries)) or 'none'}")
        return self.load(entries[name])

    def load(self, entry: Entry) -> T:
        """Import ``entry`` and check it; a one-line :class:`RegistryError` naming the plugin and the problem
        if it is broken."""
        problem = entry.problem
        if problem is None:
            try:
                obj = entry.load()
            except Exception as err:  # a plugin's import may fail in any way; report it in one line
                problem = f"failed to load: {type(err).__name__}: {err}"
            else:
                problem = self.check(obj, None if entry.origin.startswith("module ") else entry.name)
        if problem is not None:
            raise RegistryError(" ".join(f"{entry.label(self.kind)}: {problem}".split()))
        return obj

    def register(self, name: str, obj: Any, origin: str, target: str) -> None:
        """Make ``obj`` (already imported) known as ``name`` in this process."""
        previous = self._local.get(name)
        if previous is not None and previous.target != target:
            raise UserError(f"{origin}: {self.kind} {name!r} is also defined by {previous.origin} ({previous.target})")
        self._local[name] = Entry(name, origin, target, lambda: obj)

    def _get_target(self, target: str) -> T:
        """``module:attr``: import, check, and register under the member's own name for this process."""
        module, _, attr = target.partition(":")
        entry = Entry(target, f"module {target}", target, lambda: getattr(importlib.import_module(module), attr))
        obj = self.load(entry)
        name = getattr(obj, "name", attr)
        existing = self.entries().get(name)
        if existing is None or existing.target != target:
            if existing is not None and existing.builtin:
                raise RegistryError(f"{entry.label(self.kind)}: its name {name!r} is taken by the built-in "
                                    f"{self.kind} ({existing.target}); give it another name")
            self.register(name, obj, entry.origin, target)
        return obj

    def _add(self, found: dict[str, Entry], entry: Entry) -> None:
        old = found.get(entry.name)
        if old is None:
            found[entry.name] = entry
            return
        if old.target == entry.target:
            return
        if old.builtin or entry.builtin or old.local or entry.local:
            rank = lambda e: (e.builtin, e.local)  # noqa: E731 - built-in beats local beats installed
            win, lose = (old, entry) if rank(old) >= rank(entry) else (entry, old)
            found[entry.name] = win
            warnings.warn(f"{lose.label(self.kind)} is ignored: {win.label(self.kind)} wins", PluginWarning)
            return
        found[entry.name] = Entry(entry.name, f"{old.origin} and {entry.origin}", f"{old.target} and {entry.target}",
                                  old.load, problem="registered by two installed distributions; uninstall one")


def _distribution(ep: EntryPoint) -> str:
    dist = ep.dist
    if dist is None:
        return "unknown distribution"
    if re.sub(r"[-_.]+", "-", dist.name).lower() == BUILTIN_DISTRIBUTION:
        return "built-in"
    return f"{dist.name} {dist.version}"


def _class_problem(obj: Any, name: str | None, base: type, hook: str) -> str | None:
    """Why ``obj`` is not a usable subclass of ``base`` registered as ``name``, or None."""
    if not (isinstance(obj, type) and issubclass(obj, base)):
        return f"is not a subclass of {base.__module__}.{base.__qualname__}"
    own_name = getattr(obj, "name", None)
    if not (isinstance(own_name, str) and own_name):
        return f"{obj.__qualname__} has no name (set the class attribute name = '...')"
    if name is not None and own_name != name:
        return f"is registered as {name!r} but {obj.__qualname__}.name is {own_name!r}"
    if getattr(obj, hook) is getattr(base, hook):
        return f"{obj.__qualname__} does not override the required hook {hook}()"
    return None


def method_problem(cls: Any, name: str | None) -> str | None:
    """Why ``cls`` cannot run as a method: base class, name, training_step, hyper-parameters."""
    problem = _class_problem(cls, name, Method, "training_step")
    if problem is not None:
        return problem
    params = cls.Params
    if not (isinstance(params, type) and dataclasses.is_dataclass(params) and params.__dataclass_params__.frozen):
        return f"{cls.__qualname__}.Params must be a frozen dataclass (@dataclass(frozen=True))"
    try:
        defaults = params()
    except TypeError as err:
        return f"{cls.__qualname__}.Params needs a default for every hyper-parameter ({err})"
    except Exception as err:  # a __post_init__ may refuse its own defaults
        return f"{cls.__qualname__}.Params() fails with its defaults: {type(err).__name__}: {err}"
    for field in dataclasses.fields(params):
        value = getattr(defaults, field.name)
        if type(value) not in PARAM_TYPES:
            return (f"hyper-parameter {field.name}={value!r} is a {type(value).__name__}; "
                    f"expected {', '.join(t.__name__ for t in PARAM_TYPES)}")
    return None


def dataset_problem(cls: Any, name: str | None) -> str | None:
    """Why ``cls`` cannot serve as a dataset adapter."""
    return _class_problem(cls, name, Dataset, "load")


def noise_problem(fn: Any, name: str | None) -> str | None:
    """Why ``fn`` cannot serve as a noise protocol: ``(caption_image, ratio, seed, context) -> NoisyPairing``
    (see :mod:`ncbench.noise`)."""
    if not callable(fn):
        return f"is not callable (got {type(fn).__name__} {fn!r})"
    try:
        inspect.signature(fn).bind(None, None, None, None)
    except TypeError:
        return f"{fn.__qualname__}{inspect.signature(fn)} does not take (caption_image, ratio, seed, context)"
    except ValueError:  # no signature to read (a builtin): trust it
        pass
    return None


METHODS: Registry[type[Method]] = Registry("method", "ncbench.methods", method_problem)
DATASETS: Registry[type[Dataset]] = Registry("dataset", "ncbench.datasets", dataset_problem)
NOISES: Registry[Callable] = Registry("noise protocol", "ncbench.noises", noise_problem)
REGISTRIES = {"methods": METHODS, "datasets": DATASETS, "noises": NOISES}


def matching_layouts(root: Path) -> list[str]:
    """The registered datasets whose layout ``root`` holds (one of their ``markers``); broken plugins are skipped."""
    matches = []
    for name in DATASETS.names():
        try:
            cls = DATASETS.get(name)
        except UserError:  # a broken plugin is not a candidate
            continue
        if cls.markers and any((root / m).exists() for m in cls.markers):
            matches.append(name)
    return matches


set_layout_matcher(matching_layouts)  # Dataset.check_run names them when --data-root is another layout


def load_plugin_file(path: Path) -> list[str]:
    """Import the Python file ``path`` and register, for this process, each Method and Dataset subclass it
    defines with its own ``name``; returns their names. A ``--plugin`` error is one :class:`UserError` line."""
    path = Path(path)
    if path.suffix != ".py" or not path.is_file():
        raise UserError(f"--plugin {path}: expected a Python file (.py)")
    module_name = f"_ncbench_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{stable_hash(str(path.resolve()), length=8)}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the file runs
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # the file may fail in any way; report it in one line
            del sys.modules[module_name]
            raise UserError(" ".join(f"--plugin {path}: failed to import: {type(err).__name__}: {err}".split())) from None
    names = []
    for obj in vars(module).values():
        if isinstance(obj, type) and obj.__module__ == module_name and "name" in vars(obj):
            for registry, base in ((METHODS, Method), (DATASETS, Dataset)):
                if issubclass(obj, base):
                    registry.register(obj.name, obj, f"file {path}", f"{path}:{obj.__qualname__}")
                    names.append(obj.name)
    if not names:
        raise UserError(f"--plugin {path}: defines no Method or Dataset subclass with a name")
    return names
