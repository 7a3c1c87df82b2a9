"""Accuracy by model and patch size q, from the training runs, the sweep's trials and the
``predictions`` table; and the error consistency between the models (the ``predictions``
experiment's ``CustomSection("accuracy")``, also shown when only training runs or sweeps exist)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis import figures
from analysis.seeds import REPLICATE, over_seeds, seeds_note, spread_text
from analysis.builder import (
    Builder, TableData, as_time, in_model_order, model_order, q_text, run_world, synthetic_world, when,
)
from analysis.html import Section, Table
from bagnet.experiments import predictions
from bagnet.models import model_q
from store.catalog import TrainRun
from store.schemas import TUNE_TABLE, read_tune_metadata

TITLE = "Accuracy by model and patch size q"
ACCURACY_COLUMNS = ["source", "model", "q", "top1", "top1_sd", "top5", "top5_sd", "seeds"]
TOP5_MIN_CLASSES = 21  # with fewer classes top-5 is close to 1 for every model and tells little


def train_summary(runs: Sequence[TrainRun]) -> pd.DataFrame:
    """One row per training run: its model, q and the validation metrics of its final epoch."""
    rows = []
    for r in runs:
        m, name = r.metrics, r.config["model"]["name"]
        last = m.iloc[-1]
        rows.append({"run": r.name, "model": name, "q": float(model_q(name) or np.nan),
                     "seed": int((r.config.get("run") or {}).get("seed", 0)), "epochs": len(m),
                     "top1": float(last["val_top1"]), "top5": float(last["val_top5"]),
                     "best top-1": float(m["val_top1"].max()), "images/s": round(float(last["images_per_s"])),
                     "workers": int(last["world_size"]), "finished": when(as_time(m["finished_at"]).iloc[-1])})
    return pd.DataFrame(rows, columns=["run", "model", "q", "seed", "epochs", "top1", "top5", "best top-1", "images/s",
                                       "workers", "finished"])


def train_kind_accuracy(runs: Sequence[TrainRun]) -> pd.DataFrame | None:
    """Final-epoch validation top-1 per synthetic class kind of each run on the synthetic world."""
    rows = []
    for r in runs:
        world = synthetic_world(r.config["data"])
        if world is not None:
            kinds = world.kind_accuracy(r.metrics["val_top1_per_class"].iloc[-1])
            rows.append({"run": r.name, "model": r.config["model"]["name"], **kinds})
    return pd.DataFrame(rows) if rows else None


def sweep_trials(tune: TableData) -> tuple[pd.DataFrame, str]:
    """The trials, best first by the sweep's own metric, with the columns worth showing (the
    search-space columns named in the table's metadata), and a caption."""
    params, objective = read_tune_metadata(tune.schema)
    metric, mode = objective["metric"], objective["mode"]
    score = f"{metric}_best"
    columns = ["trial_id", "model", "q", *params, "epochs", "stopped_early", "status",
               *dict.fromkeys([f"{metric}_last", score, "val_top1_best", "val_top5_best"])]
    trials = tune.df.sort_values(score, ascending=mode == "min", na_position="last")[columns]
    return trials.assign(q=trials["q"].astype(float)), f"Sweep: {len(trials)} trials, best first by {score} ({mode})"


def prediction_kind_accuracy(pred: TableData, p: pd.DataFrame, order: list[str]) -> pd.DataFrame | None:
    """Top-1 per synthetic class kind of each model (mean ± spread over seeds), when the run's
    images are synthetic."""
    world = run_world(pred.run)
    if world is None:
        return None
    kinds = world.class_kinds()
    rows = p.assign(kind=p["label"].map(dict(enumerate(kinds))), correct=p["correct_top1"].astype(float))
    agg = over_seeds(rows, ["model", "kind"], ["correct"])
    agg = spread_text(agg, ["correct"])
    table = agg.pivot(index="model", columns="kind", values="correct")
    table = table[[k for k in dict.fromkeys(kinds) if k in table.columns]]
    return table.reindex([m for m in order if m in table.index]).reset_index().rename_axis(columns=None)


