"""Spatial interaction: do two image regions affect the label logit independently?

For a pair of equal ``s x s`` square regions ``a`` and ``b`` the label logit ``f`` is measured on
the original image and with ``a``, ``b`` and both masked (fill ``mean``, ``zero`` or ``blur``, see
:func:`bagnet.experiments.perturb.fill_images`)::

    delta_x = f(masked x) - f(original),  interaction = delta_ab - delta_a - delta_b

``distance`` is the Chebyshev gap between the regions: per axis, the number of pixel rows
(columns) strictly between them, negative when they overlap in that axis; ``distance =
max(gap_y, gap_x)`` (0 = touching edges or corners). For two ``s x s`` squares it equals the
Chebyshev distance of their top-left corners minus ``s``. Sampled pairs never overlap
(``distance >= 0``).

A BagNet's logit is the mean of independent patch logits, so its interaction is exactly zero
whenever no patch of its patch grid intersects both regions (:func:`patches_touching_both` with
:func:`bagnet_patch_boxes`). The stride-free rule :func:`patch_touches_both` (``distance <=
q - 2``: some ``q x q`` window anywhere intersects both) is the conservative sufficient condition:
``distance >= q - 1`` implies zero interaction for a BagNet-q.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from bagnet.config import require
from bagnet.experiments.base import ExperimentContext, Summary, forward_in_chunks
from bagnet.experiments.perturb import (
    Box,
    FILLS,
    Fill,
    derive_seed,
    fill_images,
    forward_variants,
    masked_variants,
    prepare_run,
    require_values,
)

TABLE = "interaction"
SCHEMA = pa.schema([
    ("patch_size", pa.int64()),
    ("a_y", pa.int64()), ("a_x", pa.int64()), ("b_y", pa.int64()), ("b_x", pa.int64()),
    ("distance", pa.int64()),
    ("delta_a", pa.float64()),
    ("delta_b", pa.float64()),
    ("delta_ab", pa.float64()),
    ("interaction", pa.float64()),
])
REPORT = Summary(
    title="Interactions between image parts", x="distance", x_label="distance between the regions (px)",
    values={"|interaction|": "mean |interaction|", "interaction": "mean interaction"},
    style="patch_size", mark_q=True,
    caption="Interaction (change of the label logit when both regions are perturbed minus the two single "
            "changes) against their distance; dotted lines: q - 1 of each BagNet, from which its interactions are exactly zero.",
)


@dataclass
class Params:
    """Region sides, gaps and pairs per gap; defaults suit the 64 px synthetic world."""

    region_sizes: list[int] = field(default_factory=lambda: [8])
    distances: list[int] = field(default_factory=lambda: [0, 4, 8, 16, 24, 32, 40])
    pairs_per_distance: int = 4
    fill: Fill = "mean"
    blur_sigma: float = 4.0  # px, for fill = "blur"
    seed: int | None = None  # None: the run's seed (ctx.seed)

    def validate(self) -> None:
        require_values(self.region_sizes, "region_sizes", minimum=1)
        require_values(self.distances, "distances", minimum=0)  # sampled regions never overlap
        n = self.pairs_per_distance
        require(n >= 1, "pairs_per_distance", f"must be >= 1, got {n}")
        require(self.fill in FILLS, "fill", f"{self.fill!r} is not one of {list(FILLS)}")
        require(self.blur_sigma > 0, "blur_sigma", f"must be > 0, got {self.blur_sigma}")




# --------------------------------------------------------------------------------------------
# Geometry


def axis_gaps(a: Box, b: Box) -> tuple[int, int]:
    """Pixels strictly between boxes ``a`` and ``b`` along y and x (negative: overlap)."""
    return max(b[0] - a[2], a[0] - b[2]), max(b[1] - a[3], a[1] - b[3])


def box_distance(a: Box, b: Box) -> int:
    """Chebyshev gap ``max(gap_y, gap_x)``; >= 0 iff the boxes are disjoint."""
    return max(axis_gaps(a, b))


def patch_touches_both(q: int, a: Box, b: Box) -> bool:
    """Does some ``q x q`` window (at any pixel position) intersect both ``a`` and ``b``?

    Along one axis a window of ``q`` px reaches both intervals iff their gap is ``<= q - 2``
    (it must cover the gap plus one pixel of each); the axes are independent.
    """
    return box_distance(a, b) <= q - 2


def boxes_intersect(p: Box, a: Box) -> bool:
    """Do two boxes share at least one pixel?"""
    return p[0] < a[2] and a[0] < p[2] and p[1] < a[3] and a[1] < p[3]


def bagnet_patch_boxes(model: nn.Module, height: int, width: int) -> list[Box]:
    """Input boxes of all patches of a BagNet's patch grid for a ``height x width`` input."""
    rows, cols = model.patch_grid(height, width)
    return [model.patch_box(i, j) for i in range(rows) for j in range(cols)]


