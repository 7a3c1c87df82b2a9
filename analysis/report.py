"""Turn the result tables into the paper's tables and figures: ``index.html`` + ``report.md``.

    python -m analysis.report --results results/experiments --train results/train --out report
    python -m analysis.report --results s3://bucket/bagnet/results --run-id 20250101-abc

Every table is read from one run only: the newest complete run (one with a ``_SUCCESS``
manifest) that holds it, or the run named by ``--run-id``. Training runs (folders with
``metrics.parquet`` + ``config.yaml``) are found under ``--train`` paths and under ``--results``.
Figures are written as PNG files to ``<out>/figures/`` and referenced relatively.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures
from analysis import tables as T
from analysis.html import Details, Figure, Section, Table, render_html, render_markdown
from store import storage

TITLE = "BagNet experiments: report"


def log(msg: str) -> None:
    print(f"[report] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Helpers shared by the sections


def model_q_of(name: str) -> int | None:
    """Patch size of a zoo model (None for unconstrained CNNs). The zoo's ``bagnet<q>[_...]``
    names are parsed directly so the report does not import torch for them."""
    name = str(name)
    if "bagnet" not in name.lower():
        return None
    if m := re.fullmatch(r"bagnet(\d+)(?:_\w+)?", name):
        return int(m.group(1))
    from bagnet.models import model_q

    try:
        return model_q(name)
    except (KeyError, ValueError):
        return None


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Fill ``q`` from the model name where missing; tell apart one model under several weights."""
    df = df.copy()
    if "model" not in df:
        df["model"] = "?"
    df["model"] = df["model"].astype(str)
    names = df["model"].unique()
    qmap = {m: model_q_of(m) for m in names}
    known = df["q"] if "q" in df else pd.Series(np.nan, index=df.index)
    df["q"] = pd.to_numeric(known, errors="coerce").fillna(df["model"].map(qmap).astype(float))
    if "weights" in df and df["weights"].notna().any():
        multi = df.groupby("model")["weights"].nunique()
        multi = set(multi[multi > 1].index)
        if multi:
            short = df["weights"].astype(str).str.rsplit("/", n=1).str[-1]
            df["model"] = np.where(df["model"].isin(multi), df["model"] + " [" + short + "]", df["model"])
    return df


def model_order(df: pd.DataFrame) -> list[str]:
    """BagNets by patch size, then the other models by name."""
    pairs = df[["model", "q"]].drop_duplicates("model")
    key = lambda r: (np.isnan(r.q), r.q if not np.isnan(r.q) else 0, r.model)  # noqa: E731
    return [r.model for r in sorted(pairs.itertuples(index=False), key=key)]


def wide(agg: pd.DataFrame, index: list[str], column: str, value: str, order: list[str]) -> pd.DataFrame:
    """``value`` with one row per ``index`` combination (models in ``order``) and one column per
    value of ``column`` (integral numbers shown as integers)."""
    if "q" in index:  # NaN keys would drop the CNNs
        agg = agg.assign(q=agg["q"].map(q_text).astype(str))
    table = agg.pivot_table(index=index, columns=column, values=value, aggfunc="first", sort=True)
    table.columns = [str(int(c)) if isinstance(c, (int, float, np.integer, np.floating)) and float(c).is_integer() else str(c)
                     for c in table.columns]
    table = table.reset_index()
    rank = table["model"].map({m: i for i, m in enumerate(order)})
    keys = [k for k in index if k != "model"]
    table = table.assign(_o=rank).sort_values([*(k for k in keys if k != "q"), "_o"]).drop(columns="_o")
    return table.reset_index(drop=True)


def q_text(q) -> str | int:
    return "–" if q is None or (isinstance(q, float) and np.isnan(q)) else int(q)


