"""The snapshot scheduler: group commit, interval commits, back-pressure, concurrency."""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest
from helpers import counting, replayed, stored_objects, wait_until

import apersist
from apersist import _format as fmt
from apersist.testing import FakeClock

QUIET = 60_000


async def read_only_values(backend: apersist.Backend, stream: str) -> list[Any]:
    """What is durable right now, read by a REPLAY run next to the writer (it never fences)."""
    return [e.value for e in await replayed(backend, stream)]


async def test_group_commit_commits_soon_without_an_explicit_commit(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=0)) as run:
        stream = run.stream("s")
        await stream.record("a", offset=1)
        await wait_until(lambda: run.stats["pending_deltas"] == 0, what="a group commit")
        assert run.stats["commits"] >= 1
        assert await read_only_values(backend, "s") == ["a"]
        await wait_until(lambda: stream.offset == 1, what="the offset to be durable")
        # Recording again starts the next group commit by itself.
        for i in range(50):
            await stream.record(i, offset=i + 2)
        await wait_until(lambda: run.stats["pending_deltas"] == 0, what="a second group commit")
        assert stream.offset == 51
        assert await read_only_values(backend, "s") == ["a", *range(50)]


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_group_commit_batches_what_was_recorded_during_a_commit(
        backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, snapshot_interval_ms=0)
    async with counting(cfg) as driver, apersist.run(cfg, driver=driver) as run:
        stream = run.stream("s")
        gate = driver.hold_segment_puts()
        await stream.record("first")
        await wait_until(lambda: driver.held == 1, what="the first upload to start")
        stats = run.stats
        assert stats["uploads_in_flight"] == 1
        assert stats["pending_deltas"] == 1
        for i in range(100):  # recorded while the first commit is uploading
            await stream.record(i)
        assert run.stats["commits"] == 0
        driver.gate = None
        gate.set()
        await wait_until(lambda: run.stats["pending_deltas"] == 0, what="both commits")
        # The 100 events recorded during the first commit went into one more commit.
        assert run.stats["commits"] == 2
        assert run.stats["uploads_in_flight"] == 0
    assert await read_only_values(backend, "s") == ["first", *range(100)]


async def test_interval_mode_commits_on_the_period(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=30)) as run:
        stream = run.stream("s")
        for round_ in range(3):
            await stream.record(round_, offset=round_)
            await wait_until(lambda: run.stats["pending_deltas"] == 0, what="a periodic commit")
            assert run.stats["commits"] == round_ + 1
            assert stream.offset == round_
    assert await read_only_values(backend, "s") == [0, 1, 2]


async def test_a_long_interval_does_not_commit_on_its_own(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        await run.stream("s").record("x")
        with anyio.move_on_after(0.1):
            await anyio.sleep_forever()
        assert run.stats["commits"] == 0
        assert run.stats["pending_deltas"] == 1
        assert await read_only_values(backend, "s") == []
    assert await read_only_values(backend, "s") == ["x"]


@pytest.mark.parametrize("interval", [0, QUIET])
async def test_back_pressure_bounds_pending_bytes(backend: apersist.Backend, interval: int) -> None:
    bound = 4096
    value = {"payload": "p" * 100}
    record_bytes = len('{"payload":""}') + 100 + 64  # value, its offset and the framing
    cfg = apersist.Config(backend, snapshot_interval_ms=interval, max_pending_bytes=bound)
    total = 2_000
    peak = 0
    done = False
    async with apersist.run(cfg) as run:

        async def monitor() -> None:
            nonlocal peak
            while not done:
                peak = max(peak, run.stats["pending_bytes"])
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor)
            stream = run.stream("s")
            for i in range(total):
                await stream.record(value, offset=i)
                pending = run.stats["pending_bytes"]
                peak = max(peak, pending)
                assert pending <= bound + record_bytes, (i, pending)
            done = True
        assert peak <= bound + record_bytes
        assert peak > bound // 2  # the bound was actually reached
        # Only back-pressure can have committed under the long interval: many commits.
        assert run.stats["commits"] >= total * 100 // bound
    got = await replayed(backend, "s")
    assert [e.offset for e in got] == list(range(total))
    assert all(e.value == value for e in got)


async def test_back_pressure_lets_a_source_finish(backend: apersist.Backend) -> None:
    async def read(offset: Any) -> Any:
        for i in range(1_500):
            yield "q" * 50, i

    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET, max_pending_bytes=4096)
    async with apersist.run(cfg) as run:
        count = 0
        async for _ in run.source("s", read):
            count += 1
            assert run.stats["pending_bytes"] <= 4096 + 200
        assert count == 1_500
    assert len(await replayed(backend, "s")) == 1_500


