"""Ground truth of the synthetic world, the localization and cue-conflict experiments, their scores,
and both experiments through the real runner and the report."""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from captum.attr import DeepLift

from bagnet.config import ConfigError, load_config
from bagnet.experiments import EXPERIMENTS, ExperimentContext, cue_conflict, localization
from bagnet.heatmap import coarse_heatmap
from bagnet.imagenet import to_model_input
from bagnet.models import create_model
from bagnet.synthetic import BACKGROUND, CUE_CONFLICT_STREAM, MOTIF_SIZE, MOTIFS, SyntheticWorld, materialize
from cluster import evaluation
from cluster.configs import ExperimentJobConfig
from jobs import experiment as job
from store import results

LOW, HIGH = BACKGROUND[0], BACKGROUND[0] + BACKGROUND[1]  # the background's value range


def union(boxes, size: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    for top, left, bottom, right in boxes:
        mask[top:bottom, left:right] = True
    return mask


def off_background(image: np.ndarray) -> np.ndarray:
    """Pixels the background law cannot produce (some channel outside 96..159): painted glyphs."""
    return ((image < LOW) | (image > HIGH)).any(-1)


# --------------------------------------------------------------------------------------------
# ground truth


def test_evidence_boxes_are_exactly_where_the_class_motifs_are_painted():
    world = SyntheticWorld(seed=3, max_distractors=0)  # only class motifs off the background
    for index in range(3 * world.num_classes):
        sample = world.sample(index, "test")
        boxes = world.evidence_boxes(index, "test")
        spec = world.classes[sample.label]
        assert len(boxes) == (2 if spec.kind == "arrangement" else len(sample.meta["motifs"])) >= 1
        assert (off_background(sample.image) == union(boxes, world.image_size)).all(), index
        for (top, left, bottom, right), (mid, _, _) in zip(boxes, sample.meta["motifs"]):
            assert bottom - top == right - left == MOTIF_SIZE and mid in spec.motifs
            assert (sample.image[top:bottom, left:right] == MOTIFS[mid]).all()
    # with distractors: the class boxes lie off the background and leave out every distractor
    world = SyntheticWorld(seed=3)
    for index in range(40):
        sample, boxes = world.sample(index, "val"), world.ground_truth(world.image_id(index, "val"))
        painted = off_background(sample.image)
        assert painted[union(boxes, 64)].all()
        distractors = [(y, x, y + 3, x + 3) for mid, y, x in sample.meta["motifs"]
                       if mid not in world.classes[sample.label].motifs]
        assert (painted == union(boxes + distractors, 64)).all(), index
    assert SyntheticWorld(seed=3).evidence_boxes(7, "val") == world.evidence_boxes(7, "val")  # deterministic
    with pytest.raises(ValueError, match="not a synthetic image id"):
        world.ground_truth("val/n01440764/x.JPEG")


def test_cue_conflict_images_put_a_local_glyph_into_a_pair_layout():
    world = SyntheticWorld(seed=1, max_distractors=0)
    combos = world.cue_conflicts()
    local = [c for c, s in enumerate(world.classes) if s.kind == "local"]
    pairs = [c for c, s in enumerate(world.classes) if s.kind == "arrangement"]
    assert combos == [(a, b) for b in pairs for a in local]
    for index in range(len(combos)):
        sample = world.cue_conflict(index, "test")
        a, b = sample.meta["motif_class"], sample.meta["arrangement_class"]
        assert (a, b) == combos[index] and sample.label == b
        glyph, spec = world.classes[a].motifs[0], world.classes[b]
        # the generator's own layout of class b from the same stream, with the pair's own glyphs
        own = np.empty_like(sample.image)
        meta = world._render(index, "test", own, label=b, stream=(CUE_CONFLICT_STREAM,))
        (ga, ya, xa), (gb, yb, xb) = meta["motifs"]
        assert (ga, gb) == spec.motifs and sample.meta["motifs"] == [(glyph, ya, xa), (glyph, yb, xb)]
        boxes = [(ya, xa, ya + 3, xa + 3), (yb, xb, yb + 3, xb + 3)]
        inside = union(boxes, world.image_size)
        assert (sample.image[~inside] == own[~inside]).all()  # same noise and layout elsewhere
        for top, left, bottom, right in boxes:
            assert (sample.image[top:bottom, left:right] == MOTIFS[glyph]).all()
        along = abs(xa - xb) if spec.orientation == "h" else abs(ya - yb)
        assert (ya == yb if spec.orientation == "h" else xa == xb), index
        assert spec.offsets[0] <= along <= spec.offsets[1] and along == sample.meta["offset"]
        assert not (sample.image == world.sample(index, "test").image).all()


# --------------------------------------------------------------------------------------------
# scores


def test_scores_on_hand_built_maps():
    boxes = [(2, 2, 5, 5)]
    mask = localization.evidence_mask(boxes, 10, 10)
    assert int(mask.sum()) == 9
    inside, outside = torch.zeros(10, 10), torch.zeros(10, 10)
    inside[2:5, 2:5] = torch.rand(3, 3) + 0.1
    inside[0, 0] = -5.0  # negative attribution is not energy
    outside[6:, 6:] = 1.0
    assert localization.energy_in_boxes(inside, mask) == pytest.approx(1.0)
    assert localization.energy_in_boxes(outside, mask) == 0.0
    half = inside.clone()
    half[9, 9] = float(inside.clamp(min=0).sum())
    assert localization.energy_in_boxes(half, mask) == pytest.approx(0.5)
    assert np.isnan(localization.energy_in_boxes(-torch.ones(10, 10), mask))
    peak = torch.zeros(10, 10)
    peak[4, 4] = 1.0
    assert localization.max_in_boxes(peak, mask)
    peak[4, 5] = 2.0  # the maximum moves just outside the box
    assert not localization.max_in_boxes(peak, mask)
    assert localization.max_in_boxes(peak, localization.evidence_mask(boxes, 10, 10, tolerance=1))
    assert not localization.max_in_boxes(torch.zeros(10, 10), mask)  # a flat map points at pixel (0, 0)


def test_decisions_and_shares():
    assert cue_conflict.decision(3, 3, 7) == "motif" and cue_conflict.decision(7, 3, 7) == "arrangement"
    assert cue_conflict.decision(5, 3, 7) == "other"
    df = pd.DataFrame({"model": ["a"] * 4 + ["b"] * 2, "pair_scale": [17, 17, 33, 33, 17, 17],
                       "decision": ["motif", "motif", "arrangement", "other", "other", "other"]})
    shares = cue_conflict.shares(df).set_index("model")
    assert shares.loc["a", ["images", "arrangement", "motif", "other"]].tolist() == [4, 0.25, 0.5, 0.25]
    assert shares.loc["a", "arrangement_bias"] == pytest.approx(1 / 3)
    assert np.isnan(shares.loc["b", "arrangement_bias"]) and shares.loc["b", "other"] == 1.0
    by_scale = cue_conflict.shares(df, ("model", "pair_scale")).set_index(["model", "pair_scale"])
    assert by_scale.loc[("a", 17), "motif"] == 1.0 and by_scale.loc[("a", 33), "arrangement_bias"] == 1.0


# --------------------------------------------------------------------------------------------
# the experiments on tiny models (no Ray)

TINY = localization.Params(images=3, ig_steps=2, occlusion_window=16, occlusion_stride=16)


def _inputs(world: SyntheticWorld, n: int = 4):
    b = world.batch(range(n), "test")
    return to_model_input(b["image"]), torch.as_tensor(b["label"]), list(b["image_id"])


def test_deeplift_runs_on_models_that_reuse_relu_modules():
    torch.manual_seed(0)
    model = create_model("bagnet9_small", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="DeepLift"):  # what the copy is for
        DeepLift(model).attribute(x, baselines=torch.zeros_like(x), target=torch.tensor([1, 2]))
    with torch.no_grad():
        before = model(x)
        gap = (before - model(torch.zeros_like(x)))[[0, 1], [1, 2]]
    relus = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ReLU)]
    with localization.unshared_relus(model, x[:1]) as unshared:
        with torch.no_grad():
            torch.testing.assert_close(unshared(x), before)
        attr = DeepLift(unshared).attribute(x, baselines=torch.zeros_like(x), target=torch.tensor([1, 2]))
    torch.testing.assert_close(attr.sum((1, 2, 3)), gap, rtol=1e-3, atol=1e-4)  # DeepLIFT's completeness
    assert [name for name, m in model.named_modules() if isinstance(m, torch.nn.ReLU)] == relus  # restored


