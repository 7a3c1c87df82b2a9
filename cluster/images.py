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
import math
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from bagnet.config import ConfigError
from bagnet.imagenet import IMAGE_EXTENSIONS, ImageDecodeError, decode_rgb, eval_transform, train_transform
from bagnet.synthetic import SyntheticWorld
from cluster.configs import DataConfig
from store import results, storage

log = logging.getLogger(__name__)


@dataclass
class ImageSource:
    """What a split holds, known before any Ray work: its size and classes, and for ImageNet the
    files as an Arrow table (``path``, ``label``, ``image_id``: compact, not Python objects)."""

    split: str
    num_images: int
    class_names: list[str]
    files: pa.Table | None = None
    digest: str | None = None  # ImageNet: sha256 of the listed files' ids, labels and sizes (None: synthetic)

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
        classes, files = list_split(storage.resolve(cfg.root), split)
    except FileNotFoundError as err:
        raise ConfigError(f"data.root: {err}") from None
    if cfg.limit and cfg.limit < files.num_rows:
        files = files.take(np.linspace(0, files.num_rows - 1, cfg.limit).round().astype(int))  # as pick_evenly
    return ImageSource(split, files.num_rows, classes, files, files_digest(files))


def files_digest(files: pa.Table) -> str:
    """sha256 of the listed files' ids, labels and sizes: changes when a file is added, removed,
    relabelled or rewritten with another size (the experiments' rerun fingerprint)."""
    sha = hashlib.sha256()
    for image_id, label, size in zip(*(files[c].to_pylist() for c in ("image_id", "label", "size"))):
        sha.update(f"{image_id}\t{label}\t{size}\n".encode())
    return sha.hexdigest()


LIST_THREADS = 32  # class folders listed at once (S3 lists 1,000 keys a request)


def list_split(root: str, split: str) -> tuple[list[str], pa.Table]:
    """The class names and files (``path``, ``label``, ``image_id``, ``size``) of ``root/<split>/<class>/...``
    in :class:`bagnet.imagenet.ImageFolderIndex`'s order and with its rules, the class folders
    listed in parallel and the files kept as Arrow columns, not Python objects. Raises
    ``FileNotFoundError`` as the index does (missing root or split, no class folder, an empty one)."""
    path = storage.join(root, split)
    if not storage.is_dir(path):
        what, missing = ("split folder", path) if storage.is_dir(root) else ("root", root)
        raise FileNotFoundError(f"ImageNet {what} not found: {missing}")
    classes = [name for name, is_dir in storage.list_dir(path) if is_dir]
    if not classes:
        raise FileNotFoundError(f"no class folders in {path}")
    prefix = storage.resolve(path).rstrip("/") + "/"

    def images_of(name: str) -> pa.Table:
        found = [(p, size) for p, size in storage.walk_file_sizes(storage.join(path, name))
                 if p.lower().endswith(IMAGE_EXTENSIONS)]
        return pa.table({"path": pa.array([p for p, _ in found], pa.string()),
                         "size": pa.array([size for _, size in found], pa.int64())})

    with ThreadPoolExecutor(max_workers=min(LIST_THREADS, len(classes))) as pool:
        per_class = list(pool.map(images_of, classes))
    if empty := [c for c, files in zip(classes, per_class) if files.num_rows == 0]:
        shown = ", ".join(f"{path}/{c}" for c in empty[:5])
        raise FileNotFoundError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in {len(empty)} class folder(s): {shown}")
    paths = pa.chunked_array([t["path"].combine_chunks() for t in per_class], pa.string())
    sizes = pa.chunked_array([t["size"].combine_chunks() for t in per_class], pa.int64())
    labels = pa.chunked_array([pa.array(np.full(t.num_rows, y, np.int64)) for y, t in enumerate(per_class)])
    ids = pc.binary_join_element_wise(pa.scalar(f"{split}/"), pc.utf8_slice_codeunits(paths, len(prefix)), "")
    return classes, pa.table({"path": paths, "label": labels, "image_id": ids, "size": sizes})


