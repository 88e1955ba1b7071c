"""Cheap table writes: a commit persists each changed key's last record (issue 14 item 4).

A table keeps the keys it changed since the last cut, each with its last record, and hands
them over at the cut; the deltas are framed after it, in paced steps. These tests check
what lands in the store (one delta per key per commit, at its value as of the cut), the
accounting behind ``run.stats``, back-pressure and ``commit()``, and that a refused write
(a bad value, an ended run, a failed commit) changes nothing.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest
from helpers import CountingDriver, Turns, counting, driver_for, table_state, wait_until

import apersist
import apersist._pacing
import apersist._values
from apersist import _format as fmt
from apersist._barrier import CONSUMER, Consumer
from apersist.testing import FaultyDriver

QUIET = 60_000


async def deltas_by_commit(run: apersist.Run, table: str) -> dict[int, list[Any]]:
    """The delta records of ``table`` that this run's store holds, decoded, by commit."""
    store = run._store
    found: dict[int, list[Any]] = {}
    for segment in store.segments_at(fmt.KIND_TABLE, table, store.last_seq):
        async for view in store.read_segments([segment.ref]):
            found.setdefault(segment.seq, []).extend(
                orjson.loads(value) for value, _off, _t in view.records())
    return found


def snapshot_seqs(run: apersist.Run, table: str) -> list[int]:
    store = run._store
    return sorted({s.seq for s in store.segments_at(fmt.KIND_TABLE_SNAPSHOT, table,
                                                    store.last_seq)})


