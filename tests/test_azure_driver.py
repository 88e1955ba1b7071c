"""The Azure Blob driver: the conformance suite against Azurite, plus Azure specifics.

Every test uses its own fresh root prefix in the session's container, so they can share
one Azurite. The error-mapping tests run against a tiny in-process HTTP server that answers
every request with a chosen status and ``x-ms-error-code``, as Azure does when it throttles
or fails.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from azure.storage.blob import BlobBlock, BlockState
from azure.storage.blob.aio import BlobClient, BlobServiceClient, ContainerClient
from helpers import check_round_trip
from servers import AZURITE_ACCOUNT, AZURITE_KEY

import apersist
import apersist._drivers
import apersist._drivers.azure as azure_module
import apersist._run
from apersist._config import AzureBackend
from apersist._drivers.azure import AzureDriver
from apersist._drivers.base import (
    Driver,
    ObjectExistsError,
    ObjectNotFoundError,
    TransientBackendError,
)
from apersist._drivers.retry import RetryingDriver
from apersist._errors import BackendError
from apersist.testing import DRIVER_CHECKS, DriverConformance, check_driver

MIB = 1 << 20
# A valid base64 key that is not the account's: the service refuses its signatures.
WRONG_KEY = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="


def _root() -> str:
    return f"t/{uuid.uuid4().hex}"


def _backend(endpoint: str, container: str, *, root: str | None = None,
             key: str = AZURITE_KEY) -> AzureBackend:
    return apersist.Backend.azure(_root() if root is None else root, AZURITE_ACCOUNT, key,
                                  container, endpoint=endpoint)


@pytest.fixture
async def service(azure_endpoint: str) -> AsyncIterator[BlobServiceClient]:
    """A raw SDK client, to look at what the driver stored."""
    credential = {"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY}
    async with BlobServiceClient(azure_endpoint, credential=credential) as client:
        yield client


@pytest.fixture
def raw(service: BlobServiceClient, azure_container: str) -> ContainerClient:
    return service.get_container_client(azure_container)


@pytest.fixture
async def make_driver(azure_endpoint: str,
                      azure_container: str) -> AsyncIterator[Callable[..., AzureDriver]]:
    """``make_driver(root=..., multipart_bytes=..., key=...)``; each driver is closed after."""
    made: list[AzureDriver] = []

    def make(*, root: str | None = None, multipart_bytes: int = 16 * MIB, key: str = AZURITE_KEY,
             container: str | None = None, endpoint: str | None = None,
             max_connections: int = 16) -> AzureDriver:
        backend = _backend(endpoint or azure_endpoint, container or azure_container, root=root, key=key)
        driver = AzureDriver(backend, multipart_bytes=multipart_bytes, max_connections=max_connections)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.aclose()


# --------------------------------------------------------------------------- conformance


# The suite runs on the driver as runs use it: behind its retry layer. Azurite on a loaded
# machine sometimes resets a connection (a TransientBackendError the bare driver maps
# correctly, tested below), which a run retries; the checks still fail on any wrong answer.
class TestAzureDriver(DriverConformance):
    @pytest.fixture
    async def driver(self, azure_endpoint: str, azure_container: str) -> AsyncIterator[Driver]:
        driver = RetryingDriver(AzureDriver(_backend(azure_endpoint, azure_container)))
        yield driver
        await driver.aclose()


class TestAzureDriverEmptyRoot(DriverConformance):
    """With an empty root, keys are blob names as they are: each test gets its own container."""

    @pytest.fixture
    async def driver(self, azure_endpoint: str,
                     service: BlobServiceClient) -> AsyncIterator[Driver]:
        container = f"t-{uuid.uuid4().hex[:20]}"
        await service.create_container(container)
        driver = RetryingDriver(AzureDriver(_backend(azure_endpoint, container, root="")))
        try:
            yield driver
        finally:
            await driver.aclose()
            await service.delete_container(container)


# Checks that write the same keys again and again, run with tiny blocks so that every put
# of more than a few KiB takes the staged-block path (the large and the 1010-key checks
# would only be slow, and prove nothing more about blocks).
STAGED_CHECKS = [name for name in DRIVER_CHECKS if name not in ("put_get_large", "list_and_delete_many")]


async def test_conformance_with_staged_blocks(azure_endpoint: str, azure_container: str) -> None:
    async def make() -> Driver:
        # Racing staged overwrites of one key discard each other's blocks (a transient
        # failure by design), so this runs behind the retry layer, as runs do.
        backend = _backend(azure_endpoint, azure_container)
        return RetryingDriver(AzureDriver(backend, multipart_bytes=4096, max_connections=8),
                              apersist.RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.2))

    await check_driver(make, checks=STAGED_CHECKS)


# --------------------------------------------------------------------------- staged blocks


async def test_large_object_goes_as_staged_blocks(make_driver: Callable[..., AzureDriver],
                                                  raw: ContainerClient) -> None:
    root = _root()
    driver = make_driver(root=root, multipart_bytes=5 * MIB)
    data = bytes(range(256)) * (11 * MIB // 256) + b"tail"
    await driver.put("big/object", data)
    assert await driver.get("big/object") == data
    start, end = 5 * MIB - 2, 10 * MIB + 3  # a range across block boundaries
    assert await driver.get("big/object", start=start, end=end) == data[start:end]
    committed, uncommitted = await raw.get_blob_client(f"{root}/big/object").get_block_list("all")
    assert [block.size for block in committed] == [5 * MIB, 5 * MIB, len(data) - 10 * MIB]
    assert uncommitted == []
    assert len({block.id for block in committed}) == 3
    assert len({len(block.id) for block in committed}) == 1  # one id length per blob

    # if_absent on the existing key: refused, and the original stays whole.
    other = b"\xff" * (11 * MIB)
    with pytest.raises(ObjectExistsError, match="big/object"):
        await driver.put("big/object", other, if_absent=True)
    assert await driver.get("big/object") == data

    # if_absent on a new key creates it; an overwrite by blocks replaces it whole.
    await driver.put("big/created", other, if_absent=True)
    assert await driver.get("big/created") == other
    await driver.put("big/created", data)
    assert await driver.get("big/created") == data
    assert [(i.key, i.size) async for i in driver.list("big/")] == [
        ("big/created", len(data)), ("big/object", len(data))]


async def test_small_objects_go_in_one_request(make_driver: Callable[..., AzureDriver],
                                               raw: ContainerClient) -> None:
    root = _root()
    driver = make_driver(root=root, multipart_bytes=5 * MIB)
    await driver.put("small", b"x" * (5 * MIB - 1))
    committed, uncommitted = await raw.get_blob_client(f"{root}/small").get_block_list("all")
    assert committed == []  # a Put Blob, not a block list
    assert uncommitted == []


async def test_racing_staged_creates_have_one_winner(make_driver: Callable[..., AzureDriver]) -> None:
    driver = make_driver(multipart_bytes=1024, max_connections=4)
    payloads = [bytes([i]) * (5000 + i) for i in range(6)]
    results = await asyncio.gather(*(driver.put("race", p, if_absent=True) for p in payloads),
                                   return_exceptions=True)
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, ObjectExistsError) for r in results if r is not None), results
    assert await driver.get("race") == payloads[winners[0]]


async def test_blocks_taken_by_a_concurrent_commit_are_transient(
        make_driver: Callable[..., AzureDriver], raw: ContainerClient,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit of the same key discards our staged blocks: the put fails transiently, and a
    retry (which stages again) succeeds."""
    root = _root()
    driver = make_driver(root=root, multipart_bytes=1024)
    real = BlobClient.commit_block_list

    async def commit_after_a_rival(self: Any, *args: Any, **kwargs: Any) -> Any:
        # The rival commits a block list of its own first, which discards our blocks. (A
        # rival Put Blob does that on Azure too, but Azurite 3.37 keeps the blocks then.)
        rival = raw.get_blob_client(f"{root}/key")
        rival_id = "r" * 24 + "-000000"  # one id length per blob, as the driver's
        await rival.stage_block(rival_id, b"rival")
        await real(rival, [BlobBlock(rival_id, BlockState.UNCOMMITTED)])  # unpatched
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(BlobClient, "commit_block_list", commit_after_a_rival)
    with pytest.raises(TransientBackendError, match="code=InvalidBlockList"):
        await driver.put("key", b"a" * 3000)
    monkeypatch.setattr(BlobClient, "commit_block_list", real)
    await driver.put("key", b"a" * 3000)
    assert await driver.get("key") == b"a" * 3000


