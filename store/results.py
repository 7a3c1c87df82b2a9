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
import hashlib
import io
import posixpath
import subprocess
import uuid
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

# The images an experiment part could not use, one row each, in the part
# ``failures/experiment=<name>/model=<model>`` (the common columns, then these): ``stage`` is
# where it failed (``decode``: the file is not a readable image).
FAILURES_TABLE = "failures"
FAILURES_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string()), ("stage", pa.string())])


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


def encode_parquet(table: pa.Table) -> bytes:
    """``table`` as the bytes of one Parquet file."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def file_check(name: str, data: bytes, rows: int) -> dict[str, Any]:
    """What a marker records of one file: ``name``, ``bytes``, ``rows`` and ``sha256``."""
    return {"name": name, "bytes": len(data), "rows": rows, "sha256": hashlib.sha256(data).hexdigest()}


def write_part_file(part_path: str, table: pa.Table, name: str | None = None) -> dict[str, Any]:
    """Write ``table`` as one Parquet file of the part at ``part_path`` (atomically; by any
    process: a worker writes its own files) and return its :func:`file_check` for the marker.
    ``name`` defaults to a unique ``part-<random>.parquet``, so concurrent writers never clash."""
    name = name or f"part-{uuid.uuid4().hex[:16]}.parquet"
    data = encode_parquet(table)
    storage.write_bytes_atomic(storage.join(part_path, name), data)
    return file_check(name, data, table.num_rows)


def commit_part(part_path: str, files: Iterable[Mapping[str, Any]], info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the marker of the part at ``part_path`` after its ``files`` (:func:`write_part_file`
    results): ``{"rows", "files" (names), "checks" (name -> bytes, rows, sha256), "committed_at",
    **info}``. Only the files it lists belong to the part."""
    files = sorted(files, key=lambda f: f["name"])
    marker = {"rows": sum(int(f["rows"]) for f in files), "files": [f["name"] for f in files],
              "checks": {f["name"]: {k: f[k] for k in ("bytes", "rows", "sha256")} for f in files},
              "committed_at": now_iso(), **(info or {})}
    storage.write_json_atomic(storage.join(part_path, MARKER), marker)
    return marker


