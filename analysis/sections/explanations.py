"""Explanations against the synthetic world's ground truth (``CustomSection("explanations")`` of the
``localization`` and ``cue_conflict`` experiments): which explanation method points at the motifs
that decide the class, and which cue (motifs or arrangement) each model follows."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from analysis import figures
from analysis.builder import Builder, in_model_order, model_order, q_text
from analysis.html import Section, Table
from bagnet.experiments import cue_conflict, localization

DECISION_COLORS = {"arrangement": "tab:blue", "motif": "tab:orange", "other": "0.75"}


def localization_section(builder: Builder) -> Section:
    sec, df = builder.table_section("Which explanation points at the evidence", "localization", localization.TABLE)
    if df is None:
        return sec
    order = model_order(df)
    rank = {m: i for i, m in enumerate(localization.METHODS)}
    table = localization.summary(df).assign(_m=lambda t: t["method"].map(rank))
    table = in_model_order(table, order, after=["_m"]).drop(columns="_m")
    methods = list(dict.fromkeys(m for m in localization.METHODS if m in set(table["method"])))
    matrices = []
    for value, title in (("energy_in_boxes", "share of positive attribution in the boxes"),
                         ("pointing_game", "maximum inside a box (pointing game)")):
        wide = table.pivot(index="model", columns="method", values=value).reindex(index=order, columns=methods)
        matrices.append((title, wide))
    sec.blocks.append(builder.figure("localization", figures.matrices_figure(matrices, vmin=0.0, vmax=1.0),
                                     "Per model (rows) and explanation method (columns), for each image's label: the "
                                     "share of the map's positive part inside the true motif boxes (energy-based "
                                     "pointing game) and how often the map's maximum falls inside one. '–': method "
                                     "not defined for the model."))
    fraction = float(df["box_fraction"].mean())
    sec.blocks.append(f"The boxes cover {fraction:.2%} of an image on average: a map spread evenly over the image "
                      "scores that share of its energy inside them.")
    layers = table[table["method"] == "gradcam"][["model", "layer"]]
    shown = table.drop(columns="layer").assign(q=lambda t: t["model"].map(df.groupby("model")["q"].first()).map(q_text))
    sec.blocks.append(Table("Localization per model and method (means over images)",
                            shown[["model", "q", "method", "images", "energy_in_boxes", "pointing_game", "box_fraction"]]))
    if len(layers):
        sec.blocks.append(Table("The layer Grad-CAM reads, per model", layers.reset_index(drop=True)))
    return sec


def decisions_figure(shares: pd.DataFrame) -> figures.Rendered:
    """Stacked horizontal bars: per model the share of decisions following each cue."""
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(shares) + 1.2))
    left = pd.Series(0.0, index=shares.index)
    for decision in cue_conflict.DECISIONS:
        ax.barh(shares["model"], shares[decision], left=left, color=DECISION_COLORS[decision], label=decision)
        left += shares[decision]
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of cue-conflict decisions")
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    return figures.render(fig)


def cue_conflict_section(builder: Builder) -> Section:
    sec, df = builder.table_section("Cue conflict: motifs or arrangement?", "cue_conflict", cue_conflict.TABLE)
    if df is None:
        return sec
    order = model_order(df)
    per_model = in_model_order(cue_conflict.shares(df), order)
    sec.blocks.append(builder.figure("cue_conflict", decisions_figure(per_model),
                                     "Decisions on images whose glyphs are a local class's and whose layout is a "
                                     "pair class's: the motif class, the arrangement class, or another class."))
    sec.blocks.append(Table("Decisions per model; arrangement bias = arrangement / (arrangement + motif)", per_model))
    by_scale = in_model_order(cue_conflict.shares(df, ("model", "pair_scale")), order, after=["pair_scale"])
    sec.blocks.append(Table("Decisions per model and pair scale S (the smallest window spanning the arrangement)",
                            by_scale))
    return sec


def section(builder: Builder) -> list[Section]:
    """The sections of whichever of the two tables some run holds."""
    made = []
    if builder.catalog.holds(localization.TABLE):
        made.append(localization_section(builder))
    if builder.catalog.holds(cue_conflict.TABLE):
        made.append(cue_conflict_section(builder))
    return made
