"""Tables and the cache: memory that follows the state, and opening without stalling the loop.

orjson returns each result in a block of 4 KiB or more; a table kept one per key (and
the cache one per entry), so a million small keys took gigabytes. The memory tests count
what tracemalloc sees, beyond a plain dict of the same state, against the state's
serialized size. The pacing tests make every look at the clock end a step (``STEP_S = 0``)
and count how often another task gets to run while a table or the cache opens.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import orjson
import pytest
from helpers import Turns, table_state

import apersist
import apersist._pacing
from apersist._cache import _entry_key, split_entry
from apersist._table import TableState, load_table_state

QUIET = 60_000
KEYS = 20_000
MEMORY_KEYS = 10_000  # tracemalloc makes every allocation slower
# What a table or the cache may hold per key beyond a dict of its state (a table) or
# beyond nothing (the cache), as a multiple of the key's record as stored. Measured: about
# 1.8 for the table (a right-sized copy of the record plus its slot in a dict), about 2.0
# for the cache (key, result and slot); it was over 60 and over 40 (a 4 KiB block each).
MEMORY_BOUND = 3.0


def table_value(i: int) -> dict[str, Any]:
    return {"name": f"user-{i:06d}", "tags": ["alpha", "beta"], "n": i}


@pytest.fixture
def traced() -> Iterator[Any]:
    """``traced()`` -> bytes allocated now (after a collection), while tracemalloc runs."""
    def now() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        yield now
    finally:
        tracemalloc.stop()


async def release_finished_runs(finished: list[weakref.ref[Any]]) -> None:
    """Make sure a finished run's tables and cache are freed before the next measurement.

    An idle anyio worker thread keeps the context of the last call it ran until its next
    one; a context copied inside a run holds its cache, and through the scheduler its
    tables. Every idle worker gets a call here, so that they let go.
    """
    async with anyio.create_task_group() as tg:
        for _ in range(40):  # anyio's default thread limit: every idle worker gets one
            tg.start_soon(anyio.to_thread.run_sync, time.sleep, 0.005)
    gc.collect()
    assert [ref() for ref in finished] == [None] * len(finished)


async def write_table(backend: apersist.Backend, keys: int) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        for i in range(keys):
            table[f"k{i}"] = table_value(i)


async def test_a_tables_memory_follows_its_serialized_size(tmp_path: Path, traced: Any) -> None:
    backend = apersist.Backend.filesystem(tmp_path / "store")
    config = apersist.Config(backend, snapshot_interval_ms=QUIET)
    await write_table(apersist.Backend.filesystem(tmp_path / "warm-up"), 10)
    serialized = sum(len(orjson.dumps([f"k{i}", table_value(i)])) for i in range(MEMORY_KEYS))

    def as_dict(*, decoded: bool) -> int:
        """What a dict of the same state holds (values as made, or as JSON decodes them)."""
        base = traced()
        if decoded:  # orjson's dicts are bigger than the ones made here
            plain = dict(orjson.loads(orjson.dumps([[f"k{i}", table_value(i)]
                                                    for i in range(MEMORY_KEYS)])))
        else:
            plain = {f"k{i}": table_value(i) for i in range(MEMORY_KEYS)}
        held = traced() - base
        assert len(plain) == MEMORY_KEYS
        return held

    async def written() -> int:
        base = traced()
        async with apersist.run(config) as run:
            table = await run.table("t")
            finished.append(weakref.ref(table))
            for i in range(MEMORY_KEYS):
                table[f"k{i}"] = table_value(i)
            await run.commit()
            return traced() - base

    async def opened() -> int:
        base = traced()
        async with apersist.run(config) as run:
            table = await run.table("t")
            assert len(table) == MEMORY_KEYS
            return traced() - base

    finished: list[weakref.ref[Any]] = []
    assert (await written() - as_dict(decoded=False)) / serialized < MEMORY_BOUND
    await release_finished_runs(finished)
    assert (await opened() - as_dict(decoded=True)) / serialized < MEMORY_BOUND


async def test_the_caches_memory_follows_its_serialized_size(tmp_path: Path, traced: Any) -> None:
    config = apersist.Config(apersist.Backend.filesystem(tmp_path / "store"),
                             snapshot_interval_ms=QUIET)

    @apersist.cached(name="memory-square")
    def square(x: int) -> dict[str, Any]:
        return {"x": x, "label": f"item-{x:08d}", "ok": True}

    serialized = sum(len(orjson.dumps([_entry_key("memory-square", 1, (i,), {}), square(i)]))
                     for i in range(MEMORY_KEYS))
    async with apersist.run(apersist.Config(apersist.Backend.filesystem(tmp_path / "warm-up"))):
        square(-1)

    async def written() -> int:
        base = traced()
        async with apersist.run(config) as run:
            finished.append(weakref.ref(run._cache))
            for i in range(MEMORY_KEYS):
                square(i)
            await run.commit()
            assert run.stats["cache_misses"] == MEMORY_KEYS
            return traced() - base

    async def opened() -> int:
        base = traced()
        async with apersist.run(config) as run:
            held = traced() - base
            assert square(7) == {"x": 7, "label": "item-00000007", "ok": True}
            assert run.stats["cache_hits"] == 1
            return held

    finished: list[weakref.ref[Any]] = []
    assert await written() / serialized < MEMORY_BOUND
    await release_finished_runs(finished)
    assert await opened() / serialized < MEMORY_BOUND


async def test_opening_a_big_table_lets_other_tasks_run(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = apersist.Backend.memory()
    await write_table(backend, KEYS)
    monkeypatch.setattr(apersist._pacing, "STEP_S", 0.0)  # every look at the clock yields
    turns = Turns()
    async with anyio.create_task_group() as tg:
        tg.start_soon(turns.run)
        async with apersist.run(apersist.Config(backend)) as run:
            before = turns.count
            table = await run.table("t")
            during = turns.count - before
        tg.cancel_scope.cancel()
    assert len(table) == KEYS
    # The clock is read once per record: another task runs at least once per key. (Without
    # the pacing it ran 5 times: at the reads of the store.)
    assert during >= KEYS


async def test_opening_a_big_cache_lets_other_tasks_run(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = apersist.Backend.memory()

    @apersist.cached(name="pacing-square")
    def square(x: int) -> dict[str, Any]:
        return {"x": x, "label": f"item-{x:08d}"}

    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)):
        for i in range(KEYS):
            square(i)
    monkeypatch.setattr(apersist._pacing, "STEP_S", 0.0)
    turns = Turns()
    async with anyio.create_task_group() as tg:
        tg.start_soon(turns.run)
        before = turns.count
        async with apersist.run(apersist.Config(backend)) as run:
            during = turns.count - before
            assert square(7) == {"x": 7, "label": "item-00000007"}
            assert run.stats["cache_hits"] == 1
        tg.cancel_scope.cancel()
    # Once per entry, as for a table. (Without the pacing: 8 times, opening the store.)
    assert during >= KEYS


async def test_a_loaded_value_mutated_in_place_is_not_compacted_into_the_store(
        backend: apersist.Backend) -> None:
    """Compaction writes each key's records as loaded or set, never the live objects."""
    async with apersist.run(apersist.Config(backend)) as run:
        table = await run.table("t")
        table["k"] = [1]
        table["j"] = {"a": 1}
        table["gone"] = 0
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        table["k"].append({1, 2})  # no longer JSON: compacting it would fail
        table["j"]["a"] = 2  # recorded by no delta
        table["new"] = [3]
        table["new"].append(4)
        del table["gone"]
        await run.compact()
    expected = {"k": [1], "j": {"a": 1}, "new": [3]}
    assert await table_state(backend, "t") == expected
    async with apersist.run(apersist.Config(backend)) as run:
        state, deltas = await load_table_state(run._store, "t", run._store.last_seq)
        assert (state, deltas) == (expected, 0)
        # Each record as stored, ready for this writer's next snapshot.
        assert state.records == {key: orjson.dumps([key, value]) for key, value in expected.items()}