def _synthetic_images(batch: dict[str, np.ndarray], *, seed: int, image_size: int, split: str,
                      keep_failures: bool = False) -> dict:
    out = SyntheticWorld(seed=seed, image_size=image_size).batch(batch["id"].tolist(), split=split)
    images = {"image": out["image"], "label": out["label"], "image_id": out["image_id"]}
    if keep_failures:  # the columns of _imagenet_images: generated images never fail and read nothing
        n = len(out["label"])
        images.update(path=np.full(n, "", dtype=str), error=np.full(n, "", dtype=str), reads=np.zeros(n, np.int64))
    return images


def synthetic_batch(cfg: DataConfig, split: str, ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Images ``ids`` of the synthetic ``split``, made in this process (no Ray), with the columns
    of ``image_dataset(..., keep_failures=True)``: a plain-loop baseline's input."""
    return _synthetic_images({"id": np.asarray(ids, np.int64)}, seed=cfg.seed, image_size=cfg.image_size,
                             split=split, keep_failures=True)


MAX_FILE_BLOCKS = 1000  # blocks of the file list, each one decoding task (ImageNet train: 1,281 files each)
READ_ATTEMPTS = 4  # reads of one file before an I/O error stops the job
READ_BACKOFF_S = 0.5  # wait before the second attempt, doubled before each further one


class ImageReadError(RuntimeError):
    """An image file that could not be read after every retry: the job stops, naming it."""


def read_with_retry(path: str) -> tuple[bytes, int]:
    """The bytes of ``path`` and the attempts they took; an I/O error (``OSError``) is retried
    up to ``READ_ATTEMPTS`` reads in all, with exponential backoff, then raises :class:`ImageReadError`."""
    attempts, backoff_s = READ_ATTEMPTS, READ_BACKOFF_S
    for attempt in range(1, attempts + 1):
        try:
            return storage.read_bytes(path), attempt
        except OSError as err:
            if attempt == attempts:
                raise ImageReadError(f"cannot read image {path} after {attempts} attempts ({type(err).__name__}: "
                                     f"{err}); the job stops, finished parts are kept and a rerun resumes") from err
            log.warning("reading %s failed (%s), retrying", path, err)
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _imagenet_images(batch: dict[str, np.ndarray], *, size: int, resize: int, augment: bool,
                     keep_failures: bool = False) -> dict:
    """Read (I/O errors retried, see :func:`read_with_retry`), decode and transform. An image that
    cannot be decoded is dropped with a log line, or with ``keep_failures`` kept as a row of zeros
    whose ``error`` says why (``""`` for good images); ``reads`` is each row's read attempts."""
    transform = train_transform(size) if augment else eval_transform(size, resize)
    images, labels, ids, errors, reads = [], [], [], [], []
    for path, label, image_id in zip(batch["path"], batch["label"], batch["image_id"]):
        data, attempts = read_with_retry(str(path))
        try:
            rgb, error = decode_rgb(data, str(path)), ""
        except ImageDecodeError as err:
            if not keep_failures:
                log.warning("skipping unreadable image %s: %s", path, err)
                continue
            rgb, error = np.zeros((size, size, 3), np.uint8), str(err)
        images.append(rgb if error else np.asarray(transform(rgb), dtype=np.uint8))
        labels.append(int(label))
        ids.append(str(image_id))
        errors.append(error)
        reads.append(attempts)
    out = {"image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
           "label": np.asarray(labels, np.int64), "image_id": np.asarray(ids, dtype=str)}
    if keep_failures:
        out.update(path=np.asarray(batch["path"], dtype=str),  # no row was dropped
                   error=np.asarray(errors, dtype=str), reads=np.asarray(reads, np.int64))
    return out


def image_dataset(cfg: DataConfig, source: ImageSource, *, augment: bool = False,
                  runtime_env: dict | None = None, keep_failures: bool = False) -> ray.data.Dataset:
    """Lazy Ray Dataset of ``source``'s images: ``image``, ``label``, ``image_id``. ImageNet images
    get the random training transform with ``augment``, else the evaluation centre crop. With
    ``keep_failures`` undecodable images stay as rows and every row has ``path``, ``error`` (""
    when fine) and ``reads`` (read attempts), so the caller accounts for each listed image."""
    options = {"batch_size": cfg.read_batch_size, "num_cpus": cfg.num_cpus, "runtime_env": runtime_env}
    if cfg.dataset == "synthetic":
        return ray.data.range(source.num_images).map_batches(
            _synthetic_images, fn_kwargs={"seed": cfg.seed, "image_size": cfg.image_size, "split": source.split,
                                          "keep_failures": keep_failures},
            **options)
    return ray.data.from_arrow(file_blocks(source.files, cfg.read_batch_size)).map_batches(
        _imagenet_images, fn_kwargs={"size": cfg.image_size, "resize": cfg.eval_resize, "augment": augment,
                                     "keep_failures": keep_failures},
        **options)


def file_blocks(files: pa.Table, batch: int, max_blocks: int = MAX_FILE_BLOCKS) -> list[pa.Table]:
    """The file list cut into blocks of at least ``batch`` rows, at most ``max_blocks`` of them:
    Ray Data gives each block its own decoding task, so the files are decoded in parallel (one
    table would be one task) and a model's replicas each get blocks to work on."""
    rows = max(batch, math.ceil(files.num_rows / max_blocks))
    return [files.slice(start, rows) for start in range(0, files.num_rows, rows)] or [files]


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


SKIPPED_PREFIX = "_skipped-"  # a training run's records of the images it skipped (one file per batch)


def failed_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean mask of a ``keep_failures`` batch's undecodable images (``error`` set)."""
    return np.asarray([bool(e) for e in batch["error"]], dtype=bool)


def _drop_failures(batch: dict[str, np.ndarray], *, record_to: str | None) -> dict[str, np.ndarray]:
    """Training's images without the undecodable ones, each logged and, with ``record_to`` (a
    training run folder), written there as ``_skipped-*.parquet`` (path, image_id, label, error)."""
    failed = failed_rows(batch)
    if failed.any():
        rows = {k: batch[k][failed].tolist() for k in ("path", "image_id", "label", "error")}
        for path, error in zip(rows["path"], rows["error"]):
            log.warning("skipping unreadable image %s: %s", path, error)
        if record_to:
            name = f"{SKIPPED_PREFIX}{uuid.uuid4().hex[:16]}.parquet"
            results.write_part_file(record_to, pa.table(rows), name)
    return {"image": batch["image"][~failed], "label": batch["label"][~failed]}


def skipped_images(run_dir: str) -> pa.Table:
    """The images a training run skipped (each once, though every epoch meets it again)."""
    names = [n for n, is_dir in storage.list_dir(run_dir) if not is_dir and n.startswith(SKIPPED_PREFIX)]
    if not names:
        return pa.table({"path": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    table = pa.concat_tables([storage.read_table(storage.join(run_dir, n)).select(["path", "error"]) for n in names])
    return table.group_by("path").aggregate([("error", "max")]).rename_columns(["path", "error"])


def train_datasets(cfg: DataConfig, sources: tuple[ImageSource, ImageSource] | None = None,
                   skipped_to: str | None = None) -> TrainData:
    """The ``train`` and ``val`` splits as lazy Ray Datasets of ``image`` and ``label`` (the
    tensor columns Ray Train iterates) for Ray Train. Undecodable images are left out, logged and,
    with ``skipped_to`` (the training run folder), recorded there (:func:`skipped_images`);
    ``sources``: the splits as :func:`check_paths` listed them (listed here when None)."""
    train, val = sources or (describe(cfg, "train"), describe(cfg, "val"))
    check_same_classes(train, val, cfg.root)

    def usable(source: ImageSource, augment: bool) -> ray.data.Dataset:
        return image_dataset(cfg, source, augment=augment, keep_failures=True).map_batches(
            _drop_failures, fn_kwargs={"record_to": skipped_to}, batch_size=None, batch_format="numpy")

    return TrainData(usable(train, True), usable(val, False), train.num_classes, train.class_names, train.num_images)