class PartWriter:
    """Writes one part as ``part-NNNNN.parquet`` files of about ``max_file_bytes`` each (in
    memory), every file atomically; :meth:`commit` writes the marker last."""

    def __init__(self, part_path: str, max_file_bytes: int = 128 * 2**20) -> None:
        self.path = part_path
        self.max_file_bytes = max_file_bytes
        self.written: list[dict[str, Any]] = []
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    @property
    def files(self) -> list[str]:
        return [f["name"] for f in self.written]

    @property
    def rows(self) -> int:
        return sum(f["rows"] for f in self.written)

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
        self.written.append(write_part_file(self.path, table, f"part-{len(self.written):05d}.parquet"))
        self._buffer, self._buffered = [], 0

    def commit(self, info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Flush, then write the marker (:func:`commit_part`)."""
        self.flush()
        return commit_part(self.path, self.written, info)


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


class MarkerError(ValueError):
    """A marker file that is not a JSON object; the message names the file."""


def read_marker(path: str) -> dict[str, Any] | None:
    """The marker of the part (or run) at ``path``, or None when it is unfinished; a marker
    that is not a JSON object raises :class:`MarkerError` naming the file."""
    marker = storage.join(path, MARKER)
    return read_marker_file(marker) if storage.exists(marker) else None


def read_marker_file(marker: str) -> dict[str, Any]:
    """The JSON object in the marker (or manifest) file ``marker``; :class:`MarkerError` naming
    the file when it is not one."""
    try:
        data = storage.read_json(marker)
    except (ValueError, UnicodeDecodeError) as err:
        raise MarkerError(f"{marker}: not a JSON marker ({err})") from None
    if not isinstance(data, dict):
        raise MarkerError(f"{marker}: not a JSON object but {type(data).__name__}")
    return data


def marker_problem(marker: Mapping[str, Any], sizes: Mapping[str, int]) -> str | None:
    """What is wrong with a part, judged by its marker and the ``sizes`` of the files in its
    folder (name -> bytes): a listed file missing or of another size than recorded; None when
    every file the marker lists is there as written."""
    files = marker.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return "its marker lists no files"
    checks = marker.get("checks") or {}
    for name in files:
        if name not in sizes:
            return f"{name} is missing"
        want = (checks.get(name) or {}).get("bytes")
        if want is not None and sizes[name] != want:
            return f"{name} holds {sizes[name]} bytes, its marker says {want}"
    return None


def verify_part(path: str, marker: Mapping[str, Any], *, deep: bool = True) -> str | None:
    """Check a finished part against its marker: every listed file present with the recorded
    size and, with ``deep``, the recorded row count and sha256. Returns the first problem found
    (naming the file), None when the part is whole."""
    fs, inner = storage.pyarrow_fs(path)
    infos = fs.get_file_info(pafs.FileSelector(inner.rstrip("/"), recursive=False, allow_not_found=True))
    problem = marker_problem(marker, {i.base_name: i.size for i in infos if i.type == pafs.FileType.File})
    if problem or not deep:
        return problem
    for name in marker["files"]:
        check = (marker.get("checks") or {}).get(name)
        if not check:
            continue  # a marker written before checks were recorded: presence is all it says
        data = storage.read_bytes(storage.join(path, name))
        if hashlib.sha256(data).hexdigest() != check["sha256"]:
            return f"{name} does not match the checksum in its marker"
        try:
            rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as err:
            return f"{name} is not a readable Parquet file ({err})"
        if rows != check["rows"]:
            return f"{name} holds {rows} rows, its marker says {check['rows']}"
    return None


def discard(path: str) -> bool:
    """Delete an unfinished part (its files, without a marker); True if anything was there."""
    if not storage.exists(path):
        return False
    storage.delete(path)
    return True


def completed_parts(run_dir: str, problems: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Markers of every finished part under ``run_dir`` whose listed files are all there with
    their recorded sizes, keyed by the part's path relative to it (``"<table>/k1=v1/k2=v2"``).
    A damaged part (bad marker, missing or resized file) is left out and, with ``problems``,
    recorded there by that key."""
    fs, inner = storage.pyarrow_fs(run_dir)
    inner = inner.rstrip("/")
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return {}
    folders: dict[str, dict[str, int]] = {}
    for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
        if info.type == pafs.FileType.File:
            rel = posixpath.dirname(info.path[len(inner):].strip("/"))
            folders.setdefault(rel, {})[info.base_name] = info.size
    found: dict[str, dict[str, Any]] = {}
    for rel, sizes in folders.items():  # rel: <table>/k1=v1/...
        if MARKER not in sizes or "/" not in rel or rel.startswith(("_", ".")):
            continue  # no marker, the run manifest itself, or a marker outside <table>/<partitions>
        try:
            marker = read_marker(storage.join(run_dir, rel))
            problem = marker_problem(marker, sizes)
        except MarkerError as err:
            problem = str(err)
        if problem is None:
            found[rel] = marker
        elif problems is not None:
            problems[rel] = problem
    return dict(sorted(found.items()))


def withdraw_manifest(run_dir: str) -> bool:
    """Delete the run manifest (a rerun with work to do, before it touches any part, so no
    manifest describes a run being rewritten); True if there was one."""
    manifest = storage.join(run_dir, MARKER)
    if not storage.exists(manifest):
        return False
    storage.delete(manifest)
    return True


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
    "SchemaError", "table_schema", "rows_to_table", "PartWriter", "read_marker", "read_marker_file", "discard", "completed_parts", "write_manifest",
    "encode_parquet", "file_check", "write_part_file", "commit_part", "MarkerError", "marker_problem", "verify_part",
    "withdraw_manifest", "FAILURES_TABLE", "FAILURES_SCHEMA",
    "rows_per_table", "now_iso", "utc_now", "first_difference", "RerunMismatch", "check_fingerprint",
]
