"""Hyperparameter sweeps (patch size q, learning rate, ...) with Ray Tune over jobs/train.py's loop.

    python jobs/tune.py                                      # configs/tune-synthetic.yaml, local Ray
    python jobs/tune.py --config configs/tune-synthetic.yaml tune.max_concurrent_trials=1 \\
        'search_space.optim.lr={loguniform: [0.05, 1.0]}'
    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune-imagenet.yaml

A sweep config holds a base training config (``base:``, a jobs/train.py config file, and/or
``train:``, the same schema), ``search_space:`` (dotted train-config keys mapped to
``{grid: [...]}``, ``{choice: [...]}``, ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}`` or
``{randint: [lo, hi]}``) and ``tune:`` (metric, ASHA scheduler, concurrency, storage).

Each trial is a Tune function that drives one Ray Train run built by ``jobs.train.build_trainer``;
every epoch's metrics reach Tune through ``TuneReportCallback``, ASHA stops weak trials early and
Tune's TensorBoard logger writes each trial's curves and hyperparameters under
``<tune.storage_path>/<tune.name>/``. At the end the job writes ``tune_trials.parquet`` (one row per
trial), exports the best trial's model to ``best/model.pt`` (+ ``best/config.yaml``) and prints a
summary. Running the same command again resumes an interrupted sweep; finished trials are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # `python jobs/tune.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from bagnet.config import ConfigError, dump_yaml, from_dict, merge, parse_overrides, read_yaml, require, to_dict
from store import storage
from jobs.datasets import build_datasets, check_paths
from jobs.train import TrainJobConfig, build_trainer, export_model

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tune-synthetic.yaml"
EPOCHS = "epochs_done"  # added to every report: epochs trained so far (ASHA's time axis)
METRICS = {"val_top1": "max", "val_top5": "max", "val_loss": "min", "train_top1": "max", "train_loss": "min"}
DISTRIBUTIONS = ("grid", "choice", "loguniform", "uniform", "randint")
FIXED_KEYS = {"optim.epochs": "it is the scheduler's max_t; set it under train:",
              "run.name": "each trial's Train run is named after the trial",
              "run.storage_path": "Train runs live under the sweep directory"}
TABLE = "tune_trials.parquet"


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class SchedulerCfg:
    kind: Literal["asha", "fifo"] = "asha"  # fifo: every trial runs all epochs
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: float = 2.0  # ASHA keeps the top 1/reduction_factor at each rung
    brackets: int = 1

    def validate(self) -> None:
        require(self.grace_period >= 1, "grace_period", f"must be >= 1, got {self.grace_period}")
        require(self.reduction_factor > 1, "reduction_factor", f"must be > 1, got {self.reduction_factor}")
        require(self.brackets >= 1, "brackets", f"must be >= 1, got {self.brackets}")


@dataclass
class TuneCfg:
    name: str | None = None  # default: the config file's stem
    storage_path: str = "results/tune"  # local dir or s3://bucket/prefix
    metric: str = "val_top1"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 1  # repeats of the grid; random draws per grid point
    max_concurrent_trials: int = 1  # Train runs in flight at once (0: no cap); see docs/tune.md
    driver_cpus: float = 0.01  # the trial itself only drives its Train run; workers get scaling.*
    max_failures: int = 0  # restarts of a trial whose Train driver died
    seed: int | None = None  # random-search seed (reproducible draws)
    verbose: int = 1  # Tune's console output: 0 silent, 1 status, 2 every result
    scheduler: SchedulerCfg = field(default_factory=SchedulerCfg)

    def validate(self) -> None:
        require(self.metric in METRICS, "metric", f"must be one of {', '.join(METRICS)}, got {self.metric!r}")
        require(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        require(self.max_concurrent_trials >= 0, "max_concurrent_trials", f"must be >= 0, got {self.max_concurrent_trials}")
        require(self.driver_cpus > 0, "driver_cpus", f"must be > 0, got {self.driver_cpus}")
        require(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")


@dataclass
class SweepConfig:
    base: str | None = None  # jobs/train.py config file (relative to this file); `train:` overrides it
    train: dict[str, Any] = field(default_factory=dict)
    search_space: dict[str, Any] = field(default_factory=dict)
    tune: TuneCfg = field(default_factory=TuneCfg)


@dataclass
class Sweep:
    """A validated sweep: config, base training config (as a dict) and Tune's param space."""

    config: SweepConfig
    base: dict[str, Any]
    param_space: dict[str, Any]
    name: str
    storage_path: str

    @property
    def dir(self) -> str:
        return storage.join(self.storage_path, self.name)

    @property
    def epochs(self) -> int:
        return trial_config(self.base, {}).optim.epochs


