"""Heatmaps and the most informative patches (the ``heatmaps`` experiment's
``CustomSection("heatmaps")``): a gallery of true-class maps for one image per class, each
BagNet's best patches per class and a table of where each class's evidence peaks.

Every map is placed by its row's ``stride`` and ``origin``. The table is read without its maps
(the heatmap experiment's summary columns give every peak); the full maps are read only for the
images the gallery shows. Synthetic images are regenerated from the world of the run's job config
(``config["data"]``); ImageNet images are read back from its ``data.root`` (local or ``s3://``)
and given the evaluation crop the maps were computed on."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from analysis import figures
from analysis.builder import Builder, log, model_order, prepare, run_world
from analysis.html import Figure, Section, Table
from bagnet.experiments import heatmaps
from bagnet.imagenet import decode_rgb, eval_transform
from bagnet.plots import Heat, TopPatch, crop_patch, figure_files, heatmap_grid_figure, top_patches_figure
from bagnet.synthetic import SyntheticWorld
from store import results, storage
from store.catalog import Run

GALLERY_MODELS = 4
GALLERY_IMAGES = 12  # columns of the gallery: every class up to this many, else classes spread evenly
PATCHES_PER_CLASS = 4
MAP_COLUMN = "values"  # the full maps: read only for the images shown
SUMMARY_COLUMNS = [c for c in results.table_schema(heatmaps.SCHEMA).names if c != MAP_COLUMN] + list(results.PARTITION_KEYS)


def heat_of(row: pd.Series) -> Heat:
    """The map of one row, placed as its producer says."""
    values = np.asarray(row["values"], np.float32).reshape(int(row["height"]), int(row["width"]))
    return Heat(values, int(row["stride"]), float(row["origin"]))


def image_source(world: SyntheticWorld | None, run: Run | None = None) -> Callable[[str], np.ndarray] | None:
    """``image_id -> H x W x 3`` uint8 (cached): regenerated from ``world``, else for an ImageNet
    run read from its ``data.root`` with the evaluation crop; None when neither is possible."""
    data = (run.config or {}).get("data", {}) if run is not None else {}
    if world is None and not (data.get("dataset") == "imagenet" and data.get("root")):
        return None
    cache: dict[str, np.ndarray] = {}

    def image(image_id: str) -> np.ndarray:
        if image_id not in cache:
            if world is not None:
                split, index = world.parse_image_id(image_id)
                cache[image_id] = world.sample(index, split).image
            else:
                path = storage.join(storage.resolve(data["root"]), image_id)
                size = int(data["image_size"])
                crop = eval_transform(size, data.get("resize") or round(size * 8 / 7))
                cache[image_id] = crop(decode_rgb(storage.read_bytes(path), path))
        return cache[image_id]
    return image


def full_maps(builder: Builder, image_ids: list[str]) -> pd.DataFrame:
    """The rows, maps included, of ``image_ids`` (only these are read), models named as the
    section's rows are (:func:`analysis.builder.prepare`)."""
    rows = builder.rows(heatmaps.TABLE, pads.field("image_id").isin(image_ids))
    rows = prepare(rows)
    own = rows[rows["target"] == rows["label"]]
    return own if len(own) else rows


def gallery(builder: Builder, df: pd.DataFrame, order: list[str], class_name: Callable[[int], str],
            image_of: Callable[[str], np.ndarray] | None) -> Figure:
    """The gallery figure: one image per class (shared by the first models), one row per model."""
    shown = order[:GALLERY_MODELS]
    common = set.intersection(*(set(df.loc[df["model"] == m, "image_id"]) for m in shown))
    pool = df[df["image_id"].isin(common)] if common else df[df["model"] == shown[0]]
    picked = pool.sort_values("image_id").drop_duplicates("label").sort_values("label")
    if len(picked) > GALLERY_IMAGES:  # spread over all classes (and so over every class kind)
        picked = picked.iloc[np.linspace(0, len(picked) - 1, GALLERY_IMAGES).round().astype(int)]
    ids, labels = picked["image_id"].tolist(), picked["label"].tolist()
    first = full_maps(builder, ids).drop_duplicates(["model", "image_id"]).set_index(["model", "image_id"])
    rows = [[heat_of(first.loc[(m, i)]) if (m, i) in first.index else None for i in ids] for m in shown]
    fig = heatmap_grid_figure([image_of(i) for i in ids] if image_of else None, rows,
                              [class_name(y).replace(" ", "\n", 1) for y in labels], row_labels=shown, cell=1.15,
                              dpi=figures.DPI, colorbar="class logit", fontsize=8)
    return builder.figure("heatmap_gallery", figure_files(fig, dpi=figures.DPI),
                          f"Heatmaps of the true class (red: evidence for it, blue: against) for one image of each of "
                          f"{len(ids)} classes; one colour scale per model (its bar: the patch logit of the class).")


