"""Connecting jobs to Ray: a running cluster when there is one, else a local instance.

- ``RAY_ADDRESS`` set (``ray job submit`` sets it for the job's driver; on cluster nodes it is
  the GCS address): connect to that cluster.
- unset: start a local Ray sized by ``num_cpus`` (default: every core).

A dashboard URL in ``RAY_ADDRESS`` (``http://127.0.0.1:8265``, as some Ray docs suggest for
``ray job submit``) is a job-submission address, not one a driver can connect to; that raises with
the fix. Keep it in ``RAY_API_SERVER_ADDRESS``, which only the ``ray job`` CLI reads.

The console shows the project's lines (one per epoch, per experiment part); Ray's own INFO
chatter (Train's reports and checkpoint lines, Data's execution banners, deprecation warnings)
is off unless ``BAGNET_VERBOSE=1``. Ray Data's progress bars are on where stdout is a terminal
(``BAGNET_PROGRESS_BARS=1`` / ``0`` forces them on / off).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import ray

START_ATTEMPTS = 3  # a loaded machine can miss Ray's fixed 30 s raylet start-up wait
VERBOSE_ENV = "BAGNET_VERBOSE"
PROGRESS_ENV = "BAGNET_PROGRESS_BARS"
_INIT_LOCK = threading.Lock()  # jobs run at once (cluster.concurrency) start or join one Ray, not one each


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


def verbose() -> bool:
    """``BAGNET_VERBOSE=1``: Ray's INFO logs and deprecation warnings back on the console."""
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def progress_bars() -> bool:
    """Ray Data progress bars: ``BAGNET_PROGRESS_BARS`` when set, else whether stdout is a terminal."""
    forced = os.environ.get(PROGRESS_ENV, "").strip()
    return forced == "1" if forced else sys.stdout.isatty()


def quiet_ray() -> None:
    """Set, before Ray starts, what keeps its chatter off this process's console and its workers'."""
    # Train V2 tees each worker print() to a logger that also prints it: every line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not verbose():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # inherited by the processes of a local Ray instance (a cluster's nodes have their own env)
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # Data's per-dataset "execution finished" lines


def init_ray(num_cpus: int | None = None, quiet: bool = True, **kwargs) -> dict:
    """Connect to ``RAY_ADDRESS`` or start Ray locally; returns the cluster's resources.

    Reuses an already initialised Ray (tests share one instance; concurrent callers wait for the
    first). ``num_cpus`` only sizes a local instance (a cluster brings its own resources); a local
    start that times out (raylet start-up on an overloaded machine) is retried. ``quiet`` hides Ray Data's per-dataset execution
    banners; with ``BAGNET_VERBOSE`` unset the job's workers log at WARNING (see the module doc).
    """
    with _INIT_LOCK:
        if not ray.is_initialized():
            quiet_ray()
            kwargs.setdefault("log_to_driver", True)
            if not verbose():
                kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="WARNING"))
            if address := cluster_address():
                ray.init(address=address, **kwargs)
            else:
                _start_local(num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars()
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
            context = ray.init(**kwargs)
            if context.dashboard_url and not verbose():  # Ray's own line is INFO, off by default
                print(f"[ray] local instance started; dashboard http://{context.dashboard_url}", flush=True)
            return
        except Exception as err:  # ray raises a bare Exception for a start-up timeout
            if "timed out during startup" not in str(err) or attempt == START_ATTEMPTS:
                raise
            print(f"[ray] local start timed out ({attempt}/{START_ATTEMPTS}); retrying", flush=True)
            ray.shutdown()
            time.sleep(2)
