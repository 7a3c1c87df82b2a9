"""Certified defenses against adversarial patches, computed from a BagNet's patch logits.

A BagNet's logit is the mean of patch logits ``L`` of shape ``(N, C, H', W')`` (cells), each a
function of its own ``q x q`` input patch. A ``p x p`` pixel patch changes only the cells whose
receptive field it overlaps: per axis at most ``w = ceil((p + q - 1) / stride)`` consecutive
cells (:func:`window_cells`), so every patch location changes a subset of one ``w x w`` window
of cells. Each defense below maps ``L`` to a prediction and certifies it by bounding, for every
window, what an arbitrary change of that window's cells can do (Xiang et al., PatchGuard):

- ``undefended``: mean of ``L``; never certified (patch logits are unbounded).
- ``clipped``: mean of ``clamp(L, lo, hi)`` (Zhang et al., Clipped BagNet); a window of ``n``
  cells moves the score gap of two classes by at most ``n * (hi - lo)`` per class.
- ``masking``: robust masking (PatchGuard): evidence ``E = max(L, 0)``; class ``c`` scores
  ``sum(E_c) - max over windows of the window's sum of E_c``. For a window ``W``: the label's
  score is at least the score with its evidence in ``W`` set to 0 (the score never decreases
  when a cell grows), another class's at most ``sum of E_c outside W`` (the masked window is at
  least as heavy as ``W``).
- ``vote``: majority vote of the cells' argmax classes (BagCert-style); a window of ``n`` cells
  can take at most its own votes from the winner and give ``n`` minus its votes to a rival.

All functions are pure tensor math (no model, no experiment framework). ``certified_margin`` is
the worst case over windows and rival classes of (predicted minus rival score), per cell;
``certified`` is ``certified_margin > rounding_tolerance(...)``: a margin within the rounding
error of the sums behind it is a tie, and ties never certify. Ties in predictions go to the
lower class index (``argmax``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DEFENSES: tuple[str, ...] = ("undefended", "clipped", "masking", "vote")


class CertificateViolation(AssertionError):
    """An attack changed the prediction of an image its certificate declared robust: a bug."""


# --------------------------------------------------------------------------------------------
# Geometry


def window_cells(p: int, q: int, stride: int, cells: int | None = None) -> int:
    """Most cells along one axis that a ``p`` px patch can overlap, for patches of ``q`` px every
    ``stride`` px: ``ceil((p + q - 1) / stride)`` (the ``p + q - 1`` pixel starts of a cell that
    overlaps the patch hold at most that many multiples of the stride), capped at ``cells``."""
    if min(p, q, stride) < 1:
        raise ValueError(f"p, q and stride must be >= 1, got p={p}, q={q}, stride={stride}")
    w = math.ceil((p + q - 1) / stride)
    return w if cells is None else min(w, cells)


def touched_cells(start: int, p: int, q: int, stride: int, offset: int, cells: int) -> tuple[int, int]:
    """Cells ``[lo, hi)`` along one axis whose ``q`` px patch (cell ``i`` starts at
    ``offset + stride * i``) overlaps pixels ``start ... start + p - 1``."""
    lo = max(0, math.ceil((start - offset - q + 1) / stride))
    hi = min(cells, (start + p - 1 - offset) // stride + 1)
    return lo, max(lo, hi)


@dataclass(frozen=True)
class Geometry:
    """Patch cells of a BagNet (``q``, ``stride``, ``offset``) on a ``height x width`` input."""

    q: int
    stride: int
    offset: int
    grid: tuple[int, int]  # (H', W') cells

    def window(self, p: int) -> tuple[int, int]:
        """Window ``(rows, cols)`` of cells a ``p x p`` patch can touch."""
        return (window_cells(p, self.q, self.stride, self.grid[0]),
                window_cells(p, self.q, self.stride, self.grid[1]))

    def touched(self, top: int, left: int, p: int) -> tuple[int, int, int, int]:
        """Cells ``(row_lo, col_lo, row_hi, col_hi)`` (exclusive ends) a patch at ``(top, left)`` touches."""
        r0, r1 = touched_cells(top, p, self.q, self.stride, self.offset, self.grid[0])
        c0, c1 = touched_cells(left, p, self.q, self.stride, self.offset, self.grid[1])
        return r0, c0, r1, c1


# --------------------------------------------------------------------------------------------
# Window sums


def window_sums(maps: Tensor, window: tuple[int, int]) -> Tensor:
    """Sum of ``maps (N, C, H, W)`` over every ``window`` placed inside the grid: ``(N, C, H-wr+1, W-wc+1)``."""
    wr, wc = window
    return F.avg_pool2d(maps, (wr, wc), stride=1) * (wr * wc)


def window_masks(grid: tuple[int, int], window: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """One boolean ``(H, W)`` mask per window position, row-major: ``(n_windows, H, W)``."""
    (h, w), (wr, wc) = grid, window
    masks = torch.zeros((h - wr + 1) * (w - wc + 1), h, w, dtype=torch.bool, device=device)
    for k, (i, j) in enumerate((i, j) for i in range(h - wr + 1) for j in range(w - wc + 1)):
        masks[k, i:i + wr, j:j + wc] = True
    return masks


# --------------------------------------------------------------------------------------------
# Defenses: scores (N, C) per cell, and certificates


@dataclass(frozen=True)
class Defended:
    """Per image: ``prediction``, ``margin`` (predicted minus runner-up score, per cell),
    ``certified`` and ``certified_margin`` (worst case over windows, per cell; -inf if none)."""

    prediction: Tensor
    margin: Tensor
    certified: Tensor
    certified_margin: Tensor


def _clean_margin(scores: Tensor, prediction: Tensor) -> Tensor:
    top = scores.gather(1, prediction[:, None])[:, 0]
    others = scores.scatter(1, prediction[:, None], float("-inf"))
    return top - others.max(1).values


def _rivals(gaps: Tensor, prediction: Tensor) -> Tensor:
    """``gaps (N, C, ...)`` with the predicted class set to +inf (so a min over classes skips it)."""
    index = prediction.view(-1, *([1] * (gaps.dim() - 1))).expand(-1, 1, *gaps.shape[2:])
    return gaps.scatter(1, index, float("inf"))


def defense_scores(logits: Tensor, defense: str, *, clip: tuple[float, float] = (0.0, 1.0),
                   window: tuple[int, int] = (1, 1), soft_votes: float | None = None) -> Tensor:
    """Class scores ``(N, C)`` per cell of ``defense`` on patch logits ``(N, C, H, W)``.

    ``soft_votes``: for ``vote``, count softmax(logits / soft_votes) instead of argmax votes (a
    differentiable stand-in for attacks; clamps pass gradients straight through then too)."""
    cells = logits.shape[-2] * logits.shape[-1]
    if defense == "undefended":
        return logits.mean((2, 3))
    if defense == "clipped":
        return _clamp(logits, *clip, straight_through=soft_votes is not None).mean((2, 3))
    if defense == "masking":
        evidence = _clamp(logits, 0.0, math.inf, straight_through=soft_votes is not None)
        heaviest = window_sums(evidence, window).flatten(2).max(2).values
        return (evidence.sum((2, 3)) - heaviest) / cells
    if defense == "vote":
        if soft_votes is not None:
            return torch.softmax(logits / soft_votes, dim=1).mean((2, 3))
        votes = F.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)  # (N, H, W, C)
        return votes.sum((1, 2)) / cells
    raise ValueError(f"unknown defense {defense!r}; known: {list(DEFENSES)}")


def _clamp(x: Tensor, lo: float, hi: float, *, straight_through: bool) -> Tensor:
    clamped = x.clamp(lo, hi)
    return x + (clamped - x).detach() if straight_through else clamped


def certify(logits: Tensor, defense: str, window: tuple[int, int], *,
            clip: tuple[float, float] = (0.0, 1.0)) -> Defended:
    """Prediction and certificate of ``defense`` against any change of one ``window`` of cells."""
    n, c, h, w = logits.shape
    cells = h * w
    window = (min(window[0], h), min(window[1], w))
    scores = defense_scores(logits, defense, clip=clip, window=window)
    prediction = scores.argmax(1)
    margin = _clean_margin(scores, prediction)
    summed = logits  # what the defense sums per cell: its rounding bounds the certificate
    if defense == "undefended":
        worst = torch.full_like(margin, float("-inf"))
    elif defense == "clipped":
        summed = logits.clamp(*clip)
        worst = _clipped_worst(summed, prediction, window, clip) / cells
    elif defense == "masking":
        summed = logits.clamp(min=0)
        worst = _masking_worst(summed, prediction, window) / cells
    elif defense == "vote":
        summed = F.one_hot(logits.argmax(1), c).permute(0, 3, 1, 2).to(logits.dtype)
        worst = _vote_worst(summed, prediction, window) / cells
    else:
        raise ValueError(f"unknown defense {defense!r}; known: {list(DEFENSES)}")
    return Defended(prediction, margin, worst > rounding_tolerance(summed), worst)


def rounding_tolerance(summed: Tensor) -> Tensor:
    """Per image, a bound on the rounding error of a certified margin computed from ``summed``
    (``(N, C, H, W)``: the clamped logits, evidence or votes a defense sums): ``eps * cells * M``,
    with ``M`` the image's largest magnitude and ``eps`` the dtype's machine epsilon (a sum of
    ``cells`` terms is off by at most ``cells * eps * M``; margins are such sums divided by
    ``cells``, so this leaves a factor ``cells`` of headroom). In exact arithmetic a tie has
    margin 0; in float32 it can come out as +3e-8."""
    cells = summed.shape[-2] * summed.shape[-1]
    return torch.finfo(summed.dtype).eps * cells * summed.abs().flatten(1).amax(1)


def _pick(x: Tensor, prediction: Tensor) -> Tensor:
    """``x[n, prediction[n], ...]``: ``(N, C, ...) -> (N, 1, ...)``."""
    index = prediction.view(-1, *([1] * (x.dim() - 1))).expand(-1, 1, *x.shape[2:])
    return x.gather(1, index)


def _clipped_worst(clipped: Tensor, prediction: Tensor, window: tuple[int, int], clip: tuple[float, float]) -> Tensor:
    """Worst ``sum_y - sum_c`` when one window's cells go to ``lo`` for ``y`` and ``hi`` for ``c``."""
    lo, hi = clip
    size = window[0] * window[1]
    totals = clipped.sum((2, 3))[:, :, None, None]
    sums = window_sums(clipped, window)
    y_low = _pick(totals - sums + size * lo, prediction)  # (N, 1, h, w)
    rival_high = totals - sums + size * hi                # (N, C, h, w)
    gaps = _rivals(y_low - rival_high, prediction)
    return gaps.flatten(1).min(1).values


