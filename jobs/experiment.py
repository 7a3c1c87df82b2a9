"""Run model-comparison experiments across all models as Ray Data pipelines.

    python jobs/experiment.py --experiment predictions                # configs/experiments-synthetic.yaml
    python jobs/experiment.py --experiment predictions,shuffle --config configs/experiments-imagenet.yaml
    python jobs/experiment.py --experiment all dataset.size=256 'models=[{name: bagnet9_small}, {name: bagnet33_small}]'
    ray job submit --working-dir . -- python jobs/experiment.py --experiment masking --config ...

Every (experiment, model) pair is a *part*; the unfinished parts of one model are computed in one
pass over the images: images are generated (synthetic) or read and decoded (ImageNet folder,
local or s3://) in parallel CPU tasks; an actor pool loads the model once per actor and runs
``bagnet.experiments.<name>.run`` of each of the model's experiments on each batch (perturbed
variants are made there, next to the model); the rows stream back and are written to
``<output>/<run_id>/<table>/experiment=<name>/model=<model>/part-*.parquet`` with a ``_SUCCESS``
marker per part and, last, a ``_SUCCESS`` run manifest. Rerunning with the same ``run_id``
skips finished parts and redoes unfinished ones. See docs/experiments.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # `python jobs/experiment.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bagnet.config import ConfigError, dump_yaml, from_dict, load_config, require, to_dict
from store import results, storage

log = logging.getLogger("jobs.experiment")

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "experiments-synthetic.yaml"
# Forwarded from the driver to every Ray task/actor (workers of a running Ray instance do not
# see variables set after it started): where S3 is, never who you are (nodes get credentials
# from their instance profile); add AWS_ACCESS_KEY_ID etc. to compute.forward_env for stores
# without one. Same policy as cluster/runtime_env.py.
DEFAULT_FORWARD_ENV = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                       "BAGNET_CACHE"]
# The actor's output columns: per (batch, experiment), its rows (Arrow IPC) and what they took.
COLUMNS = COL_EXPERIMENT, COL_ROWS, COL_IMAGES, COL_EVALS, COL_SECONDS = (
    "experiment", "rows_ipc", "images", "model_evals", "seconds")


# --------------------------------------------------------------------------------------------
# Config


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or weights.endswith((".pt", ".pth", ".tar"))


@dataclass
class ModelSpec:
    name: str
    weights: str | None = None  # local path, s3://, URL, "release", torchvision name; null: random init
    num_classes: int | None = None  # default: the dataset's

    def validate(self) -> None:
        from bagnet.models import list_models

        require(self.name in list_models(), "name", f"unknown model {self.name!r}; known: {', '.join(list_models())}")
        require(self.num_classes is None or self.num_classes >= 1, "num_classes", f"must be >= 1, got {self.num_classes}")
        if self.weights and not storage.is_remote(self.weights) and _looks_like_path(self.weights):
            require(Path(self.weights).expanduser().is_file(), "weights",
                    f"file not found: {self.weights} (train it with `python jobs/train.py "
                    f"model.name={self.name} run.name={self.name}`, or set weights: null for a random init)")

    @property
    def weights_label(self) -> str:
        return self.weights or "random"


@dataclass
class DatasetSpec:
    name: Literal["synthetic", "imagenet"] = "synthetic"
    split: str = "val"
    size: int = 1024  # synthetic: number of images
    seed: int = 0  # synthetic: world seed
    image_size: int = 64  # synthetic: side; imagenet: centre-crop side
    resize: int | None = None  # imagenet: shorter side before the crop (default image_size * 8 / 7)
    root: str | None = None  # imagenet: folder with <split>/<wnid>/*.JPEG, local or s3://
    limit: int | None = None  # imagenet: at most this many images, evenly spread over the sorted list
    read_batch_size: int = 64  # images per generation / decoding task
    num_cpus: float = 1.0  # per generation / decoding task

    def validate(self) -> None:
        require(self.image_size >= 16, "image_size", f"must be >= 16, got {self.image_size}")
        require(self.read_batch_size >= 1, "read_batch_size", f"must be >= 1, got {self.read_batch_size}")
        require(self.num_cpus > 0, "num_cpus", f"must be > 0, got {self.num_cpus}")
        if self.name == "synthetic":
            from bagnet.synthetic import SPLITS

            require(self.split in SPLITS, "split", f"{self.split!r} is not one of {sorted(SPLITS)}")
            require(self.size >= 1, "size", f"must be >= 1, got {self.size}")
        else:
            require(bool(self.root), "root", "is required when name is 'imagenet'")
            require(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")

    def fingerprint(self) -> dict[str, Any]:
        """What decides the images (not how they are batched)."""
        keys = ("name", "split", "size", "seed", "image_size") if self.name == "synthetic" else (
            "name", "split", "image_size", "resize", "root", "limit")
        return {k: getattr(self, k) for k in keys}


@dataclass
class ComputeSpec:
    batch_size: int = 64  # images per actor call
    forward_batch_size: int | None = None  # largest forward batch of perturbed variants (default batch_size)
    actor_pool_size: int = 1  # model replicas in each model's pass
    wait_for_actors_s: int | None = None  # wait this long for all replicas before images flow, then fail
    # with the resources named (None: start with the first ready replica, Ray adds the rest as they come)
    use_gpu: bool = False
    num_gpus: float = 1.0  # per actor, when use_gpu
    num_cpus: float = 1.0  # per actor; leave CPUs for the generation/decoding tasks
    memory_gb: float | None = 1.0  # memory reserved per actor (Ray logical resource). Also keeps
    # image making in its own tasks: Ray Data fuses a task stage into the actor stage when their
    # resource requests match, and the images would then be made serially inside the actor.
    torch_threads: int | None = None  # PyTorch threads per actor (default Ray's: floor(num_cpus), at least 1)
    fast: bool = False  # fold batch norm into the convs + channels-last (bagnet.fast): same results, faster
    forward_env: list[str] = field(default_factory=lambda: list(DEFAULT_FORWARD_ENV))
    max_file_mb: int = 128  # Parquet file size (in memory) before a part starts a new file
    progress_s: float = 30.0  # seconds between progress lines within a part

    def validate(self) -> None:
        for key in ("batch_size", "actor_pool_size", "max_file_mb"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.forward_batch_size is None or self.forward_batch_size >= 1, "forward_batch_size",
                f"must be >= 1, got {self.forward_batch_size}")
        require(self.num_cpus > 0, "num_cpus", f"must be > 0, got {self.num_cpus}")
        require(self.torch_threads is None or self.torch_threads >= 1, "torch_threads",
                f"must be >= 1, got {self.torch_threads}")
        require(self.wait_for_actors_s is None or self.wait_for_actors_s >= 1, "wait_for_actors_s",
                f"must be >= 1 (or null: do not wait), got {self.wait_for_actors_s}")
        require(self.memory_gb is None or self.memory_gb > 0, "memory_gb", f"must be > 0, got {self.memory_gb}")
        require(not self.use_gpu or self.num_gpus > 0, "num_gpus", f"must be > 0 with use_gpu, got {self.num_gpus}")


@dataclass
class ExperimentJobConfig:
    models: list[ModelSpec] = field(default_factory=list)
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    experiments: dict[str, Any] = field(default_factory=dict)  # name -> params (its Params dataclass)
    output: str = "results/experiments"  # local dir or s3://bucket/prefix
    run_id: str | None = None  # default: the config file's stem
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    compute: ComputeSpec = field(default_factory=ComputeSpec)

    def validate(self) -> None:
        from bagnet.experiments import EXPERIMENTS

        require(len(self.models) >= 1, "models", "list at least one model")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        require(not dup, "models", f"model {dup[0] if dup else ''!r} is listed twice")
        for name, params in self.experiments.items():
            require(name in EXPERIMENTS, f"experiments.{name}", f"unknown experiment; known: {', '.join(EXPERIMENTS)}")
            require(params is None or isinstance(params, dict), f"experiments.{name}", f"expected a mapping, got {params!r}")
        if self.run_id is not None:
            require(bool(self.run_id) and "/" not in self.run_id and not self.run_id.startswith(("_", ".")),
                    "run_id", f"{self.run_id!r} is not a directory name")


@dataclass
class Part:
    """One unit of work: an experiment on one model."""

    experiment: str
    table: str
    model: ModelSpec
    params: Any
    path: str
    fingerprint: dict[str, Any]
    marker: dict[str, Any] | None = None  # set when the part is already finished

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.model.name}"


@dataclass
class Plan:
    cfg: ExperimentJobConfig
    experiments: list[str]
    run_id: str
    run_dir: str
    parts: list[Part]
    modules: dict[str, Any]


def parse_experiments(arg: str) -> list[str]:
    from bagnet.experiments import EXPERIMENTS

    names = list(EXPERIMENTS) if arg.strip() == "all" else [n.strip() for n in arg.split(",") if n.strip()]
    for name in names:
        if name not in EXPERIMENTS:
            raise ConfigError(f"--experiment: unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}, all")
    if not names:
        raise ConfigError("--experiment: give at least one experiment name")
    return list(dict.fromkeys(names))


def _first_difference(old: Any, new: Any, key: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            diff = _first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
            if diff:
                return diff
        return None
    return None if old == new else f"{key}: {old!r} in the finished part, {new!r} now"


def make_plan(cfg: ExperimentJobConfig, experiments: list[str], config_path: str | None) -> Plan:
    """Validate everything that can be checked without Ray; raises ConfigError naming the key."""
    from bagnet.experiments import EXPERIMENTS

    modules, params = {}, {}
    for name in experiments:
        try:
            modules[name] = EXPERIMENTS[name]
        except ImportError as err:
            raise ConfigError(f"--experiment: {err}") from None
        raw = cfg.experiments.get(name) or {}
        params[name] = from_dict(modules[name].Params, raw, prefix=f"experiments.{name}.")
        helpers = getattr(modules[name], "helper_models", None)
        for key, model_name in (helpers(params[name]) if helpers else {}).items():
            require(any(m.name == model_name for m in cfg.models), f"experiments.{name}",
                    f"needs model {model_name!r} ({key}) in the models list")
    run_id = cfg.run_id or (Path(config_path).stem if config_path else "experiments")
    run_dir = storage.join(storage.resolve(cfg.output), run_id)
    common = {"dataset": cfg.dataset.fingerprint(), "seed": cfg.seed, "precision": cfg.precision}
    parts = []
    for name in experiments:
        applies_to = getattr(modules[name], "applies_to", lambda model_name: True)
        models = [spec for spec in cfg.models if applies_to(spec.name)]
        require(bool(models), f"experiments.{name}", f"applies to none of the models "
                f"({', '.join(m.name for m in cfg.models)})")
        if skipped := [spec.name for spec in cfg.models if spec not in models]:
            print(f"[experiment] {name}: not defined for {', '.join(skipped)}; left out", flush=True)
        for spec in models:
            path = results.part_dir(run_dir, modules[name].TABLE, {"experiment": name, "model": spec.name})
            fp = {**common, "model": to_dict(spec), "params": to_dict(params[name])}
            marker = results.read_marker(path)
            if marker is not None:
                diff = _first_difference(marker.get("fingerprint", {}), fp)
                if diff:
                    raise ConfigError(f"run_id: run {run_dir} already holds {name}/{spec.name} computed "
                                      f"with other settings ({diff}); set run_id to start a new run")
            parts.append(Part(name, modules[name].TABLE, spec, params[name], path, fp, marker))
    return Plan(cfg, experiments, run_id, run_dir, parts, modules)


# --------------------------------------------------------------------------------------------
# Data: images as uint8 NHWC + label + image_id, made in parallel CPU tasks


def _synthetic_images(batch: dict[str, np.ndarray], *, seed: int, image_size: int, split: str) -> dict:
    from bagnet.synthetic import SyntheticWorld

    out = SyntheticWorld(seed=seed, image_size=image_size).batch(batch["id"], split=split)
    return {"image": out["image"], "label": out["label"], "image_id": out["image_id"]}


def _imagenet_images(batch: dict[str, np.ndarray], *, root: str, size: int, resize: int) -> dict:
    """Read, decode and centre-crop; unreadable images are logged with their path and dropped."""
    from bagnet.imagenet import ImageDecodeError, decode_rgb, eval_transform

    transform = eval_transform(size, resize)
    fs, _ = storage.fsspec_fs(root)
    images, labels, ids = [], [], []
    for path, label, image_id in zip(batch["path"], batch["label"], batch["image_id"]):
        path = str(path)
        try:
            rgb = decode_rgb(fs.cat_file(path.split("://", 1)[-1]), path)
        except (ImageDecodeError, OSError) as err:
            log.warning("skipping unreadable image %s: %s", path, err)
            continue
        images.append(transform(rgb))
        labels.append(int(label))
        ids.append(str(image_id))
    return {"image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
            "label": np.asarray(labels, np.int64), "image_id": np.asarray(ids, dtype=str)}


@dataclass
class Source:
    num_images: int
    num_classes: int
    items: list[dict] | None = None  # imagenet: path, label, image_id


def describe_source(spec: DatasetSpec) -> Source:
    """Size and classes of the dataset (lists an ImageNet folder; no Ray)."""
    if spec.name == "synthetic":
        from bagnet.synthetic import SyntheticWorld

        return Source(spec.size, SyntheticWorld(seed=spec.seed, image_size=spec.image_size).num_classes)
    from bagnet.imagenet import ImageFolderIndex

    root = storage.resolve(spec.root)
    try:
        index = ImageFolderIndex(root, spec.split)
    except FileNotFoundError as err:
        raise ConfigError(f"dataset.root: {err}") from None
    samples = index.samples
    if spec.limit and spec.limit < len(samples):
        picks = np.linspace(0, len(samples) - 1, spec.limit).round().astype(int)
        samples = [samples[i] for i in picks]
    prefix = index.path.rstrip("/") + "/"
    items = [{"path": p, "label": y, "image_id": f"{spec.split}/{p.split(prefix, 1)[-1]}"} for p, y in samples]
    return Source(len(items), len(index.classes), items)


def image_dataset(spec: DatasetSpec, source: Source, runtime_env: dict | None):
    """Lazy Ray Dataset of ``image`` (uint8 NHWC), ``label``, ``image_id``."""
    import ray

    if spec.name == "synthetic":
        return ray.data.range(spec.size).map_batches(
            _synthetic_images, batch_size=spec.read_batch_size, num_cpus=spec.num_cpus, runtime_env=runtime_env,
            fn_kwargs={"seed": spec.seed, "image_size": spec.image_size, "split": spec.split})
    resize = spec.resize or round(spec.image_size * 8 / 7)
    return ray.data.from_items(source.items).map_batches(
        _imagenet_images, batch_size=spec.read_batch_size, num_cpus=spec.num_cpus, runtime_env=runtime_env,
        fn_kwargs={"root": storage.resolve(spec.root), "size": spec.image_size, "resize": resize})


# --------------------------------------------------------------------------------------------
# The model actor


def _build_model(spec: dict, num_classes: int, seed: int, device):
    import torch

    from bagnet.models import create_model

    torch.manual_seed(seed)  # a random init is the same in every actor of the pool
    weights = spec["weights"]
    if weights and not storage.is_remote(weights) and _looks_like_path(weights):
        weights = storage.resolve(weights)
    model = create_model(spec["name"], num_classes=spec["num_classes"] or num_classes, weights=weights)
    return model.eval().to(device)


class ModelActor:
    """Loads one model once, then runs each of its experiments on every batch of images.

    Returns one row per experiment and batch: the experiment's result rows as an Arrow IPC stream
    (the experiments' tables have different columns), with the images and model evaluations it
    took and its compute seconds, so the driver can route every experiment's rows to its own part.
    """

    def __init__(self, *, experiments: dict[str, dict], model: dict, helpers: dict[str, dict],
                 num_classes: int, use_gpu: bool, precision: str, seed: int, forward_batch_size: int,
                 common: dict[str, Any], fast: bool = False, torch_threads: int | None = None) -> None:
        import torch

        from bagnet.experiments import EXPERIMENTS
        from bagnet.models import model_q

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.experiments = {name: (EXPERIMENTS[name], from_dict(EXPERIMENTS[name].Params, params))
                            for name, params in experiments.items()}
        built: dict[str, Any] = {}

        def build(spec: dict):  # each distinct model once, the evaluated one included
            key = repr(sorted(spec.items()))
            if key not in built:
                net = _build_model(spec, num_classes, seed, self.device)
                if fast:
                    from bagnet.fast import optimize_for_inference

                    net = optimize_for_inference(net)
                built[key] = net
            return built[key]

        self.model = build(model)
        self.helpers = {k: build(s) for k, s in helpers.items()}
        self.model_name, self.q, self.seed = model["name"], model_q(model["name"]), seed
        self.precision, self.forward_batch_size, self.common = precision, forward_batch_size, common
        self.evals = 0
        # Every path through a zoo network (forward, patch_logits, ...) runs its first conv once
        # per image: count images there, perturbed variants included.
        stem = next(m for m in self.model.modules() if isinstance(m, torch.nn.Conv2d))
        stem.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.evals += int(args[0].shape[0])

    def run_experiment(self, name: str, images, labels, image_ids: list[str]):
        """One experiment on one batch: its rows as an Arrow table with the runner's columns."""
        import torch

        from bagnet.experiments.base import ExperimentContext

        module, params = self.experiments[name]
        ctx = ExperimentContext(
            image_ids=image_ids, model_name=self.model_name, q=self.q, seed=self.seed, device=self.device,
            helper_models=self.helpers, batch_size=self.forward_batch_size)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            rows = module.run(self.model, images, labels, params, ctx=ctx)
        missing = {"image_id", "label"} - set(rows[0]) if rows else set()
        if missing:
            raise KeyError(f"bagnet.experiments.{name}.run rows lack {sorted(missing)}")
        return results.rows_to_table(rows, {**self.common, "created_at": results.utc_now()})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from bagnet.imagenet import to_model_input

        images = to_model_input(batch["image"], self.device)
        labels = torch.as_tensor(np.asarray(batch["label"], np.int64), device=self.device)
        image_ids = [str(i) for i in batch["image_id"]]
        out: dict[str, list] = {column: [] for column in COLUMNS}
        for name in self.experiments:
            before, start = self.evals, time.perf_counter()
            table = self.run_experiment(name, images, labels, image_ids)
            out[COL_EXPERIMENT].append(name)
            out[COL_ROWS].append(results.table_to_ipc(table))
            out[COL_IMAGES].append(len(image_ids))
            out[COL_EVALS].append(self.evals - before)
            out[COL_SECONDS].append(time.perf_counter() - start)
        return {k: np.asarray(v, dtype=object if k == COL_ROWS else None) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Driver


def _runtime_env(names: list[str]) -> dict | None:
    env = {k: os.environ[k] for k in names if os.environ.get(k)}
    return {"env_vars": env} if env else None


def group_parts(parts: list[Part]) -> dict[str, list[Part]]:
    """``parts`` by model, in config order: each group is one pass over the images."""
    groups: dict[str, list[Part]] = {}
    for part in parts:
        groups.setdefault(part.model.name, []).append(part)
    return groups


@dataclass
class PartProgress:
    writer: results.PartWriter
    images: int = 0
    evals: int = 0
    compute_s: float = 0.0


def run_group(plan: Plan, parts: list[Part], source: Source, runtime_env: dict | None) -> dict[str, dict]:
    """Compute all unfinished parts of one model in one Ray Data pipeline and publish each; returns
    their markers by part key. A part is published only when the whole pass has finished."""
    import ray

    from bagnet.models import model_q
    from cluster.ray_env import data_context

    cfg, spec = plan.cfg, parts[0].model
    helpers: dict[str, dict] = {}
    for part in parts:
        helpers_fn = getattr(plan.modules[part.experiment], "helper_models", None)
        for key, name in (helpers_fn(part.params) if helpers_fn else {}).items():
            helpers[key] = to_dict(next(m for m in cfg.models if m.name == name))
    common = {"run_id": plan.run_id, "q": model_q(spec.name), "weights": spec.weights_label,
              "dataset": cfg.dataset.name, "split": cfg.dataset.split, "seed": cfg.seed,
              "precision": cfg.precision, "code_version": results.code_version()}
    with data_context(wait_for_min_actors_s=cfg.compute.wait_for_actors_s or -1):
        rows = image_dataset(cfg.dataset, source, runtime_env).map_batches(
            ModelActor,
            fn_constructor_kwargs={
                "experiments": {p.experiment: to_dict(p.params) for p in parts}, "model": to_dict(spec),
                "helpers": helpers, "num_classes": source.num_classes, "use_gpu": cfg.compute.use_gpu,
                "precision": cfg.precision, "seed": cfg.seed,
                "forward_batch_size": cfg.compute.forward_batch_size or cfg.compute.batch_size, "common": common,
                "fast": cfg.compute.fast, "torch_threads": cfg.compute.torch_threads},
            batch_size=cfg.compute.batch_size, batch_format="numpy", zero_copy_batch=False,
            compute=ray.data.ActorPoolStrategy(size=cfg.compute.actor_pool_size),
            num_cpus=cfg.compute.num_cpus, num_gpus=cfg.compute.num_gpus if cfg.compute.use_gpu else 0,
            memory=cfg.compute.memory_gb * 2**30 if cfg.compute.memory_gb else None, runtime_env=runtime_env)
    progress: dict[str, PartProgress] = {}
    for part in parts:
        results.discard(part.path)  # leftovers of an interrupted attempt
        progress[part.experiment] = PartProgress(results.PartWriter(part.path, cfg.compute.max_file_mb * 2**20))
    label = f"{'+'.join(progress)}/{spec.name}"
    start = last = time.perf_counter()
    first_result_s = None
    for block in rows.iter_batches(batch_size=None, batch_format="pyarrow"):
        if first_result_s is None:
            first_result_s = time.perf_counter() - start
        for name, payload, images, evals, seconds in zip(*(block[c].to_pylist() for c in COLUMNS)):
            p = progress[name]
            p.writer.write(results.table_from_ipc(payload))
            p.images, p.evals, p.compute_s = p.images + images, p.evals + evals, p.compute_s + seconds
        if time.perf_counter() - last >= cfg.compute.progress_s:
            last = time.perf_counter()
            images = min(p.images for p in progress.values())
            print(f"[experiment] {label}: {images}/{source.num_images} images, "
                  f"{sum(p.evals for p in progress.values()) / (last - start):.1f} evals/s", flush=True)
    wall = time.perf_counter() - start
    evals = sum(p.evals for p in progress.values())
    timing = {"group": label, "group_seconds": round(wall, 3), "startup_s": round(first_result_s or wall, 3)}
    markers = {}
    for part in parts:
        p = progress[part.experiment]
        markers[part.key] = p.writer.commit({
            "fingerprint": part.fingerprint, "images": p.images, "model_evals": p.evals,
            "seconds": round(p.compute_s, 3), **timing, "code_version": results.code_version()})
        print(f"[experiment] {part.key}: {p.writer.rows} rows ({p.images} images, {p.evals} model evaluations, "
              f"{p.compute_s:.1f} s of compute) -> {part.path}", flush=True)
    print(f"[experiment] {label}: {evals} model evaluations in {wall:.1f} s ({evals / max(wall, 1e-9):.1f}/s; "
          f"first results after {timing['startup_s']:.1f} s)", flush=True)
    return markers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True,
                        help="experiment name(s), comma-separated, or 'all': predictions, heatmaps, shuffle, interaction, masking")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/experiments-synthetic.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. dataset.size=256 compute.actor_pool_size=2 run_id=try1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wall = time.perf_counter()
    try:
        experiments = parse_experiments(args.experiment)
        cfg = load_config(ExperimentJobConfig, args.config, args.overrides)
        plan = make_plan(cfg, experiments, args.config)
        source = describe_source(cfg.dataset)
        for spec in cfg.models:
            if spec.num_classes is not None and spec.num_classes < source.num_classes:
                raise ConfigError(f"models: {spec.name} has num_classes={spec.num_classes} but the dataset has "
                                  f"{source.num_classes} classes")
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None

    todo = [p for p in plan.parts if p.marker is None]
    for part in plan.parts:
        if part.marker is not None:
            print(f"[experiment] {part.key}: finished earlier ({part.marker['rows']} rows), skipped", flush=True)
    computed: dict[str, dict] = {}
    if todo:
        from ray.exceptions import GetTimeoutError

        from cluster.ray_env import init_ray

        init_ray()
        storage.write_text_atomic(storage.join(plan.run_dir, results.CONFIG_FILE), dump_yaml(cfg))
        print(f"[experiment] run {plan.run_id}: {len(todo)} of {len(plan.parts)} part(s) to compute on "
              f"{cfg.dataset.name}/{cfg.dataset.split} ({source.num_images} images) -> {plan.run_dir}", flush=True)
        runtime_env = _runtime_env(cfg.compute.forward_env)
        for model, group in group_parts(todo).items():
            try:
                computed.update(run_group(plan, group, source, runtime_env))
            except GetTimeoutError as err:  # raised only with compute.wait_for_actors_s
                c = cfg.compute
                raise SystemExit(
                    f"error: compute.wait_for_actors_s: the {c.actor_pool_size} replica(s) of {model} (each "
                    f"num_cpus={c.num_cpus}, num_gpus={c.num_gpus if c.use_gpu else 0}, memory_gb={c.memory_gb}) "
                    f"did not start within {c.wait_for_actors_s} s: the cluster lacks those resources (`ray status`). "
                    f"{len(computed)} part(s) finished and are kept; a rerun resumes.") from err

    parts = results.completed_parts(plan.run_dir)
    manifest_exists = results.read_marker(plan.run_dir) is not None
    wall = time.perf_counter() - wall
    evals = sum(m["model_evals"] for m in computed.values())
    group_seconds = {m["group"]: m["group_seconds"] for m in computed.values()}
    computed_s = sum(group_seconds.values())
    if computed or not manifest_exists:
        results.write_manifest(plan.run_dir, {
            "run_id": plan.run_id, "complete": True, "experiments": plan.experiments,
            "created_at": results.now_iso(), "code_version": results.code_version(),
            "config": to_dict(cfg), "rows_per_table": results.rows_per_table(parts),
            "parts": {rel: {k: v for k, v in m.items() if k != "fingerprint"} for rel, m in parts.items()},
            "timings": {"wall_s": round(wall, 3), "groups_s": group_seconds,
                        "model_evals": evals, "model_evals_per_s": round(evals / computed_s, 3) if computed_s else None},
        })
    rows: dict[str, int] = {}
    for part in plan.parts:
        rows[part.table] = rows.get(part.table, 0) + (computed.get(part.key) or part.marker)["rows"]
    print(f"[experiment] run {plan.run_id} complete: {plan.run_dir}")
    for table, n in rows.items():
        print(f"  {table}: {n} rows")
    rate = f"{evals / computed_s:.1f} model evaluations/s" if computed_s else "nothing computed"
    print(f"  {len(computed)} part(s) computed, {len(plan.parts) - len(computed)} skipped; wall {wall:.1f} s; "
          f"{evals} model evaluations, {rate}", flush=True)
    return {"run_id": plan.run_id, "run_dir": plan.run_dir, "rows": rows, "computed": sorted(computed),
            "skipped": sorted(p.key for p in plan.parts if p.key not in computed), "wall_s": wall,
            "model_evals": evals, "model_evals_per_s": evals / computed_s if computed_s else None}


if __name__ == "__main__":
    main()
