"""Result tables on storage (local or ``s3://``): hive-partitioned parts, markers, run manifests.

Layout (``docs/results.md``)::

    <output>/<run_id>/config.yaml                        resolved config of the latest invocation
    <output>/<run_id>/_SUCCESS                           run manifest (JSON), written last
    <output>/<run_id>/<table>/<k1>=<v1>/<k2>=<v2>/part-00000.parquet
    <output>/<run_id>/<table>/<k1>=<v1>/<k2>=<v2>/_SUCCESS   part marker (JSON), written after its files

A *part* (e.g. one experiment x model) is the unit of work. Each Parquet file is written
atomically (:func:`store.storage.write_bytes_atomic`: temp file + rename locally, one PUT on
S3); the part's marker is written after its last file, so a part without a marker is unfinished
and is discarded before it is redone. Partition keys live only in the directory names, not in
the files, so ``pandas.read_parquet(table_dir)`` and ``pyarrow.dataset.dataset(table_dir,
partitioning="hive")`` read the whole table with those columns and no type clash. Names starting
with ``_`` or ``.`` are skipped by pyarrow/pandas/DuckDB readers.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import posixpath
import subprocess
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from store import storage

MARKER = "_SUCCESS"
CONFIG_FILE = "config.yaml"  # a run's resolved config (experiment and training runs)
METRICS_FILE = "metrics.parquet"  # a training run's per-epoch metrics, its commit record
MODEL_FILE = "model.pt"  # a training run's exported model, with its spec

# The columns every experiment row carries, in table order. ``experiment`` and
# ``model`` are partition keys: they are in the directory names, not in the files.
COMMON_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("experiment", pa.string()),
    ("model", pa.string()),
    ("q", pa.int64()),
    ("weights", pa.string()),
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("image_id", pa.string()),
    ("label", pa.int64()),
    ("seed", pa.int64()),
    ("precision", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("code_version", pa.string()),
])
PARTITION_KEYS = ("experiment", "model")


@functools.lru_cache(maxsize=None)
def code_version(repo: str | None = None) -> str:
    """``git describe --always --dirty --tags`` of the checkout, else the installed package
    version (``bagnet-toolkit==X``), else ``"unknown"``."""
    repo = repo or str(Path(__file__).resolve().parents[1])
    try:
        out = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty", "--tags"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"bagnet-toolkit=={version('bagnet-toolkit')}"
    except PackageNotFoundError:
        return "unknown"


def part_dir(run_dir: str, table: str, partitions: Mapping[str, str]) -> str:
    """``<run_dir>/<table>/k1=v1/k2=v2``; values must be non-empty and free of ``/`` and ``=``."""
    parts = []
    for key, value in partitions.items():
        value = str(value)
        if not value or any(c in value for c in "/=\\") or value.startswith(("_", ".")):
            raise ValueError(f"partition value {key}={value!r} cannot be a directory name")
        parts.append(f"{key}={value}")
    return storage.join(run_dir, table, *parts)


class SchemaError(ValueError):
    """Result rows that do not match their table's declared schema; names the column and experiment."""


def table_schema(own: pa.Schema, drop: Iterable[str] = PARTITION_KEYS) -> pa.Schema:
    """The full schema of a result table: the common columns (less ``drop``), then ``own``."""
    drop = set(drop)
    common = [f for f in COMMON_SCHEMA if f.name not in drop]
    clash = [f.name for f in own if f.name in COMMON_SCHEMA.names]
    if clash:
        raise SchemaError(f"own schema redeclares common column(s) {clash}")
    return pa.schema([*common, *own])


def rows_to_table(rows: list[dict[str, Any]], common: Mapping[str, Any], own: pa.Schema, *,
                  experiment: str, drop: Iterable[str] = PARTITION_KEYS) -> pa.Table:
    """Experiment ``experiment``'s result rows as an Arrow table of :func:`table_schema`: each
    common column from the rows, else from ``common``; each ``own`` column from the rows. A
    missing or extra column, or a value of the wrong type, raises :class:`SchemaError` naming
    the column and the experiment."""
    schema = table_schema(own, drop)
    if not rows:
        return schema.empty_table()
    given = set(rows[0])
    for i, row in enumerate(rows):
        if set(row) != given:
            odd = sorted(set(row) ^ given)[0]
            raise SchemaError(f"experiment {experiment!r}: row {i} differs from row 0 in column {odd!r}")
    extra = sorted(given - set(schema.names) - set(drop))
    if extra:
        raise SchemaError(f"experiment {experiment!r}: column {extra[0]!r} is not in its SCHEMA "
                          f"(declared: {', '.join(own.names)})")
    arrays = []
    for f in schema:
        if f.name in given:
            values = [r[f.name] for r in rows]
        elif f.name in common and f.name in COMMON_SCHEMA.names:
            values = [common[f.name]] * len(rows)
        else:
            raise SchemaError(f"experiment {experiment!r}: rows lack column {f.name!r} ({f.type})")
        try:
            arrays.append(pa.array(values, type=f.type, from_pandas=True))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as err:
            sample = next((v for v in values if v is not None), None)
            raise SchemaError(f"experiment {experiment!r}: column {f.name!r} must be {f.type}, "
                              f"got {type(sample).__name__} {sample!r:.60}: {err}") from None
    return pa.Table.from_arrays(arrays, schema=schema)


