"""The latency proxy (tests/support/latency_proxy.py): it delays each request, not each
connection; concurrent requests overlap their delays; it counts and traces requests; its
bandwidth cap caps; and a real apersist run works through it on S3 and on Azure."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from latency_proxy import LatencyProxy, _RequestParser, proxied
from servers import AZURITE_ACCOUNT, AZURITE_KEY, S3_KEY_ID, S3_REGION, S3_SECRET

import apersist

DELAY_MS = 100.0


class Upstream:
    """A small HTTP server on the test's loop: echoes the body's length, serves bytes."""

    def __init__(self) -> None:
        self.peers: set[tuple[str, int]] = set()  # the proxy's connections to it
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer is not None:
            self.peers.add(tuple(peer[:2]))
        body = await request.read()
        if request.method == "HEAD":
            return web.Response(headers={"X-Size": str(len(body))})
        size = int(request.query.get("size", "0"))
        return web.Response(body=b"r" * size, headers={"X-Got": str(len(body))})


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/account"
    try:
        yield server
    finally:
        await runner.cleanup()


async def _get(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as response:
        response.raise_for_status()
        return await response.read()


async def test_a_request_takes_at_least_its_delay(upstream: Upstream) -> None:
    async with LatencyProxy(upstream.url, delay_ms=DELAY_MS) as proxy, aiohttp.ClientSession() as session:
        assert proxy.url == f"http://127.0.0.1:{proxy.port}/account"
        start = time.perf_counter()
        assert await _get(session, f"{proxy.url}/x?size=5") == b"rrrrr"
        assert time.perf_counter() - start >= DELAY_MS / 1000


async def test_sequential_requests_on_one_connection_each_wait(upstream: Upstream) -> None:
    """Keep-alive: 5 requests over one connection take 5 delays (the delay is per request)."""
    n = 5
    connector = aiohttp.TCPConnector(limit=1)
    async with LatencyProxy(upstream.url, delay_ms=DELAY_MS) as proxy, \
            aiohttp.ClientSession(connector=connector) as session:
        await _get(session, f"{proxy.url}/warm")  # opens the one connection
        start = time.perf_counter()
        for i in range(n):
            await _get(session, f"{proxy.url}/seq/{i}")
        elapsed = time.perf_counter() - start
    assert elapsed >= n * DELAY_MS / 1000
    assert len(upstream.peers) == 1, upstream.peers


async def test_concurrent_requests_take_about_one_delay(upstream: Upstream) -> None:
    n = 8
    delay_ms = 300.0
    async with LatencyProxy(upstream.url, delay_ms=delay_ms) as proxy, aiohttp.ClientSession() as session:
        start = time.perf_counter()
        await asyncio.gather(*[_get(session, f"{proxy.url}/c/{i}") for i in range(n)])
        elapsed = time.perf_counter() - start
    assert delay_ms / 1000 <= elapsed < 2 * delay_ms / 1000, elapsed


async def test_counts_and_traces_requests_by_method(upstream: Upstream) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"c" * 1000

    connector = aiohttp.TCPConnector(limit=1)  # all on one connection: the parser's boundaries
    async with LatencyProxy(upstream.url, delay_ms=1, trace=True) as proxy, \
            aiohttp.ClientSession(connector=connector) as session:
        async with session.put(f"{proxy.url}/a", data=b"p" * 70_000) as response:
            assert response.headers["X-Got"] == "70000"
        async with session.post(f"{proxy.url}/b", data=chunks()) as response:  # chunked
            assert response.headers["X-Got"] == "3000"
        assert await _get(session, f"{proxy.url}/c?size=3") == b"rrr"
        async with session.head(f"{proxy.url}/d") as response:
            assert response.status == 200
        async with session.delete(f"{proxy.url}/e") as response:
            assert response.status == 200
        assert await _get(session, f"{proxy.url}/f") == b""
        assert proxy.counts() == {"PUT": 1, "POST": 1, "GET": 2, "HEAD": 1, "DELETE": 1}
        assert proxy.total() == 6
        trace = proxy.trace()
    assert [(t.method, t.path) for t in trace] == [
        ("PUT", "/account/a"), ("POST", "/account/b"), ("GET", "/account/c"),
        ("HEAD", "/account/d"), ("DELETE", "/account/e"), ("GET", "/account/f")]
    for before, after in itertools.pairwise(trace):
        assert before.answered is not None
        assert before.arrived <= before.forwarded <= before.answered
        assert before.answered <= after.arrived  # sequential: each waited on the one before
    proxy.reset()
    assert proxy.total() == 0
    assert proxy.trace() == []


def test_the_parser_finds_boundaries_in_any_split() -> None:
    stream = (b"PUT /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
              b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n"
              b"GET /c?q=1 HTTP/1.1\r\nHost: h\r\n\r\n")
    for step in (1, 2, 7, len(stream)):
        parser = _RequestParser()
        firsts, joined = [], b""
        for i in range(0, len(stream), step):
            for first, piece in parser.feed(stream[i:i + step]):
                joined += piece
                if first:
                    firsts.append(b" ".join(piece.split(b" ", 2)[:2]).split(b"?")[0].decode())
        assert joined == stream
        assert firsts == ["PUT /a", "POST /b", "GET /c"], step


async def test_the_bandwidth_cap_caps_each_direction(upstream: Upstream) -> None:
    rate = 1_000_000  # bytes/s
    size = 300_000
    async with LatencyProxy(upstream.url, bytes_per_s=rate) as proxy, aiohttp.ClientSession() as session:
        start = time.perf_counter()
        assert len(await _get(session, f"{proxy.url}/down?size={size}")) == size
        down = time.perf_counter() - start
        start = time.perf_counter()
        async with session.put(f"{proxy.url}/up", data=b"u" * size) as response:
            assert response.headers["X-Got"] == str(size)
        up = time.perf_counter() - start
    assert down >= 0.9 * size / rate, down
    assert up >= 0.9 * size / rate, up
    async with LatencyProxy(upstream.url) as proxy, aiohttp.ClientSession() as session:
        start = time.perf_counter()
        await _get(session, f"{proxy.url}/down?size={size}")
        assert time.perf_counter() - start < 0.5 * size / rate  # uncapped: far faster


def test_it_forwards_only_to_loopback() -> None:
    for url in ("http://example.com:80", "http://10.0.0.1:9000", "http://127.0.0.1"):
        with pytest.raises(ValueError, match="loopback"):
            LatencyProxy(url)
    with pytest.raises(ValueError, match="invalid proxy settings"):
        LatencyProxy("http://127.0.0.1:1", delay_ms=-1)


def test_it_stops_when_closed() -> None:
    before = threading.active_count()
    with LatencyProxy("http://127.0.0.1:1", delay_ms=5) as proxy:
        port = proxy.port
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # it listens (the upstream refusing the connection only drops this one)
        assert threading.active_count() == before + 1
    assert threading.active_count() == before
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    with proxied("http://127.0.0.1:1", 0) as url:
        assert url == "http://127.0.0.1:1"  # no delay: no proxy at all


# ----------------------------------------------------------------------------- a real run


@pytest.mark.parametrize("kind", ["s3", "azure"])
async def test_a_run_works_through_the_proxy(kind: str, request: pytest.FixtureRequest) -> None:
    """Record, commit, reopen, replay and a table on a store 20 ms away per request.

    Also the smallest figures of the latency model: a small commit is one request, a round
    trip at least (its record carries its segments).
    """
    delay_ms = 20.0
    upstream = request.getfixturevalue(f"{kind}_endpoint")
    with LatencyProxy(upstream, delay_ms=delay_ms, trace=True) as proxy:
        if kind == "s3":
            settings = apersist.AwsS3Settings(
                request.getfixturevalue("s3_bucket"), access_key=S3_KEY_ID, secret_access_key=S3_SECRET,
                with_path_style=True, region=S3_REGION, endpoint=proxy.url)
            backend = apersist.Backend.s3(f"t/proxy-{time.time_ns()}", settings)
        else:
            backend = apersist.Backend.azure(f"t/proxy-{time.time_ns()}", AZURITE_ACCOUNT, AZURITE_KEY,
                                             request.getfixturevalue("azure_container"),
                                             endpoint=proxy.url)
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=60_000)) as run:
            stream = run.stream("events")
            table = await run.table("totals")
            for i in range(10):
                await stream.record({"i": i})
            table["n"] = 10
            await run.commit()  # warm: the clients' connections are open
            await stream.record({"i": 10})
            proxy.reset()
            start = time.perf_counter()
            await run.commit()
            commit_s = time.perf_counter() - start
            commit_requests = proxy.counts()
        # A small commit is one object (format 5.0): its record carries its segments.
        assert commit_requests == {"PUT": 1}, commit_requests
        assert commit_s >= delay_ms / 1000, commit_s
        access = apersist.SnapshotAccess.REPLAY
        async with apersist.run(apersist.Config(backend, snapshot_access=access)) as run:
            assert [e.value async for e in run.stream("events").replay()] == [{"i": i} for i in range(11)]
            assert dict((await run.table("totals")).items()) == {"n": 10}
    assert proxy.total() > 0

