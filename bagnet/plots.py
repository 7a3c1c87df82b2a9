"""Pictures of patch evidence (matplotlib, Agg): heatmaps over images, galleries, and the most
informative patches per class (the paper's figure).

    python -m bagnet.plots --out docs/img/heatmap-gallery.png --top-out docs/img/top-patches.png

Heatmaps use a diverging colormap centred on zero (red: evidence for the target class, blue:
against), clipped at a percentile of ``|value|``, with the image's edges (Sobel magnitude of the
grayscale image) drawn on top in black.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
from PIL import Image
from torch import nn

from bagnet.heatmap import check_bagnet, coarse_heatmap, heatmap
from bagnet.imagenet import to_model_input
from bagnet.models import create_model
from bagnet.synthetic import SyntheticWorld
from store import storage

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

__all__ = [
    "edge_map",
    "symmetric_limit",
    "draw_heatmap",
    "figure_png",
    "figure_files",
    "Heat",
    "heatmap_grid_figure",
    "heatmap_grid_png",
    "gallery_png",
    "save_gallery",
    "TopPatch",
    "crop_patch",
    "top_patches",
    "top_patches_figure",
    "top_patches_png",
    "save_top_patches",
    "main",
]

CMAP = "RdBu_r"
DEFAULT_WEIGHTS = "results/train/synthetic/model.pt"


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _smooth(g: np.ndarray) -> np.ndarray:
    """Separable binomial ``[1, 2, 1] / 4`` blur (suppresses pixel noise before Sobel)."""
    p = np.pad(g, 1, mode="edge")
    g = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    return (g[:-2] + 2 * g[1:-1] + g[2:]) / 4


def edge_map(image: np.ndarray, smooth: bool = True) -> np.ndarray:
    """Sobel gradient magnitude of the grayscale ``H x W x 3`` uint8 image (after a binomial
    blur when ``smooth``), scaled to [0, 1]."""
    g = _numpy(image).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if smooth:
        g = _smooth(g)
    p = np.pad(g, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.hypot(gx, gy)
    top = mag.max()
    return mag / top if top > 0 else mag


def symmetric_limit(values, percentile: float = 99.0) -> float:
    """Colour limit: the ``percentile`` of ``|values|`` (1.0 for an all-zero map)."""
    v = float(np.percentile(np.abs(_numpy(values)), percentile))
    return v if v > 0 else 1.0


def draw_heatmap(ax, heat, image: np.ndarray | None = None, *, stride: int = 1,
                 origin: float = 0.0, percentile: float = 99.0, edges: bool = True,
                 edge_threshold: float = 0.3, edge_quantile: float = 0.9, limit: float | None = None):
    """Draw ``heat`` (``h x w``) on ``ax``; returns the image artist.

    Entry ``(i, j)`` is centred on image pixel ``(origin + stride*i, origin + stride*j)``
    (``stride=1, origin=0`` for full-resolution maps; ``model.stride`` and
    ``offset + (q-1)/2`` for coarse ones). With ``image`` its edges are drawn on top: pixels whose
    :func:`edge_map` exceeds both ``edge_threshold`` and its ``edge_quantile``.
    """
    heat = _numpy(heat).astype(np.float32)
    h, w = heat.shape
    lim = symmetric_limit(heat, percentile)
    half = stride / 2
    extent = (origin - half, origin + stride * (w - 1) + half,
              origin + stride * (h - 1) + half, origin - half)
    art = ax.imshow(heat, cmap=CMAP, vmin=-lim, vmax=lim, extent=extent,
                    interpolation="nearest")
    if image is not None:
        img_h, img_w = image.shape[:2]
        if edges:
            e = edge_map(image)
            rgba = np.zeros((img_h, img_w, 4), np.float32)
            cut = max(edge_threshold, float(np.quantile(e, edge_quantile)))
            rgba[..., 3] = np.where(e > cut, np.clip(0.2 + 0.6 * e, 0, 0.8), 0.0)
            ax.imshow(rgba, extent=(-0.5, img_w - 0.5, img_h - 0.5, -0.5),
                      interpolation="nearest")
        ax.set_xlim(-0.5, img_w - 0.5)
        ax.set_ylim(img_h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    return art


def figure_png(fig, *, colors: int | None = 256, dpi: float | None = None, tight: bool = False) -> bytes:
    """Render and close ``fig`` as PNG bytes (at ``dpi``, default the figure's; ``tight``: cropped
    to the drawn area); with ``colors``, as an adaptive palette (small files). The one PNG encoder
    of the project's pictures and the report's charts."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    if colors is None:
        return buf.getvalue()
    buf.seek(0)
    out = io.BytesIO()
    image = Image.open(buf).convert("RGB").quantize(colors, method=Image.Quantize.FASTOCTREE)
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def figure_files(fig, *, dpi: float | None = None, tight: bool = False) -> dict[str, bytes]:
    """Render and close ``fig`` as ``{"png": ..., "svg": ...}`` (the PNG as :func:`figure_png`;
    the SVG keeps its text as text)."""
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "bagnet"}):  # stable files
        fig.savefig(buf, format="svg", bbox_inches="tight" if tight else None, metadata={"Date": None})
    return {"png": figure_png(fig, dpi=dpi, tight=tight), "svg": buf.getvalue()}


