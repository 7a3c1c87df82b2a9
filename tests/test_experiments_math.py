"""Math of the shuffle, interaction and masking experiments and their shared perturbations."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from bagnet.config import ConfigError, from_dict, to_dict
from bagnet.experiments import interaction, masking, shuffle
from bagnet.experiments.base import ExperimentContext
from bagnet.imagenet import MEAN, STD
from bagnet.experiments.perturb import (
    derive_seed,
    fill_images,
    grid_boxes,
    grid_sums,
    masked_variants,
    permute_tiles,
)
from bagnet.models import create_model

NUM_CLASSES = 6


def _images(n: int, size: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype)


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=NUM_CLASSES).double().eval()


def _ctx(n: int, name: str = "m", **kw) -> ExperimentContext:
    return ExperimentContext(image_ids=[f"img{i}" for i in range(n)], model_name=name, **kw)


def _label_logit(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).gather(1, labels.view(-1, 1))[:, 0]


@pytest.fixture(scope="module")
def bagnets() -> dict[int, nn.Module]:
    return {q: _model(f"bagnet{q}_small", seed=q) for q in (9, 17, 33)}


# --------------------------------------------------------------------------------------------
# perturb.py


def test_permute_tiles_moves_tiles_and_keeps_border():
    image = _images(1, 23)[0][:, :20]  # 3 x 20 x 23: 3x3 tiles of 6 px, border 2 rows, 5 cols
    perm = torch.tensor([4, 0, 8, 1, 3, 2, 7, 6, 5])
    out = permute_tiles(image, 6, perm)
    for k, src in enumerate(perm.tolist()):
        (r, c), (sr, sc) = divmod(k, 3), divmod(src, 3)
        torch.testing.assert_close(out[:, 6 * r : 6 * r + 6, 6 * c : 6 * c + 6],
                                   image[:, 6 * sr : 6 * sr + 6, 6 * sc : 6 * sc + 6], rtol=0, atol=0)
    assert torch.equal(out[:, 18:], image[:, 18:]) and torch.equal(out[:, :, 18:], image[:, :, 18:])
    assert torch.equal(permute_tiles(out, 6, torch.argsort(perm)), image)
    assert torch.equal(permute_tiles(image, 6, torch.arange(9)), image)
    with pytest.raises(ValueError, match="3x3 tile grid"):
        permute_tiles(image, 6, torch.arange(4))


def test_fills_keep_dtype_and_mean_black_blur_semantics():
    x = _images(2, 16)
    assert torch.equal(fill_images(x, "mean"), torch.zeros_like(x))
    black = fill_images(x, "zero")
    std, mean = torch.tensor(STD, dtype=x.dtype), torch.tensor(MEAN, dtype=x.dtype)
    torch.testing.assert_close(black * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1), torch.zeros_like(x))
    constant = torch.full_like(x, 0.7)
    torch.testing.assert_close(fill_images(constant, "blur", 2.0), constant)
    blurred = fill_images(x, "blur", 2.0)
    assert blurred.dtype == x.dtype and blurred.shape == x.shape
    assert blurred.std() < 0.5 * x.std()  # smoothing white noise removes most of its variance
    with pytest.raises(ValueError, match="unknown fill"):
        fill_images(x, "grey")


def test_masked_variants_fill_only_the_boxes():
    x, fills = _images(2, 12, seed=1), _images(2, 12, seed=2)
    out = masked_variants(x, fills, [(1, [(0, 0, 2, 3), (10, 10, 14, 14)]), (0, [])])
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[0:2, 0:3] = mask[10:, 10:] = True
    assert torch.equal(out[0], torch.where(mask, fills[1], x[1]))
    assert torch.equal(out[1], x[0])


def test_grid_helpers_and_seeds():
    assert grid_boxes(20, 17, 8) == [(0, 0, 8, 8), (0, 8, 8, 16), (8, 0, 16, 8), (8, 8, 16, 16)]
    maps = torch.randn(2, 3, 20, 17, dtype=torch.float64)
    sums = grid_sums(maps, 8)
    assert sums.shape == (2, 2, 2)
    torch.testing.assert_close(sums[1, 1, 0], maps[1, :, 8:16, 0:8].sum())
    assert derive_seed(1, "a", 0) == derive_seed(1, "a", 0) != derive_seed(1, "a", 1)
    assert derive_seed(0, "img0", "shuffle", 0) == 3461661555945727497  # stable across releases
    assert 0 <= derive_seed("x") < 2**63


@pytest.mark.parametrize("module", [shuffle, interaction, masking])
def test_params_of_the_configs_and_validation(module):
    """The parameter values of the shipped configs parse (the YAML is their only home)."""
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/experiments-*.yaml")):
        raw = yaml.safe_load(path.read_text())["experiments"].get(module.TABLE) or {}
        assert to_dict(from_dict(module.Params, raw)).items() >= raw.items()
    assert module.TABLE == module.__name__.rsplit(".", 1)[1]
    bad = {shuffle: {"num_perms": 0}, interaction: {"distances": [-1]}, masking: {"rankings": ["saliency"]}}
    key = next(iter(bad[module]))
    with pytest.raises(ConfigError, match=key):
        from_dict(module.Params, bad[module])
    if module is not shuffle:
        with pytest.raises(ConfigError, match="fill"):
            from_dict(module.Params, {"fill": "grey"})


# --------------------------------------------------------------------------------------------
# shuffle


def test_shuffle_rows_baseline_and_batch_independence(bagnets):
    model, x = bagnets[9], _images(2, 32)
    labels = torch.tensor([1, 4])
    params = shuffle.Params(tiles=[8, 16, 32], num_perms=2, seed=3)
    rows = shuffle.run(model, x, labels, params, ctx=_ctx(2, batch_size=5))
    assert len(rows) == 2 * 3 * 2
    assert [(r["image_id"], r["tile"]) for r in rows[:6]] == [("img0", t) for t in (8, 8, 16, 16, 32, 32)]
    base = _label_logit(model, x, labels)
    for r in rows:
        assert set(r) == {"image_id", "label", "tile", "perm_seed", "correct_top1", "correct_top5",
                          "label_logit", "label_logit_delta"}
        n = int(r["image_id"][-1])
        assert r["label_logit"] - r["label_logit_delta"] == pytest.approx(float(base[n]), abs=1e-12)
        if r["tile"] == 32:  # one tile: the unshuffled image
            assert r["label_logit_delta"] == 0.0
    assert any(abs(r["label_logit_delta"]) > 1e-9 for r in rows if r["tile"] == 8)
    # same seed for a given (image, perm index) across tiles; different across images/perms
    seeds = {(r["image_id"], r["tile"]): r["perm_seed"] for r in rows[::2]}
    assert seeds[("img0", 8)] == seeds[("img0", 16)] != seeds[("img1", 8)]
    # rows of img1 do not depend on the rest of the batch nor on the batch size
    alone = shuffle.run(model, x[1:], labels[1:], params,
                        ctx=ExperimentContext(image_ids=["img1"], model_name="m", batch_size=64))
    for a, b in zip(alone, rows[6:]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-12)


def test_bagnet_patches_inside_tiles_move_with_their_tile(bagnets):
    """Provable: for tiles that are multiples of the patch stride, every patch lying inside one
    tile reappears (same logits) at the tile's new place; only border-crossing patches change."""
    model, tile = bagnets[9], 16
    x = _images(1, 64, seed=5)[0]
    perm = shuffle.tile_permutation(16, shuffle.perm_seed(0, "img0", 0))
    assert not torch.equal(perm, torch.arange(16))
    with torch.inference_mode():
        before = model.patch_logits(x[None])[0]
        after = model.patch_logits(permute_tiles(x, tile, perm)[None])[0]
    per_tile = tile // model.stride  # patch-grid steps per tile
    inside = [d for d in range(per_tile) if model.stride * d + model.q <= tile]
    checked = 0
    for k, src in enumerate(perm.tolist()):
        (r, c), (sr, sc) = divmod(k, 4), divmod(src, 4)
        for di, dj in itertools.product(inside, inside):
            i, j = r * per_tile + di, c * per_tile + dj
            si, sj = sr * per_tile + di, sc * per_tile + dj
            if max(i, j, si, sj) < before.shape[-1]:
                torch.testing.assert_close(after[:, i, j], before[:, si, sj], rtol=1e-12, atol=1e-12)
                checked += 1
    assert checked >= 16
    assert not torch.allclose(after, before)  # patches across tile borders did change