def as_time(values: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(values):
        return pd.to_datetime(values, unit="s", utc=True, errors="coerce")
    return pd.to_datetime(values, utc=True, errors="coerce", format="mixed")


def when(ts) -> str:
    return "–" if ts is None or pd.isna(ts) else pd.Timestamp(ts).strftime("%Y-%m-%d %H:%M")


def get_path(obj, dotted: str):
    """``obj['a']['b']`` for ``'a.b'``, or None."""
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def synthetic_groups(num_classes: int, image_size: int = 64) -> list[str] | None:
    """Class-kind name (e.g. ``local``, ``pairs 17px``) of each synthetic class, or None."""
    from bagnet.synthetic import SyntheticWorld

    world = SyntheticWorld(image_size=max(64, int(image_size)))
    if world.num_classes != num_classes:
        return None
    return ["local motifs" if c.kind == "local" else f"arrangement {c.scale}px" for c in world.classes]


class Builder:
    """Reads tables (one run each), writes figures, remembers which runs it used."""

    def __init__(self, catalog: T.Catalog, out: str, run_ids: list[str] | None, include_incomplete: bool):
        self.catalog, self.out, self.run_ids, self.include_incomplete = catalog, out, run_ids, include_incomplete
        self.used: dict[str, T.TableData] = {}
        self._cache: dict[str, T.TableData | None] = {}

    def load(self, table: str) -> T.TableData | None:
        if table not in self._cache:
            data = T.load(self.catalog, table, self.run_ids, self.include_incomplete, with_source=table == "heatmaps")
            if data is not None:
                log(f"{table}: {len(data.df)} rows from run {data.run.name}" + ("" if data.run.complete else " (INCOMPLETE)"))
                self.used[table] = data
            self._cache[table] = data
        return self._cache[table]

    def table_section(self, title: str, anchor: str, table: str) -> tuple[Section, pd.DataFrame | None]:
        """A section built on one table: it and the table's prepared rows, or None (marked missing)."""
        sec = Section(title, anchor)
        data = self.load(table)
        if data is None or data.df.empty:
            sec.missing.append(self.missing(table))
            return sec, None
        sec.source = self.source(table)
        return sec, prepare(data.df)

    def missing(self, table: str) -> str:
        skipped = [r.name for r in self.catalog.runs if table in r.tables and not r.complete]
        what = f"no {'' if self.include_incomplete else 'complete '}run holds the `{table}` table"
        if self.run_ids:
            what += f" among run ids {', '.join(self.run_ids)}"
        if skipped and not self.include_incomplete:
            what += f" (incomplete, skipped: {', '.join(skipped)}; use --include-incomplete to see them)"
        return what

    def source(self, *tables: str) -> str:
        parts = [f"{t}: run {self.used[t].run.name}" for t in tables if t in self.used]
        return ("from " + "; ".join(parts)) if parts else ""

    def figure(self, name: str, png: bytes, caption: str) -> Figure:
        storage.write_bytes_atomic(storage.join(self.out, "figures", f"{name}.png"), png)
        return Figure(caption, f"figures/{name}.png")

    def copy_file(self, src: str, name: str, caption: str) -> Figure:
        storage.write_bytes_atomic(storage.join(self.out, "figures", name), storage.read_bytes(src))
        return Figure(caption, f"figures/{name}")


# ------------------------------------------------------------------------------------------------
# Sections


def train_summary(runs: Sequence[T.TrainRun]) -> pd.DataFrame:
    rows = []
    for r in runs:
        m = r.metrics
        if m.empty:
            continue
        name = str(get_path(r.config, "model.name") or "?")
        q = get_path(r.config, "model.q") or model_q_of(name)
        last = m.iloc[-1]
        rows.append({"run": r.name, "model": name, "q": float(q) if q else np.nan, "epochs": len(m),
                     "top1": float(last.get("val_top1", np.nan)), "top5": float(last.get("val_top5", np.nan)),
                     "best top-1": float(m["val_top1"].max()) if "val_top1" in m else np.nan,
                     "images/s": round(float(last.get("images_per_s", np.nan))),
                     "workers": last.get("world_size"), "finished": when(as_time(m["finished_at"]).iloc[-1]) if "finished_at" in m else "–"})
    return pd.DataFrame(rows)


def _pick(columns: Sequence[str], *patterns: str, exclude: str = "per_class") -> str | None:
    """The first column whose lower-cased name matches a pattern (patterns in priority order)."""
    for pat in patterns:
        for c in columns:
            lc = c.lower()
            if re.search(pat, lc) and exclude not in lc:
                return c
    return None


def tune_summary(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """Tune trials with normalised columns model, q, top1, top5 (+ the source column names)."""
    cols = list(df.columns)
    found = {
        "model": _pick(cols, r"^model$", r"model[./_]name$", r"model$"),
        "q": _pick(cols, r"^q$", r"[./_]q$", r"patch_size$"),
        "top1": _pick(cols, r"best.*val_top1", r"val_top1.*best", r"last.*val_top1", r"val_top1"),
        "top5": _pick(cols, r"best.*val_top5", r"val_top5.*best", r"last.*val_top5", r"val_top5"),
        "epochs": _pick(cols, r"epochs?_run", r"num_epochs", r"epochs?$", exclude="\0"),
        "stopped": _pick(cols, r"stop", exclude="\0"),
    }
    out = pd.DataFrame(index=df.index)
    for key, col in found.items():
        out[key] = df[col] if col else np.nan
    out["model"] = out["model"].astype(str)
    out = prepare(out)
    return out, {k: v for k, v in found.items() if v}


def accuracy_section(b: Builder) -> Section:
    sec = Section("Accuracy by model and patch size q", "accuracy")
    acc_rows, sources = [], []
    runs = [r for r in b.catalog.train_runs if r.complete or b.include_incomplete]
    skipped = [r.name for r in b.catalog.train_runs if r not in runs]
    train = train_summary(runs)
    if len(train):
        best = train.sort_values("top1", ascending=False).drop_duplicates("model")
        acc_rows += [{"source": "training", "model": r.model, "q": r.q, "top1": r.top1, "top5": r.top5}
                     for r in best.itertuples()]
    tune = b.load(T.TUNE_TABLE)
    tune_df = None
    if tune is not None and len(tune.df):
        tune_df, found = tune_summary(tune.df)
        best = tune_df.sort_values("top1", ascending=False).drop_duplicates("model")
        acc_rows += [{"source": "sweep", "model": r.model, "q": r.q, "top1": r.top1, "top5": r.top5}
                     for r in best.itertuples()]
    pred = b.load("predictions")
    if pred is not None and len(pred.df):
        p = prepare(pred.df)
        agg = p.groupby(["model", "q"], dropna=False).agg(top1=("correct_top1", "mean"), top5=("correct_top5", "mean")).reset_index()
        acc_rows += [{"source": "predictions", **r} for r in agg.to_dict("records")]
    sec.source = "; ".join(filter(None, [f"training runs: {len(runs)}" if runs else "", b.source(T.TUNE_TABLE, "predictions")]))
    if not runs:
        sec.missing.append("no complete training run (metrics.parquet + config.yaml + model.pt) under --train or --results"
                           + (f" (incomplete, skipped: {', '.join(skipped)})" if skipped else ""))
    if tune is None:
        sec.missing.append(b.missing(T.TUNE_TABLE))
    if pred is None:
        sec.missing.append(b.missing("predictions"))
    if not acc_rows:
        return sec
    acc = pd.DataFrame(acc_rows)
    order = model_order(acc)
    acc["_o"] = acc["model"].map({m: i for i, m in enumerate(order)})
    acc = acc.sort_values(["_o", "source"]).drop(columns="_o")
    sec.blocks.append(b.figure("accuracy", figures.accuracy_figure(acc, order),
                               "Top-1 and top-5 accuracy against the BagNets' patch size q; unconstrained CNNs as horizontal lines."))
    table = acc.assign(q=acc["q"].map(q_text)).rename(columns={"top1": "top-1", "top5": "top-5"})
    sec.blocks.append(Table("Accuracy per model (training: final epoch of the best run; sweep: best trial; predictions: mean over images)", table))
    if len(train):
        curves = pd.concat([r.metrics.assign(run=r.name, model=str(get_path(r.config, "model.name") or "?"))
                            for r in runs if "val_top1" in r.metrics], ignore_index=True)
        sec.blocks.append(b.figure("training_curves", figures.curves_figure(curves, order), "Validation top-1 per epoch of each training run."))
        sec.blocks.append(Table("Training runs (validation metrics of the final epoch)",
                                train.assign(q=train["q"].map(q_text)).rename(columns={"top1": "top-1", "top5": "top-5"})))
        kinds = train_kind_accuracy(runs)
        if kinds is not None:
            sec.blocks.append(Table("Training runs: validation top-1 by synthetic class kind (final epoch)", kinds))
    if skipped:
        sec.blocks.append(f"Incomplete training runs skipped (no model.pt): {', '.join(skipped)}.")
    if tune_df is not None:
        trials = tune.df
        keep = [c for c in trials.columns
                if not re.search(r"checkpoint|path|dir$|_run$|_source|created_at|^run_id$|^dataset$|^seed$", c.lower())
                and not isinstance(trials[c].iloc[0], (list, np.ndarray, dict)) and trials[c].notna().any()
                and not (c != found.get("model") and found.get("model") and trials[c].equals(trials[found["model"]]))]
        show = trials[keep]
        if "top1" in found:
            show = show.sort_values(found["top1"], ascending=False)
        sec.blocks.append(Table(f"Sweep: the best of {len(tune.df)} trials", show.head(12)))
    if pred is not None and len(pred.df):
        kinds = prediction_kind_accuracy(prepare(pred.df), order)
        if kinds is not None:
            sec.blocks.append(Table("Predictions: top-1 by synthetic class kind", kinds))
    return sec


def train_kind_accuracy(runs: Sequence[T.TrainRun]) -> pd.DataFrame | None:
    rows = []
    for r in runs:
        if get_path(r.config, "data.dataset") != "synthetic" or "val_top1_per_class" not in r.metrics:
            continue
        per_class = np.asarray(r.metrics["val_top1_per_class"].iloc[-1], dtype=float)
        groups = synthetic_groups(len(per_class), get_path(r.config, "data.image_size") or 64)
        if groups is None:
            continue
        acc = pd.Series(per_class).groupby(pd.Series(groups), sort=False).mean()
        rows.append({"run": r.name, "model": get_path(r.config, "model.name"), **acc.to_dict()})
    return pd.DataFrame(rows) if rows else None


def prediction_kind_accuracy(p: pd.DataFrame, order: list[str]) -> pd.DataFrame | None:
    if not p.get("dataset", pd.Series(dtype=str)).astype(str).str.startswith("synthetic").all() or "label" not in p:
        return None
    groups = synthetic_groups(int(p["label"].max()) + 1)
    if groups is None:
        return None
    p = p.assign(kind=p["label"].map(dict(enumerate(groups))))
    table = p.pivot_table(index="model", columns="kind", values="correct_top1", aggfunc="mean")
    table = table[[g for g in dict.fromkeys(groups) if g in table.columns]]
    return table.reindex([m for m in order if m in table.index]).reset_index()


def shuffle_section(b: Builder) -> Section:
    sec, df = b.table_section("Patch shuffling", "shuffle", "shuffle")
    if df is None:
        return sec
    agg = df.groupby(["model", "tile"]).agg(
        q=("q", "first"), images=("image_id", "nunique") if "image_id" in df else ("tile", "size"),
        top1=("correct_top1", "mean"), top5=("correct_top5", "mean"),
        label_logit=("label_logit", "mean"), label_logit_delta=("label_logit_delta", "mean")).reset_index()
    order = model_order(df)
    sec.blocks.append(b.figure("shuffle", figures.lines_figure(
        agg, "tile", [("top1", "top-1 accuracy"), ("label_logit_delta", "label-logit change")], order,
        xlabel="tile size (px)"), "Accuracy and change of the label logit when the image's tiles are shuffled, against tile size."))
    n = int(agg["images"].max())
    sec.blocks.append(Table(f"Top-1 accuracy by tile size (px), up to {n} images per cell",
                            wide(agg, ["model", "q"], "tile", "top1", order)))
    sec.blocks.append(Table("Label-logit change against the unshuffled image, by tile size (px)",
                            wide(agg, ["model", "q"], "tile", "label_logit_delta", order)))
    return sec


def interaction_section(b: Builder) -> Section:
    sec, df = b.table_section("Interactions between image parts", "interaction", "interaction")
    if df is None:
        return sec
    df["abs_interaction"] = df["interaction"].abs()
    distances = np.sort(df["distance"].dropna().unique())
    if len(distances) > 16:  # continuous distances: 12 bins, labelled by their centres
        edges = np.histogram_bin_edges(df["distance"].dropna(), bins=12)
        idx = np.clip(np.digitize(df["distance"], edges[1:-1]), 0, len(edges) - 2)
        df["distance"] = ((edges[:-1] + edges[1:]) / 2)[idx].round(1)
    keys = ["model", "patch_size", "distance"] if "patch_size" in df and df["patch_size"].nunique() > 1 else ["model", "distance"]
    agg = df.groupby(keys).agg(q=("q", "first"), pairs=("interaction", "size"), mean_abs=("abs_interaction", "mean"),
                               mean=("interaction", "mean")).reset_index()
    order = model_order(df)
    qs = df.drop_duplicates("model").set_index("model")["q"].dropna().to_dict()
    style = "patch_size" if "patch_size" in keys else None
    sec.blocks.append(b.figure("interaction", figures.lines_figure(
        agg, "distance", [("mean_abs", "mean |interaction|"), ("mean", "mean interaction")], order, style=style,
        xlabel="distance between the regions (px)", vlines=qs),
        "Interaction (change of the label logit when both regions are perturbed minus the two single changes) "
        "against their distance; dotted lines: patch size q of each BagNet."))
    index = ["model", "q", *keys[1:-1]]
    sec.blocks.append(Table(f"Mean |interaction| by distance (px), {int(agg['pairs'].min())}+ region pairs per cell",
                            wide(agg, index, "distance", "mean_abs", order)))
    sec.blocks.append(Table("Mean interaction by distance (px)", wide(agg, index, "distance", "mean", order)))
    return sec


def masking_section(b: Builder) -> Section:
    sec, df = b.table_section("Masking the most informative regions", "masking", "masking")
    if df is None:
        return sec
    agg = df.groupby(["ranking", "model", "k_masked"]).agg(
        images=("label_logit", "size"), label_logit=("label_logit", "mean"),
        label_logit_delta=("label_logit_delta", "mean"), top5=("correct_top5", "mean")).reset_index()
    order = model_order(df)
    sec.blocks.append(b.figure("masking", figures.lines_figure(
        agg, "k_masked", [("label_logit", "label logit"), ("top5", "top-5 accuracy")], order, style="ranking",
        xlabel="regions masked (k)"), "Label logit and top-5 accuracy as the k highest-ranked regions are masked; line style: ranking method."))
    sec.blocks.append(Table("Label logit by regions masked (k)", wide(agg, ["ranking", "model"], "k_masked", "label_logit", order)))
    sec.blocks.append(Table("Top-5 accuracy by regions masked (k)", wide(agg, ["ranking", "model"], "k_masked", "top5", order)))
    return sec


def kappa_matrix(p: pd.DataFrame, order: list[str]) -> tuple[pd.DataFrame, int]:
    """Cohen's kappa of every model pair on ``correct_top1``, aligned by image_id."""
    from bagnet.metrics import cohens_kappa

    wide = p.drop_duplicates(["model", "image_id"]).pivot(index="image_id", columns="model", values="correct_top1")
    mat = pd.DataFrame(np.nan, index=order, columns=order)
    for a in order:
        for c in order:
            both = wide[[a, c]].dropna()
            if len(both):
                mat.loc[a, c] = cohens_kappa(both[a].astype(bool).to_numpy(), both[c].astype(bool).to_numpy())
    return mat, int(wide.dropna().shape[0])


def class_correlation(p: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Pearson correlation over classes of the models' per-class top-1 accuracy."""
    per_class = p.pivot_table(index="label", columns="model", values="correct_top1", aggfunc="mean")
    return per_class[order].corr(method="pearson")


def consistency_section(b: Builder) -> Section:
    sec, p = b.table_section("Error consistency", "consistency", "predictions")
    if p is None:
        return sec
    p["correct_top1"] = p["correct_top1"].astype(float)
    order = model_order(p)
    kappa, n = kappa_matrix(p, order)
    corr = class_correlation(p, order)
    sec.blocks.append(b.figure("consistency", figures.matrices_figure(
        [("Cohen's kappa (top-1 correctness)", kappa), ("per-class accuracy correlation", corr)]),
        "Error consistency between models: Cohen's kappa of their image-by-image correctness (left) and the "
        "Pearson correlation of their per-class accuracies (right)."))
    sec.blocks.append(f"{n} images classified by every model; kappa is computed per pair over the images both classified.")
    sec.blocks.append(Table("Cohen's kappa", kappa.rename_axis("model").reset_index()))
    sec.blocks.append(Table("Per-class accuracy correlation (Pearson over classes)", corr.rename_axis("model").reset_index()))
    return sec


HEAT_PATH_COLUMNS = ("path", "values_path", "heatmap_path", "file")


def heat_array(row: pd.Series) -> np.ndarray | None:
    values = row.get("values")
    if values is not None and not (isinstance(values, float) and np.isnan(values)):
        return np.asarray(values, dtype=np.float32).reshape(int(row["height"]), int(row["width"]))
    for col in HEAT_PATH_COLUMNS:
        path = row.get(col)
        if isinstance(path, str) and path:
            if not storage.is_remote(path) and not path.startswith("/"):
                path = storage.join(str(row["_source"]).rsplit("/", 1)[0], path)
            return T.load_array(path)
    return None


def synthetic_world_for(df: pd.DataFrame, manifest: dict | None):
    """The SyntheticWorld the images came from (seed and size from the dataset name or the
    manifest's data config), or None when the images are not synthetic."""
    from bagnet.synthetic import SyntheticWorld

    name = str(df["dataset"].iloc[0]) if "dataset" in df else ""
    if not name.startswith("synthetic") or not df["image_id"].astype(str).str.match(r"synthetic/\w+/\d+$").all():
        return None
    data_cfg = next((d for d in _dicts(manifest) if "image_size" in d or "seed" in d), {})
    seed = re.search(r"seed=(\d+)", name)
    size = re.search(r"(?:image_size|size)=(\d+)", name)
    return SyntheticWorld(seed=int(seed.group(1)) if seed else int(data_cfg.get("seed", 0)),
                          image_size=int(size.group(1)) if size else int(data_cfg.get("image_size", 64)))


def _dicts(obj):
    """Every dict inside ``obj`` stored under a ``data`` or ``dataset`` key."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("data", "dataset") and isinstance(v, dict):
                yield v
            yield from _dicts(v)


def synthetic_images(world):
    """``image_id -> uint8 HxWx3`` for the world's ``synthetic/<split>/<index>`` ids (cached)."""
    cache: dict[str, np.ndarray] = {}

    def get(image_id: str) -> np.ndarray:
        if image_id not in cache:
            _, split, index = image_id.split("/")
            cache[image_id] = world.sample(int(index), split).image
        return cache[image_id]
    return get


def geometry(row: pd.Series, q: float, image_shape: tuple[int, int] | None) -> tuple[int, float]:
    """``(stride, origin)`` of a heatmap: entry ``(i, j)`` is centred on image pixel
    ``(origin + stride*i, origin + stride*j)``. From the row's ``stride``/``origin`` columns
    (bagnet/experiments/heatmaps.py), else full resolution when the map is image-sized, else the
    zoo BagNets' coarse grid (stride 8, unpadded)."""
    if pd.notna(row.get("stride")) and pd.notna(row.get("origin")):
        return int(row["stride"]), float(row["origin"])
    if image_shape is not None and (int(row["height"]), int(row["width"])) == tuple(image_shape):
        return 1, 0.0
    return 8, (int(q) - 1) / 2 if not np.isnan(q) else 0.0


def patch_at(image: np.ndarray, cy: float, cx: float, q: int) -> tuple[int, int, np.ndarray]:
    """``(top, left, pixels)`` of the ``q x q`` patch centred on ``(cy, cx)`` (zeros outside)."""
    top, left = int(round(cy - (q - 1) / 2)), int(round(cx - (q - 1) / 2))
    r = q + max(abs(top), abs(left))
    padded = np.pad(image, ((r, r), (r, r), (0, 0)))
    return top, left, padded[top + r:top + r + q, left + r:left + r + q]


def heatmap_section(b: Builder) -> Section:
    sec, df = b.table_section("Heatmaps and the most informative patches", "heatmaps", "heatmaps")
    if df is None:
        return sec
    from bagnet.plots import TopPatch, top_patches_png

    run = b.load("heatmaps").run  # cached by table_section
    if "target" not in df:
        df["target"] = df["label"]
    own = df[df["target"] == df["label"]]
    df = (own if len(own) else df).reset_index(drop=True)
    order = model_order(df)
    world = synthetic_world_for(df, run.manifest)
    names = world.class_names if world is not None else None
    image_of = synthetic_images(world) if world is not None else None
    shape = (world.image_size, world.image_size) if world is not None else None
    cname = lambda y: names[int(y)] if names and 0 <= int(y) < len(names) else f"class {int(y)}"  # noqa: E731
    # gallery: one image per class, shown for every model
    shown = order[:4]
    common = set.intersection(*(set(df.loc[df["model"] == m, "image_id"]) for m in shown))
    pool = df[df["image_id"].isin(common)] if common else df[df["model"] == shown[0]]
    ids = pool.sort_values("image_id").drop_duplicates("label").sort_values("label")["image_id"].head(8).tolist()
    first = df.drop_duplicates(["model", "image_id"]).set_index(["model", "image_id"])
    labels = [int(first.xs(i, level="image_id")["label"].iloc[0]) for i in ids]
    images = [image_of(i) for i in ids] if image_of else None
    rows = []
    for m in shown:
        cells = []
        for i in ids:
            row = first.loc[(m, i)] if (m, i) in first.index else None
            heat = heat_array(row) if row is not None else None
            cells.append(None if heat is None else (heat, *geometry(row, row["q"], shape)))
        rows.append((m, cells))
    sec.blocks.append(b.figure("heatmap_gallery", figures.gallery_figure([cname(y) for y in labels], images, rows),
                               "Heatmaps of the true class (red: evidence for it, blue: against) for one image per class."))
    if world is not None:
        sec.blocks.append(f"Images regenerated from SyntheticWorld(seed={world.seed}, image_size={world.image_size}).")
    # most informative patches per class: the maximum of each true-class heatmap
    peak_rows = []
    for m in order:
        sub = df[df["model"] == m]
        q = sub["q"].iloc[0]
        best: dict[int, list] = {}
        for index, row in sub.iterrows():
            heat = heat_array(row)
            if heat is not None:
                y, x = np.unravel_index(int(np.nanargmax(heat)), heat.shape)
                best.setdefault(int(row["label"]), []).append((float(heat[y, x]), index, row, int(y), int(x)))
        patches: dict[int, list] = {}
        for label, peaks in sorted(best.items()):
            peaks.sort(key=lambda t: -t[0])
            value, _, row, y, x = peaks[0]
            stride, origin = geometry(row, q, shape)
            peak_rows.append({"model": m, "class": cname(label), "images": len(peaks), "top image": row["image_id"],
                              "peak value": value, "map entry (i, j)": f"({y}, {x})",
                              "image pixel (y, x)": f"({origin + stride * y:g}, {origin + stride * x:g})",
                              "mean peak": float(np.mean([p[0] for p in peaks]))})
            if image_of is not None and not np.isnan(q):
                for value, index, row, y, x in peaks[:4]:
                    stride, origin = geometry(row, q, shape)
                    top, left, pixels = patch_at(image_of(row["image_id"]), origin + stride * y, origin + stride * x, int(q))
                    patches.setdefault(label, []).append(TopPatch(label, value, int(index), top, left, pixels))
        if patches:
            png = top_patches_png(patches, names, title=f"{m}: top patches (q={int(q)})", dpi=figures.DPI,
                                  upscale=max(2, 48 // int(q)))
            sec.blocks.append(b.figure(f"patches_{re.sub(r'[^A-Za-z0-9_.-]', '_', m)}", png,
                                       f"{m}: the patches with the highest evidence for the true class, per class (best first)."))
    if world is None:
        sec.blocks.append("Image pixels are not available for this dataset: patches are listed by location only.")
    if peak_rows:
        sec.blocks.append(Table("Most informative location per class (heatmap maximum of the true class)", pd.DataFrame(peak_rows)))
    pngs = [f for f in run.extra_files if re.search(r"heatmap|gallery|patch", f.rsplit("/", 1)[-1].lower())]
    for i, png in enumerate(pngs[:6]):
        sec.blocks.append(b.copy_file(png, f"job_{i}_{png.rsplit('/', 1)[-1]}", f"Written by the heatmap job: {png}"))
    return sec


def runs_section(b: Builder) -> Section:
    sec = Section("The runs behind this report", "runs")
    rows = []
    used_by: dict[str, list[str]] = {}
    for table, data in b.used.items():
        used_by.setdefault(data.run.path, []).append(table)
    for r in sorted(b.catalog.runs, key=lambda r: (r.finished, r.name)):
        m = r.manifest or {}
        rows_per_table = m.get("rows_per_table")
        rows.append({"run": r.name, "complete": "yes" if r.complete else "no", "used for": ", ".join(used_by.get(r.path, [])) or "–",
                     "tables": ", ".join(sorted(r.tables)), "files": sum(len(v) for v in r.tables.values()),
                     "unfinished parts' files": len(r.uncommitted),
                     "rows (manifest)": sum(rows_per_table.values()) if isinstance(rows_per_table, dict) else "–",
                     "code version": m.get("code_version", "–"), "created": str(m.get("created_at", "–")),
                     "finished": when(pd.Timestamp(r.finished, unit="s", tz="UTC")) if r.finished else "–", "path": r.path})
    if rows:
        sec.blocks.append(Table("Result runs found (a table is read from one run only)", pd.DataFrame(rows)))
    else:
        sec.missing.append("no result tables found under " + ", ".join(b.catalog.roots))
    counts = []
    for table, data in b.used.items():
        df = data.df
        group = [c for c in ("experiment", "model") if c in df]
        for key, sub in (df.groupby(group, dropna=False) if group else [((), df)]):
            key = key if isinstance(key, tuple) else (key,)
            created = as_time(sub["created_at"]) if "created_at" in sub else pd.Series(dtype="datetime64[ns, UTC]")
            lo, hi = when(created.min()) if len(created) else "–", when(created.max()) if len(created) else "–"
            counts.append({"table": table, "run": data.run.name, "experiment": "–", "model": "–", **dict(zip(group, key)), "rows": len(sub),
                           "run_id": ", ".join(map(str, sub["run_id"].dropna().unique()[:3])) if "run_id" in sub else "–",
                           "code version": ", ".join(map(str, sub["code_version"].dropna().unique()[:3])) if "code_version" in sub else "–",
                           "created": lo if lo == hi else f"{lo} … {hi}"})
    if counts:
        sec.blocks.append(Table("Rows read, per table, experiment and model", pd.DataFrame(counts)))
    for path, tables in used_by.items():
        run = next(r for r in b.catalog.runs if r.path == path)
        if run.manifest:
            shown = {k: (f"{len(v)} parts" if k == "parts" and isinstance(v, dict) else v) for k, v in run.manifest.items()}
            sec.blocks.append(Details(f"manifest of run {run.name} ({', '.join(tables)})",
                                      json.dumps(shown, indent=2, sort_keys=True, default=str)))
    if b.catalog.train_runs:
        trows = [{"run": r.name, "model": get_path(r.config, "model.name"), "dataset": get_path(r.config, "data.dataset"),
                  "epochs": len(r.metrics), "complete": "yes" if r.complete else "no", "path": r.path} for r in b.catalog.train_runs]
        sec.blocks.append(Table("Training runs found", pd.DataFrame(trows)))
        import yaml

        for r in b.catalog.train_runs:
            sec.blocks.append(Details(f"config of training run {r.name}", yaml.safe_dump(r.config, sort_keys=False)))
    if b.catalog.stray_metrics:
        sec.blocks.append(f"{len(b.catalog.stray_metrics)} metrics.parquet file(s) without a config.yaml beside them "
                          "(e.g. a sweep's trial runs) are not listed as training runs.")
    if b.catalog.unrecognised:
        sec.blocks.append("Parquet files in no known table (ignored): " + ", ".join(b.catalog.unrecognised[:10])
                          + (" …" if len(b.catalog.unrecognised) > 10 else ""))
    return sec


SECTIONS = (accuracy_section, shuffle_section, interaction_section, masking_section, consistency_section,
            heatmap_section, runs_section)


# ------------------------------------------------------------------------------------------------
# Entry points


def build_report(results: str, out: str | None = None, train_paths: Sequence[str] = (),
                 run_id: str | Sequence[str] | None = None, include_incomplete: bool = False) -> Path | str:
    """Read the tables under ``results`` (and training runs under ``train_paths``), write
    ``<out>/index.html``, ``<out>/report.md`` and ``<out>/figures/*.png``; return the path of
    ``index.html`` (a ``Path`` for a local ``out``, the URI string for ``s3://``)."""
    results = storage.resolve(results)
    out = storage.resolve(out or (storage.join(results, "report") if not storage.is_remote(results) else "report"))
    run_ids = [run_id] if isinstance(run_id, str) else list(run_id or []) or None
    log(f"scanning {results}" + (f" and {', '.join(train_paths)}" if train_paths else ""))
    catalog = T.discover([results, *[p for p in train_paths if storage.resolve(p) != results]])
    log(f"found {len(catalog.runs)} result run(s) ({sum(r.complete for r in catalog.runs)} complete) and "
        f"{len(catalog.train_runs)} training run(s)")
    b = Builder(catalog, out, run_ids, include_incomplete)
    sections = [make(b) for make in SECTIONS]
    intro = [f"Results: {results}" + (f"; training runs: {', '.join(train_paths)}" if train_paths else "")
             + f". Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
             "Each table is read from a single run: the newest complete one holding it"
             + (f" among run ids {', '.join(run_ids)}" if run_ids else "")
             + ("; incomplete runs included on request." if include_incomplete else "; runs without a _SUCCESS manifest are skipped.")]
    index = storage.join(out, "index.html")
    storage.write_text_atomic(index, render_html(TITLE, intro, sections))
    storage.write_text_atomic(storage.join(out, "report.md"), render_markdown(TITLE, intro, sections))
    missing = sum(len(s.missing) for s in sections)
    log(f"{len(sections)} sections, {missing} missing table(s) noted")
    return index if storage.is_remote(index) else Path(index)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="results folder, local or s3:// (walked for *.parquet)")
    p.add_argument("--out", help="report folder (default: <results>/report for a local results path, else ./report)")
    p.add_argument("--train", nargs="+", action="extend", default=[], metavar="PATH",
                   help="folders holding training runs (metrics.parquet + config.yaml), searched recursively")
    p.add_argument("--run-id", nargs="+", action="extend", default=[], metavar="ID",
                   help="read tables only from these runs (folder name or manifest run_id); newest first")
    p.add_argument("--include-incomplete", action="store_true", help="also use runs without a _SUCCESS manifest")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path | str:
    args = parse_args(argv)
    try:
        index = build_report(args.results, args.out, args.train, args.run_id or None, args.include_incomplete)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    base = str(index).rsplit("/", 1)[0]
    print(f"html:     {index}\nmarkdown: {base}/report.md\nfigures:  {base}/figures/")
    return index


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