def peaks(df: pd.DataFrame, model: str, class_name: Callable[[int], str],
          image_of: Callable[[str], np.ndarray] | None) -> tuple[list[dict], dict[int, list[TopPatch]]]:
    """The peak of every true-class map of ``model``: one table row per class (its best image), and
    the model's top-patches figure when the images are available."""
    sub = df[df["model"] == model]
    q = sub["q"].iloc[0]
    by_class: dict[int, list[tuple[float, int, pd.Series, int, int]]] = {}
    for index, row in sub.iterrows():  # the producer's summary of each map: no map is read
        y, x = int(row["peak_i"]), int(row["peak_j"])
        by_class.setdefault(int(row["label"]), []).append((float(row["peak_value"]), index, row, y, x))
    table: list[dict] = []
    patches: dict[int, list[TopPatch]] = {}
    for label, found in sorted(by_class.items()):
        found.sort(key=lambda t: -t[0])
        value, _, row, y, x = found[0]
        stride, origin = int(row["stride"]), float(row["origin"])
        table.append({"model": model, "class": class_name(label), "images": len(found), "top image": row["image_id"],
                      "peak value": value, "map entry (i, j)": f"({y}, {x})",
                      "image pixel (y, x)": f"({origin + stride * y:g}, {origin + stride * x:g})",
                      "mean peak": float(np.mean([f[0] for f in found]))})
        if image_of is not None and not np.isnan(q):
            for value, index, row, y, x in found[:PATCHES_PER_CLASS]:
                stride, origin = int(row["stride"]), float(row["origin"])
                top = round(origin + stride * y - (q - 1) / 2)  # the q x q patch centred on the entry
                left = round(origin + stride * x - (q - 1) / 2)
                pixels = crop_patch(image_of(row["image_id"]), top, left, int(q))
                patches.setdefault(label, []).append(TopPatch(label, value, int(index), top, left, pixels))
    return table, patches


def section(builder: Builder) -> Section:
    sec, df = builder.table_section("Heatmaps and the most informative patches", "heatmaps", heatmaps.TABLE,
                                    columns=SUMMARY_COLUMNS)
    if df is None:
        return sec
    run = builder.load(heatmaps.TABLE).run
    world = run_world(run)
    own = df[df["target"] == df["label"]]
    df = (own if len(own) else df).reset_index(drop=True)
    order = model_order(df)
    names = world.class_names if world is not None else None
    image_of = image_source(world, run)

    def class_name(label: int) -> str:
        return names[int(label)] if names else f"class {int(label)}"

    try:
        sec.blocks.append(gallery(builder, df, order, class_name, image_of))
    except (OSError, ValueError) as err:  # an ImageNet file gone or unreadable since the run
        log(f"heatmaps: images not drawn ({err})")
        image_of = None
        sec.blocks.append(gallery(builder, df, order, class_name, image_of))
    if world is not None:
        sec.blocks.append(f"Images regenerated from SyntheticWorld(seed={world.seed}, image_size={world.image_size}).")
    elif image_of is not None:
        sec.blocks.append(f"Images read from {run.config['data']['root']} (the evaluation crop the maps were computed on).")
    else:
        sec.blocks.append("Image pixels are not available for this dataset: patches are listed by location only.")
    rows = []
    for model in order:
        table, patches = peaks(df, model, class_name, image_of)
        rows += table
        if patches:
            q = int(df.loc[df["model"] == model, "q"].iloc[0])
            fig = top_patches_figure(patches, names, title=f"{model}: top patches (q={q})", dpi=figures.DPI,
                                     upscale=max(3, 72 // q), fontsize=8)
            sec.blocks.append(builder.figure(f"patches_{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}",
                                             figure_files(fig, dpi=figures.DPI),
                                             f"{model}: the patches with the highest evidence for the true class, "
                                             "per class (best first)."))
    sec.blocks.append(Table("Most informative location per class (heatmap maximum of the true class)",
                            pd.DataFrame(rows)))
    return sec
