"""cluster.concurrency.run_at_most: jobs a given number at a time, and what happens after a failure."""

import contextlib
import os
import signal
import threading
import time

import pytest

from cluster.concurrency import run_at_most


class Jobs:
    """Jobs that sleep, record their thread and how many ran at once; those in ``fail`` raise
    ``error``."""

    def __init__(self, seconds: dict[str, float], fail: tuple[str, ...] = (), error: type[Exception] = RuntimeError):
        self.seconds, self.fail, self.error = seconds, fail, error
        self.lock, self.running, self.most, self.started, self.threads = threading.Lock(), 0, 0, [], set()

    def job(self, key: str):
        def call():
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
                self.started.append(key)
                self.threads.add(threading.current_thread())
            try:
                time.sleep(self.seconds[key])
                if key in self.fail:
                    raise self.error(f"{key} failed")
                return key.upper()
            finally:
                with self.lock:
                    self.running -= 1
        return call

    def all(self) -> dict:
        return {key: self.job(key) for key in self.seconds}


def test_one_at_a_time_runs_in_order_in_the_calling_thread():
    jobs, results = Jobs(dict.fromkeys("abc", 0.01)), []
    run_at_most(1, jobs.all(), lambda key, result: results.append((key, result)))
    assert jobs.started == list("abc") and jobs.most == 1
    assert jobs.threads == {threading.current_thread()}
    assert results == [("a", "A"), ("b", "B"), ("c", "C")]


@pytest.mark.parametrize("at_once", [2, 3])
def test_at_most_at_once_run_together_and_results_keep_the_jobs_order(at_once):
    jobs, results = Jobs({"a": 0.4, "b": 0.2, "c": 0.3, "d": 0.1}), []
    run_at_most(at_once, jobs.all(), lambda key, result: results.append(key))
    assert jobs.most == at_once and sorted(jobs.started) == list("abcd")
    assert results == list("abcd")


@pytest.mark.parametrize("at_once", [1, 2])
def test_after_a_failure_no_job_starts_the_running_finish_and_the_error_passes_the_guard(at_once):
    """b fails while a runs: a's result is kept, d never starts (c may have taken b's place
    already when two run at once), the guard sees b's error."""
    jobs, results, guarded = Jobs({"a": 1.0, "b": 0.1, "c": 1.5, "d": 0.1}, fail=("b",)), [], []

    @contextlib.contextmanager
    def guard(key):
        try:
            yield
        except RuntimeError as err:
            guarded.append(key)
            raise ValueError(f"job {key}: {err}") from err

    with pytest.raises(ValueError, match="job b: b failed"):
        run_at_most(at_once, jobs.all(), lambda key, result: results.append(key), guard=guard)
    assert results[0] == "a" and "b" not in results and guarded == ["b"]
    assert "d" not in jobs.started and jobs.running == 0
    if at_once == 1:
        assert jobs.started == ["a", "b"]


def test_at_once_below_one_is_refused():
    with pytest.raises(ValueError, match="at_once must be >= 1, got 0"):
        run_at_most(0, {})


def test_ctrl_c_stops_the_caller_at_once_and_starts_no_further_job():
    """SIGINT while two jobs run: the caller gets KeyboardInterrupt without waiting for them
    (they run in daemon threads), and the third job never starts."""
    release, started = threading.Event(), []

    def job(key, interrupt=False):
        def call():
            started.append(key)
            if interrupt:
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGINT)
            release.wait(60)
        return call

    begin = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_at_most(2, {"a": job("a", interrupt=True), "b": job("b"), "c": job("c")})
        assert time.monotonic() - begin < 30 and sorted(started) == ["a", "b"]
    finally:
        release.set()
