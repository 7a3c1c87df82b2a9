"""Each inference fast path of bagnet.fast computes the same function as the eager model.

torch.compile: the wrapper is checked with the ``eager`` dynamo backend on one tiny model
(graph capture + fallback); inductor code generation is exercised by ``bench/throughput.py
--fast compile,fast+compile`` only (minutes on 2 CPU cores).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bagnet.fast import (compare_outputs, compile_model, find_conv_bn_pairs, fold_batchnorm,
                         inference_context, optimize_for_inference, to_channels_last)
from bagnet.models import create_model

RTOL = 1e-4  # fp32: max |fast - eager| / max |eager|
SMALL = {  # model -> (input side, BNs that must be folded)
    "bagnet33_small": (64, 17),  # stem bn1, 3 per bottleneck x 4, 4 downsample BNs: all
    "resnet_small": (64, 12),
    "vgg_small": (64, 8),
    "densenet_small": (64, 13),  # norm0 + norm2 of 12 dense layers; BN -> ReLU -> conv stay
}


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model.eval()


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(create_model(name, num_classes=10))


def _input(side: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return compare_outputs(ref, out)["max_rel_diff"]


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_fold_batchnorm_same_function(name):
    side, expected = SMALL[name]
    model, x = _model(name), _input(side)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert folded.folded_bn == expected
    assert _count_bn(folded) == _count_bn(model) - expected
    with torch.no_grad():
        assert _rel(model(x), folded(x)) < RTOL
    # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fold_keeps_bagnet_methods_and_geometry():
    model, x = _model("bagnet33_small"), _input(64)
    folded = fold_batchnorm(model)
    assert (folded.q, folded.stride, folded.offset) == (model.q, model.stride, model.offset)
    with torch.no_grad():
        assert _rel(model.patch_logits(x), folded.patch_logits(x)) < RTOL
    # the stem conv2 -> bn1 and the downsample Sequential(conv, BN) are folded
    assert isinstance(folded.bn1, nn.Identity) and folded.conv2.bias is not None
    assert isinstance(folded.layer1[0].downsample[1], nn.Identity)


def test_fold_full_size_bagnet9_small_input():
    model, x = _model("bagnet9"), _input(40, n=1)
    folded = fold_batchnorm(model, x)
    assert folded.folded_bn == 53 and _count_bn(folded) == 0
    with torch.no_grad():
        assert _rel(model(x), folded(x)) < RTOL


class _SharedOutput(nn.Module):
    """conv output read by the BN *and* by the residual add: folding would change the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _InplaceBetween(nn.Module):
    """conv -> in-place ReLU -> BN: same tensor object, but not the conv's output any more."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.relu(self.conv(x)))


class _BnFirst(nn.Module):
    """BN -> conv (pre-activation order) is not a conv -> BN pair."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(x))


@pytest.mark.parametrize("cls", [_SharedOutput, _InplaceBetween, _BnFirst])
def test_unsafe_pairs_are_not_folded(cls):
    model = _randomise_bn(cls())
    x = _input(8)
    assert find_conv_bn_pairs(model, x) == []
    folded = fold_batchnorm(model, x)
    assert folded.folded_bn == 0
    with torch.no_grad():
        assert torch.equal(model(x), folded(x))


def test_find_pairs_restores_train_mode():
    model = create_model("resnet_small", num_classes=10).train()
    assert len(find_conv_bn_pairs(model, _input(32))) == 12
    assert model.training


@pytest.mark.parametrize("name", sorted(SMALL))
def test_optimize_for_inference_same_function(name):
    side, _ = SMALL[name]
    model, x = _model(name), _input(side)
    fast = optimize_for_inference(model, channels_last=True, fold_bn=True)
    assert fast is not model and not fast.training
    assert any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast.parameters() if p.dim() == 4)
    with torch.no_grad():
        ref = model(x)
    with inference_context("cpu", "fp32"):
        out = fast(to_channels_last(x))
        out_nchw = fast(x)  # NCHW inputs work too
    assert out.is_inference()
    assert _rel(ref, out) < RTOL and _rel(ref, out_nchw) < RTOL


def test_channels_last_only_and_inference_mode_only():
    model, x = _model("bagnet33_small"), _input(64)
    with torch.no_grad():
        ref = model(x)
    cl = optimize_for_inference(model, channels_last=True, fold_bn=False)
    assert _count_bn(cl) == _count_bn(model)
    with torch.no_grad():
        assert _rel(ref, cl(to_channels_last(x))) < RTOL
    with inference_context("cpu", "fp32", inference_mode=True):
        assert torch.equal(model(x), ref)


def test_bf16_autocast_cpu_close():
    model, x = _model("bagnet33_small"), _input(64, n=4)
    fast = optimize_for_inference(model)
    with torch.no_grad():
        ref = model(x)
    with inference_context("cpu", "bf16"):
        out = fast(to_channels_last(x))
    assert out.dtype == torch.bfloat16
    assert _rel(ref, out) < 5e-2  # bf16 keeps 8 bits of mantissa
    with pytest.raises(ValueError, match="precision"):
        with inference_context("cpu", "fp16"):
            pass


def test_compile_wrapper_eager_backend_same_function():
    torch._dynamo.reset()
    model, x = _model("bagnet9_small"), _input(32)
    compiled = compile_model(model, x, backend="eager")
    assert compiled is not model
    with torch.no_grad():
        ref = model(x)
    with inference_context("cpu"):
        assert _rel(ref, compiled(x)) < RTOL
    assert compiled.q == model.q  # attributes reach the original module


def test_compile_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    model = _model("resnet_small")
    with pytest.warns(UserWarning, match="torch.compile failed"):
        assert compile_model(model, _input(32)) is model
    with pytest.warns(UserWarning, match="torch.compile failed"):
        fast = optimize_for_inference(model, compile=True, example_input=_input(32))
    assert isinstance(fast, nn.Module) and fast.folded_bn == 12
