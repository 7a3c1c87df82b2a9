"""Find and read the result tables under a results path (local or ``s3://``).

Layout assumed (tolerant; everything is found by walking the tree for ``*.parquet``):

* experiment runs (``jobs/experiment.py``, ``cluster/results.py``):
  ``<results>/[...]/<run_id>/<table>/[key=value/...]part-*.parquet`` with a ``_SUCCESS`` JSON
  manifest in ``<run_id>/`` (or in ``<run_id>/<table>/``). ``<table>`` is the first path
  component named after a known table (:data:`EXPERIMENT_TABLES`, ``tune_trials``); a file named
  ``<table>.parquet`` also counts (run dir = its folder). Hive ``key=value`` components become
  columns where the file lacks them. Parquet files under a ``_SUCCESS`` folder but in no known
  table become a table named after their first folder below it.
* sweeps (``jobs/tune.py``): ``<storage>/<sweep>/tune_trials.parquet``, one file written
  atomically when the sweep ends, so it counts as complete without a manifest.
* training runs (``jobs/train.py``): a folder holding ``metrics.parquet`` and ``config.yaml``;
  complete once ``model.pt`` (or ``_SUCCESS``) is beside them. ``metrics.parquet`` files without
  ``config.yaml`` (a sweep's trial runs) are counted, not used.

A run is complete when its manifest exists; incomplete runs are skipped unless asked for, and then
only their committed parts are read (files under a part ``_SUCCESS`` marker, when the run uses
part markers). Every table is read from exactly one run (the newest usable one holding it, or the
one chosen by run id), so a run's partial results are never mixed with another run's.
"""

from __future__ import annotations

import io
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from store import storage

EXPERIMENT_TABLES = ("predictions", "shuffle", "interaction", "masking", "heatmaps")
TUNE_TABLE = "tune_trials"
KNOWN_TABLES = (*EXPERIMENT_TABLES, TUNE_TABLE)
MANIFEST = "_SUCCESS"
COMMON_COLUMNS = ("run_id", "experiment", "model", "q", "weights", "dataset", "split", "image_id",
                  "label", "seed", "precision", "created_at", "code_version")


@dataclass
class Run:
    """One run folder: the tables it holds and whether it finished."""

    path: str  # full path (local or s3://) of the run folder
    name: str  # the folder's name (normally the run_id)
    complete: bool
    manifest: dict[str, Any] | None
    finished: float  # ordering key: the manifest's mtime, else the newest parquet file's
    tables: dict[str, list[str]] = field(default_factory=dict)  # table -> parquet files
    table_dirs: dict[str, str] = field(default_factory=dict)  # table -> folder the files sit under
    extra_files: list[str] = field(default_factory=list)  # PNGs etc. found in the run folder
    uncommitted: set[str] = field(default_factory=set)  # files of parts without a part marker

    def matches(self, run_id: str) -> bool:
        ids = {self.name, str((self.manifest or {}).get("run_id", ""))}
        return run_id in ids


@dataclass
class TrainRun:
    """One ``jobs/train.py`` run folder."""

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
    unrecognised: list[str] = field(default_factory=list)
    stray_metrics: list[str] = field(default_factory=list)  # metrics.parquet without config.yaml

    def candidates(self, table: str, run_ids: list[str] | None = None, include_incomplete: bool = False) -> list[Run]:
        """Runs holding ``table`` that may be used, newest first."""
        runs = [r for r in self.runs if table in r.tables]
        if run_ids:
            runs = [r for r in runs if any(r.matches(i) for i in run_ids)]
        if not include_incomplete:
            runs = [r for r in runs if r.complete]
        return sorted(runs, key=lambda r: (r.finished, r.name), reverse=True)

    def select(self, table: str, run_ids: list[str] | None = None, include_incomplete: bool = False) -> Run | None:
        """The one run a table is read from: the newest usable run holding it."""
        runs = self.candidates(table, run_ids, include_incomplete)
        return runs[0] if runs else None


@dataclass
class TableData:
    """A table read from one run."""

    name: str
    run: Run
    df: pd.DataFrame


def _walk(root: str) -> list[pafs.FileInfo]:
    fs, inner = storage.pyarrow_fs(root)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"results path not found: {root}")
    if info.type == pafs.FileType.File:
        return [info]
    return [i for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if i.type == pafs.FileType.File]