def test_localization_rows_per_model_and_method():
    world = SyntheticWorld(seed=0)
    images, labels, ids = _inputs(world)
    torch.manual_seed(0)
    for name, layer in (("bagnet9_small", "layer4"), ("resnet_small", "features")):
        model = create_model(name, num_classes=10).eval()
        ctx = ExperimentContext(image_ids=ids, model_name=name, world=world, batch_size=64)
        rows = localization.run(model, images, labels, TINY, ctx=ctx)
        methods = list(localization.METHODS) if name.startswith("bagnet") else list(localization.METHODS[1:])
        assert [(r["image_id"], r["method"]) for r in rows] == [(i, m) for m in methods for i in ids[:3]]
        for r in rows:
            assert np.isnan(r["energy_in_boxes"]) or 0.0 <= r["energy_in_boxes"] <= 1.0
            assert r["box_fraction"] == pytest.approx(union(world.ground_truth(r["image_id"]), 64).mean())
            assert r["layer"] == (layer if r["method"] == "gradcam" else "")
        table = results.rows_to_table(rows, _common(), localization.SCHEMA, experiment="localization")
        assert table.num_rows == len(rows)
    with pytest.raises(ValueError, match="localization experiment on 'm': needs the synthetic world"):
        localization.run(model, images, labels, TINY, ctx=ExperimentContext(image_ids=ids, model_name="m"))


