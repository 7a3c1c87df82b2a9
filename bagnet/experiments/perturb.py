"""Image perturbations shared by the ``shuffle``, ``interaction`` and ``masking`` experiments.

Images are normalised float NCHW tensors (``bagnet.imagenet.MEAN/STD``); every function keeps their
dtype and device. Boxes are ``(top, left, bottom, right)`` with exclusive ends, the convention of
``BagNet.patch_box``. Grids of ``size x size`` cells (tiles, regions) cover the *divisible area*
``(H // size * size) x (W // size * size)``; the bottom/right remainder border belongs to no cell.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagnet.config import require
from bagnet.imagenet import MEAN, STD
from bagnet.experiments.base import ExperimentContext, forward_in_chunks
from bagnet.metrics import topk_correct

Box = tuple[int, int, int, int]
Fill = Literal["mean", "zero", "blur"]
FILLS: tuple[str, ...] = ("mean", "zero", "blur")
V = TypeVar("V")


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from ``parts`` (e.g. ``(seed, image_id, perm_index)``).

    Independent of batch composition and of Python's hash randomisation.
    """
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def require_values(values: Sequence, key: str, minimum: float | None = None) -> None:
    """``validate()`` check of a list parameter: non-empty, no duplicates, items >= ``minimum``."""
    require(len(values) > 0, key, "needs at least one value")
    require(len(set(values)) == len(values), key, f"duplicate values in {list(values)}")
    if minimum is not None:
        low = [v for v in values if v < minimum]
        require(not low, key, f"values must be >= {minimum}, got {list(values)}")


def prepare_run(params, images: Tensor, labels: Tensor, ctx: ExperimentContext) -> int | None:
    """Check a perturbation ``run``'s inputs; its seed (``params.seed``, else the run's ``ctx.seed``),
    or None when the batch is empty."""
    params.validate()
    if images.dim() != 4 or not len(images) == len(labels) == len(ctx.image_ids):
        raise ValueError(
            f"expected NCHW images with one label and image id each, got images "
            f"{tuple(images.shape)}, {len(labels)} labels, {len(ctx.image_ids)} image ids"
        )
    if len(images) == 0:
        return None
    return ctx.seed if params.seed is None else params.seed


# --------------------------------------------------------------------------------------------
# Fills


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur (radius ``ceil(3 sigma)``, reflect padding) of NCHW ``images``."""
    height, width = images.shape[-2:]
    radius = min(math.ceil(3 * sigma), height - 1, width - 1)
    if sigma <= 0 or radius < 1:
        return images.clone()
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def fill_images(images: Tensor, fill: str, blur_sigma: float = 4.0) -> Tensor:
    """What a masked pixel becomes, per image: a tensor shaped like ``images``.

    ``mean``: 0 (the dataset mean in normalised space); ``zero``: a black pixel (0 before
    normalisation, i.e. ``-MEAN/STD``); ``blur``: a Gaussian-blurred copy (``blur_sigma`` px).
    """
    if fill == "mean":
        return torch.zeros_like(images)
    if fill == "zero":
        mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device)
        std = torch.tensor(STD, dtype=images.dtype, device=images.device)
        return (-mean / std).view(1, 3, 1, 1).expand_as(images).clone()
    if fill == "blur":
        return gaussian_blur(images, blur_sigma)
    raise ValueError(f"unknown fill {fill!r}; expected one of {FILLS}")


# --------------------------------------------------------------------------------------------
# Boxes, grids, masks


def grid_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Rows and columns of ``size x size`` cells in the divisible area."""
    return height // size, width // size


def grid_boxes(height: int, width: int, size: int) -> list[Box]:
    """The cells of :func:`grid_shape`, row-major."""
    rows, cols = grid_shape(height, width, size)
    return [
        (r * size, c * size, (r + 1) * size, (c + 1) * size)
        for r in range(rows)
        for c in range(cols)
    ]


def grid_sums(maps: Tensor, size: int) -> Tensor:
    """Sum of ``maps`` ``(N, C, H, W)`` over channels and each grid cell: ``(N, rows, cols)``."""
    n, c, height, width = maps.shape
    rows, cols = grid_shape(height, width, size)
    area = maps[..., : rows * size, : cols * size]
    return area.reshape(n, c, rows, size, cols, size).sum(dim=(1, 3, 5))