def _nest(key: str, value: Any) -> dict[str, Any]:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> TrainJobConfig:
    """The training config of one trial: ``base`` with the dotted ``params`` applied."""
    raw = base
    for key, value in params.items():
        raw = merge(raw, _nest(key, value))
    return from_dict(TrainJobConfig, raw)


def _check_key(key: str) -> None:
    """``key`` must name one leaf field of TrainJobConfig."""
    from typing import get_type_hints

    if not isinstance(key, str) or not key:
        raise ConfigError(f"search_space: parameter names must be dotted config keys, got {key!r}")
    if key in FIXED_KEYS:
        raise ConfigError(f"search_space.{key}: cannot be swept ({FIXED_KEYS[key]})")
    cls: Any = TrainJobConfig
    done: list[str] = []
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"search_space.{key}: unknown parameter ({'.'.join(done)} has no sub-keys)")
        hints = get_type_hints(cls)
        if part not in hints:
            where = ".".join(done) or "top level"
            raise ConfigError(f"search_space.{key}: unknown parameter (known keys under {where}: {', '.join(hints)})")
        done.append(part)
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"search_space.{key}: is a config section, not a parameter; name one of its keys")


def _check_value(base: dict[str, Any], key: str, value: Any) -> None:
    try:
        trial_config(base, {key: value})
    except ConfigError as err:
        raise ConfigError(f"search_space.{key}: value {value!r} is invalid: {err}") from None


def _bounds(key: str, kind: str, args: Any) -> tuple[Any, Any]:
    if not (isinstance(args, (list, tuple)) and len(args) == 2
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"search_space.{key}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"search_space.{key}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"search_space.{key}: loguniform needs low > 0, got [{low}, {high}]")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"search_space.{key}: randint needs integer bounds, got {args!r}")
    return low, high


def build_param_space(base: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """Tune's param space for ``space``; every entry is checked against the training config.

    Raises ConfigError naming the entry: unknown parameter, bad distribution, empty grid, or a value
    (a grid/choice value, a range bound) that the training config rejects, e.g. ``optim.lr <= 0``.
    """
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        _check_key(key)
        if not (isinstance(spec, dict) and len(spec) == 1):
            raise ConfigError(f"search_space.{key}: expected one of {{grid: [...]}}, {{choice: [...]}}, "
                              f"{{loguniform: [lo, hi]}}, {{uniform: [lo, hi]}}, {{randint: [lo, hi]}}; got {spec!r}")
        (kind, args), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"search_space.{key}: unknown distribution {kind!r} (known: {', '.join(DISTRIBUTIONS)})")
        if kind in ("grid", "choice"):
            if not isinstance(args, list) or not args:
                raise ConfigError(f"search_space.{key}: {kind} needs a non-empty list of values, got {args!r}")
            for value in args:
                _check_value(base, key, value)
            out[key] = tune.grid_search(list(args)) if kind == "grid" else tune.choice(list(args))
            continue
        low, high = _bounds(key, kind, args)
        if kind == "randint":  # Tune's randint excludes `high`
            _check_value(base, key, low), _check_value(base, key, high - 1)
            out[key] = tune.randint(low, high)
        else:
            _check_value(base, key, float(low)), _check_value(base, key, float(high))
            out[key] = (tune.loguniform if kind == "loguniform" else tune.uniform)(low, high)
    return out


