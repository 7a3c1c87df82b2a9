"""Run model-comparison experiments across all models as Ray Data pipelines (cluster.evaluation).

    python jobs/experiment.py --experiment predictions                # configs/experiments-synthetic.yaml
    python jobs/experiment.py --experiment predictions,shuffle --config configs/experiments-imagenet.yaml
    python jobs/experiment.py --experiment all data.test_size=256 'models=[{name: bagnet9_small}, {name: bagnet33_small}]'
    ray job submit --working-dir . -- python jobs/experiment.py --experiment masking --config ...

Every (experiment, model) pair is a part, written to
``<output>/<run_id>/<table>/experiment=<name>/model=<model>/`` with a ``_SUCCESS`` marker, and a
run manifest last; rerunning with the same ``run_id`` skips finished parts. See docs/experiments.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python jobs/experiment.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bagnet.config import ConfigError, dump_yaml, load_config
from bagnet.experiments import EXPERIMENTS
from cluster import evaluation
from cluster.configs import CONFIG_DIR, ExperimentJobConfig, check_output
from cluster.images import ImageReadError
from cluster.paths import job_paths
from store import lock

DEFAULT_CONFIG = CONFIG_DIR / "experiments-synthetic.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment",
                        help=f"experiment name(s), comma-separated, or 'all': {', '.join(EXPERIMENTS)} "
                             "(and those of the config's `modules:`)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="YAML config (default: configs/experiments-synthetic.yaml)")
    parser.add_argument("--print-config", action="store_true", help="validate, print the resolved config (YAML), exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. data.test_size=256 compute.actor_pool_size=2 run_id=try1")
    args = parser.parse_args(argv)
    if not (args.experiment or args.print_config):
        parser.error("the following arguments are required: --experiment")
    return args


def print_summary(run: dict[str, Any]) -> None:
    print(f"[experiment] run {run['run_id']} complete: {run['run_dir']}")
    for table, n in run["rows"].items():
        print(f"  {table}: {n} rows")
    if run.get("reads"):
        print(f"  images read and decoded once: {run['reads']['images']} ({run['reads']['reads']} file reads)")
    for key, n in run.get("failures", {}).items():
        print(f"  {key}: {n} undecodable image(s), listed in the failures table")
    rate = run["model_evals_per_s"]
    rate = f"{rate:.1f} model evaluations/s" if rate else "nothing computed"
    print(f"  {len(run['computed'])} part(s) computed, {len(run['skipped'])} skipped; wall {run['wall_s']:.1f} s; "
          f"{run['model_evals']} model evaluations, {rate}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the experiments; returns :func:`cluster.evaluation.run_plan`'s summary."""
    args = parse_args(argv)
    try:
        cfg = job_paths(load_config(ExperimentJobConfig, args.config, args.overrides))  # registers `modules:` first
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return {"config": cfg}
    return run(cfg, args.experiment, args.config)


def run(cfg: ExperimentJobConfig, experiments: str, config_path: str | Path | None) -> dict[str, Any]:
    """Run ``experiments`` (comma-separated names or ``all``) of ``cfg``, printing a summary."""
    try:
        check_output(cfg.output, "output")
        plan = evaluation.make_plan(cfg, evaluation.parse_experiments(experiments), config_path)
        with lock.acquire(plan.run_dir, job=f"experiment {plan.run_id}"):
            summary = evaluation.run_plan(plan)
    except (ConfigError, evaluation.ActorPoolTimeout, evaluation.AccountingError, ImageReadError,
            lock.RunLocked) as err:
        raise SystemExit(f"error: {err}") from None
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
