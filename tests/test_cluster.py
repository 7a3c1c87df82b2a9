"""Jobs on a real multi-node Ray cluster on this host: submission, spreading, losing a node.

The cluster mirrors ray-cluster.yaml: a head with no CPUs (it runs only the job drivers and
Train's controller) and two 2-CPU worker nodes; a local directory both nodes see stands for the
shared storage (S3 / NFS) a real cluster needs. Everything talks to the cluster through `ray`
CLI subprocesses (`ray job submit`, `ray list ...`), never through this process's Ray.
Tests run in file order; the last one kills a node.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pandas as pd
import pytest

from cluster.runtime_env import REPO_ROOT, job_runtime_env
from tests.cluster_utils import LocalCluster

pytestmark = pytest.mark.slow

WORKERS = ("worker-a", "worker-b")
TINY_TRAIN = ["model.name=bagnet9_small", "data.train_size=256", "data.val_size=128", "optim.batch_size=32",
              "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "run.log_every=1000"]
JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster.create(extra_env={
        # detect a dead node in ~3 s instead of ~15 s (GCS health checks)
        "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
        "RAY_health_check_timeout_ms": "1000",
    })
    try:
        c.start_head(num_cpus=0)
        for name in WORKERS:
            c.add_node(name, num_cpus=2, resources={"worker_node": 1})
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def shared(cluster) -> Path:
    path = cluster.root / "shared"
    path.mkdir()
    return path


def submit(cluster: LocalCluster, submission_id: str, entrypoint: list[str]):
    """Submit with the runtime env a user ships (cluster/runtime_env.py): the repo minus .venv etc."""
    return cluster.submit(entrypoint, submission_id=submission_id, runtime_env=job_runtime_env(REPO_ROOT, environ={}))


def finish(cluster: LocalCluster, proc, submission_id: str) -> str:
    """Wait for a submitted job; returns its log, failing with the log tail if the job failed."""
    rc = proc.wait(timeout=JOB_TIMEOUT_S)
    log = (cluster.root / f"job-{submission_id}.log").read_text(errors="replace")
    assert rc == 0, f"job {submission_id} failed (exit {rc}):\n{log[-6000:]}"
    assert cluster.job_status(submission_id) == "SUCCEEDED"
    return log


def actor_nodes(state: dict, class_name: str, alive_only: bool = False) -> list[str]:
    """Node names of the actors of ``class_name`` in a ``cluster.state(job)`` snapshot."""
    return [a["node"] for a in state["actors"]
            if a["class_name"] == class_name and (a["state"] == "ALIVE" or not alive_only)]


def test_experiment_job_spreads_over_both_nodes(cluster, shared):
    proc = submit(cluster, "spread", [
        "python", "jobs/experiment.py", "--experiment", "predictions", "--config", "configs/experiments-synthetic.yaml",
        "models=[{name: bagnet9_small, weights: null}]", "data.test_size=256", "data.read_batch_size=32",
        "data.num_cpus=0.5", "compute.batch_size=32", "compute.actor_pool_size=2", "compute.num_cpus=1",
        # both replicas up before images flow (else the first ready one may do all of this small job)
        "compute.wait_for_actors_s=300", f"output={shared}/experiments", "run_id=spread"])
    finish(cluster, proc, "spread")

    # the working dir arrived without .venv (GBs), .git or results: a few MiB at most
    (shipped,) = cluster.working_dirs()
    assert (shipped / "jobs" / "train.py").is_file() and (shipped / "bagnet" / "models.py").is_file()
    assert not {".venv", ".git", "results", "bench/out"} & {str(p.relative_to(shipped)) for p in shipped.rglob("*")}
    assert sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file()) < 5 * 2**20

    rows = pd.read_parquet(shared / "experiments" / "spread" / "predictions")
    assert len(rows) == 256 and rows["image_id"].is_unique
    state = cluster.state("spread", tasks=True)
    work = [t["node"] for t in state["tasks"] if t["type"] == "NORMAL_TASK" and "synthetic_images" in t["name"]]
    actors = [a["node"] for a in state["actors"] if "MapWorker" in a["class_name"]]
    print(json.dumps({"generation_tasks": pd.Series(work).value_counts().to_dict(),
                      "model_actors": pd.Series(actors).value_counts().to_dict()}))
    assert len(actors) == 2
    assert set(work + actors) == set(WORKERS), (work, actors)


def test_training_writes_to_shared_storage_and_survives_losing_its_node(cluster, shared):
    epochs = 6
    run_dir = shared / "train" / "fault"
    proc = submit(cluster, "fault", ["python", "jobs/train.py", "--config", "configs/synthetic.yaml", *TINY_TRAIN,
                                     f"optim.epochs={epochs}", "run.max_failures=1",
                                     f"run.storage_path={shared}/train", "run.name=fault"])
    # where the worker group runs (both workers on one node: Train packs its placement group)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(nodes := actor_nodes(cluster.state("fault"), "RayTrainWorker", alive_only=True)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the Train workers never started"
        time.sleep(1)
    victim = cluster.nodes[nodes[0]]
    # kill that node as soon as the first epoch is committed (rank 0 rewrites metrics.parquet once
    # `ray.train.report` has persisted the epoch's checkpoint to shared storage)
    while not (run_dir / "metrics.parquet").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the job ended"
        time.sleep(0.2)
    killed = victim.kill()
    done_at_kill = len(pd.read_parquet(run_dir / "metrics.parquet"))
    assert proc.poll() is None and done_at_kill < epochs, "the job finished before the node was killed"
    print(f"killed {victim.name} ({len(killed)} processes) after {done_at_kill} epoch(s)")

    log = finish(cluster, proc, "fault")
    events = "\n".join(line for line in log.splitlines()
                       if re.search(r"resumed|FailurePolicy|worker group|Restart|died|\[train\] epoch", line))
    resumed = re.search(r"resumed from checkpoint after epoch (\d+)", log)
    assert resumed and int(resumed.group(1)) >= done_at_kill, events  # no committed epoch is trained again
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert list(metrics["epoch"]) == list(range(epochs)), metrics[["epoch", "finished_at"]]  # each epoch once
    assert metrics["finished_at"].is_monotonic_increasing and (metrics["world_size"] == 2).all()
    assert (run_dir / f"epoch_{epochs - 1:04d}" / "state.pt").is_file()  # checkpoints on the shared storage
    assert (run_dir / "model.pt").stat().st_size > 0 and (run_dir / "config.yaml").is_file()
    survivor = next(n for n in WORKERS if n != victim.name)
    state = cluster.state("fault")
    assert survivor in actor_nodes(state, "RayTrainWorker")  # the restarted worker group
    # the Train workers ran on the worker nodes (the head has no CPUs), the controller by the driver
    assert set(actor_nodes(state, "RayTrainWorker")) <= set(WORKERS)
    assert actor_nodes(state, "TrainController") == ["head"]
    assert state["nodes"][victim.name]["state"] == "DEAD"
