"""The experiment registry: every module of this package that declares ``TABLE`` is an experiment
(the contract is in :mod:`bagnet.experiments.base`), found by scanning the package, so adding one
is adding its module. Modules of other packages join with :meth:`ExperimentRegistry.register`
(a dotted import path, importable wherever the experiment runs).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from types import ModuleType

from bagnet.experiments.base import (
    REQUIRED_ATTRIBUTES, CustomSection, ExperimentContext, Summary, forward_in_chunks,
)


class UnknownExperiment(KeyError):
    """A name that is not a registered experiment."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class ExperimentUnavailable(ImportError):
    """A module that does not follow the experiment contract."""


def check_contract(module: ModuleType) -> ModuleType:
    """``module`` if it declares every attribute of the contract, else :class:`ExperimentUnavailable`."""
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(module, a)]
    if missing:
        raise ExperimentUnavailable(
            f"experiment module {module.__name__} lacks {', '.join(missing)} (see bagnet/experiments/base.py)")
    return module


class ExperimentRegistry(Mapping[str, ModuleType]):
    """``EXPERIMENTS[name]`` is the module of experiment ``name``; iteration gives the names, the
    built-in ones in package order (``predictions`` first), then the registered ones."""

    def __init__(self, package: str = __name__) -> None:
        self.package = package
        self._modules: dict[str, ModuleType] | None = None

    def _scan(self) -> dict[str, ModuleType]:
        if self._modules is None:
            found: dict[str, ModuleType] = {}
            path = importlib.import_module(self.package).__path__
            for info in sorted(pkgutil.iter_modules(path), key=lambda i: (i.name != "predictions", i.name)):
                module = importlib.import_module(f"{self.package}.{info.name}")
                if hasattr(module, "TABLE"):
                    found[info.name] = check_contract(module)
            self._modules = found
        return self._modules

    def register(self, dotted: str) -> ModuleType:
        """Add the experiment module at import path ``dotted`` under its last name component."""
        module = check_contract(importlib.import_module(dotted))
        name = dotted.rsplit(".", 1)[-1]
        modules = self._scan()
        if name in modules and modules[name] is not module:
            raise ValueError(f"experiment {name!r} is already registered by {modules[name].__name__}")
        modules[name] = module
        return module

    def unregister(self, name: str) -> None:
        self._scan().pop(name, None)

    def __getitem__(self, name: str) -> ModuleType:
        modules = self._scan()
        if name not in modules:
            raise UnknownExperiment(f"unknown experiment {name!r}; known: {', '.join(modules)}")
        return modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._scan()))

    def __len__(self) -> int:
        return len(self._scan())

    def tables(self) -> dict[str, str]:
        """``{experiment name: table name}``."""
        return {name: module.TABLE for name, module in self._scan().items()}


EXPERIMENTS = ExperimentRegistry()

__all__ = [
    "EXPERIMENTS", "ExperimentRegistry", "ExperimentUnavailable", "UnknownExperiment", "check_contract",
    "ExperimentContext", "Summary", "CustomSection", "forward_in_chunks",
]
