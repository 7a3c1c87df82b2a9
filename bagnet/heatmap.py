"""Patch-evidence heatmaps of BagNets: coarse (one value per model patch) and full resolution.

Definition (Brendel & Bethge 2019): the full-resolution heatmap of target class ``c`` at pixel
``(y, x)`` of an ``H x W`` image is the logit of ``c`` that the BagNet gives to the ``q x q``
patch centred on ``(y, x)`` of the normalised image zero-padded by ``r = (q - 1) / 2`` on every
side, i.e. ``model(padded[:, y:y+q, x:x+q])[c]`` (on a ``q x q`` input the model has exactly one
patch, so its image logit is that patch's logit). :func:`reference_heatmap` evaluates this
definition patch by patch; :func:`heatmap` computes the same numbers from whole-image passes:

* ``method="dense"`` (default): every strided convolution of the BagNet is run at stride 1 and
  its ``s x s`` output phases are moved into the batch (space-to-batch), so each later layer is an
  ordinary convolution over every phase at once. After the last stride the batch holds
  ``stride**2`` phase images; phase ``(dy, dx)``, location ``(i, j)`` is the patch whose top-left
  corner is padded pixel ``(stride*i + dy, stride*j + dx)``; interleaving the phases gives the
  ``H x W`` map. Every distinct activation is computed once (the stride-1 stem runs once, not
  ``stride**2`` times); eval-mode BatchNorm is folded into the convolutions.
* ``method="shift"``: plain shift-and-stitch: the unchanged model on the padded image shifted by
  each ``(dy, dx)`` in ``[0, stride)**2`` (``stride**2`` whole-image passes), interleaved.

Both are exact because a BagNet without padding (``offset == 0``) in eval mode computes each
patch logit from that patch's pixels only, with the same arithmetic wherever the patch sits.
The memory bound ``max_pixels`` caps the heatmap values computed per forward pass: large images
are cut into tiles (each with its ``q - 1`` pixel halo), small ones are batched together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagnet.fast import folded_conv
from bagnet.models import BagNet, Bottleneck

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Targets",
    "check_bagnet",
    "target_matrix",
    "coarse_heatmap",
    "heatmap",
    "reference_heatmap",
    "patch_features_at",
    "pad_for_patches",
    "plan_tiles",
]

Targets = int | Sequence[int] | Tensor
Method = Literal["dense", "shift"]
DEFAULT_MAX_PIXELS = 1 << 16  # one 224 x 224 heatmap (plus rounding) per forward pass


# --------------------------------------------------------------------------------------------
# Checks and targets


def check_bagnet(model: nn.Module, *, full_resolution: bool = True) -> BagNet:
    """Return ``model`` as a BagNet in eval mode, or raise ``ValueError`` saying what is wrong."""
    if not all(hasattr(model, a) for a in ("q", "stride", "offset", "patch_logits")):
        raise ValueError(
            f"heatmaps need a BagNet (a model with q, stride, offset and patch_logits); "
            f"got {type(model).__name__}"
        )
    if model.training:
        raise ValueError("the model is in training mode: call model.eval() first (BatchNorm "
                         "statistics must not depend on the batch for patches to be independent)")
    if full_resolution and model.offset != 0:
        raise ValueError(
            f"full-resolution heatmaps need an unpadded BagNet (offset 0); this model has "
            f"offset {model.offset} (aligned=True pads its convolutions, so border patches are "
            f"not the image's patches). Use coarse_heatmap, or a model built with aligned=False"
        )
    if full_resolution and model.q % 2 == 0:
        raise ValueError(f"full-resolution heatmaps need an odd patch size, got q={model.q}")
    return model  # type: ignore[return-value]


def target_matrix(targets: Targets, n: int, num_classes: int, device: torch.device) -> Tensor:
    """``(n, T)`` int64 class indices: an int or a 1-D sequence/tensor is shared by all ``n``
    images; a 2-D ``(n, T)`` tensor/nested list gives each image its own targets."""
    t = torch.as_tensor(targets, dtype=torch.long, device=device)
    if t.ndim == 0:
        t = t.view(1, 1)
    if t.ndim == 1:
        t = t.view(1, -1)
    if t.ndim != 2 or t.shape[1] == 0 or t.shape[0] not in (1, n):
        raise ValueError(f"targets must be an int, a 1-D list of classes shared by all images or a "
                         f"({n}, T) tensor; got shape {tuple(t.shape)}")
    if len(t) and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"targets {t.unique().tolist()} out of range for {num_classes} classes")
    return t.expand(n, -1)


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected normalised float images (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected normalised float images, got dtype {images.dtype} "
                         "(use bagnet.imagenet.to_model_input on uint8 images)")


def _target_logits(model: BagNet, features: Tensor, targets: Tensor) -> Tensor:
    """Logits of each image's targets at every location: ``(B, D, h, w), (B, T) -> (B, T, h, w)``."""
    weight = model.fc.weight[targets]  # (B, T, D)
    bias = model.fc.bias[targets]
    return torch.einsum("bdhw,btd->bthw", features, weight) + bias[:, :, None, None]