def table_to_ipc(table: pa.Table) -> bytes:
    """``table`` as an Arrow IPC stream (tables of different schemas travel in one column)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_ipc(payload: bytes) -> pa.Table:
    """The table :func:`table_to_ipc` wrote."""
    return pa.ipc.open_stream(payload).read_all()


class PartWriter:
    """Writes one part as ``part-NNNNN.parquet`` files of about ``max_file_bytes`` each (in
    memory), every file atomically; :meth:`commit` writes the marker last."""

    def __init__(self, part_path: str, max_file_bytes: int = 128 * 2**20) -> None:
        self.path = part_path
        self.max_file_bytes = max_file_bytes
        self.files: list[str] = []
        self.rows = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buffer.append(table)
        self._buffered += table.nbytes
        if self._buffered >= self.max_file_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        name = f"part-{len(self.files):05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes_atomic(storage.join(self.path, name), buf.getvalue())
        self.files.append(name)
        self.rows += table.num_rows
        self._buffer, self._buffered = [], 0

    def commit(self, info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Flush, then write the marker: ``{"rows", "files", "committed_at", **info}``."""
        self.flush()
        marker = {"rows": self.rows, "files": list(self.files), "committed_at": now_iso(), **(info or {})}
        storage.write_json_atomic(storage.join(self.path, MARKER), marker)
        return marker


def first_difference(old: Any, new: Any, key: str = "") -> str | None:
    """The first dotted key (sorted) whose value differs between two nested mappings, as
    ``"key: OLD before, NEW now"``; None when they are equal."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for k in sorted(set(old) | set(new), key=str):
            diff = first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
            if diff:
                return diff
        return None
    return None if old == new else f"{key}: {old!r} before, {new!r} now"


class RerunMismatch(ValueError):
    """A rerun whose settings differ from what its output folder already holds."""


def check_fingerprint(saved: Mapping[str, Any] | None, new: Mapping[str, Any], *, where: str, rename: str) -> None:
    """The one rerun-compatibility rule of train, tune and experiment runs: the fingerprint
    ``saved`` with the results at ``where`` must equal ``new``; else :class:`RerunMismatch`
    naming the first differing key and the setting (``rename``) that starts a new run."""
    if saved is None:
        return
    diff = first_difference(saved, new)
    if diff:
        raise RerunMismatch(f"{where} already holds results computed with other settings ({diff}); "
                            f"set {rename} to start a new run")


def read_marker(path: str) -> dict[str, Any] | None:
    """The marker of the part (or run) at ``path``, or None when it is unfinished."""
    marker = storage.join(path, MARKER)
    return storage.read_json(marker) if storage.exists(marker) else None


def discard(path: str) -> bool:
    """Delete an unfinished part (its files, without a marker); True if anything was there."""
    if not storage.exists(path):
        return False
    storage.delete(path)
    return True


def completed_parts(run_dir: str) -> dict[str, dict[str, Any]]:
    """Markers of every finished part under ``run_dir``, keyed by the part's path relative to
    it (``"<table>/k1=v1/k2=v2"``)."""
    fs, inner = storage.pyarrow_fs(run_dir)
    inner = inner.rstrip("/")
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return {}
    found: dict[str, dict[str, Any]] = {}
    for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
        if info.type != pafs.FileType.File or info.base_name != MARKER:
            continue
        rel = posixpath.dirname(info.path[len(inner):].strip("/"))  # <table>/k1=v1/...
        if "/" not in rel or rel.startswith(("_", ".")):
            continue  # the run manifest itself, or a marker outside <table>/<partitions>
        found[rel] = storage.read_json(storage.join(run_dir, rel, MARKER))
    return dict(sorted(found.items()))


def write_manifest(run_dir: str, manifest: Mapping[str, Any]) -> None:
    """Publish the run: its ``_SUCCESS`` JSON, written atomically after everything else."""
    storage.write_json_atomic(storage.join(run_dir, MARKER), dict(manifest))


def rows_per_table(parts: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Total rows per table from :func:`completed_parts` output."""
    totals: dict[str, int] = {}
    for rel, marker in parts.items():
        table = rel.split("/", 1)[0]
        totals[table] = totals.get(table, 0) + int(marker.get("rows", 0))
    return totals


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


__all__ = [
    "MARKER", "CONFIG_FILE", "COMMON_SCHEMA", "PARTITION_KEYS", "code_version", "part_dir",
    "SchemaError", "table_schema", "rows_to_table", "PartWriter", "read_marker", "discard", "completed_parts", "write_manifest",
    "rows_per_table", "now_iso", "utc_now", "first_difference", "RerunMismatch", "check_fingerprint",
]
