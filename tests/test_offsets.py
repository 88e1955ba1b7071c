"""Offsets in the commit log: a commit records the offsets it changed, never the whole map.

From format 3.0 on, a commit record's ``offset_changes`` holds only the streams whose offset
the commit changed; a reset commit starts from an empty map and the fence commit changes
none. So a commit record, and the work of opening a store, do not grow with the streams a
commit leaves alone, and a store reopens with every stream's offset right.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from helpers import stored_objects

import apersist
from apersist import _format as fmt
from apersist._drivers import open_driver
from apersist._inspect import summarize, verify
from apersist._store import Store
from apersist.testing import FakeClock

QUIET = 3_600_000
STREAMS = 300


async def commit_bodies(backend: apersist.Backend) -> list[dict[str, Any]]:
    """The body of every commit record, in commit order."""
    objects = await stored_objects(backend)
    keys = sorted(k for k in objects if re.search(r"/commits/\d{20}\.json$", k))
    return [orjson.loads(objects[k])["body"] for k in keys]


async def commit_sizes(backend: apersist.Backend) -> list[int]:
    objects = await stored_objects(backend)
    return [len(objects[k]) for k in sorted(objects)
            if re.search(r"/commits/\d{20}\.json$", k)]


async def offsets_read_back(backend: apersist.Backend, names: list[str]) -> dict[str, Any]:
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(cfg) as run:
        return {name: run.stream(name).offset for name in names}


async def inspected_offsets(backend: apersist.Backend) -> dict[str, Any]:
    driver = open_driver(backend)
    try:
        assert await verify(driver) == []
        report = await summarize(driver)
    finally:
        await driver.aclose()
    return {name: info["offset"] for name, info in report.streams.items()}


async def test_many_streams_one_change_per_commit_reopen_with_every_offset(
        backend: apersist.Backend) -> None:
    names = [f"stream-{i:04d}" for i in range(STREAMS)]
    first: dict[str, Any] = {name: {"file": name, "line": i} for i, name in enumerate(names)}
    expected = dict(first)
    # Every stream gets an offset (OFFSETS_ONLY writes offsets without data: one commit).
    only = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.OFFSETS_ONLY,
                           snapshot_interval_ms=QUIET)
    async with apersist.run(only) as run:
        for name in names:
            await run.stream(name).record(None, offset=expected[name])
    # Then commits of one event each: one stream's offset changes per commit.
    changed = names[::37]
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        for n, name in enumerate(changed):
            expected[name] = {"file": name, "line": 1000 + n}
            await run.stream(name).record({"n": n}, offset=expected[name])
            await run.commit()
            assert run.stream(name).offset == expected[name]
        await run.stream("clicks").record("no offset")  # a commit that changes no offset
        await run.commit()
    expected["clicks"] = None

    bodies = await commit_bodies(backend)
    # fence (run 1), the offsets of run 1, fence (run 2), one per change, the "clicks" one.
    assert len(bodies) == 1 + 1 + 1 + len(changed) + 1
    assert [b["offset_changes"] for b in bodies[2:]] == [
        {}, *({name: expected[name]} for name in changed), {}]
    assert bodies[1]["offset_changes"] == first
    sizes = await commit_sizes(backend)
    assert max(sizes[2:]) < 1_000 < sizes[1]  # no record repeats the streams it leaves alone

    assert await offsets_read_back(backend, [*names, "clicks"]) == expected
    assert await inspected_offsets(backend) == {
        name: offset for name, offset in expected.items() if name != "clicks"} | {"clicks": None}
    # A writer that reopens the store and changes one more offset keeps all the others.
    async with apersist.run(apersist.Config(backend)) as run:
        assert run.stream(names[1]).offset == expected[names[1]]
        await run.stream(names[1]).record("last", offset="last")
    expected[names[1]] = "last"
    assert await offsets_read_back(backend, [*names, "clicks"]) == expected


async def test_a_reset_commit_then_commits_that_change_some_offsets(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        for name, offset in [("a", 1), ("b", 2), ("c", 3)]:
            await run.stream(name).record(name, offset=offset)
    record = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.RECORD,
                             snapshot_interval_ms=QUIET)
    async with apersist.run(record) as run:
        assert run.stream("a").offset is None  # a new history
        await run.stream("a").record("a2", offset=10)
        await run.commit()  # the reset commit: the new history's whole map
        await run.stream("b").record("b2", offset=20)
        await run.commit()
        await run.stream("a").record("a3", offset=11)
        await run.commit()
        assert (run.stream("a").offset, run.stream("b").offset, run.stream("c").offset) == (
            11, 20, None)
    bodies = await commit_bodies(backend)
    resets = [i for i, b in enumerate(bodies) if b["reset"]]
    assert len(resets) == 1
    assert [(b["reset"], b["offset_changes"]) for b in bodies[resets[0]:]] == [
        (True, {"a": 10}), (False, {"b": 20}), (False, {"a": 11})]
    got = await offsets_read_back(backend, ["a", "b", "c"])
    assert got == {"a": 11, "b": 20, "c": None}  # c's offset belonged to the old history
    assert await inspected_offsets(backend) == {"a": 11, "b": 20}
    # A reset commit with no offset at all forgets every offset before it.
    async with apersist.run(record) as run:
        await run.stream("d").record("d1")
    assert await offsets_read_back(backend, ["a", "b", "c", "d"]) == dict.fromkeys("abcd")
    assert (await commit_bodies(backend))[-1]["offset_changes"] == {}


async def test_the_fence_commit_changes_no_offset(backend: apersist.Backend) -> None:
    names = [f"s{i}" for i in range(STREAMS)]
    only = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.OFFSETS_ONLY)
    async with apersist.run(only) as run:
        for i, name in enumerate(names):
            await run.stream(name).record(None, offset=i)
    before = await commit_sizes(backend)
    async with apersist.run(apersist.Config(backend)) as run:
        fence = (await commit_bodies(backend))[-1]
        assert (fence["segments"], fence["offset_changes"], fence["reset"]) == ([], {}, False)
        assert (await commit_sizes(backend))[-1] < 300 < before[-1]
        assert [run.stream(name).offset for name in names] == list(range(STREAMS))
    assert await offsets_read_back(backend, names) == {name: i for i, name in enumerate(names)}


async def test_the_store_records_what_changed_in_the_full_map_it_is_given(
        backend: apersist.Backend) -> None:
    """``Store.commit`` takes every offset after the commit (as the scheduler hands it) and
    writes what differs from the current map, a stream that lost its offset included."""
    driver = open_driver(backend)
    try:
        store = Store(driver, clock_ms=FakeClock())
        await store.load()
        await store.acquire_writer()
        await store.commit([], {"a": b"1", "b": b'{"x":2}'}, reset=False)
        await store.commit([], {"a": b"1", "b": b'{"x":3}', "c": b"4"}, reset=False)
        await store.commit([], {"a": b"1", "c": b"4"}, reset=False)  # b has no offset any more
        await store.commit([], {"a": b"1", "c": b"4"}, reset=False)
        assert dict(store.offsets) == {"a": b"1", "c": b"4"}
        bodies = await commit_bodies(backend)
        assert [b["offset_changes"] for b in bodies] == [
            {}, {"a": 1, "b": {"x": 2}}, {"b": {"x": 3}, "c": 4}, {"b": None}, {}]
        again = Store(driver, clock_ms=FakeClock())
        await again.load()
        assert dict(again.offsets) == {"a": b"1", "c": b"4"}
        await store.commit([], {"z": b"9"}, reset=True)
        await again.load()
        assert dict(again.offsets) == dict(store.offsets) == {"z": b"9"}
    finally:
        await driver.aclose()


@pytest.mark.parametrize("changes", [{"a": b"5"}, {"a": b"null"}, {}])
def test_applying_a_commit_costs_what_it_changed(changes: dict[str, bytes]) -> None:
    """The map is updated in place: the streams a commit leaves alone are not touched."""
    offsets = {f"s{i}": b"%d" % i for i in range(50_000)}
    offsets["a"] = b"0"
    record = fmt.CommitRecord("0", 3, 1, 0, "t", False, (), changes)
    assert record.apply_offsets(offsets) is offsets
    assert len(offsets) == 50_000 + (0 if changes.get("a") == b"null" else 1)