# --------------------------------------------------------------------------------------------
# Coarse map


@torch.inference_mode()
def coarse_heatmap(model: nn.Module, images: Tensor, targets: Targets) -> Tensor:
    """One value per model patch (stride ``model.stride``): ``(N, T, H', W')``.

    Entry ``(i, j)`` is the logit of the patch with top-left image pixel
    ``(offset + stride*i, offset + stride*j)``, i.e. centred on ``offset + stride*i + (q-1)/2``;
    its spatial mean is the model's image logit. Works for aligned BagNets too.
    """
    bag = check_bagnet(model, full_resolution=False)
    _check_images(images)
    t = target_matrix(targets, len(images), bag.fc.out_features, images.device)
    return _target_logits(bag, bag.patch_features(images), t)


# --------------------------------------------------------------------------------------------
# Full-resolution map


def pad_for_patches(images: Tensor, q: int, multiple: int = 1) -> Tensor:
    """Zero-pad by ``(q-1)/2`` on every side, plus extra bottom/right zeros so that the number of
    patch positions per axis (``size - q + 1``) is a multiple of ``multiple``."""
    r = (q - 1) // 2
    h, w = images.shape[-2:]
    extra_h, extra_w = (-h) % multiple, (-w) % multiple
    return F.pad(images, (r, r + extra_w, r, r + extra_h))