def _masking_worst(evidence: Tensor, prediction: Tensor, window: tuple[int, int]) -> Tensor:
    """Worst (label lower bound - rival upper bound) over windows, PatchGuard's robust masking."""
    totals = evidence.sum((2, 3))[:, :, None, None]
    rival_high = totals - window_sums(evidence, window)          # (N, C, h, w): sum outside W
    label = _pick(evidence, prediction)                          # (N, 1, H, W)
    masks = window_masks(evidence.shape[-2:], window, evidence.device)  # (K, H, W)
    zeroed = label * ~masks[None]                                # (N, K, H, W): label evidence, W zeroed
    label_low = zeroed.sum((2, 3)) - window_sums(zeroed, window).flatten(2).max(2).values  # (N, K)
    gaps = _rivals(label_low.view(-1, 1, *rival_high.shape[2:]) - rival_high, prediction)
    return gaps.flatten(1).min(1).values


def _vote_worst(votes: Tensor, prediction: Tensor, window: tuple[int, int]) -> Tensor:
    """Worst (label votes - rival votes) after one window's cells all vote for the rival."""
    size = window[0] * window[1]
    totals = votes.sum((2, 3))[:, :, None, None]
    sums = window_sums(votes, window)
    label_low = _pick(totals - sums, prediction)
    rival_high = totals + (size - sums)
    gaps = _rivals(label_low - rival_high, prediction)
    return gaps.flatten(1).min(1).values
