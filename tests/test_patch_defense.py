"""Patch-robustness certificates (bagnet.patch_defense), the patch attack (bagnet.patch_attack) and
the patch_robustness experiment: hand-built patch logits, window geometry against the receptive
field measured by gradient, and soundness against an exhaustive attack on a tiny BagNet."""

import csv
import itertools
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from bagnet.config import from_dict
from bagnet.experiments import patch_robustness as pr
from bagnet.experiments.base import ExperimentContext
from bagnet.models import create_model
from bagnet.patch_attack import patch_starts, patched_logits
from bagnet.patch_defense import (
    DEFENSES, CertificateViolation, certify, defense_scores, touched_cells, window_cells,
)
from bench import patch_certify
from jobs import experiment as job

# --------------------------------------------------------------------------------------------
# Certificates on hand-built patch logits


def _two_classes(strong: float, weak_cell: float) -> torch.Tensor:
    """(1, 2, 4, 4): class 0 has ``strong`` in every cell, class 1 ``weak_cell`` in cell (0, 0)."""
    logits = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    logits[0, 0] = strong
    logits[0, 1, 0, 0] = weak_cell
    return logits


def test_clipped_certifies_a_wide_lead_and_not_a_window_that_covers_the_grid():
    logits = _two_classes(1.0, 5.0)
    small = certify(logits, "clipped", (1, 1), clip=(0.0, 1.0))
    # class 0: 16 cells at 1, class 1: one cell clipped to 1. Worst 1x1 window (away from that
    # cell): the label loses 1, class 1 gains 1 -> 15 - 2 = 13
    assert small.prediction.tolist() == [0] and small.certified.tolist() == [True]
    assert small.certified_margin.item() == pytest.approx(13 / 16)
    assert small.margin.item() == pytest.approx(15 / 16)
    assert not certify(logits, "clipped", (4, 4), clip=(0.0, 1.0)).certified.item()
    assert not certify(logits, "clipped", (3, 3), clip=(0.0, 1.0)).certified.item()  # 16-9 < 1+9


def test_masking_removes_one_heavy_window_and_certifies_by_checking_every_window():
    logits = _two_classes(1.0, 100.0)  # undefended: class 1 wins on one huge cell
    assert certify(logits, "undefended", (1, 1)).prediction.tolist() == [1]
    masked = certify(logits, "masking", (1, 1))
    # masked scores: class 0: 16 - 1 = 15; class 1: 100 - 100 = 0. But a patch on another cell can
    # out-weigh the 100 there, so the masker drops that cell instead and class 1 keeps its 100: no certificate
    assert masked.prediction.tolist() == [0] and masked.margin.item() == pytest.approx(15 / 16)
    assert not masked.certified.item()
    weak = certify(_two_classes(1.0, 0.5), "masking", (1, 1))
    # every window: label 16 - 1 (zeroed) - 1 (its heaviest remaining cell masked) = 14 vs at most 0.5
    assert weak.prediction.tolist() == [0] and weak.certified.item()
    assert weak.certified_margin.item() == pytest.approx((14 - 0.5) / 16)
    assert certify(_two_classes(1.0, 0.5), "masking", (2, 2)).certified_margin.item() == pytest.approx((8 - 0.5) / 16)
    assert not certify(_two_classes(1.0, 0.5), "masking", (4, 4)).certified.item()  # the window is the grid


def test_masking_needs_evidence_outside_every_window():
    logits = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    logits[0, 0, 1:3, 1:3] = 1.0  # all label evidence in one 2x2 block
    logits[0, 1, 3, 3] = 0.1
    out = certify(logits, "masking", (1, 1))
    assert out.prediction.tolist() == [0] and out.certified.item()  # 4-1 zeroed, -1 masked = 2 > 0.1
    assert not certify(logits, "masking", (2, 2)).certified.item()  # the block is one window


