"""Connecting jobs to Ray: a running cluster when there is one, else a local instance.

- ``RAY_ADDRESS`` set (``ray job submit`` sets it for the job's driver; on cluster nodes it is
  the GCS address): connect to that cluster.
- unset: start a local Ray sized by ``num_cpus`` (default: every core).

A dashboard URL in ``RAY_ADDRESS`` (``http://127.0.0.1:8265``, as some Ray docs suggest for
``ray job submit``) is a job-submission address, not one a driver can connect to; that raises with
the fix. Keep it in ``RAY_API_SERVER_ADDRESS``, which only the ``ray job`` CLI reads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray

START_ATTEMPTS = 3  # a loaded machine can miss Ray's fixed 30 s raylet start-up wait


class RayAddressError(RuntimeError):
    """``RAY_ADDRESS`` holds an address a driver cannot connect to."""


def cluster_address() -> str | None:
    """The cluster this process should join (``RAY_ADDRESS``), or None for a local instance."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        return None
    if address.startswith(("http://", "https://")):
        raise RayAddressError(
            f"RAY_ADDRESS={address} is a dashboard (job submission) address. Submit the job with "
            f"`RAY_API_SERVER_ADDRESS={address} ray job submit --working-dir . -- python ...`, "
            f"or unset RAY_ADDRESS to run on a local Ray instance.")
    return address


def init_ray(num_cpus: int | None = None, quiet: bool = True, **kwargs) -> dict:
    """Connect to ``RAY_ADDRESS`` or start Ray locally; returns the cluster's resources.

    Reuses an already initialised Ray (tests share one instance). ``num_cpus`` only sizes a local
    instance (a cluster brings its own resources); a local start that times out (raylet start-up
    on an overloaded machine) is retried. ``quiet`` hides Ray Data's per-dataset execution
    banners (``BAGNET_PROGRESS_BARS=1`` turns progress bars back on).
    """
    if not ray.is_initialized():
        kwargs.setdefault("log_to_driver", True)
        if address := cluster_address():
            ray.init(address=address, **kwargs)
        else:
            _start_local(num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("BAGNET_PROGRESS_BARS", "0") == "1"
    if quiet:
        ctx.print_on_execution_start = False
    return ray.cluster_resources()


@contextmanager
def data_context(**settings) -> Iterator[None]:
    """Set ``DataContext`` fields for the datasets created inside the block (each dataset keeps a
    copy of the context it was created with), then restore them."""
    ctx = ray.data.DataContext.get_current()
    saved = {key: getattr(ctx, key) for key in settings}
    for key, value in settings.items():
        setattr(ctx, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(ctx, key, value)


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