def plan_tiles(n_rows: int, n_cols: int, cell: int, max_pixels: int) -> tuple[int, int, int]:
    """Split an ``n_rows x n_cols`` grid of ``cell x cell`` cells into balanced tiles.

    Returns ``(images_per_pass, tile_rows, tile_cols)`` (in cells) such that
    ``images_per_pass * tile_rows * tile_cols * cell**2 <= max_pixels``; ``images_per_pass > 1``
    only when whole images fit.
    """
    max_cells = max_pixels // (cell * cell)
    if max_cells < 1:
        raise ValueError(f"max_pixels={max_pixels} is below one {cell}x{cell} cell "
                         f"({cell * cell} values); raise it")
    if n_rows * n_cols <= max_cells:
        return max_cells // (n_rows * n_cols), n_rows, n_cols
    col_tiles = math.ceil(n_cols / max_cells)
    tile_cols = math.ceil(n_cols / col_tiles)
    row_tiles = math.ceil(n_rows / max(1, max_cells // tile_cols))
    return 1, math.ceil(n_rows / row_tiles), tile_cols


def _space_to_batch(x: Tensor, s: int) -> Tensor:
    """``(B, C, H, W) -> (B*s*s, C, H//s, W//s)``: phase ``(py, px)`` holds ``x[..., py::s, px::s]``
    (trailing rows/columns beyond a multiple of ``s`` are dropped)."""
    b, c, h, w = x.shape
    h, w = h // s, w // s
    x = x[..., : h * s, : w * s].reshape(b, c, h, s, w, s)
    return x.permute(0, 3, 5, 1, 2, 4).reshape(b * s * s, c, h, w)


def _batch_to_space(x: Tensor, s: int) -> Tensor:
    """Inverse of :func:`_space_to_batch` (interleave the phases)."""
    bss, c, h, w = x.shape
    x = x.reshape(bss // (s * s), s, s, c, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(bss // (s * s), c, h * s, w * s)


Folded = dict[nn.Conv2d, tuple[Tensor, Tensor]]


def _fold_all(model: BagNet) -> Folded:
    """Folded weights of every conv + BatchNorm pair of the BagNet (computed once per call)."""
    pairs = [(model.conv2, model.bn1)]
    for idx in range(model.num_stages):
        for block in getattr(model, f"layer{idx + 1}"):
            pairs += [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
            if block.downsample is not None:
                pairs.append((block.downsample[0], block.downsample[1]))
    return {conv: folded_conv(conv, bn) for conv, bn in pairs}


def _conv_bn(conv: nn.Conv2d, folded: Folded, x: Tensor) -> Tensor:
    """``bn(conv(x))`` at stride 1 (whatever ``conv.stride`` is), BatchNorm folded in."""
    weight, bias = folded[conv]
    return F.conv2d(x, weight, bias, 1, conv.padding, conv.dilation, conv.groups)


def _dense_block(block: Bottleneck, folded: Folded, x: Tensor) -> tuple[Tensor, int]:
    """A bottleneck evaluated at every phase; returns the output and the stride it absorbed."""
    s = block.conv2.stride[0]
    out = F.relu_(_conv_bn(block.conv1, folded, x))
    out = F.relu_(_conv_bn(block.conv2, folded, out))
    if s > 1:  # the s*s phases of the stride-1 output go to the batch
        out = _space_to_batch(out, s)
        x = _space_to_batch(x, s)  # the strided 1x1 shortcut = stride-1 1x1 on each phase
    out = _conv_bn(block.conv3, folded, out)
    h, w = out.shape[-2:]
    x = x[..., :h, :w]  # crop before the 1x1 shortcut conv: only the kept positions are computed
    if block.downsample is not None:
        x = _conv_bn(block.downsample[0], folded, x)
    return F.relu_(out.add_(x)), s


def _dense_features(model: BagNet, folded: Folded, padded: Tensor) -> tuple[Tensor, list[int]]:
    """Patch features at every patch position, phases in the batch; returns the strides absorbed.

    Same arithmetic as ``model.patch_features`` up to rounding (BatchNorm is folded into the
    convolutions and strided convolutions run at stride 1)."""
    x = F.relu_(_conv_bn(model.conv2, folded, model.conv1(padded)))
    strides = []
    for idx in range(model.num_stages):
        for block in getattr(model, f"layer{idx + 1}"):
            x, s = _dense_block(block, folded, x)
            if s > 1:
                strides.append(s)
    return x, strides


def _tile_dense(model: BagNet, folded: Folded, tile: Tensor, targets: Tensor, rows: int,
                cols: int) -> Tensor:
    """Values of ``rows x cols`` patch positions (top-left corners) of padded ``tile``."""
    feats, strides = _dense_features(model, folded, tile)
    s_total = math.prod(strides)
    feats = feats[..., : rows // s_total, : cols // s_total]
    b = len(tile)
    reps = feats.shape[0] // b
    logits = _target_logits(model, feats, targets.repeat_interleave(reps, dim=0))
    for s in reversed(strides):
        logits = _batch_to_space(logits, s)
    return logits


def _tile_shift(model: BagNet, folded: Folded, tile: Tensor, targets: Tensor, rows: int,
                cols: int) -> Tensor:
    """Shift-and-stitch: the model on the ``stride**2`` shifts of ``tile``, interleaved."""
    s, q = model.stride, model.q
    gh, gw = rows // s, cols // s
    crop_h, crop_w = s * (gh - 1) + q, s * (gw - 1) + q
    shifted = torch.stack(
        [tile[:, :, dy : dy + crop_h, dx : dx + crop_w] for dy in range(s) for dx in range(s)], 1
    ).flatten(0, 1)  # (B*s*s, 3, crop_h, crop_w), image-major, then dy, then dx
    logits = _target_logits(model, model.patch_features(shifted), targets.repeat_interleave(s * s, 0))
    return _batch_to_space(logits, s)


@torch.inference_mode()
def heatmap(
    model: nn.Module,
    images: Tensor,
    targets: Targets,
    *,
    method: Method = "dense",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Tensor:
    """Full-resolution heatmaps ``(N, T, H, W)``, equal to :func:`reference_heatmap`.

    ``images``: normalised float ``(N, 3, H, W)`` (any size, any device/dtype);
    ``targets``: see :func:`target_matrix`; ``max_pixels``: most heatmap values computed by one
    forward pass (activation memory grows linearly with it); ``method``: ``"dense"`` or
    ``"shift"`` (module docstring). Requires an unpadded BagNet (``offset == 0``) in eval mode.
    """
    bag = check_bagnet(model)
    _check_images(images)
    if method not in ("dense", "shift"):
        raise ValueError(f"method must be 'dense' or 'shift', got {method!r}")
    if method == "dense" and not isinstance(bag, BagNet):
        raise ValueError(f"method='dense' needs a bagnet.models.BagNet, got {type(bag).__name__}; "
                         "use method='shift' (only needs patch_features and fc)")
    n, _, h, w = images.shape
    t = target_matrix(targets, n, bag.fc.out_features, images.device)
    s, q = bag.stride, bag.q
    padded = pad_for_patches(images, q, s)
    grid_h, grid_w = (padded.shape[-2] - q + 1) // s, (padded.shape[-1] - q + 1) // s
    per_pass, tile_h, tile_w = plan_tiles(grid_h, grid_w, s, max_pixels)
    compute = _tile_dense if method == "dense" else _tile_shift
    folded = _fold_all(bag) if method == "dense" else {}
    out = images.new_empty(n, t.shape[1], grid_h * s, grid_w * s)
    for b0 in range(0, n, per_pass):
        b1 = min(n, b0 + per_pass)
        for r0 in range(0, grid_h, tile_h):
            r1 = min(grid_h, r0 + tile_h)
            for c0 in range(0, grid_w, tile_w):
                c1 = min(grid_w, c0 + tile_w)
                tile = padded[b0:b1, :, s * r0 : s * r1 + q - 1, s * c0 : s * c1 + q - 1]
                values = compute(bag, folded, tile, t[b0:b1], s * (r1 - r0), s * (c1 - c0))
                if values.shape[-2:] != (s * (r1 - r0), s * (c1 - c0)):
                    raise RuntimeError(f"internal error: tile map {tuple(values.shape)} for "
                                       f"{s * (r1 - r0)}x{s * (c1 - c0)} positions")
                out[b0:b1, :, s * r0 : s * r1, s * c0 : s * c1] = values
    return out[..., :h, :w]


# --------------------------------------------------------------------------------------------
# The definition, patch by patch


def _patches(padded: Tensor, ys: Tensor, xs: Tensor, q: int) -> Tensor:
    """``(3, Hp, Wp)``, K top-left corners -> ``(K, 3, q, q)``."""
    ar = torch.arange(q, device=padded.device)
    rows, cols = ys[:, None] + ar, xs[:, None] + ar
    return padded[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)


@torch.inference_mode()
def reference_heatmap(
    model: nn.Module,
    images: Tensor,
    targets: Targets,
    *,
    pixels: Tensor | None = None,
    batch_size: int = 256,
) -> Tensor:
    """The definition evaluated patch by patch (as the original release does): every ``q x q``
    patch of the zero-padded image is cut out and run through ``model`` alone, ``batch_size``
    patches per forward pass.

    Returns ``(N, T, H, W)``, or with ``pixels`` (a ``(K, 2)`` tensor of ``(y, x)``) only those
    pixels: ``(N, T, K)``.
    """
    bag = check_bagnet(model)
    _check_images(images)
    n, _, h, w = images.shape
    t = target_matrix(targets, n, bag.fc.out_features, images.device)
    full = pixels is None
    if pixels is None:
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pixels = torch.stack([yy.flatten(), xx.flatten()], 1)
    pixels = torch.as_tensor(pixels, dtype=torch.long, device=images.device)
    if pixels.ndim != 2 or pixels.shape[1] != 2:
        raise ValueError(f"pixels must be (K, 2) (y, x) pairs, got shape {tuple(pixels.shape)}")
    if len(pixels) and ((pixels < 0).any() or (pixels[:, 0] >= h).any() or (pixels[:, 1] >= w).any()):
        raise ValueError(f"pixels outside the {h}x{w} image")
    padded = pad_for_patches(images, bag.q)
    out = images.new_empty(n, t.shape[1], len(pixels))
    for b in range(n):
        for k0 in range(0, len(pixels), batch_size):
            chunk = pixels[k0 : k0 + batch_size]
            logits = bag(_patches(padded[b], chunk[:, 0], chunk[:, 1], bag.q))
            out[b, :, k0 : k0 + len(chunk)] = logits[:, t[b]].T
    return out.view(n, t.shape[1], h, w) if full else out


@torch.no_grad()  # not inference_mode: callers may feed the result to modules with gradients
def patch_features_at(model: nn.Module, image: Tensor, y: int, x: int) -> Tensor:
    """Features ``(D,)`` of the ``q x q`` patch centred on pixel ``(y, x)`` of the zero-padded
    normalised ``image`` (``(3, H, W)`` or ``(1, 3, H, W)``): the vector ``fc`` turns into the
    heatmap values at ``(y, x)``."""
    bag = check_bagnet(model)
    image = image if image.ndim == 4 else image[None]
    _check_images(image)
    if len(image) != 1:
        raise ValueError(f"patch_features_at takes one image, got a batch of {len(image)}")
    h, w = image.shape[-2:]
    if not (0 <= y < h and 0 <= x < w):
        raise ValueError(f"pixel ({y}, {x}) is outside the {h}x{w} image")
    patch = pad_for_patches(image, bag.q)[:, :, y : y + bag.q, x : x + bag.q]
    return bag.patch_features(patch).flatten()
