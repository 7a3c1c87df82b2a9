"""Connecting jobs to Ray: a running cluster when there is one, else a local instance."""

from __future__ import annotations

import os

import ray


def init_ray(num_cpus: int | None = None, quiet: bool = True) -> dict:
    """Connect to ``RAY_ADDRESS`` (set by ``ray job submit`` and on cluster nodes) or start Ray locally.

    Reuses an already initialised Ray (tests share one instance). Returns the cluster's resources.
    """
    if not ray.is_initialized():
        kwargs: dict = {"log_to_driver": True}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(**kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("BAGNET_PROGRESS_BARS", "0") == "1"
    if quiet:
        ctx.print_on_execution_start = False
    return ray.cluster_resources()
