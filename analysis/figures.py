"""The report's charts (matplotlib, Agg backend), each returned as PNG (150 dpi) and SVG bytes
(``{"png": ..., "svg": ...}``); the heatmap pictures are :mod:`bagnet.plots`'.

Numbers averaged over training seeds come with their spread: ``<value>`` is the mean and
``<value>_sd`` the standard deviation over seeds (NaN or absent with one seed), drawn as error
bars or bands."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bagnet.plots import figure_files  # noqa: E402

DPI = 150
STYLE = {"font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "legend.fontsize": 8.5,
         "xtick.labelsize": 8.5, "ytick.labelsize": 8.5}
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
Rendered = dict[str, bytes]  # file extension -> bytes
WRAP = 3  # panels per row of small multiples of one value (fits a printed page)


def render(fig) -> Rendered:
    """A report chart as PNG (at :data:`DPI`) and SVG bytes."""
    return figure_files(fig, dpi=DPI, tight=True)


def model_colors(models: Sequence[str]) -> dict[str, tuple]:
    """One stable colour per model, in the order given."""
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(models)}


def spread(df: pd.DataFrame, column: str) -> np.ndarray:
    """The spread over seeds of ``column`` (``<column>_sd``), zeros where there is none."""
    sd = df.get(f"{column}_sd")
    return np.zeros(len(df)) if sd is None else np.nan_to_num(sd.to_numpy(dtype=float))


def log2_axis(ax, values: Sequence[float], axis: str = "x") -> None:
    """A log2 axis ticked at ``values`` (powers of two and patch sizes alike)."""
    ticks = sorted({float(v) for v in values if v > 0})
    if not ticks:
        return
    getattr(ax, f"set_{axis}scale")("log", base=2)
    getattr(ax, f"set_{axis}ticks")(ticks, [f"{t:g}" for t in ticks])
    getattr(ax, f"{axis}axis").set_minor_locator(matplotlib.ticker.NullLocator())


def accuracy_figure(acc: pd.DataFrame, models: Sequence[str], metrics: Sequence[str] = ("top1", "top5")) -> Rendered:
    """``metrics`` (top1, top5) against patch size q: BagNets as points/lines per source, CNNs as
    horizontal lines (``acc`` columns: source, model, q, the metrics and their ``_sd`` spreads over
    seeds, drawn as error bars and bands)."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 0.6, 3.2), sharey=True, squeeze=False)
        colors = model_colors(models)
        sources = list(dict.fromkeys(acc["source"]))
        for ax, metric in zip(axes[0], metrics):
            for s_i, source in enumerate(sources):
                sub = acc[(acc["source"] == source) & acc[metric].notna()]
                bag = sub[sub["q"].notna()].sort_values("q")
                if len(bag):
                    ax.plot(bag["q"], bag[metric], color="0.3", ls=LINESTYLES[s_i % 4], lw=1, label=f"BagNets ({source})")
                    for (_, row), err in zip(bag.iterrows(), spread(bag, metric)):
                        ax.errorbar(row["q"], row[metric], yerr=err or None, fmt=MARKERS[s_i % 6],
                                    color=colors.get(row["model"], "k"), ms=6, capsize=3)
                for (_, row), err in zip(sub[sub["q"].isna()].iterrows(), spread(sub[sub["q"].isna()], metric)):
                    color = colors.get(row["model"], "k")
                    ax.axhline(row[metric], color=color, ls=LINESTYLES[s_i % 4], lw=1, label=f"{row['model']} ({source})")
                    if err:
                        ax.axhspan(row[metric] - err, row[metric] + err, color=color, alpha=0.12, lw=0)
            log2_axis(ax, acc["q"].dropna().unique())
            ax.set_xlabel("patch size q (px)")
            ax.set_title(f"{metric.replace('top', 'top-')} accuracy")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy")
        handles, labels = axes[0][0].get_legend_handles_labels()
        for m in models:  # marker colour legend for the BagNets
            if acc.loc[acc["model"] == m, "q"].notna().any():
                handles.append(Line2D([], [], marker="o", color=colors[m], ls="")), labels.append(m)
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
        return render(fig)


