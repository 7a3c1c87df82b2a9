"""Hyperparameter sweeps with Ray Tune over the training of :mod:`cluster.training`
(``jobs/tune.py`` is the command line; ``docs/tune.md`` the guide).

A sweep config (:class:`SweepConfig`) holds a base training config (``base:``, a training config
file, and/or ``train:``, the same schema), ``search_space:`` (dotted training-config keys mapped
to ``{grid: [...]}``, ``{choice: [...]}``, ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}`` or
``{randint: [lo, hi]}``) and ``tune:`` (:class:`TuningConfig`: metric, scheduler, concurrency,
storage). Everything is validated before Ray starts; errors name the key.

Each trial is a Tune function (:func:`run_trial`) that drives one Ray Train run built by
:func:`cluster.training.build_trainer`; every epoch's metrics reach Tune through
:class:`EpochReport`, ASHA (:class:`LastEpochASHA`) stops weak trials early, and Tune's
TensorBoard logger writes each trial's curves and hyperparameters. At the end,
:func:`finish` writes the trial table (``store.schemas.TUNE_SCHEMA`` plus one column per
search-space key, named in the Parquet metadata) and exports the best trial's model.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_origin, get_type_hints

import pandas as pd
import pyarrow as pa
import ray.train
import ray.tune
import yaml
from ray.tune import ExperimentAnalysis
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from bagnet.config import (ConfigError, check_name, dump_yaml, from_dict, merge, parse_overrides, parse_yaml,
                           read_yaml, require, to_dict)
from bagnet.models import model_q
from cluster import paths, training
from cluster.configs import TrainJobConfig
from cluster.images import train_datasets
from cluster.ray_env import init_ray
from store import storage
from store.results import CONFIG_FILE, RerunMismatch, check_fingerprint
from store.schemas import METRICS, TUNE_FILE, TUNE_SCHEMA, param_column, tune_metadata

EPOCHS = "epochs_done"  # added to every report: epochs trained so far (ASHA's time axis)
DISTRIBUTIONS = ("grid", "choice", "loguniform", "uniform", "randint")
FIXED_KEYS = {"optim.epochs": "it is the scheduler's max_t; set it under train:",
              "run.name": "each trial's Train run is named after the trial",
              "run.storage_path": "Train runs live under the sweep directory"}
RECORD_FILE = "sweep.yaml"  # the sweep's fingerprint, checked when it is resumed
# The trial table of a sweep with errored trials: not the published TUNE_FILE (readers skip "_" files).
INCOMPLETE_FILE = f"_{TUNE_FILE.removesuffix('.parquet')}.incomplete.parquet"


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class SchedulerConfig:
    kind: Literal["asha", "fifo"] = "asha"  # fifo: every trial runs all epochs
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: float = 2.0  # ASHA keeps the top 1/reduction_factor at each rung
    brackets: int = 1

    def validate(self) -> None:
        require(self.grace_period >= 1, "grace_period", f"must be >= 1, got {self.grace_period}")
        require(self.reduction_factor > 1, "reduction_factor", f"must be > 1, got {self.reduction_factor}")
        require(self.brackets >= 1, "brackets", f"must be >= 1, got {self.brackets}")


@dataclass
class TuningConfig:
    """The ``tune:`` section: how the search runs (named apart from ``ray.tune.TuneConfig``)."""

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
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def validate(self) -> None:
        require(self.metric in METRICS, "metric", f"must be one of {', '.join(METRICS)}, got {self.metric!r}")
        require(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        require(self.max_concurrent_trials >= 0, "max_concurrent_trials", f"must be >= 0, got {self.max_concurrent_trials}")
        require(self.driver_cpus > 0, "driver_cpus", f"must be > 0, got {self.driver_cpus}")
        require(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        if self.name is not None:
            check_name(self.name, "name")


@dataclass
class SweepConfig:
    base: str | None = None  # training config file (relative to the sweep file); `train:` overrides it
    train: dict[str, Any] = field(default_factory=dict)
    search_space: dict[str, Any] = field(default_factory=dict)
    tune: TuningConfig = field(default_factory=TuningConfig)


@dataclass
class Sweep:
    """A validated sweep: its config, the base training config (a plain mapping: each trial
    applies its parameters to it) and Tune's param space."""

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

    @property
    def params(self) -> list[str]:
        """The swept keys, in config order."""
        return list(self.config.search_space)


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


