"""The generic section of an experiment whose ``REPORT`` is a :class:`bagnet.experiments.Summary`:
the mean of each value per (style, model, x) as one lines figure, and one table per value."""

from __future__ import annotations

import pandas as pd

from analysis import figures
from analysis.builder import Builder, model_order, wide
from analysis.html import Section, Table
from bagnet.experiments import Summary


def value_column(df: pd.DataFrame, value: str) -> pd.Series:
    """The column a Summary value names, as floats: ``"col"``, or ``"|col|"`` for ``abs(col)``."""
    if value.startswith("|") and value.endswith("|"):
        return df[value[1:-1]].astype(float).abs()
    return df[value].astype(float)


def summarize(df: pd.DataFrame, summary: Summary) -> tuple[pd.DataFrame, str | None]:
    """``(means, style)``: one row per (style, model, x) with ``q``, ``rows`` and the mean of each
    value; ``style`` is None unless its column holds more than one value."""
    style = summary.style if summary.style and df[summary.style].nunique() > 1 else None
    keys = [k for k in (style, "model", summary.x) if k]
    values = df.assign(**{v: value_column(df, v) for v in summary.values})
    grouped = values.groupby(keys, sort=True)
    means = grouped[list(summary.values)].mean()
    means["q"] = grouped["q"].first()
    means["rows"] = grouped.size()
    return means.reset_index(), style


def section(builder: Builder, name: str, table: str, summary: Summary) -> Section:
    """Experiment ``name``'s section from its table ``table``, drawn as ``summary`` says."""
    sec, df = builder.table_section(summary.title, name, table)
    if df is None:
        return sec
    means, style = summarize(df, summary)
    order = model_order(df)
    qs = df.drop_duplicates("model").set_index("model")["q"].dropna().to_dict() if summary.mark_q else None
    panels = list(summary.values.items())
    sec.blocks.append(builder.figure(name, figures.lines_figure(
        means, summary.x, panels, order, style=style, xlabel=summary.x_label, vlines=qs), summary.caption))
    low, high = int(means["rows"].min()), int(means["rows"].max())
    count = f"{low}" if low == high else f"{low}–{high}"
    for value, label in panels:
        caption = f"{label[:1].upper()}{label[1:]} by {summary.x_label}, mean of {count} rows per cell"
        sec.blocks.append(Table(caption, wide(means, [k for k in (style, "model", "q") if k], summary.x, value, order)))
    return sec
