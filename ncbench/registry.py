"""Methods and datasets found through entry points (``ncbench.methods``, ``ncbench.datasets``).

The built-ins are registered in ncbench's own ``pyproject.toml`` exactly like third-party plugins.
A name may also be ``package.module:ClassName``. Loading is lazy: listing names imports nothing.
"""
from __future__ import annotations

import difflib
import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from ncbench.data import Dataset
from ncbench.errors import UserError
from ncbench.method import Method

T = TypeVar("T")


class RegistryError(UserError):
    """An unknown or broken plugin; the message is one line for the user."""


class Registry(Generic[T]):
    """One kind of plugin: an entry-point group and the base class its members must subclass."""

    def __init__(self, kind: str, group: str, base: type[T]):
        self.kind, self.group, self.base = kind, group, base

    def entry_points(self) -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group=self.group)}

    def names(self) -> list[str]:
        return sorted(self.entry_points())

    def get(self, name: str) -> type[T]:
        """The class named ``name`` (registered name or ``module:Class``)."""
        if ":" in name:
            module, _, attr = name.partition(":")
            return self._check(name, lambda: getattr(importlib.import_module(module), attr))
        eps = self.entry_points()
        if name not in eps:
            close = difflib.get_close_matches(name, eps, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RegistryError(f"unknown {self.kind} {name!r}{hint}; available: {', '.join(sorted(eps)) or 'none'}")
        return self._check(name, eps[name].load)

    def _check(self, name: str, load) -> type[T]:
        try:
            cls = load()
        except Exception as err:  # a plugin's import may fail in any way; report it in one line
            raise RegistryError(f"{self.kind} {name!r} failed to load: {type(err).__name__}: {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise RegistryError(f"{self.kind} {name!r} is not a subclass of {self.base.__module__}.{self.base.__name__}")
        return cls


METHODS: Registry[Method] = Registry("method", "ncbench.methods", Method)
DATASETS: Registry[Dataset] = Registry("dataset", "ncbench.datasets", Dataset)
