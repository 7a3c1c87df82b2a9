"""Connecting jobs to Ray: a running cluster when there is one, else a local instance."""

from __future__ import annotations

import os
import time

import ray

START_ATTEMPTS = 3  # a loaded machine can miss Ray's fixed 30 s raylet start-up wait


def init_ray(num_cpus: int | None = None, quiet: bool = True, **kwargs) -> dict:
    """Connect to ``RAY_ADDRESS`` (set by ``ray job submit`` and on cluster nodes) or start Ray locally.

    Reuses an already initialised Ray (tests share one instance). A local start that times out
    (raylet start-up on an overloaded machine) is retried. Returns the cluster's resources.
    """
    if not ray.is_initialized():
        kwargs.setdefault("log_to_driver", True)
        if os.environ.get("RAY_ADDRESS"):
            ray.init(**kwargs)
        else:
            _start_local(num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("BAGNET_PROGRESS_BARS", "0") == "1"
    if quiet:
        ctx.print_on_execution_start = False
    return ray.cluster_resources()


def _start_local(**kwargs) -> None:
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as err:  # ray raises a bare Exception for a start-up timeout
            if "timed out during startup" not in str(err) or attempt == START_ATTEMPTS:
                raise
            print(f"[ray] local start timed out ({attempt}/{START_ATTEMPTS}); retrying", flush=True)
            ray.shutdown()
            time.sleep(2)