def test_vote_counts_cells_and_needs_twice_the_window():
    logits = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    logits[0, 0] = 1.0  # 16 cells vote 0 ...
    logits[0, 2, :1, :4] = 2.0  # ... but the top row votes 2: 12 vs 4
    assert certify(logits, "vote", (1, 1)).prediction.tolist() == [0]
    # the window that takes 4 votes from 0 gives them to 2: 8 vs 8 is a tie, which never certifies
    out = certify(logits, "vote", (2, 2))
    assert out.certified_margin.item() == pytest.approx((8 - 8) / 16) and not out.certified.item()
    assert certify(logits, "vote", (1, 2)).certified.item()  # 12-2=10 > 4+2=6


def test_undefended_is_never_certified():
    out = certify(_two_classes(10.0, 0.0), "undefended", (1, 1))
    assert out.prediction.tolist() == [0] and not out.certified.item() and out.certified_margin.item() == float("-inf")


def _window_attack_predictions(logits: torch.Tensor, defense: str, window, clip) -> set[int]:
    """Predictions reachable by the strongest change of one window of cells, per window and rival."""
    n, c, h, w = logits.shape
    pred = int(certify(logits, defense, window, clip=clip).prediction)
    reached = set()
    for (i, j), rival in itertools.product(itertools.product(range(h - window[0] + 1), range(w - window[1] + 1)), range(c)):
        if rival == pred:
            continue
        x = logits.clone()
        cells = (0, slice(None), slice(i, i + window[0]), slice(j, j + window[1]))
        x[cells] = clip[0] if defense == "clipped" else -1.0  # every class loses; the label lowest
        x[0, rival, i:i + window[0], j:j + window[1]] = clip[1] if defense == "clipped" else 1e6
        reached.add(int(defense_scores(x, defense, clip=clip, window=window).argmax(1)))
    return reached


