"""A real multi-node Ray cluster on this host, started with ``ray start`` (for the cluster tests).

Every node is a ``ray start --block`` process that this module owns (its own session, temp dir and
ports). Nodes are stopped by killing their process trees, never with ``ray stop``, which would
also kill every other Ray instance on the host, including the pytest session's own. All Ray
commands (nodes and clients) run with ``RAY_AUTH_MODE=disabled`` so no token can mismatch.

Clients talk to the cluster only through subprocesses (``ray job ...``, ``ray list ...``) with
the cluster's addresses, never through the pytest process's own Ray connection.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")

# Environment of every process started here: nodes inherit it, and so do the job drivers and
# workers they spawn.
CLUSTER_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "240",  # a busy 2-core CI box needs more than the 60 s default
    "RAY_raylet_start_wait_time_s": "180",  # raylet waits this long for its agents (slow imports on a busy host)
    "PYTHONUNBUFFERED": "1",
}
STARTED = "Ray runtime started"
# argv: dashboard URL, submission id ("" for none), "1" to include tasks. Prints one JSON line.
STATE_SCRIPT = """
import json, sys
from ray.util import state
address, submission_id, with_tasks = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
nodes = state.list_nodes(address=address, limit=1000)
names = {n.node_id: n.node_name for n in nodes}
out = {"nodes": {n.node_name: {"id": n.node_id, "state": n.state}
                 for n in sorted(nodes, key=lambda n: n.state == "ALIVE")}, "actors": [], "tasks": []}
jobs = [j for j in state.list_jobs(address=address, limit=1000) if submission_id and j.submission_id == submission_id]
if jobs and jobs[0].job_id:  # a just-submitted job has no driver (job ID) yet
    only_job = [("job_id", "=", jobs[0].job_id)]
    out["actors"] = [{"class_name": a.class_name, "state": a.state, "node": names.get(a.node_id)}
                     for a in state.list_actors(address=address, filters=only_job, limit=10000, detail=True)]
    if with_tasks:
        out["tasks"] = [{"name": t.name, "type": t.type, "node": names.get(t.node_id)}
                        for t in state.list_tasks(address=address, filters=only_job, limit=10000, detail=True)]