# --------------------------------------------------------------------------------------------
# interaction: geometry


def test_patch_touches_both_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        q = int(rng.integers(1, 7))
        a, b = [(y, x, y + int(h), x + int(w)) for y, x, h, w in rng.integers(0, 12, (2, 4)) + [0, 0, 1, 1]]
        brute = any(
            interaction.boxes_intersect((y, x, y + q, x + q), a)
            and interaction.boxes_intersect((y, x, y + q, x + q), b)
            for y in range(-q, 26) for x in range(-q, 26)
        )
        assert interaction.patch_touches_both(q, a, b) == brute, (q, a, b)


def test_sample_pair_distance_bounds_and_determinism():
    for size, distance in [(8, 0), (8, 13), (6, 40), (5, 53)]:
        rng = np.random.default_rng(1)
        for _ in range(20):
            a, b = interaction.sample_pair(rng, 64, 64, size, distance)
            assert interaction.box_distance(a, b) == distance
            assert all(0 <= v <= 64 for v in a + b) and a[2] - a[0] == a[3] - a[1] == size
    with pytest.raises(ValueError, match="does not fit"):
        interaction.sample_pair(np.random.default_rng(0), 64, 64, 8, 49)
    p = interaction.Params(region_sizes=[8], distances=[0, 20], pairs_per_distance=3)
    assert interaction.sample_pairs(p, 0, "x", 64, 64) == interaction.sample_pairs(p, 0, "x", 64, 64)
    assert interaction.sample_pairs(p, 0, "x", 64, 64) != interaction.sample_pairs(p, 0, "y", 64, 64)
    # corners near and far are all reachable: pairs cover the whole image over many draws
    rng = np.random.default_rng(2)
    ys = {interaction.sample_pair(rng, 32, 32, 4, 0)[0][0] for _ in range(400)}
    assert ys == set(range(29))


