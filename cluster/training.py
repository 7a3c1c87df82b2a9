"""Data-parallel training with Ray Train: the worker loop, its checkpoint/resume protocol, the
exported model and the rerun check. ``jobs/train.py`` is the command line; :mod:`cluster.sweep`
builds one trainer per trial with :func:`build_trainer`.

A run lives in ``<run.storage_path>/<name>/``:

- ``epoch_NNNN/state.pt``: Ray Train's checkpoints (model, optimizer, epoch, metric history and
  the model's spec), the newest ``run.checkpoints_to_keep`` of them;
- ``metrics.parquet``: one row per finished epoch, rewritten by rank 0 after each checkpoint from
  the history kept inside it, so a resumed run has each epoch exactly once;
- ``config.yaml``: the resolved training config (its model and data sections are the run's
  fingerprint, see :func:`fingerprint`);
- ``events.out.tfevents.bagnet``: TensorBoard's view of the same history (train/val loss, top-1,
  top-5, lr, images/s per epoch; the hyperparameters), rewritten with ``metrics.parquet``;
- ``model.pt``: the final model with its spec (:func:`bagnet.models.model_bytes`), so
  ``create_model(name, weights=...)`` rebuilds exactly the trained function (options such as
  ``aligned``, number of classes, class names).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import ray.train
import ray.train.torch
import torch
import yaml
from ray.train.torch import TorchTrainer
from ray.util.placement_group import PlacementGroup, remove_placement_group
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from bagnet.config import ConfigError, check_name, dump_yaml, parse_yaml, to_dict
from bagnet.imagenet import to_model_input
from bagnet.models import ModelSpec, create_model, model_bytes
from bagnet.training import evaluate, make_optimizer, train_epoch
from cluster.configs import TrainJobConfig
from cluster.images import TrainData
from cluster.ray_env import init_ray, verbose
from store import storage
from store.results import CONFIG_FILE, METRICS_FILE, MODEL_FILE, RerunMismatch, check_fingerprint

STATE_FILE = "state.pt"  # inside each checkpoint directory
CHECKPOINT_PREFIX = "epoch_"
PLACEMENT_GROUP_FILE = "_placement_group"  # the id of the run's worker placement group (hex)
# Data keys that decide how images are made in parallel, or a split training never reads: a rerun
# may change them.
DATA_KEYS_OUTSIDE_RESULT = ("read_batch_size", "num_cpus", "test_size")
# The settings a resumed run may change: they decide how and where it computes, how long it runs
# and how it logs, not what one epoch does. ``optim.epochs`` continues a finished run; every
# ``scaling.*`` key may change (a resumed run may get other workers: ``optim.lr`` is per 256
# images, so the step size follows the global batch). Any other change is refused, naming the key.
RESUMABLE_KEYS = (
    "optim.epochs", "optim.channels_last", "scaling", "run.name", "run.storage_path", "run.max_failures",
    "run.checkpoints_to_keep", "run.log_every", "run.crash_after_epoch",
    *(f"data.{key}" for key in DATA_KEYS_OUTSIDE_RESULT))


@dataclass(frozen=True)
class TrainTask:
    """What every Ray Train worker gets (Ray pickles it): the job config, the spec of the model to
    build (its number of classes and class names come from the data) and the run's folder."""

    job: TrainJobConfig
    spec: ModelSpec
    train_size: int
    run_dir: str


@dataclass
class TrainResult:
    run_dir: str
    model_path: str
    metrics_path: str
    checkpoints: str  # Ray Train's run folder
    metrics: pd.DataFrame
    seconds: float


# ---------------------------------------------------------------------------------------------
# where a run lives, and whether to run it


def ray_storage(path: str) -> dict[str, Any]:
    """Ray Train's / Tune's ``storage_path`` (plus ``storage_filesystem`` for ``s3://``) for
    ``path``, so Ray reaches S3 through the project's pyarrow filesystem and endpoint policy."""
    path = storage.resolve(path)
    if storage.is_remote(path):
        fs, inner = storage.pyarrow_fs(path)
        return {"storage_filesystem": fs, "storage_path": inner}
    return {"storage_path": path}


