"""Segments handed to S3 and Azure as the commit's own ``bytearray``, without a copy.

Raw segments (``compression=None``) are built in place; a driver that ``accepts_buffers``
gets that buffer as it is, so no whole-segment copy runs on the event loop. These tests,
on moto_server and Azurite, check that both object-store drivers declare it (behind their
retry layer too), that such a buffer lands byte-identical on both the single-request and
the multipart/staged-block path and replays, and that a retried upload sends the same
bytes and leaves the buffer as it was.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from azure.core.exceptions import ServiceResponseError
from azure.storage.blob.aio import BlobClient
from conftest import make_backend

import apersist
from apersist._drivers import open_driver
from apersist._drivers.azure import AzureDriver
from apersist._drivers.base import Driver, capabilities_of
from apersist._drivers.retry import RetryingDriver
from apersist._drivers.s3 import S3Driver

MIB = 1 << 20
#: The smallest multipart size a Config allows: objects from here on go in parts/blocks.
PART = 5 * MIB
#: One object below PART (a single request) and one of three parts/blocks.
SIZES = {"single": 3 * MIB, "staged": 2 * PART + MIB}
FAST_RETRY = apersist.RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002)

KINDS = ["s3", "azure"]


def _payload(size: int) -> bytearray:
    """Different bytes at every 16-byte block, so a part landing in the wrong place shows."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += block.to_bytes(8, "big") + uuid.UUID(int=block * 7919).bytes[:8]
        block += 1
    del out[size:]
    return out


def _driver(backend: apersist.Backend) -> Driver:
    """The driver as a run makes it (behind its retry layer), with PART-sized parts."""
    return open_driver(backend, apersist.Config(backend, multipart_bytes=PART, retry=FAST_RETRY))


@pytest.fixture
async def driver(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Driver]:
    made = _driver(make_backend(request.param, tmp_path, request))
    yield made
    await made.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_object_store_drivers_take_buffers_behind_their_retry_layer(
        kind: str, tmp_path: Any, request: pytest.FixtureRequest) -> None:
    made = _driver(make_backend(kind, tmp_path, request))
    try:
        assert isinstance(made, RetryingDriver)
        assert capabilities_of(made.inner).accepts_buffers
        assert capabilities_of(made).accepts_buffers
    finally:
        await made.aclose()


@pytest.mark.parametrize("driver", KINDS, indirect=True)
@pytest.mark.parametrize("path", list(SIZES))
async def test_a_bytearray_lands_byte_identical_and_unchanged(driver: Driver, path: str) -> None:
    data = _payload(SIZES[path])
    expected = bytes(data)
    await driver.put("segments/object.seg", data)  # type: ignore[arg-type]  # accepts_buffers
    assert data == expected, "the driver changed the buffer it was given"
    stored = await driver.get("segments/object.seg")
    assert len(stored) == len(expected)
    assert stored == expected


# --------------------------------------------------------------------------- a whole run


def _spy_puts(monkeypatch: pytest.MonkeyPatch, kind: str) -> list[tuple[str, type, bytes]]:
    """Note (key, type of data, its bytes) of every put the object-store driver gets."""
    cls: Any = S3Driver if kind == "s3" else AzureDriver
    real = cls.put
    seen: list[tuple[str, type, bytes]] = []

    async def put(self: Any, key: str, data: Any, **kwargs: Any) -> None:
        seen.append((key, type(data), bytes(data)))
        await real(self, key, data, **kwargs)

    monkeypatch.setattr(cls, "put", put)
    return seen


