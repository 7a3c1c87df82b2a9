"""Adaptive adversarial-patch attack on a BagNet and a defense of :mod:`bagnet.patch_defense`.

PGD on the content of a ``p x p`` patch (sign steps, content kept inside the valid pixel range
of the normalised input), run at many locations at once. The loss is the defense's own score gap
(best rival minus the attacked class), made differentiable where it is not: clamps pass
gradients straight through and votes are counted as softmax(logits / temperature). After every
step the *exact* defended prediction is evaluated; an image counts as flipped as soon as one
location and step changes it.

Only the cells a patch touches change (the BagNet property), so for a BagNet without padding
the patched logits are the clean ones with one window of cells recomputed from the crop of
input that window sees (:func:`patched_logits`); a padded (``aligned``) BagNet is re-run whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bagnet.imagenet import MEAN, STD
from bagnet.patch_defense import Geometry, defense_scores, touched_cells


def patch_starts(size: int, p: int, step: int) -> list[int]:
    """Starts ``0, step, 2 step, ...`` of a ``p`` px patch along an axis of ``size`` px, plus the last one."""
    if p > size:
        raise ValueError(f"a {p} px patch does not fit in {size} px")
    starts = list(range(0, size - p + 1, step))
    return starts if starts[-1] == size - p else [*starts, size - p]


def pixel_bounds(device: torch.device | str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Lowest and highest value of each channel of a normalised image: ``(1, 3, 1, 1)`` each."""
    mean = torch.tensor(MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device, dtype=dtype).view(1, 3, 1, 1)
    return -mean / std, (1 - mean) / std


def rank_locations(logits: Tensor, target: int, geometry: Geometry, p: int, size: tuple[int, int],
                   step: int, limit: int | None) -> list[tuple[int, int]]:
    """Patch corners to attack for one image (``logits (C, H', W')``): every ``step`` px when
    ``limit`` is None, else one location per distinct set of touched cells, for the ``limit``
    sets whose cells hold the most evidence for ``target`` over its best rival."""
    rows, cols = patch_starts(size[0], p, step), patch_starts(size[1], p, step)
    if limit is None:
        return [(t, l) for t in rows for l in cols]
    rival = logits.clone()
    rival[target] = float("-inf")
    lead = logits[target] - rival.max(0).values  # (H', W')
    row_groups = _by_cells(rows, p, geometry.q, geometry.stride, geometry.offset, geometry.grid[0])
    col_groups = _by_cells(cols, p, geometry.q, geometry.stride, geometry.offset, geometry.grid[1])
    boxes = [(r, c) for r in row_groups for c in col_groups]
    scored = sorted(boxes, key=lambda b: -float(lead[b[0][0]:b[0][1], b[1][0]:b[1][1]].sum()))
    return [(_middle(row_groups[r]), _middle(col_groups[c])) for r, c in scored[:limit]]