# ---------------------------------------------------------------------------------------------
# the search space


def _check_key(key: str) -> None:
    """``key`` must name one leaf field of TrainJobConfig, or an entry of a mapping field
    (``model.options.aligned``; the values then decide whether the model has that option)."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"search_space: parameter names must be dotted config keys, got {key!r}")
    if key in FIXED_KEYS:
        raise ConfigError(f"search_space.{key}: cannot be swept ({FIXED_KEYS[key]})")
    cls: Any = TrainJobConfig
    done: list[str] = []
    for part in key.split("."):
        if get_origin(cls) is dict:
            return
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
            out[key] = ray.tune.grid_search(list(args)) if kind == "grid" else ray.tune.choice(list(args))
            continue
        low, high = _bounds(key, kind, args)
        if kind == "randint":  # Tune's randint excludes `high`
            _check_value(base, key, low), _check_value(base, key, high - 1)
            out[key] = ray.tune.randint(low, high)
        else:
            _check_value(base, key, float(low)), _check_value(base, key, float(high))
            out[key] = (ray.tune.loguniform if kind == "loguniform" else ray.tune.uniform)(low, high)
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
    ``search_space.optim.lr={grid: [0.1, 0.2]}`` (its key keeps its dots). Nothing starts before
    everything is valid.
    """
    path = Path(path)
    raw = read_yaml(path)
    plain = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if sep and key.startswith("search_space."):
            raw = merge(raw, {"search_space": {key[len("search_space."):]: parse_yaml(value)}})
        else:
            plain.append(item)
    raw = merge(raw, parse_overrides(plain))
    try:
        config = from_dict(SweepConfig, raw)
        base = read_yaml(path.parent / config.base) if config.base else {}
        paths.check_placeholder(raw)
        paths.check_placeholder(base, "base")
        base = _absolute_local_paths(paths.root_paths(merge(base, config.train), TrainJobConfig, outputs=False))
        try:
            from_dict(TrainJobConfig, base)
        except ConfigError as err:
            raise ConfigError(f"train.{err}") from None
        param_space = build_param_space(base, config.search_space)
        storage_path = storage.resolve(paths.rooted(config.tune.storage_path, "tune.storage_path"))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return Sweep(config, base, param_space, config.tune.name or path.stem, storage_path)


# ---------------------------------------------------------------------------------------------
# the trial: one Ray Train run


class EpochReport(TuneReportCallback):
    """TuneReportCallback that also reports ``epochs_done`` (ASHA's time axis) and uses it as
    TensorBoard's step, so a resumed trial continues its curves instead of restarting them.

    Relies on Ray 2.60's ``UserCallback.after_report(run_context, metrics, checkpoint)``, which
    ``TuneReportCallback`` implements by forwarding ``metrics[0]`` (see constraints.txt).
    """

    def after_report(self, run_context, metrics, checkpoint):
        done = metrics[0]["epoch"] + 1
        first = {**metrics[0], EPOCHS: done, "timesteps_total": done}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


class FreeEndedTrials(ray.tune.Callback):
    """Frees the placement group of each ended trial's Train run that is still held
    ``grace_s`` seconds after the trial ended (see :func:`cluster.training.release_placement_group`)."""

    def __init__(self, sweep_dir: str, grace_s: float = 20.0) -> None:
        self.sweep_dir, self.grace_s = sweep_dir, grace_s
        self.ended: dict[str, float] = {}  # trial id -> when it ended

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended[trial.trial_id] = time.monotonic()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended[trial.trial_id] = time.monotonic()

    def on_step_begin(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        for trial_id in [t for t, ended in self.ended.items() if now - ended >= self.grace_s]:
            del self.ended[trial_id]
            if training.release_placement_group(storage.join(train_root(self.sweep_dir), trial_id)):
                print(f"[tune] freed the placement group trial {trial_id} left behind", flush=True)


def train_root(sweep_dir: str) -> str:
    """Where the trials' Train runs live: ``<sweep>/train/<trial_id>/``."""
    return storage.join(sweep_dir, "train")


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep_dir: str) -> None:
    """Tune function trainable: the Train driver of one trial.

    The Train run is named after the trial id, so a restored trial resumes its own checkpoints.
    """
    init_ray()  # this process's DataContext settings travel with the datasets it builds
    cfg = trial_config(base, params)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = training.build_trainer(cfg, trial_id, train_root(sweep_dir), train_datasets(cfg.data),
                                     callbacks=[EpochReport()])
    result = trainer.fit()
    if result.error:
        raise result.error


