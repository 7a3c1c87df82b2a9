"""Find the results under one or more roots (local or ``s3://``) by the layout their writers use.

* experiment runs (:mod:`store.results`): ``<run>/<table>/<k1>=<v1>/.../part-*.parquet`` with a
  part marker (``_SUCCESS``) beside each finished part's files and the run manifest
  ``<run>/_SUCCESS`` (JSON), written last. The partition values become string columns.
* sweeps: ``<sweep>/tune_trials.parquet`` (:data:`store.schemas.TUNE_FILE`), written once,
  atomically, when the sweep ends, so its folder counts as a complete run.
* training runs: a folder holding ``metrics.parquet`` and ``config.yaml``, complete once
  ``model.pt`` is beside them. ``metrics.parquet`` without ``config.yaml`` (a sweep's trial runs)
  is counted, not used.

A run is complete when its manifest exists. Only the committed parts of a table are read (the
files a part marker lists, each of the size it records), and a table is read from exactly one
run, so two runs are never mixed. A part whose marker is unreadable or whose files are missing or
resized is *damaged*: it is not read and ``Run.damaged`` names it. A training folder that cannot
be read is listed in ``Catalog.unreadable`` with the reason, and the others are used.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.acero as acero
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from store import storage
from store.results import (CONFIG_FILE, MARKER, METRICS_FILE, MODEL_FILE, MarkerError, marker_problem, read_marker,
                           read_marker_file)
from store.schemas import TUNE_FILE, TUNE_TABLE


@dataclass
class Run:
    """One run folder: the tables it holds and whether it finished."""

    path: str  # full path (local or s3://) of the run folder
    name: str  # the folder's name (normally the run_id)
    complete: bool
    manifest: dict[str, Any] | None
    config: dict[str, Any] | None  # the job config: the manifest's, else the run's config.yaml
    finished: float  # ordering key: the manifest's mtime, else the newest Parquet file's
    tables: dict[str, list[str]] = field(default_factory=dict)  # table -> Parquet files
    uncommitted: set[str] = field(default_factory=set)  # files no part marker lists (or of damaged parts)
    damaged: dict[str, str] = field(default_factory=dict)  # part folder -> what is wrong with it

    def matches(self, run_id: str) -> bool:
        """True when ``run_id`` is the folder's name or the manifest's ``run_id``."""
        return run_id in (self.name, (self.manifest or {}).get("run_id"))

    def committed(self, table: str) -> list[str]:
        return sorted(f for f in self.tables.get(table, []) if f not in self.uncommitted)


@dataclass
class TrainRun:
    """One training run folder: its ``config.yaml`` and ``metrics.parquet`` (one row per epoch)."""

    path: str
    name: str
    complete: bool
    config: dict[str, Any]
    metrics: pd.DataFrame


@dataclass
class Catalog:
    """Everything found under one or more roots."""

    roots: list[str]
    runs: list[Run] = field(default_factory=list)
    train_runs: list[TrainRun] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)  # Parquet files in no known layout
    stray_metrics: list[str] = field(default_factory=list)  # metrics.parquet without config.yaml
    unreadable: dict[str, str] = field(default_factory=dict)  # training run folder -> why it was not read

    @property
    def empty(self) -> bool:
        """True when nothing was found: no result run, no training run."""
        return not self.runs and not self.train_runs

    def holds(self, table: str) -> bool:
        """True when some run, complete or not, has files of ``table``."""
        return any(table in r.tables for r in self.runs)

    def candidates(self, table: str, run_ids: list[str] | None = None, include_incomplete: bool = False) -> list[Run]:
        """Runs with committed files of ``table`` that may be used, newest first."""
        runs = [r for r in self.runs if r.committed(table) and (r.complete or include_incomplete)]
        if run_ids:
            runs = [r for r in runs if any(r.matches(i) for i in run_ids)]
        return sorted(runs, key=lambda r: (r.finished, r.name), reverse=True)

    def select(self, table: str, run_ids: list[str] | None = None, include_incomplete: bool = False) -> Run | None:
        """The one run a table is read from: the newest usable run holding it."""
        runs = self.candidates(table, run_ids, include_incomplete)
        return runs[0] if runs else None


def read_manifest(path: str) -> dict[str, Any]:
    """The run manifest in the marker file at ``path``; :class:`MarkerError` (a ValueError)
    naming the file when it is not a JSON object."""
    return read_marker_file(path)


def table_location(folder: str) -> tuple[str, str] | None:
    """``(run_dir, table)`` of a part folder ``<run_dir>/<table>/<k>=<v>/...``, else None."""
    table_dir = folder
    while "=" in posixpath.basename(table_dir):
        table_dir = posixpath.dirname(table_dir)
    if table_dir == folder or not posixpath.basename(table_dir):
        return None
    return posixpath.dirname(table_dir), posixpath.basename(table_dir)


@dataclass
class _Tree:
    """The files under one root, by folder (paths inside the root's filesystem)."""

    root: str
    inner_root: str
    folders: dict[str, dict[str, pafs.FileInfo]]

    @classmethod
    def walk(cls, root: str) -> _Tree:
        fs, inner = storage.pyarrow_fs(root)
        kind = fs.get_file_info(inner).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"results path not found: {root}")
        if kind != pafs.FileType.Directory:
            raise FileNotFoundError(f"results path is not a folder: {root}")
        folders: dict[str, dict[str, pafs.FileInfo]] = {}
        for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
            if info.type == pafs.FileType.File:
                folders.setdefault(posixpath.dirname(info.path), {})[info.base_name] = info
        return cls(root, inner, folders)

    def full(self, inner: str) -> str:
        """``inner`` in the user's spelling of the root (``s3://`` kept)."""
        rel = posixpath.relpath(inner, self.inner_root)
        return self.root if rel == "." else storage.join(self.root, rel)

    def run(self, run_dir: str) -> Run:
        """The run folder ``run_dir``: complete with its manifest; its job config from the
        manifest, else from its ``config.yaml`` (written when the run starts)."""
        names = self.folders.get(run_dir, {})
        manifest = read_manifest(self.full(names[MARKER].path)) if MARKER in names else None
        config = manifest["config"] if manifest else None
        if manifest is None and CONFIG_FILE in names:
            config = read_yaml(self.full(names[CONFIG_FILE].path))
        return Run(path=self.full(run_dir), name=posixpath.basename(run_dir), complete=manifest is not None,
                   manifest=manifest, config=config, finished=names[MARKER].mtime.timestamp() if manifest else 0.0)


