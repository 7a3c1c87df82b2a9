"""Shared fixtures: one local Ray instance for the whole session (starting one costs seconds)."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.pop("RAY_ADDRESS", None)

import pytest

pytest_plugins = ["tests.fixtures_s3"]  # one moto S3 server for the session: s3_server, s3_bucket


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from cluster.ray_env import init_ray

    init_ray(num_cpus=2, object_store_memory=400 * 1024**2)
    yield ray
    ray.shutdown()
