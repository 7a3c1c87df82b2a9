"""The experiment runner: every (experiment, model) pair of a run as Ray Data pipelines.

Every pair is a *part*. The images are read and decoded once per run (:mod:`cluster.images`:
generated or read and decoded in parallel CPU tasks, kept in Ray's object store), whatever the
number of models; the unfinished parts of one model are then computed in one pass over them: an
actor pool loads the model once per actor and runs ``run`` of each of the model's experiments (the
:mod:`bagnet.experiments` registry) on each batch, so perturbed variants are made next to the
model. Each actor writes its rows, checked against each experiment's ``SCHEMA``, straight to
``<output>/<run_id>/<table>/experiment=<name>/model=<model>/part-*.parquet``, and undecodable
images to the ``failures`` table; only each file's name, size, rows and checksum travel to the
driver, which commits a ``_SUCCESS`` marker per part (after checking images listed = evaluated +
failures) and, last, a ``_SUCCESS`` run manifest. Rerunning with the same ``run_id`` skips
finished parts whose files match their markers and redoes the others. See docs/experiments.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.exceptions import GetTimeoutError
from torch import nn

from bagnet.config import ConfigError, dump_yaml, from_dict, require, to_dict
from bagnet.experiments import EXPERIMENTS, ExperimentContext
from bagnet.fast import autocast_context, optimize_for_inference
from bagnet.imagenet import to_model_input
from bagnet.models import create_model, model_q
from bagnet.synthetic import SyntheticWorld
from cluster.concurrency import run_at_most
from cluster.configs import ExperimentJobConfig, ModelConfig, looks_like_path
from cluster.images import ImageReadError, ImageSource, describe, failed_rows, image_dataset
from cluster.ray_env import data_context, init_ray
from cluster.runtime_env import forwarded_env
from store import results, storage

# The actor's output columns: per (batch, experiment), the files it wrote (JSON lists of
# store.results.file_check), the images it evaluated and could not, what they took.
COLUMNS = COL_EXPERIMENT, COL_FILE, COL_FAILURE_FILE, COL_IMAGES, COL_FAILURES, COL_EVALS, COL_SECONDS = (
    "experiment", "file", "failure_file", "images", "failures", "model_evals", "seconds")


CONTEXT_LOCK = threading.Lock()  # Ray Data's context is process-wide: concurrent passes set it one at a time


class ActorPoolTimeout(RuntimeError):
    """A model's actor pool did not start within ``compute.wait_for_actors_s``."""


class AccountingError(RuntimeError):
    """A part whose images evaluated plus failures differ from the images listed."""


# --------------------------------------------------------------------------------------------
# Planning: parts, fingerprints, resume


@dataclass
class Part:
    """One unit of work: an experiment on one model."""

    experiment: str
    table: str
    model: ModelConfig
    params: Any
    path: str
    fingerprint: dict[str, Any]
    marker: dict[str, Any] | None = None  # set when the part is already finished
    failures_path: str = ""  # its images that could not be used: a part of the failures table

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.model.name}"


@dataclass
class Plan:
    cfg: ExperimentJobConfig
    experiments: list[str]
    run_id: str
    run_dir: str
    source: ImageSource
    parts: list[Part]
    modules: dict[str, ModuleType]  # experiment name -> its module

    @property
    def todo(self) -> list[Part]:
        return [p for p in self.parts if p.marker is None]


def parse_experiments(arg: str) -> list[str]:
    """``--experiment``: names of the registry, comma-separated, or ``all``."""
    names = list(EXPERIMENTS) if arg.strip() == "all" else [n.strip() for n in arg.split(",") if n.strip()]
    for name in names:
        if name not in EXPERIMENTS:
            raise ConfigError(f"--experiment: unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}, all")
    if not names:
        raise ConfigError("--experiment: give at least one experiment name")
    return list(dict.fromkeys(names))


def helper_model_names(module: ModuleType, params: Any) -> dict[str, str]:
    """The optional ``helper_models`` hook: ``ctx.helper_models`` key -> zoo model name."""
    hook = getattr(module, "helper_models", None)
    return hook(params) if hook else {}


