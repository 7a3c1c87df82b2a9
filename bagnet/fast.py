"""Inference fast paths, each one a flag, each computing the same function as the eager model.

    from bagnet.fast import optimize_for_inference, inference_context
    fast = optimize_for_inference(model, channels_last=True, fold_bn=True, compile=False)
    with inference_context(device, precision="fp32"):        # inference_mode (+ bf16 autocast)
        logits = fast(to_channels_last(x))

- :func:`fold_batchnorm`: a copy of the model in which every eval-mode ``BatchNorm2d`` that reads
  the output of a ``Conv2d`` (and nothing else reads that output) is folded into the conv's
  weight and bias and replaced by ``nn.Identity``. The pairs are found by running the model once
  on an example input, so any architecture works: BagNet bottlenecks, downsample
  ``Sequential(conv, BN)`` and the stem ``conv2 -> bn1``; torchvision ResNet / VGG-BN; DenseNet's
  ``conv0 -> norm0`` and ``conv1 -> norm2`` (its BN -> ReLU -> conv pairs stay as they are).
  Methods other than ``forward`` (``patch_logits``, ``patch_features``) keep working.
- :func:`to_channels_last`: NHWC memory format for weights (and inputs).
- :func:`inference_context`: ``torch.inference_mode`` and optional bf16 autocast.
- :func:`compile_model`: ``torch.compile`` that falls back to the eager model (with a warning)
  when compilation is unavailable or fails on the example input.

No Ray here: ``bench/throughput.py`` runs these on machines without it.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from bagnet.config import require

__all__ = [
    "Precision",
    "PRECISIONS",
    "fold_batchnorm",
    "find_conv_bn_pairs",
    "to_channels_last",
    "inference_context",
    "autocast_context",
    "compile_model",
    "optimize_for_inference",
    "FastConfig",
    "compare_outputs",
]

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
DEFAULT_EXAMPLE_SIZE = 64  # side of the example input used to find conv -> BN pairs


# --------------------------------------------------------------------------------------------
# Batch-norm folding


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class _CountUses(TorchFunctionMode):
    """Counts, per tensor object, the torch calls that read its values.

    Only tensors passed to ``watch`` are counted. Calls that return no tensor (``size()``, ``dim()``, ``.shape``) only read metadata and are not
    counted. Nested calls are not seen (the mode is off while a call runs), so ``F.batch_norm``
    counts once, not again for the ``torch.batch_norm`` inside it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[int, int] = {}  # id -> count, for watched tensors only
        self._alive: list[Tensor] = []  # watched tensors stay alive, so their ids stay unique

    def watch(self, t: Tensor) -> None:
        self._alive.append(t)
        self.uses[id(t)] = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        if next(_tensors(out), None) is not None:
            for i in {id(t) for t in _tensors((args, kwargs or {}))}:
                if i in self.uses:
                    self.uses[i] += 1
        return out