def _write(path: str, data: bytes) -> None:
    storage.write_bytes_atomic(path, data)
    print(f"wrote {path} ({len(data) / 1024:.0f} KiB)", flush=True)


@dataclass(frozen=True)
class Heat:
    """One heatmap and where its entries sit: entry ``(i, j)`` is centred on image pixel
    ``(origin + stride*i, origin + stride*j)`` (see :func:`draw_heatmap`)."""

    values: np.ndarray
    stride: int = 1
    origin: float = 0.0


def heatmap_grid_figure(images: Sequence[np.ndarray] | None, rows: Sequence[Sequence[Heat | None]],
                        titles: Sequence[str] | None = None, *, row_labels: Sequence[str] | None = None,
                        percentile: float = 99.0, suptitle: str | None = None, cell: float = 1.6,
                        dpi: int = 100, colorbar: str | None = None, fontsize: float = 7):
    """A grid with one column per image: the images on top (when given, ``H x W x 3`` uint8), then
    one row of heatmaps per entry of ``rows`` (a None cell is left empty). Each row may place its
    maps differently (coarse or full resolution). With ``colorbar`` (its label), the maps of a row
    share one colour scale (the ``percentile`` of the row's ``|values|``) shown by a colour bar
    at the row's end; without, each map is scaled on its own."""
    columns = len(images) if images is not None else max((len(r) for r in rows), default=0)
    top = 1 if images is not None else 0
    head = 0.45 if suptitle else 0.0
    fig, axes = plt.subplots(len(rows) + top, columns, dpi=dpi, squeeze=False,
                             figsize=(cell * columns + 0.3 + (1.0 if colorbar else 0.0),
                                      cell * (len(rows) + top) + 0.3 + head),
                             layout="constrained" if colorbar else None)
    for j in range(columns):
        if images is not None:
            axes[0, j].imshow(images[j], interpolation="nearest")
            axes[0, j].set_xticks([])
            axes[0, j].set_yticks([])
        if titles is not None:
            axes[0, j].set_title(titles[j], fontsize=fontsize)
    for r, cells in enumerate(rows, start=top):
        shown = [h.values for h in cells if h is not None]
        limit = symmetric_limit(np.concatenate([np.ravel(v) for v in shown]), percentile) if colorbar and shown else None
        art = None
        for j, heat in enumerate(cells):
            if heat is None:
                axes[r, j].axis("off")
                continue
            art = draw_heatmap(axes[r, j], heat.values, images[j] if images is not None else None,
                               stride=heat.stride, origin=heat.origin, percentile=percentile, limit=limit)
        if row_labels is not None:
            axes[r, 0].set_ylabel(row_labels[r - top], fontsize=fontsize)
        if colorbar and art is not None:
            bar = fig.colorbar(art, ax=list(axes[r]), fraction=0.03, pad=0.01, aspect=12)
            bar.set_label(colorbar, fontsize=fontsize - 1)
            bar.ax.tick_params(labelsize=fontsize - 1)
    if suptitle:
        fig.suptitle(suptitle, fontsize=fontsize + 1)
    if not colorbar:
        fig.tight_layout(pad=0.3, h_pad=0.4, w_pad=0.2)
    return fig


def heatmap_grid_png(images: Sequence[np.ndarray] | None, rows: Sequence[Sequence[Heat | None]],
                     titles: Sequence[str] | None = None, *, row_labels: Sequence[str] | None = None,
                     percentile: float = 99.0, suptitle: str | None = None, cell: float = 1.6,
                     dpi: int = 100) -> bytes:
    """PNG of :func:`heatmap_grid_figure` (each map on its own colour scale)."""
    return figure_png(heatmap_grid_figure(images, rows, titles, row_labels=row_labels, percentile=percentile,
                                          suptitle=suptitle, cell=cell, dpi=dpi))