def make_plan(cfg: ExperimentJobConfig, experiments: list[str], config_path: str | Path | None) -> Plan:
    """Check everything that can be checked without Ray (raises ConfigError naming the key) and
    list the parts, each with the marker of an earlier finished attempt."""
    modules = {name: EXPERIMENTS[name] for name in experiments}
    params = {}
    for name, module in modules.items():
        params[name] = from_dict(module.Params, cfg.experiments.get(name) or {}, prefix=f"experiments.{name}.")
        for key, model_name in helper_model_names(module, params[name]).items():
            require(any(m.name == model_name for m in cfg.models), f"experiments.{name}",
                    f"needs model {model_name!r} ({key}) in the models list")
    source = describe(cfg.data, cfg.split)
    for i, model in enumerate(cfg.models):
        model.check_weights(f"models[{i}].weights")
        model.check_classes(f"models[{i}].weights", source.class_names)
        require(model.num_classes is None or model.num_classes >= source.num_classes, f"models[{i}].num_classes",
                f"{model.name} has {model.num_classes} classes but the dataset has {source.num_classes}")
    run_id = cfg.run_id or (Path(config_path).stem if config_path else "experiments")
    run_dir = storage.join(storage.resolve(cfg.output), run_id)
    common = {"data": cfg.data.fingerprint(cfg.split), "images": source.digest, "seed": cfg.seed,
              "precision": cfg.precision}
    parts = []
    for name, module in modules.items():
        datasets = getattr(module, "DATASETS", None)
        if datasets is not None and cfg.data.dataset not in datasets:
            require(any(cfg.data.dataset in getattr(m, "DATASETS", [cfg.data.dataset]) for m in modules.values()),
                    f"experiments.{name}", f"needs data.dataset in {list(datasets)}, got {cfg.data.dataset!r}")
            print(f"[experiment] {name}: not defined for data.dataset={cfg.data.dataset}; left out", flush=True)
            continue
        applies_to = getattr(module, "applies_to", lambda model_name: True)
        models = [m for m in cfg.models if applies_to(m.name)]
        require(bool(models), f"experiments.{name}",
                f"applies to none of the models ({', '.join(m.name for m in cfg.models)})")
        if skipped := [m.name for m in cfg.models if m not in models]:
            print(f"[experiment] {name}: not defined for {', '.join(skipped)}; left out", flush=True)
        for model in models:
            partitions = {"experiment": name, "model": model.name}
            path = results.part_dir(run_dir, module.TABLE, partitions)
            failures_path = results.part_dir(run_dir, results.FAILURES_TABLE, partitions)
            fingerprint = {**common, "model": model.fingerprint(), "params": to_dict(params[name])}
            marker = finished_marker(path, failures_path, f"{name}/{model.name}")
            try:
                results.check_fingerprint(marker and marker.get("fingerprint", {}), fingerprint,
                                          where=f"run {run_dir} ({name}/{model.name})", rename="run_id")
            except results.RerunMismatch as err:
                raise ConfigError(f"run_id: {err}") from None
            parts.append(Part(name, module.TABLE, model, params[name], path, fingerprint, marker, failures_path))
    return Plan(cfg, experiments, run_id, run_dir, source, parts, modules)


def finished_marker(path: str, failures_path: str, key: str) -> dict[str, Any] | None:
    """The marker of the finished part at ``path`` when its files (and its failures part's, if
    it recorded failures) match what their markers say; None for an unfinished part and for a
    damaged one, which is named on stdout and redone."""
    try:
        marker = results.read_marker(path)
        problem = None if marker is None else results.verify_part(path, marker)
        if marker is not None and not problem and marker.get("failures"):
            failures = results.read_marker(failures_path)
            problem = (results.verify_part(failures_path, failures) if failures
                       else f"its {marker['failures']} failure(s) are not in {failures_path}")
    except results.MarkerError as err:
        marker, problem = None, str(err)
    if problem:
        print(f"[experiment] {key}: the finished part is damaged ({problem}); it is redone", flush=True)
        return None
    return marker


# --------------------------------------------------------------------------------------------
# The model actor


