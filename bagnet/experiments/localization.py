"""Localization against ground truth: does an explanation point at the motifs that decide the class?

On the synthetic world every image's class evidence has known pixel boxes
(:meth:`bagnet.synthetic.SyntheticWorld.evidence_boxes`). For each scored image and each
explanation method, the attribution map for the image's label (summed over colour channels,
``H x W``) is scored against the union ``M`` of those boxes (grown by ``tolerance`` px):

- ``energy_in_boxes``: energy-based pointing game (Wang et al. 2020, Score-CAM): the share of the
  map's positive part inside ``M``, ``sum(relu(A)[M]) / sum(relu(A))`` (NaN for a map without
  positive values);
- ``max_in_boxes``: pointing game (Zhang et al. 2016): whether the map's maximum (the first in
  row-major order) lies inside ``M``;
- ``box_fraction``: the share of the image ``M`` covers, i.e. the energy score of a uniform map.

Methods (captum, baselines 0 = the dataset mean of the normalised image):

- ``bagnet_heatmap``: the BagNet's own full-resolution patch-evidence map (BagNets only; an
  aligned BagNet's coarse map, each patch's logit painted over its stride cell, instead);
- ``integrated_gradients`` (``ig_steps`` steps), ``saliency`` (absolute gradient),
  ``deeplift`` (a ReLU module called several times per pass gets one module per call for the
  attribution, as DeepLIFT needs),
  ``occlusion`` (``occlusion_window`` px windows every ``occlusion_stride`` px);
- ``gradcam``: ``LayerGradCam`` on the last spatial feature map before pooling (the module a
  forward pass completes last with a 4-D output larger than 1 x 1: ``layer4`` of a BagNet; the
  ``layer`` column names it), bilinearly upsampled to the image; models with convolutions only.

Only images with a split index below ``images`` are scored (the first ``images`` of the split),
so the default run stays cheap whatever ``data.test_size`` is.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import torch
from captum.attr import DeepLift, IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency
from torch import Tensor, nn

from bagnet.config import require
from bagnet.experiments.base import CustomSection, ExperimentContext
from bagnet.experiments.perturb import Box, boxes_mask, require_values
from bagnet.heatmap import check_bagnet, coarse_heatmap, heatmap
from bagnet.synthetic import SyntheticWorld

TABLE = "localization"
DATASETS = ("synthetic",)  # the only data with ground-truth boxes
METHODS: tuple[str, ...] = ("bagnet_heatmap", "integrated_gradients", "saliency", "deeplift", "occlusion", "gradcam")
SCHEMA = pa.schema([
    ("method", pa.string()),
    ("layer", pa.string()),  # gradcam: the module whose feature map it reads; "" otherwise
    ("energy_in_boxes", pa.float64()),
    ("max_in_boxes", pa.bool_()),
    ("box_fraction", pa.float64()),
])
REPORT = CustomSection("explanations")
# captum's notices on every call (inputs made to require gradients, hooks set on ReLUs): expected here
CAPTUM_NOTICES = ("Input Tensor .* did not already require gradients", "Setting forward, backward hooks")


@dataclass
class Params:
    """Methods, images scored and the methods' cost knobs; defaults are cheap at 64 px."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    images: int = 16  # score images with split index < images
    tolerance: int = 0  # px each box grows by on every side
    ig_steps: int = 16
    occlusion_window: int = 8
    occlusion_stride: int = 8

    def validate(self) -> None:
        require_values(self.methods, "methods")
        bad = [m for m in self.methods if m not in METHODS]
        require(not bad, "methods", f"unknown method(s) {bad}; known: {list(METHODS)}")
        require(self.images >= 1, "images", f"must be >= 1, got {self.images}")
        require(self.tolerance >= 0, "tolerance", f"must be >= 0, got {self.tolerance}")
        require(self.ig_steps >= 1, "ig_steps", f"must be >= 1, got {self.ig_steps}")
        require(self.occlusion_window >= 1, "occlusion_window", f"must be >= 1, got {self.occlusion_window}")
        require(1 <= self.occlusion_stride <= self.occlusion_window, "occlusion_stride",
                f"must be in 1..occlusion_window, got {self.occlusion_stride}")


# --------------------------------------------------------------------------------------------
# Scores of one map