def gallery_png(images: np.ndarray, heatmaps, titles: Sequence[str] | None = None, *,
                row_labels: Sequence[str] | None = None, stride: int = 1, origin: float = 0.0,
                percentile: float = 99.0, suptitle: str | None = None, cell: float = 1.6,
                dpi: int = 100) -> bytes:
    """PNG of a gallery: one column per image; the image on top, then one heatmap per target.

    ``images``: uint8 ``N x H x W x 3``; ``heatmaps``: ``(N, H, W)`` or ``(N, T, h, w)`` (arrays or
    tensors); ``stride``/``origin`` place coarse maps (see :func:`draw_heatmap`).
    """
    images = _numpy(images)
    maps = _numpy(heatmaps)
    if maps.ndim == 3:
        maps = maps[:, None]
    if images.ndim != 4 or maps.ndim != 4 or len(images) != len(maps):
        raise ValueError(f"images {images.shape} and heatmaps {maps.shape} do not match: expected "
                         "N x H x W x 3 and (N, H, W) or (N, T, h, w)")
    rows = [[Heat(maps[j, k], stride, origin) for j in range(len(maps))] for k in range(maps.shape[1])]
    return heatmap_grid_png(list(images), rows, titles, row_labels=row_labels, percentile=percentile,
                            suptitle=suptitle, cell=cell, dpi=dpi)


def save_gallery(images: np.ndarray, heatmaps, path: str, titles: Sequence[str] | None = None,
                 **kw) -> None:
    """Write :func:`gallery_png` to ``path`` (local or ``s3://``, atomically)."""
    _write(path, gallery_png(images, heatmaps, titles, **kw))


# --------------------------------------------------------------------------------------------
# Most informative patches per class


@dataclass
class TopPatch:
    cls: int
    value: float  # the class logit of this patch (its coarse-map entry)
    image_index: int  # running index over the images given to top_patches
    top: int  # input box of the patch (model.patch_box), may extend beyond an aligned image
    left: int
    pixels: np.ndarray  # q x q x 3 uint8 (zeros outside the image)