# --------------------------------------------------------------------------- errors on Azurite


async def test_missing_container_is_a_permanent_error(make_driver: Callable[..., AzureDriver],
                                                      azure_endpoint: str) -> None:
    driver = make_driver(container="no-such-container")
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "put": lambda: driver.put("k", b"x"),
        "put-if-absent": lambda: driver.put("k", b"x", if_absent=True),
        "get": lambda: driver.get("k"),
        "get-empty-range": lambda: driver.get("k", start=0, end=0),
        "list": lambda: _collect(driver, ""),
        "delete": lambda: driver.delete(["k", "j"]),
    }
    for what, call in calls.items():
        with pytest.raises(BackendError) as info:
            await call()
        exc = info.value
        assert type(exc) is BackendError, (what, exc)  # not missing object, not transient
        message = str(exc)
        assert "container not found" in message, (what, message)
        assert "container=no-such-container" in message, (what, message)
        assert f"endpoint={azure_endpoint}" in message, (what, message)
        assert AZURITE_KEY not in message
        if what != "delete":  # a batch's sub-responses are not exceptions
            assert exc.__cause__ is not None


async def test_wrong_account_key_is_a_permanent_auth_error(
        make_driver: Callable[..., AzureDriver], azure_container: str) -> None:
    driver = make_driver(key=WRONG_KEY)
    for call in (lambda: driver.put("k", b"x"), lambda: driver.get("k"),
                 lambda: _collect(driver, "")):
        with pytest.raises(BackendError) as info:
            await call()
        exc = info.value
        assert type(exc) is BackendError
        message = str(exc)
        assert "status=403" in message
        assert f"container={azure_container}" in message
        assert "code=AuthorizationFailure" in message or "code=AuthenticationFailed" in message
        assert WRONG_KEY not in message
        assert AZURITE_KEY not in message
        assert WRONG_KEY not in repr(driver)


