"""BagNet family, small CNNs, model zoo and checkpoint loading."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import Tensor, nn

from bagnet import weights as W
from bagnet.models import (
    BagNet,
    bagnet,
    bagnet9,
    bagnet17,
    bagnet33,
    create_model,
    list_models,
    model_q,
    reachable_q,
)

FULL = {9: bagnet9, 17: bagnet17, 33: bagnet33}
SMALL_NAMES = {9: "bagnet9_small", 17: "bagnet17_small", 33: "bagnet33_small"}
CNN_SMALL = ["resnet_small", "vgg_small", "densenet_small"]


def _gradient_support(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Boolean HxW mask of input pixels with a non-zero gradient of the scalar ``fn(x)``."""
    x = x.clone().requires_grad_(True)
    fn(x).backward()
    assert x.grad is not None
    return x.grad[0].abs().sum(0) != 0


def _box_mask(box: tuple[int, int, int, int], h: int, w: int) -> Tensor:
    top, left, bottom, right = box
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[max(top, 0) : max(bottom, 0), max(left, 0) : max(right, 0)] = True
    return mask


def _extent(mask: Tensor) -> tuple[int, int]:
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def _check_patch_support(
    model: BagNet, size: tuple[int, int], cells: list[tuple[int, int]]
) -> None:
    model = model.double().eval()
    x = torch.randn(1, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for i, j in cells:
        got = _gradient_support(lambda t: model.patch_logits(t)[0, :, i, j].sum(), x)
        assert torch.equal(got, _box_mask(model.patch_box(i, j), *size)), (model.q, i, j)


# ------------------------------------------------------------------ architecture / geometry


@pytest.mark.parametrize(
    "q,params,side", [(9, 15_688_744, 27), (17, 16_213_032, 26), (33, 18_310_184, 24)]
)
def test_release_architecture(q: int, params: int, side: int) -> None:
    model = FULL[q]()
    assert sum(p.numel() for p in model.parameters()) == params
    assert (model.q, model.stride, model.offset) == (q, 8, 0)
    assert model.patch_grid(224, 224) == (side, side)
    meta = model.eval().to("meta")
    out = meta.patch_features(torch.empty(1, 3, 224, 224, device="meta"))
    assert tuple(out.shape) == (1, 2048, side, side)


def test_release_state_dict_keys() -> None:
    model = bagnet33()
    keys = set(model.state_dict())
    for k in [
        "conv1.weight", "conv2.weight", "bn1.weight", "bn1.running_var",
        "layer1.0.conv1.weight", "layer1.0.bn2.running_mean", "layer1.0.conv3.weight",
        "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
        "layer1.2.bn3.bias", "layer3.5.conv2.weight", "layer4.0.downsample.1.running_var",
        "layer4.2.bn3.weight", "fc.weight", "fc.bias",
    ]:
        assert k in keys, k
    assert not any(k.startswith(("layer1.1.downsample", "layer5", "avgpool")) for k in keys)
    assert "conv1.bias" not in keys and "conv2.bias" not in keys
    assert model.conv1.weight.shape == (64, 3, 1, 1) and model.conv2.weight.shape == (64, 64, 3, 3)
    assert model.layer4[0].conv2.weight.shape == (512, 512, 3, 3)
    assert model.layer4[1].conv2.weight.shape == (512, 512, 1, 1)
    assert bagnet17().layer4[0].conv2.weight.shape == (512, 512, 1, 1)
    assert bagnet9().layer3[0].conv2.weight.shape == (256, 256, 1, 1)
    assert bagnet9().layer2[0].conv2.weight.shape == (128, 128, 3, 3)
    assert all(m.momentum == 0.001 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.fc.in_features == 2048


def test_reachable_q_and_errors() -> None:
    assert reachable_q() == list(range(3, 34, 2))
    assert bagnet(5, width=8, layers=(1, 1, 1, 1)).q == 5
    assert bagnet(3, width=8, layers=(1, 1, 1, 1)).q == 3
    with pytest.raises(ValueError, match=r"q=8 .*reachable.*33"):
        bagnet(8)
    with pytest.raises(ValueError, match="q=35"):
        bagnet(35)
    m = bagnet(9, num_classes=7, width=8, layers=(1, 2, 1, 1))
    assert m.fc.in_features == 8 * 32 and m.fc.out_features == 7 and len(m.layer2) == 2


@pytest.mark.parametrize("q", [9, 17, 33])
def test_receptive_field_small(q: int) -> None:
    model = create_model(SMALL_NAMES[q], num_classes=5)
    assert model_q(SMALL_NAMES[q]) == q
    h, w = model.patch_grid(64, 72)
    _check_patch_support(model, (64, 72), [(0, 0), (h // 2, w // 3), (h - 1, w - 1)])


@pytest.mark.parametrize("q", [9, 17, 33])
def test_receptive_field_full(q: int) -> None:
    model = FULL[q](num_classes=4)
    h, w = model.patch_grid(56, 56)
    _check_patch_support(model, (56, 56), [(0, 0), (h - 1, w - 1)])


@pytest.mark.parametrize("q", [9, 17, 33])
def test_patch_logits_are_exact_bag_of_patches(q: int) -> None:
    model = create_model(SMALL_NAMES[q], num_classes=6).double().eval()
    x = torch.randn(2, 3, 48, 56, dtype=torch.float64)
    with torch.no_grad():
        logits = model.patch_logits(x)
        for i, j in [(0, 0), (1, 2), (logits.shape[2] - 1, logits.shape[3] - 1)]:
            top, left, bottom, right = model.patch_box(i, j)
            single = model.patch_logits(x[:, :, top:bottom, left:right])
            assert single.shape[2:] == (1, 1)
            torch.testing.assert_close(single[:, :, 0, 0], logits[:, :, i, j])


def test_forward_is_mean_of_patch_logits_non_square() -> None:
    model = create_model("bagnet17_small", num_classes=10).eval()
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        feats, logits, out = model.patch_features(x), model.patch_logits(x), model(x)
    assert feats.shape == (3, 512, *model.patch_grid(64, 96))
    assert logits.shape == (3, 10, *model.patch_grid(64, 96))
    assert out.shape == (3, 10)
    torch.testing.assert_close(logits.mean(dim=(2, 3)), out, rtol=1e-5, atol=1e-5)


def test_aligned_geometry() -> None:
    model = create_model("bagnet33_small", num_classes=5, aligned=True)
    assert (model.q, model.stride, model.offset) == (33, 8, -16)
    assert model.patch_grid(64, 70) == (8, 9)  # ceil(n / 8)
    assert bagnet9(aligned=True).patch_grid(224, 224) == (28, 28)
    assert bagnet9(aligned=True).offset == -4
    x = torch.randn(1, 3, 64, 70)
    with torch.no_grad():
        assert model.eval().patch_logits(x).shape[2:] == (8, 9)
    assert model.patch_box(0, 0) == (-16, -16, 17, 17)
    assert model.patch_box(4, 5) == (16, 24, 49, 57)
    # Border boxes are clipped to the image; interior ones are full q x q.
    _check_patch_support(model, (64, 70), [(0, 0), (4, 5), (7, 8)])


def test_aligned_interior_exact_border_not() -> None:
    model = create_model("bagnet17_small", num_classes=3, aligned=True).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    shifted = nn.functional.pad(x, (16, 0, 16, 0))  # zero-padded input, moved by 2 patches
    with torch.no_grad():
        a, b = model.patch_logits(x), model.patch_logits(shifted)
    # Interior patches see only image pixels: same evidence wherever they are.
    torch.testing.assert_close(b[:, :, 6, 6], a[:, :, 4, 4])
    # Patch (0, 0) overhangs the image; zero padding inside the network is not the same as
    # a zero-padded input patch (which patch (2, 2) of ``shifted`` sees).
    assert model.patch_box(0, 0) == (-8, -8, 9, 9)
    assert not torch.allclose(b[:, :, 2, 2], a[:, :, 0, 0])


# ------------------------------------------------------------------ small CNNs and zoo


@pytest.mark.parametrize("name", CNN_SMALL)
def test_small_cnns_have_large_receptive_field(name: str) -> None:
    model = create_model(name, num_classes=10).eval()
    assert model_q(name) is None
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (8, 10)
    feats = model.features  # every small CNN exposes its conv trunk as .features
    h, w = feats(x[:1]).shape[2:]
    support = _gradient_support(lambda t: feats(t)[0, :, h // 2, w // 2].sum(), x[:1])
    assert min(_extent(support)) > 33


def test_any_torchvision_classifier_by_name() -> None:
    """Models outside the project's registry come from torchvision's own, with any head size."""
    import torchvision

    names = set(list_models())
    assert set(torchvision.models.list_models(module=torchvision.models)) <= names
    model = create_model("mobilenet_v3_small", num_classes=7).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7) and model_q("mobilenet_v3_small") is None
    with pytest.raises(ValueError, match="unknown model 'no_such_net'"):
        create_model("no_such_net")


def test_saved_spec_restores_the_trained_function(tmp_path) -> None:
    """A model.pt carries name, options and classes: loading without options rebuilds the aligned
    net it was trained as; asking for other options refuses, naming the option."""
    from bagnet.models import ModelSpec, model_bytes

    trained = create_model("bagnet17_small", num_classes=5, aligned=True).eval()
    path = tmp_path / "model.pt"
    path.write_bytes(model_bytes(trained, ModelSpec("bagnet17_small", 5, {"aligned": True}, list("abcde"))))
    loaded = create_model("bagnet17_small", weights=str(path)).eval()
    x = torch.randn(2, 3, 48, 48)
    assert loaded.aligned and loaded.model_spec.classes == list("abcde")
    assert torch.equal(loaded(x), trained(x))
    with pytest.raises(ValueError, match="option aligned=True, not False"):
        create_model("bagnet17_small", weights=str(path), aligned=False)
    with pytest.raises(ValueError, match="num_classes=5, not 10"):
        create_model("bagnet17_small", num_classes=10, weights=str(path))
    with pytest.raises(ValueError, match="of model 'bagnet17_small', not 'bagnet33_small'"):
        create_model("bagnet33_small", weights=str(path))
    with pytest.raises(ValueError, match="has no option 'aligned'"):
        create_model("resnet_small", aligned=True)


def test_saved_spec_compares_options_with_the_builders_own_defaults(tmp_path) -> None:
    """Weights saved without an option were trained with the builder's default: restating that
    default (the small BagNets' width 16, not bagnet()'s 64; a list for a tuple) loads, another
    value refuses naming the default."""
    from bagnet.models import model_bytes

    trained = create_model("bagnet9_small", num_classes=4).eval()
    path = tmp_path / "model.pt"
    path.write_bytes(model_bytes(trained, trained.model_spec))
    loaded = create_model("bagnet9_small", weights=str(path), width=16, layers=[1, 1, 1, 1], aligned=False).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), trained(x))
    with pytest.raises(ValueError, match="option width=16, not 32"):
        create_model("bagnet9_small", weights=str(path), width=32)


def test_zoo_builds_everything() -> None:
    names = list_models()
    assert set(names) >= {
        "bagnet9", "bagnet17", "bagnet33", "bagnet9_small", "bagnet17_small", "bagnet33_small",
        "resnet_small", "vgg_small", "densenet_small", "vgg16", "resnet50", "resnet152",
        "densenet169",
    }
    x = torch.randn(1, 3, 64, 64)
    for name in list_models(builtin_only=True) + ["vgg16", "resnet50", "resnet152", "densenet169"]:
        model = create_model(name, num_classes=10).eval()
        assert model.zoo_name == name
        if name in ("vgg16", "resnet50", "resnet152", "densenet169"):
            assert model_q(name) is None
            head = model.fc if name.startswith("resnet") else model.classifier
            last = head[-1] if isinstance(head, nn.Sequential) else head
            assert last.out_features == 10
            continue
        with torch.no_grad():
            assert model(x).shape == (1, 10)
    assert create_model("bagnet33", num_classes=10, width=8).fc.in_features == 256


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="known models: .*bagnet33"):
        create_model("bagnet34")
    with pytest.raises(ValueError, match="unknown model"):
        model_q("alexnet_v9")
    assert model_q("alexnet") is None  # torchvision's, an unconstrained CNN


# ------------------------------------------------------------------ weights


def _randomised(model: nn.Module) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }


def _assert_loaded(model: nn.Module, state: dict[str, Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize(
    "fmt", ["plain.pt", "state_dict.pth.tar", "model.pth", "module_prefix.pth.tar"]
)
def test_load_local(tmp_path, fmt: str) -> None:
    state = _randomised(create_model("bagnet9_small", num_classes=10))
    obj: object = state
    if fmt.startswith("state_dict"):
        obj = {"state_dict": state, "epoch": 3, "arch": "bagnet9"}
    elif fmt.startswith("model"):
        obj = {"model": state}
    elif fmt.startswith("module"):
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / fmt
    torch.save(obj, path)
    _assert_loaded(create_model("bagnet9_small", num_classes=10, weights=str(path)), state)
    _assert_loaded(W.load_weights(create_model("bagnet9_small", num_classes=10), path), state)


def test_shape_mismatch_names_key(tmp_path) -> None:
    path = tmp_path / "ck.pt"
    torch.save(create_model("bagnet9_small", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match=r"fc\.weight"):
        create_model("bagnet9_small", num_classes=5, weights=str(path))
    model = create_model("bagnet9_small", num_classes=5)
    with pytest.warns(UserWarning, match=r"fc\.weight"):
        W.load_weights(model, path, strict=False)


def _no_network(*args, **kwargs):
    raise AssertionError("network must not be used")


def test_url_served_from_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BAGNET_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    url = "https://example.org/models/tiny-0123abcd.pth"
    assert W.cache_path(url) == tmp_path / "example.org" / "models" / "tiny-0123abcd.pth"
    state = _randomised(create_model("bagnet33_small", num_classes=4))
    W.cache_path(url).parent.mkdir(parents=True)
    torch.save(state, W.cache_path(url))
    _assert_loaded(create_model("bagnet33_small", num_classes=4, weights=url), state)


def test_release_name_served_from_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BAGNET_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    assert W.resolve_url("release", "bagnet33") == W.RELEASE_URLS["bagnet33"]
    assert W.RELEASE_URLS["bagnet33"].endswith("/bagnet32-2ddd53ed.pth.tar")
    assert W.resolve_url("bagnet16") == W.RELEASE_URLS["bagnet17"]
    state = _randomised(bagnet9())
    W.cache_path(W.RELEASE_URLS["bagnet9"]).parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, W.cache_path(W.RELEASE_URLS["bagnet9"]))
    _assert_loaded(create_model("bagnet9", weights="release"), state)
    _assert_loaded(create_model("bagnet9", weights="bagnet9"), state)
    with pytest.raises(ValueError, match="no released weights"):
        create_model("bagnet9_small", weights="release")


@pytest.mark.parametrize("name,weights", [("bagnet33", "release"), ("resnet50", "IMAGENET1K_V1")])
def test_offline_error_names_url_and_cache_path(tmp_path, monkeypatch, name, weights) -> None:
    monkeypatch.setenv("BAGNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = W.resolve_url(weights, name)
    assert url is not None
    with pytest.raises(RuntimeError) as info:
        W.load_weights(nn.Linear(1, 1), weights, name=name)
    assert url in str(info.value)
    assert str(W.cache_path(url)) in str(info.value) and str(tmp_path) in str(W.cache_path(url))


def test_torchvision_weight_names() -> None:
    tv = torchvision.models
    assert W.resolve_url("IMAGENET1K_V1", "resnet50") == tv.ResNet50_Weights.IMAGENET1K_V1.url
    assert W.resolve_url("DEFAULT", "resnet152") == tv.ResNet152_Weights.DEFAULT.url
    full = "ResNet50_Weights.IMAGENET1K_V2"
    assert W.resolve_url(full) == tv.ResNet50_Weights.IMAGENET1K_V2.url
    assert W.resolve_url("IMAGENET1K_V1", "densenet169") == tv.DenseNet169_Weights.IMAGENET1K_V1.url
    with pytest.raises(ValueError, match="cannot resolve"):
        W.load_weights(nn.Linear(1, 1), "NOPE_V9", name="resnet50")


def test_legacy_densenet_keys(tmp_path) -> None:
    state = _randomised(create_model("densenet_small", num_classes=3))
    legacy = {
        k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2.")
        .replace("norm2.", "norm.2.").replace("conv1.", "conv.1."): v
        for k, v in state.items()
    }
    assert legacy != state
    torch.save(legacy, tmp_path / "dn.pth")
    model = create_model("densenet_small", num_classes=3, weights=str(tmp_path / "dn.pth"))
    _assert_loaded(model, state)
