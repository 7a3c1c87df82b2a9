"""What a job ships to the cluster: its runtime environment, plus a storage check for new nodes.

    ray job submit --runtime-env-json "$(python -m cluster.runtime_env)" -- python jobs/train.py ...
    python -m cluster.runtime_env --pip --format yaml   # for a cluster without the project installed (KubeRay)
    python -m cluster.runtime_env --check-storage s3://bucket/bagnet   # can this node write there?

The working directory is the checkout minus what must not travel (virtualenvs, results, git
history; Ray also honours ``.gitignore``). Only non-secret settings are forwarded from the
submitting shell (S3 endpoint and region): nodes get S3 credentials from their instance profile.
``--with-credentials`` forwards ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``
for on-premise S3-compatible stores; they are then visible to anyone who can read the job's
runtime environment in the dashboard.
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

# gitignore-style patterns, relative to the working directory (on top of .gitignore/.rayignore).
EXCLUDES: tuple[str, ...] = (
    ".git/", ".venv/", "venv/", "results/", "runs/", "bench/out/", "docs/img/",
    "__pycache__/", ".pytest_cache/", "*.egg-info/", "*.pt", "*.pth", "*.pth.tar", "*.ckpt",
)
# Forwarded from the submitting shell (or driver) to the cluster's processes when set: where S3 is
# and which named profile to use, never the credentials themselves (nodes get those from their
# instance profile; add AWS_ACCESS_KEY_ID etc. to compute.forward_env for stores without one).
FORWARDED_ENV: tuple[str, ...] = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    "BAGNET_CACHE", "BAGNET_PROGRESS_BARS", "BAGNET_RESULTS", "BAGNET_VERBOSE",
)
CREDENTIAL_ENV: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Never pinned through a runtime env: the cluster's Ray must stay the one its nodes run.
NOT_SHIPPED: tuple[str, ...] = ("ray",)
PLACEHOLDER_BUCKET = "YOUR-BUCKET"


def forwarded_env(environ: Mapping[str, str] | None = None, include_credentials: bool = False,
                  names: Sequence[str] = FORWARDED_ENV) -> dict[str, str]:
    """The variables ``names`` (plus the credentials, if asked) of ``environ`` (default
    ``os.environ``) that are set: what a job's processes on the cluster should see."""
    environ = os.environ if environ is None else environ
    names = (*names, *(CREDENTIAL_ENV if include_credentials else ()))
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
                    include_credentials: bool = False, pip: bool = False) -> dict:
    """The ``runtime_env`` for ``ray job submit --runtime-env-json`` (or ``JobSubmissionClient``)."""
    env: dict = {"working_dir": str(working_dir), "excludes": list(EXCLUDES)}
    if env_vars := forwarded_env(environ, include_credentials):
        env["env_vars"] = env_vars
    if pip:
        env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
    return env


def check_storage(uri: str) -> str:
    """Write, read back and delete a probe object under ``uri``; raise naming the URI if that fails.

    Run on every node by ``ray-cluster.yaml`` so a wrong bucket or a node type without an
    ``IamInstanceProfile`` fails ``ray up`` instead of the first checkpoint of a long run.
    """
    if not uri or PLACEHOLDER_BUCKET in uri:
        raise ValueError(f"storage URI {uri!r} is not set: replace {PLACEHOLDER_BUCKET} in ray-cluster.yaml "
                         "(the lines marked `# >>> SET: bucket`)")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--working-dir", default=str(REPO_ROOT), help="directory to ship (default: this checkout)")
    parser.add_argument("--with-credentials", action="store_true",
                        help="also forward AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN (visible in the dashboard)")
    parser.add_argument("--pip", action="store_true", help="install the pinned project dependencies in the job's env")
    parser.add_argument("--format", choices=("json", "yaml"), default="json")
    parser.add_argument("--check-storage", metavar="URI", help="check that this node can write to URI, then exit")
    args = parser.parse_args(argv)
    if args.check_storage is not None:
        try:
            check_storage(args.check_storage)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"storage ok: {args.check_storage}")
        return 0
    env = job_runtime_env(args.working_dir, include_credentials=args.with_credentials, pip=args.pip)
    if args.format == "yaml":
        print(yaml.safe_dump(env, sort_keys=False), end="")
    else:
        print(json.dumps(env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
