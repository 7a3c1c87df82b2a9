"""The analysis report built from small generated tables (tests/make_tables.py): its sections,
numbers, run selection and missing tables."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import report as R
from analysis import tables as T
from analysis.html import Table
from tests import make_tables as M


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return M.fake_report(tmp_path_factory)


def md_tables(md: str) -> dict[str, pd.DataFrame]:
    """``**caption**`` + pipe table blocks of report.md, as string DataFrames."""
    out = {}
    for caption, body in re.findall(r"\*\*(.+?)\*\*\n\n((?:\|.*\|\n)+)", md):
        lines = [[c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")] for line in body.strip().splitlines()]
        out[caption] = pd.DataFrame(lines[2:], columns=lines[0])
    return out


def find(tables: dict[str, pd.DataFrame], prefix: str) -> pd.DataFrame:
    matches = [t for c, t in tables.items() if c.startswith(prefix)]
    assert len(matches) == 1, f"{prefix!r} in {list(tables)}"
    return matches[0]


def cell(df: pd.DataFrame, column: str, **where) -> str:
    rows = df
    for key, value in where.items():
        rows = rows[rows[key] == str(value)]
    assert len(rows) == 1, f"{where} -> {len(rows)} rows in\n{df}"
    return rows[column].iloc[0]


def f3(x: float) -> str:
    return f"{x:.3f}"


def section_tables(section) -> dict[str, pd.DataFrame]:
    return {b.caption: b.df for b in section.blocks if isinstance(b, Table)}


def test_sections_present_with_figures(built):
    md, html = built["md"], built["html"]
    for title in ("Accuracy by model and patch size q", "Patch shuffling", "Interactions between image parts",
                  "Masking the most informative regions", "Error consistency", "Heatmaps and the most informative patches",
                  "The runs behind this report"):
        assert f"## {title}" in md and f"<h2>{title}</h2>" in html
    assert "missing:" not in md
    images = re.findall(r'<img src="([^"]+)"', html)
    assert {"figures/accuracy.png", "figures/training_curves.png", "figures/shuffle.png", "figures/interaction.png",
            "figures/masking.png", "figures/consistency.png", "figures/heatmap_gallery.png",
            "figures/patches_bagnet9_small.png", "figures/patches_bagnet33_small.png",
            "figures/job_0_gallery.png"} <= set(images)
    for src in images:
        png = (built["index"].parent / src).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 300_000, src
    # report.md holds the same tables as index.html
    assert len(md_tables(md)) == html.count("<table>") >= 12


def test_accuracy_from_training_sweep_and_predictions(built):
    acc = find(md_tables(built["md"]), "Accuracy per model")
    expected = M.predictions("run-new").groupby("model")[["correct_top1", "correct_top5"]].mean()
    for model, row in expected.iterrows():
        assert cell(acc, "top-1", source="predictions", model=model) == f3(row.correct_top1)
        assert cell(acc, "top-5", source="predictions", model=model) == f3(row.correct_top5)
    for model, top1 in {"bagnet9_small": 0.4, "bagnet33_small": 0.7, "resnet_small": 0.75}.items():  # final epochs
        assert cell(acc, "top-1", source="training", model=model) == f3(top1)
    for model, top1 in {"bagnet9_small": 0.42, "bagnet17_small": 0.56, "bagnet33_small": 0.72}.items():  # best trials
        assert cell(acc, "top-1", source="sweep", model=model) == f3(top1)
    assert cell(acc, "q", source="sweep", model="bagnet17_small") == "17"
    assert cell(acc, "q", source="predictions", model="vgg_small") == "–"
    train = find(md_tables(built["md"]), "Training runs (validation")
    assert "bagnet17_small-crashed" not in set(train["run"])  # no model.pt: incomplete
    assert "Incomplete training runs skipped (no model.pt): bagnet17_small-crashed." in built["md"]
    kinds = find(md_tables(built["md"]), "Predictions: top-1 by synthetic class kind")
    pred = M.predictions("run-new")
    local = pred[(pred.model == "bagnet9_small") & (pred.label < 4)].correct_top1.mean()
    assert cell(kinds, "local motifs", model="bagnet9_small") == f3(local)


def test_error_consistency(built):
    tables = md_tables(built["md"])
    kappa, corr = find(tables, "Cohen's kappa"), find(tables, "Per-class accuracy correlation")
    assert cell(kappa, "vgg_small", model="resnet_small") == "1.000"  # identical correctness
    assert cell(corr, "vgg_small", model="resnet_small") == "1.000"
    for m in M.ACCURACY:
        assert cell(kappa, m, model=m) == "1.000"
    # kappa of two different models, from its definition
    a, b = M.correct_vector("bagnet9_small"), M.correct_vector("bagnet33_small")
    c_obs = (a == b).mean()
    c_exp = a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean())
    assert cell(kappa, "bagnet33_small", model="bagnet9_small") == f3((c_obs - c_exp) / (1 - c_exp))
    pred = M.predictions("run-new")
    per_class = pred.pivot_table(index="label", columns="model", values="correct_top1", aggfunc="mean")
    r = np.corrcoef(per_class["bagnet9_small"], per_class["resnet_small"])[0, 1]
    assert cell(corr, "resnet_small", model="bagnet9_small") == f3(r)


def test_shuffle_interaction_masking_numbers(built):
    tables = md_tables(built["md"])
    top1, delta = find(tables, "Top-1 accuracy by tile size"), find(tables, "Label-logit change against")
    sh = M.shuffle("run-new")
    for (model, tile), sub in sh.groupby(["model", "tile"]):
        assert cell(top1, str(tile), model=model) == f3(sub.correct_top1.mean())
        assert cell(delta, str(tile), model=model) == f3(sub.label_logit_delta.mean() + 0.0)
    assert cell(top1, "q", model="vgg_small") == "–" and cell(top1, "q", model="bagnet33_small") == "33"
    mean_abs, mean = find(tables, "Mean |interaction| by distance"), find(tables, "Mean interaction by distance")
    assert cell(mean_abs, "16", model="bagnet9_small") == "0.000"  # beyond q = 9
    assert cell(mean_abs, "16", model="resnet_small") == "0.250"
    assert cell(mean, "16", model="resnet_small") == f3(0.25 * 2 / 4)  # signs +, +, +, -
    assert cell(mean_abs, "q", model="bagnet33_small") == "33"
    logit, top5 = find(tables, "Label logit by regions masked"), find(tables, "Top-5 accuracy by regions masked")
    assert cell(logit, "4", ranking="bagnet", model="bagnet9_small") == "1.000"
    assert cell(logit, "8", ranking="random", model="vgg_small") == f3(5 - 0.2 * 8)
    assert cell(top5, "8", ranking="bagnet", model="bagnet9_small") == "0.200"


def test_heatmap_peaks(built):
    peaks = find(md_tables(built["md"]), "Most informative location per class")
    hm = M.heatmaps("run-new")
    for (model, label), sub in hm.groupby(["model", "label"]):
        best = max(sub.itertuples(), key=lambda r: max(r.values))
        h = best.height
        y, x = divmod(int(np.argmax(best.values)), h)
        cls = "local0" if label == 0 else None
        if cls:
            assert cell(peaks, "peak value", model=model, **{"class": cls}) == f3(max(best.values))
            assert cell(peaks, "map entry (i, j)", model=model, **{"class": cls}) == f"({y}, {x})"
            stride, origin = (8, 4) if h == 7 else (1, 0)  # coarse bagnet9_small, full-resolution bagnet33_small
            assert cell(peaks, "image pixel (y, x)", model=model, **{"class": cls}) == f"({origin + stride * y}, {origin + stride * x})"
            assert cell(peaks, "top image", model=model, **{"class": cls}) == best.image_id
    assert "Images regenerated from SyntheticWorld(seed=0, image_size=64)." in built["md"]


def test_runs_section_and_partial_run_not_used(built):
    runs = find(md_tables(built["md"]), "Result runs found")
    assert cell(runs, "used for", run="run-new") == "predictions, shuffle, interaction, masking, heatmaps"
    assert cell(runs, "complete", run="run-partial") == "no"
    assert cell(runs, "used for", run="run-partial") == "–"
    assert cell(runs, "used for", run="run-old") == "–"  # older than run-new
    assert cell(runs, "used for", run="sweep") == "tune_trials"
    assert cell(runs, "unfinished parts' files", run="run-partial") == "1"
    assert cell(runs, "rows (manifest)", run="run-old") == "40"
    counts = find(md_tables(built["md"]), "Rows read")
    assert set(counts["run"]) == {"run-new", "sweep"}
    assert cell(counts, "rows", table="predictions", model="vgg_small") == str(M.N_IMAGES)
    assert "code_version" in built["md"] and "abc1234" in built["md"]


def test_include_incomplete_uses_only_committed_parts_of_one_run(built, tmp_path):
    catalog = T.discover(str(built["results"]))
    b = R.Builder(catalog, str(tmp_path), None, include_incomplete=True)
    acc = find(section_tables(R.accuracy_section(b)), "Accuracy per model")
    pred = acc[acc["source"] == "predictions"].set_index("model")
    # the newest run is now run-partial: its committed parts only, nothing from run-new
    assert b.used["predictions"].run.name == "run-partial"
    assert set(pred.index) == {"bagnet9_small", "resnet_small", "vgg_small"}  # bagnet33_small's part is unfinished
    assert (pred["top-1"] == 0.0).all()
    assert set(b.used["predictions"].df["run_id"]) == {"run-partial"}


def test_run_id_and_missing_tables(built, tmp_path, capsys):
    out = tmp_path / "report"
    index = R.main(["--results", str(built["results"] / "experiments"), "--out", str(out), "--run-id", "run-old",
                    "--train", str(built["results"] / "train")])
    printed = capsys.readouterr().out
    assert f"html:     {out / 'index.html'}" in printed and f"markdown: {out / 'report.md'}" in printed
    md = (out / "report.md").read_text()
    for table in ("shuffle", "interaction", "masking", "heatmaps"):
        assert f"> **missing:** no complete run holds the `{table}` table among run ids run-old" in md
    assert "> **missing:** no complete run holds the `tune_trials` table" in md  # not under these paths
    acc = find(md_tables(md), "Accuracy per model")
    assert set(acc.loc[acc["source"] == "predictions", "model"]) == {"bagnet9_small"}
    assert cell(acc, "top-1", source="training", model="resnet_small") == "0.750"
    assert index == out / "index.html" and (out / "figures" / "accuracy.png").exists()


def test_empty_results_report_every_section_missing(tmp_path):
    (tmp_path / "results").mkdir()
    index = R.build_report(str(tmp_path / "results"), str(tmp_path / "out"))
    md = (index.parent / "report.md").read_text()
    assert md.count("> **missing:**") == 9  # training runs, tune_trials, predictions x2, shuffle, interaction, masking, heatmaps, runs
    assert "<img" not in index.read_text()
    with pytest.raises(SystemExit, match="results path not found"):
        R.main(["--results", str(tmp_path / "nope")])


def test_discover_tolerates_layouts(tmp_path):
    df = M.predictions("r", models=("bagnet9_small",)).drop(columns=["experiment", "model"])
    table = pa.Table.from_pandas(df, preserve_index=False)
    # 1. a single file named after its table, run manifest beside it
    (tmp_path / "a" / "r1").mkdir(parents=True)
    pq.write_table(table, tmp_path / "a" / "r1" / "predictions.parquet")
    (tmp_path / "a" / "r1" / "_SUCCESS").write_text("")  # an empty marker counts too
    # 2. an unknown table name below a manifest, hive folders, marker per table
    part = tmp_path / "b" / "r2" / "extra" / "experiment=x" / "model=bagnet9_small"
    part.mkdir(parents=True)
    pq.write_table(table, part / "part-0.parquet")
    (tmp_path / "b" / "r2" / "_SUCCESS").write_text(json.dumps({"run_id": "custom-id"}))
    # 3. stray parquet: no table, no manifest
    pq.write_table(table, tmp_path / "stray.parquet")
    catalog = T.discover(str(tmp_path))
    runs = {r.name: r for r in catalog.runs}
    assert set(runs) == {"r1", "r2"} and all(r.complete for r in runs.values())
    assert list(runs["r1"].tables) == ["predictions"] and list(runs["r2"].tables) == ["extra"]
    assert catalog.unrecognised == [str(tmp_path / "stray.parquet")]
    extra = T.load(catalog, "extra", run_ids=["custom-id"])  # manifest run_id selects too
    assert extra.run.name == "r2" and set(extra.df["model"]) == {"bagnet9_small"} and set(extra.df["experiment"]) == {"x"}
    assert T.load(catalog, "predictions").df["correct_top1"].mean() == pytest.approx(M.ACCURACY["bagnet9_small"])
    assert T.load(catalog, "predictions", run_ids=["r2"]) is None


def test_help():
    with pytest.raises(SystemExit) as exc:
        R.parse_args(["--help"])
    assert exc.value.code == 0


def test_report_from_s3(built, s3_bucket, tmp_path):
    from store import storage

    local = built["results"]
    for sub in ("experiments/run-old", "experiments/run-partial", "train/bagnet9_small"):
        for f in (local / sub).rglob("*"):
            if f.is_file():
                storage.write_bytes_atomic(f"s3://{s3_bucket}/res/{f.relative_to(local).as_posix()}", f.read_bytes())
    catalog = T.discover(f"s3://{s3_bucket}/res")
    runs = {r.name: r for r in catalog.runs}
    assert runs["run-old"].complete and not runs["run-partial"].complete
    assert runs["run-old"].path == f"s3://{s3_bucket}/res/experiments/run-old"
    assert [r.name for r in catalog.train_runs] == ["bagnet9_small"]
    index = R.build_report(f"s3://{s3_bucket}/res", f"s3://{s3_bucket}/report")
    assert index == f"s3://{s3_bucket}/report/index.html"
    md = storage.read_bytes(f"s3://{s3_bucket}/report/report.md").decode()
    acc = find(md_tables(md), "Accuracy per model")
    assert cell(acc, "top-1", source="predictions", model="bagnet9_small") == "0.450"  # run-old, not run-partial
    assert cell(acc, "top-1", source="training", model="bagnet9_small") == "0.400"
    assert storage.read_bytes(f"s3://{s3_bucket}/report/figures/accuracy.png")[:4] == b"\x89PNG"
