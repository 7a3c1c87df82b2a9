"""Where a job's files are: relative config paths under the shared results root, and the checks
that keep results from being lost (:func:`job_paths`, run by every job before Ray starts).

``BAGNET_RESULTS`` (e.g. ``s3://my-bucket/bagnet``; the cluster files set it once) is the root of
every relative path a job config names: storage and outputs (:data:`OUTPUT_KEYS`) and what jobs
read from there (:data:`INPUT_KEYS`: ``data.root``, weights files). Precedence, per key:

1. an absolute path or a URI (``s3://...``), in the config file or an override: used as it is;
2. a relative path with ``BAGNET_RESULTS`` set: ``$BAGNET_RESULTS/<path>``;
3. a relative path without it: relative to the working directory, except that on a cluster (a
   submitted job, or ``RAY_ADDRESS`` set) a relative storage or output path is refused: it would
   land in the job's copy of the working directory on the head node and vanish with it.

The placeholder bucket ``YOUR-BUCKET`` left in any key is refused too, naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from bagnet.config import ConfigError, from_dict, to_dict
from cluster.configs import ExperimentJobConfig, ReproduceConfig, TrainJobConfig, looks_like_path
from cluster.runtime_env import PLACEHOLDER_BUCKET
from store import storage

T = TypeVar("T")
RESULTS_ENV = "BAGNET_RESULTS"
# Set for a job's driver by `ray job submit` (RAY_ADDRESS too); RAY_JOB_ID in Ray's own processes.
JOB_ENV = ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID")
# Dotted keys per job config; "models[]." walks a list.
OUTPUT_KEYS: dict[type, tuple[str, ...]] = {
    TrainJobConfig: ("run.storage_path",),
    ExperimentJobConfig: ("output",),
    ReproduceConfig: ("train.storage_path", "report.out"),
}
INPUT_KEYS: dict[type, tuple[str, ...]] = {
    TrainJobConfig: ("data.root", "model.weights"),
    ExperimentJobConfig: ("data.root", "models[].weights"),
}


def results_root(environ: Mapping[str, str] | None = None) -> str | None:
    """``$BAGNET_RESULTS`` (trailing slashes dropped), or None when unset; ConfigError while it
    holds the placeholder bucket."""
    root = (os.environ if environ is None else environ).get(RESULTS_ENV, "").strip().rstrip("/")
    if PLACEHOLDER_BUCKET in root:
        raise ConfigError(f"{RESULTS_ENV}={root} holds the placeholder bucket {PLACEHOLDER_BUCKET}: set it to a bucket "
                          "of yours where the cluster files define it (the lines marked `>>> SET: bucket`)")
    return root or None


def on_cluster(environ: Mapping[str, str] | None = None) -> bool:
    """True for a submitted job's driver or any process told to join a running cluster."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name, "").strip() for name in JOB_ENV)


def is_relative(path: str) -> bool:
    return not storage.is_remote(path) and not Path(path).expanduser().is_absolute()


def rooted(path: str, key: str, *, output: bool = True) -> str:
    """``path`` after the precedence rules above; ConfigError naming ``key`` when it is a relative
    output path on a cluster without ``BAGNET_RESULTS``."""
    if not is_relative(path):
        return path
    root = results_root()
    if output and on_cluster() and (root is None or is_relative(root)):  # the job's working directory
        raise ConfigError(
            f"{key}: relative path {path!r} on a cluster would be written into the job's working directory "
            f"on the head node and lost with it; set {RESULTS_ENV}=s3://<bucket>/<prefix> (the shared results "
            f"root every relative path is under; an absolute shared folder works too), or give {key} an s3:// path")
    if root:
        return storage.join(root, path) if storage.is_remote(root) else str(Path(root).expanduser() / path)
    return path


def check_placeholder(data: Any, prefix: str = "") -> None:
    """ConfigError naming the first key of ``data`` (a config, or a plain mapping) whose value
    still holds the placeholder bucket."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    if isinstance(data, str) and PLACEHOLDER_BUCKET in data:
        raise ConfigError(f"{prefix or 'config'}: {data!r} holds the placeholder bucket {PLACEHOLDER_BUCKET}; "
                          f"set {RESULTS_ENV}=s3://<your bucket>/<prefix> and give a relative path, or an s3:// "
                          "path in a bucket of yours")
    if isinstance(data, Mapping):
        for key, value in data.items():
            check_placeholder(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            check_placeholder(value, f"{prefix}[{i}]")


def _apply(node: Any, parts: list[str], prefix: str, output: bool) -> Any:
    head, *rest = parts
    if head.endswith("[]"):
        name = head[:-2]
        items = node.get(name) or []
        return {**node, name: [_apply(item, rest, f"{prefix}{name}[{i}].", output) for i, item in enumerate(items)]}
    value = node.get(head)
    if rest:
        return {**node, head: _apply(value, rest, f"{prefix}{head}.", output)} if isinstance(value, Mapping) else node
    if not isinstance(value, str) or not value:
        return node
    if not output and head == "weights" and not looks_like_path(value):  # a release / torchvision name
        return node
    return {**node, head: rooted(value, prefix + head, output=output)}


def root_paths(raw: dict[str, Any], cls: type, *, outputs: bool = True) -> dict[str, Any]:
    """``raw`` (a plain config mapping of job config ``cls``) with its relative paths rooted:
    :data:`INPUT_KEYS`, and :data:`OUTPUT_KEYS` unless ``outputs`` is False."""
    for output, keys in ((True, OUTPUT_KEYS if outputs else {}), (False, INPUT_KEYS)):
        for key in keys.get(cls, ()):
            raw = _apply(raw, key.split("."), "", output)
    return raw


def job_paths(cfg: T) -> T:
    """``cfg`` with the placeholder check passed and every relative path rooted (see above)."""
    check_placeholder(cfg)
    return from_dict(type(cfg), root_paths(to_dict(cfg), type(cfg)))


__all__ = ["RESULTS_ENV", "OUTPUT_KEYS", "INPUT_KEYS", "results_root", "on_cluster", "is_relative", "rooted",
           "check_placeholder", "root_paths", "job_paths"]
