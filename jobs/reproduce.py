"""Reproduce the paper's story in one command: train the models, run every experiment, write the report.

    python jobs/reproduce.py                                     # configs/reproduce-synthetic.yaml, laptop scale
    python jobs/reproduce.py train.overrides='[optim.epochs=2]'  # any key of the config can be overridden
    ray job submit --working-dir . -- python jobs/reproduce.py --config configs/reproduce-imagenet.yaml

With several ``train.seeds`` every model is trained once per seed (``<model>-seed<s>``), the
experiments run once per seed on that seed's models (run ``<run_id>-seed<s>``), and the report
shows every number as its mean ± spread over the seeds. ``train.concurrent_runs`` trains that many
runs at once (refused, with the numbers, when their workers and data tasks do not fit the cluster).

Each stage skips what a previous run already finished: training runs that are complete are not
retrained (an interrupted one resumes from its checkpoint), finished experiment parts are not
recomputed, and the report is rebuilt from whatever is complete. Every stage's config is built
and validated before the first one starts; the experiments evaluate the models the train stage
wrote (their ``model.pt``), whatever weights the experiment config names for them.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python jobs/reproduce.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.report import build_report
from bagnet.config import ConfigError, dump_yaml, load_config, updated
from cluster import training
from cluster.concurrency import run_at_most
from cluster.configs import CONFIG_DIR, ExperimentJobConfig, ReproduceConfig, TrainJobConfig, config_path
from cluster.paths import job_paths
from jobs import experiment, train
from store import storage

DEFAULT_CONFIG = CONFIG_DIR / "reproduce-synthetic.yaml"


def train_configs(cfg: ReproduceConfig) -> dict[str, TrainJobConfig]:
    """One training config per model and seed of the train stage, named by ``TrainStage.run_name``."""
    base = load_config(TrainJobConfig, config_path(cfg.train.config), cfg.train.overrides)
    stage = cfg.train
    return {stage.run_name(model, seed): job_paths(updated(base, {"model": {"name": model}, "run": {
                "name": stage.run_name(model, seed), "storage_path": stage.storage_path, "seed": seed}}))
            for model in stage.models for seed in stage.seeds}


def experiment_configs(cfg: ReproduceConfig) -> list[ExperimentJobConfig]:
    """The experiment config once per seed, on that seed's trained models (``ReproduceConfig.experiment_config``)."""
    return [job_paths(cfg.experiment_config(seed)) for seed in cfg.train.seeds]


def train_all(runs: dict[str, TrainJobConfig], at_once: int) -> None:
    """Every training run, ``at_once`` at a time (``train.concurrent_runs``); after a failed run no
    further one starts and the running ones finish."""
    try:
        training.check_runs_fit(next(iter(runs.values())), at_once, "train.concurrent_runs")
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None

    def one(i: int, name: str) -> dict:
        print(f"[reproduce] training {i}/{len(runs)}: {name}", flush=True)
        return train.train(runs[name], name)

    run_at_most(at_once, {name: functools.partial(one, i, name) for i, name in enumerate(runs, 1)})


def run_stages(cfg: ReproduceConfig) -> dict:
    """Train, run the experiments, build the report; each stage resumes what it finished before."""
    try:
        runs, exps = train_configs(cfg), experiment_configs(cfg)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    timings: dict[str, float] = {}
    start = time.perf_counter()
    train_all(runs, cfg.train.concurrent_runs)
    timings["train_s"] = time.perf_counter() - start

    mark = time.perf_counter()
    done = []
    for exp in exps:
        print(f"[reproduce] experiments: {cfg.experiments.names} ({exp.run_id})", flush=True)
        done.append(experiment.run(exp, cfg.experiments.names, config_path(cfg.experiments.config)))
    timings["experiments_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    run_ids = [run["run_id"] for run in done]
    index = build_report(storage.resolve(exps[0].output), cfg.report.out,
                         train_paths=[storage.resolve(cfg.train.storage_path)], run_id=run_ids,
                         seed_runs=run_ids if len(run_ids) > 1 else ())
    timings["report_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - start
    print("[reproduce] done in " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()), flush=True)
    print(f"[reproduce] report: {index}", flush=True)
    return {"report": index, "experiment_runs": done, "timings": timings}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/reproduce-synthetic.yaml)")
    parser.add_argument("--print-config", action="store_true",
                        help="validate, print the resolved config and each stage's (YAML documents), exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. report.out=/tmp/report")
    args = parser.parse_args(argv)
    try:
        cfg = job_paths(load_config(ReproduceConfig, args.config, args.overrides))
        stages = [*train_configs(cfg).values(), *experiment_configs(cfg)] if args.print_config else []
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    if args.print_config:
        print("---\n".join(dump_yaml(c) for c in (cfg, *stages)), end="")
        return {"config": cfg}
    return run_stages(cfg)


if __name__ == "__main__":
    main()
