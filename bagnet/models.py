"""BagNet-q (Brendel & Bethge, ICLR 2019), small comparison CNNs and the model zoo.

A BagNet is a ResNet-50-like network whose receptive field is limited to ``q x q`` pixels:
most bottlenecks use 1x1 convolutions and the 3x3 ones are unpadded, so every location of the
final feature map sees exactly one ``q x q`` input patch. Class evidence is computed per patch
(``patch_logits``) and averaged into the image logits (``forward``).
"""

from __future__ import annotations

import functools
import inspect
import io
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from bagnet.weights import load_weights, read_saved

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
    "ModelInfo",
    "ModelSpec",
    "register_model",
    "model_info",
    "check_options",
    "OptionError",
    "create_model",
    "model_bytes",
    "check_input_size",
    "saved_classes",
    "class_difference",
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


def _variant(q: int, name: str, doc: str, **defaults: Any) -> Callable[..., BagNet]:
    """``bagnet(q, ...)`` under ``name``, with its own option defaults in its signature (which
    :func:`create_model` reads to compare options with a saved spec)."""
    build = functools.partial(bagnet, q, **defaults)
    build.__name__, build.__doc__ = name, doc  # type: ignore[attr-defined]
    return build


bagnet9 = _variant(9, "bagnet9", "The paper's BagNet-9 (release file ``bagnet8-*.pth.tar``).")
bagnet17 = _variant(17, "bagnet17", "The paper's BagNet-17 (release file ``bagnet16-*.pth.tar``).")
bagnet33 = _variant(33, "bagnet33", "The paper's BagNet-33 (release file ``bagnet32-*.pth.tar``).")


def _small(q: int) -> Callable[..., BagNet]:
    return _variant(q, f"bagnet{q}_small", f"CPU-sized BagNet-{q}: width 16, one bottleneck per stage.",
                    width=16, layers=(1, 1, 1, 1), bn_momentum=0.1)


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


# --------------------------------------------------------------------------------------------
# The registry: every model known by name, with its patch size and builder options.

# aligned: padded 3x3 convs (patches centred on the stride grid); the rest sizes the network.
BAGNET_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "aligned": bool, "width": int, "layers": (list, tuple), "strides": (list, tuple), "bn_momentum": float}


@dataclass(frozen=True)
class ModelInfo:
    """A model known by name: its builder ``(num_classes, **options) -> nn.Module``, its patch size
    ``q`` (None for a CNN with an unconstrained receptive field) and the options a config may set."""

    name: str
    builder: Callable[..., nn.Module]
    q: int | None = None
    options: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    source: str = "bagnet"  # "bagnet" (this module) or "torchvision"


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(*, q: int | None = None, options: dict[str, type | tuple[type, ...]] | None = None,
                   name: str | None = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder under ``name`` (default: its ``__name__``)."""
    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is registered twice")
        _REGISTRY[key] = ModelInfo(key, builder, q, dict(options or {}))
        return builder
    return add


for _builder, _q in ((bagnet9, 9), (bagnet17, 17), (bagnet33, 33),
                     (bagnet9_small, 9), (bagnet17_small, 17), (bagnet33_small, 33)):
    register_model(q=_q, options=BAGNET_OPTIONS)(_builder)
for _builder in (resnet_small, vgg_small, densenet_small):
    register_model()(_builder)


def _torchvision_classifiers() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_info(name: str) -> ModelInfo:
    """The registered model ``name``, else torchvision's classification model of that name."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _torchvision_classifiers():
        def build(num_classes: int = 1000, **kw: Any) -> nn.Module:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
        return ModelInfo(name, build, None, {}, "torchvision")
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)} and torchvision's "
                     "classification models (torchvision.models.list_models(module=torchvision.models))")


def list_models(builtin_only: bool = False) -> list[str]:
    """Names accepted by :func:`create_model`: the registered ones, then torchvision's."""
    return list(_REGISTRY) if builtin_only else [*_REGISTRY, *_torchvision_classifiers()]


def model_q(name: str) -> int | None:
    """Patch size of a BagNet, ``None`` for the unconstrained CNNs."""
    return model_info(name).q


class OptionError(ValueError):
    """A builder option a model does not declare, or of the wrong type; ``.option`` names it."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise :class:`OptionError` unless every option is one model ``name`` declares,
    with a value of the declared type."""
    declared = model_info(name).options
    for key, value in options.items():
        if key not in declared:
            known = ", ".join(declared) or "none"
            raise OptionError(f"model {name!r} has no option {key!r} (its options: {known})", key)
        types = declared[key] if isinstance(declared[key], tuple) else (declared[key],)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join(t.__name__ for t in types)
            raise OptionError(f"model {name!r} option {key!r} must be {wanted}, got {value!r}", key)


# --------------------------------------------------------------------------------------------
# Building, and the spec a saved model carries


