"""The context an experiment's ``run`` receives besides model, images and labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ExperimentContext:
    image_ids: list[str]
    model_name: str
    q: int | None = None  # patch size of a BagNet, None for unconstrained CNNs
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    helper_models: dict[str, nn.Module] = field(default_factory=dict)
    batch_size: int = 64  # largest forward batch for perturbed variants


def forward_in_chunks(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model(x)`` evaluated ``batch_size`` rows at a time (bounds memory for many variants)."""
    return torch.cat([model(chunk) for chunk in x.split(batch_size)]) if len(x) else model(x)
