"""Shared helpers of the end-to-end tests: a counting (and gating) driver wrapper, a fake
clock, bounded polling and small readers of what a store holds."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

import apersist
from apersist._config import MemoryBackend
from apersist._drivers import Driver, ObjectInfo, open_driver

VERBS = ("put", "get", "list", "delete")


class CountingDriver:
    """Wraps a real driver: counts every verb and can hold segment uploads at a gate."""

    def __init__(self, inner: Driver) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: Counter[str] = Counter()
        self.keys: list[tuple[str, str]] = []
        # While set to an unset Event, segment puts wait for it (see ``hold_segment_puts``).
        self.gate: anyio.Event | None = None
        self.held = 0

    @property
    def requests(self) -> int:
        """Backend requests so far (put, get, list, delete)."""
        return sum(self.calls[v] for v in VERBS)

    def reset(self) -> None:
        self.calls.clear()
        self.keys.clear()

    def hold_segment_puts(self) -> anyio.Event:
        """From now on, segment uploads wait until the returned event is set."""
        self.gate = anyio.Event()
        return self.gate

    def gets_of_segments(self) -> int:
        return sum(1 for verb, key in self.keys if verb == "get" and key.endswith(".seg"))

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self.calls["put"] += 1
        self.keys.append(("put", key))
        gate = self.gate
        if gate is not None and key.endswith(".seg"):
            self.held += 1
            await gate.wait()
        await self.inner.put(key, data, if_absent=if_absent)

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        self.calls["get"] += 1
        self.keys.append(("get", key))
        return await self.inner.get(key, start=start, end=end)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        self.calls["list"] += 1
        self.keys.append(("list", prefix))
        async for info in self.inner.list(prefix):
            yield info

    async def delete(self, keys: Sequence[str]) -> None:
        self.calls["delete"] += 1
        self.keys.extend(("delete", k) for k in keys)
        await self.inner.delete(keys)

    async def aclose(self) -> None:
        self.calls["aclose"] += 1
        await self.inner.aclose()


D = TypeVar("D", bound=Driver)


@asynccontextmanager
async def driver_for(config: apersist.Config, wrap: Callable[[Driver], D]) -> AsyncIterator[D]:
    """``wrap`` around the driver a run would open for ``config``, for ``run(driver=...)``;
    closed when the block is left (a run never closes a driver it is given)."""
    driver = wrap(open_driver(config.backend, config))
    try:
        yield driver
    finally:
        await driver.aclose()


@asynccontextmanager
async def driver_of(backend: apersist.Backend) -> AsyncIterator[Driver]:
    """A driver of ``backend``, closed on the way out."""
    driver = open_driver(backend)
    try:
        yield driver
    finally:
        await driver.aclose()


def counting(config: apersist.Config) -> AbstractAsyncContextManager[CountingDriver]:
    """A ``CountingDriver`` around the driver a run would open for ``config``."""
    return driver_for(config, CountingDriver)


async def wait_until(predicate: Callable[[], bool], *, limit_s: float = 5.0,
                     what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail after ``limit_s`` seconds."""
    with anyio.move_on_after(limit_s):
        while True:
            if predicate():
                return
            await anyio.sleep(0.005)  # polling: the conditions have no event to wait on
    raise AssertionError(f"timed out after {limit_s}s waiting for {what}")


async def replayed(backend: apersist.Backend, stream: str, **kwargs: Any) -> list[apersist.Event]:
    """Every committed event of ``stream``, read by a read-only run (it writes nothing)."""
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY, **kwargs)
    async with apersist.run(cfg) as run:
        return [e async for e in run.stream(stream).replay()]


async def values(backend: apersist.Backend, stream: str) -> list[Any]:
    return [e.value for e in await replayed(backend, stream)]


async def table_state(backend: apersist.Backend, name: str) -> dict[str, Any]:
    """A table's committed state, read by a read-only run."""
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(cfg) as run:
        return dict(await run.table(name))


async def stored_objects(backend: apersist.Backend) -> dict[str, bytes]:
    """Every object the store holds, key -> bytes, read through the backend's own driver."""
    driver = open_driver(backend)
    try:
        return {info.key: await driver.get(info.key) async for info in driver.list("")}
    finally:
        await driver.aclose()


