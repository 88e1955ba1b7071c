"""Shared fixtures: every backend a test can run on, made fresh per test.

``backend`` is parametrized over ``BACKEND_KINDS``; tests that take it run once per
backend, the same test code each time. A test that needs a second run on the same store
simply reuses the same ``Backend`` object. S3 and Azure stores live on real protocol
servers (moto_server, Azurite) started once per session on 127.0.0.1 (``servers.py``);
each test gets its own fresh prefix in one session bucket/container.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from latency_proxy import proxied
from servers import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    S3_KEY_ID,
    S3_REGION,
    S3_SECRET,
    azure_server,
    s3_server,
)

import apersist
from apersist import _format as fmt

# No client may ever probe a cloud metadata address from the tests.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

BACKEND_KINDS = ["memory", "filesystem", "s3", "azure"]
# APERSIST_TEST_LATENCY_MS=N puts a LatencyProxy (tests/support/latency_proxy.py) adding N ms
# per request in front of the S3 and Azure servers: the suite then runs against stores that
# answer like remote ones. 0 (the default) talks to the servers directly.
LATENCY_MS = float(os.environ.get("APERSIST_TEST_LATENCY_MS") or 0)
TEST_BUCKET = "apersist-tests"
TEST_CONTAINER = "apersist-tests"


# ----------------------------------------------------------------------------- servers
def _run_async(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``fn()`` to completion on a fresh loop in a thread: the fixtures that call this
    may be set up from inside a running test's loop (``request.getfixturevalue``)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, fn()).result()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with s3_server(tmp_path_factory.getbasetemp()) as url, proxied(url, LATENCY_MS) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """The session's bucket on the S3 server (created once)."""

    async def create() -> None:
        from aiobotocore.session import get_session

        async with get_session().create_client(
                "s3", endpoint_url=s3_endpoint, region_name=S3_REGION,
                aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET) as client:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                await client.create_bucket(Bucket=TEST_BUCKET)

    _run_async(create)
    return TEST_BUCKET


@pytest.fixture(scope="session")
def azure_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with azure_server(tmp_path_factory.getbasetemp()) as url, proxied(url, LATENCY_MS) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def azure_container(azure_endpoint: str) -> str:
    """The session's container on the Azure server (created once)."""

    async def create() -> None:
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob.aio import BlobServiceClient

        credential = {"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY}
        async with BlobServiceClient(azure_endpoint, credential=credential) as service:
            with contextlib.suppress(ResourceExistsError):
                await service.create_container(TEST_CONTAINER)

    _run_async(create)
    return TEST_CONTAINER


def s3_settings(endpoint: str, bucket: str) -> apersist.AwsS3Settings:
    return apersist.AwsS3Settings(bucket, access_key=S3_KEY_ID, secret_access_key=S3_SECRET,
                                  with_path_style=True, region=S3_REGION, endpoint=endpoint)


# ----------------------------------------------------------------------------- backends
def _unique_root() -> str:
    return f"t/{uuid.uuid4().hex}"


def make_backend(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> apersist.Backend:
    """A fresh, empty store of ``kind``; server fixtures are started only when needed."""
    if kind == "memory":
        return apersist.Backend.memory()
    if kind == "filesystem":
        return apersist.Backend.filesystem(tmp_path / f"store-{uuid.uuid4().hex[:8]}")
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        endpoint = request.getfixturevalue("s3_endpoint")
        return apersist.Backend.s3(_unique_root(), s3_settings(endpoint, bucket))
    if kind == "azure":
        container = request.getfixturevalue("azure_container")
        endpoint = request.getfixturevalue("azure_endpoint")
        return apersist.Backend.azure(_unique_root(), AZURITE_ACCOUNT, AZURITE_KEY, container,
                                      endpoint=endpoint)
    raise AssertionError(f"unknown backend kind {kind}")


@pytest.fixture(params=BACKEND_KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(backend_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> apersist.Backend:
    """A fresh, empty store on each backend kind."""
    return make_backend(backend_kind, tmp_path, request)


@pytest.fixture
def backend_factory(backend_kind: str, tmp_path: Path,
                    request: pytest.FixtureRequest) -> Callable[[str], apersist.Backend]:
    """Make further independent stores of the same kind: ``backend_factory("other")``."""

    def make(name: str) -> apersist.Backend:
        return make_backend(backend_kind, tmp_path / name, request)

    return make


@pytest.fixture
def segment_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every commit uploads its segments as objects of their own, however small (format
    5.0 carries a small commit's segments inline in its record: ``fmt.INLINE_BYTES``).

    For the tests whose subject is segment objects: their uploads, sizes, loss, damage and
    collection. ``tests/test_inline_commits.py`` covers the inline ones.
    """
    monkeypatch.setattr(fmt, "INLINE_BYTES", 0)