# --------------------------------------------------------------------------------------------
# interaction: the BagNet property


def _run_interaction(model, x, labels, params, batch_size=16):
    return interaction.run(model, x, labels, params, ctx=_ctx(len(x), batch_size=batch_size))


@pytest.mark.parametrize("q", [9, 17, 33])
def test_bagnet_interaction_is_zero_iff_no_patch_touches_both(bagnets, q):
    model, x, labels = bagnets[q], _images(1, 64, seed=q), torch.tensor([5])
    params = interaction.Params(region_sizes=[6], distances=[0, 3, 7, 12, 20, 31, 40],
                                pairs_per_distance=2, seed=q)
    rows = _run_interaction(model, x, labels, params, batch_size=64)
    assert len(rows) == 7 * 2
    patches = interaction.bagnet_patch_boxes(model, 64, 64)
    tol = 1e-9 * max(1.0, float(_label_logit(model, x, labels).abs().max()))
    zero = touching = 0
    for r in rows:
        a = (r["a_y"], r["a_x"], r["a_y"] + 6, r["a_x"] + 6)
        b = (r["b_y"], r["b_x"], r["b_y"] + 6, r["b_x"] + 6)
        assert interaction.box_distance(a, b) == r["distance"]
        assert r["interaction"] == r["delta_ab"] - r["delta_a"] - r["delta_b"]
        if interaction.patches_touching_both(patches, a, b):
            touching += 1
            assert abs(r["interaction"]) > tol, r
        else:
            zero += 1
            assert abs(r["interaction"]) <= tol, r
        if not interaction.patch_touches_both(q, a, b):  # the conservative rule is sufficient
            assert not interaction.patches_touching_both(patches, a, b)
            assert r["distance"] >= q - 1
    assert zero > 0 and touching > 0


