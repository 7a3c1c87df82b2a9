"""Storage paths, local or ``s3://``: filesystems, atomic writes, run manifests.

S3-compatible stores (MinIO, moto, Ceph) are reached by setting ``AWS_ENDPOINT_URL``; both the
pyarrow filesystem (used by Ray Train and Parquet) and fsspec/s3fs (used for reading images and
checkpoints) honour it.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_remote(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str | Path) -> str:
    """Absolute local path, or the URI unchanged (Ray needs absolute storage paths)."""
    path = str(path)
    return path if is_remote(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    base = str(base).rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts)])


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def pyarrow_fs(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path_within_it)`` for a local path or an ``s3://bucket/key`` URI."""
    path = resolve(path)
    if path.startswith("s3://"):
        kwargs: dict[str, Any] = {}
        if endpoint := endpoint_url():
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), path[len("s3://"):]
    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def fsspec_fs(path: str):
    """``(fsspec filesystem, path)``; s3 uses ``AWS_ENDPOINT_URL`` when set (see ``bagnet.imagenet.open_fs``)."""
    from bagnet.imagenet import open_fs

    return open_fs(resolve(path))


def exists(path: str) -> bool:
    fs, inner = pyarrow_fs(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    fs, inner = pyarrow_fs(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no such file: {path}") from err


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` so readers see the old file or the whole new one, never a partial one.

    Local: a temp file in the same directory, then ``rename``. S3: a single PUT is atomic.
    """
    fs, inner = pyarrow_fs(path)
    if isinstance(fs, pafs.LocalFileSystem):
        # Only locally: on S3, create_dir PUTs empty "dir/" marker objects, which s3fs lists
        # as files, so pandas/pyarrow reads of the folder through s3fs fail on them.
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, inner)
    else:
        with fs.open_output_stream(inner) as f:
            f.write(data)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_table_atomic(path: str, table) -> None:
    """Write a pyarrow Table as one Parquet file, atomically."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(path, buf.getvalue())


def read_table(path: str):
    import pyarrow.parquet as pq

    fs, inner = pyarrow_fs(path)
    return pq.read_table(inner, filesystem=fs)


def delete(path: str) -> None:
    fs, inner = pyarrow_fs(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif info.type == pafs.FileType.File:
        fs.delete_file(inner)