@pytest.mark.parametrize("interval", [0, QUIET])
async def test_every_event_acknowledged_by_a_commit_is_replayed(
        backend: apersist.Backend, interval: int) -> None:
    producers, per_producer = 5, 120
    acknowledged: dict[int, int] = defaultdict(lambda: -1)  # producer -> last acked number
    seqs: list[list[int]] = []
    cfg = apersist.Config(backend, snapshot_interval_ms=interval, max_segment_bytes=1024)
    with anyio.CancelScope() as scope:
        async with apersist.run(cfg) as run:

            async def produce(p: int) -> None:
                stream = run.stream(f"p{p}")
                for n in range(per_producer):
                    await stream.record({"p": p, "n": n}, offset=n)
                    if n % 10 == 9:
                        info = await run.commit()
                        acknowledged[p] = n
                        assert stream.offset is not None
                        assert stream.offset >= n
                        assert info.seq >= 1
                    if n % 3 == 0:
                        await anyio.lowlevel.checkpoint()

            async def committer() -> None:
                mine: list[int] = []
                seqs.append(mine)
                while True:
                    info = await run.commit()
                    mine.append(info.seq)
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(committer)
                async with anyio.create_task_group() as producers_tg:
                    for p in range(producers):
                        producers_tg.start_soon(produce, p)
                tg.cancel_scope.cancel()
            # Record more that nobody acknowledges, then leave by cancellation.
            for p in range(producers):
                await run.stream(f"p{p}").record({"p": p, "n": per_producer}, offset=per_producer)
            scope.cancel()
            await anyio.lowlevel.checkpoint()
    for mine in seqs:
        assert mine == sorted(mine)  # each caller sees commits in order
    for p in range(producers):
        got = await replayed(backend, f"p{p}")
        numbers = [e.value["n"] for e in got]
        # Everything acknowledged is there, in order, once; anything after is a prefix.
        assert numbers == list(range(len(numbers)))
        assert len(numbers) >= acknowledged[p] + 1 == per_producer


async def test_concurrent_commit_callers_all_return_durable_commits(
        backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    infos: list[apersist.CommitInfo] = []
    async with apersist.run(cfg) as run:
        for i in range(20):
            await run.stream("s").record(i)

        async def call() -> None:
            infos.append(await run.commit())

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(call)
        assert run.stats["pending_deltas"] == 0
        assert run.stats["commits"] == 1
    seqs = {info.seq for info in infos}
    assert len(seqs) == 1
    assert sum(info.deltas for info in infos) >= 20
    assert await read_only_values(backend, "s") == list(range(20))


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
@pytest.mark.parametrize("compression", [None, "zstd"])
async def test_segments_built_in_place_are_the_bytes_built_by_join(
        tmp_path: Path, compression: str | None) -> None:
    """Segments are built in their own buffer (no copy holding the GIL): the filesystem
    gets the buffer, the memory backend bytes of it. Both must be exactly what
    encode_segment's join makes, small segments (built on the loop) and big ones (their
    trailer CRC in a thread) alike; compressed ones are joined around the stored bytes."""
    big = [{"n": i, "pad": "q" * 200} for i in range(6000)]  # past _THREAD_BUILD_BYTES raw
    backends = [apersist.Backend.memory(), apersist.Backend.filesystem(tmp_path / "fs")]
    for backend in backends:
        config = apersist.Config(backend, compression=compression)
        async with apersist.run(config, clock_ms=FakeClock(7)) as run:
            await run.stream("small").record({"a": 1})
            await run.stream("big").record_many(big)
            table = await run.table("t")
            table["k"] = [1, 2]
    memory, filesystem = [await stored_objects(b) for b in backends]
    segments = sorted(k for k in memory if k.endswith(".seg"))
    assert len(segments) == 3
    if compression is None:
        assert max(len(memory[k]) for k in segments) > 1 << 20
    assert segments == sorted(k for k in filesystem if k.endswith(".seg"))
    assert all(memory[k] == filesystem[k] for k in segments)
    for key in segments:
        data = memory[key]
        (meta_len,) = struct.unpack_from("<I", data, 12)
        meta = orjson.loads(data[16:16 + meta_len])
        (count,) = struct.unpack_from("<Q", data, len(data) - 28)
        body = data[20 + meta_len:len(data) - 28]
        assert data == fmt.encode_segment(fmt.SegmentMeta(key, meta["kind"], meta["name"]),
                                          body, count, meta.get("codec"))
        assert meta.get("codec") == (compression if len(body) > 1000 else None)
