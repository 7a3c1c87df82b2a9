"""BagNet-q (Brendel & Bethge, ICLR 2019), small comparison CNNs and the model zoo.

A BagNet is a ResNet-50-like network whose receptive field is limited to ``q x q`` pixels:
most bottlenecks use 1x1 convolutions and the 3x3 ones are unpadded, so every location of the
final feature map sees exactly one ``q x q`` input patch. Class evidence is computed per patch
(``patch_logits``) and averaged into the image logits (``forward``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

__all__ = [
    "BagNet",
    "bagnet",
    "bagnet9",
    "bagnet17",
    "bagnet33",
    "bagnet9_small",
    "bagnet17_small",
    "bagnet33_small",
    "resnet_small",
    "vgg_small",
    "densenet_small",
    "reachable_q",
    "create_model",
    "list_models",
    "model_q",
]

BN_MOMENTUM = 0.001  # the release's value; the small variants train with PyTorch's 0.1
EXPANSION = 4


class Bottleneck(nn.Module):
    """ResNet bottleneck with a 1x1 or 3x3 ``conv2``; the shortcut is cropped bottom/right."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        kernel_size: int = 1,
        padding: int = 0,
        downsample: nn.Module | None = None,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size, stride, padding, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        h, w = out.shape[-2:]
        if shortcut.shape[-2:] != (h, w):
            shortcut = shortcut[..., :h, :w]
        return self.relu(out + shortcut)


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