def curves_figure(curves: pd.DataFrame, models: Sequence[str]) -> Rendered:
    """Validation top-1 per epoch of each training run (columns run, model, epoch, val_top1); the
    runs of one model (its seeds) share its colour."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 3.2))
        colors = model_colors(models)
        for run, sub in curves.groupby("run", sort=True):
            ax.plot(sub["epoch"] + 1, sub["val_top1"], marker=".", color=colors.get(sub["model"].iloc[0], "k"), lw=1)
        ax.set(xlabel="epoch", ylabel="validation top-1", title="training runs (one line per run)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        shown = [m for m in models if m in set(curves["model"])]
        ax.legend(handles=[Line2D([], [], color=colors[m], marker=".", label=m) for m in shown],
                  loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        return render(fig)


def _guide(ax, x: float, label: str, color) -> None:
    """A dotted vertical guide at ``x``, labelled at the top of the panel."""
    ax.axvline(x, color=color, ls=":", lw=1.5)
    ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2), textcoords="offset points",
                ha="left", va="top", fontsize=7.5, color=color)


def _band(ax, sub: pd.DataFrame, x: str, col: str, **line) -> None:
    """``col`` against ``x`` as a line, with a band of its spread over seeds where there is one."""
    ax.plot(sub[x], sub[col], **line)
    err = spread(sub, col)
    if err.any():
        ax.fill_between(sub[x], sub[col] - err, sub[col] + err, color=line.get("color"), alpha=0.15, lw=0)


def _x_axis(ax, df: pd.DataFrame, x: str, log2_x: bool) -> None:
    if log2_x:
        log2_axis(ax, df[x].unique())


def lines_figure(df: pd.DataFrame, x: str, panels: Sequence[tuple[str, str]], models: Sequence[str], *,
                 xlabel: str | None = None, guides: dict[str, tuple[float, str]] | None = None,
                 guide_label: str = "", log2_x: bool = False, title: str = "", style: str | None = None,
                 vlines: dict[str, float] | None = None) -> Rendered:
    """One panel per ``(column, label)`` in ``panels``: the column against ``x``, one line per model
    (with a band of its spread over seeds); ``guides`` marks ``(x, label)`` per model in its colour
    (``guide_label`` names them in the legend). With a ``style`` column holding several values:
    :func:`small_multiples_figure`; ``vlines`` (x per model) are unlabelled guides."""
    guides = guides or {m: (v, "") for m, v in (vlines or {}).items()}
    if style and df[style].nunique() > 1:
        return small_multiples_figure(df, x, panels, models, style, xlabel=xlabel, guides=guides, log2_x=log2_x)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels) + 0.4, 3.2), squeeze=False)
        colors = model_colors(models)
        for ax, (col, label) in zip(axes[0], panels):
            for model in models:
                sub = df[df["model"] == model].sort_values(x)
                if len(sub):
                    _band(ax, sub, x, col, marker="o", ms=4, color=colors[model])
                if guides and model in guides:
                    _guide(ax, *guides[model], color=colors[model])
            _x_axis(ax, df, x, log2_x)
            ax.set(xlabel=xlabel or x, ylabel=label)
            ax.grid(alpha=0.3)
        handles = [Line2D([], [], color=colors[m], marker="o", ms=4, label=m) for m in models]
        if guides:
            handles.append(Line2D([], [], ls=":", color="0.3", label=guide_label))
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return render(fig)


def small_multiples_figure(df: pd.DataFrame, x: str, panels: Sequence[tuple[str, str]], models: Sequence[str],
                           style: str, *, xlabel: str | None = None, guides: dict[str, tuple[float, str]] | None = None,
                           log2_x: bool = False, style_label: str | None = None) -> Rendered:
    """A panel per model (columns) and per ``(column, label)`` of ``panels`` (rows): the column
    against ``x``, one line per value of ``style`` (colour and marker, with a band of its spread
    over seeds), one legend for all; ``guides`` marks ``(x, label)`` in a model's panels. Panels
    of a row share their y axis."""
    styles = list(dict.fromkeys(df[style]))
    cmap = plt.get_cmap("tab10")
    # one value: the models wrapped in rows of WRAP panels; several: a row per value
    columns = min(len(models), WRAP) if len(panels) == 1 else len(models)
    grid_rows = -(-len(models) // columns) if len(panels) == 1 else len(panels)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(grid_rows, columns, figsize=(2.5 * columns + 0.6, 2.2 * grid_rows + 0.7),
                                 squeeze=False, sharex=True, sharey="row" if len(panels) > 1 else True)
        for ax in axes.flat[len(models) * len(panels):]:
            ax.axis("off")
        for r, (col, label) in enumerate(panels):
            for c, model in enumerate(models):
                ax = axes[r, c] if len(panels) > 1 else axes.flat[c]
                for s_i, value in enumerate(styles):
                    sub = df[(df["model"] == model) & (df[style] == value)].sort_values(x)
                    if len(sub):
                        _band(ax, sub, x, col, marker=MARKERS[s_i % 6], ms=3.5, lw=1.2, color=cmap(s_i % 10))
                if guides and model in guides:
                    _guide(ax, *guides[model], color="0.35")
                _x_axis(ax, df, x, log2_x)
                ax.grid(alpha=0.3)
                ax.set_title(model if r == 0 else "")
                ax.tick_params(labelbottom=True)
                if r == len(panels) - 1:
                    ax.set_xlabel(xlabel or x)
                if ax.get_subplotspec().is_first_col():
                    ax.set_ylabel(label)
        handles = [Line2D([], [], color=cmap(i % 10), marker=MARKERS[i % 6], ms=4, label=str(v))
                   for i, v in enumerate(styles)]
        fig.legend(handles=handles, title=style_label or style, loc="lower center", ncol=min(len(styles), 6),
                   bbox_to_anchor=(0.5, 0.0), frameon=False)
        fig.tight_layout(rect=(0, 0.12 / grid_rows ** 0.5, 1, 1))
        return render(fig)


def matrices_figure(matrices: Sequence[tuple[str, pd.DataFrame]], vmin: float = -1.0, vmax: float = 1.0) -> Rendered:
    """Annotated heatmaps of square model-by-model matrices."""
    n = max(len(m) for _, m in matrices)
    side = 1.4 + 0.6 * n
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(matrices), figsize=(side * len(matrices) + 0.8, side), squeeze=False)
        for ax, (title, mat) in zip(axes[0], matrices):
            im = ax.imshow(mat.to_numpy(dtype=float), vmin=vmin, vmax=vmax, cmap="RdBu_r")
            ax.set_xticks(range(len(mat.columns)), mat.columns, rotation=45, ha="right")
            ax.set_yticks(range(len(mat.index)), mat.index)
            for (i, j), v in np.ndenumerate(mat.to_numpy(dtype=float)):
                ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7.5,
                        color="white" if abs(v) > 0.6 else "black")
            ax.set_title(title)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        return render(fig)


def kappa_intervals_figure(pairs: pd.DataFrame) -> Rendered:
    """Kappa of each pair of different models with its bootstrap 95 % interval as an error bar
    (``pairs`` columns: model_a, model_b, kappa, kappa_low, kappa_high), highest kappa on top."""
    rows = pairs[pairs["model_a"] != pairs["model_b"]].sort_values("kappa")
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 0.6 + 0.26 * len(rows)))
        y = np.arange(len(rows))
        low = (rows["kappa"] - rows["kappa_low"]).clip(lower=0).fillna(0)
        high = (rows["kappa_high"] - rows["kappa"]).clip(lower=0).fillna(0)
        ax.errorbar(rows["kappa"], y, xerr=[low, high], fmt="o", color="0.2", ms=4, capsize=2.5, lw=1)
        ax.axvline(0, color="0.5", lw=1, ls="--")
        ax.set_yticks(y, [f"{a} – {b}" for a, b in zip(rows["model_a"], rows["model_b"])])
        ax.set(xlabel="error consistency (kappa) with bootstrap 95 % interval", ylim=(-0.7, len(rows) - 0.3))
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        return render(fig)