async def segment_keys(backend: apersist.Backend) -> list[str]:
    return sorted(k for k in await stored_objects(backend) if k.endswith(".seg"))


async def check_round_trip(backend: apersist.Backend, **config: Any) -> None:
    """A run records 101 events and a table key, commits; the next run gets all of it back."""
    async with apersist.run(apersist.Config(backend, **config)) as run:
        stream = run.stream("orders")
        for i in range(100):
            await stream.record({"n": i}, offset=i)
        table = await run.table("counts")
        table["alice"] = 3
        info = await run.commit()
        assert info.deltas > 0
        await stream.record({"n": 100}, offset=100)
    async with apersist.run(apersist.Config(backend)) as run:
        events = [e async for e in run.stream("orders").replay()]
        assert [e.value for e in events] == [{"n": i} for i in range(101)]
        assert all(e.replayed for e in events)
        assert run.stream("orders").offset == 100
        assert dict(await run.table("counts")) == {"alice": 3}


def golden_cached(expected: dict[str, Any]) -> Callable[[Any], Any]:
    """A golden store's cached function, which must never run: its results are stored."""
    cache = expected["cache"]

    def fail(x: Any) -> Any:
        raise AssertionError(f"cached result not found in the store: arg={x!r}")

    return apersist.cached(name=cache["name"], version=cache["version"])(fail)  # type: ignore[no-any-return]


async def read_golden_shape(backend: apersist.Backend, expected: dict[str, Any], *,
                            access: apersist.SnapshotAccess = apersist.SnapshotAccess.REPLAY,
                            snapshot_interval_ms: int = 3_600_000) -> dict[str, Any]:
    """What a run reads from a store, in the shape of a golden store's ``expected.json``:
    each stream's events and offset, each table, the cached function's results."""
    cfg = apersist.Config(backend, snapshot_access=access,
                          snapshot_interval_ms=snapshot_interval_ms)
    got: dict[str, Any] = {"format": expected["format"], "streams": {}, "tables": {}}
    async with apersist.run(cfg) as run:
        for name in expected["streams"]:
            stream = run.stream(name)
            got["streams"][name] = {
                "events": [[e.value, e.offset, e.time_ms] async for e in stream.replay()],
                "offset": stream.offset}
        for name in expected["tables"]:
            got["tables"][name] = dict(await run.table(name))
        square = golden_cached(expected)
        calls = [[arg, square(arg)] for arg, _result in expected["cache"]["calls"]]
        got["cache"] = {**expected["cache"], "calls": calls}
    return got


async def numbers_forever(offset: int | None) -> AsyncIterator[tuple[dict[str, int], int]]:
    """An endless reader: ``{"i": i}`` at offset ``i``, resumed after ``offset``."""
    i = 0 if offset is None else offset + 1
    while True:
        yield {"i": i}, i
        i += 1


async def stored_i_and_table(root: Path) -> tuple[list[int], dict[str, Any]]:
    """What a restart would see now of stream ``s`` (its ``i`` values) and table ``t``: read
    by a read-only run, while the writer may still run."""
    config = apersist.Config(apersist.Backend.filesystem(root),
                             snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(config) as run:
        events = [e.value["i"] async for e in run.stream("s").replay()]
        return events, dict(await run.table("t"))


async def numbers_up_to(offset: int | None, stop: int) -> AsyncIterator[tuple[int, int]]:
    """A bounded reader: ``i`` at offset ``i`` up to ``stop``, resumed after ``offset``."""
    start = 0 if offset is None else offset + 1
    for i in range(start, stop):
        yield i, i


async def crash_state(objects: dict[str, bytes]) -> tuple[list[Any], dict[str, Any], Any]:
    """What a crash at the instant ``objects`` was copied would leave: stream ``numbers``'s
    committed events, table ``sums`` and the stream's offset."""
    config = apersist.Config(MemoryBackend(objects=dict(objects)),
                             snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(config) as run:
        stream = run.stream("numbers")
        events = [e.value async for e in stream.replay()]
        return events, dict(await run.table("sums")), stream.offset


class Turns:
    """Counts how often a task gets to run (it yields at once each time)."""

    def __init__(self) -> None:
        self.count = 0

    async def run(self) -> None:
        while True:
            self.count += 1
            await anyio.lowlevel.checkpoint()