class BagNet(nn.Module):
    """BagNet with one optional 3x3 bottleneck (the first block) per stage.

    Attributes ``q`` (patch side, px), ``stride`` (px between neighbouring patches) and
    ``offset`` (input pixel of the top-left corner of patch (0, 0)); patch ``(i, j)`` covers
    rows ``offset + stride*i ... offset + stride*i + q - 1`` and columns likewise.
    """

    def __init__(
        self,
        kernel3: Sequence[bool],
        num_classes: int = 1000,
        width: int = 64,
        layers: Sequence[int] = (3, 4, 6, 3),
        strides: Sequence[int] = (2, 2, 2, 1),
        aligned: bool = False,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        if not (len(kernel3) == len(layers) == len(strides)):
            raise ValueError("kernel3, layers and strides must have one entry per stage")
        self.aligned = aligned
        pad = 1 if aligned else 0
        # (kernel, stride, padding) of every conv that changes geometry, in order.
        self._geometry: list[tuple[int, int, int]] = [(3, 1, pad)]
        self.conv1 = nn.Conv2d(3, width, 1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, 1, pad, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for idx, (k3, blocks, stride) in enumerate(zip(kernel3, layers, strides)):
            planes = width * 2**idx
            k, p = (3, pad) if k3 else (1, 0)
            self._geometry.append((k, stride, p))
            downsample = None
            if stride != 1 or inplanes != planes * EXPANSION:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * EXPANSION, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * EXPANSION, momentum=bn_momentum),
                )
            stage = [Bottleneck(inplanes, planes, stride, k, p, downsample, bn_momentum)]
            inplanes = planes * EXPANSION
            stage += [Bottleneck(inplanes, planes, bn_momentum=bn_momentum) for _ in range(1, blocks)]
            self.add_module(f"layer{idx + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes)

        q, jump, offset = 1, 1, 0
        for k, s, p in self._geometry:
            offset -= p * jump
            q += (k - 1) * jump
            jump *= s
        self.q, self.stride, self.offset = q, jump, offset

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patch_features(self, x: Tensor) -> Tensor:
        """Per-patch features ``(N, D, H', W')``."""
        x = self.relu(self.bn1(self.conv2(self.conv1(x))))
        for idx in range(self.num_stages):
            x = getattr(self, f"layer{idx + 1}")(x)
        return x

    def logits_from_features(self, features: Tensor) -> Tensor:
        """Apply ``fc`` at every location: ``(N, D, H', W') -> (N, C, H', W')``."""
        out = torch.einsum("ndhw,cd->nchw", features, self.fc.weight)
        return out + self.fc.bias[None, :, None, None]

    def patch_logits(self, x: Tensor) -> Tensor:
        """Per-patch class evidence ``(N, C, H', W')``; its spatial mean is ``forward(x)``."""
        return self.logits_from_features(self.patch_features(x))

    def forward(self, x: Tensor) -> Tensor:
        """Image logits ``(N, C)``: mean over locations of the patch logits."""
        return self.fc(self.patch_features(x).mean(dim=(2, 3)))

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Size ``(H', W')`` of the patch map for an input of ``height x width`` pixels."""
        for k, s, p in self._geometry:
            height, width = _conv_out(height, k, s, p), _conv_out(width, k, s, p)
        return height, width

    def patch_box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """Input box ``(top, left, bottom, right)`` (exclusive end) of patch ``(i, j)``.

        Not clipped: with ``aligned=True`` border boxes extend beyond the image.
        """
        top, left = self.offset + self.stride * i, self.offset + self.stride * j
        return top, left, top + self.q, left + self.q

    def extra_repr(self) -> str:
        return f"q={self.q}, stride={self.stride}, offset={self.offset}, aligned={self.aligned}"


def _stage_jumps(strides: Sequence[int]) -> list[int]:
    """Input spacing (px) of each stage's first conv2, given the stem has stride 1."""
    jumps, jump = [], 1
    for s in strides:
        jumps.append(jump)
        jump *= s
    return jumps


def _kernel3_options(strides: Sequence[int]) -> dict[int, tuple[bool, ...]]:
    """Map each reachable q to a choice of 3x3 stages (prefix, then fewest, then earliest)."""
    jumps = _stage_jumps(strides)
    n = len(strides)
    options: dict[int, tuple[bool, ...]] = {}
    def rank(c: tuple[bool, ...]) -> tuple[bool, int, list[int]]:
        is_prefix = all(c[i] >= c[i + 1] for i in range(n - 1))
        chosen = [i for i in range(n) if c[i]]
        return (not is_prefix, len(chosen), chosen)

    for c in sorted(itertools.product((False, True), repeat=n), key=rank):
        q = 3 + 2 * sum(j for j, on in zip(jumps, c) if on)
        options.setdefault(q, c)
    return options


def reachable_q(strides: Sequence[int] = (2, 2, 2, 1)) -> list[int]:
    """Patch sizes a BagNet with these stage strides can have."""
    return sorted(_kernel3_options(strides))


def bagnet(
    q: int,
    num_classes: int = 1000,
    width: int = 64,
    layers: Sequence[int] = (3, 4, 6, 3),
    strides: Sequence[int] = (2, 2, 2, 1),
    aligned: bool = False,
    bn_momentum: float = BN_MOMENTUM,
) -> BagNet:
    """BagNet-q: the stages given a 3x3 conv are chosen so the receptive field is ``q``.

    ``q = 3 + 2 * (sum of the input jumps of the stages with a 3x3 conv)``; the stem's 3x3
    contributes the 3. Raises ``ValueError`` if ``q`` is not reachable.
    """
    if len(layers) != len(strides):
        raise ValueError("layers and strides must have the same length")
    options = _kernel3_options(strides)
    if q not in options:
        raise ValueError(
            f"q={q} is not reachable with strides={tuple(strides)}; reachable: {sorted(options)}"
        )
    model = BagNet(options[q], num_classes, width, layers, strides, aligned, bn_momentum)
    assert model.q == q
    return model


def bagnet9(num_classes: int = 1000, **kw: Any) -> BagNet:
    """The paper's BagNet-9 (release file ``bagnet8-*.pth.tar``)."""
    return bagnet(9, num_classes, **kw)


def bagnet17(num_classes: int = 1000, **kw: Any) -> BagNet:
    """The paper's BagNet-17 (release file ``bagnet16-*.pth.tar``)."""
    return bagnet(17, num_classes, **kw)


def bagnet33(num_classes: int = 1000, **kw: Any) -> BagNet:
    """The paper's BagNet-33 (release file ``bagnet32-*.pth.tar``)."""
    return bagnet(33, num_classes, **kw)


def _small(q: int) -> Callable[..., BagNet]:
    def build(num_classes: int = 1000, **kw: Any) -> BagNet:
        kw = {"width": 16, "layers": (1, 1, 1, 1), "bn_momentum": 0.1, **kw}
        return bagnet(q, num_classes, **kw)

    build.__name__ = f"bagnet{q}_small"
    build.__doc__ = f"CPU-sized BagNet-{q}: width 16, one bottleneck per stage."
    return build


bagnet9_small = _small(9)
bagnet17_small = _small(17)
bagnet33_small = _small(33)


# --------------------------------------------------------------------------------------------
# Small comparison CNNs with an unconstrained receptive field (64x64 synthetic world).


class BasicBlock(nn.Module):
    """Padded two-3x3 residual block."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class SmallResNet(nn.Module):
    """Padded ResNet (basic blocks, widths 16-128, stride 8) with global average pooling."""

    def __init__(
        self,
        num_classes: int = 1000,
        widths: Sequence[int] = (16, 32, 64, 128),
        blocks: Sequence[int] = (1, 1, 1, 1),
    ) -> None:
        super().__init__()
        stem = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])]
        layers: list[nn.Module] = [*stem, nn.ReLU(inplace=True)]
        inplanes = widths[0]
        for idx, (w, n) in enumerate(zip(widths, blocks)):
            for b in range(n):
                layers.append(BasicBlock(inplanes, w, 2 if idx > 0 and b == 0 else 1))
                inplanes = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


VGG_SMALL_CFG: tuple[int | str, ...] = (16, 16, "M", 32, 32, "M", 64, 64, "M", 128, 128, "M")


class SmallVGG(nn.Module):
    """VGG-style stack of padded 3x3 conv + BN + ReLU and 2x2 max pools, global average pool."""

    def __init__(self, num_classes: int = 1000, cfg: Sequence[int | str] = VGG_SMALL_CFG) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        inplanes = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(inplanes, v, 3, 1, 1), nn.BatchNorm2d(v), nn.ReLU(True)]
                inplanes = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(inplanes, 256), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(256, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def resnet_small(num_classes: int = 1000, **kw: Any) -> SmallResNet:
    """Small padded ResNet for 64x64 images (receptive field 49 px)."""
    return SmallResNet(num_classes, **kw)


def vgg_small(num_classes: int = 1000, **kw: Any) -> SmallVGG:
    """Small VGG-style CNN for 64x64 images (receptive field 68 px)."""
    return SmallVGG(num_classes, **kw)


def densenet_small(num_classes: int = 1000, **kw: Any) -> torchvision.models.DenseNet:
    """torchvision's DenseNet with growth 12 and four 3-layer blocks."""
    kw = {"growth_rate": 12, "block_config": (3, 3, 3, 3), "num_init_features": 32, **kw}
    return torchvision.models.DenseNet(num_classes=num_classes, **kw)


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, **kw: Any) -> nn.Module:
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kw)

    build.__name__ = name
    return build


