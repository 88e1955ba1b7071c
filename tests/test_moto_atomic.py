"""The test S3 server (``moto_atomic.py``): conditional creates are atomic, and a client that
stalls half-way through sending one does not hold up anyone else's.

The zombie campaign freezes writers with SIGSTOP at random instants, some in the middle of
a create-if-absent request: the server used to take its lock before reading the body, and
every other create then waited for the frozen writer, which deadlocked the takeover.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import urlsplit

import pytest
from conftest import TEST_BUCKET, s3_settings

import apersist
from apersist._drivers import ObjectExistsError, open_driver


async def _start_a_create(s3_endpoint: str, bucket: str,
                          key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send the headers of a create-if-absent of 100 bytes and the first 10 of them."""
    url = urlsplit(s3_endpoint)
    assert url.hostname is not None
    assert url.port is not None
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write((f"PUT /{bucket}/{key} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                  f"If-None-Match: *\r\nContent-Length: 100\r\n\r\n").encode() + b"x" * 10)
    await writer.drain()
    return reader, writer


async def test_a_stalled_conditional_put_does_not_hold_other_creates(
        s3_endpoint: str, s3_bucket: str) -> None:
    # Headers and the start of a body, then silence, as a client stopped by SIGSTOP.
    reader, writer = await _start_a_create(s3_endpoint, s3_bucket, f"t/{uuid.uuid4().hex}/stalled")
    await asyncio.sleep(0.5)  # the server has the headers and is waiting for the rest
    try:
        root = f"t/{uuid.uuid4().hex}"
        backend = apersist.Backend.s3(root, s3_settings(s3_endpoint, TEST_BUCKET))
        driver = open_driver(backend)
        try:
            started = time.monotonic()
            async with asyncio.timeout(10):
                await driver.put("a", b"1", if_absent=True)
                with pytest.raises(ObjectExistsError):
                    await driver.put("a", b"2", if_absent=True)
            assert time.monotonic() - started < 10
            assert await driver.get("a") == b"1"
        finally:
            await driver.aclose()
        # The stalled client finishes: its request is served, not lost.
        writer.write(b"x" * 90)
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
    finally:
        writer.close()


async def test_a_create_whose_client_went_away_mid_body_stores_nothing(
        s3_endpoint: str, s3_bucket: str) -> None:
    """A writer killed while sending a create (the crash campaign's kill -9) must not leave
    the part it sent under the key: S3 stores nothing of an incomplete body. The test server
    used to store it, and a 0-byte commit record made the store unopenable."""
    root = f"t/{uuid.uuid4().hex}"
    _, writer = await _start_a_create(s3_endpoint, s3_bucket, f"{root}/torn")
    writer.close()  # gone, as a killed process's socket is
    await asyncio.sleep(0.5)  # the server has seen the end of the stream
    driver = open_driver(apersist.Backend.s3(root, s3_settings(s3_endpoint, TEST_BUCKET)))
    try:
        assert [info async for info in driver.list("")] == []
        await driver.put("torn", b"whole", if_absent=True)  # the key was never taken
        assert await driver.get("torn") == b"whole"
    finally:
        await driver.aclose()