def find_conv_bn_pairs(model: nn.Module, example_input: Tensor | None = None) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` of every ``Conv2d -> BatchNorm2d`` pair that can be folded.

    Runs ``model`` once on ``example_input`` (default: one ``3 x 64 x 64`` image on the model's
    device) under ``no_grad`` and pairs a BN with a conv when the BN's input *is* the conv's
    output (same tensor, not modified in place since), that output is read by nothing else, and
    both modules run exactly once. The model's train/eval mode is restored afterwards.
    """
    if example_input is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        example_input = torch.randn(1, 3, DEFAULT_EXAMPLE_SIZE, DEFAULT_EXAMPLE_SIZE, device=device)
    names = {m: n for n, m in model.named_modules()}
    calls: dict[str, int] = {}
    conv_out: dict[str, tuple[Tensor, int]] = {}  # conv name -> (output, its version)
    bn_in: dict[str, Tensor] = {}
    hooks = []
    counter = _CountUses()

    def on_conv(module: nn.Module, args: tuple, out: Tensor) -> None:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        conv_out[name] = (out, out._version)
        counter.watch(out)

    def on_bn(module: nn.Module, args: tuple) -> None:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        bn_in[name] = args[0]

    for module, name in names.items():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(on_conv))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(on_bn))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    by_output = {id(out): (name, version) for name, (out, version) in conv_out.items()}
    pairs = []
    for bn_name, x in bn_in.items():
        hit = by_output.get(id(x))
        if hit is None:
            continue
        conv_name, version = hit
        if (x._version == version and counter.uses.get(id(x), 0) == 1
                and calls[conv_name] == 1 and calls[bn_name] == 1):
            pairs.append((conv_name, bn_name))
    return pairs


def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | nn.Identity) -> tuple[Tensor, Tensor]:
    """Weight and bias of one convolution computing eval-mode ``bn(conv(x))`` (computed in float64,
    returned in ``conv``'s dtype). A BN that :func:`fold_batchnorm` already folded into ``conv``
    is an ``nn.Identity``: then ``conv``'s own weight and bias (zero if it has none)."""
    w = conv.weight
    if isinstance(bn, nn.Identity):
        return w, conv.bias if conv.bias is not None else w.new_zeros(conv.out_channels)
    with torch.no_grad():
        scale = bn.running_var.to(torch.float64).add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.to(torch.float64)
        shift = -bn.running_mean.to(torch.float64) * scale
        if conv.bias is not None:
            shift = shift + conv.bias.to(torch.float64) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(torch.float64)
        shape = (-1,) + (1,) * (w.dim() - 1)
        return (w.to(torch.float64) * scale.view(shape)).to(w.dtype), shift.to(w.dtype)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place (``conv`` gains a bias)."""
    w = conv.weight
    weight, bias = folded_conv(conv, bn)
    conv.weight = nn.Parameter(weight.contiguous(memory_format=_memory_format(w)), requires_grad=w.requires_grad)
    conv.bias = nn.Parameter(bias, requires_grad=w.requires_grad)


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fold_batchnorm(model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode with every foldable conv -> BN pair folded (inference only).

    ``example_input`` (default: one 64x64 image) is run once to find the pairs; the input must
    be one the model accepts. BNs without running statistics are left alone. The number of
    folded pairs is stored as ``folded_bn`` on the returned model.
    """
    model = copy.deepcopy(model).eval()
    pairs = find_conv_bn_pairs(model, example_input)
    folded = 0
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.running_mean is None or bn.running_var is None:
            continue
        _fold(conv, bn)
        _set_module(model, bn_name, nn.Identity())
        folded += 1
    model.folded_bn = folded  # type: ignore[assignment]
    return model


# --------------------------------------------------------------------------------------------
# Memory format, inference mode, precision, compile


def to_channels_last(obj: nn.Module | Tensor) -> Any:
    """A model (in place, returned) or a 4-d tensor (a copy) in channels-last (NHWC) memory."""
    if isinstance(obj, Tensor):
        return obj.contiguous(memory_format=torch.channels_last) if obj.dim() == 4 else obj
    return obj.to(memory_format=torch.channels_last)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def autocast_context(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``precision == "bf16"``, else a no-op."""
    _check_precision(precision)
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def inference_context(device: torch.device | str = "cpu", precision: str = "fp32",
                      inference_mode: bool = True) -> Iterator[None]:
    """``torch.inference_mode()`` (or ``no_grad`` with ``inference_mode=False``) plus bf16
    autocast for ``precision="bf16"``. Tensors made inside cannot be used for autograd later."""
    grad_ctx = torch.inference_mode() if inference_mode else torch.no_grad()
    with grad_ctx, autocast_context(device, precision):
        yield


def compile_model(model: nn.Module, example_input: Tensor | None = None, *, precision: str = "fp32",
                  **compile_kwargs: Any) -> nn.Module:
    """``torch.compile(model, **compile_kwargs)``, or ``model`` itself (with a warning) when
    compilation is unavailable or fails.

    Compilation is lazy: without ``example_input`` a failure would only surface at the first
    call, so pass one (it is run once in :func:`inference_context` with ``precision``, which
    compiles the model for that shape) to get the fallback. Attribute access (``patch_logits``,
    ``q``, ...) reaches the original module, uncompiled.
    """
    if not hasattr(torch, "compile"):
        warnings.warn("torch.compile is not available in this PyTorch; using the eager model", stacklevel=2)
        return model
    try:
        compiled = torch.compile(model, **compile_kwargs)
        if example_input is not None:
            device = example_input.device
            with inference_context(device, precision):
                compiled(example_input)
    except Exception as err:  # noqa: BLE001 - any compiler failure means "run eager"
        warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                      "using the eager model", stacklevel=2)
        return model
    return compiled


@dataclass
class FastConfig:
    """Which inference fast paths to apply (each a flag)."""

    channels_last: bool = True
    fold_bn: bool = True
    inference_mode: bool = True
    compile: bool = False
    precision: Precision = "fp32"

    def validate(self) -> None:
        require(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {self.precision!r}")

    def label(self) -> str:
        """Short name, e.g. ``"fold_bn+channels_last+inference_mode"`` (``"eager"`` for none)."""
        flags = [f for f in ("fold_bn", "channels_last", "inference_mode", "compile") if getattr(self, f)]
        if self.precision != "fp32":
            flags.append(self.precision)
        return "+".join(flags) or "eager"


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True, fold_bn: bool = True,
                           compile: bool = False, example_input: Tensor | None = None,
                           precision: str = "fp32", compile_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A new eval-mode model computing the same function faster; ``model`` is not modified.

    ``fold_bn`` folds conv -> BN pairs (:func:`fold_batchnorm`), ``channels_last`` converts the
    weights to NHWC (inputs in either layout work; :func:`to_channels_last` converts them too),
    ``compile`` wraps the result in :func:`compile_model`. ``example_input`` (default: one 64x64
    image) finds the BN pairs and, with ``compile``, is run once in ``precision`` to compile (and
    to fall back to eager if that fails). Run the result inside :func:`inference_context` for
    ``inference_mode`` and bf16.
    """
    _check_precision(precision)
    fast = fold_batchnorm(model, example_input) if fold_bn else copy.deepcopy(model).eval()
    if channels_last:
        to_channels_last(fast)
    if compile:
        example = example_input
        if example is not None and channels_last:
            example = to_channels_last(example)
        fast = compile_model(fast, example, precision=precision, **(compile_kwargs or {}))
    return fast


def compare_outputs(reference: Tensor, candidate: Tensor) -> dict[str, float]:
    """How far ``candidate`` logits are from ``reference``: ``max_abs_diff``, ``max_rel_diff``
    (max abs difference over the max abs reference value) and ``top1_agreement``."""
    ref, cand = reference.detach().float(), candidate.detach().float()
    diff = (ref - cand).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    agree = (ref.argmax(1) == cand.argmax(1)).float().mean().item() if ref.dim() == 2 and len(ref) else 1.0
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(scale, 1e-12), "top1_agreement": agree}
