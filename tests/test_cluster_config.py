"""Offline checks of the cluster setup: ray-cluster.yaml against the launcher's own validation,
docs/cluster.md against the `ray` CLI, and the job runtime environment (no AWS, no Ray cluster)."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from cluster import ray_env, runtime_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "ray-cluster.yaml"
DOCS = ROOT / "docs" / "cluster.md"
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_config_passes_the_launchers_validation(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # merges aws/defaults.yaml, checks docker + node types
    validate_config(prepared)  # Ray's ray-schema.json and its cross-field rules
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"


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


def test_every_node_installs_the_tested_pins_and_serves_the_dashboard(config):
    pins = runtime_env.read_constraints()
    setup = " ".join(config["setup_commands"])
    assert "pip install -q -c constraints.txt" in setup and " -e ." in setup
    install_sh = (ROOT / "scripts" / "install.sh").read_text()  # what the README and CI run
    for name in ("torch", "torchvision"):
        assert re.findall(rf"\b{name}==([\w.+]+)", setup) == [pins[name]], name
        assert re.findall(rf"\b{name}==([\w.+]+)", install_sh) == [pins[name]], name
    assert "--check-storage" in setup
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head and "--dashboard-port=8265" in head and "--port=6379" in head
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


def test_file_mounts_ship_every_package_and_the_install_files(config):
    mounts = config["file_mounts"]
    for remote, local in mounts.items():
        if not local.startswith("~"):  # ~/.ray/auth_token is the user's, made by `ray get-auth-token`
            assert (ROOT / local).exists(), f"file_mounts[{remote!r}]: {local} does not exist"
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = {Path(local).name for local in mounts.values()}
    assert {p.rstrip("*") for p in include} <= shipped
    assert {"pyproject.toml", "constraints.txt", "README.md"} <= shipped


def test_variables_to_set_are_marked_and_the_placeholder_bucket_is_refused(config):
    text = CONFIG.read_text()
    for name in ("bucket", "region", "iam"):
        assert re.search(rf"#\s*>>> SET: {name}\b", text), f"no `# >>> SET: {name}` marker"
    bucket = next(o for o in config["docker"]["run_options"] if "BAGNET_S3=" in o).split("=", 2)[2]
    with pytest.raises(ValueError, match="YOUR-BUCKET"):
        runtime_env.check_storage(bucket)


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


def test_runtime_env_ships_the_checkout_without_secrets_by_default(tmp_path):
    environ = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
               "AWS_ACCESS_KEY_ID": "AKIA...", "AWS_SECRET_ACCESS_KEY": "secret", "HOME": "/root"}
    env = runtime_env.job_runtime_env(ROOT, environ=environ)
    assert env["working_dir"] == str(ROOT)
    assert {".venv/", ".git/", "results/", "bench/out/"} <= set(env["excludes"])
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
    with_creds = runtime_env.job_runtime_env(ROOT, environ=environ, include_credentials=True)
    assert with_creds["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "secret"
    assert "env_vars" not in runtime_env.job_runtime_env(ROOT, environ={})
    assert "pip" not in env


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


def test_ray_address_for_drivers(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_env.cluster_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_env.cluster_address() == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ray_env.RayAddressError, match="RAY_API_SERVER_ADDRESS"):
        ray_env.cluster_address()
