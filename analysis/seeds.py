"""Numbers over training seeds: each seed's mean first, then the mean over seeds and their spread
(sample standard deviation; none with one seed), and the ``mean ± spread`` text of a table cell.

A *replicate* is one training seed of a model: a training run, or the rows an experiment run
computed on that run's weights (the ``replicate`` column :meth:`analysis.builder.Builder.replicates`
adds)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.html import fmt

REPLICATE = "replicate"


def over_seeds(df: pd.DataFrame, keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """One row per ``keys`` combination: each value's mean over replicates (of each replicate's
    mean over its rows), ``<value>_sd`` its standard deviation over replicates (NaN with one),
    ``seeds`` the number of replicates and ``rows`` the rows per replicate (the smallest)."""
    keys = list(keys)
    per = with_replicate(df).groupby([*keys, REPLICATE], dropna=False, sort=True)
    means = per[list(values)].mean()
    means["rows"] = per.size()
    return across_replicates(means, keys, values)


def over_seeds_of_sums(sums: pd.DataFrame, keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """:func:`over_seeds` from partial sums instead of rows: ``sums`` has per group (finer than or
    equal to ``keys`` and the replicate) each value's ``<value>_sum`` and ``<value>_count`` (its
    non-missing rows) and ``rows`` (all rows), as a grouped scan returns them
    (:meth:`analysis.builder.Builder.replicate_sums`)."""
    keys = list(keys)
    per = with_replicate(sums).groupby([*keys, REPLICATE], dropna=False, sort=True)
    totals = per[[*(f"{v}_{part}" for v in values for part in ("sum", "count")), "rows"]].sum()
    # 0 / 0 (no value in a group): NaN, as pandas' mean of none
    means = pd.DataFrame({v: totals[f"{v}_sum"] / totals[f"{v}_count"] for v in values})
    means["rows"] = totals["rows"]
    return across_replicates(means, keys, values)


def with_replicate(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its ``replicate`` column as text (one replicate, ``"only"``, without one)."""
    rep = df[REPLICATE] if REPLICATE in df else pd.Series("only", index=df.index)
    return df.assign(**{REPLICATE: rep.astype(str)})


def across_replicates(means: pd.DataFrame, keys: list[str], values: Sequence[str]) -> pd.DataFrame:
    """The second step of :func:`over_seeds`: ``means`` (indexed by ``keys`` and the replicate, each
    value's mean and ``rows``) to one row per ``keys`` combination."""
    grouped = means.groupby(level=keys, dropna=False, sort=True)
    out = grouped[list(values)].mean()
    for v in values:
        out[f"{v}_sd"] = grouped[v].std(ddof=1)
    out["seeds"] = grouped.size()
    out["rows"] = grouped["rows"].min()
    return out.reset_index()


def with_spread(mean: float, sd: float | None) -> str:
    """``"0.812 ± 0.014"``, or the value alone without a spread (one seed)."""
    if sd is None or pd.isna(sd) or pd.isna(mean):
        return fmt(float(mean)) if not pd.isna(mean) else "–"
    return f"{fmt(float(mean))} ± {fmt(float(sd))}"


def spread_text(df: pd.DataFrame, values: Sequence[str]) -> pd.DataFrame:
    """``df`` with each of ``values`` as ``mean ± spread`` text (its ``_sd`` column dropped)."""
    out = df.copy()
    for v in values:
        sd = out.pop(f"{v}_sd") if f"{v}_sd" in out else pd.Series(np.nan, index=out.index)
        out[v] = [with_spread(m, s) for m, s in zip(out[v], sd)]
    return out


def seeds_note(counts: pd.Series | Sequence[int]) -> str:
    """How many seeds the numbers average, for a caption."""
    counts = sorted({int(c) for c in counts})
    if counts == [1]:
        return "one training seed (no spread)"
    shown = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"mean ± standard deviation over {shown} training seeds"
