"""The report over several training seeds: tables written by the producers' code (tests/make_tables.py)
for two seeds of the same models; every number is the mean over seeds with its spread."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import report as R
from analysis.seeds import over_seeds, with_spread
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
