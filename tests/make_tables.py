"""Small result tables for the report tests, written by the producers' own code.

    python tests/make_tables.py /tmp/fake-results      # then: python -m analysis.report --results /tmp/fake-results

The rows are made up (numbers chosen so the tests can check them), everything else is what the
jobs write: experiment rows become tables through ``store.results.rows_to_table`` with each
experiment's ``SCHEMA``, parts through ``PartWriter`` with their markers, and the run manifest
(with the run's ``ExperimentJobConfig``) through ``write_manifest``; training runs hold the
``config.yaml``, ``metrics.parquet`` (``cluster.training.write_metrics``) and ``model.pt``
(``bagnet.models.model_bytes``) of ``cluster.training``; a sweep holds the trial table of
``cluster.sweep.trial_table``. Layout:

    <root>/experiments/<run_id>/<table>/experiment=<e>/model=<m>/part-00000.parquet + _SUCCESS (part marker)
    <root>/experiments/<run_id>/config.yaml, _SUCCESS (JSON run manifest)
    <root>/train/<run_name>/config.yaml, metrics.parquet, model.pt
    <root>/tune/<sweep>/tune_trials.parquet
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.report import build_report
from bagnet.config import dump_yaml, to_dict
from bagnet.experiments import EXPERIMENTS
from bagnet.experiments import heatmaps as heatmap_experiment
from bagnet.models import create_model, model_bytes, model_q
from bagnet.training import OptimConfig
from cluster import sweep as sweeps
from cluster import training
from cluster.configs import DataConfig, ExperimentJobConfig, ModelConfig, RunConfig, TrainJobConfig
from store import results, storage
from store.schemas import METRICS, TUNE_FILE

# accuracy of each model on the fake predictions; resnet_small and vgg_small are right and wrong
# on exactly the same images (their kappa is 1)
ACCURACY = {"bagnet9_small": 0.45, "bagnet33_small": 0.8, "resnet_small": 0.7, "vgg_small": 0.7}
DATA = DataConfig()  # the default synthetic world: 64 px, seed 0, 10 classes (4 local + 3 scales x 2 arrangements)
SPLIT = "val"
NUM_CLASSES = DATA.world().num_classes
N_IMAGES = 40
CODE_VERSION = "abc1234"
CREATED = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def image_ids(n: int = N_IMAGES) -> list[str]:
    world = DATA.world()
    return [world.image_id(i, SPLIT) for i in range(n)]


def correct_vector(model: str, n: int = N_IMAGES) -> np.ndarray:
    """Deterministic correctness: the first ``round(acc * n)`` images of a fixed permutation."""
    key = "resnet_small" if model == "vgg_small" else model
    order = np.random.default_rng(sum(map(ord, key))).permutation(n)
    correct = np.zeros(n, bool)
    correct[order[: round(ACCURACY[model] * n)]] = True
    return correct


# ------------------------------------------------------------------------------------------------
# Rows: ``model`` plus each experiment's own columns, ``image_id`` and ``label``


def predictions(models: Sequence[str] = tuple(ACCURACY)) -> pd.DataFrame:
    frames = []
    labels = [i % NUM_CLASSES for i in range(N_IMAGES)]
    for m in models:
        c1 = correct_vector(m)
        top5 = [[y, *[(y + k) % NUM_CLASSES for k in range(1, 5)]] if ok else [(y + k) % NUM_CLASSES for k in range(1, 6)]
                for y, ok in zip(labels, c1)]
        frames.append(pd.DataFrame({"model": m, "image_id": image_ids(), "label": labels, "pred_top5": top5,
                                    "correct_top1": c1, "correct_top5": c1 | (np.arange(N_IMAGES) % 3 == 0),
                                    "label_logit": np.where(c1, 5.0, 1.0), "max_logit": 5.0}))
    return pd.concat(frames, ignore_index=True)


def shuffle(models: Sequence[str] = tuple(ACCURACY), tiles=(8, 16, 32, 64)) -> pd.DataFrame:
    rows = []
    for m in models:
        q = model_q(m)
        for tile in tiles:
            # BagNets do not care about tiles larger than q; CNNs lose accuracy as tiles shrink
            acc = ACCURACY[m] if q and tile >= q else ACCURACY[m] * tile / 64
            for i, image_id in enumerate(image_ids(10)):
                ok = i < round(acc * 10)
                rows.append({"model": m, "image_id": image_id, "label": i % NUM_CLASSES, "tile": tile, "perm_seed": i,
                             "correct_top1": ok, "correct_top5": ok or i % 2 == 0, "label_logit": 3.0 * acc,
                             "label_logit_delta": -3.0 * (ACCURACY[m] - acc)})
    return pd.DataFrame(rows)


def interaction(models: Sequence[str] = tuple(ACCURACY), distances=(8, 16, 24, 32, 40, 48)) -> pd.DataFrame:
    rows = []
    for m in models:
        q = model_q(m)
        for d in distances:
            inter = 0.0 if q and d > q else 0.5 / (1 + d / 16)  # BagNets: none beyond q
            for i, image_id in enumerate(image_ids(4)):
                sign = -1 if i == 3 else 1
                rows.append({"model": m, "image_id": image_id, "label": i, "patch_size": 8, "a_y": 8, "a_x": 8,
                             "b_y": 8, "b_x": 8 + d, "distance": d, "delta_a": -1.0, "delta_b": -1.0,
                             "delta_ab": -2.0 + sign * inter, "interaction": sign * inter})
    return pd.DataFrame(rows)


def masking(models: Sequence[str] = tuple(ACCURACY), rankings=("bagnet_heatmap", "random"), ks=(0, 1, 2, 4, 8)) -> pd.DataFrame:
    rows = []
    for m in models:
        for ranking in rankings:
            slope = 1.0 if ranking == "bagnet_heatmap" else 0.2
            for k in ks:
                for i, image_id in enumerate(image_ids(5)):
                    logit = 5.0 - slope * k
                    rows.append({"model": m, "image_id": image_id, "label": i, "ranking": ranking, "k_masked": k,
                                 "label_logit": logit, "label_logit_delta": logit - 5.0,
                                 "correct_top5": logit > 2.0 or i == 0})
    return pd.DataFrame(rows)


def heatmaps(models: Sequence[str] = ("bagnet9_small", "bagnet33_small"), n: int = 20) -> pd.DataFrame:
    """bagnet9_small: coarse 7x7 maps (stride 8, origin 4); bagnet33_small: full-resolution 64x64."""
    rows = []
    for m in models:
        side = 7 if m == "bagnet9_small" else DATA.image_size
        for i, image_id in enumerate(image_ids(n)):
            values = np.random.default_rng(i).normal(0, 0.1, (side, side)).astype(np.float32)
            values[(i * 3) % side, (i * 5) % side] = 2.0 + i  # one clear peak
            rows.append({"model": m, "image_id": image_id, "label": i % NUM_CLASSES, "target": i % NUM_CLASSES,
                         "height": side, "width": side, "values": values.ravel(),
                         "resolution": "coarse" if side == 7 else "full",
                         "stride": 8 if side == 7 else 1, "origin": 4 if side == 7 else 0,
                         **heatmap_experiment.summarize(values)})
    return pd.DataFrame(rows)


def localization(models: Sequence[str] = tuple(ACCURACY), methods=("integrated_gradients", "occlusion")) -> pd.DataFrame:
    """Integrated gradients on the motifs (half the energy, every maximum), occlusion mostly off them."""
    rows = []
    for m in models:
        for method in methods:
            on = method == "integrated_gradients"
            for i, image_id in enumerate(image_ids(4)):
                rows.append({"model": m, "image_id": image_id, "label": i, "method": method, "layer": "",
                             "energy_in_boxes": 0.5 if on else 0.1, "max_in_boxes": on or i == 0, "box_fraction": 0.005})
    return pd.DataFrame(rows)


def cue_conflict(models: Sequence[str] = tuple(ACCURACY)) -> pd.DataFrame:
    """BagNets follow the motifs; the CNNs follow the arrangement on every second image."""
    rows = []
    for m in models:
        for i, image_id in enumerate(image_ids(8)):
            motif, arrangement = i % 4, 4 + i % 6
            follows = model_q(m) is None and i % 2 == 0
            rows.append({"model": m, "image_id": image_id, "label": i % NUM_CLASSES, "motif_class": motif,
                         "arrangement_class": arrangement, "pair_scale": (17, 33, 48)[(i % 6) // 2],
                         "prediction": arrangement if follows else motif,
                         "decision": "arrangement" if follows else "motif"})
    return pd.DataFrame(rows)


def patch_robustness(models: Sequence[str] = ("bagnet9_small", "bagnet33_small"), patch_sizes=(4, 8),
                     defenses=("undefended", "masking")) -> pd.DataFrame:
    """Certified <= attacked <= clean on every row; masking certifies the first image of each model."""
    rows = []
    for m in models:
        for p in patch_sizes:
            for defense in defenses:
                for i, image_id in enumerate(image_ids(4)):
                    certified = defense == "masking" and i == 0
                    rows.append({"model": m, "image_id": image_id, "label": i, "patch_px": p, "defense": defense,
                                 "window_cells": 2, "prediction": i, "margin": 1.0, "certified": certified,
                                 "certified_margin": 0.5 if certified else float("-inf"), "attacked_prediction": i,
                                 "clean_correct": True, "certified_correct": certified, "attacked_correct": i < 2})
    return pd.DataFrame(rows)


TABLES = {"predictions": predictions, "shuffle": shuffle, "interaction": interaction, "masking": masking,
          "heatmaps": heatmaps, "localization": localization, "cue_conflict": cue_conflict,
          "patch_robustness": patch_robustness}


# ------------------------------------------------------------------------------------------------
# Writers


def weights_of(model: str) -> str:
    return f"results/train/{model}/model.pt"


def experiment_config(output: Path, run_id: str, tables: dict[str, pd.DataFrame]) -> ExperimentJobConfig:
    models = list(dict.fromkeys(m for df in tables.values() for m in df["model"]))
    return ExperimentJobConfig(models=[ModelConfig(name=m, weights=weights_of(m)) for m in models], data=DATA,
                               split=SPLIT, experiments={name: {} for name in tables}, output=str(output),
                               run_id=run_id)


def write_run(output: Path, run_id: str, tables: dict[str, pd.DataFrame], complete: bool = True,
              uncommitted: tuple[str, ...] = ()) -> Path:
    """One experiment run as ``cluster.evaluation`` writes it: ``config.yaml``, one part per
    (experiment, model) with its marker, then the run manifest (unless ``complete`` is False).
    Models in ``uncommitted`` get their files but no part marker. ``tables``: experiment name ->
    rows (``model`` and the experiment's columns)."""
    cfg = experiment_config(output, run_id, tables)
    run_dir = storage.join(str(output), run_id)
    storage.write_text_atomic(storage.join(run_dir, results.CONFIG_FILE), dump_yaml(cfg))
    for name, df in tables.items():
        module = EXPERIMENTS[name]
        for model, sub in df.groupby("model", sort=False):
            spec = next(m for m in cfg.models if m.name == model)
            common = {"run_id": run_id, "q": model_q(model), "weights": spec.weights_label, "dataset": cfg.data.dataset,
                      "split": cfg.split, "seed": cfg.seed, "precision": cfg.precision, "code_version": CODE_VERSION,
                      "created_at": CREATED}
            rows = sub.drop(columns="model").to_dict("records")
            writer = results.PartWriter(results.part_dir(run_dir, module.TABLE, {"experiment": name, "model": model}))
            writer.write(results.rows_to_table(rows, common, module.SCHEMA, experiment=name))
            if model in uncommitted:
                writer.flush()
                continue
            writer.commit({"fingerprint": {"data": cfg.data.fingerprint(cfg.split), "seed": cfg.seed,
                                           "precision": cfg.precision, "model": to_dict(spec), "params": {}},
                           "images": int(sub["image_id"].nunique()), "model_evals": len(sub), "seconds": 1.0,
                           "group": model, "group_seconds": 1.0, "startup_s": 0.5, "code_version": CODE_VERSION})
    if complete:
        parts = results.completed_parts(run_dir)
        results.write_manifest(run_dir, {
            "run_id": run_id, "complete": True, "experiments": list(tables), "created_at": CREATED.isoformat(),
            "code_version": CODE_VERSION, "config": to_dict(cfg), "rows_per_table": results.rows_per_table(parts),
            "parts": {rel: {k: v for k, v in m.items() if k != "fingerprint"} for rel, m in parts.items()},
            "timings": {"wall_s": 2.0, "groups_s": {}, "model_evals": 0, "model_evals_per_s": None}})
    return Path(run_dir)


def write_train_run(storage_path: Path, name: str, model: str, top1: list[float], complete: bool = True) -> Path:
    """A training run as ``cluster.training.fit`` leaves it (``model.pt`` only when ``complete``)."""
    n = len(top1)
    cfg = TrainJobConfig(model=ModelConfig(name=model), data=DataConfig(train_size=4096, val_size=1024),
                         optim=OptimConfig(epochs=n, lr=0.4), run=RunConfig(name=name, storage_path=str(storage_path)))
    path = storage.join(str(storage_path), name)
    storage.write_text_atomic(storage.join(path, results.CONFIG_FILE), dump_yaml(cfg))
    history = [{"epoch": e, "train_loss": 2.0 - 0.5 * e, "train_top1": t, "train_top5": min(1.0, t + 0.2),
                "val_loss": 2.1 - 0.5 * e, "val_top1": t, "val_top5": min(1.0, t + 0.15),
                "val_top1_per_class": [min(1.0, t + 0.05 * (c % 3)) for c in range(NUM_CLASSES)],
                "lr": 0.4 * (1 - e / n), "epoch_seconds": 10.0, "images_per_s_per_worker": 200.0, "data_wait_s": 0.1,
                "images_per_s": 400.0, "world_size": 2, "finished_at": time.time() - (n - e) * 10.0}
               for e, t in enumerate(top1)]
    training.write_metrics(path, history)
    if complete:
        net = create_model(model, num_classes=NUM_CLASSES)
        storage.write_bytes_atomic(storage.join(path, training.MODEL_FILE), model_bytes(net, net.model_spec))
    return Path(path)


SWEEP_MODELS = ["bagnet9_small", "bagnet9_small", "bagnet17_small", "bagnet33_small"]
SWEEP_TOP1 = {"last": [0.30, 0.40, 0.55, 0.70], "best": [0.32, 0.42, 0.56, 0.72]}


def write_tune_run(storage_path: Path, name: str = "sweep") -> Path:
    """A sweep's trial table as ``cluster.sweep.finish`` writes it (searching model.name, optim.lr)."""
    config = sweeps.SweepConfig(search_space={"model.name": {"grid": sorted(set(SWEEP_MODELS))},
                                              "optim.lr": {"grid": [0.05, 0.4]}},
                                tune=sweeps.TuningConfig(name=name, storage_path=str(storage_path)))
    sweep = sweeps.Sweep(config=config, base={}, param_space={}, name=name, storage_path=str(storage_path))
    rows = []
    for i, model in enumerate(SWEEP_MODELS):
        row = {"run_id": name, "trial_id": f"t{i}", "status": "TERMINATED", "error": None, "model": model,
               "q": model_q(model), "dataset": "synthetic", "seed": 0, "epochs": 2 if i == 0 else 4, "max_epochs": 4,
               "stopped_early": i == 0, "checkpoint_path": f"{sweep.dir}/t{i}/checkpoint_000003",
               "train_run": storage.join(sweeps.train_root(sweep.dir), f"t{i}"), "trial_dir": f"{sweep.dir}/t{i}",
               "created_at": time.time(), "model_name": model, "optim_lr": 0.05 if i == 0 else 0.4}
        for metric in METRICS:
            row[f"{metric}_last"], row[f"{metric}_best"] = 0.5, 0.6
        row.update({"val_top1_last": SWEEP_TOP1["last"][i], "val_top1_best": SWEEP_TOP1["best"][i],
                    "val_top5_last": SWEEP_TOP1["last"][i] + 0.3, "val_top5_best": SWEEP_TOP1["best"][i] + 0.3})
        rows.append(row)
    storage.write_table_atomic(storage.join(sweep.dir, TUNE_FILE), sweeps.trial_table(sweep, rows))
    return Path(sweep.dir)


def make_results(root: str | Path) -> dict:
    """The full scenario the tests use; returns the generated rows for checking the numbers.

    * ``experiments/run-old``: complete, older, predictions only (must lose to run-new).
    * ``experiments/run-new``: complete, every table.
    * ``experiments/run-partial``: NO manifest, newest, predictions with every model at accuracy 0
      except bagnet33_small at 1, whose part is unfinished (no part marker): the run must not
      appear in the report, and with include_incomplete its unfinished part must not either.
    """
    root = Path(root)
    exp = root / "experiments"
    old = write_run(exp, "run-old", {"predictions": predictions(models=("bagnet9_small",))})
    frames = {name: make() for name, make in TABLES.items()}
    new = write_run(exp, "run-new", frames)
    partial = predictions()
    partial["correct_top1"] = partial["model"] == "bagnet33_small"
    write_run(exp, "run-partial", {"predictions": partial}, complete=False, uncommitted=("bagnet33_small",))
    for i, d in enumerate((old, new)):  # manifests: old before new
        os.utime(d / results.MARKER, (1_700_000_000 + i * 1000, 1_700_000_000 + i * 1000))
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
    print(f"wrote result tables under {sys.argv[1]}")
