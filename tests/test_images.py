"""cluster.images, the one image reader: the same images (and the same `limit` rule) for training
and experiments, unreadable files dropped with their path logged."""

import hashlib

import numpy as np
import pyarrow as pa

from bagnet.config import load_config
from bagnet.synthetic import SyntheticWorld, materialize
from cluster import images
from cluster.configs import ExperimentJobConfig, TrainJobConfig


def test_unreadable_images_are_logged_and_dropped(tmp_path, caplog):
    world = SyntheticWorld(seed=0, image_size=64)
    n = world.num_classes  # ImageFolderIndex wants every class folder non-empty
    materialize(world, str(tmp_path), split="val", n=n, ext="png")
    bad = tmp_path / "val" / world.class_names[0] / "broken.png"
    bad.write_bytes(b"not an image")
    cfg = load_config(ExperimentJobConfig, None, ["models=[{name: bagnet9_small}]", "data.dataset=imagenet",
                                                  f"data.root={tmp_path}", "data.image_size=56", "data.resize=64"])
    source = images.describe(cfg.data, cfg.split)
    assert source.num_images == n + 1 and source.class_names == world.class_names
    batch = {k: source.files[k].to_numpy(zero_copy_only=False) for k in ("path", "label", "image_id")}
    out = images._imagenet_images(batch, size=56, resize=64, augment=False)
    assert out["image"].shape == (n, 56, 56, 3) and out["image"].dtype == np.uint8
    assert "val/local0/broken.png" not in out["image_id"].tolist() and "val/local0/000000.png" in out["image_id"]
    assert str(bad) in caplog.text


def test_pick_evenly_spreads_over_the_class_sorted_list():
    samples = [(f"c{c}/{i}", c) for c in range(5) for i in range(4)]
    picked = images.pick_evenly(samples, 5)
    assert [y for _, y in picked] == [0, 1, 2, 3, 4]
    assert images.pick_evenly(samples, None) == samples and images.pick_evenly(samples, 99) == samples


def _fingerprints(rows: list[dict]) -> list[tuple[int, str]]:
    return sorted((int(r["label"]), hashlib.sha1(np.ascontiguousarray(r["image"]).tobytes()).hexdigest())
                  for r in rows)


def test_limit_gives_training_and_experiments_the_same_images(ray_session, tmp_path):
    """One ImageNet-layout folder with data.limit: the val images training reads are the images
    the experiments read with split=val, spread over all classes."""
    world = SyntheticWorld(seed=0, image_size=64)
    for split in ("train", "val"):
        materialize(world, str(tmp_path), split=split, n=4 * world.num_classes, ext="png")
    limit = 2 * world.num_classes - 3
    data = [f"data.{key}" for key in ("dataset=imagenet", f"root={tmp_path}", "image_size=56", "resize=64",
                                       f"limit={limit}", "read_batch_size=8")]
    train_cfg = load_config(TrainJobConfig, None, data)
    exp_cfg = load_config(ExperimentJobConfig, None, [*data, "split=val", "models=[{name: bagnet9_small}]"])
    assert train_cfg.data == exp_cfg.data

    trained_on = images.train_datasets(train_cfg.data)
    source = images.describe(exp_cfg.data, exp_cfg.split)
    evaluated = images.image_dataset(exp_cfg.data, source).take_all()
    assert len(evaluated) == source.num_images == limit
    assert _fingerprints(trained_on.val.take_all()) == _fingerprints(evaluated)
    per_class = np.bincount([r["label"] for r in evaluated], minlength=world.num_classes)
    assert per_class.min() >= 1 and per_class.max() - per_class.min() <= 1  # every class keeps its share
    ids = [str(r["image_id"]) for r in evaluated]
    assert sorted(ids) == sorted(source.files["image_id"].to_pylist()) and len(set(ids)) == limit
    assert all(i.startswith("val/") for i in ids)
    assert trained_on.train_size == limit  # the same rule for training's own split


def test_the_file_list_is_decoded_by_parallel_tasks(ray_session, tmp_path):
    """The listed files are cut into blocks of data.read_batch_size (at most MAX_FILE_BLOCKS), one
    decoding task each: one table would be one task, whatever the cluster's CPUs or the number of
    a model's replicas."""
    world = SyntheticWorld(seed=0, image_size=64)
    materialize(world, str(tmp_path), split="val", n=2 * world.num_classes, ext="png")
    cfg = load_config(ExperimentJobConfig, None, ["models=[{name: bagnet9_small}]", "data.dataset=imagenet",
                                                  f"data.root={tmp_path}", "data.image_size=32",
                                                  "data.resize=32", "data.read_batch_size=6"])
    source = images.describe(cfg.data, cfg.split)
    blocks = images.file_blocks(source.files, 6)
    assert [b.num_rows for b in blocks] == [6, 6, 6, 2] and pa.concat_tables(blocks).equals(source.files)
    assert [b.num_rows for b in images.file_blocks(source.files, 2, max_blocks=3)] == [7, 7, 6]
    assert len(images.file_blocks(source.files.slice(0, 0), 6)) == 1
    decoded = images.image_dataset(cfg.data, source).materialize()
    assert decoded.num_blocks() == 4  # one output block per decoding task
    assert sorted(decoded.unique("image_id")) == sorted(source.files["image_id"].to_pylist())
