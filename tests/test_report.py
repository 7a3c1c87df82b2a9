"""The analysis report built from small tables written by the producers' code
(tests/make_tables.py): its sections, numbers, run selection, missing tables, the layout the
catalog reads, and a section for an experiment registered at run time."""

from __future__ import annotations

import re
import sys

import numpy as np
import pandas as pd
import pytest

from analysis import report as R
from analysis.builder import Builder
from analysis.html import Table
from analysis.sections import accuracy
from bagnet.experiments import EXPERIMENTS
from store import catalog, results, storage
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


def test_localization_and_cue_conflict_tables(built):
    tables = md_tables(built["md"])
    loc = find(tables, "Localization per model and method")
    assert cell(loc, "energy_in_boxes", model="resnet_small", method="integrated_gradients") == "0.500"
    assert cell(loc, "pointing_game", model="resnet_small", method="occlusion") == "0.250"
    cue = find(tables, "Decisions per model;")
    assert cell(cue, "arrangement_bias", model="bagnet9_small") == "0.000"
    assert cell(cue, "arrangement", model="vgg_small") == cell(cue, "arrangement_bias", model="vgg_small") == "0.500"


def test_sections_present_with_figures(built):
    md, html = built["md"], built["html"]
    for title in ("Accuracy by model and patch size q", "Patch shuffling", "Interactions between image parts",
                  "Masking the most informative regions", "Error consistency", "Heatmaps and the most informative patches",
                  "The runs behind this report", "Which explanation points at the evidence",
                  "Cue conflict: motifs or arrangement?", "Certified robustness to adversarial patches"):
        assert f"## {title}" in md and f"<h2>{title}</h2>" in html
    assert "missing:" not in md
    images = re.findall(r'<img src="([^"]+)"', html)
    assert {"figures/accuracy.png", "figures/training_curves.png", "figures/shuffle.png", "figures/interaction.png",
            "figures/masking.png", "figures/consistency.png", "figures/consistency_intervals.png",
            "figures/heatmap_gallery.png", "figures/patches_bagnet9_small.png",
            "figures/patches_bagnet33_small.png", "figures/localization.png", "figures/cue_conflict.png",
            "figures/patch_robustness.png"} == set(images)
    for src in images:
        png = (built["index"].parent / src).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 400_000, src
        svg = (built["index"].parent / src).with_suffix(".svg").read_text()  # a vector copy beside each PNG
        assert "<svg" in svg, src
    # report.md holds the same tables as index.html
    assert len(md_tables(md)) == html.count("<table>") >= 12


def test_accuracy_from_training_sweep_and_predictions(built):
    acc = find(md_tables(built["md"]), "Accuracy per model")
    expected = M.predictions().groupby("model")[["correct_top1", "correct_top5"]].mean()
    for model, row in expected.iterrows():
        assert cell(acc, "top-1", source="predictions", model=model) == f3(row.correct_top1)
    # 10 classes: top-5 tells little and is left out, saying so
    assert "top-5" not in acc.columns and "Top-5 is left out: with 10 classes" in built["md"]
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
    pred = M.predictions()
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
    pred = M.predictions()
    per_class = pred.pivot_table(index="label", columns="model", values="correct_top1", aggfunc="mean")
    r = np.corrcoef(per_class["bagnet9_small"], per_class["resnet_small"])[0, 1]
    assert cell(corr, "resnet_small", model="bagnet9_small") == f3(r)


def test_summary_sections_show_the_means_per_model(built):
    """shuffle, interaction and masking are generic Summary sections: one table per value."""
    tables = md_tables(built["md"])
    top1, delta = find(tables, "Top-1 accuracy by tile size (px)"), find(tables, "Label-logit change by tile size (px)")
    sh = M.shuffle()
    for (model, tile), sub in sh.groupby(["model", "tile"]):
        assert cell(top1, str(tile), model=model) == f3(sub.correct_top1.mean())
        assert cell(delta, str(tile), model=model) == f3(sub.label_logit_delta.mean() + 0.0)
    assert cell(top1, "q", model="vgg_small") == "–" and cell(top1, "q", model="bagnet33_small") == "33"
    assert "mean of 10 rows per cell" in [c for c in tables if c.startswith("Top-1 accuracy by tile")][0]
    mean_abs = find(tables, "Mean |interaction| by distance between the regions (px)")
    mean = find(tables, "Mean interaction by distance between the regions (px)")
    assert cell(mean_abs, "16", model="bagnet9_small") == "0.000"  # beyond q = 9
    assert cell(mean_abs, "16", model="resnet_small") == "0.250"
    assert cell(mean, "16", model="resnet_small") == f3(0.25 * 2 / 4)  # signs +, +, +, -
    assert cell(mean_abs, "q", model="bagnet33_small") == "33"
    assert "patch_size" not in mean_abs  # one region size: no style column
    logit = find(tables, "Label logit by regions masked (k)")
    assert not [c for c in tables if c.startswith("Top-5 accuracy by regions")]  # 10 classes: top-5 left out
    assert list(logit.columns[:3]) == ["ranking", "model", "q"]
    assert cell(logit, "4", ranking="bagnet_heatmap", model="bagnet9_small") == "1.000"
    assert cell(logit, "8", ranking="random", model="vgg_small") == f3(5 - 0.2 * 8)


