"""The one image reader of the project, for training and experiments alike: Ray Datasets of
``image`` (uint8 NHWC), ``label`` (int64) and ``image_id`` (str), made in parallel CPU tasks.

Two sources: the synthetic world (generated from ``(seed, split, index)``) and an ImageNet-layout
folder (``root/<split>/<wnid>/*``, local or ``s3://``). ``data.limit`` means the same everywhere:
at most that many images of a split, picked evenly over its class-sorted list, so every class
keeps its share. ImageNet images that training learns from get the random training transform;
every other read the centre crop of :func:`bagnet.imagenet.eval_transform`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import ray

from bagnet.config import ConfigError
from bagnet.imagenet import ImageDecodeError, ImageFolderIndex, decode_rgb, eval_transform, train_transform
from bagnet.synthetic import SyntheticWorld
from cluster.configs import DataConfig
from store import storage

log = logging.getLogger(__name__)


@dataclass
class ImageSource:
    """What a split holds, known before any Ray work: its size and classes, and for ImageNet the
    files (``path``, ``label``, ``image_id``)."""

    split: str
    num_images: int
    class_names: list[str]
    items: list[dict] = field(default_factory=list)
    digest: str | None = None  # ImageNet: sha256 of the picked files' names and sizes (None: synthetic)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def pick_evenly(samples: list, limit: int | None) -> list:
    """At most ``limit`` of ``samples``, evenly spaced over the list (all of them without a limit)."""
    if not limit or limit >= len(samples):
        return list(samples)
    return [samples[i] for i in np.linspace(0, len(samples) - 1, limit).round().astype(int)]


def describe(cfg: DataConfig, split: str) -> ImageSource:
    """List split ``split`` (no Ray); a missing ImageNet folder raises ConfigError naming the path."""
    if cfg.dataset == "synthetic":
        return ImageSource(split, cfg.synthetic_size(split), cfg.world().class_names)
    try:
        index = ImageFolderIndex(storage.resolve(cfg.root), split)
    except FileNotFoundError as err:
        raise ConfigError(f"data.root: {err}") from None
    prefix = storage.resolve(index.path).rstrip("/") + "/"
    items = [{"path": p, "label": y, "image_id": f"{split}/{p.removeprefix(prefix)}"}
             for p, y in pick_evenly(index.samples, cfg.limit)]
    sha = hashlib.sha256()
    for item in items:
        sha.update(f"{item['image_id']}\t{item['label']}\t{index.sizes[item['path']]}\n".encode())
    return ImageSource(split, len(items), list(index.classes), items, sha.hexdigest())


def _synthetic_images(batch: dict[str, np.ndarray], *, seed: int, image_size: int, split: str) -> dict:
    out = SyntheticWorld(seed=seed, image_size=image_size).batch(batch["id"].tolist(), split=split)
    return {"image": out["image"], "label": out["label"], "image_id": out["image_id"]}


def _imagenet_images(batch: dict[str, np.ndarray], *, size: int, resize: int, augment: bool) -> dict:
    """Read, decode and transform; unreadable images are logged with their path and dropped."""
    transform = train_transform(size) if augment else eval_transform(size, resize)
    images, labels, ids = [], [], []
    for path, label, image_id in zip(batch["path"], batch["label"], batch["image_id"]):
        try:
            rgb = decode_rgb(storage.read_bytes(str(path)), str(path))
        except (ImageDecodeError, OSError) as err:
            log.warning("skipping unreadable image %s: %s", path, err)
            continue
        images.append(np.asarray(transform(rgb), dtype=np.uint8))
        labels.append(int(label))
        ids.append(str(image_id))
    return {"image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
            "label": np.asarray(labels, np.int64), "image_id": np.asarray(ids, dtype=str)}


def image_dataset(cfg: DataConfig, source: ImageSource, *, augment: bool = False,
                  runtime_env: dict | None = None) -> ray.data.Dataset:
    """Lazy Ray Dataset of ``source``'s images: ``image``, ``label``, ``image_id``. ImageNet images
    get the random training transform with ``augment``, else the evaluation centre crop."""
    options = {"batch_size": cfg.read_batch_size, "num_cpus": cfg.num_cpus, "runtime_env": runtime_env}
    if cfg.dataset == "synthetic":
        return ray.data.range(source.num_images).map_batches(
            _synthetic_images, fn_kwargs={"seed": cfg.seed, "image_size": cfg.image_size, "split": source.split},
            **options)
    return ray.data.from_items(source.items).map_batches(
        _imagenet_images, fn_kwargs={"size": cfg.image_size, "resize": cfg.eval_resize, "augment": augment},
        **options)


@dataclass
class TrainData:
    train: ray.data.Dataset
    val: ray.data.Dataset
    num_classes: int
    class_names: list[str]
    train_size: int


def check_paths(cfg: DataConfig) -> tuple[ImageSource, ImageSource] | None:
    """Fail before any Ray work when an ImageNet split folder is missing or has an empty class
    folder, or when train and val have different class folders; the error names them. Returns the
    listed ``(train, val)`` for :func:`train_datasets` (None for the synthetic world)."""
    if cfg.dataset == "imagenet":
        for split in ("train", "val"):
            path = storage.join(cfg.root, split)
            if not storage.is_dir(path):
                raise ConfigError(f"data.root: split folder not found: {path}")
        train, val = describe(cfg, "train"), describe(cfg, "val")
        check_same_classes(train, val, cfg.root)
        return train, val
    return None


def check_same_classes(train: ImageSource, val: ImageSource, root: str | None) -> None:
    """ConfigError naming the class folders one split has and the other lacks: labels are indices
    into the sorted class list, so both splits must list the same classes."""
    if train.class_names != val.class_names:
        only_train = sorted(set(train.class_names) - set(val.class_names))
        only_val = sorted(set(val.class_names) - set(train.class_names))
        raise ConfigError(f"data.root: {root}/train and {root}/val have different class folders (missing in val: "
                          f"{', '.join(only_train) or 'none'}; missing in train: {', '.join(only_val) or 'none'}); "
                          "labels would mean other classes in each split")


def train_datasets(cfg: DataConfig, sources: tuple[ImageSource, ImageSource] | None = None) -> TrainData:
    """The ``train`` and ``val`` splits as lazy Ray Datasets of ``image`` and ``label`` (the
    tensor columns Ray Train iterates) for Ray Train; ``sources``: the splits as
    :func:`check_paths` listed them (listed here when None)."""
    train, val = sources or (describe(cfg, "train"), describe(cfg, "val"))
    check_same_classes(train, val, cfg.root)
    columns = ["image", "label"]
    return TrainData(image_dataset(cfg, train, augment=True).select_columns(columns),
                     image_dataset(cfg, val).select_columns(columns),
                     train.num_classes, train.class_names, train.num_images)