def run_dir(cfg: TrainJobConfig, name: str) -> str:
    """Run ``name``'s folder (ConfigError unless ``name`` is a safe folder name)."""
    check_name(name, "run.name")
    return storage.join(storage.resolve(cfg.run.storage_path), name)


def fingerprint(config: Mapping[str, Any]) -> dict[str, Any]:
    """What decides a run's result, from its config as a plain mapping (``to_dict`` of a
    TrainJobConfig, or a run's saved ``config.yaml``): everything but :data:`RESUMABLE_KEYS`.
    """
    out = {section: dict(values) for section, values in config.items() if isinstance(values, Mapping)}
    for dotted in RESUMABLE_KEYS:
        section, _, key = dotted.partition(".")
        if key:
            out.get(section, {}).pop(key, None)
        else:
            out.pop(section, None)
    return out


def check_rerun(cfg: TrainJobConfig, path: str) -> bool:
    """True when run folder ``path`` already holds this finished run (``model.pt`` and
    ``optim.epochs`` epochs of metrics); ConfigError naming the key when it holds a run whose
    :func:`fingerprint` differs."""
    config_path = storage.join(path, CONFIG_FILE)
    if not storage.exists(config_path):
        return False
    try:
        saved = parse_yaml(storage.read_bytes(config_path)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{config_path}: invalid YAML ({err}); restore it, or set run.name to start a new run") from None
    if not isinstance(saved, Mapping):
        raise ConfigError(f"{config_path}: not a training config (a mapping); restore it, or set run.name to start "
                          "a new run")
    try:
        check_fingerprint(fingerprint(saved), fingerprint(to_dict(cfg)), where=f"run {path}", rename="run.name")
    except RerunMismatch as err:
        raise ConfigError(str(err)) from None
    if not storage.exists(storage.join(path, MODEL_FILE)):
        return False
    return storage.read_table(storage.join(path, METRICS_FILE)).num_rows >= cfg.optim.epochs


def model_spec(cfg: TrainJobConfig, data: TrainData) -> ModelSpec:
    """The spec of the model ``cfg`` trains on ``data``; ``model.num_classes``, when set, must be
    the dataset's."""
    if cfg.model.num_classes not in (None, data.num_classes):
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} differs from the {data.num_classes} "
                          f"classes of the {cfg.data.dataset} data; leave it null to train on them")
    return ModelSpec(cfg.model.name, data.num_classes, dict(cfg.model.options), classes=list(data.class_names))


# ---------------------------------------------------------------------------------------------
# checkpoints and the resume protocol


def checkpoint_dir_name(epoch: int) -> str:
    """The directory of epoch ``epoch``'s checkpoint inside the run dir."""
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def checkpoint_epoch(path: str) -> int:
    """The epoch of the checkpoint at ``path`` (a directory :func:`checkpoint_dir_name` named)."""
    return int(storage.name(path).removeprefix(CHECKPOINT_PREFIX))


def checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The training state a checkpoint holds: ``model``, ``optimizer``, ``epoch``, ``history``,
    ``model_spec``. Read with ``weights_only=True``: tensors and plain data only, so a pickle
    planted in the run folder cannot run code; a file that is not such a state is named."""
    with checkpoint.as_directory() as d:
        path = os.path.join(d, STATE_FILE)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types on a bad or unsafe file
            raise ValueError(f"cannot load training state {checkpoint.path}/{STATE_FILE}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else 'empty or truncated file'}") from None


def _resume_state(path: str) -> dict[str, Any] | None:
    """The newest persisted training state of run folder ``path``, or None for a fresh run.

    Ray resumes from the latest checkpoint its controller registered, but the controller picks a
    reported checkpoint up only at its next poll of the workers (about 2 s later). Rank 0 rewrites
    ``metrics.parquet`` right after ``ray.train.report`` has persisted an epoch's checkpoint, so that
    table is the commit record: a worker killed in between leaves a newer committed epoch, whose
    checkpoint directory is loaded instead of training that epoch again. One checkpoint is loaded.
    """
    checkpoint = ray.train.get_checkpoint()
    registered = checkpoint_epoch(checkpoint.path) + 1 if checkpoint else 0  # epochs it holds
    metrics_path = storage.join(path, METRICS_FILE)
    committed = storage.read_table(metrics_path).num_rows if storage.exists(metrics_path) else 0
    if committed > registered:
        fs, inner = storage.pyarrow_fs(storage.join(path, checkpoint_dir_name(committed - 1)))
        checkpoint = ray.train.Checkpoint(inner, filesystem=fs)
    return checkpoint_state(checkpoint) if checkpoint else None


def write_metrics(path: str, history: list[dict[str, Any]]) -> None:
    """Rewrite run folder ``path``'s ``metrics.parquet`` from the epoch history."""
    storage.write_table_atomic(storage.join(path, METRICS_FILE), pa.Table.from_pylist(history))