# ---------------------------------------------------------------------------------------------
# the Tuner, and resuming it


class LastEpochASHA(ASHAScheduler):
    """ASHA on ``epochs_done`` that never stops a trial at its last epoch.

    Tune stops a trial by ending its driver actor, which takes the Train controller with it before
    it can release its workers' placement group (Train's detached cleaner frees it later, and
    :class:`FreeEndedTrials` if that cleaner has not). A trial
    at its last epoch ends by itself a moment later, so stopping it there would only lose that
    clean exit. Reads ``ASHAScheduler._max_t``, private in Ray 2.60 (see constraints.txt).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(time_attr=EPOCHS, **kwargs)

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if result.get(EPOCHS, 0) >= self._max_t else action


def _trainable(sweep: Sweep):
    fn = ray.tune.with_parameters(run_trial, base=sweep.base, sweep_dir=sweep.dir)
    return ray.tune.with_resources(fn, {"CPU": sweep.config.tune.driver_cpus})


def sweep_record(sweep: Sweep) -> dict[str, Any]:
    """The sweep's fingerprint: what must not change between a sweep and its resumption (all but
    Tune's console verbosity and the concurrency cap)."""
    tune_cfg = {k: v for k, v in to_dict(sweep.config.tune).items()
                if k not in ("verbose", "max_concurrent_trials")}
    return {"train": sweep.base, "search_space": sweep.config.search_space, "tune": tune_cfg}


def resolved_yaml(sweep: Sweep) -> str:
    """The sweep as it runs: its name, the base training config with the sweep's ``train:`` applied,
    the search space and ``tune:`` (storage resolved), as YAML."""
    tune_cfg = {**to_dict(sweep.config.tune), "name": sweep.name, "storage_path": sweep.storage_path}
    return yaml.safe_dump({"train": sweep.base, "search_space": sweep.config.search_space, "tune": tune_cfg},
                          sort_keys=False)


