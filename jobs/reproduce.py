"""Reproduce the paper's story in one command: train the models, run every experiment, write the report.

    python jobs/reproduce.py                                     # configs/reproduce-synthetic.yaml, laptop scale
    python jobs/reproduce.py train.overrides='[optim.epochs=2]'  # any key of the config can be overridden
    ray job submit --working-dir . -- python jobs/reproduce.py --config configs/reproduce-imagenet.yaml

Each stage skips what a previous run already finished: training runs that are complete are not
retrained (an interrupted one resumes from its checkpoint), finished experiment parts are not
recomputed, and the report is rebuilt from whatever is complete.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python jobs/reproduce.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bagnet.config import ConfigError, load_config, require
from store import storage

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "reproduce-synthetic.yaml"


@dataclass
class TrainStage:
    config: str = "configs/synthetic.yaml"
    models: list[str] = field(default_factory=list)  # one jobs/train.py run per model, named after it
    storage_path: str = "results/train"
    overrides: list[str] = field(default_factory=list)  # applied to every training run


@dataclass
class ExperimentStage:
    config: str = "configs/experiments-synthetic.yaml"
    names: str = "all"  # comma-separated experiment names, or "all"
    overrides: list[str] = field(default_factory=list)


@dataclass
class ReportStage:
    out: str = "results/report"


@dataclass
class ReproduceConfig:
    train: TrainStage = field(default_factory=TrainStage)
    experiments: ExperimentStage = field(default_factory=ExperimentStage)
    report: ReportStage = field(default_factory=ReportStage)

    def validate(self) -> None:
        for key, path in (("train.config", self.train.config), ("experiments.config", self.experiments.config)):
            require((ROOT / path).is_file() or Path(path).is_file(), key, f"config file not found: {path}")


def _config_path(path: str) -> str:
    return str(ROOT / path) if (ROOT / path).is_file() else path


def run_stages(cfg: ReproduceConfig) -> dict:
    """Train, run the experiments, build the report; each stage resumes what it finished before."""
    from analysis.report import build_report
    from jobs import experiment, train

    timings: dict[str, float] = {}
    start = time.perf_counter()
    for i, model in enumerate(cfg.train.models, 1):
        print(f"[reproduce] training {i}/{len(cfg.train.models)}: {model}", flush=True)
        train.main(["--config", _config_path(cfg.train.config), f"model.name={model}", f"run.name={model}",
                    f"run.storage_path={cfg.train.storage_path}", *cfg.train.overrides])
    timings["train_s"] = time.perf_counter() - start

    mark = time.perf_counter()
    print(f"[reproduce] experiments: {cfg.experiments.names}", flush=True)
    run = experiment.main(["--experiment", cfg.experiments.names, "--config", _config_path(cfg.experiments.config),
                           *cfg.experiments.overrides])
    timings["experiments_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    results_root = run["run_dir"].rsplit("/", 1)[0]
    index = build_report(results_root, cfg.report.out, train_paths=[storage.resolve(cfg.train.storage_path)],
                         run_id=run["run_id"])
    timings["report_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - start
    print("[reproduce] done in " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()), flush=True)
    print(f"[reproduce] report: {index}", flush=True)
    return {"report": index, "experiment_run": run, "timings": timings}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/reproduce-synthetic.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. report.out=/tmp/report")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(ReproduceConfig, args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    return run_stages(cfg)


if __name__ == "__main__":
    from jobs.reproduce import main as _main  # the importable module, as in jobs/train.py

    _main()
