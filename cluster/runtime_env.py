"""What a job ships to the cluster: its runtime environment, plus the checks a new node runs.

    ray job submit --runtime-env-json "$(python -m cluster.runtime_env)" -- python jobs/train.py ...
    python -m cluster.runtime_env --pip --format yaml   # for a cluster without the project installed (KubeRay)
    python -m cluster.runtime_env --check-storage s3://bucket/bagnet   # can this node write there?
    python -m cluster.runtime_env --check-gpu           # can torch use this node's GPU (when it should have one)?
    python -m cluster.runtime_env --check-cluster-file ray-cluster-onprem.yaml   # no `# >>> SET:` value left unset

The working directory is the checkout minus what must not travel: the patterns of ``.rayignore``
(virtualenvs, results, git history, weights, keys), which Ray also applies to a plain
``ray job submit --working-dir .``, on top of ``.gitignore``. Only non-secret settings are forwarded
from the submitting shell (S3 endpoint and region). Credentials never travel in a runtime env (it is
shown in the dashboard, and ``--runtime-env-json`` puts it on a command line): nodes get them from
their instance profile, or from ``~/.bagnet/secrets.env`` on the node (``scripts/cluster-node.sh``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

if __package__ in (None, ""):  # `python cluster/runtime_env.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store import storage

REPO_ROOT = Path(__file__).resolve().parents[1]

RAYIGNORE = REPO_ROOT / ".rayignore"


def read_ignore_file(path: str | Path = RAYIGNORE) -> tuple[str, ...]:
    """The gitignore-style patterns of ``path`` (comments and blank lines dropped): by default what never
    travels with a job, relative to the working directory."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))

# Forwarded from the submitting shell (or driver) to the cluster's processes when set: where S3 is
# and which named profile to use, never the credentials themselves (nodes get those from their
# instance profile or ~/.bagnet/secrets.env).
FORWARDED_ENV: tuple[str, ...] = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    "BAGNET_CACHE", "BAGNET_PROGRESS_BARS", "BAGNET_RESULTS", "BAGNET_VERBOSE",
)
# Never pinned through a runtime env: the cluster's Ray must stay the one its nodes run.
NOT_SHIPPED: tuple[str, ...] = ("ray",)
PLACEHOLDER_BUCKET = "YOUR-BUCKET"
PLACEHOLDER = "YOUR-"  # every `# >>> SET:` value of the cluster files holds it until set
# The oldest NVIDIA driver branch each CUDA major version runs on (NVIDIA's minor-version compatibility).
MIN_DRIVER_FOR_CUDA = {13: 580, 12: 525, 11: 450}
NVIDIA_PCI_VENDOR = "0x10de"


CREDENTIALS_FIX = ("credentials never travel with a job (a runtime env is shown in the dashboard, and "
                   "--runtime-env-json puts it on a command line): give the nodes an instance profile / IAM role, "
                   "or put the keys in ~/.bagnet/secrets.env on each node (KEY=value lines, mode 0600; "
                   "scripts/cluster-node.sh loads it into Ray's processes). See docs/cluster.md, Security")


def forwarded_env(environ: Mapping[str, str] | None = None,
                  names: Sequence[str] = FORWARDED_ENV) -> dict[str, str]:
    """The variables ``names`` of ``environ`` (default ``os.environ``) that are set: what a job's
    processes on the cluster should see."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in names if environ.get(name)}


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a package name from requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def read_constraints(path: str | Path = REPO_ROOT / "constraints.txt") -> dict[str, str]:
    """``{normalised name: version}`` from a pip constraints file of ``name==version`` lines."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"{path}: {line!r} is not of the form name==version")
        pins[_name(name)] = version.strip().split(";")[0].strip()
    return pins