TENSORBOARD_FILE = "events.out.tfevents.bagnet"  # TensorBoard reads any file named *tfevents*
TENSORBOARD_SCALARS = {"train/loss": "train_loss", "val/loss": "val_loss", "train/top1": "train_top1",
                       "val/top1": "val_top1", "train/top5": "train_top5", "val/top5": "val_top5",
                       "lr": "lr", "images_per_s": "images_per_s"}


def run_hparams(cfg: TrainJobConfig) -> dict[str, Any]:
    """The hyperparameters TensorBoard's HPARAMS tab shows for a run (model options included)."""
    out = {"model.name": cfg.model.name, "data.dataset": cfg.data.dataset, "data.image_size": cfg.data.image_size,
           "scaling.num_workers": cfg.scaling.num_workers,
           **{f"optim.{k}": getattr(cfg.optim, k) for k in ("lr", "batch_size", "epochs", "weight_decay", "schedule")}}
    out.update({f"model.options.{k}": v for k, v in cfg.model.options.items()})
    return {k: v for k, v in out.items() if isinstance(v, (bool, int, float, str))}


def write_tensorboard(path: str, history: list[dict[str, Any]], hparam_dict: dict[str, Any]) -> None:
    """Rewrite run folder ``path``'s TensorBoard event file from the epoch history (step = epochs
    done), like ``metrics.parquet``: written locally, then put in place (``s3://`` too) in one write."""
    with tempfile.TemporaryDirectory() as tmp:
        with SummaryWriter(tmp) as writer:
            for row in history:
                for tag, key in TENSORBOARD_SCALARS.items():
                    writer.add_scalar(tag, row[key], row["epoch"] + 1, walltime=row["finished_at"])
            last = history[-1]
            for summary in hparams(hparam_dict, {"hparam/val_top1": last["val_top1"], "hparam/val_top5": last["val_top5"]}):
                writer.file_writer.add_summary(summary)
        (event_file,) = [name for name in os.listdir(tmp) if "tfevents" in name]
        with open(os.path.join(tmp, event_file), "rb") as f:
            storage.write_bytes_atomic(storage.join(path, TENSORBOARD_FILE), f.read())


def _maybe_crash(crash_after_epoch: int | None, epoch: int, path: str) -> None:
    """Fault drill: kill this worker process once (a marker in the run dir records that it happened)."""
    if crash_after_epoch != epoch:
        return
    marker = storage.join(path, f"_crashed_after_epoch_{epoch}")
    if not storage.exists(marker):
        storage.write_text_atomic(marker, "worker killed by run.crash_after_epoch\n")
        print(f"[train] fault drill: killing worker after epoch {epoch + 1}", flush=True)
        os._exit(1)


# ---------------------------------------------------------------------------------------------
# the worker loop


