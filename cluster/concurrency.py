"""Run a set of driver-side jobs (training runs, model passes) a given number at a time.

Each job is a blocking call that drives Ray (``TorchTrainer.fit``, a Ray Data pipeline); running
two at once lets one job's start-up (controller, worker processes, actors, first data) overlap
another's compute. One at a time, the jobs run in the calling thread, so Ctrl-C stops one at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import ContextManager, TypeVar

K = TypeVar("K")
T = TypeVar("T")


def no_guard(key: object) -> ContextManager[None]:
    """The default guard: errors pass as they are."""
    return contextlib.nullcontext()


def run_at_most(at_once: int, jobs: Mapping[K, Callable[[], T]], on_result: Callable[[K, T], None] | None = None, *,
                guard: Callable[[K], ContextManager[None]] = no_guard) -> None:
    """Call every job of ``jobs``, at most ``at_once`` at a time, and ``on_result(key, result)``
    for each that returns (in ``jobs``' order when several run at once).

    After a job raises, no further job starts; the running ones finish and their results are
    kept; then the first error is raised inside ``guard(key)`` (a context manager that may turn
    it into a clearer one naming the job).
    """
    if at_once < 1:
        raise ValueError(f"at_once must be >= 1, got {at_once}")
    on_result = on_result or (lambda key, result: None)
    if at_once == 1:
        for key, job in jobs.items():
            with guard(key):
                on_result(key, job())
        return
    with ThreadPoolExecutor(at_once, thread_name_prefix="job") as pool:
        futures = {pool.submit(job): key for key, job in jobs.items()}
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            for future in futures:
                future.cancel()  # the jobs not started yet; the running ones finish
        wait(futures)
    for future, key in futures.items():
        if not future.cancelled() and future.exception() is None:
            on_result(key, future.result())
    if failed is not None:
        with guard(futures[failed]):
            failed.result()