def _absolute_local_paths(base: dict[str, Any]) -> dict[str, Any]:
    """Trials run with another working directory: make local weight / data paths absolute."""
    out = merge(base, {})
    for section, key in (("model", "weights"), ("data", "root")):
        value = out.get(section, {}).get(key)
        if isinstance(value, str) and value and not storage.is_remote(value) and Path(value).exists():
            out[section] = {**out[section], key: str(Path(value).resolve())}
    return out


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep config; ``overrides`` are dotted ``key=value`` items.

    ``search_space.<dotted.key>=<YAML spec>`` replaces one search-space entry, e.g.
    ``search_space.optim.lr={grid: [0.1, 0.2]}``. Nothing starts before everything is valid.
    """
    path = Path(path)
    raw = read_yaml(path)
    plain = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if sep and key.startswith("search_space."):
            raw = merge(raw, {"search_space": {key[len("search_space."):]: yaml.safe_load(value)}})
        else:
            plain.append(item)
    raw = merge(raw, parse_overrides(plain))
    try:
        sweep = from_dict(SweepConfig, raw)
        base = read_yaml(path.parent / sweep.base) if sweep.base else {}
        base = _absolute_local_paths(merge(base, sweep.train))
        try:
            cfg = from_dict(TrainJobConfig, base)
        except ConfigError as err:
            raise ConfigError(f"train.{err}") from None
        param_space = build_param_space(base, sweep.search_space)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    name = sweep.tune.name or path.stem
    return Sweep(sweep, base, param_space, name, storage.resolve(sweep.tune.storage_path))


# ---------------------------------------------------------------------------------------------
# the trial: one Ray Train run


def _report_callback():
    """TuneReportCallback that also reports ``epochs_done`` (ASHA's time axis) and uses it as
    TensorBoard's step, so a resumed trial continues its curves instead of restarting them."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            done = metrics[0]["epoch"] + 1
            first = {**metrics[0], EPOCHS: done, "timesteps_total": done}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReport()


def train_root(sweep_dir: str) -> str:
    """Where the trials' Train runs live: ``<sweep>/train/<trial_id>/``."""
    return storage.join(sweep_dir, "train")


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep_dir: str) -> None:
    """Tune function trainable: the Train driver of one trial.

    The Train run is named after the trial id, so a restored trial resumes its own checkpoints.
    """
    import ray.tune

    from cluster.ray_env import init_ray

    init_ray()  # this process's DataContext settings travel with the datasets it builds
    cfg = trial_config(base, params)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(cfg, trial_id, train_root(sweep_dir), build_datasets(cfg.data),
                            callbacks=[_report_callback()])
    result = trainer.fit()
    if result.error:
        raise result.error


# ---------------------------------------------------------------------------------------------
# the Tuner


def _storage_kwargs(path: str) -> dict[str, Any]:
    if storage.is_remote(path):
        fs, inner = storage.pyarrow_fs(path)
        return {"storage_filesystem": fs, "storage_path": inner}
    return {"storage_path": path}


def _trainable(sweep: Sweep):
    from ray import tune

    fn = tune.with_parameters(run_trial, base=sweep.base, sweep_dir=sweep.dir)
    return tune.with_resources(fn, {"CPU": sweep.config.tune.driver_cpus})


def _sweep_record(sweep: Sweep) -> dict[str, Any]:
    """What must not change between a sweep and its resumption."""
    return {"base": sweep.base, "search_space": sweep.config.search_space,
            "tune": {k: v for k, v in to_dict(sweep.config.tune).items() if k not in ("verbose", "max_concurrent_trials")}}


def check_resumable(sweep: Sweep) -> bool:
    """True when ``sweep.dir`` already holds this sweep; ConfigError naming the key when it holds
    a different one (a restored sweep keeps its old search space, so the change would be lost)."""
    record_path = storage.join(sweep.dir, "sweep.yaml")
    if not storage.exists(record_path):
        return False
    _check_same_sweep(sweep, yaml.safe_load(storage.read_bytes(record_path)))
    return True