def _full(root: str, inner_root: str, inner: str) -> str:
    """Map a path inside the filesystem back to the user's spelling (s3:// kept)."""
    rel = posixpath.relpath(inner, inner_root)
    return storage.join(root, rel) if rel != "." else root


def _is_temp(name: str) -> bool:
    return name.startswith((".", "_")) or ".tmp" in name


def _read_manifest(path: str) -> dict[str, Any] | None:
    try:
        data = storage.read_json(path)
    except (ValueError, UnicodeDecodeError):
        return {}  # an empty or non-JSON marker still marks the run complete
    return data if isinstance(data, dict) else {"manifest": data}


def discover(roots: str | list[str]) -> Catalog:
    """Walk ``roots`` for result tables, manifests and training runs."""
    roots = [roots] if isinstance(roots, str) else list(roots)
    catalog = Catalog(roots=[storage.resolve(r) for r in roots])
    seen_train: set[str] = set()
    for root in catalog.roots:
        _, inner_root = storage.pyarrow_fs(root)
        files = _walk(root)
        if len(files) == 1 and files[0].path == inner_root:  # a single file given
            inner_root = posixpath.dirname(inner_root)
            root = root.rsplit("/", 1)[0]
        by_dir: dict[str, dict[str, pafs.FileInfo]] = {}
        for f in files:
            by_dir.setdefault(posixpath.dirname(f.path), {})[f.base_name] = f
        manifests = {d for d, names in by_dir.items() if MANIFEST in names}
        marked_tables = set()  # table folders with part markers in their key=value folders (cluster/results.py)
        for m in manifests:
            d = m
            while "=" in posixpath.basename(d):
                d = posixpath.dirname(d)
            if d != m:
                marked_tables.add(d)
        runs: dict[str, Run] = {}

        def run_for(run_dir: str) -> Run:
            if run_dir not in runs:
                name = posixpath.basename(run_dir.rstrip("/")) or run_dir
                has = run_dir in manifests
                mf = by_dir[run_dir][MANIFEST] if has else None
                runs[run_dir] = Run(
                    path=_full(root, inner_root, run_dir), name=name, complete=has,
                    manifest=_read_manifest(_full(root, inner_root, mf.path)) if mf else None,
                    finished=mf.mtime.timestamp() if mf and mf.mtime else 0.0)
            return runs[run_dir]

        for d, names in sorted(by_dir.items()):
            if "metrics.parquet" in names:
                full = _full(root, inner_root, d)
                if "config.yaml" not in names:
                    catalog.stray_metrics.append(full)
                elif full not in seen_train:
                    seen_train.add(full)
                    catalog.train_runs.append(read_train_run(full, complete="model.pt" in names or MANIFEST in names))
                continue
            for fname, info in sorted(names.items()):
                if not fname.endswith(".parquet") or _is_temp(fname):
                    continue
                located = _locate(posixpath.relpath(info.path, inner_root), inner_root, manifests)
                if located is None:
                    catalog.unrecognised.append(_full(root, inner_root, info.path))
                    continue
                run_dir, table, table_dir = located
                run = run_for(run_dir)
                full = _full(root, inner_root, info.path)
                run.tables.setdefault(table, []).append(full)
                if table == TUNE_TABLE and fname == f"{TUNE_TABLE}.parquet" and not run.complete:
                    run.complete = True  # written once, atomically, when the sweep ends
                if not _committed(info.path, table_dir, manifests, marked_tables):
                    run.uncommitted.add(full)
                run.table_dirs.setdefault(table, _full(root, inner_root, table_dir))
                if table_dir in manifests and not run.complete:  # manifest per table
                    run.complete = True
                    mf = by_dir[table_dir][MANIFEST]
                    run.manifest = _read_manifest(_full(root, inner_root, mf.path))
                    run.finished = mf.mtime.timestamp() if mf.mtime else 0.0
                if not run.finished and info.mtime:
                    run.finished = max(run.finished, info.mtime.timestamp())
        for run_dir, run in runs.items():
            run.extra_files = sorted(
                _full(root, inner_root, f.path) for f in files
                if f.path.startswith(run_dir.rstrip("/") + "/") and f.base_name.lower().endswith(".png"))
            catalog.runs.append(run)
    return catalog