def crop_patch(image: np.ndarray, top: int, left: int, q: int) -> np.ndarray:
    """The ``q x q`` patch of ``image`` (``H x W x 3`` uint8) with top-left pixel ``(top, left)``;
    zeros where it extends beyond the image (aligned BagNets, border patches)."""
    h, w = image.shape[:2]
    out = np.zeros((q, q, 3), np.uint8)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + q, h), min(left + q, w)
    out[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return out


@torch.inference_mode()
def top_patches(model: nn.Module, batches: Iterable[np.ndarray] | np.ndarray, *, k: int = 8,
                classes: Sequence[int] | None = None,
                device: torch.device | str | None = None) -> dict[int, list[TopPatch]]:
    """For each class, the ``k`` model patches with the highest class logit across the images.

    ``batches``: uint8 ``N x H x W x 3`` arrays (an iterable of them, or one array); the patches
    are the model's own (coarse map, stride ``model.stride``). Sorted by value, best first.
    """
    bag = check_bagnet(model, full_resolution=False)
    if isinstance(batches, np.ndarray):
        batches = [batches]
    classes = list(range(bag.fc.out_features)) if classes is None else list(classes)
    device = torch.device(device) if device is not None else next(bag.parameters()).device
    dtype = next(bag.parameters()).dtype
    best: dict[int, list[TopPatch]] = {c: [] for c in classes}
    seen = 0
    for batch in batches:
        batch = _numpy(batch)
        maps = coarse_heatmap(bag, to_model_input(batch, device).to(dtype), classes)
        n, _, gh, gw = maps.shape
        flat = maps.permute(1, 0, 2, 3).reshape(len(classes), -1)
        values, idx = flat.topk(min(k, flat.shape[1]), dim=1)
        for ci, c in enumerate(classes):
            for v, f in zip(values[ci].tolist(), idx[ci].tolist()):
                b, i, j = f // (gh * gw), (f // gw) % gh, f % gw
                top, left, _, _ = bag.patch_box(i, j)
                best[c].append(TopPatch(c, v, seen + b, top, left, crop_patch(batch[b], top, left, bag.q)))
            best[c] = sorted(best[c], key=lambda p: -p.value)[:k]
        seen += n
    return best


def top_patches_png(result: dict[int, list[TopPatch]], class_names: Sequence[str] | None = None,
                    *, upscale: int = 2, title: str | None = None, dpi: int = 100) -> bytes:
    """PNG of :func:`top_patches_figure`."""
    return figure_png(top_patches_figure(result, class_names, upscale=upscale, title=title, dpi=dpi))


def top_patches_figure(result: dict[int, list[TopPatch]], class_names: Sequence[str] | None = None,
                       *, upscale: int = 2, title: str | None = None, dpi: int = 100, fontsize: float = 7):
    """A grid: one row per class, its best patches left to right with their logits."""
    classes = list(result)
    k = max((len(v) for v in result.values()), default=0)
    if not classes or k == 0:
        raise ValueError("no patches to draw")
    q = next(p.pixels.shape[0] for v in result.values() for p in v)
    side = q * upscale / dpi
    label_w = 1.5
    fig, axes = plt.subplots(len(classes), k, dpi=dpi, squeeze=False,
                             figsize=(label_w + k * (side + 0.08), len(classes) * (side + 0.22) + 0.5))
    for r, c in enumerate(classes):
        for j in range(k):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(result[c]):
                p = result[c][j]
                ax.imshow(p.pixels, interpolation="nearest")
                ax.set_title(f"{p.value:.2f}", fontsize=fontsize - 1, pad=1)
            else:
                ax.axis("off")
        name = class_names[c] if class_names is not None else f"class {c}"
        axes[r, 0].set_ylabel(name, fontsize=fontsize, rotation=0, ha="right", va="center")
    fig.suptitle(title or f"top {k} patches per class (q={q}; number = class logit)", fontsize=fontsize + 1)
    fig.subplots_adjust(left=label_w / fig.get_figwidth(), right=0.99, bottom=0.01, top=0.93,
                        wspace=0.08, hspace=0.35)
    return fig


def save_top_patches(result: dict[int, list[TopPatch]], path: str,
                     class_names: Sequence[str] | None = None, **kw) -> None:
    """Write :func:`top_patches_png` to ``path`` (local or ``s3://``, atomically)."""
    _write(path, top_patches_png(result, class_names, **kw))


# --------------------------------------------------------------------------------------------
# CLI: pictures on the synthetic world


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bagnet.plots", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Heatmap gallery and top patches of a BagNet on the synthetic world.\n\n"
        f"--weights auto (default) uses {DEFAULT_WEIGHTS} (written by `python jobs/train.py`) "
        "if it exists, else a randomly initialised model (said in the output and the picture).")
    p.add_argument("--model", default="bagnet33_small")
    p.add_argument("--weights", default="auto", help="path/URL, 'auto' or 'none' (random init)")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    p.add_argument("--split", default="val")
    p.add_argument("--target", choices=("label", "top1"), default="label")
    p.add_argument("--method", choices=("dense", "shift"), default="dense")
    p.add_argument("--out", default="docs/img/heatmap-gallery.png", help="gallery PNG")
    p.add_argument("--top-out", default=None, help="also write the top-patches PNG here")
    p.add_argument("--top-images", type=int, default=512, help="images searched for top patches")
    p.add_argument("--k", type=int, default=8, help="patches per class")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    a = _parse(argv)
    torch.manual_seed(a.seed)  # a random-init model is reproducible too
    world = SyntheticWorld(seed=a.seed, image_size=a.image_size)
    weights = a.weights
    if weights == "auto":
        weights = DEFAULT_WEIGHTS if os.path.exists(DEFAULT_WEIGHTS) else "none"
    random_init = weights == "none"
    if random_init:
        print(f"no weights (none given and {DEFAULT_WEIGHTS} does not exist): using a RANDOMLY "
              "INITIALISED model; the maps show no learned evidence", flush=True)
    model = create_model(a.model, world.num_classes, weights=None if random_init else weights)
    model = model.eval().to(a.device)
    source = "random init" if random_init else f"weights {os.path.basename(str(weights))}"
    print(f"{a.model} (q={model.q}) from {source}; {a.num_images} {a.split} images", flush=True)

    names = [c.name for c in world.classes]
    batch = world.batch(range(a.num_images), a.split)
    x = to_model_input(batch["image"], a.device)
    with torch.inference_mode():
        pred = model(x).argmax(1).cpu()
    label = torch.as_tensor(batch["label"])
    targets = (label if a.target == "label" else pred)[:, None].to(a.device)
    maps = heatmap(model, x, targets, method=a.method)[:, 0]
    titles = [f"{names[int(y)]}\npred {names[int(p)]}" for y, p in zip(label, pred)]
    save_gallery(batch["image"], maps, a.out, titles,
                 suptitle=f"{a.model} ({source}): full-resolution evidence for the "
                 f"{a.target} class (red for, blue against; 99th-pct clip; edges in black)")
    if a.top_out:
        chunks = (world.batch(range(i, min(i + 128, a.top_images)), a.split)["image"]
                  for i in range(0, a.top_images, 128))
        best = top_patches(model, chunks, k=a.k, device=a.device)
        save_top_patches(best, a.top_out, names,
                         title=f"{a.model} ({source}): the {a.k} patches with the highest class "
                         f"logit among {a.top_images} {a.split} images")


if __name__ == "__main__":
    main()