async def test_a_read_only_run_keeps_no_records(backend: apersist.Backend) -> None:
    await write_table(backend, 3)
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(cfg) as run:
        state, _ = await load_table_state(run._store, "t", run._store.last_seq)
        assert isinstance(state, TableState)
        assert state == {f"k{i}": table_value(i) for i in range(3)}
        assert state.records is None
        assert dict(await run.table("t")) == state


@pytest.mark.parametrize(("record", "key", "result"), [
    (b'["f@1:ab",{"a":1}]', "f@1:ab", b'{"a":1}'),
    (b'["f@1:ab","x\\",y"]', "f@1:ab", b'"x\\",y"'),  # a result with an escaped quote
    (b'["m.<locals>.g@2:cd",null]', "m.<locals>.g@2:cd", b"null"),
    ('["ключ@1:ef",[1,2]]'.encode(), "ключ@1:ef", b"[1,2]"),
    (b'["q\\"u@1:00",1]', 'q"u@1:00', b"1"),  # an escape in the key: decoded instead
    (b'["b\\\\s@1:00",  true ]', "b\\s@1:00", b"true"),
    (b'[ "sp@1:00" , 2 ]', "sp@1:00", b"2"),  # not as put writes it: decoded instead
])
def test_an_entry_is_split_into_its_key_and_result(record: bytes, key: str, result: bytes) -> None:
    assert split_entry(record) == (key, result)
    assert orjson.loads(record) == [key, orjson.loads(result)]


async def test_entries_whose_keys_need_escapes_are_read_back(backend: apersist.Backend) -> None:
    calls: list[int] = []

    def make() -> Any:
        def odd(x: int) -> str:
            calls.append(x)
            return f"odd {x}"

        odd.__qualname__ = 'we"ird\\name'  # the default name is module and qualname
        return apersist.cached(odd)

    for _ in range(2):
        odd = make()
        async with apersist.run(apersist.Config(backend)):
            assert odd(1) == "odd 1"
            assert odd(2) == "odd 2"
    assert calls == [1, 2]