def test_the_bagnet_heatmap_of_an_aligned_bagnet_is_its_coarse_map_spread_over_pixels():
    torch.manual_seed(0)
    model = create_model("bagnet17_small", num_classes=10, aligned=True).eval()
    images, labels, _ = _inputs(SyntheticWorld(seed=0), 2)
    maps = localization.bagnet_map(model, images, labels)
    coarse = coarse_heatmap(model, images, labels.view(-1, 1))[:, 0]
    assert maps.shape == (2, 64, 64)
    assert set(maps.flatten().tolist()) <= set(coarse.flatten().tolist())
    q, stride, offset = model.q, model.stride, model.offset
    centre = offset + (q - 1) // 2 + stride  # the centre pixel of patch (1, 1)
    assert maps[0, centre, centre] == coarse[0, 1, 1]


def test_cue_conflict_rows_follow_the_models_prediction():
    world = SyntheticWorld(seed=0)
    images, labels, ids = _inputs(world, 6)
    torch.manual_seed(0)
    model = create_model("bagnet9_small", num_classes=10).eval()
    rows = cue_conflict.run(model, images, labels, cue_conflict.Params(),
                            ctx=ExperimentContext(image_ids=ids, model_name="m", world=world))
    conflict = to_model_input(np.stack([world.cue_conflict(i, "test").image for i in range(6)]))
    with torch.no_grad():
        predicted = model(conflict).argmax(1).tolist()
    assert [r["prediction"] for r in rows] == predicted and [r["image_id"] for r in rows] == ids
    for r in rows:
        assert r["decision"] == cue_conflict.decision(r["prediction"], r["motif_class"], r["arrangement_class"])
        assert r["pair_scale"] == world.classes[r["arrangement_class"]].scale
    results.rows_to_table(rows, _common(), cue_conflict.SCHEMA, experiment="cue_conflict")


def _common():
    return {"run_id": "r", "q": None, "weights": "random", "dataset": "synthetic", "split": "test", "seed": 0,
            "precision": "fp32", "created_at": results.utc_now(), "code_version": "v"}


def test_the_runner_refuses_or_leaves_them_out_on_data_without_ground_truth(tmp_path, capsys):
    world = SyntheticWorld(seed=0)
    materialize(world, str(tmp_path / "imagenet"), split="val", n=world.num_classes)

    def plan(experiments: str):
        cfg = load_config(ExperimentJobConfig, job.DEFAULT_CONFIG, [
            f"output={tmp_path}", "models=[{name: bagnet9_small}]", "data.dataset=imagenet",
            f"data.root={tmp_path / 'imagenet'}", "split=val"])
        return evaluation.make_plan(cfg, evaluation.parse_experiments(experiments), None)

    for alone in ("localization", "localization,cue_conflict"):  # nothing left to run: refused, naming the key
        with pytest.raises(ConfigError, match=r"experiments.localization: needs data.dataset in \['synthetic'\], got 'imagenet'"):
            plan(alone)
    assert [p.key for p in plan("predictions,localization,cue_conflict").parts] == ["predictions/bagnet9_small"]
    out = capsys.readouterr().out
    assert "localization: not defined for data.dataset=imagenet; left out" in out
    assert "cue_conflict: not defined for data.dataset=imagenet; left out" in out


# --------------------------------------------------------------------------------------------
# through the real runner and the report


def test_both_experiments_through_the_runner_and_the_report(ray_session, tmp_path):
    out = tmp_path / "out"
    summary = job.main(["--experiment", "localization,cue_conflict", "--config", str(job.DEFAULT_CONFIG),
                        f"output={out}", "run_id=t", "data.test_size=8", "compute.batch_size=8",
                        "models=[{name: bagnet9_small}, {name: resnet_small}]",
                        "experiments.localization={images: 3, ig_steps: 2, occlusion_window: 16, occlusion_stride: 16}"])
    methods = len(localization.METHODS)
    assert summary["rows"] == {"localization": 3 * methods + 3 * (methods - 1), "cue_conflict": 2 * 8}
    world = SyntheticWorld(seed=0)
    for module in (localization, cue_conflict):
        table_dir = out / "t" / module.TABLE
        for file in table_dir.rglob("*.parquet"):
            assert pq.read_schema(file).remove_metadata() == results.table_schema(module.SCHEMA), file
    loc = pd.read_parquet(out / "t" / "localization")
    assert set(loc["image_id"]) == {world.image_id(i, "test") for i in range(3)}
    assert set(loc.loc[loc["model"] == "resnet_small", "method"]) == set(localization.METHODS[1:])
    cue = pd.read_parquet(out / "t" / "cue_conflict")
    expected = {world.image_id(i, "test"): world.cue_conflict(i, "test").meta["motif_class"] for i in range(8)}
    assert (cue["image_id"].map(expected) == cue["motif_class"]).all()

    from analysis.report import build_report  # here: a report failure should not hide the runner checks

    text = (Path(build_report(str(out), str(tmp_path / "report"))).parent / "report.md").read_text()
    assert "Which explanation points at the evidence" in text and "Cue conflict: motifs or arrangement?" in text
    assert (tmp_path / "report" / "figures" / "localization.png").is_file()
    assert (tmp_path / "report" / "figures" / "cue_conflict.png").is_file()
    assert EXPERIMENTS["localization"] is localization and EXPERIMENTS["cue_conflict"] is cue_conflict