def pinned_requirements(pyproject: str | Path = REPO_ROOT / "pyproject.toml",
                        constraints: str | Path = REPO_ROOT / "constraints.txt") -> list[str]:
    """The project's dependencies pinned to the tested versions in ``constraints.txt`` (Ray excluded).

    For clusters whose image lacks the project (``pip`` in the runtime env); the cluster launcher
    config installs the same pins with ``pip install -c constraints.txt``.
    """
    pins = read_constraints(constraints)
    deps = tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"]
    out = []
    for dep in deps:
        name = _name(dep)
        if name in NOT_SHIPPED:
            continue
        if name not in pins:
            raise ValueError(f"{constraints}: no pin for {name!r} (a dependency in {pyproject})")
        extras = re.match(r"\s*[A-Za-z0-9._-]+\s*(\[[^\]]*\])?", dep).group(1) or ""
        out.append(f"{name}{extras}=={pins[name]}")
    return out


def job_runtime_env(working_dir: str | Path = REPO_ROOT, *, environ: Mapping[str, str] | None = None,
                    pip: bool = False) -> dict:
    """The ``runtime_env`` for ``ray job submit --runtime-env-json`` (or ``JobSubmissionClient``)."""
    env: dict = {"working_dir": str(working_dir), "excludes": list(read_ignore_file())}
    if env_vars := forwarded_env(environ):
        env["env_vars"] = env_vars
    if pip:
        env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
    return env


def check_storage(uri: str) -> str:
    """Write, read back and delete a probe object under ``uri``; raise naming the URI if that fails.

    Run on every node by ``ray-cluster.yaml`` so a wrong bucket or a node type without an
    ``IamInstanceProfile`` fails ``ray up`` instead of the first checkpoint of a long run.
    """
    if not uri or PLACEHOLDER in uri:
        raise ValueError(f"storage URI {uri!r} is not set: set it in the cluster file (ray-cluster.yaml: the "
                         "lines marked `# >>> SET: bucket`; ray-cluster-onprem.yaml: `# >>> SET: results`)")
    probe = storage.join(uri, "_node_checks", f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_text_atomic(probe, "ok\n")
        if storage.read_bytes(probe) != b"ok\n":
            raise OSError("read back different bytes")
        storage.delete(probe)
    except Exception as err:  # noqa: BLE001 - any failure means the node cannot use the bucket
        raise OSError(f"this node cannot write to {uri}: {err}. Check the bucket name and region, and that "
                      "this node type has an IamInstanceProfile with access to it") from err
    return probe


class GPUCheckError(RuntimeError):
    """A node that should have a usable GPU has none; the message names the driver, torch's CUDA and the fix."""


def nvidia_pci_devices(pci_root: str | Path = "/sys/bus/pci/devices") -> list[str]:
    """PCI addresses of NVIDIA display/3D controllers: the GPUs the machine has, driver or not."""
    found = []
    for dev in sorted(Path(pci_root).glob("*")):
        try:
            vendor = (dev / "vendor").read_text().strip()
            cls = (dev / "class").read_text().strip()
        except OSError:
            continue
        if vendor == NVIDIA_PCI_VENDOR and cls.startswith("0x03"):
            found.append(dev.name)
    return found


def nvidia_driver_version(proc_file: str | Path = "/proc/driver/nvidia/version") -> str | None:
    """The loaded NVIDIA kernel driver's version (e.g. ``580.95.05``), or None when none is loaded."""
    try:
        text = Path(proc_file).read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for [\w]+)?\s+([\d.]+)", text)
    return match.group(1) if match else None


def gpu_expected(setting: str | None, pci_root: str | Path = "/sys/bus/pci/devices") -> bool:
    """``BAGNET_EXPECT_GPU``: 1/0 force the check on/off; unset or ``auto``: on when an NVIDIA GPU is on the bus."""
    setting = (setting or "auto").strip().lower()
    if setting in ("1", "yes", "true"):
        return True
    if setting in ("0", "no", "false"):
        return False
    if setting != "auto":
        raise ValueError(f"BAGNET_EXPECT_GPU={setting!r}: use 1 (this node must have a usable GPU), 0 (no check) "
                         "or auto (check when an NVIDIA GPU is on the PCI bus)")
    return bool(nvidia_pci_devices(pci_root))