def _check_same_sweep(sweep: Sweep, saved: dict[str, Any]) -> None:
    new = _sweep_record(sweep)
    old_flat = {**_flatten(saved.get("base", {}), "train."), **_flatten(saved.get("tune", {}), "tune."),
                **{f"search_space.{k}": v for k, v in saved.get("search_space", {}).items()}}
    new_flat = {**_flatten(new["base"], "train."), **_flatten(new["tune"], "tune."),
                **{f"search_space.{k}": v for k, v in new["search_space"].items()}}
    for key in sorted(set(old_flat) | set(new_flat)):
        if old_flat.get(key) != new_flat.get(key):
            raise ConfigError(f"sweep {sweep.dir} exists with {key}={old_flat.get(key)!r}, not {new_flat.get(key)!r}; "
                              f"set tune.name to start a new sweep")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class LastEpochASHA(ASHAScheduler):
    """ASHA on ``epochs_done`` that never stops a trial at its last epoch.

    Tune stops a trial by ending its driver actor, which takes the Train controller with it before
    it can release its workers' placement group (Train's detached cleaner frees it later). A trial
    at its last epoch ends by itself a moment later, so stopping it there would only lose that
    clean exit.
    """

    def __init__(self, **kwargs):
        super().__init__(time_attr=EPOCHS, **kwargs)

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if result.get(EPOCHS, 0) >= self._max_t else action


