"""The scale path, measured: driver memory and image reads of an experiment run, the report over a
large heatmaps table and over a large summary table, and listing a large ImageNet-layout tree
(docs/performance.md).

    # on an idle machine, a local multi-node cluster (a head and two workers, as the cluster tests):
    ray start --head --num-cpus=0 --port=6379 && ray start --address=127.0.0.1:6379 --num-cpus=8 \\
        && ray start --address=127.0.0.1:6379 --num-cpus=8
    RAY_ADDRESS=127.0.0.1:6379 python -m bench.scale --n 1000 4000 --size 224 --classes 1000 \\
        --maps 50000 --map-size 224 --summary-images 50000 --files 100000 --work /tmp/scale \\
        --csv bench/out/scale.csv
    # a quick check that it works (minutes, on a busy machine):
    python -m bench.scale --n 16 32 --size 64 --classes 4 --maps 64 --map-size 64 --summary-images 100 --files 2000 \\
        --work /tmp/scale-tiny
    # one measurement only (experiment, report, summary, listing), with experiment-config overrides first:
    RAY_ADDRESS=127.0.0.1:6379 python -m bench.scale compute.actor_pool_size=2 compute.fast=true \\
        --only experiment --n 1000 4000 --work /tmp/scale --csv bench/out/scale-experiment.csv

Each measurement runs in a fresh subprocess (``--measure``) that prints its own peak RSS
(``VmHWM``, see :func:`peak_rss_mb`) and how far the measured call raised it above the
imports' (``rss_growth_mb``) as JSON, so one measurement's memory never counts towards another's:

* ``experiment``: predictions plus full-resolution heatmaps of ``bagnet33_small`` and
  ``resnet_small`` over N images of a generated tree (``--classes`` class folders of JPEGs made by
  the synthetic generator, plus a corrupt, a zero-byte and a text file): driver peak RSS, images
  read (goal: N + 3, not (N + 3) x models), rows written = images evaluated, every bad file in
  the failures table;
* ``report``: ``analysis.report`` over a results tree whose heatmaps table holds ``--maps`` maps of
  ``--map-size``\\ :sup:`2` float32 (written by a generator, not by a model): peak RSS and time;
* ``summary report``: ``analysis.report`` over a results tree whose ``shuffle`` table holds
  ``--summary-images`` x 7 models x 6 tiles x 3 permutations rows (the ImageNet config's shuffle
  experiment; 6.3 M rows for 50,000 images): peak RSS and time (the section aggregates in the scan);
* ``listing``: describing a split of ``--files`` tiny files, as a list of dicts (the listing before
  this change) and as the Arrow table the image reader now lists with one thread per class folder: time and
  peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from analysis.report import build_report
from bagnet.config import dump_yaml, load_config, to_dict
from bagnet.experiments import heatmaps as heatmap_experiment
from bagnet.experiments import shuffle as shuffle_experiment
from bagnet.models import model_q
from bagnet.imagenet import ImageFolderIndex
from bagnet.synthetic import SyntheticWorld
from bench.harness import Table, machine_info, peak_rss_mb
from cluster import evaluation
from cluster.configs import ExperimentJobConfig
from cluster.images import describe
from store import catalog, results, storage

BAD_FILES = {"corrupt.JPEG": b"\xff\xd8\xff\xe0 truncated", "empty.JPEG": b"", "text.JPEG": b"not an image"}


def measured(fn, *args) -> dict:
    """``fn(*args)``'s result with ``peak_rss_mb`` (the process's peak) and ``rss_growth_mb`` (how
    far the measured call raised it above the peak of the imports before it)."""
    before = peak_rss_mb()
    out = fn(*args)
    return {**out, "peak_rss_mb": peak_rss_mb(), "rss_growth_mb": peak_rss_mb() - before}


def class_name(c: int) -> str:
    return f"n{c:08d}"


def make_tree(root: Path, n: int, size: int, classes: int) -> None:
    """``root/val/<class>/<i>.JPEG``: n synthetic images spread over the class folders, plus BAD_FILES."""
    world = SyntheticWorld(seed=0, image_size=size)
    for i in range(n):
        folder = root / "val" / class_name(i % classes)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(world.sample(i, "val").image).save(folder / f"{i:07d}.JPEG", quality=90)
    for name, data in BAD_FILES.items():
        (root / "val" / class_name(0) / name).write_bytes(data)


def measure_experiment(root: str, out: str, n: int, size: int, overrides: Sequence[str] = ()) -> dict:
    cfg = load_config(ExperimentJobConfig, None, [
        f"output={out}", f"run_id=n{n}", "data.dataset=imagenet", f"data.root={root}", "split=val",
        f"data.image_size={size}", f"data.resize={size}", "experiments.heatmaps={resolution: full}",
        "models=[{name: bagnet33_small}, {name: resnet_small}]", *overrides])
    if storage.exists(storage.join(out, f"n{n}")):
        storage.delete(storage.join(out, f"n{n}"))  # measure a full run, not a resumed one
    start = time.perf_counter()
    summary = evaluation.run_plan(evaluation.make_plan(cfg, ["predictions", "heatmaps"], None))
    run = next(r for r in catalog.discover(out).runs if r.name == f"n{n}")
    failed = set(catalog.read_table(run, results.FAILURES_TABLE, ["path"])["path"].to_pylist())
    evaluated = sum(m["images"] for m in results.completed_parts(summary["run_dir"]).values() if "images" in m)
    return {"seconds": time.perf_counter() - start, "images_read": summary["reads"]["images"],
            "file_reads": summary["reads"]["reads"],
            "rows_written": sum(summary["rows"].values()), "images_evaluated": evaluated,
            "bad_files_in_failures": sum(any(p.endswith(b) for p in failed) for b in BAD_FILES)}


def make_heatmaps_run(out: Path, maps: int, size: int, chunk: int = 500) -> None:
    """A complete run whose heatmaps table holds ``maps`` random maps, written part file by part file."""
    world = SyntheticWorld(seed=0, image_size=size)
    cfg = load_config(ExperimentJobConfig, None, [f"output={out}", "run_id=big", f"data.image_size={size}",
                                                  "models=[{name: bagnet33_small}]"])
    run_dir = str(out / "big")
    part = results.part_dir(run_dir, heatmap_experiment.TABLE, {"experiment": "heatmaps", "model": "bagnet33_small"})
    common = {"run_id": "big", "q": 33, "weights": "random", "dataset": "synthetic", "split": "test", "seed": 0,
              "precision": "fp32", "code_version": results.code_version(), "created_at": results.utc_now()}
    rng = np.random.default_rng(0)
    files = []
    for start in range(0, maps, chunk):
        rows = []
        for i in range(start, min(maps, start + chunk)):
            values = rng.standard_normal((size, size), dtype=np.float32)
            rows.append({"image_id": world.image_id(i, "test"), "label": i % world.num_classes,
                         "target": i % world.num_classes, "height": size, "width": size, "values": values.ravel(),
                         "resolution": "full", "stride": 1, "origin": 0, **heatmap_experiment.summarize(values)})
        table = results.rows_to_table(rows, common, heatmap_experiment.SCHEMA, experiment="heatmaps")
        files.append(results.write_part_file(part, table))
    results.commit_part(part, files, {"fingerprint": {}})
    storage.write_text_atomic(storage.join(run_dir, results.CONFIG_FILE), dump_yaml(cfg))
    results.write_manifest(run_dir, {"run_id": "big", "complete": True, "experiments": ["heatmaps"],
                                     "config": to_dict(cfg), "created_at": results.now_iso(),
                                     "rows_per_table": results.rows_per_table(results.completed_parts(run_dir))})


MEASUREMENTS = ("experiment", "report", "summary", "listing")
SUMMARY_MODELS = ("bagnet9_small", "bagnet17_small", "bagnet33_small", "resnet_small", "vgg_small", "densenet_small",
                  "resnet18")  # 7 models, as the ImageNet config
SUMMARY_TILES = (8, 16, 32, 56, 112, 224)


def make_shuffle_run(out: Path, images: int, perms: int = 3) -> None:
    """A complete run whose ``shuffle`` table holds ``images`` x models x tiles x ``perms`` rows of
    random values, one part per model (written as Arrow columns, one file per 1,000 images)."""
    cfg = load_config(ExperimentJobConfig, None, [f"output={out}", "run_id=summary", "data.image_size=224",
                                                  "models=[{name: resnet_small}]"])
    run_dir = str(out / "summary")
    schema = results.table_schema(shuffle_experiment.SCHEMA)
    per_image = len(SUMMARY_TILES) * perms
    rng = np.random.default_rng(0)
    for model in SUMMARY_MODELS:
        part = results.part_dir(run_dir, shuffle_experiment.TABLE, {"experiment": "shuffle", "model": model})
        files = []
        for start in range(0, images, 1000):
            ids = np.arange(start, min(images, start + 1000))
            n = len(ids) * per_image
            logits = rng.standard_normal(n)
            columns = {"run_id": ["summary"] * n, "q": [model_q(model)] * n, "weights": ["random"] * n,
                       "dataset": ["imagenet"] * n, "split": ["val"] * n,
                       "image_id": [f"val/n{i % 1000:08d}/{i:07d}.JPEG" for i in np.repeat(ids, per_image)],
                       "label": np.repeat(ids % 1000, per_image), "seed": np.zeros(n, np.int64),
                       "precision": ["fp32"] * n, "created_at": [results.utc_now()] * n,
                       "code_version": [results.code_version()] * n,
                       "tile": np.tile(np.repeat(SUMMARY_TILES, perms), len(ids)),
                       "perm_seed": np.tile(np.arange(perms), n // perms),
                       "correct_top1": rng.random(n) < 0.5, "correct_top5": rng.random(n) < 0.8,
                       "label_logit": logits, "label_logit_delta": logits - 1.0}
            files.append(results.write_part_file(part, pa.table(columns, schema=schema)))
        results.commit_part(part, files, {"fingerprint": {}})
    storage.write_text_atomic(storage.join(run_dir, results.CONFIG_FILE), dump_yaml(cfg))
    results.write_manifest(run_dir, {"run_id": "summary", "complete": True, "experiments": ["shuffle"],
                                     "config": to_dict(cfg), "created_at": results.now_iso(),
                                     "rows_per_table": results.rows_per_table(results.completed_parts(run_dir))})


def measure_report(results_dir: str, out: str) -> dict:
    start = time.perf_counter()
    build_report(results_dir, out)
    return {"seconds": time.perf_counter() - start}


def measure_listing(root: str, mode: str) -> dict:
    start = time.perf_counter()
    cfg = load_config(ExperimentJobConfig, None, ["data.dataset=imagenet", f"data.root={root}", "split=val",
                                                  "models=[{name: resnet_small}]"])
    if mode == "dicts":  # the listing before: one Python dict per file in the driver
        index = ImageFolderIndex(storage.resolve(root), "val")
        prefix = storage.resolve(index.path).rstrip("/") + "/"
        items = [{"path": p, "label": y, "image_id": f"val/{p.removeprefix(prefix)}"} for p, y in index.samples]
        count = len(items)
    else:
        count = describe(cfg.data, "val").num_images
    return {"seconds": time.perf_counter() - start, "files": count}


def run_measure(*args: str) -> dict:
    """One ``--measure`` in a fresh process; its JSON line."""
    out = subprocess.run([sys.executable, "-m", "bench.scale", "--measure", *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"bench.scale --measure {' '.join(args)} failed:\n"
                           f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> Table:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1000, 4000], help="images per experiment run")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--maps", type=int, default=50_000, help="heatmaps in the report's table")
    p.add_argument("--map-size", type=int, default=224)
    p.add_argument("--summary-images", type=int, default=50_000, help="images of the summary report's shuffle table")
    p.add_argument("--files", type=int, default=100_000, help="files in the listed tree")
    p.add_argument("--work", default="/tmp/bench-scale", help="folder for the generated trees and results")
    p.add_argument("--csv", default="bench/out/scale.csv")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="experiment-config overrides of the experiment measurement, e.g. compute.actor_pool_size=2")
    p.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS),
                   help="the measurements to run (default: all)")
    p.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure:
        kind, *rest = a.measure
        fn = {"experiment": lambda r, o, n, s, *extra: measure_experiment(r, o, int(n), int(s), extra),
              "report": measure_report, "listing": measure_listing}[kind]
        print(json.dumps(measured(fn, *rest)))
        return Table([])
    work = Path(a.work)
    table = Table(["measurement", "n", "seconds", "peak_rss_mb", "rss_growth_mb", "images_read", "file_reads",
                   "rows_written", "images_evaluated", "bad_in_failures"], info=machine_info())
    if "experiment" in a.only:
        measure_experiments_at_scale(table, work, a.n, a.size, a.classes, a.overrides)
    if "report" in a.only:
        measure_report_at_scale(table, work, a.maps, a.map_size)
    if "summary" in a.only:
        measure_summary_at_scale(table, work, a.summary_images)
    if "listing" in a.only:
        measure_listing_at_scale(table, work, a.files, a.classes)
    table.write_csv(a.csv)
    return table


def measure_experiments_at_scale(table: Table, work: Path, ns: Sequence[int], size: int, classes: int,
                                 overrides: Sequence[str]) -> None:
    for n in ns:
        root = work / f"tree-{n}"
        if not (root / "val").exists():
            make_tree(root, n, size, classes)
        m = run_measure("experiment", str(root), str(work / "results"), str(n), str(size), *overrides)
        table.add(measurement="experiment", n=n, seconds=m["seconds"], peak_rss_mb=m["peak_rss_mb"],
                  rss_growth_mb=m["rss_growth_mb"], images_read=m["images_read"], file_reads=m["file_reads"],
                  rows_written=m["rows_written"],
                  images_evaluated=m["images_evaluated"], bad_in_failures=m["bad_files_in_failures"])


def measure_report_at_scale(table: Table, work: Path, maps: int, map_size: int) -> None:
    big = work / "heatmaps"
    if not (big / "big" / results.MARKER).exists():
        make_heatmaps_run(big, maps, map_size)
    m = run_measure("report", str(big), str(work / "report"))
    table.add(measurement="report", n=maps, seconds=m["seconds"], peak_rss_mb=m["peak_rss_mb"],
              rss_growth_mb=m["rss_growth_mb"])


def measure_summary_at_scale(table: Table, work: Path, images: int) -> None:
    summary = work / f"summary-{images}"
    if not (summary / "summary" / results.MARKER).exists():
        make_shuffle_run(summary, images)
    m = run_measure("report", str(summary), str(work / "summary-report"))
    rows = images * len(SUMMARY_MODELS) * len(SUMMARY_TILES) * 3
    table.add(measurement="summary report", n=rows, seconds=m["seconds"], peak_rss_mb=m["peak_rss_mb"],
              rss_growth_mb=m["rss_growth_mb"])


def measure_listing_at_scale(table: Table, work: Path, files: int, classes: int) -> None:
    tree = work / f"listing-{files}"
    if not (tree / "val").exists():
        for i in range(files):
            folder = tree / "val" / class_name(i % classes)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:07d}.JPEG").write_bytes(b"x")
    for mode in ("dicts", "parallel"):
        m = run_measure("listing", str(tree), mode)
        table.add(measurement=f"listing ({mode})", n=m["files"], seconds=m["seconds"],
                  peak_rss_mb=m["peak_rss_mb"], rss_growth_mb=m["rss_growth_mb"])


if __name__ == "__main__":
    main()