# --------------------------------------------------------------------------------------------
# Zoo

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "bagnet9": bagnet9,
    "bagnet17": bagnet17,
    "bagnet33": bagnet33,
    "bagnet9_small": bagnet9_small,
    "bagnet17_small": bagnet17_small,
    "bagnet33_small": bagnet33_small,
    "resnet_small": resnet_small,
    "vgg_small": vgg_small,
    "densenet_small": densenet_small,
    **{n: _torchvision(n) for n in ("vgg16", "resnet50", "resnet152", "densenet169")},
}
_Q = {
    "bagnet9": 9, "bagnet17": 17, "bagnet33": 33,
    "bagnet9_small": 9, "bagnet17_small": 17, "bagnet33_small": 33,
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(_BUILDERS)


def _check(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_BUILDERS)}")


def model_q(name: str) -> int | None:
    """Patch size of a zoo BagNet, ``None`` for the unconstrained CNNs."""
    _check(name)
    return _Q.get(name)


def create_model(
    name: str, num_classes: int = 1000, weights: Any = None, **kwargs: Any
) -> nn.Module:
    """Build zoo model ``name``; ``kwargs`` go to its builder (e.g. ``aligned=True``).

    ``weights`` is anything :func:`bagnet.weights.load_weights` accepts: a local or ``s3://``
    path, an https URL, ``"release"`` (or the model name) for the original BagNet checkpoints,
    or a torchvision weights name such as ``"IMAGENET1K_V1"`` / ``"DEFAULT"``.
    """
    _check(name)
    model = _BUILDERS[name](num_classes, **kwargs)
    model.zoo_name = name  # type: ignore[assignment]  # lets load_weights resolve names
    if weights is not None:
        from bagnet.weights import load_weights

        load_weights(model, weights, name=name)
    return model