def evidence_mask(boxes: list[Box], height: int, width: int, tolerance: int = 0) -> Tensor:
    """Boolean ``(H, W)`` union of ``boxes``, each grown by ``tolerance`` px (clipped)."""
    t = tolerance
    return boxes_mask([(a - t, b - t, c + t, d + t) for a, b, c, d in boxes], height, width, "cpu")


def energy_in_boxes(attribution: Tensor, mask: Tensor) -> float:
    """Share of the positive part of ``attribution`` ``(H, W)`` inside ``mask`` (NaN if none is positive)."""
    positive = attribution.float().clamp(min=0)
    total = float(positive.sum())
    return float(positive[mask].sum()) / total if total > 0 else float("nan")


def max_in_boxes(attribution: Tensor, mask: Tensor) -> bool:
    """Whether the first maximum (row-major) of ``attribution`` ``(H, W)`` lies inside ``mask``."""
    return bool(mask.flatten()[int(attribution.flatten().argmax())])


# --------------------------------------------------------------------------------------------
# Attribution maps (N, H, W) for the labels


def forward_with_hooks(model: nn.Module, example: Tensor, hooks: list) -> None:
    """One gradient-free forward pass of ``example`` with ``hooks`` registered, removed after it."""
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()


def gradcam_layer(model: nn.Module, example: Tensor) -> tuple[str, nn.Module] | None:
    """Grad-CAM's layer: the module whose feature map (a 4-D output larger than 1 x 1) a forward
    pass of ``example`` completes last, i.e. the last spatial features before pooling (for a
    BagNet ``layer4``), with its name; None for a model without convolutions or such a map."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return None
    done: list[str] = []
    modules = dict(model.named_modules())

    def record(name: str):
        def hook(_module: nn.Module, _args: tuple, out: object) -> None:
            if isinstance(out, Tensor) and out.ndim == 4 and out.shape[-1] * out.shape[-2] > 1:
                done.append(name)
        return hook

    forward_with_hooks(model, example, [m.register_forward_hook(record(name)) for name, m in modules.items() if name])
    return (done[-1], modules[done[-1]]) if done else None


class _ReluCallSites(nn.Module):
    """Stands in for a ReLU module called ``calls`` times per forward pass: call ``i`` goes to
    its own ``nn.ReLU`` (DeepLIFT keeps each ReLU's input and output, so one module must not
    serve two calls of a pass)."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.sites = nn.ModuleList(nn.ReLU() for _ in range(calls))
        self.next = 0

    def forward(self, x: Tensor) -> Tensor:
        relu = self.sites[self.next]
        self.next = (self.next + 1) % len(self.sites)
        return relu(x)


@contextmanager
def unshared_relus(model: nn.Module, example: Tensor) -> Iterator[nn.Module]:
    """``model`` with each ReLU module that a forward pass of ``example`` calls more than once
    replaced by a :class:`_ReluCallSites` inside the block, and restored after it (in place: a
    copy would also copy the hooks others hold on the model)."""
    calls: Counter[str] = Counter()
    forward_with_hooks(model, example, [m.register_forward_pre_hook(lambda _m, _a, name=name: calls.update([name]))
                                        for name, m in model.named_modules() if isinstance(m, nn.ReLU)])
    originals = {name: model.get_submodule(name) for name, count in calls.items() if count > 1}
    try:
        for name in originals:
            model.set_submodule(name, _ReluCallSites(calls[name]))
        yield model
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)