def test_interaction_deltas_match_direct_masking(bagnets):
    model, x, labels = bagnets[17], _images(1, 40, seed=7), torch.tensor([3])
    for fill in ("mean", "zero", "blur"):
        params = interaction.Params(region_sizes=[5], distances=[2], pairs_per_distance=1, fill=fill)
        (r,) = _run_interaction(model, x, labels, params)
        a = (r["a_y"], r["a_x"], r["a_y"] + 5, r["a_x"] + 5)
        b = (r["b_y"], r["b_x"], r["b_y"] + 5, r["b_x"] + 5)
        fills = fill_images(x, fill, params.blur_sigma)
        variants = masked_variants(x, fills, [(0, [a]), (0, [b]), (0, [a, b])])
        logits = _label_logit(model, variants, labels.repeat(3)) - _label_logit(model, x, labels)
        assert [r["delta_a"], r["delta_b"], r["delta_ab"]] == pytest.approx(logits.tolist(), abs=1e-12)


def test_unconstrained_cnn_interacts_at_distances_where_bagnets_cannot(bagnets):
    x, labels = _images(1, 64, seed=11), torch.tensor([0])
    params = interaction.Params(region_sizes=[8], distances=[32, 36], pairs_per_distance=2, seed=1)
    cnn_rows = _run_interaction(_model("resnet_small"), x, labels, params)
    bag_rows = _run_interaction(bagnets[33], x, labels, params)
    assert [r["a_y"] for r in cnn_rows] == [r["a_y"] for r in bag_rows]  # same sampled pairs
    cnn, bag = (max(abs(r["interaction"]) for r in rows) for rows in (cnn_rows, bag_rows))
    assert bag <= 1e-9 < cnn  # distance >= q - 1 = 32: exactly zero only for the BagNet


# --------------------------------------------------------------------------------------------
# masking


MASK_COLUMNS = {"image_id", "label", "ranking", "k_masked", "label_logit", "label_logit_delta", "correct_top5"}


@pytest.mark.parametrize("fill", ["mean", "zero", "blur"])
def test_masking_rows_k0_and_all_regions(bagnets, fill):
    model, x, labels = bagnets[9], _images(2, 32, seed=3), torch.tensor([0, 5])
    rankings = list(masking.RANKINGS) if fill == "mean" else ["random"]  # fills: only masking
    params = masking.Params(rankings=rankings, region_size=8, ks=[0, 1, 4, 16], fill=fill,
                            ig_steps=4, seed=0)
    rows = masking.run(model, x, labels, params, ctx=_ctx(2, batch_size=7))
    assert len(rows) == 2 * len(rankings) * 4
    assert [(r["ranking"], r["k_masked"]) for r in rows[:4 * len(rankings)]] == [
        (rk, k) for rk in rankings for k in (0, 1, 4, 16)]
    base = _label_logit(model, x, labels)
    full = _label_logit(model, fill_images(x, fill, params.blur_sigma), labels)
    for r in rows:
        assert set(r) == MASK_COLUMNS
        n = int(r["image_id"][-1])
        if r["k_masked"] == 0:
            assert r["label_logit_delta"] == 0.0 and r["label_logit"] == pytest.approx(float(base[n]), abs=1e-12)
        if r["k_masked"] == 16:  # every region masked = the fully filled image
            assert r["label_logit"] == pytest.approx(float(full[n]), abs=1e-10)
    if fill == "mean":
        again = masking.run(model, x, labels, params, ctx=_ctx(2, batch_size=64))
        assert [r["label_logit"] for r in again] == pytest.approx([r["label_logit"] for r in rows], abs=1e-12)
        with pytest.raises(ValueError, match="exceeds the 16 regions"):
            masking.run(model, x, labels, masking.Params(ks=[17], rankings=["random"]), ctx=_ctx(2))


