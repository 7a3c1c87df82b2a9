"""Heatmaps: the fast full-resolution map equals the patch-by-patch definition; coarse maps,
memory bound, errors, pictures, the experiment module and the benchmark harness."""

from __future__ import annotations

import copy
import csv
import functools

import numpy as np
import pytest
import torch
from torch import nn

from bagnet.config import ConfigError, from_dict
from bagnet.experiments import EXPERIMENTS, ExperimentContext
from bagnet.experiments import heatmaps as hm_exp
from bagnet.heatmap import (
    coarse_heatmap,
    heatmap,
    patch_features_at,
    plan_tiles,
    reference_heatmap,
    target_matrix,
)
from bagnet.models import create_model

NUM_CLASSES = 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, **kw) -> nn.Module:
    """Eval-mode model with non-trivial BatchNorm statistics (so BN is not the identity)."""
    torch.manual_seed(seed)
    model = create_model(name, NUM_CLASSES, **kw)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.2)
    if hasattr(model, "fc"):
        nn.init.normal_(model.fc.weight, 0, 0.5)
    return model.eval().to(dtype)


def images(n: int, h: int, w: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_equal_to_rounding(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel:g} x max |value| {scale:.3g}"


TARGETS = [1, 4]
CASES = [("bagnet9_small", 2, 19, 26), ("bagnet17_small", 2, 23, 18), ("bagnet33_small", 1, 17, 19)]


@functools.lru_cache(maxsize=None)
def reference_case(name: str, n: int, h: int, w: int):
    """float64 model, images and their patch-by-patch reference for TARGETS (shared by tests)."""
    model, x = make(name), images(n, h, w)
    return model, x, reference_heatmap(model, x, TARGETS, batch_size=512)


@pytest.mark.parametrize("name,n,h,w", CASES)
def test_full_map_equals_patch_by_patch_definition(name, n, h, w):
    model, x, ref = reference_case(name, n, h, w)
    for method in ("dense", "shift"):
        out = heatmap(model, x, TARGETS, method=method)
        assert out.shape == (n, 2, h, w)
        assert_equal_to_rounding(out, ref, 1e-12)  # float64: identical up to rounding


def test_full_map_of_a_fast_path_model_is_the_same():
    """``bagnet.fast`` (BN folded into the convs, channels-last) computes the same map."""
    from bagnet.fast import optimize_for_inference

    model, x, ref = reference_case(*CASES[0])
    fast = optimize_for_inference(model, example_input=x[:1])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # all folded
    for method in ("dense", "shift"):
        assert_equal_to_rounding(heatmap(fast, x, TARGETS, method=method), ref, 1e-12)


def test_large_odd_image_equals_the_definition_on_sampled_pixels():
    model, x = make("bagnet33_small"), images(2, 37, 45)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.cat([torch.tensor([[0, 0], [36, 44], [0, 44], [36, 0]]),
                        torch.stack([torch.randint(0, 37, (40,), generator=gen),
                                     torch.randint(0, 45, (40,), generator=gen)], 1)])
    ref = reference_heatmap(model, x, 3, pixels=pixels)
    out = heatmap(model, x, 3)
    assert_equal_to_rounding(out[:, :, pixels[:, 0], pixels[:, 1]], ref, 1e-12)


def test_reference_is_the_model_on_the_zero_padded_patch():
    model, x, ref = reference_case(*CASES[1])
    y, xx, r = 2, 17, 8
    padded = torch.zeros(2, 3, 23 + 2 * r, 18 + 2 * r, dtype=x.dtype)
    padded[..., r:-r, r:-r] = x
    with torch.inference_mode():
        direct = model(padded[1:, :, y : y + 17, xx : xx + 17])[0, 4]
    assert ref[1, 1, y, xx].item() == pytest.approx(direct.item(), abs=1e-12)
    sub = reference_heatmap(model, x[1:], 4, pixels=torch.tensor([[y, xx], [0, 0]]))
    assert sub.shape == (1, 1, 2) and sub[0, 0, 0].item() == pytest.approx(direct.item(), abs=1e-12)


def test_float32_within_1e5_of_the_largest_value_with_per_image_targets():
    model64, x64, ref = reference_case(*CASES[1])
    model, x = copy.deepcopy(model64).float(), x64.float()
    targets = torch.tensor([[4, 1, 4], [1, 1, 4]])  # per image; columns of ref: 1 -> 0, 4 -> 1
    expected = ref[torch.arange(2)[:, None], (targets == 4).long()]
    for method in ("dense", "shift"):
        out = heatmap(model, x, targets, method=method)
        assert out.dtype == torch.float32
        assert_equal_to_rounding(out.double(), expected, 1e-5)


def test_coarse_map_is_the_full_map_at_patch_centres_and_averages_to_the_image_logit():
    model, x = make("bagnet33_small"), images(1, 41, 50)
    coarse = coarse_heatmap(model, x, [0, 3])
    full = heatmap(model, x, [0, 3])
    s, r = model.stride, (model.q - 1) // 2
    gh, gw = coarse.shape[-2:]
    assert (gh, gw) == model.patch_grid(41, 50) == (2, 3)
    sampled = full[..., r : r + s * gh : s, r : r + s * gw : s]
    assert_equal_to_rounding(sampled, coarse, 1e-12)
    with torch.inference_mode():
        logits = model(x)[:, [0, 3]]
    assert torch.allclose(coarse.mean(dim=(2, 3)), logits, atol=1e-12)


def _record_first_conv(model: nn.Module) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    model.conv1.register_forward_hook(lambda m, inp, out: shapes.append(tuple(inp[0].shape)))
    return shapes


@pytest.mark.parametrize("method", ["dense", "shift"])
def test_memory_bound_max_pixels_is_respected_and_does_not_change_values(method):
    model, x = make("bagnet17_small", torch.float32), images(2, 21, 27, torch.float32)
    full = heatmap(model, x, [2], method=method)
    shapes = _record_first_conv(model)
    for max_pixels in (128, 600):
        shapes.clear()
        tiled = heatmap(model, x, [2], method=method, max_pixels=max_pixels)
        assert_equal_to_rounding(tiled, full, 1e-6)
        assert len(shapes) > 1
        for n, _, hin, win in shapes:
            if method == "dense":  # every patch position of the input is a heatmap value
                values = n * (hin - model.q + 1) * (win - model.q + 1)
            else:  # one value per model patch of each shifted crop
                gh, gw = model.patch_grid(hin, win)
                values = n * gh * gw
            assert values <= max_pixels
    shapes.clear()
    heatmap(model, x, [2], method=method, max_pixels=1 << 16)
    assert len(shapes) == 1  # small images share one forward pass
    with pytest.raises(ValueError, match="max_pixels"):
        heatmap(model, x, [2], max_pixels=10)


def test_plan_tiles_balances_tiles_within_the_bound():
    assert plan_tiles(28, 28, 8, 1 << 16) == (1, 28, 28)
    assert plan_tiles(4, 5, 8, 64 * 100) == (5, 4, 5)
    assert plan_tiles(28, 28, 8, 1 << 14) == (1, 7, 28)  # 4 tiles of 7 rows, not 9+9+9+1
    assert plan_tiles(3, 10, 8, 64 * 4) == (1, 1, 4)


def test_patch_features_at_gives_the_values_of_the_map():
    model, x = make("bagnet9_small"), images(1, 14, 11)
    feats = patch_features_at(model, x[0], 13, 0)
    assert feats.shape == (model.num_features,)
    value = model.fc(feats)[[1, 2]]
    assert torch.allclose(value, heatmap(model, x, [1, 2])[0, :, 13, 0], atol=1e-12)


def test_targets_forms():
    dev = torch.device("cpu")
    assert target_matrix(3, 2, 5, dev).tolist() == [[3], [3]]
    assert target_matrix([0, 4], 2, 5, dev).tolist() == [[0, 4], [0, 4]]
    assert target_matrix(torch.tensor([[1], [2]]), 2, 5, dev).tolist() == [[1], [2]]
    with pytest.raises(ValueError, match="out of range"):
        target_matrix([5], 2, 5, dev)
    with pytest.raises(ValueError, match="shape"):
        target_matrix(torch.zeros(3, 1, dtype=torch.long), 2, 5, dev)


def test_clear_errors_for_aligned_non_bagnet_and_training_models():
    aligned = make("bagnet9_small", aligned=True)
    x = images(1, 20, 20)
    with pytest.raises(ValueError, match="offset"):
        heatmap(aligned, x, 0)
    with pytest.raises(ValueError, match="offset"):
        reference_heatmap(aligned, x, 0)
    coarse = coarse_heatmap(aligned, x, [0])  # the coarse map is defined for aligned models
    with torch.inference_mode():
        assert torch.allclose(coarse.mean(dim=(2, 3))[:, 0], aligned(x)[:, 0], atol=1e-12)
    with pytest.raises(ValueError, match="BagNet"):
        heatmap(make("resnet_small"), x, 0)
    with pytest.raises(ValueError, match="eval"):
        heatmap(make("bagnet9_small").train(), x, 0)
    with pytest.raises(ValueError, match="method"):
        heatmap(make("bagnet9_small"), x, 0, method="patches")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Experiment module, pictures, harness


def test_experiment_rows():
    module = EXPERIMENTS["heatmaps"]
    assert module.TABLE == "heatmaps"
    model, x = make("bagnet9_small", torch.float32), images(2, 16, 20, torch.float32)
    labels = torch.tensor([1, 3])
    ctx = ExperimentContext(image_ids=["a", "b"], model_name="bagnet9_small", q=9)
    rows = module.run(model, x, labels, from_dict(module.Params, {}), ctx=ctx)
    assert [(r["image_id"], r["label"], r["target"]) for r in rows] == [("a", 1, 1), ("b", 3, 3)]
    assert rows[0]["values"].dtype == np.float32 and rows[0]["values"].shape == (16 * 20,)
    full = heatmap(model, x, labels[:, None])
    assert np.allclose(rows[1]["values"].reshape(16, 20), full[1, 0].numpy())

    params = from_dict(module.Params, {"targets": [0, 2], "resolution": "coarse"})
    coarse = module.run(model, x, labels, params, ctx=ctx)
    assert [r["target"] for r in coarse] == [0, 2, 0, 2]
    assert (coarse[0]["height"], coarse[0]["width"]) == model.patch_grid(16, 20)
    assert coarse[0]["stride"] == 8 and coarse[0]["origin"] == 4
    top1 = module.run(model, x, labels, from_dict(module.Params, {"targets": "top1"}), ctx=ctx)
    with torch.inference_mode():
        assert [r["target"] for r in top1] == model(x).argmax(1).tolist()

    with pytest.raises(ValueError, match="heatmaps experiment on .*need a BagNet"):
        module.run(make("resnet_small", torch.float32), x, labels, module.Params(), ctx=ctx)
    for bad in ({"targets": "best"}, {"targets": []}, {"resolution": "half"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            from_dict(module.Params, bad)
    assert hm_exp.Params().resolution == "full"


def test_gallery_and_top_patches_pictures(tmp_path):
    from bagnet.plots import edge_map, save_gallery, save_top_patches, top_patches

    model = make("bagnet9_small", torch.float32)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 255, (5, 24, 24, 3), dtype=np.uint8)
    batch[0, 8:16, 8:16] = 255  # a bright square: its outline is an edge
    edges = edge_map(batch[0])
    assert edges.max() == pytest.approx(1.0)
    assert edges[12, 12] == 0 and edges[12, 8] > 0.3  # flat inside, strong on the outline
    save_gallery(batch[:3], torch.randn(3, 2, 24, 24), str(tmp_path / "g.png"), ["a", "b", "c"])
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"

    best = top_patches(model, [batch[:2], batch[2:]], k=3, classes=[1, 4])
    assert list(best) == [1, 4]
    from bagnet.imagenet import to_model_input

    coarse = coarse_heatmap(model, to_model_input(batch), [1, 4]).numpy()
    for ci, c in enumerate([1, 4]):
        values = [p.value for p in best[c]]
        assert values == sorted(values, reverse=True) and len(values) == 3
        assert values[0] == pytest.approx(coarse[:, ci].max(), abs=1e-5)
        p = best[c][0]
        i, j = (p.top - model.offset) // model.stride, (p.left - model.offset) // model.stride
        assert coarse[p.image_index, ci, i, j] == pytest.approx(p.value, abs=1e-5)
        assert (p.pixels == batch[p.image_index, p.top : p.top + 9, p.left : p.left + 9]).all()
    save_top_patches(best, str(tmp_path / "t.png"), [f"c{i}" for i in range(NUM_CLASSES)])
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_harness_table_csv_and_measure(tmp_path):
    from bench.harness import Table, machine_info, measure

    calls = []
    m = measure(lambda: calls.append(1), warmup=2, repeat=3)
    assert len(calls) == 5 and len(m.times) == 3 and m.cpu_peak_mb > 0 and m.gpu_peak_mb is None
    info = machine_info("cpu", "float32", 4)
    assert {"hostname", "cpu", "cores", "device", "torch", "torchvision", "ray", "precision",
            "batch_size", "date"} <= set(info)
    table = Table(["method", "seconds"], info)
    table.add(method="x", seconds=m.median)
    with pytest.raises(ValueError, match="unknown columns"):
        table.add(speed=1)
    table.write_csv(str(tmp_path / "out.csv"))
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert rows[0]["method"] == "x" and rows[0]["precision"] == "float32" and rows[0]["batch_size"] == "4"


def test_benchmark_cli_on_a_tiny_model(tmp_path):
    from bench.heatmap import main

    table = main(["--model", "bagnet9_small", "--num-classes", "4", "--size", "24", "20",
                  "--sample", "40", "--repeat", "1", "--warmup", "0", "--precision", "float64",
                  "--out", str(tmp_path / "h.csv")])
    methods = [r["method"] for r in table.rows]
    assert methods == ["reference", "dense", "shift"]
    assert all(r["max_abs_diff"] < 1e-10 for r in table.rows)
    assert (tmp_path / "h.csv").exists()
