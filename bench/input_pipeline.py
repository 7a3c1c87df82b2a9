"""Training input pipeline images/s against what the model consumes in training.

Sources, each timed in this process (one core) and through Ray Data (``cluster.images
.train_datasets``, iterated with ``ds.iter_batches`` as a Train worker would), steady state: the
clock starts at the first batch, so Ray's worker start-up is reported apart (``startup_s``):
- ``synthetic``: ``SyntheticWorld.batch`` at ``--synthetic-size`` (64) px;
- ``jpeg``: a temporary ImageNet-layout folder of JPEGs written with ``bagnet.synthetic.materialize``
  at ``--jpeg-size`` (224) px, read, decoded and ``train_transform``-ed (RandomResizedCrop + flip).
The consumer of each is the training step of ``--synthetic-model`` / ``--jpeg-model``
(``bench.throughput.train_images_per_s``); ``ratio`` = pipeline images/s / training images/s.

    python -m bench.input_pipeline
    python -m bench.input_pipeline --quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterable, Sequence

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bagnet import imagenet, synthetic
from bench.harness import Table, machine_info
from bench.throughput import train_images_per_s, write_csv
from cluster.configs import DataConfig
from cluster.images import train_datasets
from cluster.ray_env import init_ray

COLUMNS = ["source", "size", "where", "images", "seconds", "startup_s", "images_per_s",
           "consumer", "consumer_batch", "train_images_per_s", "ratio"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.input_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic-size", type=int, default=64)
    p.add_argument("--synthetic-images", type=int, default=None, help="default 4096 (--quick 256)")
    p.add_argument("--synthetic-model", default="bagnet33_small", help="consumer of synthetic images")
    p.add_argument("--jpeg-size", type=int, default=224)
    p.add_argument("--jpeg-images", type=int, default=None, help="default 512 (--quick 64)")
    p.add_argument("--jpeg-model", default="bagnet33", help="consumer of the decoded JPEGs")
    p.add_argument("--batch", type=int, default=None, help="pipeline and training batch (default 64; --quick 8)")
    p.add_argument("--jpeg-train-batch", type=int, default=None,
                   help="training batch of the JPEG consumer (default 8; --quick 2)")
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs (default: all cores)")
    p.add_argument("--repeat", type=int, default=None, help="timed training steps (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: few images, one training step")
    p.add_argument("--no-ray", action="store_true", help="in-process rows only")
    p.add_argument("--out", default="bench/out/input_pipeline.csv")
    a = p.parse_args(argv)
    a.synthetic_images = a.synthetic_images or (256 if a.quick else 4096)
    a.jpeg_images = a.jpeg_images or (64 if a.quick else 512)
    a.batch = a.batch or (8 if a.quick else 64)
    a.repeat = a.repeat or (1 if a.quick else 3)
    a.jpeg_train_batch = a.jpeg_train_batch or (2 if a.quick else 8)
    return a


def time_batches(batches: Iterable, count) -> tuple[int, float, float]:
    """(images, seconds after the first batch, seconds to the first batch) of an iterator."""
    start = time.perf_counter()
    first_at, images, first_n = None, 0, 0
    for batch in batches:
        n = count(batch)
        if first_at is None:
            first_at, first_n = time.perf_counter(), n
        images += n
    end = time.perf_counter()
    if first_at is None:
        return 0, 0.0, end - start
    # the first batch's images are not in the steady-state window
    return images - first_n, end - first_at, first_at - start


def synthetic_in_process(size: int, n: int, batch: int) -> tuple[int, float]:
    world = synthetic.SyntheticWorld(seed=0, image_size=size)
    start = time.perf_counter()
    for s in range(0, n, batch):
        world.batch(range(s, min(s + batch, n)), "train")
    return n, time.perf_counter() - start


def jpeg_in_process(root: str, size: int, n: int) -> tuple[int, float]:
    index = imagenet.ImageFolderIndex(root, "train")
    transform = imagenet.train_transform(size, seed=0)
    n = min(n, len(index))
    start = time.perf_counter()
    for i in range(n):
        transform(imagenet.decode_rgb(index.read(i), str(i)))
    return n, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> Table:
    a = parse_args(argv)
    info = machine_info("cpu", "fp32", batch_size=a.batch)
    print(f"input pipeline on {info['device']} ({info['cores']} cores, load {info['load_avg_1m']}); "
          f"synthetic {a.synthetic_images} x {a.synthetic_size} px, JPEG {a.jpeg_images} x {a.jpeg_size} px", flush=True)
    table = Table(COLUMNS, info, width=12)
    consumers = {}
    print(f"training rate of {a.synthetic_model} at {a.synthetic_size} px, batch {a.batch} ...", flush=True)
    consumers["synthetic"] = (a.synthetic_model, a.batch, train_images_per_s(
        a.synthetic_model, a.synthetic_size, a.batch, repeat=a.repeat,
        num_classes=synthetic.SyntheticWorld(image_size=a.synthetic_size).num_classes))
    jpeg_batch = a.jpeg_train_batch
    print(f"training rate of {a.jpeg_model} at {a.jpeg_size} px, batch {jpeg_batch} ...", flush=True)
    consumers["jpeg"] = (a.jpeg_model, jpeg_batch, train_images_per_s(
        a.jpeg_model, a.jpeg_size, jpeg_batch, repeat=a.repeat, num_classes=1000))

    def add(source: str, size: int, where: str, images: int, seconds: float, startup: float = 0.0) -> None:
        model, batch, rate = consumers[source]
        ips = images / max(seconds, 1e-9)
        table.add(source=source, size=size, where=where, images=images, seconds=seconds, startup_s=startup,
                  images_per_s=ips, consumer=model, consumer_batch=batch, train_images_per_s=rate,
                  ratio=ips / rate)

    with tempfile.TemporaryDirectory(prefix="bench-jpeg-") as root:
        world = synthetic.SyntheticWorld(seed=0, image_size=a.jpeg_size)
        t = time.perf_counter()
        synthetic.materialize(world, root, "train", n=a.jpeg_images, ext="jpg")
        synthetic.materialize(world, root, "val", n=max(a.jpeg_images // 8, world.num_classes), ext="jpg")
        print(f"wrote {a.jpeg_images} JPEGs ({a.jpeg_size} px) to {root} in {time.perf_counter() - t:.1f} s", flush=True)

        add("synthetic", a.synthetic_size, "process", *synthetic_in_process(a.synthetic_size, a.synthetic_images, a.batch))
        add("jpeg", a.jpeg_size, "process", *jpeg_in_process(root, a.jpeg_size, a.jpeg_images))
        write_csv(table, a.out)  # the in-process rows survive a Ray failure
        if not a.no_ray:
            resources = init_ray(num_cpus=a.num_cpus)
            where = f"ray_data_{int(resources.get('CPU', 0))}cpu"
            count = lambda b: len(b["label"])  # noqa: E731
            syn = train_datasets(DataConfig(dataset="synthetic", image_size=a.synthetic_size,
                                            train_size=a.synthetic_images, val_size=16))
            n, secs, startup = time_batches(syn.train.iter_batches(batch_size=a.batch, batch_format="numpy"), count)
            add("synthetic", a.synthetic_size, where, n, secs, startup)
            jpg = train_datasets(DataConfig(dataset="imagenet", root=root, image_size=a.jpeg_size))
            n, secs, startup = time_batches(jpg.train.iter_batches(batch_size=a.batch, batch_format="numpy"), count)
            add("jpeg", a.jpeg_size, where, n, secs, startup)
    write_csv(table, a.out)
    return table


if __name__ == "__main__":
    main()
