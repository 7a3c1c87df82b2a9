"""Storage paths, local or ``s3://``: the one filesystem layer of the project.

Every read and write of the project (images, weights, checkpoints, Parquet, markers) goes through
``pyarrow.fs``, the filesystem Ray Train, Ray Data and Parquet use themselves, so one endpoint and
region policy serves all of them: S3-compatible stores (MinIO, moto, Ceph) are reached by setting
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), the region comes from ``AWS_REGION`` /
``AWS_DEFAULT_REGION``. This module imports neither torch nor ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_remote(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str | Path) -> str:
    """Absolute local path, or the URI unchanged (Ray needs absolute storage paths)."""
    path = str(path)
    return path if is_remote(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    base = str(base).rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts)])


def name(path: str) -> str:
    """The last part of a local path or URI (``s3://b/runs/a/`` -> ``a``)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def endpoint_url() -> str | None:
    """The S3 endpoint override, if any (``AWS_ENDPOINT_URL_S3`` wins over ``AWS_ENDPOINT_URL``)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


S3_REQUEST_ATTEMPTS = 3  # attempts of each S3 request in pyarrow's client (its default), before an OSError


def pyarrow_fs(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path_within_it)`` for a local path or an ``s3://bucket/key`` URI. The S3
    client retries each failed request (throttling, 5xx, dropped connections) itself,
    ``S3_REQUEST_ATTEMPTS`` attempts in all; callers that retry whole reads do so on top of it."""
    path = resolve(path)
    if path.startswith("s3://"):
        kwargs: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_REQUEST_ATTEMPTS)}
        if endpoint := endpoint_url():
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        if name := region():
            kwargs["region"] = name
        return pafs.S3FileSystem(**kwargs), path[len("s3://"):]
    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def exists(path: str) -> bool:
    fs, inner = pyarrow_fs(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    """True for a local directory or an S3 prefix that holds objects."""
    fs, inner = pyarrow_fs(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def _uri(path: str, inner: str) -> str:
    """``inner`` (a path inside ``fs``) in the form of ``path``: ``s3://...`` for S3."""
    return f"s3://{inner}" if resolve(path).startswith("s3://") else inner


def list_dir(path: str) -> list[tuple[str, bool]]:
    """``(name, is_dir)`` of the direct entries of the folder at ``path``, sorted by name."""
    fs, inner = pyarrow_fs(path)
    infos = fs.get_file_info(pafs.FileSelector(inner.rstrip("/"), recursive=False))
    return sorted((i.base_name, i.type == pafs.FileType.Directory) for i in infos)


def walk_files(path: str) -> list[str]:
    """Every file below the folder at ``path`` (recursively), as full paths or ``s3://`` URIs."""
    fs, inner = pyarrow_fs(path)
    infos = fs.get_file_info(pafs.FileSelector(inner.rstrip("/"), recursive=True))
    return sorted(_uri(path, i.path) for i in infos if i.type == pafs.FileType.File)


def read_bytes(path: str) -> bytes:
    fs, inner = pyarrow_fs(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no such file: {path}") from err


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` so readers see the old file or the whole new one, never a partial one.

    Local: a temp file in the same directory, then ``rename``. S3: a single PUT is atomic. The
    temp file's name starts with a dot, so the dataset discovery of pyarrow, DuckDB and polars
    never picks it up, and it is unique, so concurrent writers never share one.
    """
    fs, inner = pyarrow_fs(path)
    if isinstance(fs, pafs.LocalFileSystem):
        # Only locally: on S3, create_dir PUTs empty "dir/" marker objects, which s3fs lists
        # as files, so pandas/pyarrow reads of the folder through s3fs fail on them.
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        folder, _, name = inner.rpartition("/")
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, inner)
        _fsync_dir(folder)
    else:
        with fs.open_output_stream(inner) as f:
            f.write(data)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_table_atomic(path: str, table: pa.Table) -> None:
    """Write a pyarrow Table as one Parquet file, atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(path, buf.getvalue())


def read_table(path: str) -> pa.Table:
    fs, inner = pyarrow_fs(path)
    return pq.read_table(inner, filesystem=fs)


def delete(path: str) -> None:
    fs, inner = pyarrow_fs(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif info.type == pafs.FileType.File:
        fs.delete_file(inner)


def _fsync_dir(folder: str) -> None:
    """Persist a rename in ``folder`` (POSIX; Windows cannot open a directory)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def walk_file_sizes(path: str) -> list[tuple[str, int]]:
    """``(path, size in bytes)`` of every file below the folder at ``path``, like :func:`walk_files`."""
    fs, inner = pyarrow_fs(path)
    infos = fs.get_file_info(pafs.FileSelector(inner.rstrip("/"), recursive=True))
    return sorted((_uri(path, i.path), i.size) for i in infos if i.type == pafs.FileType.File)


_DIGESTS: dict[tuple[str, int, Any], str] = {}


def digest(path: str) -> str:
    """sha256 (hex) of the file at ``path``'s bytes; cached in this process by path, size and
    modification time, so a file replaced in place gets a new digest."""
    fs, inner = pyarrow_fs(path)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {path}")
    key = (resolve(path), info.size, info.mtime_ns)
    if key not in _DIGESTS:
        sha = hashlib.sha256()
        with fs.open_input_stream(inner) as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
        _DIGESTS[key] = sha.hexdigest()
    return _DIGESTS[key]
