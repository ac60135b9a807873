"""Shared fixtures: a real S3 HTTP server (moto) on 127.0.0.1, started once per session."""

from __future__ import annotations

import logging
import os
import socket
import uuid

import pytest

# Tests must never reach a real cloud endpoint or pick up a developer's credentials.
for _name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "M3I_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
    os.environ.pop(_name, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Environment of a client of the test server, with fast retries."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("M3I_S3_RETRIES", "3")
    monkeypatch.setenv("M3I_S3_BACKOFF", "0.01")
    return s3_server


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the test server; yields ``s3://name``."""
    from m3i.storage import S3Settings

    name = f"m3i-test-{uuid.uuid4().hex[:12]}"
    S3Settings.from_env().client().make_bucket(name)
    return f"s3://{name}"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_uri(request, tmp_path) -> str:
    """A store root on each backend: a local folder and a prefix in a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/some/prefix"