def accuracy_rows(train: pd.DataFrame, trials: pd.DataFrame | None, p: pd.DataFrame | None) -> pd.DataFrame:
    """``source, model, q, top1, top5`` (with ``_sd`` spreads and the number of ``seeds``): each
    model's training runs (its seeds: mean and spread of their final epochs), its best sweep
    trial, and its mean over the predictions table (per seed, then over seeds)."""
    frames = []
    if len(train):
        frames.append(over_seeds(train.assign(**{REPLICATE: train["run"]}), ["model", "q"], ["top1", "top5"])
                      .assign(source="training"))
    if trials is not None:
        best = trials.drop_duplicates("model").rename(columns={"val_top1_best": "top1", "val_top5_best": "top5"})
        frames.append(best.assign(source="sweep", seeds=1, top1_sd=np.nan, top5_sd=np.nan))
    if p is not None:
        rows = p.assign(top1=p["correct_top1"].astype(float), top5=p["correct_top5"].astype(float))
        frames.append(over_seeds(rows, ["model", "q"], ["top1", "top5"]).assign(source="predictions"))
    if not frames:
        return pd.DataFrame(columns=ACCURACY_COLUMNS)
    return pd.concat([f[ACCURACY_COLUMNS] for f in frames], ignore_index=True)


def readable(df: pd.DataFrame, top5: bool = True) -> pd.DataFrame:
    """Accuracies as ``mean ± spread`` text (top-5 left out unless ``top5``), q as a number."""
    metrics = ["top1", "top5"] if top5 else ["top1"]
    shown = spread_text(df.drop(columns=[c for c in ("top5", "top5_sd") if not top5 and c in df]), metrics)
    return shown.assign(q=shown["q"].map(q_text)).rename(columns={"top1": "top-1", "top5": "top-5"})


def class_count(runs: Sequence[TrainRun], pred: TableData | None, p: pd.DataFrame | None) -> int:
    """The number of classes: of the training runs' data, else the predictions run's world, else
    the labels seen."""
    for r in runs:
        return len(r.metrics["val_top1_per_class"].iloc[-1])
    world = run_world(pred.run) if pred is not None else None
    if world is not None:
        return world.num_classes
    return int(p["label"].max()) + 1 if p is not None and len(p) else 0


def accuracy_section(builder: Builder) -> Section:
    sec = Section(TITLE, "accuracy")
    runs = builder.train_runs()
    skipped = [r.name for r in builder.catalog.train_runs if r not in runs]
    train = train_summary(runs)
    tune, pred = builder.load(TUNE_TABLE), builder.load(predictions.TABLE)
    trials, trials_caption = sweep_trials(tune) if tune is not None else (None, "")
    p = builder.replicates(predictions.TABLE) if pred is not None else None
    sec.source = "; ".join(filter(None, [f"training runs: {len(runs)}" if runs else "",
                                         builder.source(TUNE_TABLE, predictions.TABLE)]))
    if not runs:
        sec.missing.append("no complete training run (metrics.parquet + config.yaml + model.pt) under --train or "
                           "--results" + (f" (incomplete, skipped: {', '.join(skipped)})" if skipped else ""))
    sec.missing += [builder.missing(t) for t, data in ((TUNE_TABLE, tune), (predictions.TABLE, pred)) if data is None]
    acc = accuracy_rows(train, trials, p)
    if acc.empty:
        return sec
    order = model_order(acc)
    acc = in_model_order(acc, order, after=["source"])
    classes = class_count(runs, pred, p)
    top5 = classes >= TOP5_MIN_CLASSES
    note = "" if top5 else f" Top-5 is left out: with {classes} classes it is near 1 for every model and tells little."
    metrics = ("top1", "top5") if top5 else ("top1",)
    sec.blocks.append(builder.figure("accuracy", figures.accuracy_figure(acc, order, metrics),
                                     "Top-1" + (" and top-5" if top5 else "") + " accuracy against the BagNets' patch "
                                     "size q (log2 axis); unconstrained CNNs as horizontal lines; error bars and "
                                     "bands: standard deviation over training seeds." + note))
    seeds = seeds_note(acc.loc[acc["source"] != "sweep", "seeds"])
    sec.blocks.append(Table(f"Accuracy per model (training: final epoch, {seeds}"
                            + "; sweep: best trial; predictions: mean over images)", readable(acc, top5)))
    if runs:
        curves = pd.concat([r.metrics.assign(run=r.name, model=r.config["model"]["name"]) for r in runs])
        sec.blocks.append(builder.figure("training_curves", figures.curves_figure(curves, order),
                                         "Validation top-1 per epoch of each training run."))
        sec.blocks.append(Table("Training runs (validation metrics of the final epoch)",
                                readable(train, top5).drop(columns=["seeds"], errors="ignore")))
        kinds = train_kind_accuracy(runs)
        if kinds is not None:
            sec.blocks.append(Table("Training runs: validation top-1 by synthetic class kind (final epoch)", kinds))
    if skipped:
        sec.blocks.append(f"Incomplete training runs skipped (no model.pt): {', '.join(skipped)}.")
    if trials is not None:
        sec.blocks.append(Table(trials_caption, trials.head(12).assign(q=trials["q"].map(q_text))))
    if p is not None:
        kinds = prediction_kind_accuracy(pred, p, order)
        if kinds is not None:
            sec.blocks.append(Table("Predictions: top-1 by synthetic class kind", kinds))
    return sec