def discover(roots: str | list[str]) -> Catalog:
    """Walk ``roots`` for result runs, sweeps and training runs."""
    roots = [roots] if isinstance(roots, str) else list(roots)
    catalog = Catalog(roots=list(dict.fromkeys(storage.resolve(r) for r in roots)))
    runs: dict[str, Run] = {}
    for root in catalog.roots:
        if any(root.startswith(other.rstrip("/") + "/") for other in catalog.roots):
            continue  # walked with the root it is under
        tree = _Tree.walk(root)
        for folder, names in sorted(tree.folders.items()):
            if METRICS_FILE in names:
                if CONFIG_FILE in names:
                    try:
                        catalog.train_runs.append(read_train_run(tree.full(folder), complete=MODEL_FILE in names))
                    except (ValueError, OSError, KeyError) as err:  # ArrowInvalid is a ValueError
                        catalog.unreadable[tree.full(folder)] = f"{type(err).__name__}: {err}"
                else:
                    catalog.stray_metrics.append(tree.full(folder))
                continue
            part_of = table_location(folder) if MARKER in names else None
            listed = committed_files(tree.full(folder), names) if part_of else None
            if isinstance(listed, str):  # damaged: named even when none of its files is left
                run = runs.setdefault(tree.full(part_of[0]), tree.run(part_of[0]))
                run.damaged[tree.full(folder)] = listed
                run.tables.setdefault(part_of[1], [])
            for name, info in sorted(names.items()):
                if not name.endswith(".parquet") or name.startswith((".", "_")):
                    continue
                located = (folder, TUNE_TABLE) if name == TUNE_FILE else table_location(folder)
                path = tree.full(info.path)
                if located is None:
                    catalog.unrecognised.append(path)
                    continue
                run_dir, table = located
                if tree.full(run_dir) not in runs:
                    runs[tree.full(run_dir)] = tree.run(run_dir)
                run = runs[tree.full(run_dir)]
                run.tables.setdefault(table, []).append(path)
                if table == TUNE_TABLE:
                    run.complete = True  # written once, atomically, when the sweep ends
                elif listed is None or isinstance(listed, str) or name not in listed:
                    run.uncommitted.add(path)
                if run.manifest is None:
                    run.finished = max(run.finished, info.mtime.timestamp())
    catalog.runs = list(runs.values())
    return catalog


def committed_files(folder: str, names: dict[str, pafs.FileInfo]) -> set[str] | str:
    """The file names the part marker in ``folder`` lists, when each is there with the size it
    records; else what is wrong (naming the file)."""
    try:
        marker = read_marker(folder)
    except MarkerError as err:
        return str(err)
    problem = marker_problem(marker, {name: info.size for name, info in names.items()})
    return problem if problem else set(marker["files"])


def partition_values(path: str) -> dict[str, str]:
    """``{key: value}`` of the ``key=value`` folders a part file sits in."""
    values: dict[str, str] = {}
    folder = posixpath.dirname(path)
    while "=" in (name := posixpath.basename(folder)):
        key, _, value = name.partition("=")
        values[key] = value
        folder = posixpath.dirname(folder)
    return dict(reversed(values.items()))