def boxes_mask(boxes: Sequence[Box], height: int, width: int, device: torch.device | str) -> Tensor:
    """Boolean ``(H, W)`` mask of the union of ``boxes`` (clipped to the image)."""
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    for top, left, bottom, right in boxes:
        mask[max(top, 0) : max(bottom, 0), max(left, 0) : max(right, 0)] = True
    return mask


def masked_variants(
    images: Tensor, fills: Tensor, variants: Sequence[tuple[int, Sequence[Box]]]
) -> Tensor:
    """One image per ``(image_index, boxes)``: image ``image_index`` with ``boxes`` filled."""
    height, width = images.shape[-2:]
    index = torch.tensor([v[0] for v in variants], device=images.device, dtype=torch.long)
    masks = torch.stack([boxes_mask(b, height, width, images.device) for _, b in variants])
    return torch.where(masks[:, None], fills[index], images[index])


def permute_tiles(image: Tensor, tile: int, perm: Tensor) -> Tensor:
    """Image ``(C, H, W)`` with its ``tile x tile`` tiles rearranged: output tile ``k`` (row-major)
    is input tile ``perm[k]``. The remainder border outside the divisible area stays in place."""
    channels, height, width = image.shape
    rows, cols = grid_shape(height, width, tile)
    if perm.numel() != rows * cols:
        raise ValueError(f"perm has {perm.numel()} entries for a {rows}x{cols} tile grid")
    out = image.clone()
    area = image[:, : rows * tile, : cols * tile].reshape(channels, rows, tile, cols, tile)
    tiles = area.permute(1, 3, 0, 2, 4).reshape(rows * cols, channels, tile, tile)
    moved = tiles[perm.to(image.device)].reshape(rows, cols, channels, tile, tile)
    out[:, : rows * tile, : cols * tile] = moved.permute(2, 0, 3, 1, 4).reshape(
        channels, rows * tile, cols * tile
    )
    return out


# --------------------------------------------------------------------------------------------
# Evaluating perturbed variants


def forward_variants(
    model: nn.Module | Callable[[Tensor], Tensor],
    variants: Sequence[V],
    build: Callable[[Sequence[V]], Tensor],
    batch_size: int,
) -> Tensor:
    """Logits of ``build(chunk)`` for consecutive chunks of ``batch_size`` variants.

    Only one chunk of perturbed images exists at a time; returns ``(len(variants), C)``.
    """
    outs = [
        forward_in_chunks(model, build(variants[start : start + batch_size]), batch_size)
        for start in range(0, len(variants), batch_size)
    ]
    return torch.cat(outs) if outs else torch.empty(0)


def merge_with_base(
    base: Tensor, variant_logits: Tensor, image_index: Sequence[int], perturbed: Sequence[bool]
) -> Tensor:
    """Logits per row: the next of ``variant_logits`` where ``perturbed``, else the logits
    ``base[image_index]`` of the unperturbed image (which needs no forward pass)."""
    it = iter(variant_logits)
    return torch.stack([next(it) if p else base[n] for n, p in zip(image_index, perturbed)])


def label_stats(logits: Tensor, labels: Tensor) -> dict[str, list]:
    """Per-row ``label_logit`` (float), ``correct_top1`` and ``correct_top5`` (bool) lists."""
    hits = topk_correct(logits, labels, (1, 5))
    label_logit = logits.gather(1, labels.view(-1, 1))[:, 0]
    return {
        "label_logit": label_logit.double().tolist(),
        "correct_top1": hits[1].tolist(),
        "correct_top5": hits[5].tolist(),
    }


__all__ = [
    "Box", "Fill", "FILLS", "derive_seed", "require_values", "prepare_run",
    "gaussian_blur", "fill_images", "grid_shape", "grid_boxes", "grid_sums", "boxes_mask",
    "masked_variants", "permute_tiles", "forward_variants", "merge_with_base", "label_stats",
]