def bagnet_map(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """The BagNet heatmap of each label: full resolution, or for an aligned BagNet the coarse map,
    each pixel taking the value of the patch whose centre is nearest (clipped to the grid)."""
    try:
        return heatmap(check_bagnet(model), images, labels.view(-1, 1))[:, 0]
    except ValueError:
        bag = check_bagnet(model, full_resolution=False)
        coarse = coarse_heatmap(bag, images, labels.view(-1, 1))[:, 0]
        first_centre = bag.offset + (bag.q - 1) // 2

        def nearest(size: int, cells: int) -> Tensor:
            pixels = torch.arange(size, device=images.device)
            return torch.div(pixels - first_centre + bag.stride // 2, bag.stride, rounding_mode="floor").clamp(0, cells - 1)

        rows, cols = nearest(images.shape[-2], coarse.shape[-2]), nearest(images.shape[-1], coarse.shape[-1])
        return coarse[:, rows][:, :, cols]


def attribution_maps(method: str, model: nn.Module, images: Tensor, labels: Tensor,
                     params: Params, batch_size: int) -> Tensor:
    """``(N, H, W)`` attribution of each image's label by ``method``, summed over channels."""
    if method == "bagnet_heatmap":
        return bagnet_map(model, images, labels).float()
    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        for notice in CAPTUM_NOTICES:
            warnings.filterwarnings("ignore", message=notice, category=UserWarning)
        x, y = images.clone(), labels.clone()  # normal tensors even if the caller is in inference mode
        if method == "integrated_gradients":
            attr = IntegratedGradients(model).attribute(
                x, baselines=torch.zeros_like(x), target=y, n_steps=params.ig_steps, internal_batch_size=batch_size)
        elif method == "saliency":
            attr = Saliency(model).attribute(x, target=y, abs=True)
        elif method == "deeplift":
            with unshared_relus(model, x[:1]) as unshared:
                attr = DeepLift(unshared).attribute(x, baselines=torch.zeros_like(x), target=y)
        elif method == "occlusion":
            c, w, s = x.shape[1], params.occlusion_window, params.occlusion_stride
            attr = Occlusion(model).attribute(x, sliding_window_shapes=(c, w, w), strides=(c, s, s), baselines=0,
                                              target=y, perturbations_per_eval=max(1, batch_size // len(x)))
        elif method == "gradcam":
            _, layer = gradcam_layer(model, x[:1])  # type: ignore[misc]
            cam = LayerGradCam(model, layer).attribute(x, target=y)
            attr = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
        else:
            raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
        return attr.detach().float().sum(1)


def methods_for(model: nn.Module, methods: list[str]) -> list[str]:
    """``methods`` defined for ``model``: the BagNet heatmap for BagNets, Grad-CAM with a conv layer."""
    def defined(m: str) -> bool:
        if m == "bagnet_heatmap":
            return hasattr(model, "patch_logits")
        return m != "gradcam" or any(isinstance(layer, nn.Conv2d) for layer in model.modules())
    return [m for m in methods if defined(m)]


def world_of(ctx: ExperimentContext, experiment: str) -> SyntheticWorld:
    """The synthetic world of the run, or a ValueError saying that the experiment needs it."""
    if ctx.world is None:
        raise ValueError(f"{experiment} experiment on {ctx.model_name!r}: needs the synthetic world "
                         "(data.dataset: synthetic, given as ctx.world); these images come without one")
    return ctx.world


def run(model: nn.Module, images: Tensor, labels: Tensor, params: Params, *,
        ctx: ExperimentContext) -> list[dict]:
    """Rows ``(image, method)`` for the images with split index < ``params.images``."""
    params.validate()
    world = world_of(ctx, "localization")
    keep = [n for n, i in enumerate(ctx.image_ids) if world.parse_image_id(i)[1] < params.images]
    if not keep:
        return []
    images, labels = images[keep], labels[keep]
    ids = [ctx.image_ids[n] for n in keep]
    height, width = images.shape[-2:]
    masks = [evidence_mask(world.ground_truth(i), height, width, params.tolerance) for i in ids]
    layer = gradcam_layer(model, images[:1]) if "gradcam" in params.methods else None
    rows = []
    for method in methods_for(model, params.methods):
        maps = attribution_maps(method, model, images, labels, params, ctx.batch_size).cpu()
        for n, (image_id, mask) in enumerate(zip(ids, masks)):
            rows.append({
                "image_id": image_id, "label": int(labels[n]), "method": method,
                "layer": layer[0] if method == "gradcam" and layer else "",
                "energy_in_boxes": energy_in_boxes(maps[n], mask), "max_in_boxes": max_in_boxes(maps[n], mask),
                "box_fraction": float(mask.float().mean()),
            })
    return rows


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per ``(model, method)``, methods in ``METHODS`` order: images, mean ``energy_in_boxes`` (NaN
    maps left out), pointing-game hit rate, mean ``box_fraction`` and the layer Grad-CAM read."""
    data = df.assign(model=df["model"].astype(str), method=pd.Categorical(df["method"], list(METHODS)))
    grouped = data.groupby(["model", "method"], sort=True, observed=True)
    out = grouped.agg(images=("image_id", "size"), energy_in_boxes=("energy_in_boxes", "mean"),
                      pointing_game=("max_in_boxes", "mean"), box_fraction=("box_fraction", "mean"),
                      layer=("layer", "first"))
    return out.reset_index().assign(method=lambda t: t["method"].astype(str))