def build_model(cfg: ModelConfig, num_classes: int, seed: int, device: torch.device) -> nn.Module:
    """Zoo model ``cfg`` in eval mode on ``device``: weights saved with a spec restore their
    options themselves; a random init is the same in every actor (seeded)."""
    torch.manual_seed(seed)
    weights = cfg.weights
    if weights and not storage.is_remote(weights) and looks_like_path(weights):
        weights = storage.resolve(weights)
    model = create_model(cfg.name, num_classes=cfg.num_classes or num_classes, weights=weights, **cfg.options)
    return model.eval().to(device)


class ModelActor:
    """Loads one model once, then runs each of its experiments on every batch of images and writes
    the rows itself.

    ``paths`` maps each experiment to its part folder and its failures part folder. Per batch and
    experiment it writes one Parquet file of the experiment's rows (schema enforced) and, for the
    batch's undecodable images (``error`` set), one file of failure rows; it returns one row per
    experiment: those files' checks (name, bytes, rows, sha256), the images it evaluated and
    could not, the model evaluations and compute seconds it took. No result row leaves the actor.
    """

    def __init__(self, *, experiments: dict[str, Any], model: ModelConfig, helpers: dict[str, ModelConfig],
                 modules: list[str], num_classes: int, use_gpu: bool, precision: str, seed: int,
                 forward_batch_size: int, common: dict[str, Any], paths: dict[str, tuple[str, str]],
                 fast: bool = False, torch_threads: int | None = None, max_file_bytes: int = 128 * 2**20,
                 world: SyntheticWorld | None = None) -> None:
        for dotted in modules:  # the config's extra experiment modules, registered in this process too
            EXPERIMENTS.register(dotted)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.experiments = {name: (EXPERIMENTS[name], params) for name, params in experiments.items()}
        self.paths, self.max_file_bytes = paths, max_file_bytes
        built: dict[str, nn.Module] = {}

        def build(cfg: ModelConfig) -> nn.Module:  # each distinct model once, the evaluated one included
            key = repr(to_dict(cfg))
            if key not in built:
                net = build_model(cfg, num_classes, seed, self.device)
                built[key] = optimize_for_inference(net) if fast else net
            return built[key]

        self.model = build(model)
        self.helpers = {key: build(cfg) for key, cfg in helpers.items()}
        self.model_name, self.q, self.seed = model.name, model_q(model.name), seed
        self.precision, self.forward_batch_size, self.common = precision, forward_batch_size, common
        self.world = world
        self.evals = 0
        # Every path through a zoo network (forward, patch_logits, ...) runs its first conv once
        # per image: count images there, perturbed variants included.
        stem = next(m for m in self.model.modules() if isinstance(m, nn.Conv2d))
        stem.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: tuple) -> None:
        self.evals += int(args[0].shape[0])

    def run_experiment(self, name: str, images: torch.Tensor, labels: torch.Tensor, image_ids: list[str]) -> pa.Table:
        """One experiment on one batch: its rows as an Arrow table of its declared schema."""
        module, params = self.experiments[name]
        ctx = ExperimentContext(
            image_ids=image_ids, model_name=self.model_name, q=self.q, seed=self.seed, device=self.device,
            helper_models=self.helpers, batch_size=self.forward_batch_size, world=self.world)
        with autocast_context(self.device, self.precision):
            rows = module.run(self.model, images, labels, params, ctx=ctx)
        return results.rows_to_table(rows, {**self.common, "created_at": results.utc_now()}, module.SCHEMA,
                                     experiment=name)

    def failure_rows(self, name: str, batch: dict[str, np.ndarray], failed: np.ndarray) -> pa.Table:
        """The batch's undecodable images as rows of the failures table."""
        rows = [{"image_id": str(batch["image_id"][i]), "label": int(batch["label"][i]), "path": str(batch["path"][i]),
                 "error": str(batch["error"][i]), "stage": "decode"} for i in np.flatnonzero(failed)]
        return results.rows_to_table(rows, {**self.common, "created_at": results.utc_now()},
                                     results.FAILURES_SCHEMA, experiment=name)

    def write(self, path: str, table: pa.Table) -> str:
        """``table`` as files of the part at ``path``, each at most about ``max_file_bytes`` in
        memory; their checks as a JSON list."""
        per_file = max(1, int(table.num_rows * self.max_file_bytes / max(table.nbytes, 1)))
        return json.dumps([results.write_part_file(path, table.slice(start, per_file))
                           for start in range(0, table.num_rows, per_file)])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        failed = failed_rows(batch)
        ok = ~failed
        images = to_model_input(np.ascontiguousarray(batch["image"][ok]), self.device)
        labels = torch.as_tensor(np.asarray(batch["label"], np.int64)[ok], device=self.device)
        image_ids = [str(i) for i in batch["image_id"][ok]]
        out: dict[str, list] = {column: [] for column in COLUMNS}
        for name in self.experiments:
            part_path, failures_path = self.paths[name]
            before, start = self.evals, time.perf_counter()
            written = "[]"
            if image_ids:
                written = self.write(part_path, self.run_experiment(name, images, labels, image_ids))
            seconds = time.perf_counter() - start
            failures = self.write(failures_path, self.failure_rows(name, batch, failed)) if failed.any() else "[]"
            out[COL_EXPERIMENT].append(name)
            out[COL_FILE].append(written)
            out[COL_FAILURE_FILE].append(failures)
            out[COL_IMAGES].append(len(image_ids))
            out[COL_FAILURES].append(int(failed.sum()))
            out[COL_EVALS].append(self.evals - before)
            out[COL_SECONDS].append(seconds)
        return {k: np.asarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Driver


def import_root(dotted: str) -> str:
    """The folder module ``dotted`` (imported) was found in: the ``sys.path`` entry it needs."""
    top = sys.modules[dotted.split(".", 1)[0]]
    location = Path(next(iter(getattr(top, "__path__", [])), None) or top.__file__)
    return str(location.resolve().parent)


def runtime_env(cfg: ExperimentJobConfig) -> dict | None:
    """What the tasks and actors get besides the job's own environment: the ``compute.forward_env``
    variables set here and, on ``PYTHONPATH``, the folders the ``modules:`` were imported from
    (Ray workers do not share the driver's ``sys.path``; on a multi-node cluster the modules
    must also be on every node, e.g. in the job's working directory)."""
    env_vars = forwarded_env(names=cfg.compute.forward_env)
    if roots := list(dict.fromkeys(import_root(dotted) for dotted in cfg.modules)):
        env_vars["PYTHONPATH"] = os.pathsep.join([*roots, "${PYTHONPATH}"])  # Ray expands the workers' own
    return {"env_vars": env_vars} if env_vars else None


def group_parts(parts: list[Part]) -> dict[str, list[Part]]:
    """``parts`` by model, in config order: each group is one pass over the images."""
    groups: dict[str, list[Part]] = {}
    for part in parts:
        groups.setdefault(part.model.name, []).append(part)
    return groups


@dataclass
class PartProgress:
    files: list[dict] = field(default_factory=list)  # file checks of the part's files
    failure_files: list[dict] = field(default_factory=list)  # of its failures part
    images: int = 0
    failures: int = 0
    evals: int = 0
    compute_s: float = 0.0


def read_images(plan: Plan, env: dict | None) -> tuple[ray.data.Dataset, dict[str, int]]:
    """The run's images, read and decoded once (undecodable ones kept as rows with ``error``) and
    held in Ray's object store for every model's pass, and the counts: ``images`` (rows),
    ``reads`` (file read attempts, retries included; 0 for generated images), ``undecodable``."""
    start = time.perf_counter()
    # every model's pass derives from this dataset, so it carries their context (a dataset keeps its own)
    with data_context(wait_for_min_actors_s=plan.cfg.compute.wait_for_actors_s or -1):
        images = image_dataset(plan.cfg.data, plan.source, runtime_env=env, keep_failures=True).materialize()
    stats = {"images": images.count(), "reads": int(images.sum("reads") or 0),
             "undecodable": images.filter(lambda row: bool(row["error"])).count()}
    print(f"[experiment] read and decoded {stats['images']} images once for every model in "
          f"{time.perf_counter() - start:.1f} s ({stats['reads']} file reads, {stats['undecodable']} undecodable)",
          flush=True)
    return images, stats


def commit(part: Part, p: PartProgress, listed: int, info: dict[str, Any]) -> dict[str, Any]:
    """Check that the part accounts for every listed image, then commit its failures part (when
    it has failures) and its own marker; files in its folders that no marker lists (a retried
    task's) are deleted first. Raises :class:`AccountingError` naming the counts."""
    if p.images + p.failures != listed:
        raise AccountingError(f"{part.key}: {listed} images listed but {p.images} evaluated + {p.failures} "
                              f"failures; nothing of this part is committed")
    for path, files in ((part.path, p.files), (part.failures_path, p.failure_files)):
        keep = {f["name"] for f in files}
        for name, _ in (storage.list_dir(path) if storage.exists(path) else []):
            if name not in keep:
                storage.delete(storage.join(path, name))
    if p.failures:
        results.commit_part(part.failures_path, p.failure_files, {"fingerprint": part.fingerprint})
    return results.commit_part(part.path, p.files, {
        "fingerprint": part.fingerprint, "images": p.images, "failures": p.failures, "model_evals": p.evals,
        "seconds": round(p.compute_s, 3), **info, "code_version": results.code_version()})


def actor_kwargs(plan: Plan, parts: list[Part]) -> dict[str, Any]:
    """The :class:`ModelActor` arguments for one model's ``parts``: its experiments and their part
    folders, the helper models they need, the columns common to its rows."""
    cfg, model = plan.cfg, parts[0].model
    helpers: dict[str, ModelConfig] = {}
    for part in parts:
        for key, name in helper_model_names(plan.modules[part.experiment], part.params).items():
            helpers[key] = next(m for m in cfg.models if m.name == name)
    common = {"run_id": plan.run_id, "q": model_q(model.name), "weights": model.weights_label,
              "dataset": cfg.data.dataset, "split": cfg.split, "seed": cfg.seed,
              "precision": cfg.precision, "code_version": results.code_version()}
    c = cfg.compute
    return {"experiments": {p.experiment: p.params for p in parts}, "model": model, "helpers": helpers,
            "modules": list(cfg.modules), "num_classes": plan.source.num_classes, "use_gpu": c.use_gpu,
            "precision": cfg.precision, "seed": cfg.seed, "forward_batch_size": c.forward_batch_size or c.batch_size,
            "common": common, "paths": {p.experiment: (p.path, p.failures_path) for p in parts},
            "fast": c.fast, "torch_threads": c.torch_threads, "max_file_bytes": c.max_file_mb * 2**20,
            "world": cfg.data.world() if cfg.data.dataset == "synthetic" else None}


def tally(progress: dict[str, PartProgress], columns: dict[str, list]) -> None:
    """Add the :data:`COLUMNS` of a :class:`ModelActor` output (as lists) to each experiment's progress."""
    for name, file, failure_file, done, failures, evals, seconds in zip(*(columns[col] for col in COLUMNS)):
        p = progress[name]
        p.files += json.loads(file)
        p.failure_files += json.loads(failure_file)
        p.images, p.failures = p.images + done, p.failures + failures
        p.evals, p.compute_s = p.evals + evals, p.compute_s + seconds


def run_group(plan: Plan, parts: list[Part], env: dict | None, images: ray.data.Dataset) -> dict[str, dict]:
    """Compute all unfinished parts of one model in one pass over ``images`` (the actors write the
    files) and commit each; returns their markers by part key. A part is committed only when
    the whole pass has finished."""
    cfg, model = plan.cfg, parts[0].model
    for part in parts:  # leftovers of an interrupted attempt
        results.discard(part.path)
        results.discard(part.failures_path)
    c = cfg.compute
    with CONTEXT_LOCK, data_context(wait_for_min_actors_s=c.wait_for_actors_s or -1):
        written = images.map_batches(
            ModelActor, fn_constructor_kwargs=actor_kwargs(plan, parts),
            batch_size=c.batch_size, batch_format="numpy", zero_copy_batch=False,
            compute=ray.data.ActorPoolStrategy(size=c.actor_pool_size),
            num_cpus=c.num_cpus, num_gpus=c.num_gpus if c.use_gpu else 0,
            memory=c.memory_gb * 2**30 if c.memory_gb else None, runtime_env=env)
    progress = {part.experiment: PartProgress() for part in parts}
    label = f"{'+'.join(progress)}/{model.name}"
    start = last = time.perf_counter()
    first_result_s = None
    for block in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        if first_result_s is None:
            first_result_s = time.perf_counter() - start
        tally(progress, {col: block[col].to_pylist() for col in COLUMNS})
        if time.perf_counter() - last >= c.progress_s:
            last = time.perf_counter()
            done = min(p.images + p.failures for p in progress.values())
            print(f"[experiment] {label}: {done}/{plan.source.num_images} images, "
                  f"{sum(p.evals for p in progress.values()) / (last - start):.1f} evals/s", flush=True)
    wall = time.perf_counter() - start
    evals = sum(p.evals for p in progress.values())
    timing = {"group": label, "group_seconds": round(wall, 3), "startup_s": round(first_result_s or wall, 3)}
    markers = {}
    for part in parts:
        p = progress[part.experiment]
        markers[part.key] = commit(part, p, plan.source.num_images, timing)
        failed = f", {p.failures} undecodable images in {results.FAILURES_TABLE}" if p.failures else ""
        print(f"[experiment] {part.key}: {markers[part.key]['rows']} rows ({p.images} images{failed}, "
              f"{p.evals} model evaluations, {p.compute_s:.1f} s of compute) -> {part.path}", flush=True)
    print(f"[experiment] {label}: {evals} model evaluations in {wall:.1f} s ({evals / max(wall, 1e-9):.1f}/s; "
          f"first results after {timing['startup_s']:.1f} s)", flush=True)
    return markers


@dataclass
class RunTotals:
    """What :func:`run_plan` computed: the markers of the parts it finished, the seconds per group."""

    markers: dict[str, dict] = field(default_factory=dict)

    @property
    def model_evals(self) -> int:
        return sum(m["model_evals"] for m in self.markers.values())

    @property
    def group_seconds(self) -> dict[str, float]:
        return {m["group"]: m["group_seconds"] for m in self.markers.values()}

    @property
    def evals_per_s(self) -> float | None:
        seconds = sum(self.group_seconds.values())
        return self.model_evals / seconds if seconds else None


def _write_manifest(plan: Plan, totals: RunTotals, wall: float, reads: dict[str, int] | None) -> None:
    """Publish the run from what is on storage: the parts whose files match their markers."""
    parts = results.completed_parts(plan.run_dir)
    rate = totals.evals_per_s
    results.write_manifest(plan.run_dir, {
        "run_id": plan.run_id, "complete": True, "experiments": plan.experiments,
        "created_at": results.now_iso(), "code_version": results.code_version(),
        "config": to_dict(plan.cfg), "rows_per_table": results.rows_per_table(parts),
        "parts": {rel: {k: v for k, v in m.items() if k not in ("fingerprint", "checks")} for rel, m in parts.items()},
        "timings": {"wall_s": round(wall, 3), "groups_s": totals.group_seconds, "model_evals": totals.model_evals,
                    "model_evals_per_s": round(rate, 3) if rate else None},
        **({"reads": reads} if reads else {}),
    })


def unwrap_read_error(err: BaseException) -> BaseException:
    """The :class:`ImageReadError` behind ``err`` (Ray wraps a task's error in its own), with the
    reader's message alone; else ``err`` itself."""
    texts, cause = [], err
    while cause is not None and len(texts) < 10:
        texts.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    found = re.search(r"cannot read image .*?a rerun resumes", "\n".join(texts))
    return ImageReadError(found.group(0)) if found else err


@contextlib.contextmanager
def pool_timeout(plan: Plan, model: str, totals: RunTotals) -> Iterator[None]:
    """Turn the timeout of ``model``'s pool (raised only with ``compute.wait_for_actors_s``) into
    an :class:`ActorPoolTimeout` naming the resources it asked for."""
    try:
        yield
    except GetTimeoutError as err:
        c = plan.cfg.compute
        raise ActorPoolTimeout(
            f"compute.wait_for_actors_s: the {c.actor_pool_size} replica(s) of {model} (each "
            f"num_cpus={c.num_cpus}, num_gpus={c.num_gpus if c.use_gpu else 0}, memory_gb={c.memory_gb}) "
            f"did not start within {c.wait_for_actors_s} s: the cluster lacks those resources "
            f"(`ray status`). {len(totals.markers)} part(s) finished and are kept; a rerun resumes.") from err


def run_passes(plan: Plan, groups: dict[str, list[Part]], env: dict | None, images: ray.data.Dataset,
               totals: RunTotals) -> None:
    """Each model's pass (:func:`run_group`), ``compute.concurrent_models`` at a time, their markers
    into ``totals``. After an error no further pass starts, the running ones finish (their parts
    are kept), and the error is raised (:func:`cluster.concurrency.run_at_most`)."""
    run_at_most(plan.cfg.compute.concurrent_models,
                {model: functools.partial(run_group, plan, group, env, images) for model, group in groups.items()},
                lambda model, markers: totals.markers.update(markers),
                guard=lambda model: pool_timeout(plan, model, totals))


def run_plan(plan: Plan) -> dict[str, Any]:
    """Compute the plan's unfinished parts (the images read once, one pass per model), then
    publish the run manifest (withdrawn first when there is work to do).

    Returns ``run_id``, ``run_dir``, ``rows`` per table, ``failures`` (undecodable images per
    part key), ``reads`` (the image read counts, when anything was computed), the part keys
    ``computed`` and ``skipped``, ``wall_s``, ``model_evals`` and ``model_evals_per_s``. Raises
    :class:`ActorPoolTimeout` when a model's pool cannot be placed (finished parts are kept)."""
    start = time.perf_counter()
    cfg, todo, totals = plan.cfg, plan.todo, RunTotals()
    reads = None
    for part in plan.parts:
        if part.marker is not None:
            print(f"[experiment] {part.key}: finished earlier ({part.marker['rows']} rows), skipped", flush=True)
    if todo:
        init_ray()
        if results.withdraw_manifest(plan.run_dir):
            print(f"[experiment] run {plan.run_id}: manifest withdrawn until this rerun finishes", flush=True)
        storage.write_text_atomic(storage.join(plan.run_dir, results.CONFIG_FILE), dump_yaml(cfg))
        print(f"[experiment] run {plan.run_id}: {len(todo)} of {len(plan.parts)} part(s) to compute on "
              f"{cfg.data.dataset}/{cfg.split} ({plan.source.num_images} images) -> {plan.run_dir}", flush=True)
        env = runtime_env(cfg)
        try:
            images, reads = read_images(plan, env)
        except Exception as err:  # Ray Data wraps the reader's error: stop naming the file
            raise unwrap_read_error(err) from err
        run_passes(plan, group_parts(todo), env, images, totals)
    wall = time.perf_counter() - start
    if totals.markers or results.read_marker(plan.run_dir) is None:
        _write_manifest(plan, totals, wall, reads)
    rows: dict[str, int] = {}
    failures: dict[str, int] = {}
    for part in plan.parts:
        marker = totals.markers.get(part.key) or part.marker
        rows[part.table] = rows.get(part.table, 0) + marker["rows"]
        if marker.get("failures"):
            failures[part.key] = marker["failures"]
    return {"run_id": plan.run_id, "run_dir": plan.run_dir, "rows": rows, "failures": failures, "reads": reads,
            "computed": sorted(totals.markers),
            "skipped": sorted(p.key for p in plan.parts if p.key not in totals.markers), "wall_s": wall,
            "model_evals": totals.model_evals, "model_evals_per_s": totals.evals_per_s}


__all__ = [
    "COLUMNS", "ActorPoolTimeout", "AccountingError", "Part", "Plan", "parse_experiments", "helper_model_names",
    "make_plan", "finished_marker", "build_model", "ModelActor", "import_root", "runtime_env", "group_parts",
    "PartProgress", "read_images", "commit", "actor_kwargs", "tally", "run_group", "RunTotals", "unwrap_read_error",
    "run_plan",
]
