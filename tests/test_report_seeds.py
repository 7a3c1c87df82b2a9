"""The report over several training seeds: tables written by the producers' code (tests/make_tables.py)
for two seeds of the same models; every number is the mean over seeds with its spread."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from analysis import report as R
from analysis.builder import Builder, prepare
from analysis.seeds import over_seeds, over_seeds_of_sums, with_spread
from analysis.sections import summary
from store import catalog
from tests import make_tables as M
from tests.test_report import cell, find, md_tables

MODELS = ("bagnet9_small", "resnet_small")
TRAIN_TOP1 = {0: {"bagnet9_small": 0.4, "resnet_small": 0.6}, 1: {"bagnet9_small": 0.5, "resnet_small": 0.8}}


def seed_predictions(seed: int):
    rows = M.predictions(models=MODELS)
    if seed:  # seed 1: bagnet9_small right on 4 more images
        wrong = rows.index[(rows["model"] == "bagnet9_small") & ~rows["correct_top1"]][:4]
        rows.loc[wrong, "correct_top1"] = True
    return rows


def seed_shuffle(seed: int):
    rows = M.shuffle(models=MODELS)
    return rows.assign(label_logit_delta=rows["label_logit_delta"] - seed)


@pytest.fixture(scope="module")
def seeds_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    runs = []
    for seed in (0, 1):
        runs.append(f"exp-seed{seed}")
        M.write_run(root / "experiments", runs[-1], {"predictions": seed_predictions(seed),
                                                      "shuffle": seed_shuffle(seed)})
        for model, top1 in TRAIN_TOP1[seed].items():
            M.write_train_run(root / "train", f"{model}-seed{seed}", model, [top1 - 0.1, top1])
    index = R.build_report(str(root / "experiments"), str(root / "out"), train_paths=[str(root / "train")],
                           run_id=runs, seed_runs=runs)
    return (index.parent / "report.md").read_text()


def test_accuracy_is_the_mean_over_seeds_with_its_spread(seeds_report):
    acc = find(md_tables(seeds_report), "Accuracy per model")
    for model in MODELS:
        values = [TRAIN_TOP1[s][model] for s in (0, 1)]
        assert cell(acc, "top-1", source="training", model=model) == with_spread(np.mean(values), np.std(values, ddof=1))
        per_seed = [(lambda r: r.loc[r["model"] == model, "correct_top1"].mean())(seed_predictions(s)) for s in (0, 1)]
        assert cell(acc, "top-1", source="predictions", model=model) == \
            f"{np.mean(per_seed):.3f} ± {np.std(per_seed, ddof=1):.3f}"
        assert cell(acc, "seeds", source="training", model=model) == "2"
    assert "mean ± standard deviation over 2 training seeds" in seeds_report


def test_summary_sections_aggregate_over_seeds(seeds_report):
    delta = find(md_tables(seeds_report), "Label-logit change by tile size (px)")
    for (model, tile), sub in seed_shuffle(0).groupby(["model", "tile"]):
        means = [sub["label_logit_delta"].mean(), sub["label_logit_delta"].mean() - 1]
        assert cell(delta, str(tile), model=model) == with_spread(np.mean(means), np.std(means, ddof=1))
    assert "seed runs (numbers are mean ± spread over them): exp-seed0, exp-seed1" in seeds_report


def test_over_seeds_without_replicates_has_no_spread():
    df = M.shuffle(models=("bagnet9_small",))
    out = over_seeds(df, ["model", "tile"], ["label_logit"])
    assert (out["seeds"] == 1).all() and out["label_logit_sd"].isna().all()
    assert with_spread(0.5, np.nan) == "0.500" and with_spread(0.5, 0.01) == "0.500 ± 0.010"


def test_summaries_aggregated_in_the_scan_equal_pandas_over_the_rows(tmp_path):
    """The summary sections aggregate in the Parquet scan (Arrow's group-by), never holding the
    rows: the numbers equal pandas' over the rows read whole, missing values, unconstrained CNNs
    (q null), absolute values and two seed runs included."""
    rng = np.random.default_rng(0)
    runs = []
    for seed in (0, 1):
        rows = M.interaction(models=("bagnet9_small", "resnet_small"))
        values = rng.normal(size=len(rows))
        values[rng.random(len(rows)) < 0.2] = np.nan  # missing: left out of a mean, counted in rows
        runs.append(f"exp-seed{seed}")
        M.write_run(tmp_path, runs[-1], {"interaction": rows.assign(interaction=values)})
    builder = Builder(catalog.discover(str(tmp_path)), str(tmp_path / "out"), runs, False, seed_runs=runs)
    keys, values = ["patch_size", "model", "distance"], ["|interaction|", "interaction"]
    sums = builder.replicate_sums("interaction", ["patch_size", "distance"],
                                  {v: summary.value_expression(v) for v in values})
    assert len(builder.used) == 2 and all(data.df is None for data in builder.used.values())  # no row held
    got = over_seeds_of_sums(sums, keys, values)

    rows = pd.concat([catalog.read_table(r, "interaction").to_pandas().assign(replicate=r.name)
                      for r in catalog.discover(str(tmp_path)).runs], ignore_index=True)
    rows = prepare(rows).assign(**{"|interaction|": rows["interaction"].abs()})
    want = over_seeds(rows, keys, values)
    assert got[keys].equals(want[keys]) and got[["rows", "seeds"]].equals(want[["rows", "seeds"]])
    for column in [*values, *(f"{v}_sd" for v in values)]:
        np.testing.assert_allclose(got[column], want[column], rtol=1e-12)
    assert set(got["seeds"]) == {2} and set(got["rows"]) == {4}


def test_a_grouped_scan_equals_pandas_on_a_generated_table(tmp_path):
    rows = M.masking()
    rows = rows.assign(label_logit=np.where(np.arange(len(rows)) % 7 == 0, np.nan, rows["label_logit"]))
    M.write_run(tmp_path, "run", {"masking": rows})
    (run,) = catalog.discover(str(tmp_path)).runs
    where = pads.field("k_masked") > 0
    got = catalog.aggregate_table(run, "masking", ["model", "ranking"], {
        "rows": ("count_all", None), "logit_sum": ("sum", "label_logit"), "logit_n": ("count", "label_logit"),
        "top5": ("mean", pc.field("correct_top5").cast(pa.float64())), "k_max": ("max", "k_masked"),
        "ids": ("distinct", "image_id")}, where).to_pandas().sort_values(["model", "ranking"], ignore_index=True)
    read = catalog.read_table(run, "masking").to_pandas()
    per = read[read["k_masked"] > 0].groupby(["model", "ranking"])
    want = pd.DataFrame({"rows": per.size(), "logit_sum": per["label_logit"].sum(),
                         "logit_n": per["label_logit"].count(), "top5": per["correct_top5"].mean(),
                         "k_max": per["k_masked"].max()}).reset_index()
    exact = ["model", "ranking", "rows", "logit_n", "k_max"]
    assert got[exact].equals(want[exact])
    np.testing.assert_allclose(got[["logit_sum", "top5"]], want[["logit_sum", "top5"]], rtol=1e-12)
    assert [sorted(ids) for ids in got["ids"]] == [sorted(set(s)) for s in per["image_id"].apply(list)]