async def test_malformed_account_key_is_a_permanent_error(make_driver: Callable[..., AzureDriver]) -> None:
    driver = make_driver(key="not base64 at all!")
    with pytest.raises(BackendError) as info:
        await driver.put("k", b"x")
    assert type(info.value) is BackendError
    assert "not base64 at all!" not in str(info.value)


async def test_unreachable_endpoint_is_transient(make_driver: Callable[..., AzureDriver]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    driver = make_driver(endpoint=endpoint)
    with pytest.raises(TransientBackendError, match=f"azure get failed: key=k .*endpoint={endpoint}"):
        await driver.get("k")


# --------------------------------------------------------------------------- root, delete


async def test_root_prefix_isolates_stores(make_driver: Callable[..., AzureDriver],
                                           raw: ContainerClient) -> None:
    base = _root()
    a = make_driver(root=f"{base}/a")
    ab = make_driver(root=f"{base}/ab")  # a name that the other root is a string prefix of
    whole = make_driver(root=base)
    await a.put("k", b"from a")
    await ab.put("k", b"from ab")
    await ab.put("a/k", b"nested")
    assert [(i.key, i.size) async for i in a.list("")] == [("k", 6)]
    assert [i.key async for i in ab.list("")] == ["a/k", "k"]
    assert [i.key async for i in whole.list("")] == ["a/k", "ab/a/k", "ab/k"]
    assert await a.get("k") == b"from a"
    assert await whole.get("ab/k") == b"from ab"
    blob = await raw.download_blob(f"{base}/a/k")
    assert await blob.readall() == b"from a"
    await a.delete(["k", "a/k"])  # "a/k" of this root does not exist; ab's "a/k" is untouched
    assert [i.key async for i in whole.list("")] == ["ab/a/k", "ab/k"]
    with pytest.raises(ObjectNotFoundError):
        await a.get("k")


async def test_root_with_slashes_is_normalized(make_driver: Callable[..., AzureDriver],
                                               raw: ContainerClient) -> None:
    base = _root()
    driver = make_driver(root=f"/{base}//x/")
    await driver.put("k", b"v")
    assert [b.name async for b in raw.list_blobs(name_starts_with=f"{base}/")] == [f"{base}/x/k"]


async def test_delete_goes_in_batches_of_at_most_256(make_driver: Callable[..., AzureDriver],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    driver = make_driver()
    keys = [f"many/{i:04d}" for i in range(700)]
    semaphore = asyncio.Semaphore(32)

    async def put(key: str) -> None:
        async with semaphore:
            await driver.put(key, b"x")

    await asyncio.gather(*(put(k) for k in keys))
    batches: list[int] = []
    real = ContainerClient.delete_blobs

    async def counting(self: Any, *blobs: Any, **kwargs: Any) -> Any:
        batches.append(len(blobs))
        return await real(self, *blobs, **kwargs)

    monkeypatch.setattr(ContainerClient, "delete_blobs", counting)
    # Missing keys and duplicates among them: both are fine.
    await driver.delete([*keys, "many/missing", keys[0], "elsewhere/x"])
    assert sorted(batches) == [190, 256, 256]
    assert [i async for i in driver.list("many/")] == []


# --------------------------------------------------------------------------- lifecycle


async def test_client_is_made_once_and_lazily(make_driver: Callable[..., AzureDriver],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    real = BlobServiceClient

    def counting(*args: Any, **kwargs: Any) -> Any:
        assert kwargs["retry_total"] == 0  # the SDK never retries on its own
        client = real(*args, **kwargs)
        made.append(client)
        return client

    monkeypatch.setattr("apersist._drivers.azure.BlobServiceClient", counting)
    driver = make_driver()
    assert made == []  # nothing happens before the first request
    await driver.put("k", b"v")
    results = await asyncio.gather(*(driver.get("k") for _ in range(20)))
    assert results == [b"v"] * 20
    assert len(made) == 1


async def test_concurrent_first_calls_share_one_client(make_driver: Callable[..., AzureDriver],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    real = BlobServiceClient

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("apersist._drivers.azure.BlobServiceClient", counting)
    driver = make_driver()
    await asyncio.gather(*(driver.put(f"k{i}", b"v") for i in range(10)))
    assert len(made) == 1


async def test_aclose_twice_before_and_after_use(make_driver: Callable[..., AzureDriver]) -> None:
    unused = make_driver()
    await unused.aclose()
    await unused.aclose()
    driver = make_driver()
    await driver.put("k", b"v")
    await driver.aclose()
    await driver.aclose()
    with pytest.raises(RuntimeError, match="closed"):  # the one error of every driver
        await driver.get("k")


async def test_aclose_closes_the_session_even_if_the_client_fails_to_close(
        make_driver: Callable[..., AzureDriver], monkeypatch: pytest.MonkeyPatch) -> None:
    driver = make_driver()
    await driver.put("k", b"v")
    session = driver._session
    assert session is not None

    async def broken_close(self: Any) -> None:
        raise RuntimeError("close failed")

    monkeypatch.setattr(BlobServiceClient, "close", broken_close)
    with pytest.raises(RuntimeError, match="close failed"):
        await driver.aclose()
    assert session.closed
    await driver.aclose()  # still safe


async def test_repr_and_errors_never_show_the_key(make_driver: Callable[..., AzureDriver]) -> None:
    driver = make_driver()
    assert AZURITE_KEY not in repr(driver)
    with pytest.raises(ObjectNotFoundError) as info:
        await driver.get("absent")
    assert AZURITE_KEY not in str(info.value)


# --------------------------------------------------------------------------- error mapping


class FakeAzure:
    """An HTTP server that answers every request with ``status`` and ``code``."""

    def __init__(self) -> None:
        self.status = 500
        self.code: str | None = "InternalError"
        self.delay = 0.0
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = {"x-ms-request-id": str(uuid.uuid4()), "x-ms-version": "2026-06-06"}
        body = ""
        if self.code:
            headers["x-ms-error-code"] = self.code
            body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{self.code}</Code>'
                    f"<Message>fake {self.code}</Message></Error>")
        return web.Response(status=self.status, headers=headers, body=body,
                            content_type="application/xml")


@pytest.fixture
async def fake_azure() -> AsyncIterator[tuple[FakeAzure, str]]:
    fake = FakeAzure()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield fake, f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    finally:
        await runner.cleanup()


@pytest.fixture
def fake_driver(fake_azure: tuple[FakeAzure, str],
                make_driver: Callable[..., AzureDriver]) -> tuple[FakeAzure, AzureDriver]:
    fake, endpoint = fake_azure
    return fake, make_driver(endpoint=endpoint, container="fakecontainer", root="r")


@pytest.mark.parametrize(("status", "code"), [
    (503, "ServerBusy"), (500, "InternalError"), (500, "OperationTimedOut"), (502, None),
    (504, None), (429, None), (408, None),
])
async def test_throttling_and_server_errors_are_transient(
        fake_driver: tuple[FakeAzure, AzureDriver], status: int, code: str | None) -> None:
    fake, driver = fake_driver
    fake.status, fake.code = status, code
    for op, call in (("put", lambda: driver.put("a/b", b"x")),
                     ("put", lambda: driver.put("a/b", b"x", if_absent=True)),
                     ("get", lambda: driver.get("a/b")),
                     ("list", lambda: _collect(driver, "a/"))):
        fake.requests = 0
        with pytest.raises(TransientBackendError) as info:
            await call()
        message = str(info.value)
        key = "a/" if op == "list" else "a/b"
        assert message.startswith(f"azure {op} failed: key={key} container=fakecontainer "
                                  "endpoint=http://127.0.0.1:")
        assert f"status={status} code={code}" in message
        assert AZURITE_KEY not in message
        assert info.value.__cause__ is not None
        assert fake.requests == 1  # the SDK did not retry on its own


@pytest.mark.parametrize(("status", "code"), [
    (403, "AuthenticationFailed"), (403, "AuthorizationFailure"), (400, "InvalidHeaderValue"),
    (400, "OutOfRangeInput"), (409, "LeaseIdMissing"),
])
async def test_client_errors_are_permanent(fake_driver: tuple[FakeAzure, AzureDriver], status: int,
                                           code: str) -> None:
    fake, driver = fake_driver
    fake.status, fake.code = status, code
    with pytest.raises(BackendError) as info:
        await driver.put("a/b", b"x")
    assert type(info.value) is BackendError
    assert "azure put failed: key=a/b container=fakecontainer endpoint=http://127.0.0.1:" in str(info.value)
    assert f"status={status} code={code}" in str(info.value)


async def test_answers_map_to_protocol_errors(fake_driver: tuple[FakeAzure, AzureDriver]) -> None:
    fake, driver = fake_driver
    fake.status, fake.code = 404, "BlobNotFound"
    with pytest.raises(ObjectNotFoundError, match="key=a/b"):
        await driver.get("a/b")
    fake.status, fake.code = 409, "BlobAlreadyExists"
    with pytest.raises(ObjectExistsError, match="key=a/b"):
        await driver.put("a/b", b"x", if_absent=True)
    fake.status, fake.code = 404, "ContainerNotFound"
    with pytest.raises(BackendError, match="container not found: container=fakecontainer") as info:
        await driver.get("a/b")
    assert type(info.value) is BackendError


async def test_staged_upload_failure_is_mapped_once(fake_driver: tuple[FakeAzure, AzureDriver],
                                                    make_driver: Callable[..., AzureDriver],
                                                    fake_azure: tuple[FakeAzure, str]) -> None:
    fake, endpoint = fake_azure
    driver = make_driver(endpoint=endpoint, container="fakecontainer", multipart_bytes=1024,
                         max_connections=2)
    fake.status, fake.code = 503, "ServerBusy"
    with pytest.raises(TransientBackendError, match="status=503 code=ServerBusy"):
        await driver.put("a/b", b"x" * 10_000)  # ten blocks: the first failure cancels the rest
    assert fake.requests <= 10


async def test_read_timeout_is_transient(fake_driver: tuple[FakeAzure, AzureDriver],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake, driver = fake_driver
    monkeypatch.setattr(azure_module, "_READ_TIMEOUT_S", 0.2)
    fake.status, fake.code, fake.delay = 200, None, 1.0
    with pytest.raises(TransientBackendError, match="azure get failed: key=a/b"):
        await driver.get("a/b")


# --------------------------------------------------------------------------- end to end


async def test_run_round_trip_on_azurite(azure_endpoint: str, azure_container: str) -> None:
    backend = apersist.Backend.azure(_root(), AZURITE_ACCOUNT, AZURITE_KEY, azure_container,
                                     endpoint=azure_endpoint)
    driver = apersist._drivers.open_driver(backend)
    assert isinstance(driver, RetryingDriver)
    assert isinstance(driver.inner, AzureDriver)
    await driver.aclose()

    await check_round_trip(backend)


# --------------------------------------------------------------------------- helpers


async def _collect(driver: Driver, prefix: str) -> list[tuple[str, int]]:
    return [(info.key, info.size) async for info in driver.list(prefix)]
