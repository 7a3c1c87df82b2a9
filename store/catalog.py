"""Find the results under one or more roots (local or ``s3://``) by the layout their writers use.

* experiment runs (:mod:`store.results`): ``<run>/<table>/<k1>=<v1>/.../part-*.parquet`` with a
  part marker (``_SUCCESS``) beside each finished part's files and the run manifest
  ``<run>/_SUCCESS`` (JSON), written last. The partition values become string columns.
* sweeps: ``<sweep>/tune_trials.parquet`` (:data:`store.schemas.TUNE_FILE`), written once,
  atomically, when the sweep ends, so its folder counts as a complete run.
* training runs: a folder holding ``metrics.parquet`` and ``config.yaml``, complete once
  ``model.pt`` is beside them. ``metrics.parquet`` without ``config.yaml`` (a sweep's trial runs)
  is counted, not used.

A run is complete when its manifest exists. Only the committed parts of a table are read (files
beside a part marker), and a table is read from exactly one run, so two runs are never mixed.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import yaml

from store import storage
from store.results import CONFIG_FILE, MARKER, METRICS_FILE, MODEL_FILE
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
    uncommitted: set[str] = field(default_factory=set)  # files of parts without a part marker

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
    """The JSON object in the marker file at ``path``; ValueError naming the file otherwise."""
    try:
        data = storage.read_json(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON manifest ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


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
                    catalog.train_runs.append(read_train_run(tree.full(folder), complete=MODEL_FILE in names))
                else:
                    catalog.stray_metrics.append(tree.full(folder))
                continue
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
                elif MARKER not in names:
                    run.uncommitted.add(path)
                if run.manifest is None:
                    run.finished = max(run.finished, info.mtime.timestamp())
    catalog.runs = list(runs.values())
    return catalog


def partition_values(path: str) -> dict[str, str]:
    """``{key: value}`` of the ``key=value`` folders a part file sits in."""
    values: dict[str, str] = {}
    folder = posixpath.dirname(path)
    while "=" in (name := posixpath.basename(folder)):
        key, _, value = name.partition("=")
        values[key] = value
        folder = posixpath.dirname(folder)
    return dict(reversed(values.items()))


def _read_part(path: str) -> pa.Table:
    table = storage.read_table(path)
    for key, value in partition_values(path).items():
        table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
    return table


def read_table(run: Run, table: str) -> pa.Table | None:
    """The committed files of ``table`` in ``run`` as one Arrow table (None when there are none);
    the schema's metadata is the first file's."""
    files = run.committed(table)
    if not files:
        return None
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        parts = list(pool.map(_read_part, files))
    return pa.concat_tables(parts)


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


__all__ = ["Run", "TrainRun", "Catalog", "discover", "read_manifest", "read_yaml",
           "table_location", "partition_values", "read_table", "read_train_run"]
