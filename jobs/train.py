"""Train a BagNet (or any zoo model) data-parallel with Ray Train.

    python jobs/train.py                                   # synthetic world, local Ray, 2 CPU workers
    python jobs/train.py --config configs/imagenet-bagnet33.yaml scaling.num_workers=16
    ray job submit --working-dir . -- python jobs/train.py --config configs/imagenet-bagnet33.yaml

Every epoch reports train/val top-1 and top-5 with a checkpoint and rewrites
``<storage>/<name>/metrics.parquet`` from the history kept inside the checkpoint, so a resumed run
has each epoch exactly once. Running the same command again resumes an interrupted run (same
``run.name`` and ``run.storage_path``) or reports that it is complete. The final model is exported
to ``<storage>/<name>/model.pt``, a plain state_dict for ``create_model(name, weights=...)``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python jobs/train.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bagnet.config import ConfigError, dump_yaml, from_dict, load_config, require, to_dict
from bagnet.training import OptimConfig, evaluate, make_optimizer, train_epoch
from store import storage
from jobs.datasets import DataConfig, TrainData, build_datasets, check_paths

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"


@dataclass
class ModelConfig:
    name: str = "bagnet17_small"
    weights: str | None = None  # warm start: local path, s3://, URL or torchvision weights name
    aligned: bool = False

    def validate(self) -> None:
        from bagnet.models import list_models

        require(self.name in list_models(), "name", f"unknown model {self.name!r}; known: {', '.join(list_models())}")
        if self.weights and not storage.is_remote(self.weights) and ("/" in self.weights or self.weights.endswith((".pt", ".pth", ".tar"))):
            require(Path(self.weights).is_file(), "weights", f"file not found: {self.weights}")


@dataclass
class ScalingCfg:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # leave CPUs to Ray Data; 1 worker x all CPUs deadlocks ingest
    gpus_per_worker: float = 1.0
    accelerator_type: str | None = None  # e.g. "A100", "H100"

    def validate(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")


@dataclass
class RunCfg:
    name: str | None = None  # default: the config file's stem
    storage_path: str = "results/train"  # local dir or s3://bucket/prefix
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    checkpoints_to_keep: int = 2
    log_every: int = 20  # steps between progress lines
    crash_after_epoch: int | None = None  # fault drill: a worker process dies once, right after this epoch
    seed: int = 0  # model initialisation; the batch order also depends on Ray Data's streaming


@dataclass
class TrainJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingCfg = field(default_factory=ScalingCfg)
    run: RunCfg = field(default_factory=RunCfg)


STATE_FILE = "state.pt"


def _checkpoint_state(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)


CHECKPOINT_PREFIX = "epoch_"


def checkpoint_dir_name(epoch: int) -> str:
    """The directory of epoch ``epoch``'s checkpoint inside the run dir."""
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def checkpoint_epoch(path: str) -> int:
    """The epoch of the checkpoint at ``path`` (a directory :func:`checkpoint_dir_name` named)."""
    return int(path.rstrip("/").rsplit("/", 1)[-1].removeprefix(CHECKPOINT_PREFIX))


