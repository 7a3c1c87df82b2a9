"""The experiments: one module per experiment, found by name in :data:`EXPERIMENTS`.

Each module ``bagnet/experiments/<name>.py`` exposes ``TABLE`` (result table name), a ``Params``
dataclass and ``run(model, images, labels, params, *, ctx) -> list[dict]`` (contract in
``docs/architecture.md``), and optionally ``helper_models(params) -> dict[str, str]`` naming the
zoo models it needs besides the evaluated one (``ctx.helper_models`` key -> model name) and
``applies_to(model_name) -> bool`` (default: every model), which the runner uses to leave out
models an experiment is not defined for (heatmaps need a BagNet).

Modules are imported on first use, so a missing or broken module only affects its own name.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator, Mapping
from types import ModuleType

from bagnet.experiments.base import ExperimentContext, forward_in_chunks

NAMES: tuple[str, ...] = ("predictions", "heatmaps", "shuffle", "interaction", "masking")
REQUIRED_ATTRIBUTES: tuple[str, ...] = ("TABLE", "Params", "run")


class UnknownExperiment(KeyError):
    """A name that is not one of :data:`NAMES`."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class ExperimentUnavailable(ImportError):
    """A registered experiment whose module is missing or does not follow the contract."""


class ExperimentRegistry(Mapping[str, ModuleType]):
    """``EXPERIMENTS[name]`` imports ``bagnet.experiments.<name>`` lazily and checks its contract."""

    def __init__(self, names: tuple[str, ...] = NAMES) -> None:
        self.names = names

    def __getitem__(self, name: str) -> ModuleType:
        if name not in self.names:
            raise UnknownExperiment(f"unknown experiment {name!r}; known: {', '.join(self.names)}")
        module_name = f"{__name__}.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            raise ExperimentUnavailable(
                f"experiment {name!r} is registered but its module bagnet/experiments/{name}.py "
                "does not exist") from None
        missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(module, a)]
        if missing:
            raise ExperimentUnavailable(
                f"bagnet/experiments/{name}.py lacks {', '.join(missing)} (see docs/architecture.md)")
        return module

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def available(self) -> list[str]:
        """Names whose module file exists (without importing them)."""
        return [n for n in self.names if importlib.util.find_spec(f"{__name__}.{n}") is not None]


EXPERIMENTS = ExperimentRegistry()

__all__ = [
    "EXPERIMENTS", "NAMES", "ExperimentRegistry", "ExperimentUnavailable", "UnknownExperiment",
    "ExperimentContext", "forward_in_chunks",
]
