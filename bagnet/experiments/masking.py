"""Masking by ranked regions: how fast does the label logit fall when the most important regions
(according to different attribution methods) are masked?

The image's divisible area is cut into ``region_size x region_size`` regions (the remainder
border is never masked). Each ranking scores every region for the image's label:

- ``bagnet_heatmap``: a BagNet's coarse patch-evidence map. The helper model
  ``ctx.helper_models["bagnet"]`` (the zoo model ``Params.heatmap_model``, which the runner builds
  via :func:`helper_models`; else the evaluated model itself if it is a BagNet) gives the
  label-class patch logits ``(H', W')``; each patch's logit is added to the region containing its
  centre pixel (``top + (q - 1) // 2``, likewise for columns); patches centred outside the
  regions are dropped.
- ``occlusion``: captum ``Occlusion`` on the evaluated model, one window per region
  (``sliding_window_shapes = strides = (C, r, r)``, baseline 0 = the dataset mean). The score is
  the label-logit drop when the region is occluded (captum's attribution summed over the region
  divided by its ``C * r * r`` elements).
- ``integrated_gradients``: captum ``IntegratedGradients`` on the evaluated model (baseline 0,
  ``ig_steps`` steps); the score is the attribution summed over the region's channels and pixels.
- ``random``: uniform scores drawn from ``(seed, image_id)``.

For every ranking and every ``k`` in ``ks`` the top-``k`` regions (ties: lower region index
first, row-major) are masked with ``fill`` and the evaluated model's label logit is recorded;
``label_logit_delta`` is relative to the unmasked image (``k = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import torch
from captum.attr import IntegratedGradients, Occlusion
from torch import Tensor, nn

from bagnet.config import require
from bagnet.experiments.base import ExperimentContext, Summary, forward_in_chunks
from bagnet.experiments.perturb import (
    FILLS,
    Fill,
    derive_seed,
    fill_images,
    forward_variants,
    grid_boxes,
    grid_shape,
    grid_sums,
    label_stats,
    masked_variants,
    merge_with_base,
    prepare_run,
    require_values,
)
from bagnet.models import list_models, model_q

TABLE = "masking"
RANKINGS: tuple[str, ...] = ("bagnet_heatmap", "occlusion", "integrated_gradients", "random")
SCHEMA = pa.schema([
    ("ranking", pa.string()),
    ("k_masked", pa.int64()),
    ("label_logit", pa.float64()),
    ("label_logit_delta", pa.float64()),
    ("correct_top5", pa.bool_()),
])
REPORT = Summary(
    title="Masking the most informative regions", x="k_masked", x_label="regions masked (k)",
    values={"label_logit": "label logit", "correct_top5": "top-5 accuracy"}, style="ranking",
    caption="Label logit and top-5 accuracy as the k highest-ranked regions are masked; line style: ranking method.",
)


@dataclass
class Params:
    """Rankings, region side and numbers of masked regions; defaults suit 64 px synthetic images."""

    rankings: list[str] = field(default_factory=lambda: list(RANKINGS))
    region_size: int = 8
    ks: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16, 32])
    fill: Fill = "mean"
    blur_sigma: float = 4.0  # px, for fill = "blur"
    ig_steps: int = 32
    heatmap_model: str | None = None  # zoo BagNet for bagnet_heatmap; None: the evaluated model
    seed: int | None = None  # None: the run's seed (ctx.seed)

    def validate(self) -> None:
        require_values(self.rankings, "rankings")
        bad = [r for r in self.rankings if r not in RANKINGS]
        require(not bad, "rankings", f"unknown ranking(s) {bad}; known: {list(RANKINGS)}")
        require(self.region_size >= 1, "region_size", f"must be >= 1, got {self.region_size}")
        require_values(self.ks, "ks", minimum=0)
        require(self.fill in FILLS, "fill", f"{self.fill!r} is not one of {list(FILLS)}")
        require(self.blur_sigma > 0, "blur_sigma", f"must be > 0, got {self.blur_sigma}")
        require(self.ig_steps >= 1, "ig_steps", f"must be >= 1, got {self.ig_steps}")
        require(self.heatmap_model != "", "heatmap_model", "must be a model name or null")
        require(self.heatmap_model is None or self.heatmap_model not in list_models() or model_q(self.heatmap_model),
                "heatmap_model", f"{self.heatmap_model!r} is not a BagNet (no patch size q); name a BagNet")




def helper_models(params: Params) -> dict[str, str]:
    """Zoo models the runner must build besides the evaluated one (``ctx.helper_models``)."""
    if params.heatmap_model and "bagnet_heatmap" in params.rankings:
        return {"bagnet": params.heatmap_model}
    return {}


# --------------------------------------------------------------------------------------------
# Region scores: (N, rows, cols), higher = more evidence for the label


def _centre_assignment(starts: list[int], q: int, size: int, cells: int, like: Tensor) -> Tensor:
    """One-hot ``(cells, len(starts))``: which region row (column) holds each patch centre."""
    onehot = torch.zeros(cells, len(starts), dtype=like.dtype, device=like.device)
    for idx, start in enumerate(starts):
        centre = start + (q - 1) // 2
        if 0 <= centre < cells * size:
            onehot[centre // size, idx] = 1
    return onehot


def heatmap_region_scores(
    bagnet: nn.Module, images: Tensor, labels: Tensor, size: int, batch_size: int
) -> Tensor:
    """Sum of the label-class patch logits of ``bagnet`` over the patches centred in each region."""
    height, width = images.shape[-2:]
    rows, cols = grid_shape(height, width, size)
    with torch.inference_mode():
        maps = torch.cat([
            bagnet.patch_logits(x)[torch.arange(len(x), device=x.device), y]
            for x, y in zip(images.split(batch_size), labels.split(batch_size))
        ])  # (N, H', W') label-class evidence
    ph, pw = maps.shape[-2:]
    tops = [bagnet.patch_box(i, 0)[0] for i in range(ph)]
    lefts = [bagnet.patch_box(0, j)[1] for j in range(pw)]
    ay = _centre_assignment(tops, bagnet.q, size, rows, maps)
    ax = _centre_assignment(lefts, bagnet.q, size, cols, maps)
    return torch.einsum("yi,nij,xj->nyx", ay, maps, ax)


def occlusion_region_scores(
    model: nn.Module, images: Tensor, labels: Tensor, size: int, batch_size: int
) -> Tensor:
    """Label-logit drop when each region is set to 0 (captum ``Occlusion``)."""
    occlusion = Occlusion(model)
    window = (images.shape[1], size, size)
    scores = []
    with torch.inference_mode():
        for x, y in zip(images.split(batch_size), labels.split(batch_size)):
            attr = occlusion.attribute(
                x, sliding_window_shapes=window, strides=window, baselines=0, target=y,
                perturbations_per_eval=max(1, batch_size // len(x)),
            )
            # captum divides by the window count in float32, so attr is float32 whatever x is
            scores.append(grid_sums(attr.to(x.dtype), size) / (window[0] * size * size))
    return torch.cat(scores)


def ig_region_scores(
    model: nn.Module, images: Tensor, labels: Tensor, size: int, n_steps: int, batch_size: int
) -> Tensor:
    """Integrated-gradients attribution (baseline 0) summed over each region."""
    scores = []
    with torch.inference_mode(False), torch.enable_grad():
        ig = IntegratedGradients(model)
        for x, y in zip(images.split(batch_size), labels.split(batch_size)):
            x = x.clone()  # a normal tensor even if the caller is in inference mode
            attr = ig.attribute(
                x, baselines=torch.zeros_like(x), target=y.clone(), n_steps=n_steps,
                internal_batch_size=batch_size,
            )
            scores.append(grid_sums(attr.detach(), size))
    return torch.cat(scores)


def random_region_scores(image_ids: list[str], rows: int, cols: int, seed: int) -> Tensor:
    """Uniform scores, deterministic per ``(seed, image_id)``."""
    gens = [torch.Generator().manual_seed(derive_seed(seed, i, "masking")) for i in image_ids]
    return torch.stack([torch.rand(rows, cols, generator=g) for g in gens])


def helper_bagnet(model: nn.Module, ctx: ExperimentContext) -> nn.Module:
    """The BagNet whose heatmap ranks regions: ``ctx.helper_models["bagnet"]`` or ``model``."""
    helper = ctx.helper_models.get("bagnet", model)
    if not hasattr(helper, "patch_logits"):
        raise ValueError(
            f"ranking 'bagnet_heatmap' needs a BagNet: {ctx.model_name!r} is not one and "
            "ctx.helper_models has no 'bagnet' entry (set masking.heatmap_model, e.g. bagnet33)"
        )
    return helper


def region_scores(
    ranking: str, model: nn.Module, images: Tensor, labels: Tensor, params: Params,
    ctx: ExperimentContext, seed: int,
) -> Tensor:
    """Scores ``(N, rows, cols)`` of ``ranking`` for every region of every image."""
    size, bs = params.region_size, ctx.batch_size
    if ranking == "bagnet_heatmap":
        return heatmap_region_scores(helper_bagnet(model, ctx), images, labels, size, bs)
    if ranking == "occlusion":
        return occlusion_region_scores(model, images, labels, size, bs)
    if ranking == "integrated_gradients":
        return ig_region_scores(model, images, labels, size, params.ig_steps, bs)
    if ranking == "random":
        return random_region_scores(ctx.image_ids, *grid_shape(*images.shape[-2:], size), seed)
    raise ValueError(f"unknown ranking {ranking!r}; known: {list(RANKINGS)}")


def rank_regions(scores: Tensor) -> Tensor:
    """Region indices (row-major) by decreasing score, ties by index: ``(N, rows * cols)``."""
    return torch.sort(scores.flatten(1).cpu(), dim=1, descending=True, stable=True).indices


# --------------------------------------------------------------------------------------------


def run(
    model: nn.Module, images: Tensor, labels: Tensor, params: Params, *, ctx: ExperimentContext
) -> list[dict]:
    """Rows ``(image, ranking, k)`` in that order: images x rankings x ks rows."""
    if (seed := prepare_run(params, images, labels, ctx)) is None:
        return []
    height, width = images.shape[-2:]
    boxes = grid_boxes(height, width, params.region_size)
    if max(params.ks) > len(boxes):
        raise ValueError(
            f"masking params ks: k={max(params.ks)} exceeds the {len(boxes)} regions of "
            f"{params.region_size} px in a {height}x{width} image"
        )
    order = {r: rank_regions(region_scores(r, model, images, labels, params, ctx, seed)).tolist()
             for r in params.rankings}
    specs = [(n, r, k) for n in range(len(images)) for r in params.rankings for k in params.ks]
    variants = [(n, [boxes[i] for i in order[r][n][:k]]) for n, r, k in specs if k > 0]
    with torch.inference_mode():
        fills = fill_images(images, params.fill, params.blur_sigma)
        base = forward_in_chunks(model, images, ctx.batch_size)
        masked = forward_variants(
            model, variants, lambda chunk: masked_variants(images, fills, chunk), ctx.batch_size
        )
        index = [n for n, _, _ in specs]
        logits = merge_with_base(base, masked, index, [k > 0 for _, _, k in specs])
        stats = label_stats(logits, labels[index])
        base_logit = label_stats(base, labels)["label_logit"]
    return [
        {
            "image_id": str(ctx.image_ids[n]),
            "label": int(labels[n]),
            "ranking": r,
            "k_masked": k,
            "label_logit": stats["label_logit"][i],
            "label_logit_delta": stats["label_logit"][i] - base_logit[n],
            "correct_top5": stats["correct_top5"][i],
        }
        for i, (n, r, k) in enumerate(specs)
    ]