def test_heatmap_peaks(built):
    peaks = find(md_tables(built["md"]), "Most informative location per class")
    hm = M.heatmaps()
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
    assert cell(runs, "used for", run="run-new") == ("predictions, localization, cue_conflict, heatmaps, interaction, "
                                                     "masking, patch_robustness, shuffle")
    assert cell(runs, "complete", run="run-partial") == "no"
    assert cell(runs, "used for", run="run-partial") == "–"
    assert cell(runs, "used for", run="run-old") == "–"  # older than run-new
    assert cell(runs, "used for", run="sweep") == "tune_trials"
    assert cell(runs, "unfinished parts' files", run="run-partial") == "1"
    assert cell(runs, "rows (manifest)", run="run-old") == "40"
    counts = find(md_tables(built["md"]), "Rows read")
    assert set(counts["run"]) == {"run-new", "sweep"}
    assert cell(counts, "rows", table="predictions", model="vgg_small") == str(M.N_IMAGES)
    assert "abc1234" in built["md"]
    assert "Registered experiments without a table" not in built["md"]


def test_include_incomplete_uses_only_committed_parts_of_one_run(built, tmp_path):
    found = catalog.discover(str(built["results"]))
    builder = Builder(found, str(tmp_path), None, include_incomplete=True)
    acc = find(section_tables(accuracy.accuracy_section(builder)), "Accuracy per model")
    pred = acc[acc["source"] == "predictions"].set_index("model")
    # the newest run is now run-partial: its committed parts only, nothing from run-new
    assert builder.used["predictions"].run.name == "run-partial"
    assert set(pred.index) == {"bagnet9_small", "resnet_small", "vgg_small"}  # bagnet33_small's part is unfinished
    assert (pred["top-1"] == "0.000").all()
    assert set(builder.used["predictions"].df["run_id"]) == {"run-partial"}


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


def test_a_report_on_an_empty_folder_fails(tmp_path):
    (tmp_path / "results").mkdir()
    with pytest.raises(SystemExit, match="no result runs or training runs under .*results: nothing to report"):
        R.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="results path not found"):
        R.main(["--results", str(tmp_path / "nope")])


def test_training_runs_alone_get_the_accuracy_section(built, tmp_path):
    index = R.build_report(str(built["results"] / "train"), str(tmp_path / "out"))
    md = (index.parent / "report.md").read_text()
    assert [t for t in re.findall(r"^## (.+)$", md, re.M)] == [accuracy.TITLE, "The runs behind this report"]
    assert cell(find(md_tables(md), "Accuracy per model"), "top-1", source="training", model="bagnet9_small") == "0.400"


def test_catalog_reads_the_writers_layout_only(tmp_path):
    rows = M.predictions(models=("bagnet9_small",))
    M.write_run(tmp_path / "a", "r1", {"predictions": rows})
    # a table of any name in the writer's layout is found, its partition values become columns
    table = results.rows_to_table(rows.drop(columns="model").to_dict("records"), {
        "run_id": "r2", "q": 9, "weights": "w", "dataset": "synthetic", "split": "val", "seed": 0,
        "precision": "fp32", "code_version": "x", "created_at": M.CREATED}, EXPERIMENTS["predictions"].SCHEMA,
        experiment="extra")
    writer = results.PartWriter(results.part_dir(str(tmp_path / "b" / "r2"), "extra", {"experiment": "x", "model": "m"}))
    writer.write(table)
    writer.commit()
    results.write_manifest(str(tmp_path / "b" / "r2"), {"run_id": "custom-id", "config": {}})
    # files the writers never produce: a table as one file, a Parquet file outside any run
    storage.write_table_atomic(str(tmp_path / "a" / "r1" / "predictions.parquet"), table)
    storage.write_table_atomic(str(tmp_path / "stray.parquet"), table)
    found = catalog.discover(str(tmp_path))
    runs = {r.name: r for r in found.runs}
    assert set(runs) == {"r1", "r2"} and all(r.complete for r in runs.values())
    assert list(runs["r1"].tables) == ["predictions"] and list(runs["r2"].tables) == ["extra"]
    assert runs["r1"].config["data"]["dataset"] == "synthetic" and runs["r1"].config["split"] == "val"
    assert sorted(found.unrecognised) == [str(tmp_path / "a" / "r1" / "predictions.parquet"), str(tmp_path / "stray.parquet")]
    assert found.select("extra", ["custom-id"]) is runs["r2"]  # the manifest's run_id selects too
    extra = catalog.read_table(runs["r2"], "extra")
    assert set(extra["experiment"].to_pylist()) == {"x"} and set(extra["model"].to_pylist()) == {"m"}
    assert found.select("predictions", ["r2"]) is None
    # a marker that is not a JSON object is an error naming the file, not a complete run
    (tmp_path / "b" / "r2" / results.MARKER).write_text("")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "b" / "r2" / results.MARKER))):
        catalog.discover(str(tmp_path))


