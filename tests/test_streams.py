"""Streams: record and replay, offsets, value and name checks, large histories."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import replayed, segment_keys, values

import apersist
from apersist.testing import FakeClock

QUIET = 60_000

SAMPLES: list[Any] = [0, -7, 2**53, 1.5, "text", "ünïcødé ✓", True, False, None, [1, [2, "3"]],
                      {"a": {"b": [None, 1.25]}}, "", [], {}]


async def test_record_then_replay_in_order_with_every_event_field(
        backend: apersist.Backend) -> None:
    clock = FakeClock(10_000)
    async with apersist.run(apersist.Config(backend), clock_ms=clock) as run:
        stream = run.stream("orders")
        for i, value in enumerate(SAMPLES):
            clock.set(10_000 + i * 7)
            await stream.record(value, offset={"pos": i} if i % 2 else None)
    async with apersist.run(apersist.Config(backend)) as run:
        events = [e async for e in run.stream("orders").replay()]
    assert [e.value for e in events] == SAMPLES
    assert [e.offset for e in events] == [{"pos": i} if i % 2 else None for i in range(len(SAMPLES))]
    assert [e.time_ms for e in events] == [10_000 + i * 7 for i in range(len(SAMPLES))]
    assert all(e.replayed is True for e in events)
    assert all(isinstance(e, apersist.Event) for e in events)


async def test_replay_yields_only_what_was_committed_before_the_run_opened(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream("s").record("old-1")
        await run.stream("s").record("old-2")
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("s")
        first = [e async for e in stream.replay()]
        await stream.record("new-1")
        await run.commit()
        await stream.record("new-2")
        second = [e async for e in stream.replay()]
        await run.commit()
        third = [e async for e in stream.replay()]
        assert [e.value for e in first] == ["old-1", "old-2"]
        assert second == first
        assert third == first
    assert await values(backend, "s") == ["old-1", "old-2", "new-1", "new-2"]


async def test_replay_of_an_unknown_stream_is_empty(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        assert [e async for e in run.stream("nothing-here").replay()] == []
        assert run.stream("nothing-here").offset is None


async def test_streams_are_independent(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        for i in range(6):
            await run.stream("even" if i % 2 == 0 else "odd").record(i, offset=i)
    assert await values(backend, "even") == [0, 2, 4]
    assert await values(backend, "odd") == [1, 3, 5]
    async with apersist.run(apersist.Config(backend)) as run:
        assert run.stream("even").offset == 4
        assert run.stream("odd").offset == 5


async def test_offset_is_the_latest_durable_one(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        stream = run.stream("s")
        assert stream.offset is None
        await stream.record("a", offset=5)
        assert stream.offset is None  # recorded, not yet durable
        await run.commit()
        assert stream.offset == 5
        await stream.record("b")  # offset=None leaves it as it is
        await run.commit()
        assert stream.offset == 5
        await stream.record("c", offset={"file": "x", "line": 3})
        await run.commit()
        assert stream.offset == {"file": "x", "line": 3}
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        stream = run.stream("s")
        assert stream.offset == {"file": "x", "line": 3}
        await stream.record("d", offset=None)
        await run.commit()
        assert stream.offset == {"file": "x", "line": 3}
        assert [e.offset async for e in stream.replay()] == [5, None, {"file": "x", "line": 3}]


class Opaque:
    pass


@pytest.mark.parametrize("bad", [Opaque(), {1, 2}, b"bytes", float("nan"), float("inf"),
                                 [1.0, float("-inf")], {"k": float("nan")}, {1: "int key"},
                                 2**64])
async def test_a_bad_value_raises_type_error_naming_the_stream_and_harms_nothing(
        backend: apersist.Backend, bad: Any) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        stream = run.stream("orders-v2")
        await stream.record("good-1", offset=1)
        await run.commit()
        with pytest.raises(TypeError, match="orders-v2"):
            await stream.record(bad, offset=2)
        assert stream.offset == 1
        await stream.record("good-2", offset=3)
    events = await replayed(backend, "orders-v2")
    assert [(e.value, e.offset) for e in events] == [("good-1", 1), ("good-2", 3)]


async def test_a_bad_offset_raises_type_error_naming_the_stream(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("clicks")
        with pytest.raises(TypeError, match="clicks"):
            await stream.record("v", offset=Opaque())
        with pytest.raises(TypeError, match="clicks"):
            await stream.record("v", offset=float("nan"))
        await stream.record("ok", offset=1)
    events = await replayed(backend, "clicks")
    assert [(e.value, e.offset) for e in events] == [("ok", 1)]


@pytest.mark.parametrize("name", ["", "-lead", ".lead", "_lead", "a/b", "a b", "a:b", "é",
                                  "a" * 129, "tab\t", "../up"])
async def test_invalid_stream_names_raise_value_error(backend: apersist.Backend, name: str) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        with pytest.raises(ValueError, match="name"):
            run.stream(name)


async def test_a_non_str_stream_name_raises_value_error(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        bad: Any = 5
        with pytest.raises(ValueError, match="name"):
            run.stream(bad)


@pytest.mark.parametrize("name", ["a", "0", "Orders.v2_final-1", "a" * 128])
async def test_valid_stream_names_work(backend: apersist.Backend, name: str) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream(name).record(name)
    assert await values(backend, name) == [name]


async def test_stream_returns_the_same_object(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("s")
        assert isinstance(stream, apersist.Stream)
        assert run.stream("s") is stream
        assert run.stream("t") is not stream
        assert stream.name == "s"


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_many_events_across_many_segments_replay_completely_in_order(
        backend: apersist.Backend) -> None:
    total = 6_000
    cfg = apersist.Config(backend, max_segment_bytes=1024)
    async with apersist.run(cfg) as run:
        stream = run.stream("big")
        for i in range(total):
            await stream.record({"i": i, "pad": "x" * (i % 17)}, offset=i)
            if i % 1_500 == 0:
                await run.commit()
    assert len(await segment_keys(backend)) > 50
    async with apersist.run(apersist.Config(backend, max_segment_bytes=1024)) as run:
        stream = run.stream("big")
        events = [e async for e in stream.replay()]
        assert stream.offset == total - 1
    assert [e.value["i"] for e in events] == list(range(total))
    assert [e.offset for e in events] == list(range(total))
    assert all(e.value["pad"] == "x" * (e.value["i"] % 17) for e in events)


async def test_a_big_value_replays_whole(backend: apersist.Backend) -> None:
    big = {"blob": "y" * 300_000, "list": list(range(20_000))}
    async with apersist.run(apersist.Config(backend, max_segment_bytes=1024)) as run:
        await run.stream("s").record(big)
        await run.stream("s").record("after")
    assert await values(backend, "s") == [big, "after"]


async def test_injected_clock_sets_time_ms(backend: apersist.Backend) -> None:
    clock = FakeClock(42)
    async with apersist.run(apersist.Config(backend), clock_ms=clock) as run:
        await run.stream("s").record("a")
        clock.set(4_242)
        await run.stream("s").record("b")
        clock.set(4_242)
        await run.stream("s").record("c")
    assert [e.time_ms for e in await replayed(backend, "s")] == [42, 4_242, 4_242]


async def test_replay_survives_many_runs(backend: apersist.Backend) -> None:
    for r in range(5):
        async with apersist.run(apersist.Config(backend)) as run:
            stream = run.stream("s")
            assert [e.value async for e in stream.replay()] == list(range(r * 3))
            for i in range(r * 3, r * 3 + 3):
                await stream.record(i, offset=i)
    assert await values(backend, "s") == list(range(15))
