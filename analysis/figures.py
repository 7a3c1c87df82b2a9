"""The report's charts (matplotlib, Agg backend), returned as small PNG bytes; the heatmap
pictures are :mod:`bagnet.plots`'."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bagnet.plots import figure_png  # noqa: E402

DPI = 80
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


def _chart_png(fig) -> bytes:
    """A report chart as PNG bytes (:func:`bagnet.plots.figure_png` at the report's resolution)."""
    return figure_png(fig, dpi=DPI, tight=True)


def model_colors(models: Sequence[str]) -> dict[str, tuple]:
    """One stable colour per model, in the order given."""
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(models)}


def accuracy_figure(acc: pd.DataFrame, models: Sequence[str]) -> bytes:
    """Top-1 and top-5 against patch size q: BagNets as points/lines per source, CNNs as
    horizontal lines (``acc`` columns: source, model, q, top1, top5)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    colors = model_colors(models)
    sources = list(dict.fromkeys(acc["source"]))
    for ax, metric in zip(axes, ("top1", "top5")):
        for s_i, source in enumerate(sources):
            sub = acc[(acc["source"] == source) & acc[metric].notna()]
            bag = sub[sub["q"].notna()].sort_values("q")
            if len(bag):
                ax.plot(bag["q"], bag[metric], color="0.3", ls=LINESTYLES[s_i % 4], lw=1, label=f"BagNets ({source})")
                for _, row in bag.iterrows():
                    ax.plot(row["q"], row[metric], MARKERS[s_i % 6], color=colors.get(row["model"], "k"), ms=6)
            for _, row in sub[sub["q"].isna()].iterrows():
                ax.axhline(row[metric], color=colors.get(row["model"], "k"), ls=LINESTYLES[s_i % 4], lw=1,
                           label=f"{row['model']} ({source})")
        qs = sorted(acc["q"].dropna().unique())
        if qs:
            ax.set_xscale("log", base=2)
            ax.set_xticks(qs, [str(int(q)) for q in qs])
            ax.minorticks_off()
        ax.set_xlabel("patch size q (px)")
        ax.set_title(f"{metric.replace('top', 'top-')} accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    for m in models:  # marker colour legend for the BagNets
        if acc.loc[acc["model"] == m, "q"].notna().any():
            handles.append(plt.Line2D([], [], marker="o", color=colors[m], ls="")), labels.append(m)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return _chart_png(fig)


def curves_figure(curves: pd.DataFrame, models: Sequence[str]) -> bytes:
    """Validation top-1 per epoch of each training run (columns run, model, epoch, val_top1)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    colors = model_colors(models)
    for run, sub in curves.groupby("run", sort=True):
        ax.plot(sub["epoch"] + 1, sub["val_top1"], marker=".", color=colors.get(sub["model"].iloc[0], "k"), label=run)
    ax.set(xlabel="epoch", ylabel="validation top-1", title="training runs")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _chart_png(fig)


def lines_figure(df: pd.DataFrame, x: str, panels: Sequence[tuple[str, str]], models: Sequence[str], *,
                 style: str | None = None, xlabel: str | None = None, vlines: dict[str, float] | None = None,
                 title: str = "") -> bytes:
    """One panel per ``(column, label)`` in ``panels``: the column against ``x``, one line per model
    (colour) and per value of ``style`` (line style); ``vlines`` marks x positions per model."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    colors = model_colors(models)
    styles = list(dict.fromkeys(df[style])) if style else [None]
    for ax, (col, label) in zip(axes[0], panels):
        for model in models:
            for s_i, s_val in enumerate(styles):
                sub = df[df["model"] == model]
                if style:
                    sub = sub[sub[style] == s_val]
                sub = sub.sort_values(x)
                if not len(sub):
                    continue
                ax.plot(sub[x], sub[col], marker=MARKERS[s_i % 6], ms=4, ls=LINESTYLES[s_i % 4],
                        color=colors[model])
            if vlines and model in vlines:
                ax.axvline(vlines[model], color=colors[model], ls=":", lw=1.5)
        ax.set(xlabel=xlabel or x, ylabel=label)
        ax.grid(alpha=0.3)
    # one legend entry per model (colour) and per style value (line style and marker), not per pair
    handles = [Line2D([], [], color=colors[m], marker="o", ms=4, label=m) for m in models]
    if style:
        handles += [Line2D([], [], color="0.3", marker=MARKERS[i % 6], ms=4, ls=LINESTYLES[i % 4], label=f"{style}: {v}")
                    for i, v in enumerate(styles)]
    if vlines:
        handles.append(Line2D([], [], ls=":", color="0.3", label="q of the BagNet"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _chart_png(fig)


def matrices_figure(matrices: Sequence[tuple[str, pd.DataFrame]], vmin: float = -1.0, vmax: float = 1.0) -> bytes:
    """Annotated heatmaps of square model-by-model matrices."""
    n = max(len(m) for _, m in matrices)
    side = 1.2 + 0.55 * n
    fig, axes = plt.subplots(1, len(matrices), figsize=(side * len(matrices) + 0.8, side), squeeze=False)
    for ax, (title, mat) in zip(axes[0], matrices):
        im = ax.imshow(mat.to_numpy(dtype=float), vmin=vmin, vmax=vmax, cmap="RdBu_r")
        ax.set_xticks(range(len(mat.columns)), mat.columns, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(mat.index)), mat.index, fontsize=8)
        for (i, j), v in np.ndenumerate(mat.to_numpy(dtype=float)):
            ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(v) > 0.6 else "black")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _chart_png(fig)