def table_dataset(run: Run, table: str) -> tuple[pads.Dataset, pa.Schema] | None:
    """The committed files of ``table`` in ``run`` as a lazy Arrow dataset, partition values as
    string columns, and its schema (the metadata the first file's); None when there are none."""
    files = run.committed(table)
    if not files:
        return None
    fs, _ = storage.pyarrow_fs(files[0])
    inner = [storage.pyarrow_fs(f)[1] for f in files]
    keys = list(partition_values(files[0]))
    schema = pq.read_schema(inner[0], filesystem=fs)
    if not keys:
        return pads.dataset(inner, schema=schema, filesystem=fs), schema
    schema = pa.schema([*(f for f in schema if f.name not in keys), *(pa.field(k, pa.string()) for k in keys)],
                       metadata=schema.metadata)
    base = inner[0]
    for _ in keys:
        base = posixpath.dirname(base)
    partitioning = pads.partitioning(pa.schema([(k, pa.string()) for k in keys]), flavor="hive")
    return pads.dataset(inner, schema=schema, filesystem=fs, partitioning=partitioning,
                        partition_base_dir=posixpath.dirname(base)), schema


def read_table(run: Run, table: str, columns: list[str] | None = None,
               where: pads.Expression | None = None) -> pa.Table | None:
    """The committed files of ``table`` in ``run`` as one Arrow table (None when there are none),
    partition values as string columns; only ``columns`` (all by default) and the rows matching
    ``where`` are read (pushed into the Parquet scan, so nothing else is held in memory). The
    schema's metadata is the first file's."""
    found = table_dataset(run, table)
    if found is None:
        return None
    dataset, schema = found
    try:
        return dataset.to_table(columns=columns, filter=where).replace_schema_metadata(schema.metadata)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"run {run.path}: table {table} cannot be read ({err})") from None


Aggregate = tuple[str, "str | pc.Expression | None"]  # (Arrow aggregate function, its input: column or expression)


def aggregate_table(run: Run, table: str, keys: list[str], aggregates: dict[str, Aggregate],
                    where: pads.Expression | None = None) -> pa.Table | None:
    """The committed rows of ``table`` in ``run`` grouped by ``keys``: one row per group with the
    ``keys`` and, per ``aggregates`` entry ``name: (function, input)``, Arrow's grouped ``function``
    (``sum``, ``count``, ``count_all`` (input None), ``mean``, ``min``, ``max``, ``distinct``, ...) of
    ``input`` (a column name or an expression over columns, e.g. ``pc.abs(pc.field("x"))``).

    One streaming scan (pyarrow.acero: scan, filter ``where``, project, aggregate): only the
    columns the keys and inputs name are read, and only the groups are held, never the rows.
    Groups come in no particular order; None when the table has no committed file."""
    found = table_dataset(run, table)
    if found is None:
        return None
    dataset, _ = found
    inputs = {f"_in{i}": pc.field(source) if isinstance(source, str) else source
              for i, (_, (_, source)) in enumerate(aggregates.items()) if source is not None}
    projection = {**{k: pc.field(k) for k in keys}, **inputs}
    targets = iter(inputs)
    specs = [([] if source is None else next(targets), f"hash_{function}", None, name)
             for name, (function, source) in aggregates.items()]
    nodes = [acero.Declaration("scan", acero.ScanNodeOptions(dataset, columns=projection, filter=where))]
    if where is not None:  # the scan only uses it to skip row groups
        nodes.append(acero.Declaration("filter", acero.FilterNodeOptions(where)))
    nodes += [acero.Declaration("project", acero.ProjectNodeOptions(list(projection.values()), list(projection))),
              acero.Declaration("aggregate", acero.AggregateNodeOptions(specs, keys=keys))]
    try:
        return acero.Declaration.from_sequence(nodes).to_table()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise ValueError(f"run {run.path}: table {table} cannot be aggregated ({err})") from None


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping in the YAML file at ``path``; ValueError naming the file otherwise."""
    try:
        data = yaml.safe_load(storage.read_bytes(path))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a mapping")
    return data


def read_train_run(path: str, complete: bool) -> TrainRun:
    """The training run folder at ``path``: its ``config.yaml`` and ``metrics.parquet`` (by epoch)."""
    config = read_yaml(storage.join(path, CONFIG_FILE))
    metrics = storage.read_table(storage.join(path, METRICS_FILE)).to_pandas()
    return TrainRun(path=path, name=posixpath.basename(path.rstrip("/")), complete=complete, config=config,
                    metrics=metrics.sort_values("epoch").reset_index(drop=True))


__all__ = ["Run", "TrainRun", "Catalog", "discover", "read_manifest", "read_yaml", "committed_files",
           "table_location", "partition_values", "table_dataset", "read_table", "Aggregate", "aggregate_table",
           "read_train_run"]
