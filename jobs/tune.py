"""Hyperparameter sweeps (patch size q, learning rate, ...) with Ray Tune over the training of jobs/train.py.

    python jobs/tune.py                                      # configs/tune-synthetic.yaml, local Ray
    python jobs/tune.py --config configs/tune-synthetic.yaml tune.max_concurrent_trials=1 \\
        'search_space.optim.lr={loguniform: [0.05, 1.0]}'
    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune-imagenet.yaml

A sweep config holds a base training config (``base:``, a jobs/train.py config file, and/or
``train:``, the same schema), ``search_space:`` (dotted train-config keys mapped to
``{grid: [...]}``, ``{choice: [...]}``, ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}`` or
``{randint: [lo, hi]}``) and ``tune:`` (metric, ASHA scheduler, concurrency, storage).

Each trial is one Ray Train run; ASHA stops weak trials early and TensorBoard gets each trial's
curves and hyperparameters under ``<tune.storage_path>/<tune.name>/``. At the end the job writes
``tune_trials.parquet`` (one row per trial), exports the best trial's model to ``best/model.pt``
(+ ``best/config.yaml``) and prints a summary. Running the same command again resumes an
interrupted sweep; finished trials are kept. See docs/tune.md and cluster/sweep.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python jobs/tune.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from bagnet.config import ConfigError
from cluster import sweep as sweeps
from cluster.configs import CONFIG_DIR, check_output
from cluster.images import check_paths
from cluster.ray_env import init_ray
from store import lock

DEFAULT_CONFIG = CONFIG_DIR / "tune-synthetic.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="sweep YAML (default: configs/tune-synthetic.yaml)")
    parser.add_argument("--print-config", action="store_true", help="validate, print the resolved sweep (YAML), exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. tune.max_concurrent_trials=1 train.optim.epochs=2 "
                             "'search_space.optim.lr={grid: [0.1, 0.4]}'")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        sweep = sweeps.load_sweep(args.config, args.overrides)
        if args.print_config:
            print(sweeps.resolved_yaml(sweep), end="")
            return {"sweep": sweep}
        check_paths(sweeps.trial_config(sweep.base, {}).data)
        sweeps.check_resumable(sweep)
        check_output(sweep.storage_path, "tune.storage_path")
        lease = lock.acquire(sweep.dir, job=f"tune {sweep.name}")
    except (ConfigError, lock.RunLocked) as err:
        raise SystemExit(f"error: {err}") from None
    with lease:
        return run_sweep(sweep)


def run_sweep(sweep: sweeps.Sweep) -> dict:
    """Run (or resume) ``sweep`` and print its summary (the caller holds its lock)."""
    init_ray()
    start = time.perf_counter()
    tuner = sweeps.make_tuner(sweep)
    print(f"sweep {sweep.name}: {len(sweep.param_space)} swept parameter(s), {sweep.epochs} epochs max; "
          f"TensorBoard: tensorboard --logdir {sweep.dir}", flush=True)
    results = tuner.fit()
    if unfinished := sweeps.unfinished_trials(sweep):
        print(f"sweep interrupted: {unfinished} of {sweeps.expected_trials(sweep)} trials unfinished; "
              f"run the same command again to resume", flush=True)
        raise SystemExit(130)

    out = sweeps.finish(sweep, results)
    wall = time.perf_counter() - start
    metric, mode = sweep.config.tune.metric, sweep.config.tune.mode
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        print(f"\ntrials by {metric} ({mode}):\n{out.trials.to_string(index=False)}")
        print(f"\naccuracy by patch size q:\n{out.by_q.to_string(index=False)}")
    if out.errors:
        failed = "; ".join(f"{r['trial_id']}: {str(r['error']).strip().splitlines()[-1]}" for r in out.rows if r["error"])
        raise SystemExit(f"error: {out.errors} of {len(out.rows)} trial(s) failed ({failed}); the sweep is not "
                         f"complete (table {out.table}, nothing exported); run the same command again to retry them")
    print(f"\nsweep done in {wall:.0f} s\ntrials table: {out.table}\nTensorBoard:  tensorboard --logdir {sweep.dir}")
    if out.best:
        print(f"best trial:   {out.best['trial_id']} ({out.best['model']}, {metric} {out.best[f'{metric}_last']:.3f})\n"
              f"best model:   {out.exported['model']} (config {out.exported['config']})")
    return {"sweep_dir": sweep.dir, "table": out.table, "rows": out.rows, "best": out.best, "exported": out.exported,
            "trials": out.trials, "by_q": out.by_q, "wall_s": wall}


if __name__ == "__main__":
    main()
