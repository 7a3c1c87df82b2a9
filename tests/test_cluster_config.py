"""Offline checks of the cluster setup: the cluster files (AWS, on-prem) against the launcher's own
validation, the node script they share, docs/cluster.md against the `ray` CLI, and the job runtime
environment (no AWS, no Ray cluster, no GPU)."""

from __future__ import annotations

import copy
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from cluster import ray_env, runtime_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "ray-cluster.yaml"
ONPREM = ROOT / "ray-cluster-onprem.yaml"
NODE_SCRIPT = ROOT / "scripts" / "cluster-node.sh"
DOCS = ROOT / "docs" / "cluster.md"
RAY = str(Path(sys.executable).with_name("ray"))
GPU_IMAGE = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def onprem() -> dict:
    return yaml.safe_load(ONPREM.read_text())


def test_config_passes_the_launchers_validation(config, onprem):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # merges aws/defaults.yaml, checks docker + node types
    validate_config(prepared)  # Ray's ray-schema.json and its cross-field rules
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    local = prepare_config(copy.deepcopy(onprem))  # local provider: one node type, workers = worker_ips
    validate_config(local)
    assert local["provider"]["type"] == "local"
    assert local["max_workers"] == len(onprem["provider"]["worker_ips"]) >= 1


def test_head_runs_no_work_and_gpu_workers_can_reach_s3(config):
    import ray

    types = config["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != "head"}
    assert {t["node_config"]["InstanceType"] for t in workers.values()} == {"g5.12xlarge", "p4d.24xlarge"}
    for name, t in workers.items():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
    assert config["max_workers"] >= sum(t["max_workers"] for t in workers.values())
    assert config["idle_timeout_minutes"] > 0
    # the cluster's Ray is the client's (ray-ml images are dead: plain Ray image + our install)
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert config["docker"]["head_image"] == f"rayproject/ray:{ray.__version__}-py311-cpu"


def node_script(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(NODE_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)


def node_env(home: Path, **extra: str) -> dict:
    """A node's environment for scripts/cluster-node.sh: its own HOME, the project's interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAGNET_", "RAY_"))}
    env.update(HOME=str(home), BAGNET_NODE_PYTHON=sys.executable, PYTHONPATH=str(ROOT), **extra)
    return env


def test_both_files_run_the_shared_node_script(config, onprem):
    """Setup and start are scripts/cluster-node.sh's, identical in the AWS and on-prem files."""
    for cfg in (config, onprem):
        (setup,) = cfg["setup_commands"]
        assert setup.startswith("cd ~/bagnet-toolkit && scripts/cluster-node.sh setup"), setup
    assert config["worker_start_ray_commands"] == onprem["worker_start_ray_commands"]
    # the on-prem head differs only in running Ray's v1 autoscaler (v2 starts no local-provider workers)
    assert onprem["head_start_ray_commands"] == [c.replace("&& scripts/", "&& RAY_enable_autoscaler_v2=0 scripts/")
                                                 for c in config["head_start_ray_commands"]]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all("scripts/cluster-node.sh ray start" in c for c in config[key]), key
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in config["head_start_ray_commands"][0]
    assert "--address=$RAY_HEAD_IP" in config["worker_start_ray_commands"][0]


def test_every_node_installs_the_tested_pins():
    pins = runtime_env.read_constraints()
    install_sh = (ROOT / "scripts" / "install.sh").read_text()  # what the README, CI and every node run
    for name in ("torch", "torchvision"):
        assert re.findall(rf"\b{name}==([\w.+]+)", install_sh) == [pins[name]], name
    assert "pip install -q -c constraints.txt" in install_sh and '-e ".${extras}"' in install_sh
    script = NODE_SCRIPT.read_text()
    assert "scripts/install.sh" in script and "--check-storage" in script and "--check-gpu" in script


def test_dashboard_listens_on_loopback_only(config, onprem):
    """k1: the dashboard (job API) binds 127.0.0.1 on the head; `ray dashboard` forwards it over SSH."""
    script = NODE_SCRIPT.read_text()
    assert "--dashboard-host=127.0.0.1" in script and "0.0.0.0" not in script
    for cfg in (config, onprem):
        starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
        assert "dashboard-host" not in starts  # nothing overrides the script's binding


def test_aws_nodes_use_a_security_group_with_ssh_from_one_cidr_only(config, tmp_path):
    """k2: every node type names its security group, so the launcher makes none of its own (which opens
    SSH to 0.0.0.0/0); scripts/aws-security-group.sh makes that group with SSH from the given CIDR only."""
    for name, t in config["available_node_types"].items():
        assert t["node_config"]["SecurityGroupIds"], name
    assert re.search(r"#\s*>>> SET: security-group\b", CONFIG.read_text())
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls"
    (fake / "aws").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                              'case "$*" in *describe-vpcs*) echo vpc-1;; *create-security-group*) echo sg-1;; esac\n')
    (fake / "aws").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    script = str(ROOT / "scripts" / "aws-security-group.sh")
    out = subprocess.run(["bash", script, "203.0.113.7/32"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "sg-1", out.stderr
    log = calls.read_text()
    assert "--protocol tcp --port 22 --cidr 203.0.113.7/32" in log
    assert "UserIdGroupPairs=[{GroupId=sg-1}]" in log and "0.0.0.0/0" not in log
    for bad in ("0.0.0.0/0", "not-a-cidr", ""):
        refused = subprocess.run(["bash", script, bad], env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "aws-security-group.sh" in refused.stderr, bad


def test_node_setup_makes_the_token_owner_only_and_writes_the_results_root(tmp_path):
    """k4: Ray writes ~/.ray/auth_token 0644 and rsync keeps the mode; setup makes it 0600 on every node,
    and records BAGNET_RESULTS (the shared root) in the node env that every Ray process reads."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = home / ".ray" / "auth_token"
    token.write_text("secret-token")
    token.chmod(0o644)
    results = tmp_path / "shared"
    env = node_env(home, BAGNET_EXPECT_GPU="0")
    out = node_script("setup", "--results", str(results), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    node_env_file = home / ".bagnet" / "node.env"
    assert node_env_file.read_text() == f"BAGNET_RESULTS={results}\n"
    assert stat.S_IMODE(node_env_file.stat().st_mode) == 0o600
    assert "storage ok" in out.stdout and "no GPU expected" in out.stdout
    token.unlink()
    missing = node_script("setup", "--results", str(results), env=env)
    assert missing.returncode != 0 and "ray get-auth-token --generate" in missing.stderr
    token.write_text("secret-token")
    placeholder = node_script("setup", "--results", "/YOUR-SHARED-ROOT/bagnet", env=env)
    assert placeholder.returncode != 0 and "# >>> SET: results" in placeholder.stderr


def test_gpu_node_types_boot_the_driver_image_and_check_their_gpu(config):
    """Issue 15.1: GPU node types boot the DLAMI Base OSS NVIDIA driver image (R580+, for torch's CUDA 13)
    and stop their setup when torch cannot use the GPU; the head keeps the launcher's default image."""
    types = config["available_node_types"]
    for name, t in types.items():
        if name == "head":
            assert "worker_setup_commands" not in t and "ImageId" not in t["node_config"]
            continue
        assert t["node_config"]["ImageId"] == GPU_IMAGE, name
        assert t["worker_setup_commands"] == ["cd ~/bagnet-toolkit && BAGNET_EXPECT_GPU=1 scripts/cluster-node.sh check-gpu"]
    assert runtime_env.MIN_DRIVER_FOR_CUDA[13] == 580


def test_gpu_check_fails_with_driver_cuda_and_fix_when_forced_on(tmp_path):
    """No GPU here: forced on, the node check fails naming the driver, torch's CUDA and the fix; off, it passes."""
    import torch

    env = node_env(tmp_path)
    forced = node_script("check-gpu", env={**env, "BAGNET_EXPECT_GPU": "1"})
    assert forced.returncode == 1, forced.stdout + forced.stderr
    message = forced.stderr
    assert "should have a usable GPU" in message and "no NVIDIA driver loaded" in message
    assert f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" in message
    assert "R580" in message and "Fix: install an NVIDIA driver" in message and "BAGNET_EXPECT_GPU=0" in message
    off = node_script("check-gpu", env={**env, "BAGNET_EXPECT_GPU": "0"})
    assert off.returncode == 0 and "no GPU expected" in off.stdout, off.stderr
    with pytest.raises(runtime_env.GPUCheckError, match="NVIDIA driver 470.82.01"):
        runtime_env.check_gpu(True, driver="470.82.01")
    bad = node_script("check-gpu", env={**env, "BAGNET_EXPECT_GPU": "maybe"})
    assert bad.returncode == 1 and "BAGNET_EXPECT_GPU='maybe'" in bad.stderr


def test_gpu_expected_when_an_nvidia_gpu_is_on_the_bus(tmp_path):
    def device(name: str, vendor: str, cls: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "vendor").write_text(vendor + "\n")
        (tmp_path / name / "class").write_text(cls + "\n")

    device("0000:00:01.0", "0x8086", "0x060000")  # a bridge
    device("0000:00:02.0", "0x10de", "0x040300")  # an NVIDIA audio function: not a GPU
    assert not runtime_env.gpu_expected(None, pci_root=tmp_path)
    device("0000:17:00.0", "0x10de", "0x030200")  # an NVIDIA 3D controller (A100, H100, A10G)
    assert runtime_env.nvidia_pci_devices(tmp_path) == ["0000:17:00.0"]
    assert runtime_env.gpu_expected("auto", pci_root=tmp_path) and not runtime_env.gpu_expected("0", pci_root=tmp_path)
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build\n")
    assert runtime_env.nvidia_driver_version(version) == "580.95.05"
    assert runtime_env.nvidia_driver_version(tmp_path / "missing") is None


def test_file_mounts_ship_every_package_and_the_install_files(config, onprem):
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for cfg in (config, onprem):
        mounts = cfg["file_mounts"]
        for remote, local in mounts.items():
            if not local.startswith("~"):  # ~/.ray/auth_token is the user's, made by `ray get-auth-token`
                assert (ROOT / local).exists(), f"file_mounts[{remote!r}]: {local} does not exist"
        shipped = {Path(local).name for local in mounts.values()}
        assert {p.rstrip("*") for p in include} <= shipped
        assert {"pyproject.toml", "constraints.txt", "README.md", "scripts", "auth_token"} <= shipped
    assert config["file_mounts"] == onprem["file_mounts"]


def test_variables_to_set_are_marked_and_placeholders_are_refused(config, tmp_path):
    text = CONFIG.read_text()
    for name in ("bucket", "region", "iam", "security-group"):
        assert re.search(rf"#\s*>>> SET: {name}\b", text), f"no `# >>> SET: {name}` marker"
    bucket = next(o for o in config["docker"]["run_options"] if "BAGNET_RESULTS=" in o).split("=", 2)[2]
    with pytest.raises(ValueError, match="# >>> SET: bucket"):
        runtime_env.check_storage(bucket)
    onprem_text = ONPREM.read_text()
    for name in ("head", "workers", "ssh-user", "ssh-key", "results"):
        assert re.search(rf"#\s*>>> SET: {name}\b", onprem_text), f"no `# >>> SET: {name}` marker"
    with pytest.raises(ValueError, match=r"provider\.head_ip, provider\.worker_ips\[0\], auth\.ssh_user, "
                                         r"auth\.ssh_private_key, setup_commands\[0\]"):
        runtime_env.check_cluster_file(ONPREM)
    with pytest.raises(ValueError, match="SecurityGroupIds"):
        runtime_env.check_cluster_file(CONFIG)
    filled = onprem_text.replace("YOUR-HEAD-IP", "10.0.0.1").replace("YOUR-WORKER-IP", "10.0.0.2") \
        .replace("YOUR-SSH-USER", "lab").replace("YOUR-KEY", "id_ed25519").replace("/YOUR-SHARED-ROOT", "/srv/nfs")
    (tmp_path / "filled.yaml").write_text(filled)
    assert runtime_env.main(["--check-cluster-file", str(tmp_path / "filled.yaml")]) == 0


def documented_ray_commands() -> list[list[str]]:
    """Every `ray ...` command of docs/cluster.md: bash blocks (with line continuations) and inline code."""
    text = DOCS.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`(ray [^`]+)`", text)
    return [tokens for line in lines if (tokens := shlex.split(line, comments=True)) and tokens[0] == "ray"]


def _subcommand(tokens: list[str]) -> tuple[str, ...]:
    return tuple(tokens[1:3]) if tokens[1] == "job" else (tokens[1],)


# Prints the --help text of every `ray` subcommand named on argv (one process: importing the
# CLI costs seconds, so not one `ray X --help` each).
HELP_SCRIPT = """
import sys, click
from ray.scripts.scripts import cli
for sub in sys.argv[1:]:
    cmd, ctx = cli, click.Context(cli, info_name="ray")
    for part in sub.split():
        cmd = cmd.get_command(ctx, part)
        ctx = click.Context(cmd, info_name=part, parent=ctx)
    print(f"=== {sub}"); print(cmd.get_help(ctx))
"""


def cli_help(subcommands: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    out = subprocess.run([sys.executable, "-c", HELP_SCRIPT, *(" ".join(s) for s in subcommands)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return {tuple(chunk.split("\n", 1)[0].split()): chunk for chunk in out.split("=== ")[1:]}


def test_docs_use_only_options_the_ray_cli_has():
    commands = documented_ray_commands()
    subcommands = sorted({_subcommand(t) for t in commands})
    assert {("up",), ("down",), ("dashboard",), ("exec",), ("job", "submit"), ("job", "logs")} <= set(subcommands)
    up = subprocess.run([RAY, "up", "--help"], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0 and re.search(r"-y, --yes", up.stdout), up.stdout + up.stderr
    helps = cli_help(subcommands)
    assert helps[("up",)].split("Options:")[1].split() == up.stdout.split("Options:")[1].split()
    for tokens in commands:
        sub = _subcommand(tokens)
        args = tokens[1 + len(sub):]
        args = args[:args.index("--")] if "--" in args else args  # after `--`: the job's entrypoint
        for arg in args:
            if arg.startswith("-"):
                flag = arg.split("=", 1)[0]
                assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,]|$)", helps[sub], re.M), \
                    f"`{shlex.join(tokens)}` in docs/cluster.md: `ray {' '.join(sub)}` has no {flag}"
            elif arg.endswith((".yaml", ".py")) and not arg.startswith(("$", "s3://")):
                assert (ROOT / arg).exists(), f"`{shlex.join(tokens)}` in docs/cluster.md: no file {arg}"


def test_runtime_env_ships_the_checkout_without_secrets(capsys):
    """k5: no route puts credentials in a runtime env (dashboard) or on a `--runtime-env-json` command line."""
    environ = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
               "AWS_ACCESS_KEY_ID": "AKIA...", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "t",
               "HOME": "/root"}
    env = runtime_env.job_runtime_env(ROOT, environ=environ)
    assert env["working_dir"] == str(ROOT)
    assert {".venv/", ".git/", "results/", "bench/out/", ".env", "*.pem"} <= set(env["excludes"])
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
    assert "env_vars" not in runtime_env.job_runtime_env(ROOT, environ={})
    assert "pip" not in env
    assert runtime_env.main(["--with-credentials"]) == 1
    err = capsys.readouterr().err
    assert "~/.bagnet/secrets.env" in err and "instance profile" in err
    assert "secrets.env" in NODE_SCRIPT.read_text()  # the node script loads it into Ray's processes


def test_plain_working_dir_upload_leaves_secrets_and_bulk_home(tmp_path):
    """k7: `ray job submit --working-dir .` applies the repository's .rayignore (Ray's own packaging)."""
    from ray._private.runtime_env import packaging

    src = tmp_path / "checkout"
    for rel in ("jobs/train.py", "configs/a.yaml", ".env", "deploy/key.pem", "id_rsa", "model.pt",
                ".venv/bin/python", "results/run/metrics.parquet", ".git/HEAD", ".aws/credentials"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    (src / ".rayignore").write_text((ROOT / ".rayignore").read_text())
    packaging.create_package(str(src), tmp_path / "pkg.zip", include_gitignore=True)
    shipped = {n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")}
    assert shipped == {"jobs/train.py", "configs/a.yaml", ".rayignore"}
    assert runtime_env.job_runtime_env(ROOT, environ={})["excludes"] == list(runtime_env.read_ignore_file())


def test_pip_pins_follow_constraints_and_never_ray(tmp_path):
    pins = runtime_env.read_constraints()
    packages = runtime_env.job_runtime_env(ROOT, environ={}, pip=True)["pip"]["packages"]
    assert f"torch=={pins['torch']}" in packages and f"torchvision=={pins['torchvision']}" in packages
    assert not [p for p in packages if p.startswith("ray")]
    short = tmp_path / "constraints.txt"
    short.write_text("torch==2.14.1\n")
    with pytest.raises(ValueError, match="no pin for 'torchvision'"):
        runtime_env.pinned_requirements(constraints=short)


def test_check_storage_writes_reads_and_cleans_up(tmp_path, capsys):
    probe = runtime_env.check_storage(str(tmp_path / "bucket"))
    assert probe.startswith(str(tmp_path)) and not Path(probe).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot write to"):
        runtime_env.check_storage(str(tmp_path / "file" / "below"))
    assert runtime_env.main(["--check-storage", "s3://YOUR-BUCKET/bagnet"]) == 1
    assert "# >>> SET: bucket" in capsys.readouterr().err
    assert runtime_env.main(["--check-storage", "/YOUR-SHARED-ROOT/bagnet"]) == 1
    assert "# >>> SET: results" in capsys.readouterr().err


def test_ray_address_for_drivers(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_env.cluster_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_env.cluster_address() == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ray_env.RayAddressError, match="RAY_API_SERVER_ADDRESS"):
        ray_env.cluster_address()
