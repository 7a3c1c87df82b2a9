"""The experiment contract: what a module ``bagnet/experiments/<name>.py`` declares, and the
context its ``run`` receives.

An experiment module defines, and nothing else needs editing to add one:

- ``TABLE: str``: the result table its rows go to (usually its own name);
- ``Params``: a dataclass of typed parameters (``validate()`` names a bad key);
- ``SCHEMA: pyarrow.Schema``: its own columns, in order, besides the common columns of
  ``store.results.COMMON_SCHEMA`` (``image_id`` and ``label`` are common); the writer refuses
  rows with a missing, extra or wrongly typed column, naming the column and the experiment;
- ``REPORT``: what the report shows, a :class:`Summary` (a generic section: a figure and tables
  of per-model means against one column) or a :class:`CustomSection` naming a section function
  of ``analysis.sections``;
- ``run(model, images, labels, params, *, ctx) -> list[dict]``: one dict per row, with the own
  columns plus ``image_id`` and ``label``;
- optionally ``applies_to(model_name) -> bool`` (default: every model),
  ``helper_models(params) -> dict[str, str]`` (zoo models it needs besides the evaluated one, by
  ``ctx.helper_models`` key) and ``DATASETS: tuple[str, ...]`` (the ``data.dataset`` values it is
  defined for, default all; e.g. ``("synthetic",)`` for experiments that need ``ctx.world``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bagnet.synthetic import SyntheticWorld

REQUIRED_ATTRIBUTES: tuple[str, ...] = ("TABLE", "Params", "SCHEMA", "REPORT", "run")


@dataclass
class ExperimentContext:
    image_ids: list[str]
    model_name: str
    q: int | None = None  # patch size of a BagNet, None for unconstrained CNNs
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    helper_models: dict[str, nn.Module] = field(default_factory=dict)
    batch_size: int = 64  # largest forward batch for perturbed variants
    world: SyntheticWorld | None = None  # the synthetic world the images come from; None for other data


@dataclass(frozen=True)
class Summary:
    """A generic report section: the mean of each ``values`` column per (``style``, model, ``x``),
    drawn as one line per model (and line style per ``style`` value) in one panel per value, and
    one table per value with ``x`` across. A value written ``"|col|"`` is the mean of ``abs(col)``.
    ``mark_q`` draws a dotted line at q - 1 for each BagNet (for distances in px: from there on a
    BagNet-q's interactions are exactly zero); ``log2_x`` draws ``x`` on a log2 axis (powers of two)."""

    title: str
    x: str
    x_label: str
    values: dict[str, str]  # column (or "|column|") -> axis and table label
    style: str | None = None
    caption: str = ""
    mark_q: bool = False
    log2_x: bool = False


@dataclass(frozen=True)
class CustomSection:
    """A bespoke report section: ``analysis.sections.<module>``'s ``section(builder)``."""

    module: str


def forward_in_chunks(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model(x)`` evaluated ``batch_size`` rows at a time (bounds memory for many variants)."""
    return torch.cat([model(chunk) for chunk in x.split(batch_size)]) if len(x) else model(x)
