"""The run lock: one writer per run folder (local or ``s3://``), held as a lease.

``acquire(folder, job)`` writes ``<folder>/_LOCK``, a JSON lease naming its owner (host, pid, job)
and when it expires. A second job on the same folder is refused with :class:`RunLocked` naming the
holder. The holder renews the lease in a background thread every ``ttl_s / 4`` seconds and deletes
it on release (the :class:`Lease` is a context manager). A lease nobody renews expires after
``ttl_s``; one whose process is gone (same host) is stale at once; either is taken over.

How the create is made exclusive:

- local: ``os.open(O_CREAT | O_EXCL)``, atomic on POSIX filesystems (NFS v3+ included);
- S3: pyarrow's S3 client sends no conditional PUT (``If-None-Match``), so the lease is written,
  then read back after ``settle_s`` seconds; the writer whose token is read back holds it (S3 reads
  are strongly consistent, and the last write wins). Two jobs both hold it only if one's PUT lands
  more than ``settle_s`` after the other's check that the lease was absent (a PUT slower than
  ``settle_s``); the window is that slow PUT, not the job's run time.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from store import storage

LOCK_FILE = "_LOCK"
TTL_S = 120.0  # seconds a lease lives without renewal
S3_SETTLE_S = 2.0  # seconds between an S3 lease's write and its read-back


class RunLocked(RuntimeError):
    """Another job holds the folder's lease; the message names it."""


def _now() -> float:
    return time.time()


def _read(path: str) -> tuple[dict[str, Any] | None, float | None]:
    """``(lease, file mtime)``; ``(None, None)`` when there is none; an unreadable lease is
    ``({}, mtime)`` (perhaps being written this instant)."""
    fs, inner = storage.pyarrow_fs(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return None, None
    mtime = info.mtime.timestamp() if info.mtime else _now()
    try:
        lease = json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return {}, mtime
    return (lease if isinstance(lease, dict) else {}), mtime


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(lease: dict[str, Any], mtime: float, ttl_s: float) -> bool:
    if not lease:  # unreadable: stale once nobody has touched it for a lease's life
        return mtime + ttl_s < _now()
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int) \
            and lease["pid"] != os.getpid() and not _pid_alive(lease["pid"]):
        return True
    return float(lease.get("expires_at", 0)) < _now()


def describe(lease: dict[str, Any], path: str) -> str:
    if not lease:
        return f"{path} is held (its lease cannot be read; it is stale after {TTL_S:.0f} s untouched)"
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(lease.get("expires_at", 0))))
    return (f"{path} is held by job {lease.get('job')!r} (host {lease.get('host')}, pid {lease.get('pid')}) "
            f"until {until}, renewed while it runs; wait for it to end, or if it is dead, wait until then "
            f"or delete {path}")


@dataclass
class Lease:
    """A held lease; :meth:`release` (or leaving the ``with`` block, or exiting) gives it up."""

    path: str
    owner: dict[str, Any]
    ttl_s: float
    _stop: threading.Event = field(default_factory=threading.Event)

    def _write(self) -> None:
        self.owner["expires_at"] = _now() + self.ttl_s
        storage.write_json_atomic(self.path, self.owner)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            lease, _ = _read(self.path)
            if not lease or lease.get("token") != self.owner["token"]:
                print(f"[lock] warning: lost the lease {self.path} (now: {lease}); another job may write here",
                      flush=True)
                return
            self._write()

    def start(self) -> Lease:
        threading.Thread(target=self._renew, name=f"lease {self.path}", daemon=True).start()
        atexit.register(self.release)
        return self

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        atexit.unregister(self.release)
        lease, _ = _read(self.path)
        if lease and lease.get("token") == self.owner["token"]:
            storage.delete(self.path)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create_local(path: str, owner: dict[str, Any]) -> bool:
    """Exclusive create; False when the file exists."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(owner, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _break_local(path: str, stale: dict[str, Any]) -> None:
    """Remove the stale lease ``stale`` (moved aside first, so a fresh lease another job created
    meanwhile is put back rather than deleted)."""
    aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved, _ = _read(aside)
    if moved and moved.get("token") != stale.get("token"):
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    os.unlink(aside)


def acquire(folder: str, job: str, *, ttl_s: float = TTL_S, settle_s: float = S3_SETTLE_S) -> Lease:
    """Hold the lease of run folder ``folder`` for ``job`` (a label such as ``"train my-run"``);
    :class:`RunLocked` naming the holder when another job holds it."""
    path = storage.join(storage.resolve(folder), LOCK_FILE)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "job": job, "token": uuid.uuid4().hex,
             "acquired_at": _now(), "expires_at": _now() + ttl_s}
    lease, mtime = _read(path)
    if lease is not None:
        if not _stale(lease, mtime, ttl_s):
            raise RunLocked(describe(lease, path))
        print(f"[lock] taking over the stale lease {path} ({lease.get('job')!r}, pid {lease.get('pid')})", flush=True)
    remote = storage.is_remote(path)
    if not remote:
        if lease is not None:
            _break_local(path, lease)
        if not _create_local(path, owner):
            raise RunLocked(describe(_read(path)[0] or {}, path))
    else:
        storage.write_json_atomic(path, owner)
        time.sleep(settle_s)
        held, _ = _read(path)
        if not held or held.get("token") != owner["token"]:
            raise RunLocked(describe(held or {}, path))
    return Lease(path, owner, ttl_s).start()


__all__ = ["LOCK_FILE", "TTL_S", "S3_SETTLE_S", "RunLocked", "Lease", "acquire", "describe"]
