"""A real S3 API for tests: moto's server on loopback, with the AWS_* variables pointing at it.

Registered for every test by ``pytest_plugins`` in tests/conftest.py.
The variables are set in this process only;
Ray workers started earlier do not see them, which is why jobs forward them (see
docs/experiments.md).
"""

from __future__ import annotations

import logging
import os
import uuid

import pytest

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on 127.0.0.1 (a free port); AWS_* set while it runs."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A new, empty bucket name on the moto server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def storage_options(endpoint: str) -> dict:
    """``storage_options`` for pandas / fsspec reads from the moto server."""
    return {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}