def make_tuner(sweep: Sweep):
    """A new Tuner for ``sweep``, or the restored one when its directory holds the same sweep."""
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tc = sweep.config.tune
    kwargs = _storage_kwargs(sweep.storage_path)
    fs_kwargs = {"storage_filesystem": kwargs["storage_filesystem"]} if "storage_filesystem" in kwargs else {}
    record_path = storage.join(sweep.dir, "sweep.yaml")
    restore_path = _storage_kwargs(sweep.dir)["storage_path"]
    if tune.Tuner.can_restore(restore_path, **fs_kwargs):
        check_resumable(sweep)
        print(f"resuming sweep {sweep.dir} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(restore_path, trainable=_trainable(sweep), resume_errored=True, **fs_kwargs)

    storage.write_text_atomic(record_path, yaml.safe_dump(_sweep_record(sweep), sort_keys=False))
    scheduler = None
    if tc.scheduler.kind == "asha":
        scheduler = LastEpochASHA(max_t=sweep.epochs, grace_period=tc.scheduler.grace_period,
                          reduction_factor=tc.scheduler.reduction_factor, brackets=tc.scheduler.brackets)
    return tune.Tuner(
        _trainable(sweep),
        param_space=sweep.param_space,
        tune_config=tune.TuneConfig(
            metric=tc.metric, mode=tc.mode, scheduler=scheduler, num_samples=tc.num_samples,
            search_alg=BasicVariantGenerator(random_state=tc.seed, max_concurrent=tc.max_concurrent_trials)),
        run_config=tune.RunConfig(
            name=sweep.name, **kwargs, callbacks=[TBXLoggerCallback()], verbose=tc.verbose,
            failure_config=tune.FailureConfig(max_failures=tc.max_failures)),
    )


# ---------------------------------------------------------------------------------------------
# results


def expected_trials(sweep: Sweep) -> int:
    """``num_samples`` x the grid's size (random draws happen per grid point)."""
    return sweep.config.tune.num_samples * math.prod(
        len(spec["grid"]) for spec in sweep.config.search_space.values() if "grid" in spec)


def unfinished_trials(sweep: Sweep) -> int:
    """Trials not yet finished according to the sweep's saved state (0 when the sweep is complete).

    An interrupted ``fit()`` returns normally and marks its stopped trials terminated; the state it
    saved first still says which were running, and it lacks the trials not yet generated.
    """
    from ray.tune import ExperimentAnalysis

    kwargs = _storage_kwargs(sweep.dir)
    analysis = ExperimentAnalysis(kwargs["storage_path"], storage_filesystem=kwargs.get("storage_filesystem"))
    done = sum(t.status in ("TERMINATED", "ERROR") for t in analysis.trials)
    return expected_trials(sweep) - done


def _column(key: str) -> str:
    return key.replace(".", "_")


def _uri(path: str | None, storage_path: str) -> str | None:
    """Checkpoint paths come back without the scheme when the storage is remote."""
    if path and storage.is_remote(storage_path) and not storage.is_remote(path):
        return f"{storage_path.split('://', 1)[0]}://{path}"
    return path


def _trial_id_from_dir(path: str) -> str:
    """``run_trial_8578a_00002_2_optim_lr=...`` -> ``8578a_00002`` (for a trial that never reported)."""
    match = re.search(r"_([0-9a-f]+_\d{5})_", Path(path).name)
    return match.group(1) if match else Path(path).name


def trial_rows(sweep: Sweep, results) -> list[dict[str, Any]]:
    """One row per trial: parameters, last and best metrics, epochs, early stop, checkpoint."""
    from bagnet.models import model_q

    created_at = time.time()
    rows = []
    for result in results:
        history = result.metrics_dataframe
        last = result.metrics or {}
        params = dict(result.config or {})
        cfg = trial_config(sweep.base, params)
        epochs = int(last.get(EPOCHS) or 0)
        status = "ERROR" if result.error else "TERMINATED"
        row = {
            "run_id": sweep.name, "trial_id": last.get("trial_id") or _trial_id_from_dir(result.path),
            "status": status, "error": str(result.error) if result.error else None,
            "model": cfg.model.name, "q": model_q(cfg.model.name), "dataset": cfg.data.dataset, "seed": cfg.data.seed,
            **{_column(k): params.get(k) for k in sweep.config.search_space},
            "epochs": epochs, "max_epochs": cfg.optim.epochs,
            "stopped_early": status == "TERMINATED" and epochs < cfg.optim.epochs,
        }
        for metric, mode in METRICS.items():
            values = history[metric] if history is not None and metric in history else None
            row[f"{metric}_last"] = float(last[metric]) if metric in last else None
            row[f"{metric}_best"] = None if values is None or values.empty else float(values.max() if mode == "max" else values.min())
        row.update({"checkpoint_path": _uri(last.get("checkpoint_path"), sweep.storage_path),
                    "train_run": storage.join(train_root(sweep.dir), row["trial_id"]),
                    "trial_dir": _uri(result.path, sweep.storage_path), "created_at": created_at})
        rows.append(row)
    return rows


def write_table(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    import pyarrow as pa

    path = storage.join(sweep.dir, TABLE)
    storage.write_table_atomic(path, pa.Table.from_pylist(rows))
    return path


def best_row(sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial whose last checkpoint scores best on ``tune.metric`` (the model that is exported)."""
    tc = sweep.config.tune
    scored = [r for r in rows if r[f"{tc.metric}_last"] is not None and r["checkpoint_path"]]
    if not scored:
        return None
    sign = 1 if tc.mode == "max" else -1
    return max(scored, key=lambda r: sign * r[f"{tc.metric}_last"])


def export_best(sweep: Sweep, row: dict[str, Any]) -> dict[str, str]:
    """``best/model.pt`` (state_dict for create_model) and ``best/config.yaml`` (its training config)."""
    import ray.train

    params = {k: row[_column(k)] for k in sweep.config.search_space}
    cfg = trial_config(sweep.base, params)
    cfg.run.name = f"{sweep.name}-best"
    ckpt_path = row["checkpoint_path"]
    fs, inner = storage.pyarrow_fs(ckpt_path)
    best_dir = storage.join(sweep.dir, "best")
    out = {"model": storage.join(best_dir, "model.pt"), "config": storage.join(best_dir, "config.yaml")}
    export_model(ray.train.Checkpoint(inner, filesystem=fs), out["model"])
    storage.write_text_atomic(out["config"], dump_yaml(cfg))
    storage.write_json_atomic(storage.join(best_dir, "trial.json"),
                              {k: row[k] for k in ("trial_id", "model", "q", "epochs", "checkpoint_path")}
                              | {sweep.config.tune.metric: row[f"{sweep.config.tune.metric}_last"], "params": params})
    return out


def summary_tables(sweep: Sweep, rows: list[dict[str, Any]]):
    """(trials sorted by the metric, accuracy by patch size q) as DataFrames."""
    import pandas as pd

    tc = sweep.config.tune
    df = pd.DataFrame(rows)
    params = [_column(k) for k in sweep.config.search_space]
    cols = ["trial_id", *[p for p in params], "epochs", "stopped_early", "status",
            f"{tc.metric}_last", f"{tc.metric}_best", "val_top5_last"]
    trials = df[list(dict.fromkeys(cols))].sort_values(f"{tc.metric}_last", ascending=tc.mode == "min", na_position="last")
    df["q"] = df["q"].astype("Int64")  # <NA> for the unconstrained CNNs
    full = df[df["epochs"] == df["max_epochs"]]
    by_q = df.groupby(["q", "model"], sort=True, dropna=False).agg(
        trials=("trial_id", "size"), stopped_early=("stopped_early", "sum"),
        **{f"best_{tc.metric}": (f"{tc.metric}_best", "max" if tc.mode == "max" else "min")})
    by_q[f"mean_final_{tc.metric}"] = full.groupby(["q", "model"], dropna=False)[f"{tc.metric}_last"].mean()
    return trials.reset_index(drop=True), by_q.reset_index()


# ---------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="sweep YAML (default: configs/tune-synthetic.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. tune.max_concurrent_trials=1 train.optim.epochs=2 "
                             "'search_space.optim.lr={grid: [0.1, 0.4]}'")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        sweep = load_sweep(args.config, args.overrides)
        check_paths(trial_config(sweep.base, {}).data)
        check_resumable(sweep)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None

    from cluster.ray_env import init_ray

    init_ray()
    start = time.perf_counter()
    tuner = make_tuner(sweep)
    print(f"sweep {sweep.name}: {len(sweep.param_space)} swept parameter(s), {sweep.epochs} epochs max; "
          f"TensorBoard: tensorboard --logdir {sweep.dir}", flush=True)
    results = tuner.fit()
    if unfinished := unfinished_trials(sweep):
        print(f"sweep interrupted: {unfinished} of {expected_trials(sweep)} trials unfinished; "
              f"run the same command again to resume", flush=True)
        raise SystemExit(130)

    rows = trial_rows(sweep, results)
    table = write_table(sweep, rows)
    best = best_row(sweep, rows)
    exported = export_best(sweep, best) if best else {}
    trials, by_q = summary_tables(sweep, rows)
    wall = time.perf_counter() - start
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        print(f"\ntrials by {sweep.config.tune.metric} ({sweep.config.tune.mode}):\n{trials.to_string(index=False)}")
        print(f"\naccuracy by patch size q:\n{by_q.to_string(index=False)}")
    if results.num_errors:
        print(f"{results.num_errors} trial(s) failed (status ERROR in the table); rerunning the command retries them")
    print(f"\nsweep done in {wall:.0f} s\ntrials table: {table}\nTensorBoard:  tensorboard --logdir {sweep.dir}")
    if best:
        print(f"best trial:   {best['trial_id']} ({best['model']}, {sweep.config.tune.metric} "
              f"{best[f'{sweep.config.tune.metric}_last']:.3f})\nbest model:   {exported['model']} "
              f"(config {exported['config']})")
    return {"sweep_dir": sweep.dir, "table": table, "rows": rows, "best": best, "exported": exported,
            "trials": trials, "by_q": by_q, "wall_s": wall}


if __name__ == "__main__":
    main()