def _values(count: int, width: int, tag: str) -> list[str]:
    # Distinct, incompressible-looking text; each value is about ``width`` bytes of JSON.
    return [f"{tag}-{i:08d}-" + uuid.UUID(int=i).hex * (width // 32) for i in range(count)]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_raw_commit_uploads_its_own_buffers_and_replays(
        kind: str, tmp_path: Any, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw segment below ``multipart_bytes`` (one request) and one above it (parts or
    blocks) reach the driver as the commit's bytearray, land as put, and replay."""
    backend = make_backend(kind, tmp_path, request)
    config = apersist.Config(backend, compression=None, multipart_bytes=PART,
                             max_segment_bytes=16 * MIB, max_pending_bytes=64 * MIB,
                             snapshot_interval_ms=3_600_000, retry=FAST_RETRY)
    small = _values(3_000, 1024, "small")  # about 3 MiB
    big = _values(11_000, 1024, "big")  # about 11 MiB
    seen = _spy_puts(monkeypatch, kind)
    async with apersist.run(config) as run:
        await run.stream("small").record_many(small)
        await run.stream("big").record_many(big)
        await run.commit()
    segments = [(key, kind_, data) for key, kind_, data in seen if key.endswith(".seg")]
    assert len(segments) == 2, [key for key, _, _ in seen]
    assert all(kind_ is bytearray for _, kind_, _ in segments), \
        "a segment was copied to bytes before reaching a driver that takes buffers"
    sizes = sorted(len(data) for _, _, data in segments)
    assert sizes[0] < PART <= sizes[1], sizes  # one single request, one multipart/staged
    monkeypatch.undo()
    reader = _driver(backend)
    try:
        for key, _, data in segments:
            assert await reader.get(key) == data
    finally:
        await reader.aclose()
    async with apersist.run(apersist.Config(
            backend, snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
        assert [e.value async for e in run.stream("small").replay()] == small
        assert [e.value async for e in run.stream("big").replay()] == big


# --------------------------------------------------------------------------- retries


def _body_bytes(body: Any) -> bytes:
    """What an SDK call was given as its body, as bytes (read without consuming it)."""
    if isinstance(body, io.BytesIO):
        return body.getvalue()
    return bytes(body)


def _fail_first_calls(monkeypatch: pytest.MonkeyPatch, kind: str, path: str
                      ) -> dict[Any, list[bytes]]:
    """Make the first upload request of each object or part/block fail transiently, after
    noting its body; every attempt's body is noted, by part number or block index."""
    sent: dict[Any, list[bytes]] = {}

    def note(which: Any, body: Any) -> bool:
        """Note the body; True if this is the first attempt (which is to fail)."""
        sent.setdefault(which, []).append(_body_bytes(body))
        return len(sent[which]) == 1

    if kind == "s3":
        method = "put_object" if path == "single" else "upload_part"
        real_get_client = S3Driver._get_client

        async def get_client(self: S3Driver, op: str, key: str) -> Any:
            client = await real_get_client(self, op, key)
            real = getattr(client, method)
            if getattr(real, "_wrapped", False):
                return client

            async def call(**kwargs: Any) -> Any:
                if note(kwargs.get("PartNumber", 0), kwargs["Body"]):
                    raise ConnectionResetError("connection reset by peer (injected)")
                if isinstance(kwargs["Body"], io.BytesIO):
                    kwargs["Body"].seek(0)
                return await real(**kwargs)

            call._wrapped = True  # type: ignore[attr-defined]  # a marker, for the check above
            monkeypatch.setattr(client, method, call)
            return client

        monkeypatch.setattr(S3Driver, "_get_client", get_client)
    else:
        if path == "single":
            real_upload = BlobClient.upload_blob

            async def upload_blob(self: BlobClient, data: Any, *args: Any, **kwargs: Any) -> Any:
                if note(0, data):
                    raise ServiceResponseError("connection reset (injected)")
                return await real_upload(self, data, *args, **kwargs)

            monkeypatch.setattr(BlobClient, "upload_blob", upload_blob)
        else:
            real_stage = BlobClient.stage_block

            async def stage_block(self: BlobClient, block_id: str, data: Any,
                                  *args: Any, **kwargs: Any) -> Any:
                # The block's index is the id's tail; the token before it is per attempt.
                if note(int(block_id.rsplit("-", 1)[1]), data):
                    raise ServiceResponseError("connection reset (injected)")
                return await real_stage(self, block_id, data, *args, **kwargs)

            monkeypatch.setattr(BlobClient, "stage_block", stage_block)
    return sent


@pytest.mark.parametrize("driver", KINDS, indirect=True)
@pytest.mark.parametrize("path", list(SIZES))
async def test_a_retried_upload_sends_the_same_bytes(
        driver: Driver, path: str, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    kind = request.node.callspec.params["driver"]
    retries: list[str] = []
    assert isinstance(driver, RetryingDriver)
    driver.on_retry = retries.append
    sent = _fail_first_calls(monkeypatch, kind, path)
    data = _payload(SIZES[path])
    expected = bytes(data)
    await driver.put("segments/retried.seg", data)  # type: ignore[arg-type]  # accepts_buffers
    assert retries, "no attempt was retried"
    assert data == expected, "the driver changed the buffer it was given"
    # Every request of the last attempt sent again what the failed one had sent, and all of
    # it, in order, is the object.
    assert sent
    attempts = {which: [len(b) for b in bodies] for which, bodies in sent.items()}
    assert all(len(bodies) >= 2 for bodies in sent.values()), attempts
    assert all(len(set(bodies)) == 1 for bodies in sent.values()), attempts
    assert b"".join(sent[which][-1] for which in sorted(sent)) == expected
    monkeypatch.undo()
    assert await driver.get("segments/retried.seg") == expected