def check_resumable(sweep: Sweep) -> bool:
    """True when ``sweep.dir`` already holds this sweep; ConfigError naming the key when it holds
    a different one (a restored sweep keeps its old search space, so the change would be lost)."""
    record_path = storage.join(sweep.dir, RECORD_FILE)
    if not storage.exists(record_path):
        return False
    try:
        record = parse_yaml(storage.read_bytes(record_path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{record_path}: invalid YAML ({err}); restore it, or set tune.name to start a new sweep") from None
    try:
        check_fingerprint(record, sweep_record(sweep), where=f"sweep {sweep.dir}", rename="tune.name")
    except RerunMismatch as err:
        raise ConfigError(str(err)) from None
    return True


def make_tuner(sweep: Sweep) -> ray.tune.Tuner:
    """A new Tuner for ``sweep``, or the restored one when its directory holds the same sweep."""
    tc = sweep.config.tune
    location = training.ray_storage(sweep.storage_path)
    fs_kwargs = {"storage_filesystem": location["storage_filesystem"]} if "storage_filesystem" in location else {}
    restore_path = training.ray_storage(sweep.dir)["storage_path"]
    if ray.tune.Tuner.can_restore(restore_path, **fs_kwargs):
        check_resumable(sweep)
        print(f"resuming sweep {sweep.dir} (finished trials are kept)", flush=True)
        return ray.tune.Tuner.restore(restore_path, trainable=_trainable(sweep), resume_errored=True, **fs_kwargs)

    storage.write_text_atomic(storage.join(sweep.dir, RECORD_FILE), yaml.safe_dump(sweep_record(sweep), sort_keys=False))
    scheduler = None
    if tc.scheduler.kind == "asha":
        scheduler = LastEpochASHA(max_t=sweep.epochs, grace_period=tc.scheduler.grace_period,
                                  reduction_factor=tc.scheduler.reduction_factor, brackets=tc.scheduler.brackets)
    return ray.tune.Tuner(
        _trainable(sweep),
        param_space=sweep.param_space,
        tune_config=ray.tune.TuneConfig(
            metric=tc.metric, mode=tc.mode, scheduler=scheduler, num_samples=tc.num_samples,
            search_alg=BasicVariantGenerator(random_state=tc.seed, max_concurrent=tc.max_concurrent_trials)),
        run_config=ray.tune.RunConfig(
            name=sweep.name, **location, callbacks=[TBXLoggerCallback(), FreeEndedTrials(sweep.dir)], verbose=tc.verbose,
            failure_config=ray.tune.FailureConfig(max_failures=tc.max_failures)),
    )


def expected_trials(sweep: Sweep) -> int:
    """``num_samples`` x the grid's size (random draws happen per grid point)."""
    return sweep.config.tune.num_samples * math.prod(
        len(spec["grid"]) for spec in sweep.config.search_space.values() if "grid" in spec)


def unfinished_trials(sweep: Sweep) -> int:
    """Trials not yet finished according to the sweep's saved state (0 when the sweep is complete).

    An interrupted ``fit()`` returns normally and marks its stopped trials terminated; the state it
    saved first still says which were running, and it lacks the trials not yet generated.
    """
    location = training.ray_storage(sweep.dir)
    analysis = ExperimentAnalysis(location["storage_path"], storage_filesystem=location.get("storage_filesystem"))
    done = sum(t.status in ("TERMINATED", "ERROR") for t in analysis.trials)
    return expected_trials(sweep) - done


# ---------------------------------------------------------------------------------------------
# results


def _uri(path: str | None, storage_path: str) -> str | None:
    """Checkpoint paths come back without the scheme when the storage is remote."""
    if path and storage.is_remote(storage_path) and not storage.is_remote(path):
        return f"{storage_path.split('://', 1)[0]}://{path}"
    return path


def _trial_id_from_dir(path: str) -> str:
    """``run_trial_8578a_00002_2_optim_lr=...`` -> ``8578a_00002`` (for a trial that never reported)."""
    match = re.search(r"_([0-9a-f]+_\d{5})_", Path(path).name)
    return match.group(1) if match else Path(path).name


def trial_rows(sweep: Sweep, results: ray.tune.ResultGrid) -> list[dict[str, Any]]:
    """One row per trial: the columns of ``TUNE_SCHEMA`` and one per swept key (its value)."""
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
        row.update({param_column(k): params.get(k) for k in sweep.params})
        rows.append(row)
    return rows


def trial_table(sweep: Sweep, rows: list[dict[str, Any]]) -> pa.Table:
    """``rows`` as the trial table: ``TUNE_SCHEMA``'s columns, then one per swept key (type
    inferred from its values), with :func:`store.schemas.tune_metadata` naming those and the metric."""
    columns = [param_column(k) for k in sweep.params]
    arrays = [pa.array([r[f.name] for r in rows], type=f.type) for f in TUNE_SCHEMA]
    params = [pa.array([r[c] for r in rows]) for c in columns]
    tc = sweep.config.tune
    schema = pa.schema([*TUNE_SCHEMA, *(pa.field(c, a.type) for c, a in zip(columns, params))],
                       metadata=tune_metadata(sweep.params, tc.metric, tc.mode))
    return pa.Table.from_arrays([*arrays, *params], schema=schema)


def best_row(sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial whose last checkpoint scores best on ``tune.metric`` (the model that is exported)."""
    tc = sweep.config.tune
    scored = [r for r in rows if r[f"{tc.metric}_last"] is not None and r["checkpoint_path"]]
    if not scored:
        return None
    sign = 1 if tc.mode == "max" else -1
    return max(scored, key=lambda r: sign * r[f"{tc.metric}_last"])


def export_best(sweep: Sweep, row: dict[str, Any]) -> dict[str, str]:
    """``best/model.pt`` (with its spec, like a training run's), ``best/config.yaml`` (its training
    config, a ``jobs/train.py`` config) and ``best/trial.json`` (its id, score and parameters)."""
    metric = sweep.config.tune.metric
    params = {k: row[param_column(k)] for k in sweep.params}
    cfg = trial_config(sweep.base, params)
    cfg.run.name = f"{sweep.name}-best"
    fs, inner = storage.pyarrow_fs(row["checkpoint_path"])
    best_dir = storage.join(sweep.dir, "best")
    out = {"model": storage.join(best_dir, training.MODEL_FILE), "config": storage.join(best_dir, CONFIG_FILE)}
    training.export_model(ray.train.Checkpoint(inner, filesystem=fs), out["model"])
    storage.write_text_atomic(out["config"], dump_yaml(cfg))
    storage.write_json_atomic(storage.join(best_dir, "trial.json"),
                              {k: row[k] for k in ("trial_id", "model", "q", "epochs", "checkpoint_path")}
                              | {metric: row[f"{metric}_last"], "params": params})
    return out


def summary_tables(sweep: Sweep, rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials sorted by the metric, accuracy by patch size q) as DataFrames."""
    tc = sweep.config.tune
    df = pd.DataFrame(rows)
    cols = ["trial_id", *[param_column(k) for k in sweep.params], "epochs", "stopped_early", "status",
            f"{tc.metric}_last", f"{tc.metric}_best", "val_top5_last"]
    trials = df[list(dict.fromkeys(cols))].sort_values(f"{tc.metric}_last", ascending=tc.mode == "min", na_position="last")
    df["q"] = df["q"].astype("Int64")  # <NA> for the unconstrained CNNs
    full = df[df["epochs"] == df["max_epochs"]]
    by_q = df.groupby(["q", "model"], sort=True, dropna=False).agg(
        trials=("trial_id", "size"), stopped_early=("stopped_early", "sum"),
        **{f"best_{tc.metric}": (f"{tc.metric}_best", "max" if tc.mode == "max" else "min")})
    by_q[f"mean_final_{tc.metric}"] = full.groupby(["q", "model"], dropna=False)[f"{tc.metric}_last"].mean()
    return trials.reset_index(drop=True), by_q.reset_index()


@dataclass
class SweepOutcome:
    rows: list[dict[str, Any]]
    table: str  # path of the trial table
    best: dict[str, Any] | None  # the best trial's row
    exported: dict[str, str]  # best/model.pt and best/config.yaml
    trials: pd.DataFrame  # sorted by the metric
    by_q: pd.DataFrame  # accuracy by patch size q
    errors: int  # trials that failed


def finish(sweep: Sweep, results: ray.tune.ResultGrid) -> SweepOutcome:
    """Write the trial table, export the best trial's model, summarise.

    With an errored trial the sweep is not complete: its table goes to :data:`INCOMPLETE_FILE`
    (an earlier published table is withdrawn) and nothing is exported; a rerun retries those trials."""
    rows = trial_rows(sweep, results)
    errors = sum(r["status"] == "ERROR" for r in rows)
    table = storage.join(sweep.dir, INCOMPLETE_FILE if errors else TUNE_FILE)
    if errors and storage.exists(storage.join(sweep.dir, TUNE_FILE)):
        storage.delete(storage.join(sweep.dir, TUNE_FILE))
    storage.write_table_atomic(table, trial_table(sweep, rows))
    best = best_row(sweep, rows)
    trials, by_q = summary_tables(sweep, rows)
    exported = export_best(sweep, best) if best and not errors else {}
    return SweepOutcome(rows, table, best, exported, trials, by_q, errors)


__all__ = [
    "EPOCHS", "INCOMPLETE_FILE", "SchedulerConfig", "TuningConfig", "SweepConfig", "Sweep", "trial_config", "build_param_space",
    "load_sweep", "resolved_yaml", "EpochReport", "train_root", "run_trial", "LastEpochASHA", "sweep_record", "check_resumable",
    "make_tuner", "expected_trials", "unfinished_trials", "trial_rows", "trial_table", "best_row", "export_best",
    "summary_tables", "SweepOutcome", "finish",
]
