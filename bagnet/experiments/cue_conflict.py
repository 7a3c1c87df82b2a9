"""Cue conflict: does a model decide by the local motifs or by their arrangement?

The synthetic analogue of the texture-shape cue conflict (Geirhos et al. 2019; shape bias =
shape / (shape + texture)). For every image id of the run, the world draws the cue-conflict
image of the same index (:meth:`bagnet.synthetic.SyntheticWorld.cue_conflict`): the layout of
an arrangement class B (``pairS-h`` or ``pairS-v``: two glyphs at an offset only a window of
S px spans) with both glyphs replaced by the glyph of a local class A. A decision follows the
motifs if the model predicts A, the arrangement if it predicts B, and is "other" otherwise;
``arrangement_bias`` = arrangement / (arrangement + motif). A BagNet whose patches are smaller
than S cannot see the arrangement at all, so it can only follow the motifs (or neither).

Rows keep the run's ``image_id`` and its ``label`` (the regular image the index names); the
cue-conflict image's classes are in ``motif_class`` and ``arrangement_class``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor, nn

from bagnet.experiments.base import CustomSection, ExperimentContext, forward_in_chunks
from bagnet.experiments.localization import world_of
from bagnet.imagenet import to_model_input

TABLE = "cue_conflict"
DATASETS = ("synthetic",)  # the only data that can make cue-conflict images
DECISIONS: tuple[str, ...] = ("arrangement", "motif", "other")
SCHEMA = pa.schema([
    ("motif_class", pa.int64()),
    ("arrangement_class", pa.int64()),
    ("pair_scale", pa.int64()),  # S: the smallest window that spans the arrangement
    ("prediction", pa.int64()),
    ("decision", pa.string()),  # one of DECISIONS
])
REPORT = CustomSection("explanations")


@dataclass
class Params:
    """No parameters: one cue-conflict image per image id of the run."""

    def validate(self) -> None:
        pass


def decision(prediction: int, motif_class: int, arrangement_class: int) -> str:
    """Which cue a prediction follows: ``"motif"``, ``"arrangement"`` or ``"other"``."""
    if prediction == motif_class:
        return "motif"
    return "arrangement" if prediction == arrangement_class else "other"


def run(model: nn.Module, images: Tensor, labels: Tensor, params: Params, *,
        ctx: ExperimentContext) -> list[dict]:
    """One row per image id: the model's decision on the cue-conflict image of that index."""
    world = world_of(ctx, "cue_conflict")
    if not ctx.image_ids:
        return []
    samples = [world.cue_conflict(index, split) for split, index in map(world.parse_image_id, ctx.image_ids)]
    conflict = to_model_input(np.stack([s.image for s in samples]), images.device).to(images.dtype)
    with torch.inference_mode():
        predictions = forward_in_chunks(model, conflict, ctx.batch_size).argmax(1).cpu().tolist()
    rows = []
    for n, (sample, pred) in enumerate(zip(samples, predictions)):
        a, b = sample.meta["motif_class"], sample.meta["arrangement_class"]
        rows.append({"image_id": ctx.image_ids[n], "label": int(labels[n]), "motif_class": a, "arrangement_class": b,
                     "pair_scale": int(world.classes[b].scale), "prediction": int(pred), "decision": decision(pred, a, b)})
    return rows


def shares(df: pd.DataFrame, by: tuple[str, ...] = ("model",)) -> pd.DataFrame:
    """Per group of ``by``: ``images``, the share of each decision and ``arrangement_bias`` =
    arrangement / (arrangement + motif) (NaN when neither occurs)."""
    keys = list(by)
    counts = pd.crosstab([df[k] for k in keys], df["decision"]).reindex(columns=list(DECISIONS), fill_value=0)
    out = counts.div(counts.sum(axis=1), axis=0)
    out.columns = [str(c) for c in out.columns]
    cued = counts["arrangement"] + counts["motif"]
    out["arrangement_bias"] = (counts["arrangement"] / cued.where(cued > 0)).astype(float)
    out.insert(0, "images", counts.sum(axis=1))
    return out.reset_index()