@dataclass(frozen=True)
class ModelSpec:
    """What decides a model's function besides its weights: name, options, number of classes
    (and the class names, for reading its predictions). Saved inside ``model.pt``."""

    name: str
    num_classes: int
    options: dict[str, Any] = field(default_factory=dict)
    classes: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "options": dict(self.options),
                "classes": list(self.classes) if self.classes is not None else None}


def model_bytes(model: nn.Module, spec: ModelSpec) -> bytes:
    """``model``'s state_dict with its spec, as the bytes of a ``model.pt`` file (plain tensors and
    plain data: ``torch.load(weights_only=True)`` reads it)."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model_spec": spec.to_dict(), "state_dict": state}, buf)
    return buf.getvalue()


def _check_spec(saved: Mapping[str, Any], name: str, num_classes: int | None, options: Mapping[str, Any],
                source: str) -> tuple[int, dict[str, Any]]:
    """The number of classes and options to build with for weights saved with spec ``saved``:
    the saved ones, unless the caller set one differently, which raises naming it."""
    if saved["name"] != name:
        raise ValueError(f"weights {source} are of model {saved['name']!r}, not {name!r}")
    if num_classes is not None and num_classes != saved["num_classes"]:
        raise ValueError(f"weights {source} were trained with num_classes={saved['num_classes']}, "
                         f"not {num_classes}")
    saved_options = saved.get("options", {})
    for key in sorted(options):
        was = saved_options.get(key, _option_default(name, key))
        if _plain(options[key]) != _plain(was):
            raise ValueError(f"weights {source} were trained with option {key}={was!r}, not {options[key]!r}; "
                             f"build the model with {key}={was!r}")
    return saved["num_classes"], {**saved_options, **options}


def _plain(value: Any) -> Any:
    """Tuples as lists, so ``layers=[1, 1, 1, 1]`` from a YAML config equals the default ``(1, 1, 1, 1)``."""
    return list(value) if isinstance(value, tuple) else value


def _option_default(name: str, key: str) -> Any:
    """The default of option ``key`` in model ``name``'s builder signature (None if it has none)."""
    parameter = inspect.signature(model_info(name).builder).parameters.get(key)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def create_model(
    name: str, num_classes: int | None = None, weights: Any = None, **options: Any
) -> nn.Module:
    """Build model ``name`` with builder ``options`` (e.g. ``aligned=True``) and load ``weights``.

    ``weights`` is anything :func:`bagnet.weights.load_weights` accepts: a local or ``s3://``
    path, an https URL, ``"release"`` (or the model name) for the original BagNet checkpoints,
    or a torchvision weights name such as ``"IMAGENET1K_V1"`` / ``"DEFAULT"``. Weights saved with
    a spec (a ``model.pt`` of this project) restore the function they were trained as: its
    options and number of classes, unless one is given differently, which raises naming it.
    ``num_classes`` defaults to the spec's, else 1000.
    """
    info = model_info(name)
    check_options(name, options)
    saved = read_saved(weights, name) if weights is not None else None
    if saved is not None and saved.spec is not None:
        num_classes, options = _check_spec(saved.spec, name, num_classes, options, str(weights))
    model = info.builder(num_classes or 1000, **options)
    model.zoo_name = name  # type: ignore[assignment]  # lets load_weights resolve names
    model.model_spec = ModelSpec(name, num_classes or 1000, dict(options),  # type: ignore[assignment]
                                 saved.spec.get("classes") if saved is not None and saved.spec else None)
    if saved is not None:
        load_weights(model, saved.state_dict, name=name, source=str(weights))
    return model


def check_input_size(name: str, size: int, options: Mapping[str, Any] | None = None) -> None:
    """ValueError unless model ``name`` (with builder ``options``) runs on ``size`` x ``size``
    images: a BagNet needs at least its patch size q; any model is tried on the meta device (shapes
    only: no memory, no compute), which catches kernels larger than a feature map."""
    q = model_q(name)
    if q is not None and size < q:
        raise ValueError(f"{name} sees {q}x{q} px patches and cannot run on {size} px images")
    with torch.device("meta"):
        model = model_info(name).builder(2, **(options or {})).eval()
        try:
            model(torch.empty(1, 3, size, size))
        except (RuntimeError, ValueError, AssertionError) as err:
            raise ValueError(f"{name} cannot run on {size} px images ({str(err).splitlines()[0]})") from None


def saved_classes(weights: Any) -> list[str] | None:
    """The class names (in label order) saved with ``weights`` (a ``model.pt`` of this project),
    None for weights saved without them."""
    spec = read_saved(weights).spec
    classes = spec.get("classes") if spec else None
    return list(classes) if classes is not None else None


def class_difference(saved: Sequence[str] | None, classes: Sequence[str]) -> str | None:
    """How class list ``classes`` differs from ``saved`` (the first differing label), or None when
    they agree or nothing was saved."""
    if saved is None or list(saved) == list(classes):
        return None
    for i, (a, b) in enumerate(zip(saved, classes)):
        if a != b:
            return f"label {i} is {a!r} in the weights, {b!r} in the dataset"
    return f"{len(saved)} classes in the weights, {len(classes)} in the dataset"
