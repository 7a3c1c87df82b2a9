"""What every report section shares: the :class:`Builder` (reads each table from one run, writes
figures, remembers the runs it used) and the helpers that shape a table for display."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from analysis.html import Figure, Section
from bagnet.synthetic import SyntheticWorld
from store import catalog as store_catalog
from store import storage
from store.results import FAILURES_TABLE
from store.catalog import Catalog, Run, TrainRun


def log(msg: str) -> None:
    print(f"[report] {msg}", flush=True)


@dataclass
class TableData:
    """A table read from one run: its rows (None when only aggregates of it are read), its Arrow
    schema (with the file's metadata) and the rows read per experiment and model (:func:`read_counts`)."""

    name: str
    run: Run
    df: pd.DataFrame | None
    schema: pa.Schema
    counts: pd.DataFrame

    @property
    def experiments(self) -> list[str]:
        return sorted(self.counts["experiment"].unique()) if "experiment" in self.counts else []


COUNT_KEYS = ("experiment", "model")  # the rows read are counted per these (the columns a table has of them)


def read_counts(run: Run, table: str, schema: pa.Schema) -> pd.DataFrame:
    """Per experiment and model of ``table`` in ``run`` (the columns it has of these): ``rows``,
    ``created_min`` / ``created_max`` and the distinct ``run_ids`` and ``code_versions`` (sorted
    lists; the latter only when the table has that column), aggregated in the Parquet scan."""
    names = schema.names
    aggregates = {"rows": ("count_all", None), "created_min": ("min", "created_at"),
                  "created_max": ("max", "created_at"), "run_ids": ("distinct", "run_id")}
    if "code_version" in names:
        aggregates["code_versions"] = ("distinct", "code_version")
    keys = [k for k in COUNT_KEYS if k in names]
    counts = store_catalog.aggregate_table(run, table, keys, aggregates).to_pandas()
    for column in ("run_ids", "code_versions"):
        if column in counts:
            counts[column] = [sorted(v, key=str) for v in counts[column]]
    return counts.sort_values(keys, na_position="last").reset_index(drop=True)


class Builder:
    """Reads tables (one run each), writes figures, remembers which runs it used."""

    def __init__(self, catalog: Catalog, out: str, run_ids: list[str] | None, include_incomplete: bool,
                 seed_runs: Sequence[str] = ()):
        self.catalog, self.out, self.run_ids, self.include_incomplete = catalog, out, run_ids, include_incomplete
        self.seed_runs = list(seed_runs)
        self.used: dict[str, TableData] = {}
        self._cache: dict[str, TableData | None] = {}

    def load(self, table: str, columns: list[str] | None = None, rows: bool = True) -> TableData | None:
        """``table`` from the one run :meth:`store.catalog.Catalog.select` picks (cached), or None;
        only ``columns`` (all by default; the first call decides) are read, and without ``rows``
        none of its rows (a section that aggregates it in the scan, :meth:`replicate_sums`)."""
        if table not in self._cache:
            run = self.catalog.select(table, self.run_ids, self.include_incomplete)
            data = None
            if run is not None:
                data = self.read(run, table, columns, rows)
                log(f"{table}: {data.counts['rows'].sum()} rows from run {run.name}"
                    + ("" if run.complete else " (INCOMPLETE)") + ("" if rows else " (aggregated in the scan)"))
                for folder, problem in self.damaged(run, table).items():
                    log(f"{table}: damaged part {shown_path(folder)} not read: {problem}")
                self.used[table] = data
            self._cache[table] = data
        return self._cache[table]

    @staticmethod
    def read(run: Run, table: str, columns: list[str] | None = None, rows: bool = True) -> TableData:
        """``table`` of ``run``: its rows (only ``columns``; none without ``rows``), schema and counts."""
        if rows:
            arrow = store_catalog.read_table(run, table, columns)
            df, schema = arrow.to_pandas(), arrow.schema
        else:
            df, schema = None, store_catalog.table_dataset(run, table)[1]
        return TableData(table, run, df, schema, read_counts(run, table, schema))

    def rows(self, table: str, where: pads.Expression, columns: list[str] | None = None) -> pd.DataFrame:
        """The rows of ``table`` (from the run :meth:`load` used) that match ``where``: a few rows
        with columns :meth:`load` left out, e.g. the heatmaps the gallery draws."""
        data = self.load(table)
        arrow = store_catalog.read_table(data.run, table, columns, where)
        return arrow.to_pandas() if arrow is not None else pd.DataFrame()

    @staticmethod
    def damaged(run: Run, table: str) -> dict[str, str]:
        """The damaged parts of ``table`` in ``run`` (folder -> problem): not read, and named."""
        return {f: p for f, p in run.damaged.items() if store_catalog.table_location(f)[1] == table}

    def failures(self, run: Run, experiments: list[str]) -> pd.DataFrame:
        """The images of ``experiments`` in ``run`` that could not be used (the failures table)."""
        if not run.committed(FAILURES_TABLE):
            return pd.DataFrame()
        arrow = store_catalog.read_table(run, FAILURES_TABLE, ["experiment", "model", "path", "error"],
                                         pads.field("experiment").isin(experiments))
        return arrow.to_pandas()

    def replicate_runs(self, table: str, rows: bool = True) -> list[TableData]:
        """``table`` from the run :meth:`load` picks and, with ``seed_runs``, from each of those that
        holds it too (with its rows or, without ``rows``, none), each remembered as used."""
        data = self.load(table, rows=rows)
        if data is None:
            return []
        found = [data]
        for run_id in self.seed_runs:
            run = self.catalog.select(table, [run_id], self.include_incomplete)
            if run is None or run.path == data.run.path:
                continue
            self.used[f"{table} [{run.name}]"] = self.read(run, table, rows=rows)
            found.append(self.used[f"{table} [{run.name}]"])
        return found

    def replicate_sums(self, table: str, keys: list[str], values: dict[str, pc.Expression]) -> pd.DataFrame | None:
        """Per replicate (:meth:`replicate_runs`) and group of ``keys`` with ``model``, ``weights`` and
        ``q``: each of ``values`` (name: expression over columns, as float) as ``<name>_sum`` and
        ``<name>_count`` (non-missing rows), and ``rows``; aggregated in the Parquet scan
        (:func:`store.catalog.aggregate_table`), so no row of the table is held. Models prepared
        as :func:`prepare` does; the ``replicate`` column names the run. None without the table."""
        aggregates = {"rows": ("count_all", None)}
        for name, expression in values.items():
            aggregates.update({f"{name}_sum": ("sum", expression), f"{name}_count": ("count", expression)})
        group = list(dict.fromkeys([*keys, "model", "weights", "q"]))
        frames = [prepare(store_catalog.aggregate_table(data.run, table, group, aggregates).to_pandas())
                  .assign(replicate=data.run.name) for data in self.replicate_runs(table, rows=False)]
        return pd.concat(frames, ignore_index=True) if frames else None

    def replicates(self, table: str) -> pd.DataFrame | None:
        """``table``'s prepared rows with a ``replicate`` column naming the run they came from: the
        run :meth:`load` picks, and with ``seed_runs`` (experiment runs of the same config on other
        training seeds' weights) each of those that holds the table too."""
        runs = self.replicate_runs(table)
        if not runs:
            return None
        return pd.concat([prepare(data.df).assign(replicate=data.run.name) for data in runs], ignore_index=True)

    def train_runs(self) -> list[TrainRun]:
        """The training runs to use: the complete ones (all, with --include-incomplete)."""
        return [r for r in self.catalog.train_runs if r.complete or self.include_incomplete]

    def table_section(self, title: str, anchor: str, table: str,
                      columns: list[str] | None = None) -> tuple[Section, pd.DataFrame | None]:
        """A section built on one table (only ``columns``, all by default): it and the table's
        prepared rows, or None (marked missing); damaged parts and failed images are named."""
        sec, data = self.section_of(title, anchor, table, columns)
        return sec, prepare(data.df) if data is not None else None

    def section_of(self, title: str, anchor: str, table: str, columns: list[str] | None = None,
                   rows: bool = True) -> tuple[Section, TableData | None]:
        """A section built on one table, and the table as :meth:`load` reads it (None: marked
        missing); damaged parts and failed images are named."""
        sec = Section(title, anchor)
        data = self.load(table, columns, rows)
        if data is None:
            sec.missing.append(self.missing(table))
            return sec, None
        sec.source = self.source(table)
        for folder, problem in self.damaged(data.run, table).items():
            sec.missing.append(f"damaged part {shown_path(folder)} (not read: {problem}); rerun the job to redo it")
        if data.experiments:
            failed = self.failures(data.run, data.experiments)
            if len(failed):
                shown = ", ".join(sorted(set(failed["path"]))[:5])
                sec.blocks.append(f"{failed['path'].nunique()} image(s) could not be decoded and are not in these "
                                  f"results (table `{FAILURES_TABLE}` of run {data.run.name}): {shown}"
                                  + (" ..." if failed["path"].nunique() > 5 else ""))
        return sec, data

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

    def figure(self, name: str, files: dict[str, bytes], caption: str) -> Figure:
        """Write ``figures/<name>.<ext>`` for each of ``files`` (``png``, and ``svg`` beside it,
        as :func:`bagnet.plots.figure_files` renders them); the report shows the PNG."""
        for ext, data in files.items():
            storage.write_bytes_atomic(storage.join(self.out, "figures", f"{name}.{ext}"), data)
        return Figure(caption, f"figures/{name}.png")


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Rows ready for display: ``q`` as float (NaN for the unconstrained CNNs); one model name
    under several weights told apart as ``model [weights file]``."""
    df = df.copy()
    df["q"] = df["q"].astype(float)
    multi = df.groupby("model")["weights"].nunique()
    multi = set(multi[multi > 1].index)
    if multi:
        short = df["weights"].astype(str).str.rsplit("/", n=1).str[-1]
        df["model"] = np.where(df["model"].isin(multi), df["model"] + " [" + short + "]", df["model"])
    return df


def model_order(df: pd.DataFrame) -> list[str]:
    """BagNets by patch size, then the other models by name."""
    pairs = df[["model", "q"]].drop_duplicates("model")
    return [r.model for r in sorted(pairs.itertuples(index=False),
                                    key=lambda r: (np.isnan(r.q), 0 if np.isnan(r.q) else r.q, r.model))]


def column_name(value: Any) -> str:
    """A table header for ``value``: integral numbers as integers."""
    if isinstance(value, (int, float, np.integer, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def wide(agg: pd.DataFrame, index: list[str], column: str, value: str, order: list[str]) -> pd.DataFrame:
    """``value`` with one row per ``index`` combination (models in ``order``) and one column per
    value of ``column``."""
    if "q" in index:  # NaN keys would drop the CNNs
        agg = agg.assign(q=agg["q"].map(q_text).astype(str))
    table = agg.pivot_table(index=index, columns=column, values=value, aggfunc="first", sort=True)
    table.columns = [column_name(c) for c in table.columns]
    return in_model_order(table.reset_index(), order, [k for k in index if k not in ("model", "q")])


def in_model_order(df: pd.DataFrame, order: list[str], before: Sequence[str] = (),
                   after: Sequence[str] = ()) -> pd.DataFrame:
    """``df`` sorted by the columns ``before``, then its models in ``order``, then ``after``."""
    rank = df["model"].map({m: i for i, m in enumerate(order)})
    return df.assign(_o=rank).sort_values([*before, "_o", *after]).drop(columns="_o").reset_index(drop=True)


def shown_path(path: str) -> str:
    """``path`` as the report prints it: relative to the working directory when it lies below it
    (so a committed report names no folder of the machine it was made on), else as it is."""
    if storage.is_remote(path):
        return path
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix() or "."
    except ValueError:
        return path


def q_text(q: float | None) -> str | int:
    return "–" if q is None or np.isnan(q) else int(q)


def as_time(values: pd.Series) -> pd.Series:
    """Timestamps (UTC) from datetimes or epoch seconds."""
    if pd.api.types.is_numeric_dtype(values):
        return pd.to_datetime(values, unit="s", utc=True)
    return pd.to_datetime(values, utc=True)


def when(ts: Any) -> str:
    return "–" if ts is None or pd.isna(ts) else pd.Timestamp(ts).strftime("%Y-%m-%d %H:%M")


def synthetic_world(data: dict[str, Any]) -> SyntheticWorld | None:
    """The world of a run's data config (``config["data"]`` of its manifest or ``config.yaml``),
    None when its images are not synthetic."""
    if data["dataset"] != "synthetic":
        return None
    return SyntheticWorld(seed=data["seed"], image_size=data["image_size"])


def run_world(run: Run) -> SyntheticWorld | None:
    """The synthetic world an experiment run's images came from (its job config), or None for
    other data and for a run without a config."""
    return synthetic_world(run.config["data"]) if run.config else None