PROBE_SOURCE = """
from dataclasses import dataclass

import pyarrow as pa

from bagnet.experiments import Summary

TABLE = "tilt_probe"
SCHEMA = pa.schema([("angle", pa.int64()), ("kind", pa.string()), ("score", pa.float64())])
REPORT = Summary(title="Tilt probe", x="angle", x_label="tilt (degrees)",
                 values={"score": "mean score", "|score|": "mean |score|"}, style="kind",
                 caption="Score against tilt.", mark_q=True)


@dataclass
class Params:
    pass


def run(model, images, labels, params, *, ctx):
    raise NotImplementedError("the test writes its rows itself")
"""


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """``tilt_probe``, an experiment module outside the project, registered while the test runs."""
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "tilt_probe.py").write_text(PROBE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    yield EXPERIMENTS.register("tilt_probe")
    EXPERIMENTS.unregister("tilt_probe")
    sys.modules.pop("tilt_probe", None)


def test_a_registered_experiment_gets_its_summary_section(probe, tmp_path):
    rows = pd.DataFrame([{"model": m, "image_id": i, "label": 0, "angle": a, "kind": k, "score": sign * a * (1 + n)}
                         for n, m in enumerate(("bagnet9_small", "resnet_small")) for a in (0, 10, 20)
                         for k in ("flip", "turn") for i, sign in zip(M.image_ids(2), (1, -3))])
    M.write_run(tmp_path / "results", "probe-run", {"tilt_probe": rows})
    index = R.build_report(str(tmp_path / "results"), str(tmp_path / "out"))
    md, html = (index.parent / "report.md").read_text(), index.read_text()
    assert "## Tilt probe" in md and "<h2>Tilt probe</h2>" in html and "missing:" not in md
    assert '<img src="figures/tilt_probe.png" alt="Score against tilt."' in html
    assert (index.parent / "figures" / "tilt_probe.png").read_bytes()[:4] == b"\x89PNG"
    tables = md_tables(md)
    score, magnitude = find(tables, "Mean score by tilt (degrees)"), find(tables, "Mean |score| by tilt (degrees)")
    assert list(score.columns) == ["kind", "model", "q", "0", "10", "20"]
    assert cell(score, "20", kind="turn", model="resnet_small") == f3((20 * 2 - 3 * 20 * 2) / 2)
    assert cell(magnitude, "20", kind="turn", model="resnet_small") == f3((40 + 120) / 2)
    assert cell(score, "q", kind="flip", model="bagnet9_small") == "9"
    EXPERIMENTS.unregister("tilt_probe")  # now its table is listed, with no section
    md = (R.build_report(str(tmp_path / "results"), str(tmp_path / "out2")).parent / "report.md").read_text()
    assert "## Tilt probe" not in md and re.search(r"Tables of no registered experiment .*: tilt_probe\.", md)


def test_help():
    with pytest.raises(SystemExit) as exc:
        R.parse_args(["--help"])
    assert exc.value.code == 0


def test_report_from_s3(built, s3_bucket, tmp_path):
    local = built["results"]
    for sub in ("experiments/run-old", "experiments/run-partial", "train/bagnet9_small"):
        for f in (local / sub).rglob("*"):
            if f.is_file():
                storage.write_bytes_atomic(f"s3://{s3_bucket}/res/{f.relative_to(local).as_posix()}", f.read_bytes())
    found = catalog.discover(f"s3://{s3_bucket}/res")
    runs = {r.name: r for r in found.runs}
    assert runs["run-old"].complete and not runs["run-partial"].complete
    assert runs["run-old"].path == f"s3://{s3_bucket}/res/experiments/run-old"
    assert [r.name for r in found.train_runs] == ["bagnet9_small"]
    index = R.build_report(f"s3://{s3_bucket}/res", f"s3://{s3_bucket}/report")
    assert index == f"s3://{s3_bucket}/report/index.html"
    md = storage.read_bytes(f"s3://{s3_bucket}/report/report.md").decode()
    acc = find(md_tables(md), "Accuracy per model")
    assert cell(acc, "top-1", source="predictions", model="bagnet9_small") == "0.450"  # run-old, not run-partial
    assert cell(acc, "top-1", source="training", model="bagnet9_small") == "0.400"
    assert storage.read_bytes(f"s3://{s3_bucket}/report/figures/accuracy.png")[:4] == b"\x89PNG"


def test_paths_below_the_working_directory_are_shown_relative(tmp_path, monkeypatch):
    """A committed report names no folder of the machine it was made on."""
    from analysis.builder import shown_path

    monkeypatch.chdir(tmp_path)
    assert shown_path(str(tmp_path / "results" / "run")) == "results/run"
    assert shown_path("/elsewhere/run") == "/elsewhere/run"
    assert shown_path("s3://bucket/run") == "s3://bucket/run"
