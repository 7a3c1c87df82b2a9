"""Storage, weights and images on a real S3 API (moto's server on loopback)."""

import io

import pandas as pd
import pyarrow as pa
import torch

from bagnet.imagenet import ImageFolderIndex
from bagnet.synthetic import SyntheticWorld, materialize
from bagnet.models import create_model
from store import results, storage
from tests.fixtures_s3 import storage_options


def test_weights_from_s3_are_identical(s3_bucket):
    torch.manual_seed(1)
    source = create_model("bagnet9_small", num_classes=10)
    path = f"s3://{s3_bucket}/weights/model.pt"
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    storage.write_bytes_atomic(path, buf.getvalue())
    torch.manual_seed(2)  # a different random init, overwritten by the load
    loaded = create_model("bagnet9_small", num_classes=10, weights=path)
    for key, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_imagenet_layout_and_part_writer_on_s3(s3_bucket, s3_server):
    world = SyntheticWorld(seed=0, image_size=64)
    root = f"s3://{s3_bucket}/imagenet"
    materialize(world, root, split="val", n=20, ext="jpg")
    index = ImageFolderIndex(root, "val")
    assert len(index) == 20 and index.classes == world.class_names
    assert index.samples[0][0].startswith(f"s3://{s3_bucket}/imagenet/val/")

    run_dir = f"s3://{s3_bucket}/out/run1"
    part = results.part_dir(run_dir, "predictions", {"experiment": "predictions", "model": "m"})
    writer = results.PartWriter(part)
    own = pa.schema([("x", pa.float64())])
    writer.write(results.rows_to_table([{"image_id": "a", "label": 1, "x": 0.5}],
                                       {"run_id": "run1", "q": None, "weights": "random", "dataset": "d",
                                        "split": "val", "seed": 0, "precision": "fp32",
                                        "created_at": results.utc_now(), "code_version": "v"},
                                       own, experiment="predictions"))
    assert results.read_marker(part) is None
    writer.commit({"fingerprint": {"k": 1}})
    assert results.completed_parts(run_dir) == {
        "predictions/experiment=predictions/model=m": results.read_marker(part)}
    df = pd.read_parquet(f"{run_dir}/predictions", storage_options=storage_options(s3_server))
    assert df["model"].astype(str).tolist() == ["m"] and df["x"].tolist() == [0.5]
