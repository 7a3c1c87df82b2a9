"""The storage layer: one S3 endpoint policy, atomic writes whose temp files no reader picks up."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from store import storage


def test_s3_endpoint_and_region_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    fs, inner = storage.pyarrow_fs("s3://bucket/prefix")
    options = fs.__reduce__()[1][0]
    assert inner == "bucket/prefix"
    assert (options["endpoint_override"], options["scheme"], options["region"]) == ("127.0.0.1:9", "http", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example:443")
    assert storage.pyarrow_fs("s3://bucket")[0].__reduce__()[1][0]["endpoint_override"] == "s3.example:443"


def test_temp_files_are_hidden_from_dataset_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that dies between writing its temp file and renaming it leaves a dot file behind,
    which pyarrow's dataset discovery (as DuckDB's and polars') skips."""
    table = pa.table({"x": [1, 2, 3]})
    storage.write_table_atomic(str(tmp_path / "t" / "part-00000.parquet"), table)

    def crash(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(OSError, match="killed"):
        storage.write_table_atomic(str(tmp_path / "t" / "part-00001.parquet"), table)
    monkeypatch.undo()
    leftovers = [p.name for p in (tmp_path / "t").iterdir()]
    assert len(leftovers) == 2 and any(n.startswith(".part-00001.parquet.tmp-") for n in leftovers)
    assert pads.dataset(str(tmp_path / "t")).to_table().num_rows == 3


def test_listing_helpers(tmp_path: Path) -> None:
    for rel in ("a/x.txt", "a/sub/y.txt", "b.txt"):
        storage.write_bytes_atomic(str(tmp_path / rel), rel.encode())
    assert storage.list_dir(str(tmp_path)) == [("a", True), ("b.txt", False)]
    assert storage.walk_files(str(tmp_path / "a")) == [str(tmp_path / "a/sub/y.txt"), str(tmp_path / "a/x.txt")]
    assert storage.is_dir(str(tmp_path / "a")) and not storage.is_dir(str(tmp_path / "b.txt"))
    assert storage.read_bytes(str(tmp_path / "a/sub/y.txt")) == b"a/sub/y.txt"
    with pytest.raises(FileNotFoundError, match="no such file: .*nope"):
        storage.read_bytes(str(tmp_path / "nope"))
