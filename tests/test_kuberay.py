"""The KubeRay RayJobs in k8s/: valid against KubeRay's RayJob schema (tests/data/kuberay/) as the
API server checks them (unknown fields rejected, as `kubectl apply` does by default), running the
documented job commands on a GPU worker group, with results under BAGNET_RESULTS."""

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster import paths
from jobs import experiment, train, tune

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "tests" / "data" / "kuberay" / "rayjob-v1.json").read_text())
MANIFESTS = sorted((ROOT / "k8s").glob("rayjob-*.yaml"))
JOBS = {"jobs/train.py": train, "jobs/tune.py": tune, "jobs/experiment.py": experiment}


def strict(schema):
    """``schema`` with unknown fields rejected wherever Kubernetes rejects them (objects with
    declared properties and no ``x-kubernetes-preserve-unknown-fields``), like the API server's
    strict field validation; jsonschema alone would accept any extra key."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


VALIDATOR = jsonschema.Draft4Validator(strict(SCHEMA["openAPIV3Schema"]))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def errors(manifest: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(manifest)]


def pods(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def test_three_jobs():
    assert {load(p)["spec"]["entrypoint"].split()[1] for p in MANIFESTS} == set(JOBS)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_a_valid_rayjob(path):
    manifest = load(path)
    assert manifest["apiVersion"] == f"{SCHEMA['group']}/{SCHEMA['version']}" and manifest["kind"] == SCHEMA["kind"]
    assert not errors(manifest), errors(manifest)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_runs_the_documented_job_on_gpus_with_results_on_s3(path, monkeypatch, capsys):
    manifest = load(path)
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu = [g for g in groups if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu and all(t["key"] == "nvidia.com/gpu" for g in gpu for t in g["template"]["spec"]["tolerations"])
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no work
    for pod in pods(manifest):  # every process sees the results root of k8s/settings.yaml
        for container in pod["containers"]:
            assert {"configMapRef": {"name": "bagnet-settings"}} in container["envFrom"], path.name
    settings = load(ROOT / "k8s" / "settings.yaml")
    assert settings["metadata"]["name"] == "bagnet-settings" and settings["data"][paths.RESULTS_ENV].startswith("s3://")
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] in (ROOT / "k8s" / "Dockerfile").read_text()
    # the entrypoint is a job command line that validates (its config resolved under the bucket)
    python, script, *args = shlex.split(spec["entrypoint"])
    assert python == "python" and script in JOBS
    monkeypatch.setenv(paths.RESULTS_ENV, "s3://our-bucket/bagnet")
    JOBS[script].main([*args, "--print-config"])
    assert "s3://our-bucket/bagnet/" in capsys.readouterr().out


def test_cluster_specs_share_one_head():
    heads = [load(p)["spec"]["rayClusterSpec"]["headGroupSpec"] for p in MANIFESTS]
    assert all(h == heads[0] for h in heads)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["spec"].update(entrypont=m["spec"].pop("entrypoint")), "'entrypont' was unexpected"),
    (lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="two"), "'two' is not of type 'integer'"),
    (lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"].pop("template"), "'template' is a required property"),
    (lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
     "'name' is a required property"),
])
def test_schema_rejects_a_broken_manifest(change, message):
    manifest = copy.deepcopy(load(MANIFESTS[0]))
    change(manifest)
    assert any(message in e for e in errors(manifest)), errors(manifest)