def _committed(path: str, table_dir: str, manifests: set[str], marked_tables: set[str]) -> bool:
    """False for a file of an unfinished part: its table uses part markers (``marked_tables``),
    but none sits in a folder between the table folder (exclusive) and the file."""
    if table_dir not in marked_tables:
        return True
    prefix = table_dir.rstrip("/") + "/"
    d = posixpath.dirname(path)
    while d.startswith(prefix):
        if d in manifests:
            return True
        d = posixpath.dirname(d)
    return False


def _locate(rel: str, inner_root: str, manifests: set[str]) -> tuple[str, str, str] | None:
    """``(run_dir, table, table_dir)`` (paths inside the filesystem) of a parquet file, or None."""
    parts = rel.split("/")
    join = lambda n: posixpath.normpath(posixpath.join(inner_root, *parts[:n])) if n else inner_root  # noqa: E731
    for i, part in enumerate(parts[:-1]):
        if part in KNOWN_TABLES:
            return join(i), part, join(i + 1)
    stem = parts[-1][: -len(".parquet")]
    if stem in KNOWN_TABLES:
        return join(len(parts) - 1), stem, join(len(parts) - 1)
    for i in range(len(parts) - 2, -1, -1):  # nearest ancestor with a manifest: next folder is the table
        if join(i) in manifests and "=" not in parts[i]:
            return join(i), parts[i], join(i + 1)
    return None


def _hive_values(path: str, base: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    rel = path[len(base):].strip("/") if path.startswith(base) else path
    for part in rel.split("/")[:-1]:
        if "=" in part:
            key, _, raw = part.partition("=")
            values[key] = _parse_scalar(raw)
    return values


def _parse_scalar(raw: str) -> Any:
    from urllib.parse import unquote

    raw = unquote(raw)
    if raw in ("__HIVE_DEFAULT_PARTITION__", "null", ""):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _read_file(path: str, base: str, with_source: bool) -> pa.Table:
    table = storage.read_table(path)
    for i, col in enumerate(table.schema):
        if pa.types.is_dictionary(col.type):
            table = table.set_column(i, col.name, table.column(i).cast(col.type.value_type))
    for key, value in _hive_values(path, base).items():
        if key not in table.column_names:
            table = table.append_column(key, pa.array([value] * table.num_rows))
    if with_source:
        table = table.append_column("_source", pa.array([path] * table.num_rows, pa.string()))
    return table


def read_table(run: Run, table: str, *, with_source: bool = False) -> pd.DataFrame:
    """All parquet files of ``table`` in ``run`` as one DataFrame."""
    files = sorted(f for f in run.tables.get(table, []) if f not in run.uncommitted)
    if not files:
        return pd.DataFrame()
    base = run.table_dirs[table]
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        parts = list(pool.map(lambda f: _read_file(f, base, with_source), files))
    parts = [p for p in parts if p.num_rows or len(parts) == 1]
    return pa.concat_tables(parts, promote_options="permissive").to_pandas()


def load(catalog: Catalog, table: str, run_ids: list[str] | None = None,
         include_incomplete: bool = False, *, with_source: bool = False) -> TableData | None:
    """``table`` from the one run :meth:`Catalog.select` picks, or None when no run holds it."""
    run = catalog.select(table, run_ids, include_incomplete)
    if run is None:
        return None
    return TableData(table, run, read_table(run, table, with_source=with_source))


def read_train_run(path: str, complete: bool) -> TrainRun:
    """A ``jobs/train.py`` run folder: ``config.yaml`` and ``metrics.parquet``."""
    import yaml

    config_path = storage.join(path, "config.yaml")
    try:
        config = yaml.safe_load(storage.read_bytes(config_path)) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{config_path}: not valid YAML: {err}") from err
    metrics = storage.read_table(storage.join(path, "metrics.parquet")).to_pandas()
    if "epoch" in metrics:
        metrics = metrics.sort_values("epoch").reset_index(drop=True)
    return TrainRun(path=path, name=path.rstrip("/").rsplit("/", 1)[-1], complete=complete,
                    config=config if isinstance(config, dict) else {}, metrics=metrics)


def load_array(path: str):
    """A heatmap stored beside its table as ``.npy`` or ``.png`` (first channel)."""
    import numpy as np

    data = storage.read_bytes(path)
    if path.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    import matplotlib.image as mpimg

    img = mpimg.imread(io.BytesIO(data), format="png")
    return img[..., 0] if img.ndim == 3 else img