def _to_batches(iterator: Iterable[dict], device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in iterator:
        yield to_model_input(batch["image"].to(device)), batch["label"].to(device).long()


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one worker's shuffle in one epoch: another order every epoch and worker, the
    same on a rerun of the run's seed."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def ordered_ingest() -> ray.train.DataConfig:
    """Ray Train's data config with Ray Data's ordered execution: every worker gets the same
    blocks in the same order on a rerun (the default streams blocks to whichever worker is free)."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def train_loop(loop_config: dict[str, TrainTask]) -> None:
    """Runs on every Ray Train worker: resume, then train, evaluate and checkpoint each epoch."""
    task = loop_config["task"]
    cfg, spec = task.job, task.spec
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    prefix = f"[train {storage.name(task.run_dir)}]"  # the run's name: runs may train at once
    log = (lambda msg: print(f"{prefix} {msg}", flush=True)) if rank == 0 else None
    if not verbose():  # Train's INFO lines (each report, each checkpoint) reach the console through the root logger
        logging.getLogger().setLevel(logging.WARNING)

    torch.manual_seed(cfg.run.seed)
    model = create_model(spec.name, num_classes=spec.num_classes, weights=cfg.model.weights, **spec.options)
    if cfg.optim.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    if rank == 0:
        record_placement_group(task.run_dir)
    bare = getattr(model, "module", model)
    device = ray.train.torch.get_device()
    global_batch = cfg.optim.batch_size * world * cfg.optim.grad_accum
    optimizer = make_optimizer(model, cfg.optim, global_batch)

    start, history = 0, []
    if state := _resume_state(task.run_dir):
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["epoch"] + 1, state["history"]
        if log:
            log(f"resumed from checkpoint after epoch {start} ({len(history)} epochs of metrics)")

    steps = math.ceil(task.train_size / (cfg.optim.batch_size * world))
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    for epoch in range(start, cfg.optim.epochs):
        train_iter = train_shard.iter_torch_batches(batch_size=cfg.optim.batch_size,
                                                    local_shuffle_buffer_size=4 * cfg.optim.batch_size,
                                                    local_shuffle_seed=shuffle_seed(cfg.run.seed, epoch, rank))
        train_stats, timing = train_epoch(
            model, _to_batches(train_iter, device), optimizer, cfg.optim, epoch=epoch, steps_per_epoch=steps,
            global_batch=global_batch, num_classes=spec.num_classes, device=device, log=log,
            log_every=cfg.run.log_every)
        val_iter = val_shard.iter_torch_batches(batch_size=cfg.optim.batch_size)
        val_stats = evaluate(bare, _to_batches(val_iter, device), cfg.optim, num_classes=spec.num_classes, device=device)
        row = {"epoch": epoch, **train_stats.reduce().summary("train"), **val_stats.reduce().summary("val"),
               **timing, "images_per_s": timing["images_per_s_per_worker"] * world, "world_size": world,
               "finished_at": time.time()}
        history = history + [row]
        metrics = {k: v for k, v in row.items() if not isinstance(v, list)}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save({"model": bare.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "history": history, "model_spec": spec.to_dict()}, os.path.join(tmp, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(epoch))
        if rank == 0:
            write_metrics(task.run_dir, history)
            write_tensorboard(task.run_dir, history, run_hparams(cfg))
            _maybe_crash(cfg.run.crash_after_epoch, epoch, task.run_dir)
            log(f"epoch {epoch + 1}/{cfg.optim.epochs} train_loss {row['train_loss']:.3f} train_top1 "
                f"{row['train_top1']:.3f} val_top1 {row['val_top1']:.3f} val_top5 {row['val_top5']:.3f} "
                f"({row['images_per_s']:.0f} img/s, {timing['epoch_seconds']:.1f} s)")


def record_placement_group(run_dir: str) -> None:
    """Write the id of the worker group's placement group to ``<run_dir>/_placement_group``, so
    whoever ends the run's controller ungracefully can free it (:func:`release_placement_group`)."""
    group = ray.util.get_current_placement_group()
    if group is not None:
        storage.write_text_atomic(storage.join(run_dir, PLACEMENT_GROUP_FILE), group.id.hex())


# ---------------------------------------------------------------------------------------------
# the driver side


def build_trainer(cfg: TrainJobConfig, name: str, storage_path: str, data: TrainData, *,
                  callbacks: list | None = None) -> TorchTrainer:
    """The ``TorchTrainer`` of run ``name`` under ``storage_path`` for ``cfg`` on ``data``."""
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    task = TrainTask(cfg, model_spec(cfg, data), data.train_size,
                     storage.join(storage.resolve(storage_path), name))
    return TorchTrainer(
        train_loop,
        train_loop_config={"task": task},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources,
            accelerator_type=cfg.scaling.accelerator_type),
        run_config=ray.train.RunConfig(
            name=name, **ray_storage(storage_path), callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep)),
        datasets={"train": data.train, "val": data.val},
        dataset_config=ordered_ingest(),
    )