def test_a_tie_that_float_rounding_makes_positive_does_not_certify():
    """A window covering every cell masks all evidence: every class scores 0, a tie, which float32
    sums can give a certified margin of +4e-7 (found by the exhaustive attack at 32 px)."""
    logits = torch.randn(64, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 10
    defended = certify(logits, "masking", (3, 3))
    assert (defended.certified_margin > 0).any()  # rounding, not robustness
    assert not defended.certified.any()


@pytest.mark.parametrize("defense", ["clipped", "masking", "vote"])
def test_certified_exactly_when_no_window_attack_in_cell_space_flips(defense):
    """Random patch logits: certified images are never flipped by the worst change of any window,
    and (except for exact vote ties) every uncertified one is flipped by one."""
    gen = torch.Generator().manual_seed(0)
    clip = (0.0, 1.0)
    seen = {True: 0, False: 0}
    for trial in range(60):
        logits = torch.randn(1, 3, 5, 5, generator=gen, dtype=torch.float64)
        logits[0, trial % 3] += torch.rand(5, 5, generator=gen, dtype=torch.float64) * (trial % 4)
        window = ((1, 1), (1, 2), (2, 2))[trial % 3]
        out = certify(logits, defense, window, clip=clip)
        pred = int(out.prediction)
        reached = _window_attack_predictions(logits, defense, window, clip)
        seen[bool(out.certified)] += 1
        if out.certified:
            assert reached == {pred}, (trial, out)
        elif defense != "vote" or out.certified_margin.item() < 0:
            assert reached - {pred}, (trial, out)
    assert seen[True] >= 3 and seen[False] >= 3, seen


# --------------------------------------------------------------------------------------------
# Window geometry against the receptive field measured by gradient


def _measured_fields(model, size: int) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """Box (top, left, bottom, right) of input pixels with a nonzero gradient, per cell."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, size, size, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = model.patch_logits(x)
    weights = torch.randn(logits.shape[1], generator=gen, dtype=torch.float64)
    fields = {}
    for i, j in itertools.product(range(logits.shape[2]), range(logits.shape[3])):
        (grad,) = torch.autograd.grad((logits[:, :, i, j] * weights).sum(), x, retain_graph=True)
        rows, cols = grad.abs().sum((0, 1)).nonzero(as_tuple=True)
        fields[i, j] = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
    return fields


@pytest.mark.parametrize("name, aligned", [("bagnet9_small", False), ("bagnet17_small", False), ("bagnet9_small", True)])
def test_window_geometry_matches_the_measured_receptive_field(name, aligned):
    size = 40
    model = create_model(name, num_classes=4, aligned=aligned).double().eval()
    geometry = pr.geometry_of(model, size, size)
    fields = _measured_fields(model, size)
    for (i, j), box in fields.items():  # measured field = the documented patch box, inside the image
        top, left, bottom, right = model.patch_box(i, j)
        assert box == (max(top, 0), max(left, 0), min(bottom, size), min(right, size)), (i, j)
    rows = sorted({i for i, _ in fields})
    for p in (1, 4, 8, 12, 16):
        widest = 0
        for start in patch_starts(size, p, 1):  # cells whose measured field meets pixels start..start+p-1
            hit = [i for i in rows if fields[i, 0][0] < start + p and fields[i, 0][2] > start]
            lo, hi = touched_cells(start, p, model.q, model.stride, model.offset, len(rows))
            assert hit == list(range(lo, hi)), (p, start)
            widest = max(widest, len(hit))
        assert widest == geometry.window(p)[0] <= window_cells(p, model.q, model.stride), p
        if not aligned and window_cells(p, model.q, model.stride) < len(rows):
            assert widest == window_cells(p, model.q, model.stride)  # the formula is reached inside the image


def test_patched_logits_recompute_only_the_touched_window_exactly():
    model = create_model("bagnet17_small", num_classes=4).double().eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 48, 48, generator=gen, dtype=torch.float64)
    geometry, p = pr.geometry_of(model, 48, 48), 8
    patches = torch.randn(4, 3, p, p, generator=gen, dtype=torch.float64)
    corners = torch.tensor([[0, 0], [5, 40], [40, 13], [21, 22]])
    with torch.no_grad():
        fast = patched_logits(model, x, model.patch_logits(x), patches, corners, geometry, geometry.window(p))
        x2 = x.clone()
        for k, (t, l) in enumerate(corners.tolist()):
            x2[k, :, t:t + p, l:l + p] = patches[k]
        torch.testing.assert_close(fast, model.patch_logits(x2), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Soundness on a tiny model, every location attacked


def _tiny_run(params: pr.Params, n: int = 6, size: int = 40, seed: int = 3, lead: float = 1.0):
    """A random BagNet-9 (4 x 4 cells at 40 px) made sensitive (fc x 10, class logits centred on the
    images) with a ``lead`` for class 0, so that some images certify and some undefended ones flip;
    labels are its own predictions, so every image is attacked."""
    torch.manual_seed(seed)
    model = create_model("bagnet9_small", num_classes=3).eval()
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.fc.weight *= 10
        model.fc.bias -= model.patch_logits(images).mean((0, 2, 3))
        model.fc.bias[0] += lead
        labels = model(images).argmax(1)
    ctx = ExperimentContext(image_ids=[f"img{k}" for k in range(n)], model_name="bagnet9_small", q=9, batch_size=256)
    return pr.run(model, images, labels, params, ctx=ctx)


def test_no_certified_image_is_flipped_by_an_exhaustive_attack():
    params = pr.Params(patch_sizes=[4, 12], attack_steps=2, location_step=1, max_locations=None)
    rows = _tiny_run(params, n=4, size=32, seed=0, lead=2.0)  # all 29 x 29 (21 x 21) locations; raises CertificateViolation
    assert len(rows) == 4 * 2 * len(DEFENSES)
    certified = [r for r in rows if r["certified"]]
    assert certified and all(r["attacked_prediction"] == r["prediction"] for r in certified)
    undefended = [r for r in rows if r["defense"] == "undefended"]
    assert any(r["attacked_prediction"] != r["prediction"] for r in undefended), "the attack flips nothing"


def test_a_wrong_certificate_is_reported(monkeypatch):
    real = pr.certify

    def overconfident(logits, defense, window, *, clip):
        out = real(logits, defense, window, clip=clip)
        return type(out)(out.prediction, out.margin, torch.ones_like(out.certified), out.certified_margin)

    monkeypatch.setattr(pr, "certify", overconfident)
    with pytest.raises(CertificateViolation, match=r"is certified for defense 'undefended' at p=12 .* the certificate is wrong"):
        _tiny_run(pr.Params(patch_sizes=[12], defenses=["undefended"], attack_steps=3, max_locations=4))


def test_params_are_checked():
    with pytest.raises(Exception, match="defenses"):
        pr.Params(defenses=["median"]).validate()
    with pytest.raises(Exception, match="clip_max"):
        pr.Params(clip_min=1.0, clip_max=1.0).validate()
    with pytest.raises(ValueError, match="p=48 exceeds the 40x40 image"):
        _tiny_run(pr.Params(patch_sizes=[48]))
    assert pr.applies_to("bagnet33_small") and not pr.applies_to("resnet_small")


def test_the_shipped_configs_parse():
    """The synthetic entry and the ImageNet config (BagNet-17/33 release, p = 32 at 224)."""
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("experiments-synthetic.yaml", "experiments-imagenet-patch.yaml"):
        raw = yaml.safe_load((root / name).read_text())
        params = from_dict(pr.Params, raw["experiments"]["patch_robustness"])
        params.validate()
    assert params.patch_sizes == [32] and raw["data"]["image_size"] == 224
    assert [m["name"] for m in raw["models"]] == ["bagnet17", "bagnet33"]


def test_through_the_runner_certified_le_attacked_le_clean(ray_session, tmp_path):
    """The experiment run by jobs/experiment.py on tiny BagNets (the ResNet is left out): per
    (model, p, defense) certified <= accuracy under attack <= clean accuracy, and per row."""
    out = tmp_path / "out"
    job.main(["--experiment", "patch_robustness", "--config", str(job.DEFAULT_CONFIG), f"output={out}", "run_id=t",
              "data.test_size=16", "compute.batch_size=8",
              "models=[{name: bagnet9_small}, {name: bagnet17_small}, {name: resnet_small}]",
              "experiments.patch_robustness={patch_sizes: [4, 12], attack_steps: 2, max_locations: 2, sample_every: 1}"])
    df = pd.read_parquet(out / "t" / pr.TABLE)
    assert sorted(df["model"].astype(str).unique()) == ["bagnet17_small", "bagnet9_small"]
    assert len(df) == 2 * 16 * 2 * len(DEFENSES)
    acc = df.groupby(["model", "patch_px", "defense"], observed=True)[
        ["certified_correct", "attacked_correct", "clean_correct"]].mean()
    assert (acc["certified_correct"] <= acc["attacked_correct"]).all() and (acc["attacked_correct"] <= acc["clean_correct"]).all()
    assert (df["attacked_correct"] <= df["clean_correct"]).all() and (df["certified_correct"] <= df["attacked_correct"]).all()
    assert not df.loc[df["defense"] == "undefended", "certified"].any()
    windows = df[df["patch_px"] == 4].groupby("model", observed=True)["window_cells"].unique()
    assert windows.map(list).to_dict() == {"bagnet9_small": [4], "bagnet17_small": [9]}  # ceil((4 + q - 1) / 8)^2


def test_certification_bench_writes_its_table(tmp_path):
    out = tmp_path / "patch_certify.csv"
    table = patch_certify.main(["--model", "bagnet9_small", "--num-classes", "3", "--size", "32", "--patch", "4",
                                "--batch-size", "2", "--repeat", "1", "--warmup", "0", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [r["method"] for r in rows] == ["forward", "patch_logits", "certify_clipped", "certify_masking",
                                           "certify_vote", "certify_all"] == [r["method"] for r in table.rows]
    assert all(float(r["images_per_s"]) > 0 and r["window"] == "2x2" for r in rows)
