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

import ray


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


def init_ray(num_cpus: int | None = None, quiet: bool = True) -> dict:
    """Connect to ``RAY_ADDRESS`` or start Ray locally; returns the cluster's resources.

    Reuses an already initialised Ray (tests share one instance). ``num_cpus`` only sizes a local
    instance; a cluster brings its own resources. ``quiet`` hides Ray Data's per-dataset
    execution banners (``BAGNET_PROGRESS_BARS=1`` turns progress bars back on).
    """
    if not ray.is_initialized():
        kwargs: dict = {"log_to_driver": True}
        if address := cluster_address():
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("BAGNET_PROGRESS_BARS", "0") == "1"
    if quiet:
        ctx.print_on_execution_start = False
    return ray.cluster_resources()
