"""Run a set of driver-side jobs (training runs, model passes) a given number at a time.

Each job is a blocking call that drives Ray (``TorchTrainer.fit``, a Ray Data pipeline); running
two at once lets one job's start-up (controller, worker processes, actors, first data) overlap
another's compute. One at a time, the jobs run in the calling thread. Several run in daemon
threads, so Ctrl-C stops the caller at once, as with one: the process exits without waiting for
them, and Ray ends the actors it started for them (their driver is gone).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
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
    results: dict[K, T] = {}
    failures: list[tuple[K, BaseException]] = []  # in the order they happened
    lock, slots = threading.Lock(), threading.Semaphore(at_once)

    def run(key: K, job: Callable[[], T]) -> None:
        try:
            value = job()
            with lock:
                results[key] = value
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread below
            with lock:
                failures.append((key, err))
        finally:
            slots.release()

    threads = []
    for key, job in jobs.items():
        slots.acquire()
        if failures:
            break
        threads.append(threading.Thread(target=run, args=(key, job), name=f"job-{key}", daemon=True))
        threads[-1].start()
    for thread in threads:
        thread.join()
    for key in jobs:
        if key in results:
            on_result(key, results[key])
    if failures:
        key, err = failures[0]
        with guard(key):
            raise err
