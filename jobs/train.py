"""Train a BagNet (or any zoo model) data-parallel with Ray Train.

    python jobs/train.py                                   # synthetic world, local Ray, 2 CPU workers
    python jobs/train.py --config configs/imagenet-bagnet33.yaml scaling.num_workers=16
    python jobs/train.py model.name=bagnet17_small model.options.aligned=true run.name=q17-aligned
    ray job submit --working-dir . -- python jobs/train.py --config configs/imagenet-bagnet33.yaml

Every epoch reports train/val top-1 and top-5 with a checkpoint and rewrites
``<run.storage_path>/<name>/metrics.parquet``. Running the same command again resumes an
interrupted run (same ``run.name`` and ``run.storage_path``) or reports that it is complete; a
run folder holding other model or data settings is refused, naming the key. The final model is
exported with its spec to ``<storage>/<name>/model.pt``: ``create_model(name, weights=...)``
rebuilds the trained function (options such as ``aligned``, classes). See cluster/training.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python jobs/train.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bagnet.config import ConfigError, dump_yaml, load_config
from cluster import training
from cluster.configs import CONFIG_DIR, TrainJobConfig, check_output
from cluster.images import check_paths, skipped_images, train_datasets
from cluster.paths import job_paths
from cluster.ray_env import init_ray
from store import lock

DEFAULT_CONFIG = CONFIG_DIR / "synthetic.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/synthetic.yaml)")
    parser.add_argument("--print-config", action="store_true", help="validate, print the resolved config (YAML), exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. optim.lr=0.05 scaling.num_workers=4 model.options.aligned=true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = job_paths(load_config(TrainJobConfig, args.config, args.overrides))
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return {"config": cfg}
    return train(cfg, cfg.run.name or Path(args.config).stem)


def train(cfg: TrainJobConfig, name: str) -> dict:
    """Train (or resume, or find complete) run ``name`` of ``cfg``, printing progress and a summary;
    holds the run's lock (store.lock) meanwhile."""
    try:
        lease = lock.acquire(training.run_dir(cfg, name), job=f"train {name}")
    except (ConfigError, lock.RunLocked) as err:
        raise SystemExit(f"error: {err}") from None
    with lease:
        return _train(cfg, name)


def _train(cfg: TrainJobConfig, name: str) -> dict:
    try:
        sources = check_paths(cfg.data)
        cfg.model.check_weights("model.weights")
        check_output(cfg.run.storage_path, "run.storage_path")
        run_dir = training.run_dir(cfg, name)
        complete = training.check_rerun(cfg, run_dir)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    if complete:
        print(f"run {name!r} is already complete: model {run_dir}/{training.MODEL_FILE}, "
              f"metrics {run_dir}/{training.METRICS_FILE}")
        return {"run_dir": run_dir, "skipped": True}

    init_ray()
    data = train_datasets(cfg.data, sources, skipped_to=run_dir)
    print(f"training {cfg.model.name} on {cfg.data.dataset} ({data.num_classes} classes) with "
          f"{cfg.scaling.num_workers} worker(s); run dir {run_dir}", flush=True)
    try:
        result = training.fit(cfg, name, data)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    last = result.metrics.iloc[-1]
    print(f"{name}: done in {result.seconds:.0f} s: val top-1 {last['val_top1']:.3f}, top-5 {last['val_top5']:.3f} "
          f"after {len(result.metrics)} epochs")
    if cfg.data.dataset == "synthetic":
        by_kind = cfg.data.world().kind_accuracy(last["val_top1_per_class"])
        print(f"{name}: val top-1 by class kind: " + ", ".join(f"{kind} {acc:.3f}" for kind, acc in by_kind.items()))
    if (skipped := skipped_images(run_dir).num_rows):
        print(f"{skipped} undecodable image(s) skipped, listed in {run_dir}/_skipped-*.parquet")
    print(f"checkpoints: {result.checkpoints}\nmetrics:     {result.metrics_path}\nmodel:       {result.model_path}")
    return {"run_dir": run_dir, "model": result.model_path, "metrics": result.metrics, "skipped": False,
            "skipped_images": skipped}


if __name__ == "__main__":
    main()