def _resume_state(run_dir: str) -> dict | None:
    """The newest persisted training state, or None for a fresh run.

    Ray resumes from the latest checkpoint its controller registered, but the controller picks a
    reported checkpoint up only at its next poll of the workers (about 2 s later). Rank 0 rewrites
    ``metrics.parquet`` right after ``ray.train.report`` has persisted an epoch's checkpoint, so that
    table is the commit record: a worker killed in between leaves a newer committed epoch, whose
    checkpoint directory is loaded instead of training that epoch again. One checkpoint is loaded.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    registered = checkpoint_epoch(checkpoint.path) + 1 if checkpoint else 0  # epochs it holds
    metrics_path = storage.join(run_dir, "metrics.parquet")
    committed = storage.read_table(metrics_path).num_rows if storage.exists(metrics_path) else 0
    if committed > registered:
        fs, inner = storage.pyarrow_fs(storage.join(run_dir, checkpoint_dir_name(committed - 1)))
        checkpoint = ray.train.Checkpoint(inner, filesystem=fs)
    return _checkpoint_state(checkpoint) if checkpoint else None


def _to_batches(iterator, device):
    from bagnet.imagenet import to_model_input

    for batch in iterator:
        yield to_model_input(batch["image"].to(device)), batch["label"].to(device).long()


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    from bagnet.models import create_model

    cfg = from_dict(TrainJobConfig, loop_config["job"])
    num_classes, train_size, run_dir = loop_config["num_classes"], loop_config["train_size"], loop_config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log = (lambda msg: print(f"[train] {msg}", flush=True)) if rank == 0 else None

    kwargs = {"aligned": True} if cfg.model.aligned else {}
    torch.manual_seed(cfg.run.seed)
    model = create_model(cfg.model.name, num_classes=num_classes, weights=cfg.model.weights, **kwargs)
    if cfg.optim.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    bare = getattr(model, "module", model)
    device = ray.train.torch.get_device()
    global_batch = cfg.optim.batch_size * world * cfg.optim.grad_accum
    optimizer = make_optimizer(model, cfg.optim, global_batch)

    start, history = 0, []
    if state := _resume_state(run_dir):
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["epoch"] + 1, state["history"]
        if log:
            log(f"resumed from checkpoint after epoch {start} ({len(history)} epochs of metrics)")

    steps = math.ceil(train_size / (cfg.optim.batch_size * world))
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    for epoch in range(start, cfg.optim.epochs):
        train_iter = train_shard.iter_torch_batches(batch_size=cfg.optim.batch_size, local_shuffle_buffer_size=4 * cfg.optim.batch_size)
        train_stats, timing = train_epoch(
            model, _to_batches(train_iter, device), optimizer, cfg.optim, epoch=epoch, steps_per_epoch=steps,
            global_batch=global_batch, num_classes=num_classes, device=device, log=log, log_every=cfg.run.log_every,
        )
        val_iter = val_shard.iter_torch_batches(batch_size=cfg.optim.batch_size)
        val_stats = evaluate(bare, _to_batches(val_iter, device), cfg.optim, num_classes=num_classes, device=device)
        row = {"epoch": epoch, **train_stats.reduce().summary("train"), **val_stats.reduce().summary("val"),
               **timing, "images_per_s": timing["images_per_s_per_worker"] * world, "world_size": world,
               "finished_at": time.time()}
        history = history + [row]
        metrics = {k: v for k, v in row.items() if not isinstance(v, list)}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save({"model": bare.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "history": history}, os.path.join(tmp, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(epoch))
        if rank == 0:
            write_metrics(run_dir, history)
            _maybe_crash(cfg.run.crash_after_epoch, epoch, run_dir)
            log(f"epoch {epoch + 1}/{cfg.optim.epochs} train_loss {row['train_loss']:.3f} train_top1 {row['train_top1']:.3f} "
                f"val_top1 {row['val_top1']:.3f} val_top5 {row['val_top5']:.3f} ({row['images_per_s']:.0f} img/s, {timing['epoch_seconds']:.1f} s)")


def _maybe_crash(crash_after_epoch: int | None, epoch: int, run_dir: str) -> None:
    """Fault drill: kill this worker process once (a marker in the run dir records that it happened)."""
    if crash_after_epoch != epoch:
        return
    marker = storage.join(run_dir, f"_crashed_after_epoch_{epoch}")
    if not storage.exists(marker):
        storage.write_text_atomic(marker, "worker killed by run.crash_after_epoch\n")
        print(f"[train] fault drill: killing worker after epoch {epoch + 1}", flush=True)
        os._exit(1)


def write_metrics(run_dir: str, history: list[dict]) -> None:
    import pyarrow as pa

    storage.write_table_atomic(storage.join(run_dir, "metrics.parquet"), pa.Table.from_pylist(history))


def build_trainer(cfg: TrainJobConfig, name: str, storage_path: str, data: TrainData, *, callbacks=None):
    """The ``TorchTrainer`` for ``cfg``; ``jobs/tune.py`` builds one per trial with this too."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path = storage.resolve(storage_path)
    run_dir = storage.join(storage_path, name)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    fs_kwargs = {}
    if storage_path.startswith("s3://"):
        fs, inner = storage.pyarrow_fs(storage_path)
        fs_kwargs = {"storage_filesystem": fs, "storage_path": inner}
    else:
        fs_kwargs = {"storage_path": storage_path}
    return TorchTrainer(
        train_loop,
        train_loop_config={"job": to_dict(cfg), "num_classes": data.num_classes, "train_size": data.train_size, "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources,
            accelerator_type=cfg.scaling.accelerator_type),
        run_config=ray.train.RunConfig(
            name=name, **fs_kwargs, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep)),
        datasets={"train": data.train, "val": data.val},
    )