def pair_matrix(pairs: pd.DataFrame, value: str, order: list[str]) -> pd.DataFrame:
    """A symmetric ``model x model`` matrix of ``value`` from one row per pair (``model_a, model_b``)."""
    both = pd.concat([pairs, pairs.rename(columns={"model_a": "model_b", "model_b": "model_a"})])
    matrix = both.drop_duplicates(["model_a", "model_b"]).pivot(index="model_a", columns="model_b", values=value)
    return matrix.reindex(index=order, columns=order).astype(float).rename_axis(index="model", columns=None)


def consistency_section(builder: Builder) -> Section:
    sec, p = builder.table_section("Error consistency", "consistency", predictions.TABLE)
    if p is None:
        return sec
    order = model_order(p)
    pairs = predictions.error_consistency(p, self_pairs=True)
    kappa = pair_matrix(pairs, "kappa", order)
    corr = pair_matrix(predictions.class_accuracy_correlation(p, self_pairs=True), "correlation", order)
    shared = len(predictions.correctness_matrix(p).dropna())
    sec.blocks.append(builder.figure("consistency", figures.matrices_figure(
        [("Cohen's kappa (top-1 correctness)", kappa), ("per-class accuracy correlation", corr)]),
        "Error consistency between models: Cohen's kappa of their image-by-image correctness (left) and the "
        "Pearson correlation of their per-class accuracies (right)."))
    between = pairs[pairs["model_a"] != pairs["model_b"]]
    if len(between):
        sec.blocks.append(builder.figure("consistency_intervals", figures.kappa_intervals_figure(between),
                                         f"Error consistency of each pair of models with its bootstrap 95 % interval "
                                         f"({predictions.BOOTSTRAP_RESAMPLES} resamples of the images); intervals "
                                         "that overlap mean the difference between two pairs is not established."))
    sec.blocks.append(f"{shared} images classified by every model; kappa = (c_obs − c_exp) / (1 − c_exp) with "
                      "c_exp = p_a p_b + (1 − p_a)(1 − p_b), computed per pair over the images both classified.")
    sec.blocks.append(Table("Cohen's kappa", kappa.reset_index()))
    if len(between):
        shown = in_model_order(between.rename(columns={"model_a": "model"}), order, after=["model_b"])
        shown = shown.assign(**{"95 % interval": [f"[{lo:.3f}, {hi:.3f}]" if not np.isnan(lo) else "–"
                                                  for lo, hi in zip(shown["kappa_low"], shown["kappa_high"])]})
        sec.blocks.append(Table("Error consistency per pair: kappa with its bootstrap 95 % interval (images resampled)",
                                shown[["model", "model_b", "n_images", "observed_agreement", "kappa", "95 % interval"]]
                                .rename(columns={"model": "model a", "model_b": "model b", "n_images": "images",
                                                 "observed_agreement": "c_obs"})))
    sec.blocks.append(Table("Per-class accuracy correlation (Pearson over classes)", corr.reset_index()))
    return sec


def section(builder: Builder) -> list[Section]:
    """The accuracy section, and the error consistency when some run holds the predictions table."""
    sections = [accuracy_section(builder)]
    if builder.catalog.holds(predictions.TABLE):
        sections.append(consistency_section(builder))
    return sections