print(json.dumps(out))
"""


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free right now (all held open at once while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from ``/proc``; Ray workers start their own sessions, so
    process groups do not cover them, but they stay children of their raylet)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (a node's unique temp dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Node:
    """One ``ray start --block`` process and everything it started."""

    name: str
    proc: subprocess.Popen
    temp_dir: Path
    log_path: Path
    num_cpus: int
    killed: bool = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """Kill the node's whole process tree at once (raylet, agents, workers); returns the PIDs."""
        pids = sorted(set(process_tree(self.proc.pid)) | set(processes_mentioning(f"{self.temp_dir}/")))
        kill_pids(pids, sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.killed = True
        return pids


@dataclass
class LocalCluster:
    """Head plus worker nodes on this host; ``root`` holds the nodes' temp dirs and logs.

    Keep ``root`` short: Ray's unix sockets live under it (path limit ~107 characters).
    """

    root: Path
    object_store_bytes: int = 150 * 1024**2
    extra_env: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    gcs_port: int | None = None
    dashboard_port: int | None = None

    @classmethod
    def create(cls, **kwargs) -> LocalCluster:
        return cls(root=Path(tempfile.mkdtemp(prefix="rc", dir="/tmp")), **kwargs)

    # --- addresses and environments -------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for the nodes and for client commands aimed at this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(CLUSTER_ENV)
        env.update(self.extra_env)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        if self.gcs_port:
            env["RAY_ADDRESS"] = self.address
            env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        env.update(extra)
        return env

    # --- nodes ---------------------------------------------------------------------------
    def _start(self, name: str, args: list[str], num_cpus: int, timeout: float, attempts: int = 3) -> Node:
        """Start a node; retried because Ray gives a raylet only 30 s to register, too little on a busy host."""
        for attempt in range(1, attempts + 1):
            node = self._launch(f"{name}-{attempt}" if attempt > 1 else name, name, args, num_cpus)
            deadline = time.monotonic() + timeout
            while STARTED not in node.log() and node.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if STARTED in node.log():
                self.nodes[name] = node
                return node
            text = node.log()
            node.kill()
            retry = node.proc.returncode not in (None, -signal.SIGKILL) and "timed out during startup" in text
            if retry and attempt < attempts:
                time.sleep(5 * attempt)  # let the host calm down before the next try
            if not retry or attempt == attempts:
                self.shutdown()
                raise RuntimeError(f"ray node {name!r} did not start within {timeout:.0f} s (attempt {attempt}); "
                                   f"its log:\n{text[-3000:]}")
        raise AssertionError("unreachable")

    def _launch(self, dirname: str, name: str, args: list[str], num_cpus: int) -> Node:
        temp_dir = self.root / dirname
        temp_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.root / f"{dirname}.log"
        ports = free_ports(6)
        cmd = [
            RAY, "start", "--block", f"--node-name={name}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
            f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats",
            f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
            f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}", *args,
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                    start_new_session=True, cwd=self.root)
        return Node(name, proc, temp_dir, log_path, num_cpus)

    def start_head(self, num_cpus: int = 0, timeout: float = 300) -> Node:
        """The head: GCS, dashboard (needed by ``ray job submit``) and job drivers."""
        self.gcs_port, self.dashboard_port, client_port = free_ports(3)
        node = self._start("head", ["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                    f"--ray-client-server-port={client_port}"], num_cpus, timeout)
        self.wait_for_dashboard(timeout)
        return node

    def wait_for_dashboard(self, timeout: float) -> None:
        """Until the job API answers: its module loads in a subprocess after `ray start` returns, and a
        worker node started meanwhile competes with it for CPU (its raylet gives its agent only 15 s)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/jobs/", timeout=10) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard's job API at {self.dashboard_url} did not answer in {timeout:.0f} s")
            time.sleep(1)

    def add_node(self, name: str, num_cpus: int = 2, resources: dict | None = None, timeout: float = 240) -> Node:
        args = [f"--address={self.address}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        return self._start(name, args, num_cpus, timeout)

    def shutdown(self) -> None:
        """Kill every node (workers first, the head last) and remove the temp dirs."""
        for node in sorted(self.nodes.values(), key=lambda n: n.name == "head"):
            if not node.killed:
                node.kill()
        kill_pids(processes_mentioning(f"{self.root}/"))
        for _ in range(3):  # dying processes may still write a last log line
            shutil.rmtree(self.root, ignore_errors=True)
            if not self.root.exists():
                break
            time.sleep(1)

    # --- clients -------------------------------------------------------------------------
    def ray_cli(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([RAY, *args], env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`ray {' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def submit(self, entrypoint: list[str], *, submission_id: str, working_dir: str | Path | None = None,
               runtime_env: dict | None = None, log_path: Path | None = None) -> subprocess.Popen:
        """``ray job submit`` in the background, following the job's logs into ``log_path``.

        The returned process exits when the job ends: 0 on success, 1 when the job failed.
        """
        cmd = [RAY, "job", "submit", f"--address={self.dashboard_url}", f"--submission-id={submission_id}"]
        if working_dir:
            cmd.append(f"--working-dir={working_dir}")
        if runtime_env:
            cmd.append(f"--runtime-env-json={json.dumps(runtime_env)}")
        log_path = log_path or self.root / f"job-{submission_id}.log"
        with open(log_path, "wb") as log:
            return subprocess.Popen([*cmd, "--", *entrypoint], stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env(), start_new_session=True)

    def job_status(self, submission_id: str) -> str:
        """``ray job status``: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        out = self.ray_cli("job", "status", f"--address={self.dashboard_url}", submission_id).stdout
        # the CLI prints "Job 'x' succeeded" / "failed" / "was stopped", else "Status for job 'x': RUNNING"
        for word, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
            if f"Job '{submission_id}' {word}" in out:
                return status
        if match := re.search(rf"Status for job '{re.escape(submission_id)}': (\w+)", out):
            return match.group(1)
        raise RuntimeError(f"no status in `ray job status {submission_id}` output:\n{out}")

    def state(self, submission_id: str | None = None, *, tasks: bool = False) -> dict:
        """One look at the cluster through ``ray.util.state`` (in a subprocess, at this cluster's address).

        Returns ``{"nodes": {node name: {"id", "state"}}, "actors": [...], "tasks": [...]}``; actors
        (``class_name``, ``state``, ``node``) and tasks (``name``, ``type``, ``node``) are those of the
        job ``submission_id`` (tasks only when asked: they are many), ``node`` being the node's name.
        """
        out = subprocess.run([sys.executable, "-c", STATE_SCRIPT, self.dashboard_url, submission_id or "",
                              "1" if tasks else ""], env=self.env(), capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"state query failed ({out.returncode}):\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> set[str]:
        return {name for name, n in self.state()["nodes"].items() if n["state"] == "ALIVE"}

    def working_dirs(self, node: str = "head") -> list[Path]:
        """The job working directories unpacked on ``node`` (the head runs the job drivers)."""
        found = self.nodes[node].temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
        return sorted(p for p in found if p.is_dir())


def second_driver_env(ray_session) -> dict:
    """Environment for a job CLI (`python jobs/tune.py`, ...) as a second driver on the session's Ray instance.

    Its job's actors get ``RAY_ADDRESS`` too: Ray Train's placement-group cleaner (which frees the
    workers of a trial that Tune stopped) otherwise fails when another Ray instance runs on the
    same host ("Found multiple active Ray instances"), as on a shared CI machine. Running a
    job as its own driver also frees anything it leaves behind (actors, pending pools) when it ends.
    """
    address = ray_session.get_runtime_context().gcs_address
    job_config = {"runtime_env": {"env_vars": {"RAY_ADDRESS": address}}}
    return {**os.environ, "RAY_ADDRESS": address, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job_config)}