def export_model(checkpoint, path: str) -> None:
    """Write the checkpoint's model weights as a plain state_dict."""
    buf = io.BytesIO()
    torch.save(_checkpoint_state(checkpoint)["model"], buf)
    storage.write_bytes_atomic(path, buf.getvalue())


def check_rerun(cfg: TrainJobConfig, run_dir: str) -> bool:
    """True when ``run_dir`` already holds this finished run; errors when it holds a different one."""
    config_path = storage.join(run_dir, "config.yaml")
    if not storage.exists(config_path):
        return False
    import yaml

    old = yaml.safe_load(storage.read_bytes(config_path))
    new = to_dict(cfg)
    for section in ("model", "data"):
        for key, value in new[section].items():
            if old.get(section, {}).get(key) != value:
                raise ConfigError(
                    f"run {run_dir} exists with {section}.{key}={old.get(section, {}).get(key)!r}, not {value!r}; "
                    f"set run.name to start a new run")
    if not storage.exists(storage.join(run_dir, "model.pt")):
        return False
    done = storage.read_table(storage.join(run_dir, "metrics.parquet")).num_rows
    return done >= cfg.optim.epochs


def print_kind_accuracy(data_cfg: DataConfig, per_class) -> dict[str, float]:
    """Validation top-1 per synthetic class kind (local motifs, arrangement pairs by scale)."""
    from bagnet.synthetic import SyntheticWorld
    from bagnet.metrics import group_mean

    world = SyntheticWorld(seed=data_cfg.seed, image_size=data_cfg.image_size)
    groups = [f"{c.kind}-{c.scale}" for c in world.classes]
    accuracy = group_mean(list(per_class), groups)
    print("val top-1 by class kind: " + ", ".join(f"{g} {a:.3f}" for g, a in accuracy.items()))
    return accuracy


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/synthetic.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.05 scaling.num_workers=4")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(TrainJobConfig, args.config, args.overrides)
        check_paths(cfg.data)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    name = cfg.run.name or Path(args.config).stem
    storage_path = storage.resolve(cfg.run.storage_path)
    run_dir = storage.join(storage_path, name)
    try:
        complete = check_rerun(cfg, run_dir)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    if complete:
        print(f"run {name!r} is already complete: model {storage.join(run_dir, 'model.pt')}, metrics {storage.join(run_dir, 'metrics.parquet')}")
        return {"run_dir": run_dir, "skipped": True}

    from cluster.ray_env import init_ray

    init_ray()
    data = build_datasets(cfg.data)
    storage.write_text_atomic(storage.join(run_dir, "config.yaml"), dump_yaml(cfg))
    print(f"training {cfg.model.name} on {cfg.data.dataset} ({data.num_classes} classes) with "
          f"{cfg.scaling.num_workers} worker(s); run dir {run_dir}", flush=True)
    start = time.perf_counter()
    result = build_trainer(cfg, name, storage_path, data).fit()
    if result.error:
        raise result.error
    model_path = storage.join(run_dir, "model.pt")
    export_model(result.checkpoint, model_path)
    metrics = storage.read_table(storage.join(run_dir, "metrics.parquet")).to_pandas()
    last = metrics.iloc[-1]
    print(f"done in {time.perf_counter() - start:.0f} s: val top-1 {last['val_top1']:.3f}, top-5 {last['val_top5']:.3f} "
          f"after {len(metrics)} epochs")
    if cfg.data.dataset == "synthetic":
        print_kind_accuracy(cfg.data, last["val_top1_per_class"])
    print(f"checkpoints: {result.path}\nmetrics:     {storage.join(run_dir, 'metrics.parquet')}\nmodel:       {model_path}")
    return {"run_dir": run_dir, "model": model_path, "metrics": metrics, "skipped": False}


if __name__ == "__main__":
    # Run the importable module, so Ray pickles `jobs.train.train_loop` by reference, not `__main__`'s copy.
    from jobs.train import main as _main

    _main()
