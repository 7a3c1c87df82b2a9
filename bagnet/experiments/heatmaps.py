"""Patch-evidence heatmaps of a BagNet (:mod:`bagnet.heatmap`) as result rows, and a gallery.

One row per (image, target class): ``target``, ``height``, ``width``, ``values`` (float32,
row-major, ``height * width``), ``resolution`` ("full" or "coarse"), ``stride`` and ``origin``
(entry ``(i, j)`` is the patch centred on image pixel ``(origin + stride*i, origin + stride*j)``:
``1, 0`` for full-resolution maps, ``model.stride, offset + (q-1)/2`` for coarse ones), plus
``image_id`` and ``label``. Each row also carries its map's summary (:func:`summarize`), so
readers that need no full map read a few numbers per image: ``peak_i``, ``peak_j`` (the map entry
of the maximum, row and column), ``peak_value`` and ``top_evidence`` (the mean of the map's
largest 1% of entries, at least one: the evidence in the most informative patches). The report
draws them (``analysis/sections/heatmaps.py``) and reads full maps only for the images it shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from bagnet.config import require
from bagnet.experiments.base import CustomSection, ExperimentContext, forward_in_chunks
from bagnet.models import model_q
from bagnet.heatmap import DEFAULT_MAX_PIXELS, check_bagnet, coarse_heatmap, heatmap

TABLE = "heatmaps"
SCHEMA = pa.schema([
    ("target", pa.int64()),
    ("height", pa.int64()),
    ("width", pa.int64()),
    ("values", pa.list_(pa.float32())),
    ("resolution", pa.string()),
    ("stride", pa.int64()),
    ("origin", pa.int64()),
    ("peak_i", pa.int64()),
    ("peak_j", pa.int64()),
    ("peak_value", pa.float32()),
    ("top_evidence", pa.float32()),
])
TOP_FRACTION = 0.01  # share of a map's entries whose mean is its ``top_evidence``
REPORT = CustomSection("heatmaps")  # galleries over the images and the most informative patches


def applies_to(model_name: str) -> bool:
    """Heatmaps are defined for BagNets only (zoo names with a patch size q)."""
    return model_q(model_name) is not None


@dataclass
class Params:
    """``targets``: "label" (each image's label), "top1" (the model's prediction) or a list of
    class indices shared by all images; ``resolution``: "full" (one value per pixel) or "coarse"
    (one per model patch); ``method``: full-resolution algorithm; ``max_pixels``: heatmap values
    per forward pass (the memory bound)."""

    targets: str | list[int] = "label"
    resolution: Literal["full", "coarse"] = "full"
    method: Literal["dense", "shift"] = "dense"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> None:
        if isinstance(self.targets, str):
            require(self.targets in ("label", "top1"), "targets",
                    f"{self.targets!r} is not 'label', 'top1' or a list of class indices")
        else:
            require(len(self.targets) > 0 and min(self.targets) >= 0, "targets",
                    f"{self.targets!r}: expected a non-empty list of class indices >= 0")
        require(self.max_pixels >= 64, "max_pixels", f"{self.max_pixels} is below 64")


def summarize(values: np.ndarray) -> dict:
    """The summary columns of one map (``height x width``): ``peak_i``, ``peak_j``,
    ``peak_value``, ``top_evidence`` (NaN entries ignored)."""
    flat = np.nan_to_num(np.asarray(values, np.float32).ravel(), nan=-np.inf)
    i, j = np.unravel_index(int(np.argmax(flat)), np.shape(values))
    k = max(1, int(round(flat.size * TOP_FRACTION)))
    top = np.partition(flat, flat.size - k)[flat.size - k:]
    return {"peak_i": int(i), "peak_j": int(j), "peak_value": float(flat.max()), "top_evidence": float(top.mean())}


def _targets(model: nn.Module, images: Tensor, labels: Tensor, params: Params,
             ctx: ExperimentContext) -> Tensor:
    if params.targets == "label":
        return labels.to(images.device).view(-1, 1)
    if params.targets == "top1":
        with torch.inference_mode():
            return forward_in_chunks(model, images, ctx.batch_size).argmax(1).view(-1, 1)
    return torch.as_tensor(list(params.targets), device=images.device).expand(len(images), -1)


def run(model: nn.Module, images: Tensor, labels: Tensor, params: Params, *,
        ctx: ExperimentContext) -> list[dict]:
    """Heatmaps of ``params.targets`` for every image (rows described in the module docstring).

    Raises ``ValueError`` for models that are not BagNets, and for full resolution with an
    aligned (padded) BagNet."""
    try:
        bag = check_bagnet(model, full_resolution=params.resolution == "full")
    except ValueError as err:
        raise ValueError(f"heatmaps experiment on {ctx.model_name!r}: {err}") from None
    targets = _targets(bag, images, labels, params, ctx)
    if params.resolution == "full":
        maps = heatmap(bag, images, targets, method=params.method, max_pixels=params.max_pixels)
        stride, origin = 1, 0
    else:
        maps = coarse_heatmap(bag, images, targets)
        stride, origin = bag.stride, bag.offset + (bag.q - 1) // 2
    maps = maps.float().cpu().numpy()
    targets_list = targets.cpu().tolist()
    height, width = maps.shape[-2:]
    return [
        {"image_id": ctx.image_ids[i], "label": int(y), "target": int(targets_list[i][k]),
         "height": height, "width": width, "values": maps[i, k].reshape(-1).copy(),
         "resolution": params.resolution, "stride": stride, "origin": origin, **summarize(maps[i, k])}
        for i, y in enumerate(labels.cpu().tolist()) for k in range(maps.shape[1])
    ]
