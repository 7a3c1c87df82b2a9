"""Ray Datasets for training: the synthetic world (generated in parallel tasks) or an ImageNet folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import ray

from bagnet import data as bdata
from bagnet.config import ConfigError, require
from store import storage

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    dataset: Literal["synthetic", "imagenet"] = "synthetic"
    root: str | None = None  # ImageNet folder (local or s3://) with train/ and val/
    image_size: int = 64
    resize: int | None = None  # eval resize before the centre crop (default: image_size * 8 / 7)
    train_size: int = 6000  # synthetic: images per epoch
    val_size: int = 1000  # synthetic: validation images
    seed: int = 0
    limit: int | None = None  # ImageNet: use at most this many images per split (debugging)

    def validate(self) -> None:
        require(self.image_size >= 16, "image_size", f"must be >= 16, got {self.image_size}")
        require(self.train_size >= 1, "train_size", f"must be >= 1, got {self.train_size}")
        require(self.val_size >= 1, "val_size", f"must be >= 1, got {self.val_size}")
        require(self.dataset != "imagenet" or bool(self.root), "root", "is required when dataset is 'imagenet'")


@dataclass
class TrainData:
    train: ray.data.Dataset
    val: ray.data.Dataset
    num_classes: int
    class_names: list[str]
    train_size: int


def check_paths(cfg: DataConfig) -> None:
    """Fail before any Ray work when an ImageNet path is missing; the error names the path."""
    if cfg.dataset == "imagenet":
        for split in ("train", "val"):
            path = storage.join(cfg.root, split)
            if not storage.exists(path):
                raise ConfigError(f"data.root: split folder not found: {path}")


def _synthetic_batch(batch: dict, *, seed: int, image_size: int, split: str) -> dict:
    world = bdata.SyntheticWorld(seed=seed, image_size=image_size)
    out = world.batch(batch["id"].tolist(), split=split)
    return {"image": out["image"], "label": out["label"]}


def _imagenet_batch(batch: dict, *, train: bool, size: int, resize: int) -> dict:
    """Read, decode and transform images; unreadable files are logged with their path and dropped."""
    transform = bdata.train_transform(size) if train else bdata.eval_transform(size, resize)
    images, labels = [], []
    for path, label in zip(batch["path"], batch["label"]):
        try:
            fs, inner = storage.fsspec_fs(str(path))
            with fs.open(inner, "rb") as f:
                rgb = bdata.decode_rgb(f.read(), str(path))
        except (bdata.ImageDecodeError, OSError) as err:
            log.warning("skipping unreadable image %s: %s", path, err)
            continue
        images.append(np.asarray(transform(rgb), dtype=np.uint8))
        labels.append(int(label))
    if not images:
        return {"image": np.zeros((0, size, size, 3), np.uint8), "label": np.zeros((0,), np.int64)}
    return {"image": np.stack(images), "label": np.asarray(labels, np.int64)}


def build_datasets(cfg: DataConfig) -> TrainData:
    """Lazy Ray Datasets of uint8 NHWC images and int64 labels for ``train`` and ``val``."""
    if cfg.dataset == "synthetic":
        world = bdata.SyntheticWorld(seed=cfg.seed, image_size=cfg.image_size)
        def make(n: int, split: str) -> ray.data.Dataset:
            return ray.data.range(n).map_batches(
                _synthetic_batch, fn_kwargs={"seed": cfg.seed, "image_size": cfg.image_size, "split": split},
                batch_size=256,
            )
        return TrainData(make(cfg.train_size, "train"), make(cfg.val_size, "val"), world.num_classes,
                         list(world.class_names), cfg.train_size)
    resize = cfg.resize or round(cfg.image_size * 8 / 7)
    splits = {}
    classes: list[str] = []
    for split in ("train", "val"):
        index = bdata.ImageFolderIndex(cfg.root, split)
        samples = index.samples[: cfg.limit] if cfg.limit else index.samples
        classes = list(index.classes)
        items = [{"path": p, "label": label} for p, label in samples]
        splits[split] = ray.data.from_items(items).map_batches(
            _imagenet_batch, fn_kwargs={"train": split == "train", "size": cfg.image_size, "resize": resize},
            batch_size=64,
        )
        if split == "train":
            train_size = len(items)
    return TrainData(splits["train"], splits["val"], len(classes), classes, train_size)
