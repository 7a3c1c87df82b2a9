"""The typed configs of every job, one definition each: model, data, scaling, run, compute, and
the job configs built from them (train, experiments, reproduce; the sweep's in :mod:`cluster.sweep`
reuses the train config).

Loaded with :func:`bagnet.config.load_config` (YAML plus dotted ``key=value`` overrides); every
check here runs before Ray starts, and errors name the key. Defaults live here (or in an
experiment's ``Params``), never repeated in code that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bagnet import models as zoo
from bagnet.config import ConfigError, check_name, load_config, require, to_dict, updated
from bagnet.experiments import EXPERIMENTS
from bagnet.synthetic import SPLITS, SyntheticWorld
from bagnet.training import OptimConfig
from bagnet.weights import resolve_url
from cluster.runtime_env import FORWARDED_ENV
from store import storage
from store.results import MODEL_FILE

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MAX_IMAGE_SIZE = 2048  # px per side; larger images would need gigabytes each


def looks_like_path(weights: str) -> bool:
    """A weights value naming a file (rather than a release or torchvision weights name)."""
    return "/" in weights or weights.endswith((".pt", ".pth", ".tar"))


@dataclass
class ModelConfig:
    """A zoo model: its registered name, builder options (e.g. ``options: {aligned: true}`` for a
    BagNet) and weights (local path, ``s3://``, URL, ``release``, a torchvision weights name, or
    null for a random init)."""

    name: str = "bagnet17_small"
    weights: str | None = None
    num_classes: int | None = None  # default: the dataset's
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        require(self.name in zoo.list_models(), "name",
                f"unknown model {self.name!r}; known: {', '.join(zoo.list_models(builtin_only=True))} "
                "and torchvision's classification models")
        require(self.num_classes is None or self.num_classes >= 1, "num_classes", f"must be >= 1, got {self.num_classes}")
        try:
            zoo.check_options(self.name, self.options)
        except zoo.OptionError as err:
            raise ConfigError(f"options.{err.option}: {err}") from None

    def check_weights(self, key: str) -> None:
        """ConfigError naming ``key`` when the weights name a file (local or ``s3://``) that does not
        exist, or a name that is no release or torchvision weights of the model (checked when a job
        starts, not when the config loads: a reproduce run trains them first)."""
        if not self.weights or self.weights.startswith(("http://", "https://")):
            return
        if self.stored_weights:
            found = storage.exists(self.weights) if storage.is_remote(self.weights) else \
                Path(self.weights).expanduser().is_file()
            require(found, key, f"file not found: {self.weights} (train it with `python jobs/train.py "
                    f"model.name={self.name} run.name={self.name}`, or set weights: null for a random init)")
            return
        try:
            url = resolve_url(self.weights, self.name)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
        require(url is not None, key, f"cannot resolve weights {self.weights!r} for model {self.name!r}: not a "
                "local file, s3:// path, URL, 'release' or a torchvision weights name of this model")

    @property
    def stored_weights(self) -> str | None:
        """The weights' path (``~`` expanded) when they are a file of ours, local or ``s3://``."""
        if self.weights and (self.weights.startswith("s3://") or
                             (not storage.is_remote(self.weights) and looks_like_path(self.weights))):
            return self.weights if storage.is_remote(self.weights) else storage.resolve(self.weights)
        return None

    def check_classes(self, key: str, classes: list[str]) -> None:
        """ConfigError naming ``key`` when the weights were saved with a class list (a ``model.pt``
        of ``jobs/train.py``) that is not ``classes``, the dataset's: labels would mean other classes."""
        if self.stored_weights:
            try:
                saved = zoo.saved_classes(self.stored_weights)
            except (OSError, ValueError) as err:
                raise ConfigError(f"{key}: {err}") from None
            if diff := zoo.class_difference(saved, classes):
                raise ConfigError(f"{key}: the weights {self.weights} were trained on other classes than the "
                                  f"dataset's ({diff}); evaluate them on data with the same class folders")

    def fingerprint(self) -> dict[str, Any]:
        """What decides this model's outputs: its config and, for weights stored as a file, the
        sha256 of the file's bytes (a file replaced at the same path is another model)."""
        path = self.stored_weights
        return {**to_dict(self), "weights_sha256": storage.digest(path) if path else None}

    @property
    def weights_label(self) -> str:
        return self.weights or "random"


@dataclass
class DataConfig:
    """The images: the synthetic world or an ImageNet-layout folder (``root/<split>/<wnid>/*``)."""

    dataset: Literal["synthetic", "imagenet"] = "synthetic"
    root: str | None = None  # ImageNet folder (local or s3://) with train/ and val/
    image_size: int = 64  # synthetic: side; imagenet: crop side
    resize: int | None = None  # imagenet eval: shorter side before the centre crop (default image_size * 8 / 7)
    seed: int = 0  # synthetic: the world
    train_size: int = 6000  # synthetic: images per epoch
    val_size: int = 1000  # synthetic: validation images
    test_size: int = 1024  # synthetic: held-out images (the experiments' default split)
    limit: int | None = None  # imagenet: at most this many images per split, spread evenly over all classes
    read_batch_size: int = 64  # images per generation / decoding task
    num_cpus: float = 1.0  # per generation / decoding task

    def validate(self) -> None:
        require(16 <= self.image_size <= MAX_IMAGE_SIZE, "image_size",
                f"must be in [16, {MAX_IMAGE_SIZE}], got {self.image_size}")
        require(self.resize is None or self.resize >= self.image_size, "resize",
                f"must be >= image_size ({self.image_size}): the centre crop is cut from the resized image; "
                f"got {self.resize}")
        if self.dataset == "synthetic":
            try:
                self.world()
            except ValueError as err:
                raise ConfigError(f"image_size: the synthetic world cannot draw {self.image_size}px images "
                                  f"({err}); use 62 or more") from None
        for key in ("train_size", "val_size", "test_size", "read_batch_size"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.num_cpus > 0, "num_cpus", f"must be > 0, got {self.num_cpus}")
        require(self.dataset != "imagenet" or bool(self.root), "root", "is required when dataset is 'imagenet'")
        require(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")

    @property
    def eval_resize(self) -> int:
        return self.resize or round(self.image_size * 8 / 7)

    def synthetic_size(self, split: str) -> int:
        return {"train": self.train_size, "val": self.val_size, "test": self.test_size}[split]

    def world(self) -> SyntheticWorld:
        return SyntheticWorld(seed=self.seed, image_size=self.image_size)

    def fingerprint(self, split: str) -> dict[str, Any]:
        """What decides the images of ``split`` (not how they are batched)."""
        if self.dataset == "synthetic":
            return {"dataset": "synthetic", "split": split, "size": self.synthetic_size(split),
                    "seed": self.seed, "image_size": self.image_size}
        return {"dataset": "imagenet", "split": split, "image_size": self.image_size,
                "resize": self.eval_resize, "root": self.root, "limit": self.limit}


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # leave CPUs to Ray Data; 1 worker x all CPUs deadlocks ingest
    gpus_per_worker: float = 1.0
    accelerator_type: str | None = None  # e.g. "A100", "H100"

    def validate(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")


@dataclass
class RunConfig:
    name: str | None = None  # default: the config file's stem
    storage_path: str = "results/train"  # local dir or s3://bucket/prefix
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    checkpoints_to_keep: int = 2
    log_every: int = 20  # steps between progress lines
    crash_after_epoch: int | None = None  # fault drill: a worker process dies once, right after this epoch
    seed: int = 0  # model initialisation and each epoch's shuffle (ordered data: a rerun gives the same metrics)

    def validate(self) -> None:
        if self.name is not None:
            check_name(self.name, "name")
        require(self.max_failures >= -1, "max_failures",
                f"must be >= 0 (or -1: restart without limit), got {self.max_failures}")
        require(self.checkpoints_to_keep >= 1, "checkpoints_to_keep", f"must be >= 1, got {self.checkpoints_to_keep}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.crash_after_epoch is None or self.crash_after_epoch >= 0, "crash_after_epoch",
                f"must be >= 0, got {self.crash_after_epoch}")


@dataclass
class TrainJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        check_input_size(self.model, self.data.image_size, "model.name")


def check_input_size(model: ModelConfig, image_size: int, key: str) -> None:
    """ConfigError naming ``key`` when ``model`` cannot run on ``image_size`` px images."""
    try:
        zoo.check_input_size(model.name, image_size, model.options)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}; raise the data's image_size") from None


def check_output(path: str, key: str) -> None:
    """ConfigError naming ``key`` when results cannot go to ``path``: a local path that is a file,
    or an ``s3://`` path whose bucket does not exist."""
    if storage.is_remote(path):
        scheme, _, rest = path.partition("://")
        bucket = f"{scheme}://{rest.split('/', 1)[0]}"
        require(storage.is_dir(bucket), key, f"bucket not found: {bucket} (create it, or check the name, "
                "AWS_ENDPOINT_URL and credentials)")
    else:
        require(not Path(path).expanduser().is_file(), key, f"{path} is a file; name a folder")


@dataclass
class ComputeConfig:
    batch_size: int = 64  # images per actor call
    forward_batch_size: int | None = None  # largest forward batch of perturbed variants (default batch_size)
    actor_pool_size: int = 1  # model replicas in each model's pass
    # Model passes at once, each its own pipeline and pool: the next model's actors start while a
    # pass runs (the cluster needs the CPUs/GPUs of that many pools).
    concurrent_models: int = 1
    # Wait this long for all replicas before images flow, then fail naming the resources
    # (None: start with the first ready replica; Ray adds the rest as they come).
    wait_for_actors_s: int | None = None
    use_gpu: bool = False
    num_gpus: float = 1.0  # per actor, when use_gpu
    num_cpus: float = 1.0  # per actor; leave CPUs for the generation/decoding tasks
    # Memory reserved per actor (a Ray logical resource). It also keeps image making in its own
    # tasks: Ray Data fuses a task stage into an actor stage whose resource requests match.
    memory_gb: float | None = 1.0
    torch_threads: int | None = None  # PyTorch threads per actor (default Ray's: floor(num_cpus), at least 1)
    fast: bool = False  # fold batch norm into the convs + channels-last (bagnet.fast): same results, faster
    forward_env: list[str] = field(default_factory=lambda: list(FORWARDED_ENV))
    max_file_mb: int = 128  # largest Parquet file (in memory) a model actor writes at once
    progress_s: float = 30.0  # seconds between progress lines within a part

    def validate(self) -> None:
        for key in ("batch_size", "actor_pool_size", "concurrent_models", "max_file_mb"):
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
    models: list[ModelConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "val"  # the split the experiments run on (synthetic: train, val or test)
    experiments: dict[str, Any] = field(default_factory=dict)  # name -> params (its Params dataclass)
    modules: list[str] = field(default_factory=list)  # extra experiment modules (dotted import paths)
    output: str = "results/experiments"  # local dir or s3://bucket/prefix
    run_id: str | None = None  # default: the config file's stem
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def validate(self) -> None:
        for i, dotted in enumerate(self.modules):
            try:
                EXPERIMENTS.register(dotted)
            except (ImportError, ValueError) as err:
                raise ConfigError(f"modules[{i}]: {err}") from None
        require(len(self.models) >= 1, "models", "list at least one model")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        require(not dup, "models", f"model {dup[0] if dup else ''!r} is listed twice")
        require(self.data.dataset != "synthetic" or self.split in SPLITS, "split",
                f"{self.split!r} is not one of {sorted(SPLITS)}")
        for name, params in self.experiments.items():
            require(name in EXPERIMENTS, f"experiments.{name}", f"unknown experiment; known: {', '.join(EXPERIMENTS)}")
            require(params is None or isinstance(params, dict), f"experiments.{name}", f"expected a mapping, got {params!r}")
        if self.run_id is not None:
            check_name(self.run_id, "run_id")
        for i, model in enumerate(self.models):
            check_input_size(model, self.data.image_size, f"models[{i}].name")


@dataclass
class TrainStage:
    config: str = "configs/synthetic.yaml"
    models: list[str] = field(default_factory=list)  # one training run per model (and seed), named after it
    storage_path: str = "results/train"
    overrides: list[str] = field(default_factory=list)  # applied to every training run
    seeds: list[int] = field(default_factory=lambda: [0])  # run.seed of each model's runs; several: "<model>-seed<s>"
    concurrent_runs: int = 1  # training runs at once: one's Ray Train start-up overlaps another's epochs

    def validate(self) -> None:
        require(self.concurrent_runs >= 1, "concurrent_runs", f"must be >= 1, got {self.concurrent_runs}")
        require(len(self.seeds) >= 1, "seeds", "list at least one seed")
        require(len(set(self.seeds)) == len(self.seeds), "seeds", f"a seed is listed twice: {self.seeds}")

    def run_name(self, model: str, seed: int) -> str:
        """The training run of ``model`` with ``seed``: the model's name, suffixed with the seed
        when there are several."""
        return model if len(self.seeds) == 1 else f"{model}-seed{seed}"


@dataclass
class ExperimentStage:
    config: str = "configs/experiments-synthetic.yaml"  # its models' weights come from the train stage
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
            require(config_path(path).is_file(), key, f"config file not found: {path}")

    def experiment_config(self, seed: int) -> ExperimentJobConfig:
        """The experiment stage's config for the models trained with ``seed``: the trained models'
        weights point at that seed's ``model.pt`` exports, the run id is suffixed ``-seed<s>`` when
        there are several seeds (paths not yet rooted: see ``cluster.paths.job_paths``)."""
        require(seed in self.train.seeds, "train.seeds", f"has no seed {seed}; seeds: {self.train.seeds}")
        path = config_path(self.experiments.config)
        exp = load_config(ExperimentJobConfig, path, self.experiments.overrides)
        trained = {m: storage.join(self.train.storage_path, self.train.run_name(m, seed), MODEL_FILE)
                   for m in self.train.models}
        models = [{**to_dict(m), "weights": trained.get(m.name, m.weights)} for m in exp.models]
        suffix = f"-seed{seed}" if len(self.train.seeds) > 1 else ""
        return updated(exp, {"models": models, "run_id": (exp.run_id or path.stem) + suffix})


def config_path(path: str | Path) -> Path:
    """``path`` as given, or relative to the project's ``configs/`` folder's parent (so
    ``configs/synthetic.yaml`` works from any working directory)."""
    path = Path(path)
    return path if path.is_file() or path.is_absolute() else CONFIG_DIR.parent / path


__all__ = [
    "CONFIG_DIR", "MAX_IMAGE_SIZE", "config_path", "looks_like_path", "check_input_size", "check_output", "ModelConfig", "DataConfig", "ScalingConfig", "RunConfig",
    "TrainJobConfig", "ComputeConfig", "ExperimentJobConfig", "TrainStage", "ExperimentStage", "ReportStage",
    "ReproduceConfig", "OptimConfig",
]
