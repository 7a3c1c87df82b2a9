"""Small, realistic fake result tables following DESIGN.md's schemas, for the report tests.

    python tests/make_tables.py /tmp/fake-results      # then: python -m analysis.report --results /tmp/fake-results

Layout written (what ``jobs/experiment.py`` / ``train.py`` / ``tune.py`` are assumed to write):

    <root>/experiments/<run_id>/<table>/experiment=<e>/model=<m>/part-00000.parquet + _SUCCESS (part marker)
    <root>/experiments/<run_id>/_SUCCESS                                               (JSON run manifest)
    <root>/train/<run_name>/metrics.parquet, config.yaml, model.pt
    <root>/tune/<sweep>/tune_trials.parquet
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

# accuracy of each model on the fake predictions; resnet_small and vgg_small are right and wrong
# on exactly the same images (their kappa is 1)
ACCURACY = {"bagnet9_small": 0.45, "bagnet33_small": 0.8, "resnet_small": 0.7, "vgg_small": 0.7}
Q = {"bagnet9_small": 9, "bagnet17_small": 17, "bagnet33_small": 33, "resnet_small": None, "vgg_small": None}
NUM_CLASSES = 10  # the default SyntheticWorld: 4 local + 3 scales x 2 arrangement classes
N_IMAGES = 40


def image_ids(n: int = N_IMAGES) -> list[str]:
    return [f"synthetic/val/{i:06d}" for i in range(n)]


def common(run_id: str, experiment: str, model: str, n: int, image_id: list[str], label: list[int]) -> dict:
    return {"run_id": [run_id] * n, "experiment": [experiment] * n, "model": [model] * n, "q": [Q[model]] * n,
            "weights": [f"results/train/{model}/model.pt"] * n, "dataset": ["synthetic"] * n, "split": ["val"] * n,
            "image_id": image_id, "label": label, "seed": [0] * n, "precision": ["fp32"] * n,
            "created_at": [pd.Timestamp("2025-01-02 03:04:05", tz="UTC")] * n, "code_version": ["abc1234"] * n}


def correct_vector(model: str, n: int = N_IMAGES) -> np.ndarray:
    """Deterministic correctness: the first ``round(acc * n)`` images of a fixed permutation."""
    key = "resnet_small" if model == "vgg_small" else model
    order = np.random.default_rng(sum(map(ord, key))).permutation(n)
    correct = np.zeros(n, bool)
    correct[order[: round(ACCURACY[model] * n)]] = True
    return correct


def predictions(run_id: str, models=tuple(ACCURACY)) -> pd.DataFrame:
    frames = []
    ids = image_ids()
    labels = [i % NUM_CLASSES for i in range(N_IMAGES)]
    for m in models:
        c1 = correct_vector(m)
        c5 = c1 | (np.arange(N_IMAGES) % 3 == 0)
        top5 = [[y, *[(y + k) % NUM_CLASSES for k in range(1, 5)]] if ok else [(y + k) % NUM_CLASSES for k in range(1, 6)]
                for y, ok in zip(labels, c1)]
        frames.append(pd.DataFrame({**common(run_id, "predictions", m, N_IMAGES, ids, labels), "pred_top5": top5,
                                    "correct_top1": c1, "correct_top5": c5, "label_logit": np.where(c1, 5.0, 1.0),
                                    "max_logit": np.full(N_IMAGES, 5.0)}))
    return pd.concat(frames, ignore_index=True)


def shuffle(run_id: str, models=tuple(ACCURACY), tiles=(8, 16, 32, 64)) -> pd.DataFrame:
    rows = []
    ids = image_ids(10)
    for m in models:
        for tile in tiles:
            # BagNets do not care about tiles larger than q; CNNs lose accuracy as tiles shrink
            acc = ACCURACY[m] if Q[m] and tile >= Q[m] else ACCURACY[m] * tile / 64
            for i, image_id in enumerate(ids):
                ok = i < round(acc * len(ids))
                rows.append({**{k: v[0] for k, v in common(run_id, "shuffle", m, 1, [image_id], [i % NUM_CLASSES]).items()},
                             "tile": tile, "perm_seed": 0, "correct_top1": ok, "correct_top5": ok or i % 2 == 0,
                             "label_logit": 3.0 * acc, "label_logit_delta": -3.0 * (ACCURACY[m] - acc)})
    return pd.DataFrame(rows)


def interaction(run_id: str, models=tuple(ACCURACY), distances=(8, 16, 24, 32, 40, 48)) -> pd.DataFrame:
    rows = []
    for m in models:
        for d in distances:
            # BagNets: no interaction between regions farther apart than q
            inter = 0.0 if Q[m] and d > Q[m] else 0.5 / (1 + d / 16)
            for i, image_id in enumerate(image_ids(4)):
                sign = -1 if i == 3 else 1
                rows.append({**{k: v[0] for k, v in common(run_id, "interaction", m, 1, [image_id], [i]).items()},
                             "patch_size": 8, "a_y": 8, "a_x": 8, "b_y": 8, "b_x": 8 + d, "distance": float(d),
                             "delta_a": -1.0, "delta_b": -1.0, "delta_ab": -2.0 + sign * inter, "interaction": sign * inter})
    return pd.DataFrame(rows)


def masking(run_id: str, models=tuple(ACCURACY), rankings=("bagnet", "random"), ks=(0, 1, 2, 4, 8)) -> pd.DataFrame:
    rows = []
    for m in models:
        for ranking in rankings:
            slope = 1.0 if ranking == "bagnet" else 0.2
            for k in ks:
                for i, image_id in enumerate(image_ids(5)):
                    logit = 5.0 - slope * k
                    rows.append({**{kk: v[0] for kk, v in common(run_id, "masking", m, 1, [image_id], [i]).items()},
                                 "ranking": ranking, "k_masked": k, "label_logit": logit, "label_logit_delta": logit - 5.0,
                                 "correct_top5": logit > 2.0 or i == 0})
    return pd.DataFrame(rows)


def heatmaps(run_id: str, models=("bagnet9_small", "bagnet33_small"), n: int = 20) -> pd.DataFrame:
    """bagnet9_small: coarse 7x7 maps; bagnet33_small: full-resolution 64x64 maps (columns of
    bagnet/experiments/heatmaps.py: entry (i, j) centred on pixel origin + stride * (i, j))."""
    rows = []
    for m in models:
        h = 7 if m == "bagnet9_small" else 64
        for i, image_id in enumerate(image_ids(n)):
            rng = np.random.default_rng(i)
            values = rng.normal(0, 0.1, (h, h)).astype(np.float32)
            values[(i * 3) % h, (i * 5) % h] = 2.0 + i  # one clear peak
            rows.append({**{k: v[0] for k, v in common(run_id, "heatmaps", m, 1, [image_id], [i % NUM_CLASSES]).items()},
                         "target": i % NUM_CLASSES, "height": h, "width": h, "values": values.ravel().tolist(),
                         "resolution": "coarse" if h == 7 else "full", "stride": 8 if h == 7 else 1,
                         "origin": 4 if h == 7 else 0})
    df = pd.DataFrame(rows)
    return df


TABLES = {"predictions": predictions, "shuffle": shuffle, "interaction": interaction, "masking": masking, "heatmaps": heatmaps}


def write_run(root: Path, run_id: str, tables: dict[str, pd.DataFrame], complete: bool = True,
              uncommitted: tuple[str, ...] = ()) -> Path:
    """One experiment run folder as ``cluster/results.py`` writes it: one part per
    (table, experiment, model) with its marker, then the ``_SUCCESS`` run manifest (unless
    ``complete`` is False). Models in ``uncommitted`` get their files but no part marker."""
    from store import results

    run_dir = str(root / run_id)
    for name, df in tables.items():
        for (experiment, model), sub in df.groupby(["experiment", "model"], sort=False):
            records = sub.astype(object).where(sub.notna(), None).to_dict("records")
            for r in records:
                r["q"] = None if r["q"] is None else int(r["q"])
            table = results.rows_to_table(records, {})
            if name == "heatmaps":
                i = table.column_names.index("values")
                table = table.set_column(i, "values", table.column("values").cast(pa.list_(pa.float32())))
            writer = results.PartWriter(results.part_dir(run_dir, name, {"experiment": experiment, "model": model}))
            writer.write(table)
            if model in uncommitted:
                writer.flush()
            else:
                writer.commit({"table": name})
    if complete:
        parts = results.completed_parts(run_dir)
        results.write_manifest(run_dir, {
            "run_id": run_id, "complete": True, "experiments": sorted(tables), "created_at": "2025-01-02T03:04:05+00:00",
            "code_version": "abc1234", "rows_per_table": results.rows_per_table(parts), "parts": parts,
            "config": {"dataset": {"name": "synthetic", "split": "val", "size": N_IMAGES, "seed": 0, "image_size": 64}}})
    return Path(run_dir)


def write_train_run(root: Path, name: str, model: str, top1: list[float], complete: bool = True) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(top1)
    per_class = [[min(1.0, t + 0.05 * (c % 3)) for c in range(NUM_CLASSES)] for t in top1]
    metrics = pd.DataFrame({"epoch": range(n), "train_loss": np.linspace(2.0, 0.5, n), "train_top1": top1,
                            "train_top5": [min(1.0, t + 0.2) for t in top1], "val_loss": np.linspace(2.1, 0.6, n),
                            "val_top1": top1, "val_top5": [min(1.0, t + 0.15) for t in top1],
                            "val_top1_per_class": per_class, "lr": np.linspace(0.1, 0.0, n), "epoch_seconds": 10.0,
                            "images_per_s": 400.0, "world_size": 2, "finished_at": time.time() - np.arange(n)[::-1] * 10.0})
    pq.write_table(pa.Table.from_pandas(metrics, preserve_index=False), run_dir / "metrics.parquet")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name": model, "weights": None, "aligned": False},
        "data": {"dataset": "synthetic", "image_size": 64, "train_size": 4096, "val_size": 1024, "seed": 0},
        "optim": {"epochs": n, "lr": 0.4}}))
    if complete:
        (run_dir / "model.pt").write_bytes(b"weights")
    return run_dir


def write_tune_run(root: Path, name: str = "sweep") -> Path:
    """``tune_trials.parquet`` with jobs/tune.py's columns (search-space keys with ``.`` -> ``_``)."""
    run_dir = root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    models = ["bagnet9_small", "bagnet9_small", "bagnet17_small", "bagnet33_small"]
    trials = pd.DataFrame({
        "run_id": name, "trial_id": ["t0", "t1", "t2", "t3"], "status": "TERMINATED", "error": None,
        "model": models, "q": [Q[m] for m in models], "dataset": "synthetic", "seed": 0,
        "model_name": models, "optim_lr": [0.05, 0.4, 0.4, 0.4], "epochs": [2, 4, 4, 4], "max_epochs": 4,
        "stopped_early": [True, False, False, False],
        "val_top1_last": [0.30, 0.40, 0.55, 0.70], "val_top1_best": [0.32, 0.42, 0.56, 0.72],
        "val_top5_last": [0.7, 0.8, 0.85, 0.95], "val_top5_best": [0.71, 0.81, 0.86, 0.96],
        "checkpoint_path": [f"{run_dir}/t{i}/checkpoint_000003" for i in range(4)],
        "train_run": [f"{run_dir}/train/t{i}" for i in range(4)], "trial_dir": [f"{run_dir}/t{i}" for i in range(4)],
        "created_at": time.time()})
    pq.write_table(pa.Table.from_pandas(trials, preserve_index=False), run_dir / "tune_trials.parquet")
    return run_dir