def _by_cells(starts: list[int], p: int, q: int, stride: int, offset: int, cells: int) -> dict[tuple[int, int], list[int]]:
    """Patch starts along one axis grouped by the cells ``[lo, hi)`` they touch, in order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for start in starts:
        groups.setdefault(touched_cells(start, p, q, stride, offset, cells), []).append(start)
    return groups


def _middle(values: list[int]) -> int:
    return values[len(values) // 2]


def paste(images: Tensor, patches: Tensor, corners: Tensor) -> Tensor:
    """``images (B, 3, H, W)`` with ``patches (B, 3, p, p)`` pasted at ``corners (B, 2)``."""
    b, p = len(images), patches.shape[-1]
    span = torch.arange(p, device=images.device)
    rows = (corners[:, 0, None] + span)[:, :, None]
    cols = (corners[:, 1, None] + span)[:, None, :]
    out = images.clone()
    out[torch.arange(b, device=images.device)[:, None, None], :, rows, cols] = patches.permute(0, 2, 3, 1)
    return out


def patched_logits(model: nn.Module, images: Tensor, clean: Tensor, patches: Tensor, corners: Tensor,
                   geometry: Geometry, window: tuple[int, int]) -> Tensor:
    """Patch logits ``(B, C, H', W')`` of ``images`` with ``patches`` pasted at ``corners``;
    ``clean`` holds the unpatched images' patch logits."""
    x = paste(images, patches, corners)
    if geometry.offset != 0 or getattr(model, "aligned", False):
        return model.patch_logits(x)
    (h, w), (wr, wc), s = geometry.grid, window, geometry.stride
    p = patches.shape[-1]
    r0 = [min(geometry.touched(int(t), int(l), p)[0], h - wr) for t, l in corners.tolist()]
    c0 = [min(geometry.touched(int(t), int(l), p)[1], w - wc) for t, l in corners.tolist()]
    crop_h, crop_w = s * (wr - 1) + geometry.q, s * (wc - 1) + geometry.q
    crops = torch.stack([x[k, :, s * r:s * r + crop_h, s * c:s * c + crop_w] for k, (r, c) in enumerate(zip(r0, c0))])
    fresh = model.patch_logits(crops)  # (B, C, wr, wc)
    out = clean.clone()
    span_r, span_c = torch.arange(wr, device=x.device), torch.arange(wc, device=x.device)
    rows = (torch.tensor(r0, device=x.device)[:, None] + span_r)[:, :, None]
    cols = (torch.tensor(c0, device=x.device)[:, None] + span_c)[:, None, :]
    out[torch.arange(len(x), device=x.device)[:, None, None], :, rows, cols] = fresh.permute(0, 2, 3, 1)
    return out


@dataclass(frozen=True)
class AttackConfig:
    steps: int = 10
    step_fraction: float = 0.25  # sign step, as a fraction of each channel's pixel range
    vote_temperature: float = 1.0
    batch_size: int = 64  # (image, location) pairs per forward


def attack_patch(model: nn.Module, images: Tensor, clean: Tensor, targets: Tensor, corners: list[list[tuple[int, int]]],
                 p: int, defense: str, geometry: Geometry, clip: tuple[float, float], config: AttackConfig,
                 generator: torch.Generator) -> Tensor:
    """Prediction of ``defense`` under the attack, per image: the first prediction other than
    ``targets[n]`` that a patch at one of ``corners[n]`` reached, else ``targets[n]``."""
    window = geometry.window(p)
    low, high = pixel_bounds(images.device, images.dtype)
    pairs = [(n, corner) for n, cs in enumerate(corners) for corner in cs]
    result = targets.clone()
    for start in range(0, len(pairs), config.batch_size):
        chunk = [(n, c) for n, c in pairs[start:start + config.batch_size] if result[n] == targets[n]]
        if not chunk:
            continue
        idx = torch.tensor([n for n, _ in chunk], device=images.device)
        at = torch.tensor([c for _, c in chunk], device=images.device)
        noise = torch.rand(len(chunk), 3, p, p, generator=generator, dtype=images.dtype).to(images.device)
        patch = low + noise * (high - low)
        y = targets[idx]
        for step in range(config.steps + 1):
            with torch.enable_grad():
                patch = patch.detach().requires_grad_(step < config.steps)
                logits = patched_logits(model, images[idx], clean[idx], patch, at, geometry, window)
                flipped = defense_scores(logits.detach(), defense, clip=clip, window=window).argmax(1)
                _record(result, targets, idx, flipped)
                if step == config.steps or bool((result[idx] != y).all()):
                    break
                soft = defense_scores(logits, defense, clip=clip, window=window, soft_votes=config.vote_temperature)
                rival = soft.scatter(1, y[:, None], float("-inf")).max(1).values
                gap = rival - soft.gather(1, y[:, None])[:, 0]
                (grad,) = torch.autograd.grad(gap.sum(), patch)
            patch = torch.maximum(torch.minimum(patch + config.step_fraction * (high - low) * grad.sign(), high), low)
    return result


def _record(result: Tensor, targets: Tensor, idx: Tensor, predicted: Tensor) -> None:
    """Keep the first prediction that differs from the target, per image."""
    for n, pred in zip(idx.tolist(), predicted.tolist()):
        if result[n] == targets[n] and pred != targets[n]:
            result[n] = pred