def check_gpu(expect: bool, driver: str | None = None) -> str:
    """If ``expect``, make sure torch can run on a GPU; raise ``GPUCheckError`` naming the driver version,
    torch's CUDA version and the fix otherwise. Returns a one-line summary."""
    if not expect:
        return "no GPU expected on this node (BAGNET_EXPECT_GPU=1 forces the check)"
    import torch  # here, not at the top: printing a runtime env must not pay torch's import

    driver = driver or nvidia_driver_version()
    cuda = torch.version.cuda
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        try:
            (torch.ones(2, device="cuda") * 2).sum().item()
            return f"{torch.cuda.device_count()} GPU(s) usable: {torch.cuda.get_device_name(0)}, driver {driver}, " \
                   f"torch {torch.__version__} (CUDA {cuda})"
        except RuntimeError as err:
            problem = f"a CUDA operation failed: {err}"
    else:
        problem = "torch.cuda.is_available() is False"
    needed = MIN_DRIVER_FOR_CUDA.get(int(cuda.split(".")[0])) if cuda else None
    driver_text = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver loaded (/proc/driver/nvidia/version missing)"
    cuda_text = (f"torch {torch.__version__} is built for CUDA {cuda}"
                 + (f", which needs driver R{needed} or newer" if needed else "")) if cuda \
        else f"torch {torch.__version__} is a CPU-only build"
    fix = (f"install an NVIDIA driver R{needed or MIN_DRIVER_FOR_CUDA[13]}+ on this node (on AWS: boot the node type "
           "from the GPU image of ray-cluster.yaml, see docs/cluster.md 'GPU images'), or install the torch build "
           "for this driver; for a node without a GPU set BAGNET_EXPECT_GPU=0")
    raise GPUCheckError(f"this node should have a usable GPU, but {problem}: {driver_text}; {cuda_text}. Fix: {fix}")


def placeholders_left(config: object, path: str = "") -> list[str]:
    """The keys (dotted paths) of a parsed cluster file whose values still hold a ``YOUR-...`` placeholder."""
    if isinstance(config, dict):
        return [hit for key, value in config.items() for hit in placeholders_left(value, f"{path}.{key}" if path else str(key))]
    if isinstance(config, list):
        return [hit for i, value in enumerate(config) for hit in placeholders_left(value, f"{path}[{i}]")]
    return [path] if isinstance(config, str) and PLACEHOLDER in config else []


def check_cluster_file(path: str | Path) -> None:
    """Refuse a cluster file whose `# >>> SET:` values are still placeholders, naming each key."""
    left = placeholders_left(yaml.safe_load(Path(path).read_text()))
    if left:
        raise ValueError(f"{path}: still a placeholder ({PLACEHOLDER}...): {', '.join(left)}. Set the values on the "
                         f"lines marked `# >>> SET:` (grep -n '>>> SET' {path})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--working-dir", default=str(REPO_ROOT), help="directory to ship (default: this checkout)")
    parser.add_argument("--with-credentials", action="store_true", help="refused: " + CREDENTIALS_FIX)
    parser.add_argument("--pip", action="store_true", help="install the pinned project dependencies in the job's env")
    parser.add_argument("--format", choices=("json", "yaml"), default="json")
    parser.add_argument("--check-storage", metavar="URI", help="check that this node can write to URI, then exit")
    parser.add_argument("--check-gpu", action="store_true",
                        help="check that torch can use this node's GPU when it should have one (BAGNET_EXPECT_GPU)")
    parser.add_argument("--check-cluster-file", metavar="YAML", help="refuse a cluster file with placeholders left")
    args = parser.parse_args(argv)
    try:
        if args.with_credentials:
            raise ValueError(f"--with-credentials is gone: {CREDENTIALS_FIX}")
        if args.check_storage is not None:
            check_storage(args.check_storage)
            print(f"storage ok: {args.check_storage}")
            return 0
        if args.check_gpu:
            print(f"gpu check: {check_gpu(gpu_expected(os.environ.get('BAGNET_EXPECT_GPU')))}")
            return 0
        if args.check_cluster_file:
            check_cluster_file(args.check_cluster_file)
            print(f"{args.check_cluster_file}: every `# >>> SET:` value is set")
            return 0
    except (OSError, ValueError, GPUCheckError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    env = job_runtime_env(args.working_dir, pip=args.pip)
    if args.format == "yaml":
        print(yaml.safe_dump(env, sort_keys=False), end="")
    else:
        print(json.dumps(env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