def make_results(root: str | Path) -> dict:
    """The full scenario the tests use; returns the generated frames for checking the numbers.

    * ``experiments/run-old``: complete, older, predictions only (must lose to run-new).
    * ``experiments/run-new``: complete, every table, and a gallery PNG of the heatmap job.
    * ``experiments/run-partial``: NO _SUCCESS, newest, predictions with every model at accuracy 0
      except bagnet33_small at 1, whose part is unfinished (no part marker): the run must not
      appear in the report, and with include_incomplete its unfinished part must not either.
    """
    root = Path(root)
    exp = root / "experiments"
    old = write_run(exp, "run-old", {"predictions": predictions("run-old", models=("bagnet9_small",))})
    frames = {name: make("run-new") for name, make in TABLES.items()}
    new = write_run(exp, "run-new", frames)
    import matplotlib.image as mpimg

    mpimg.imsave(new / "heatmaps" / "gallery.png", np.random.default_rng(0).random((24, 32, 3)))  # the job's own
    partial = predictions("run-partial")
    partial["correct_top1"] = False
    partial.loc[partial["model"] == "bagnet33_small", "correct_top1"] = True
    write_run(exp, "run-partial", {"predictions": partial}, complete=False, uncommitted=("bagnet33_small",))
    for i, d in enumerate((old, new)):  # manifests: old before new
        os.utime(d / "_SUCCESS", (1_700_000_000 + i * 1000, 1_700_000_000 + i * 1000))
    train = {"bagnet9_small": [0.2, 0.3, 0.4], "bagnet33_small": [0.3, 0.5, 0.7], "resnet_small": [0.3, 0.6, 0.75]}
    for model, top1 in train.items():
        write_train_run(root / "train", model, model, top1)
    write_train_run(root / "train", "bagnet17_small-crashed", "bagnet17_small", [0.1], complete=False)
    write_tune_run(root / "tune")
    return {"frames": frames, "train": train, "partial": partial}


def fake_report(tmp_path_factory) -> dict:
    """The scenario of :func:`make_results` and its report, built once per pytest session
    (shared by the test modules through the session's base temp folder)."""
    base = tmp_path_factory.getbasetemp() / "fake-report"
    done = base / "built.json"
    if not done.exists():
        from analysis.report import build_report

        make_results(base / "results")
        index = build_report(str(base / "results"), str(base / "report"))
        done.write_text(str(index))
    index = Path(done.read_text())
    return {"results": base / "results", "index": index, "md": (index.parent / "report.md").read_text(),
            "html": index.read_text()}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    make_results(sys.argv[1])
    print(f"wrote fake results under {sys.argv[1]}")