async def test_a_key_written_many_times_in_one_commit_persists_its_last_value(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        for i in range(1_000):
            table["hot"] = i
            table[f"k{i % 3}"] = {"i": i}
        info = await run.commit()
        # Four keys changed: four deltas, whatever the number of writes.
        assert info.deltas == 4
        assert run.stats["deltas_recorded"] == run.stats["deltas_committed"] == 4
        table["hot"] = "again"  # the next commit persists the key again
        second = await run.commit()
        assert second.deltas == 1
        deltas = await deltas_by_commit(run, "t")
        assert sorted(deltas) == [info.seq, second.seq]
        assert sorted(deltas[info.seq]) == [
            ["hot", 999], ["k0", {"i": 999}], ["k1", {"i": 997}], ["k2", {"i": 998}]]
        assert deltas[second.seq] == [["hot", "again"]]
    assert await table_state(backend, "t") == {
        "hot": "again", "k0": {"i": 999}, "k1": {"i": 997}, "k2": {"i": 998}}


async def test_deletes_and_sets_of_one_key_in_one_commit_persist_the_last_change() -> None:
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        table.update({"del-set": 1, "set-del": 1, "del-set-del": 1, "set-del-set": 1})
        await run.commit()
        del table["del-set"]
        table["del-set"] = 2
        table["set-del"] = 2
        del table["set-del"]
        del table["del-set-del"]
        table["del-set-del"] = 2
        del table["del-set-del"]
        table["set-del-set"] = 2
        del table["set-del-set"]
        table["set-del-set"] = 3
        table["new-del"] = 1  # a key new in this commit, gone by its end
        del table["new-del"]
        info = await run.commit()
        assert info.deltas == 5
        deltas = await deltas_by_commit(run, "t")
        assert sorted(deltas[info.seq]) == [
            ["del-set", 2], ["del-set-del"], ["new-del"], ["set-del"], ["set-del-set", 3]]
        expected = {"del-set": 2, "set-del-set": 3}
        assert dict(table) == expected
    assert await table_state(backend, "t") == expected
    async with apersist.run(apersist.Config(backend)) as run:  # a writer's open keeps records
        table = await run.table("t")
        assert dict(table) == expected
        await run.compact()
    assert await table_state(backend, "t") == expected


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_a_snapshot_at_a_cut_takes_the_place_of_that_cuts_deltas() -> None:
    backend = apersist.Backend.memory()
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    async with counting(cfg) as driver, apersist.run(cfg, driver=driver) as run:
        table = await run.table("t")
        table.update({"a": 1, "b": 2, "c": 3})
        first = await run.commit()
        assert sorted(await deltas_by_commit(run, "t")) == [first.seq]
        table["a"] = 10
        del table["b"]
        table["d"] = 4
        table.request_compaction()
        driver.reset()
        second = await run.commit()
        assert second.deltas == 3
        # One segment, the snapshot; it takes the older deltas out of the table's log.
        assert [key for verb, key in driver.keys if verb == "put" and key.endswith(".seg")
                ] == [s.ref.key for s in run._store.segments_at(
                    fmt.KIND_TABLE_SNAPSHOT, "t", second.seq)]
        assert await deltas_by_commit(run, "t") == {}
        assert snapshot_seqs(run, "t") == [second.seq]
        table["e"] = 5  # changes after the snapshot are deltas again
        del table["c"]
        third = await run.commit()
        deltas = await deltas_by_commit(run, "t")
        assert sorted(deltas) == [third.seq]  # the snapshot took the older ones' place
        assert sorted(deltas[third.seq]) == [["c"], ["e", 5]]
        expected = {"a": 10, "d": 4, "e": 5}
        assert dict(table) == expected
    assert await table_state(backend, "t") == expected


async def test_a_commit_holds_each_keys_record_as_it_was_at_the_cut(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes made while a commit frames its deltas (after the cut) go to the next one."""
    monkeypatch.setattr(apersist._pacing, "STEP_S", 0.0)  # the framing yields at every record
    backend = apersist.Backend.memory()
    keys = [f"k{i}" for i in range(200)]
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        for key in keys:
            table[key] = "before"
        dirty = table._dirty
        async with anyio.create_task_group() as tg:
            infos: list[apersist.CommitInfo] = []

            async def commit() -> None:
                infos.append(await run.commit())

            tg.start_soon(commit)
            # The cut hands the table's changed keys over: it has a new dict from then on.
            # Looked at every turn: the framing that follows takes a turn per record.
            with anyio.fail_after(5):
                while table._dirty is dirty:
                    await anyio.lowlevel.checkpoint()
            for key in keys:
                table[key] = "after"
            assert not infos  # written while the commit frames its deltas
        deltas = await deltas_by_commit(run, "t")
        assert deltas[infos[0].seq] == [[key, "before"] for key in keys]
        assert run.stats["pending_deltas"] == len(keys)
        info = await run.commit()
        deltas = await deltas_by_commit(run, "t")
        assert deltas[info.seq] == [[key, "after"] for key in keys]
    assert await table_state(backend, "t") == dict.fromkeys(keys, "after")


async def test_a_commit_of_many_changed_keys_lets_other_tasks_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The deltas are framed after the cut in paced steps, not in the cut: with every look
    at the clock ending a step, another task runs once per key framed. (How long a step
    of real length holds the loop is measured by ``python -m benchmarks.compaction``.)"""
    keys = 20_000
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        for i in range(keys):
            table[f"k{i}"] = i
        monkeypatch.setattr(apersist._pacing, "STEP_S", 0.0)
        turns = Turns()
        async with anyio.create_task_group() as tg:
            tg.start_soon(turns.run)
            await anyio.lowlevel.checkpoint()
            before = turns.count
            info = await run.commit()
            during = turns.count - before
            tg.cancel_scope.cancel()
        assert info.deltas == keys
        assert during >= keys
    assert await table_state(backend, "t") == {f"k{i}": i for i in range(keys)}


async def test_rewriting_known_keys_does_not_grow_the_pending_bytes() -> None:
    """A key is accounted once per commit: a hot-key job does not look like a flood."""
    bound = 1 << 20
    cfg = apersist.Config(apersist.Backend.memory(), snapshot_interval_ms=QUIET,
                          max_pending_bytes=bound)
    async with apersist.run(cfg) as run:
        table = await run.table("t")
        for i in range(100_000):
            table[f"k{i % 1_000}"] = [i, i]
        stats = run.stats
        assert stats["deltas_recorded"] == 1_000
        # About 1,000 records of 20 to 30 bytes plus framing, not 100,000 of them.
        assert stats["pending_bytes"] < 64 * 1_000
        assert not run._scheduler._urgent.is_set()  # type: ignore[union-attr]
        info = await run.commit()
        assert info.deltas == 1_000
        assert run.stats["pending_bytes"] == 0


async def test_writes_of_new_keys_past_the_bound_start_a_commit() -> None:
    bound = 64 << 10
    cfg = apersist.Config(apersist.Backend.memory(), snapshot_interval_ms=QUIET,
                          max_pending_bytes=bound)
    async with apersist.run(cfg) as run:
        table = await run.table("t")
        for i in range(200):  # about 200 KiB, with no await: the writes cannot wait
            table[f"k{i}"] = "x" * 1_000
        assert run.stats["pending_bytes"] > bound
        await wait_until(lambda: run.stats["commits"] >= 1, what="the commit the bound starts")
        await wait_until(lambda: run.stats["pending_bytes"] == 0, what="that commit's end")
        assert run.stats["deltas_committed"] == 200


async def test_a_write_after_the_run_ended_raises_and_buffers_nothing() -> None:
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        table["a"] = 1
        table["b"] = 2  # changed keys at the end: the final commit takes them
    for write in (lambda: table.__setitem__("a", 3), lambda: table.__setitem__("new", 3),
                  lambda: table.__delitem__("b")):
        with pytest.raises(RuntimeError, match="run has ended"):
            write()
    assert dict(table) == {"a": 1, "b": 2}
    assert table._dirty == {}
    assert await table_state(backend, "t") == {"a": 1, "b": 2}


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_after_a_failed_commit_every_write_raises_and_nothing_stays_buffered() -> None:
    backend = apersist.Backend.memory()
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    faulty: list[FaultyDriver] = []

    def wrap(driver: Any) -> CountingDriver:
        faulty.append(FaultyDriver(driver))
        return CountingDriver(faulty[0])

    async with driver_for(cfg, wrap) as driver:
        with pytest.raises(apersist.BackendError):  # noqa: PT012 - leaving fails as well
            async with apersist.run(cfg, driver=driver) as run:
                table = await run.table("t")
                table["a"] = 1
                await run.commit()
                table["a"] = 2
                gate = driver.hold_segment_puts()
                failed: list[BaseException] = []
                async with anyio.create_task_group() as tg:

                    async def commit() -> None:
                        try:
                            await run.commit()
                        except apersist.BackendError as exc:
                            failed.append(exc)

                    tg.start_soon(commit)
                    await wait_until(lambda: driver.held >= 1, what="the commit's uploads")
                    # After the cut, before the failure: accepted, for the next commit.
                    table["a"] = 3
                    table["b"] = 3
                    assert table._dirty == {"a": b'["a",3]', "b": b'["b",3]'}
                    faulty[0].fail_next("put", "permanent", key="writers/*/commits/*")
                    gate.set()
                assert len(failed) == 1
                # Keys changed before the failure as well as new ones: all refused.
                for key in ("a", "b", "c"):
                    with pytest.raises(apersist.BackendError):
                        table[key] = 4
                with pytest.raises(apersist.BackendError):
                    del table["a"]
                assert dict(table) == {"a": 3, "b": 3}
                assert table._dirty == {}
    assert await table_state(backend, "t") == {"a": 1}


@pytest.mark.parametrize("bad", [object(), {1, 2}, math.nan, [math.inf], {"x": -math.inf}])
async def test_a_refused_value_leaves_the_table_and_the_pending_state_as_they_were(
        bad: Any) -> None:
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("inventory")
        table["a"] = 1
        await run.commit()
        table["b"] = 2  # pending
        stats, dirty = run.stats, dict(table._dirty or {})
        for key in ("a", "b", "c"):
            with pytest.raises(TypeError, match="inventory"):
                table[key] = bad
        assert dict(table) == {"a": 1, "b": 2}
        assert table._dirty == dirty
        assert run.stats == stats
    assert await table_state(backend, "inventory") == {"a": 1, "b": 2}


async def test_a_value_too_large_leaves_the_pending_state_as_it_was(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apersist._values, "MAX_JSON_BYTES", 1_000)
    async with apersist.run(apersist.Config(apersist.Backend.memory(),
                                            snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        table["a"] = 1
        stats = run.stats
        for value in ("u" * 1_000, [7] * 500):  # with a "u" in the record, and without
            with pytest.raises(ValueError, match=r"too large.*table 't'"):
                table["a"] = value
        assert run.stats == stats
        assert dict(table) == {"a": 1}


@pytest.mark.parametrize("value", [None, [None, 1.5], {"null": "null"}, "nul", [0.0, -0.0]])
async def test_values_that_look_like_nan_are_stored(value: Any) -> None:
    """The quick look for orjson's NaN (a "null" in the text) lets every JSON value by."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        table = await run.table("t")
        table["null"] = value
    assert await table_state(backend, "t") == {"null": value}


async def test_a_write_marks_the_consumer_of_its_context() -> None:
    """A source sets ``CONSUMER`` for the task it hands a live event to; the table's
    writes count on it (``_barrier.Consumer``)."""
    consumer = Consumer(None)
    token = CONSUMER.set(consumer)
    try:
        await _write_as_consumer(consumer)
    finally:
        CONSUMER.reset(token)


async def _write_as_consumer(consumer: Consumer) -> None:
    async with apersist.run(apersist.Config(apersist.Backend.memory())) as run:
        table = await run.table("t")
        table["a"] = 1
        table["a"] = 2
        del table["a"]
        assert consumer.writes == 3
        with pytest.raises(TypeError):
            table["b"] = object()
        with pytest.raises(KeyError):
            del table["b"]
        assert consumer.writes == 3  # refused writes change no state


@pytest.mark.parametrize("access", [apersist.SnapshotAccess.REPLAY,
                                    apersist.SnapshotAccess.OFFSETS_ONLY])
async def test_where_tables_are_not_persisted_writes_record_nothing(
        access: apersist.SnapshotAccess) -> None:
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        (await run.table("t"))["kept"] = 1
    async with apersist.run(apersist.Config(backend, snapshot_access=access)) as run:
        table = await run.table("t")
        table["a"] = 1
        table["a"] = 2
        del table["a"]
        assert table._dirty is None
        assert run.stats["deltas_recorded"] == 0
        assert (await run.commit()).deltas == 0
    with pytest.raises(RuntimeError, match="run has ended"):
        table["a"] = 3
    assert await table_state(backend, "t") == {"kept": 1}


async def test_a_record_reset_commit_holds_the_tables_changes() -> None:
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        (await run.table("t")).update({"old": 1, "gone": 1})
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.RECORD,
                          snapshot_interval_ms=QUIET)
    async with apersist.run(cfg) as run:
        table = await run.table("t")
        assert dict(table) == {}
        table["new"] = 1
        table["new"] = 2
        assert (await run.commit()).deltas == 1
    assert await table_state(backend, "t") == {"new": 2}


class _Name(str):
    """A str subclass: a key like any other."""


@pytest.mark.parametrize("key", [1, None, 1.5, True, b"k", ("a",), object()])
@pytest.mark.parametrize("value", [1, object()], ids=["value", "bad-value"])
@pytest.mark.parametrize("mode", [apersist.PersistenceMode.PERSISTING,
                                  apersist.PersistenceMode.UDF_CACHING])
async def test_a_key_that_is_not_a_str_is_refused_and_changes_nothing(
        key: Any, value: Any, mode: apersist.PersistenceMode) -> None:
    """The key's type is judged from the record (only a str key's starts with '["'), or
    before the value's error when orjson refuses the record: the message is the key's,
    in every mode, and the table and its pending changes are as they were."""
    async with apersist.run(apersist.Config(apersist.Backend.memory(), persistence_mode=mode,
                                            snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        table["a"] = 1
        dirty = dict(table._dirty or {})
        with pytest.raises(TypeError, match=r"table 't' keys must be str: got="):
            table[key] = value
        assert dict(table) == {"a": 1}
        assert (table._dirty or {}) == dirty
        table[_Name("b")] = 2
        assert dict(table) == {"a": 1, "b": 2}


async def test_a_snapshot_holds_the_changes_since_the_last_cut_deletions_included() -> None:
    """Writes keep their record in the cut's changes only; the cut folds them into the
    records a snapshot is made of, and takes out the keys deleted since (set, deleted and
    set again, new and deleted), in the same commit as the snapshot and in later ones."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        table.update({"a": 1, "b": 1, "c": 1, "d": 1})
        await run.commit()
        del table["a"]
        table["b"] = 2
        del table["c"]
        table["c"] = 3
        table["e"] = 1
        del table["e"]
        table.request_compaction()
        await run.commit()
        assert await table_state(backend, "t") == {"b": 2, "c": 3, "d": 1}
        table["a"] = 4
        del table["d"]
        table.request_compaction()
        await run.commit()
        assert sorted(orjson.loads(r) for r in table._records.values()) == [
            ["a", 4], ["b", 2], ["c", 3]]
    assert await table_state(backend, "t") == {"a": 4, "b": 2, "c": 3}
