"""A real S3 API server on loopback (moto in server mode) for the storage tests, with the AWS
environment pointed at it the way a pod's spec.env would."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lmforge.devcluster.s3server import S3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "LMFORGE_S3_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LMFORGE_S3_CHUNK_BYTES", str(64 * 1024))  # several chunks per test file
    return env
