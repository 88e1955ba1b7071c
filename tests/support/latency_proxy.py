"""A TCP proxy on 127.0.0.1 that makes a loopback object store answer like a remote one.

moto_server and Azurite on loopback answer a small request in about a millisecond; a real
S3 or Azure Blob store takes 10-50 ms. ``LatencyProxy`` sits between a client and such a
server and adds ``delay_ms`` to every HTTP **request** (not to every connection: HTTP/1.1
keep-alive carries many requests over one connection), and can cap the bandwidth of each
direction. It counts requests by method and can keep a trace of them, so that the round
trips a piece of code waits on one after another can be seen.

How a round trip is modelled: the proxy parses the client's byte stream into requests
(request line, headers, then a ``Content-Length`` or chunked body). When a request's first
byte arrives, the proxy holds the request for ``delay_ms`` and then forwards it, head and
body, as it comes; the response flows back at once. So every request takes at least
``delay_ms`` more than it would direct, whether its connection is new or reused, and N
requests sent at once on N connections take about one delay, not N: the cost of a real
round trip, which is what concurrency hides. Opening a TCP connection is not delayed (a
real one costs a round trip more, and TLS two): the clients keep their pools warm, and
the model is about requests. Bodies are streamed, never buffered whole, so ``Expect:
100-continue`` and large uploads pass as they are.

Where it runs: in a thread of its own, with its own event loop, whether it is entered with
``with`` or ``async with``. A proxy on the caller's loop would compete with the code being
measured for that loop (every chunk of every body would be a callback between apersist's
own), so a delay would cost the caller CPU time on its loop that a remote server never
does; in its own thread it is more like a server elsewhere. It still shares the GIL and the
machine's cores with the caller, as moto and Azurite share the cores.

Bounded: it listens on 127.0.0.1 only, forwards only to a loopback upstream, and stops by
itself when its block ends (the listener closed, every connection closed, the thread
joined). Nothing else is started.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

LOOPBACK = "127.0.0.1"
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_READ_BYTES = 64 * 1024
_PACE_BYTES = 16 * 1024  # the bandwidth cap's granularity: one pause per this many bytes
_MAX_HEAD_BYTES = 256 * 1024
_DRAIN_S = 10.0  # how long an answer may still flow after its client stopped sending


@dataclasses.dataclass(frozen=True, slots=True)
class TracedRequest:
    """One request seen by the proxy (times in seconds, ``time.perf_counter``).

    ``arrived``: its first byte reached the proxy; ``forwarded``: the proxy sent it on
    (``arrived`` + the delay); ``answered``: the response's first byte came back (None if
    none did; an interim ``100 Continue`` counts as the first byte). ``connection``
    numbers the client connection it came on.
    """

    arrived: float
    forwarded: float
    answered: float | None
    method: str
    path: str
    connection: int
    query: str = ""  # the request target's query string (a listing's ``prefix=``), undecoded


class _Pacer:
    """A bandwidth cap shared by every connection, for one direction."""

    def __init__(self, bytes_per_s: float | None) -> None:
        self.rate = bytes_per_s
        self._free_at = 0.0  # when the link has sent everything given to it so far

    async def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if not self.rate:
            writer.write(data)
            await writer.drain()
            return
        for start in range(0, len(data), _PACE_BYTES):
            piece = data[start:start + _PACE_BYTES]
            now = time.perf_counter()
            self._free_at = max(self._free_at, now) + len(piece) / self.rate
            await asyncio.sleep(self._free_at - now)
            writer.write(piece)
            await writer.drain()


class _RequestParser:
    """Splits a client's byte stream into HTTP/1.1 requests.

    ``feed`` takes what arrived and returns it as pieces: ``(True, bytes)`` starts a new
    request (its first bytes), ``(False, bytes)`` continues the current one. A request ends
    after its head when it has no body, after ``Content-Length`` bytes, or after the last
    chunk (and trailers) of a chunked body.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()  # what is not yet classified
        self._state = "head"  # head, body, chunk-size, chunk-data, chunk-crlf, trailers
        self._remaining = 0  # body or chunk bytes still to pass
        self._started = False  # the current request has sent its first piece
        self._ended = False  # the last step ended a request
        self.method = ""
        self.path = ""
        self.query = ""

    def feed(self, data: bytes) -> list[tuple[bool, bytes]]:
        self._buffer += data
        out: list[tuple[bool, bytes]] = []
        while self._buffer:
            first, self._ended = not self._started, False
            piece = self._step()
            if piece is None:
                break
            out.append((first, piece))
            self._started = not self._ended
        return out

    def _take(self, n: int) -> bytes:
        piece = bytes(self._buffer[:n])
        del self._buffer[:n]
        return piece

    def _line(self) -> bytes | None:
        end = self._buffer.find(b"\r\n")
        return None if end < 0 else self._take(end + 2)

    def _end_request(self) -> None:
        self._state, self._ended = "head", True

    def _step(self) -> bytes | None:
        """Classify what it can of the buffer; None when it needs more bytes."""
        if self._state == "head":
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > _MAX_HEAD_BYTES:
                    raise ValueError("request head too long")
                return None
            head = self._take(end + 4)
            self._start(head)
            return head
        if self._state == "body":
            piece = self._take(self._remaining)
            self._remaining -= len(piece)
            if not self._remaining:
                self._end_request()
            return piece
        if self._state == "chunk-data":
            piece = self._take(self._remaining)
            self._remaining -= len(piece)
            if not self._remaining:
                self._state = "chunk-crlf"
            return piece
        line = self._line()
        if line is None:
            return None
        if self._state == "chunk-size":
            size = int(line.split(b";", 1)[0].strip(), 16)
            self._state, self._remaining = ("chunk-data", size) if size else ("trailers", 0)
        elif self._state == "chunk-crlf":
            self._state = "chunk-size"
        elif line == b"\r\n":  # trailers: an empty line ends them, and the request
            self._end_request()
        return line

    def _start(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        self.method = parts[0]
        target = parts[1] if len(parts) > 1 else ""
        self.path, _, self.query = target.partition("?")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = "chunk-size"
        elif int(headers.get("content-length") or 0) > 0:
            self._state, self._remaining = "body", int(headers["content-length"])
        else:
            self._end_request()


class LatencyProxy:
    """A proxy in front of the HTTP server at ``upstream`` (loopback only) that adds
    ``delay_ms`` to each request and, with ``bytes_per_s``, caps each direction's bandwidth.

    Use it as ``with LatencyProxy(url, delay_ms=20) as proxy:`` (or ``async with``) and point
    the client at ``proxy.url``: the upstream URL with the proxy's host and port, its path
    kept (Azurite's ``/devstoreaccount1``). ``requests`` counts requests by method,
    ``trace()`` lists them when built with ``trace=True``. ``delay_ms`` may be changed while
    it runs; it applies to requests that arrive afterwards.
    """

    def __init__(self, upstream: str, *, delay_ms: float = 0.0, bytes_per_s: float | None = None,
                 trace: bool = False) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in _LOOPBACK_HOSTS or parts.port is None:
            raise ValueError(f"the proxy forwards only to a loopback host:port: upstream={upstream}")
        if delay_ms < 0 or (bytes_per_s is not None and bytes_per_s <= 0):
            raise ValueError(f"invalid proxy settings: delay_ms={delay_ms} bytes_per_s={bytes_per_s}")
        self._upstream = parts
        self.delay_ms = delay_ms
        self.bytes_per_s = bytes_per_s
        self.requests: collections.Counter[str] = collections.Counter()
        self._tracing = trace
        self._trace: list[TracedRequest] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._port = 0
        self._connections = 0
        self._failure: BaseException | None = None
        # One cap per direction (to the server, to the client), shared by all connections.
        self._pacers = (_Pacer(bytes_per_s), _Pacer(bytes_per_s))

    # ------------------------------------------------------------------ the caller's side

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the proxy is not running")
        return self._port

    @property
    def url(self) -> str:
        """The upstream URL with the proxy's address: what the client should use."""
        return urlunsplit(self._upstream._replace(netloc=f"{LOOPBACK}:{self.port}"))

    def total(self) -> int:
        """Requests seen so far, every method."""
        with self._lock:
            return sum(self.requests.values())

    def counts(self) -> dict[str, int]:
        """A copy of the requests seen so far, by method."""
        with self._lock:
            return dict(self.requests)

    def reset(self) -> None:
        """Forget the requests counted and traced so far."""
        with self._lock:
            self.requests.clear()
            self._trace.clear()

    def trace(self) -> list[TracedRequest]:
        """The requests seen so far, in the order they arrived (``trace=True`` only)."""
        with self._lock:
            return list(self._trace)

    def start(self) -> LatencyProxy:
        """Start the proxy's thread and loop; return once it listens."""
        if self._thread is not None:
            raise RuntimeError("the proxy was already started")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="latency-proxy",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if self._failure is not None:
            self._thread.join()
            raise RuntimeError("the latency proxy did not start") from self._failure
        return self

    def close(self) -> None:
        """Stop listening, close every connection, end the thread. Idempotent."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended already
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join()

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> LatencyProxy:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.close)

    # ------------------------------------------------------------------ the proxy's thread

    def _main(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as exc:  # reported to start(), or lost after a clean start
            self._failure = exc
        finally:
            ready.set()

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tasks: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(self._connection(reader, writer))
            tasks[task] = writer
            task.add_done_callback(tasks.pop)

        server = await asyncio.start_server(on_connect, LOOPBACK, 0)
        self._port = int(server.sockets[0].getsockname()[1])
        ready.set()
        try:
            await self._stop.wait()
        finally:
            # A connection asyncio accepted just now becomes a transport a few loop turns
            # later, and asyncio (3.11) leaks its socket if the server is closed in between:
            # let such connections arrive first, so that they are closed below.
            await asyncio.sleep(0.05)
            server.close()
            for task, writer in list(tasks.items()):
                task.cancel()
                writer.close()  # also when the task is cancelled before it ever ran
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._connections += 1
        number = self._connections
        upstream_w: asyncio.StreamWriter | None = None
        try:
            upstream_r, upstream_w = await asyncio.open_connection(
                self._upstream.hostname, self._upstream.port)
            pending: list[Callable[[float], None]] = []  # stamps the request awaiting its answer
            down = asyncio.ensure_future(self._downstream(upstream_r, client_w, pending))
            up = asyncio.ensure_future(self._upstream_pump(client_r, upstream_w, number, pending))
            try:
                done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
                if up in done and not up.exception():
                    # The client is done sending: pass the rest of the answer (bounded).
                    await asyncio.wait({down}, timeout=_DRAIN_S)
            finally:
                for task in (up, down):
                    task.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        except (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError):
            pass  # either side went away (or sent garbage): drop this connection only
        finally:
            writers = [w for w in (client_w, upstream_w) if w is not None]
            for writer in writers:  # both before any await: a cancel may come at the first
                writer.close()
            for writer in writers:
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()

    async def _upstream_pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             number: int, pending: list[Callable[[float], None]]) -> None:
        parser = _RequestParser()
        pacer = self._pacers[0]
        while data := await reader.read(_READ_BYTES):
            for first, piece in parser.feed(data):
                if first:
                    pending[:] = [await self._hold(parser.method, parser.path, parser.query, number)]
                await pacer.send(writer, piece)
        if writer.can_write_eof():
            writer.write_eof()

    async def _hold(self, method: str, path: str, query: str,
                    number: int) -> Callable[[float], None]:
        """Count a request that just arrived, wait out the delay; return the stamp of its answer."""
        arrived = time.perf_counter()
        with self._lock:
            self.requests[method] += 1
        if self.delay_ms:
            await asyncio.sleep(self.delay_ms / 1000)
        forwarded = time.perf_counter()
        if not self._tracing:
            return lambda _moment: None
        with self._lock:
            index = len(self._trace)
            self._trace.append(TracedRequest(arrived, forwarded, None, method, path, number, query))

        def answered(moment: float) -> None:
            with self._lock:
                if index < len(self._trace) and self._trace[index].answered is None:
                    self._trace[index] = dataclasses.replace(self._trace[index], answered=moment)
        return answered

    async def _downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          pending: list[Callable[[float], None]]) -> None:
        pacer = self._pacers[1]
        while data := await reader.read(_READ_BYTES):
            if pending:
                pending.pop()(time.perf_counter())
            await pacer.send(writer, data)
        if writer.can_write_eof():
            writer.write_eof()



def proxied(upstream: str, delay_ms: float, **options: Any) -> contextlib.AbstractContextManager[str]:
    """``upstream`` itself when ``delay_ms`` is 0, else a ``LatencyProxy``'s URL in front of it."""

    @contextlib.contextmanager
    def cm() -> Any:
        if not delay_ms:
            yield upstream
            return
        with LatencyProxy(upstream, delay_ms=delay_ms, **options) as proxy:
            yield proxy.url
    return cm()