def patches_touching_both(patch_boxes: list[Box], a: Box, b: Box) -> bool:
    """Does one of ``patch_boxes`` intersect both ``a`` and ``b``? (If not, a bag-of-patches
    model has exactly zero interaction between ``a`` and ``b``.)"""
    return any(boxes_intersect(p, a) and boxes_intersect(p, b) for p in patch_boxes)


def _ordered_pairs_at(length: int, k: int) -> int:
    """Number of ordered position pairs ``(p, r)`` in ``range(length)`` with ``|p - r| == k``."""
    return 0 if k >= length else (length - k) * (1 if k == 0 else 2)


def _draw_axis(rng: np.random.Generator, length: int, k: int) -> tuple[int, int]:
    low = int(rng.integers(0, length - k))
    pair = (low, low + k)
    return pair if k == 0 or rng.random() < 0.5 else pair[::-1]


def sample_pair(
    rng: np.random.Generator, height: int, width: int, size: int, distance: int
) -> tuple[Box, Box]:
    """Two ``size x size`` boxes inside the image at Chebyshev gap ``distance``, uniformly among
    all such ordered pairs. Raises ``ValueError`` if none fits."""
    reach = distance + size  # Chebyshev distance of the top-left corners
    ly, lx = height - size + 1, width - size + 1
    options: list[tuple[int, int, float]] = []  # (ky, kx, number of pairs)
    for ky in range(min(reach, ly - 1) + 1):
        for kx in ([reach] if ky < reach else range(min(reach, lx - 1) + 1)):
            weight = _ordered_pairs_at(ly, ky) * _ordered_pairs_at(lx, kx)
            if weight:
                options.append((ky, kx, float(weight)))
    if not options:
        raise ValueError(
            f"distance {distance} with region size {size} does not fit a {height}x{width} image "
            f"(largest gap: {max(height, width) - 2 * size})"
        )
    weights = np.array([w for _, _, w in options])
    ky, kx, _ = options[int(rng.choice(len(options), p=weights / weights.sum()))]
    (ay, by), (ax, bx) = _draw_axis(rng, ly, ky), _draw_axis(rng, lx, kx)
    return (ay, ax, ay + size, ax + size), (by, bx, by + size, bx + size)


def sample_pairs(
    params: Params, seed: int, image_id: str, height: int, width: int
) -> list[tuple[int, int, Box, Box]]:
    """``(size, distance, a, b)`` for one image, deterministic from ``(seed, image_id)``."""
    rng = np.random.default_rng(derive_seed(seed, image_id, "interaction"))
    pairs = []
    for size in params.region_sizes:
        for distance in params.distances:
            for _ in range(params.pairs_per_distance):
                try:
                    a, b = sample_pair(rng, height, width, size, distance)
                except ValueError as err:
                    raise ValueError(f"interaction params region_sizes/distances: {err}") from None
                pairs.append((size, distance, a, b))
    return pairs


# --------------------------------------------------------------------------------------------


def run(
    model: nn.Module, images: Tensor, labels: Tensor, params: Params, *, ctx: ExperimentContext
) -> list[dict]:
    """Rows ``(image, region size, distance, pair)`` in that order."""
    if (seed := prepare_run(params, images, labels, ctx)) is None:
        return []
    height, width = images.shape[-2:]
    pairs = [
        (n, *pair)
        for n, image_id in enumerate(ctx.image_ids)
        for pair in sample_pairs(params, seed, image_id, height, width)
    ]
    variants = [(n, boxes) for n, _, _, a, b in pairs for boxes in ((a,), (b,), (a, b))]
    with torch.inference_mode():
        fills = fill_images(images, params.fill, params.blur_sigma)
        base = forward_in_chunks(model, images, ctx.batch_size)
        base = base.gather(1, labels.view(-1, 1))[:, 0].double().tolist()
        logits = forward_variants(
            model, variants, lambda chunk: masked_variants(images, fills, chunk), ctx.batch_size
        )
        variant_labels = labels[[n for n, _ in variants]].view(-1, 1)
        masked = logits.gather(1, variant_labels)[:, 0].double().view(-1, 3).tolist()

    rows = []
    for (n, size, distance, a, b), (fa, fb, fab) in zip(pairs, masked):
        delta_a, delta_b, delta_ab = fa - base[n], fb - base[n], fab - base[n]
        rows.append({
            "image_id": str(ctx.image_ids[n]),
            "label": int(labels[n]),
            "patch_size": size,
            "a_y": a[0], "a_x": a[1], "b_y": b[0], "b_x": b[1],
            "distance": distance,
            "delta_a": delta_a,
            "delta_b": delta_b,
            "delta_ab": delta_ab,
            "interaction": delta_ab - delta_a - delta_b,
        })
    return rows
