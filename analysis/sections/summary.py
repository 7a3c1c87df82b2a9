"""The generic section of an experiment whose ``REPORT`` is a :class:`bagnet.experiments.Summary`:
the mean of each value per (style, model, x) (each training seed's mean, then the mean and spread
over seeds) as one figure, and one table per value.

With a ``style`` (e.g. the ranking method of masking) the figure is small multiples: a panel per
model, a line per style value, one shared legend; without, one panel per value with a line per
model. A top-5 value is left out where the classes are too few for top-5 to tell anything."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from analysis import figures
from analysis.builder import Builder, model_order, run_world, wide
from analysis.html import Section, Table
from analysis.seeds import over_seeds_of_sums, seeds_note, spread_text
from analysis.sections.accuracy import TOP5_MIN_CLASSES
from bagnet.experiments import Summary


def value_expression(value: str) -> pc.Expression:
    """The column a Summary value names, as floats: ``"col"``, or ``"|col|"`` for ``abs(col)``."""
    if value.startswith("|") and value.endswith("|"):
        return pc.abs(pc.field(value[1:-1]).cast(pa.float64()))
    return pc.field(value).cast(pa.float64())


def summarize(sums: pd.DataFrame, summary: Summary, values: list[str] | None = None) -> tuple[pd.DataFrame, str | None]:
    """``(means, style)`` from the table's per-replicate sums (:meth:`Builder.replicate_sums`): one
    row per (style, model, x) with ``q``, ``rows`` (per seed), ``seeds``, and each value's mean
    over seeds and ``<value>_sd`` spread; ``style`` is None unless its column holds more than one value."""
    values = values or list(summary.values)
    style = summary.style if summary.style and sums[summary.style].nunique() > 1 else None
    keys = [k for k in (style, "model", summary.x) if k]
    means = over_seeds_of_sums(sums, keys, values)
    q = sums.drop_duplicates("model").set_index("model")["q"]
    return means.assign(q=means["model"].map(q)), style


def informative(value: str, classes: int | None) -> bool:
    """False for a top-5 value when there are fewer than :data:`TOP5_MIN_CLASSES` classes."""
    return "top5" not in value or classes is None or classes >= TOP5_MIN_CLASSES


def section(builder: Builder, name: str, table: str, summary: Summary) -> Section:
    """Experiment ``name``'s section from its table ``table``, drawn as ``summary`` says."""
    sec, data = builder.section_of(summary.title, name, table, rows=False)  # aggregated in the scan: no rows held
    if data is None:
        return sec
    world = run_world(data.run)
    classes = world.num_classes if world is not None else None
    panels = [(v, label) for v, label in summary.values.items() if informative(v, classes)]
    left_out = [label for v, label in summary.values.items() if not informative(v, classes)]
    keys = [k for k in (summary.style, summary.x) if k]
    df = builder.replicate_sums(table, keys, {v: value_expression(v) for v, _ in panels})
    means, style = summarize(df, summary, [v for v, _ in panels])
    order = model_order(df)
    caption = summary.caption + (" Bands: standard deviation over training seeds." if means["seeds"].max() > 1 else "")
    if left_out:
        caption += f" Not shown: {', '.join(left_out)} (with {classes} classes it tells little)."
    qs = df.drop_duplicates("model").set_index("model")["q"].dropna().to_dict() if summary.mark_q else {}
    if style:
        guides = {m: (q - 1, f"q−1={int(q - 1)}") for m, q in qs.items()}
        files = figures.small_multiples_figure(means, summary.x, panels, order, style, xlabel=summary.x_label,
                                               guides=guides, log2_x=summary.log2_x, style_label=style.replace("_", " "))
    else:
        files = figures.lines_figure(means, summary.x, panels, order, xlabel=summary.x_label,
                                     guides={m: (q - 1, f"q−1={int(q - 1)}") for m, q in qs.items()},
                                     guide_label="q − 1: zero bound of the BagNet",
                                     log2_x=summary.log2_x)
    sec.blocks.append(builder.figure(name, files, caption))
    low, high = int(means["rows"].min()), int(means["rows"].max())
    count = f"{low}" if low == high else f"{low}–{high}"
    for value, label in panels:
        text = spread_text(means, [value])
        caption = (f"{label[:1].upper()}{label[1:]} by {summary.x_label}, mean of {count} rows per cell; "
                   f"{seeds_note(means['seeds'])}")
        sec.blocks.append(Table(caption, wide(text, [k for k in (style, "model", "q") if k], summary.x, value, order)))
    return sec