def release_placement_group(run_dir: str) -> bool:
    """Remove the placement group that run ``run_dir`` recorded if it still holds resources.

    A run whose controller was ended from outside (Tune stopping a trial) leaves its workers'
    placement group to Train's detached cleaner, which polls the dashboard and so may lag or, with
    the dashboard unreachable, never free it: the next trial then waits for resources forever.
    True when a group was removed here.
    """
    path = storage.join(run_dir, PLACEMENT_GROUP_FILE)
    if not storage.exists(path):
        return False
    group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(storage.read_bytes(path).decode().strip())))
    if ray.util.placement_group_table(group).get("state", "REMOVED") == "REMOVED":
        return False
    remove_placement_group(group)
    return True


def check_runs_fit(cfg: TrainJobConfig, at_once: int, key: str) -> None:
    """ConfigError naming ``key`` unless the cluster holds ``at_once`` runs of ``cfg`` together:
    each run's workers (``scaling``) plus one data task (``data.num_cpus``), which cannot start while
    the runs' workers hold every CPU, so the runs would wait for each other forever."""
    if at_once == 1:
        return
    have = init_ray()
    workers = {"CPU": cfg.scaling.num_workers * cfg.scaling.cpus_per_worker,
               "GPU": cfg.scaling.num_workers * cfg.scaling.gpus_per_worker if cfg.scaling.use_gpu else 0.0}
    need = {"CPU": at_once * workers["CPU"] + cfg.data.num_cpus, "GPU": at_once * workers["GPU"]}
    for resource, amount in need.items():
        if amount > have.get(resource, 0.0) + 1e-9:
            raise ConfigError(
                f"{key}: {at_once} training runs at once need {amount:g} {resource}s ({at_once} x {workers[resource]:g} "
                f"for the workers (scaling.num_workers x scaling.{resource.lower()}s_per_worker)"
                + (f", plus {cfg.data.num_cpus:g} for the data tasks (data.num_cpus)" if resource == "CPU" else "")
                + f"); the cluster has {have.get(resource, 0.0):g}. Lower {key} or the per-run resources")


def export_model(checkpoint: ray.train.Checkpoint, path: str) -> None:
    """Write the checkpoint's model with its spec as a ``model.pt`` for ``create_model``."""
    state = checkpoint_state(checkpoint)
    spec = ModelSpec(**state["model_spec"])
    model = create_model(spec.name, num_classes=spec.num_classes, **spec.options)
    model.load_state_dict(state["model"])
    storage.write_bytes_atomic(path, model_bytes(model, spec))


def fit(cfg: TrainJobConfig, name: str, data: TrainData) -> TrainResult:
    """Train (or resume) run ``name`` to ``optim.epochs`` and export its model; the run's worker
    error is raised as is."""
    path = run_dir(cfg, name)
    storage.write_text_atomic(storage.join(path, CONFIG_FILE), dump_yaml(cfg))
    start = time.perf_counter()
    result = build_trainer(cfg, name, cfg.run.storage_path, data).fit()
    if result.error:
        raise result.error
    model_path, metrics_path = storage.join(path, MODEL_FILE), storage.join(path, METRICS_FILE)
    export_model(result.checkpoint, model_path)
    return TrainResult(path, model_path, metrics_path, result.path, storage.read_table(metrics_path).to_pandas(),
                       time.perf_counter() - start)


__all__ = [
    "STATE_FILE", "METRICS_FILE", "MODEL_FILE", "TrainTask", "TrainResult", "ray_storage", "run_dir",
    "fingerprint", "check_rerun", "model_spec", "checkpoint_dir_name", "checkpoint_epoch", "checkpoint_state",
    "write_metrics", "TENSORBOARD_FILE", "run_hparams", "write_tensorboard", "shuffle_seed", "ordered_ingest",
    "train_loop", "build_trainer", "check_runs_fit", "export_model", "fit",
]
