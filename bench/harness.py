"""The project's benchmark harness: timing, peak memory, machine info and result tables.

    from bench.harness import Table, machine_info, measure
    table = Table(["method", "seconds", "peak_mb"], info=machine_info(device, "float32", 1))
    m = measure(lambda: f(x), device=device, warmup=1, repeat=3)
    table.add(method="mine", seconds=m.median, peak_mb=m.peak_mb)
    table.write_csv("bench/out/x.csv")

``measure`` runs warm-up calls, then times ``repeat`` calls (synchronising CUDA around each) and
reports the median wall time (and the process CPU time, which other load on a shared machine
hardly changes for single-threaded runs), and the peak memory of the timed calls: CPU resident set size (Linux's
``VmHWM``, reset through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is unavailable) and,
on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import platform
import resource
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch

from store import storage

__all__ = ["Measurement", "measure", "time_call", "PeakMemory", "machine_info", "Table"]


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5,
              device: torch.device | str | None = None,
              cpu_times: list[float] | None = None) -> list[float]:
    """Wall seconds of each of ``repeat`` timed calls of ``fn`` after ``warmup`` untimed ones;
    the process CPU seconds of each call (all threads) are appended to ``cpu_times`` if given."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c0)
    return times


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def print_goal(what: str, ratio: float, goal: float) -> None:
    """One line: ``what = ratio`` against a ``>= goal`` target, and whether it is met."""
    print(f"{what} = {ratio:.2f} (goal >= {goal}: {'met' if ratio >= goal else 'not met'})", flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB: ``VmHWM`` where Linux has it (``ru_maxrss`` survives
    ``exec``, so in a subprocess it starts at its parent's peak), else ``ru_maxrss``."""
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


class PeakMemory:
    """Context manager: peak CPU RSS (MiB) and, on CUDA, peak allocated GPU memory inside it.

    ``cpu_mb`` is exact for the block when the kernel lets us reset the high-water mark
    (``cpu_exact``); otherwise it is the process's lifetime peak (an upper bound).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.cpu_mb = float("nan")
        self.cpu_exact = False
        self.gpu_mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (peak RSS) to the current RSS
            self.cpu_exact = _status_kb("VmHWM") is not None
        except OSError:
            self.cpu_exact = False
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _status_kb("VmHWM") if self.cpu_exact else None
        kb = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.cpu_mb = kb / 1024
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gpu_mb = torch.cuda.max_memory_allocated(self.device) / 2**20


@dataclass
class Measurement:
    times: list[float]  # wall seconds per call
    cpu_peak_mb: float
    gpu_peak_mb: float | None = None
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds per call

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        """Median CPU seconds (robust to other load on a shared machine when single-threaded)."""
        return statistics.median(self.cpu_times) if self.cpu_times else float("nan")

    @property
    def peak_mb(self) -> float:
        """GPU peak on CUDA, CPU RSS peak otherwise."""
        return self.gpu_peak_mb if self.gpu_peak_mb is not None else self.cpu_peak_mb


def measure(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5,
            device: torch.device | str | None = None) -> Measurement:
    """Warm up, then time ``repeat`` calls and record the peak memory of the timed calls."""
    for _ in range(warmup):
        fn()
    cpu_times: list[float] = []
    with PeakMemory(device) as mem:
        times = time_call(fn, warmup=0, repeat=repeat, device=device, cpu_times=cpu_times)
    return Measurement(times, mem.cpu_mb, mem.gpu_mb, cpu_times)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "-"


def add_timing_args(parser, out: str, *, repeat: int = 3, warmup: int = 1) -> None:
    """The options every micro-benchmark takes: --repeat, --warmup, --threads, --seed, --out."""
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out)


def start_torch(args) -> torch.device:
    """Apply ``--threads`` and ``--seed`` of :func:`add_timing_args`; the device of ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.device(args.device)


def machine_info(device: torch.device | str = "cpu", precision: str = "float32",
                 batch_size: int | None = None) -> dict[str, Any]:
    """Where and how a benchmark ran; written on every CSV row."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    return {
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": name,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "ray": _version("ray"),
        "precision": precision,
        "batch_size": batch_size,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Table:
    """Rows of results: printed aligned as they come, written as CSV with ``info`` on every row."""

    columns: Sequence[str]
    info: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    width: int = 14

    def __post_init__(self) -> None:
        self._printed_header = False

    def _fmt(self, value: Any) -> str:
        if isinstance(value, float):
            text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
        else:
            text = str(value)
        return text.rjust(max(self.width, len(text)))

    def add(self, **row: Any) -> dict[str, Any]:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ValueError(f"unknown columns {sorted(unknown)}; table has {list(self.columns)}")
        if not self._printed_header:
            print(" ".join(c.rjust(max(self.width, len(c))) for c in self.columns), flush=True)
            self._printed_header = True
        self.rows.append(row)
        print(" ".join(self._fmt(row.get(c, "")) for c in self.columns), flush=True)
        return row

    def csv_text(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[*self.columns, *self.info])
        writer.writeheader()
        for row in self.rows:
            writer.writerow({**row, **self.info})
        return buf.getvalue()

    def write_csv(self, path: str) -> None:
        """Write atomically (local or ``s3://``) through :mod:`store.storage`."""
        storage.write_text_atomic(path, self.csv_text())
        print(f"wrote {path}", flush=True)
