"""Tile shuffling: how much does a model's label logit depend on the arrangement of tiles?

Each image is cut into ``tile x tile`` tiles which are rearranged by a seeded random
permutation; the rows record the model's prediction on the shuffled image against the
original. A BagNet-q should barely change for tiles much larger than ``q`` (only the patches
crossing tile borders change); networks with large receptive fields should lose more.

Only the divisible area ``(H // tile * tile) x (W // tile * tile)`` is shuffled; the remainder
border at the bottom/right stays in place. A tile grid with a single tile (``tile`` >= the image
side, e.g. ``tile = 64`` on 64 px images) is the unshuffled baseline: its rows have delta 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import torch
from torch import Tensor, nn

from bagnet.config import require
from bagnet.experiments.base import ExperimentContext, Summary, forward_in_chunks
from bagnet.experiments.perturb import (
    derive_seed,
    forward_variants,
    grid_shape,
    label_stats,
    merge_with_base,
    permute_tiles,
    prepare_run,
    require_values,
)

TABLE = "shuffle"
SCHEMA = pa.schema([
    ("tile", pa.int64()),
    ("perm_seed", pa.int64()),
    ("correct_top1", pa.bool_()),
    ("correct_top5", pa.bool_()),
    ("label_logit", pa.float64()),
    ("label_logit_delta", pa.float64()),
])
REPORT = Summary(
    title="Patch shuffling", x="tile", x_label="tile size (px)",
    values={"correct_top1": "top-1 accuracy", "label_logit_delta": "label-logit change"},
    caption="Accuracy and change of the label logit when the image's tiles are shuffled, against tile size.",
    log2_x=True,
)


@dataclass
class Params:
    """Tile sizes (px) and permutations per image; defaults suit the 64 px synthetic world."""

    tiles: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    num_perms: int = 3
    seed: int | None = None  # None: the run's seed (ctx.seed)

    def validate(self) -> None:
        require_values(self.tiles, "tiles", minimum=1)
        require(self.num_perms >= 1, "num_perms", f"must be >= 1, got {self.num_perms}")




def perm_seed(seed: int, image_id: str, perm_index: int) -> int:
    """Seed of permutation ``perm_index`` of image ``image_id`` (shared by all tile sizes)."""
    return derive_seed(seed, image_id, "shuffle", perm_index)


def tile_permutation(num_tiles: int, seed: int) -> Tensor:
    """The uniformly random permutation of ``num_tiles`` tiles drawn from ``seed``."""
    return torch.randperm(num_tiles, generator=torch.Generator().manual_seed(seed))


def run(
    model: nn.Module, images: Tensor, labels: Tensor, params: Params, *, ctx: ExperimentContext
) -> list[dict]:
    """Rows ``(image, tile, perm)`` in that order: images x tiles x num_perms rows."""
    if (seed := prepare_run(params, images, labels, ctx)) is None:
        return []
    height, width = images.shape[-2:]
    # (image index, tile, perm seed, permutation or None for a single-tile grid)
    specs: list[tuple[int, int, int, Tensor | None]] = []
    for n, image_id in enumerate(ctx.image_ids):
        for tile in params.tiles:
            rows, cols = grid_shape(height, width, tile)
            for p in range(params.num_perms):
                s = perm_seed(seed, image_id, p)
                perm = tile_permutation(rows * cols, s) if rows * cols > 1 else None
                specs.append((n, tile, s, perm))
    shuffled = [spec for spec in specs if spec[3] is not None]

    def build(chunk: list[tuple[int, int, int, Tensor | None]]) -> Tensor:
        return torch.stack([permute_tiles(images[n], tile, perm) for n, tile, _, perm in chunk])

    with torch.inference_mode():
        base = forward_in_chunks(model, images, ctx.batch_size)
        variant_logits = forward_variants(model, shuffled, build, ctx.batch_size)
        # single-tile grids are the unshuffled image: reuse its logits
        index = [n for n, _, _, _ in specs]
        logits = merge_with_base(base, variant_logits, index, [p is not None for *_, p in specs])
        stats = label_stats(logits, labels[index])
        base_logit = label_stats(base, labels)["label_logit"]

    return [
        {
            "image_id": str(ctx.image_ids[n]),
            "label": int(labels[n]),
            "tile": tile,
            "perm_seed": s,
            "correct_top1": stats["correct_top1"][i],
            "correct_top5": stats["correct_top5"][i],
            "label_logit": stats["label_logit"][i],
            "label_logit_delta": stats["label_logit"][i] - base_logit[n],
        }
        for i, (n, tile, s, _) in enumerate(specs)
    ]