def test_heatmap_region_scores_sum_patch_logits_by_centre(bagnets):
    model, x, labels = bagnets[17], _images(2, 44, seed=4), torch.tensor([1, 2])
    scores = masking.heatmap_region_scores(model, x, labels, 8, batch_size=1)
    assert scores.shape == (2, 5, 5)
    with torch.inference_mode():
        maps = model.patch_logits(x)
    expected = torch.zeros(2, 5, 5, dtype=x.dtype)
    for i, j in itertools.product(range(maps.shape[2]), range(maps.shape[3])):
        top, left, _, _ = model.patch_box(i, j)
        cy, cx = top + 8, left + 8  # centre pixel of a 17 px patch
        if cy < 40 and cx < 40:
            expected[:, cy // 8, cx // 8] += maps[torch.arange(2), labels, i, j]
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)


class _Linear(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * size * size, NUM_CLASSES, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_occlusion_and_ig_are_exact_for_a_linear_model():
    torch.manual_seed(0)
    model, x, labels = _Linear(16).eval(), _images(3, 16, seed=9), torch.tensor([0, 3, 5])
    contrib = model.fc.weight[labels].view(3, 3, 16, 16).detach() * x  # weight * input
    expected = grid_sums(contrib, 4)
    occ = masking.occlusion_region_scores(model, x, labels, 4, batch_size=8)
    ig = masking.ig_region_scores(model, x, labels, 4, n_steps=3, batch_size=8)
    torch.testing.assert_close(occ, expected, rtol=1e-5, atol=1e-6)  # captum: float32 inside
    torch.testing.assert_close(ig, expected, rtol=1e-6, atol=1e-7)  # float32 step weights
    # masking (mean fill = baseline 0) the top-k removes exactly the k largest contributions
    params = masking.Params(rankings=["occlusion", "integrated_gradients", "random"], region_size=4,
                            ks=[0, 1, 3, 16], ig_steps=3)
    with torch.inference_mode():  # run must also work when the caller is in inference mode
        rows = masking.run(model, x, labels, params, ctx=_ctx(3, name="linear", batch_size=8))
    top = expected.flatten(1).sort(dim=1, descending=True).values.cumsum(1)
    for r in rows:
        n, k = int(r["image_id"][-1]), r["k_masked"]
        if r["ranking"] != "random" and k:
            assert r["label_logit_delta"] == pytest.approx(-float(top[n, k - 1]), abs=1e-10)
    by = {(r["ranking"], r["image_id"], r["k_masked"]): r["label_logit_delta"] for r in rows}
    assert all(by[("random", i, k)] >= by[("occlusion", i, k)] - 1e-10
               for i in ("img0", "img1", "img2") for k in (1, 3))
    with pytest.raises(ValueError, match="one label and image id each"):
        masking.run(model, x, labels[:2], params, ctx=_ctx(3))
    with pytest.raises(ValueError, match="needs a BagNet"):
        masking.run(model, x, labels, masking.Params(region_size=4, ks=[0, 1]), ctx=_ctx(3, name="linear"))


def test_masking_helper_bagnet_and_random_ranking_per_image(bagnets):
    cnn, x, labels = _model("resnet_small"), _images(2, 32, seed=6), torch.tensor([1, 1])
    params = masking.Params(rankings=["bagnet_heatmap", "random"], region_size=8, ks=[0, 2, 8], seed=4)
    ctx = _ctx(2, name="resnet_small", helper_models={"bagnet": bagnets[9]})
    rows = masking.run(cnn, x, labels, params, ctx=ctx)
    assert len(rows) == 2 * 2 * 3
    alone = masking.run(cnn, x[1:], labels[1:], params,
                        ctx=ExperimentContext(["img1"], "resnet_small", helper_models={"bagnet": bagnets[9]}))
    assert [r["label_logit"] for r in alone] == pytest.approx([r["label_logit"] for r in rows[6:]], abs=1e-12)
    assert masking.helper_models(params) == {}
    assert masking.helper_models(masking.Params(heatmap_model="bagnet33")) == {"bagnet": "bagnet33"}
    assert masking.helper_models(masking.Params(rankings=["random"], heatmap_model="bagnet9")) == {}
    scores = masking.random_region_scores(["img0", "img1"], 4, 4, seed=4)
    assert not torch.equal(scores[0], scores[1])
    assert torch.equal(scores, masking.random_region_scores(["img0", "img1"], 4, 4, seed=4))
