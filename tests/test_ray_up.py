"""`ray up` for real, as a user runs it, on loopback only: ray-cluster-onprem.yaml brought up over SSH.

The test starts its own sshd on 127.0.0.1:22 and 127.0.0.2:22 (installed by `scripts/install.sh --test`)
with a key pair it makes, fills the cluster file's `# >>> SET:` values (head 127.0.0.1, one worker on
127.0.0.2, user root, that key, a shared results folder), and then runs the documented commands: `ray up`,
`ray dashboard`, `ray job submit` of a tiny training run, the on-prem stop, `ray down`. (Experiment jobs
on a multi-node cluster are tests/test_cluster.py's; the nodes `ray up` makes run the same `ray start`.)

Each "server" is one address of this host. sshd gives the sessions of each address their own RAY_TMPDIR
(each node its own Ray temp dir, its own ports) and all of them one test HOME (so nothing lands in the real
home; rsync resolves `~` of the remote side with the sending side's HOME, so per-node homes would send the
worker's copy into the head's), and points the node setup at this environment (BAGNET_NODE_PYTHON) instead
of installing the project again; the shipped file installs. BAGNET_NODE_PYTHON is in a folder of wrappers
(python, ray, ssh) that the node script puts first on PATH: its `ssh` reads `-i ~/...` from HOME, because
OpenSSH takes `~` from the account's passwd entry (/root), where the head's copy of the key is not. Ports come from the node settings (BAGNET_RAY_PORT, ...), so that the cluster
shares the host with other Ray instances; `ray stop` is never run here, it would stop them all.

BAGNET_RAY_UP_WORKERS=0 brings up the head alone (with the CPUs the jobs need): on a host so loaded that a
second raylet misses Ray's fixed wait for its dashboard agent (about 15 s), the worker never joins.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.cluster_utils import VENV_BIN, free_ports, kill_pids, process_tree, processes_mentioning

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = str(VENV_BIN / "ray")
SSHD = "/usr/sbin/sshd"
WITH_WORKER = os.environ.get("BAGNET_RAY_UP_WORKERS", "1") != "0"
NODES = {"head": "127.0.0.1", "worker": "127.0.0.2"}
TINY_TRAIN = ["model.name=bagnet9_small", "data.train_size=128", "data.val_size=64", "optim.batch_size=32",
              "optim.epochs=1", "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "run.log_every=1000"]
# Settings for a busy 2-core host (as in tests/cluster_utils.py), on every node's processes.
NODE_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "240", "RAY_raylet_start_wait_time_s": "90",
    "RAY_agent_register_timeout_ms": "180000",  # the raylet waits this long for its dashboard agent
}
UP_TIMEOUT_S = 900
JOB_TIMEOUT_S = 900


class LoopbackServers:
    """sshd on the loopback addresses of NODES, each address a separate node (HOME, RAY_TMPDIR, ports)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ru", dir="/tmp"))  # short: Ray's socket paths live below
        self.key = self.root / "key"
        self.shared = self.root / "shared"
        self.client_home = self.root / "client"
        self.home = self.root / "home"  # the "servers'" account home
        self.temp = {name: self.root / name[0] for name in NODES}  # each node's RAY_TMPDIR
        self.gcs_port, self.dashboard_port, self.forward_port = free_ports(3)
        self.sshd: subprocess.Popen | None = None

    def start(self) -> None:
        for home in (self.home, self.client_home):
            home.mkdir()
            (home / ".bashrc").touch()  # the launcher's commands `source ~/.bashrc`
        for temp in self.temp.values():
            temp.mkdir()
        self.shared.mkdir()
        self._wrappers()
        for key in (self.key, self.root / "hostkey"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        config = self.root / "sshd_config"
        config.write_text("\n".join([
            *(f"ListenAddress {ip}:22" for ip in NODES.values()),
            f"HostKey {self.root / 'hostkey'}", f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.key}.pub", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
            self._setenv("head"),
            f"Match LocalAddress {NODES['worker']}", "  " + self._setenv("worker"), ""]))
        self.sshd = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(self.root / "sshd.log")],
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while "Server listening" not in self.log() or self.log().count("Server listening") < len(NODES):
            assert self.sshd.poll() is None, f"sshd exited (is port 22 of 127.0.0.1/127.0.0.2 taken?):\n{self.log()}"
            assert time.monotonic() < deadline, f"sshd did not listen in 30 s:\n{self.log()}"
            time.sleep(0.2)

    def _wrappers(self) -> None:
        bin_dir = self.root / "bin"
        bin_dir.mkdir()
        scripts = {"python": f'exec {sys.executable} "$@"', "ray": f'exec {RAY} "$@"',
                   "ssh": 'args=(); for a in "$@"; do [[ "$a" == "~/"* ]] && a="$HOME/${a#"~/"}"; args+=("$a"); done\n'
                          'exec /usr/bin/ssh "${args[@]}"'}
        for name, body in scripts.items():
            (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
            (bin_dir / name).chmod(0o755)
        self.python = bin_dir / "python"

    def _setenv(self, node: str) -> str:
        ports = free_ports(7)
        head_cpus = 0 if WITH_WORKER else 2  # as in ray-cluster.yaml, the head runs no work when it can
        start_args = [f"--num-cpus={head_cpus if node == 'head' else 2}", "--object-store-memory=150000000",
                      f"--node-manager-port={ports[0]}", f"--dashboard-agent-listen-port={ports[1]}",
                      f"--dashboard-agent-grpc-port={ports[2]}", f"--metrics-export-port={ports[3]}",
                      f"--runtime-env-agent-port={ports[4]}"]
        if node == "head":
            start_args.append(f"--ray-client-server-port={ports[5]}")
        env = {"HOME": str(self.home), "RAY_TMPDIR": str(self.temp[node]), "BAGNET_NODE_PYTHON": str(self.python),
               "BAGNET_RAY_PORT": str(self.gcs_port), "BAGNET_DASHBOARD_PORT": str(self.dashboard_port),
               "BAGNET_OBJECT_MANAGER_PORT": str(ports[6]), "BAGNET_RAY_START_ARGS": " ".join(start_args),
               **NODE_RAY_ENV}
        return "SetEnv " + " ".join(f'"{k}={v}"' for k, v in env.items())

    def log(self) -> str:
        path = self.root / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ray_processes(self) -> list[int]:
        """Every process of the cluster's nodes: those naming a node's Ray temp dir, and their children."""
        pids: set[int] = set()
        for temp in self.temp.values():
            for pid in processes_mentioning(f"{temp}/ray/"):
                pids.update(process_tree(pid))
        return sorted(pids)

    def stop(self) -> None:
        kill_pids(self.ray_processes())
        if self.sshd:
            kill_pids(process_tree(self.sshd.pid))
            self.sshd.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


def cluster_file(servers: LoopbackServers) -> Path:
    """ray-cluster-onprem.yaml with its `# >>> SET:` values filled in, as a user would."""
    text = (ROOT / "ray-cluster-onprem.yaml").read_text()
    workers = f"[{NODES['worker']}]" if WITH_WORKER else "[]"
    for placeholder, value in {"YOUR-HEAD-IP": NODES["head"], "[YOUR-WORKER-IP]": workers,
                               "YOUR-SSH-USER": "root", "~/.ssh/YOUR-KEY": str(servers.key),
                               "/YOUR-SHARED-ROOT/bagnet": str(servers.shared),
                               "cluster_name: bagnet-onprem": f"cluster_name: bagnet-test-{os.getpid()}"}.items():
        assert placeholder in text, placeholder
        text = text.replace(placeholder, value)
    path = servers.root / "ray-cluster-onprem.yaml"  # `ray up` runs in ROOT: file_mounts are relative to the cwd
    path.write_text(text)
    return path


def client_env(servers: LoopbackServers) -> dict[str, str]:
    """The user's shell: their own HOME (token), the project's `ray`, token auth, the forwarded dashboard."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "BAGNET_"))}
    env.update(HOME=str(servers.client_home), RAY_TMPDIR=str(servers.client_home), RAY_AUTH_MODE="token",
               RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{servers.forward_port}",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    return env


def ray(env: dict, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([RAY, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"`ray {' '.join(args)}` exited {out.returncode}:\n{out.stdout[-6000:]}\n{out.stderr[-4000:]}"
    return out


def wait_for_alive_nodes(env: dict, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = ray(env, "list", "nodes", "--address", env["RAY_API_SERVER_ADDRESS"], "--format", "json",
                  check=False, timeout=120)
        alive = sum(n["state"] == "ALIVE" for n in json.loads(out.stdout)) if out.returncode == 0 else 0
        if alive >= count:
            return
        assert time.monotonic() < deadline, f"{alive} of {count} nodes alive after {timeout:.0f} s:\n{out.stdout}{out.stderr}"
        time.sleep(5)


@pytest.fixture(scope="module")
def servers():
    s = LoopbackServers()
    try:
        s.start()
        yield s
    finally:
        s.stop()


def test_ray_up_submit_and_down_on_loopback(servers):
    # `ray down` runs a plain `ray stop` on the head: with a `ray` on the login PATH it would stop every
    # Ray instance of this host, not only the test cluster's
    login_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert shutil.which("ray", path=login_path) is None, "a `ray` on the system PATH: `ray down` would stop all Ray here"
    config = cluster_file(servers)
    env = client_env(servers)
    dashboard = None
    try:
        ray(env, "get-auth-token", "--generate")
        (servers.client_home / ".ray" / "auth_token").chmod(0o600)
        up = ray(env, "up", "-y", str(config), timeout=UP_TIMEOUT_S)
        assert "storage ok" in up.stdout + up.stderr  # the head's setup checked the shared root
        # `ray dashboard` forwards a local port to the head's dashboard, which listens on 127.0.0.1 only
        dashboard = subprocess.Popen([RAY, "dashboard", "--port", str(servers.forward_port), "--remote-port",
                                      str(servers.dashboard_port), str(config)], env=env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_alive_nodes(env, count=2 if WITH_WORKER else 1, timeout=UP_TIMEOUT_S)  # the head's autoscaler starts the worker
        head_token = servers.home / ".ray" / "auth_token"
        assert oct(head_token.stat().st_mode & 0o777) == "0o600"

        train = ray(env, "job", "submit", "--working-dir", ".", "--", "python", "jobs/train.py", "--config",
                    "configs/synthetic.yaml", *TINY_TRAIN, f"run.storage_path={servers.shared}/train", "run.name=tiny",
                    timeout=JOB_TIMEOUT_S)
        assert "succeeded" in train.stdout, train.stdout[-4000:]
        run_dir = servers.shared / "train" / "tiny"
        assert list(pd.read_parquet(run_dir / "metrics.parquet")["epoch"]) == [0]
        assert (run_dir / "model.pt").stat().st_size > 0

        # the on-prem teardown: the node script stops every worker and the head, then `ray down`
        ray(env, "exec", str(config), "cd ~/bagnet-toolkit && scripts/cluster-node.sh stop-cluster")
        down = ray(env, "down", "-y", str(config))
        assert "No nodes remaining" in down.stdout + down.stderr
        deadline = time.monotonic() + 60
        while (left := servers.ray_processes()) and time.monotonic() < deadline:
            time.sleep(1)
        assert not left, "processes of the cluster still running after ray down:\n" + "\n".join(
            Path(f"/proc/{pid}/cmdline").read_text(errors="replace").replace("\0", " ")[:200] for pid in left
            if Path(f"/proc/{pid}/cmdline").exists())
    finally:
        if dashboard:
            kill_pids(process_tree(dashboard.pid))
