"""Tables: deltas, rebuild on open, value checks, compaction bounding the open time."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pytest
from helpers import counting, table_state

import apersist
from apersist._table import load_table_state

QUIET = 60_000


async def test_set_and_delete_record_deltas_and_reopen_rebuilds_the_same_dict(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        counts = await run.table("counts")
        assert isinstance(counts, apersist.Table)
        assert isinstance(counts, MutableMapping)
        counts["alice"] = 3
        counts["bob"] = {"n": [1, 2]}
        counts["carol"] = None
        assert run.stats["deltas_recorded"] == 3
        del counts["bob"]
        counts["alice"] = 4
        # A commit persists each key's last change: a key changed again before the next
        # commit is still one delta.
        assert run.stats["deltas_recorded"] == 3
        assert run.stats["pending_deltas"] == 3
        expected = dict(counts)
    assert expected == {"alice": 4, "carol": None}
    async with apersist.run(apersist.Config(backend)) as run:
        counts = await run.table("counts")
        assert dict(counts) == expected
        counts["dave"] = 1
        del counts["carol"]
    assert await table_state(backend, "counts") == {"alice": 4, "dave": 1}


async def test_table_behaves_as_a_mutable_mapping(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        table = await run.table("t")
        assert len(table) == 0
        table.update({"a": 1, "b": 2})
        assert table.setdefault("c", 3) == 3
        assert table.pop("a") == 1
        assert table.get("zz", "dflt") == "dflt"
        assert "b" in table
        assert "a" not in table
        assert sorted(table) == ["b", "c"]
        assert len(table) == 2
        with pytest.raises(KeyError):
            del table["missing"]
        with pytest.raises(KeyError):
            table["missing"]
    assert await table_state(backend, "t") == {"b": 2, "c": 3}


async def test_table_returns_the_same_object_within_a_run(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        table = await run.table("t")
        assert await run.table("t") is table
        assert await run.table("u") is not table
        assert table.name == "t"


async def test_non_str_keys_raise_type_error(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        table = await run.table("t")
        table["ok"] = 1
        for key in (1, None, ("a",), b"bytes"):
            with pytest.raises(TypeError):
                table[key] = 1  # type: ignore[index]
        assert dict(table) == {"ok": 1}
    assert await table_state(backend, "t") == {"ok": 1}


@pytest.mark.parametrize("bad", [object(), {1, 2}, float("nan"), [float("inf")], b"raw"])
async def test_an_unserializable_value_raises_type_error_naming_the_table(
        backend: apersist.Backend, bad: Any) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("inventory")
        table["a"] = 1
        await run.commit()
        with pytest.raises(TypeError, match="inventory"):
            table["a"] = bad
        with pytest.raises(TypeError, match="inventory"):
            table["b"] = bad
        assert dict(table) == {"a": 1}
        table["c"] = 3
    assert await table_state(backend, "inventory") == {"a": 1, "c": 3}


@pytest.mark.parametrize("name", ["", "bad name", "-x", "a/b", "x" * 129])
async def test_invalid_table_names_raise_value_error(backend: apersist.Backend, name: str) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        with pytest.raises(ValueError, match="name"):
            await run.table(name)


async def test_compact_then_reopen_gives_the_same_state(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        for i in range(100):
            table[f"k{i % 10}"] = i
            if i % 3 == 0:
                del table[f"k{i % 10}"]
        before = dict(table)
        await run.compact()
        assert dict(table) == before
        table["after"] = "compaction"
        before["after"] = "compaction"
    assert await table_state(backend, "t") == before
    async with apersist.run(apersist.Config(backend)) as run:
        await run.compact()  # compacting an untouched table keeps it as it is
        assert dict(await run.table("t")) == before
    assert await table_state(backend, "t") == before


async def test_compacting_an_emptied_table_reopens_it_empty(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        table = await run.table("t")
        table["a"] = 1
        table["b"] = 2
        await run.commit()
        del table["a"]
        del table["b"]
        await run.compact()
    assert await table_state(backend, "t") == {}
    async with apersist.run(apersist.Config(backend)) as run:
        table = await run.table("t")
        assert dict(table) == {}
        table["c"] = 3
    assert await table_state(backend, "t") == {"c": 3}


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_compaction_bounds_what_reopening_reads(backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    async with apersist.run(cfg) as run:
        table = await run.table("t")
        for i in range(40):  # a long history: 40 commits of one delta each
            table[f"k{i % 4}"] = i
            await run.commit()
        await run.compact()
        table["late"] = 1
        await run.commit()
        table["later"] = 2
    expected = {"k0": 36, "k1": 37, "k2": 38, "k3": 39, "late": 1, "later": 2}

    reopen = apersist.Config(backend)
    async with counting(reopen) as driver, apersist.run(reopen, driver=driver) as run:
        driver.reset()
        table = await run.table("t")
        assert dict(table) == expected
        # One snapshot segment plus the two delta segments committed after it.
        assert driver.gets_of_segments() == 3, driver.keys
        state, deltas = await load_table_state(run._store, "t", run._store.last_seq)
        assert state == expected
        assert deltas == 2


async def test_without_compaction_reopening_reads_every_delta(backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    async with apersist.run(cfg) as run:
        table = await run.table("t")
        for i in range(10):
            table["k"] = i
            await run.commit()
    async with apersist.run(apersist.Config(backend)) as run:
        state, deltas = await load_table_state(run._store, "t", run._store.last_seq)
        assert state == {"k": 9}
        assert deltas == 10
        # compact() folds the tables this run has open (see the report on API.md).
        assert dict(await run.table("t")) == {"k": 9}
        await run.compact()
        state, deltas = await load_table_state(run._store, "t", run._store.last_seq)
        assert state == {"k": 9}
        assert deltas == 0


async def test_compaction_also_happens_on_its_own(backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    async with apersist.run(cfg) as run:
        table = await run.table("hot")
        for i in range(6_000):  # many deltas over a tiny state
            table["only"] = i
            if i % 500 == 499:
                await run.commit()
    async with apersist.run(apersist.Config(backend)) as run:
        state, deltas = await load_table_state(run._store, "hot", run._store.last_seq)
        assert state == {"only": 5_999}
        assert deltas < 4_096
        assert dict(await run.table("hot")) == {"only": 5_999}


async def test_deltas_after_compaction_in_the_same_run_are_kept(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        table = await run.table("t")
        table["a"] = 1
        await run.compact()
        table["a"] = 2
        table["b"] = 1
        await run.commit()
        del table["b"]
    assert await table_state(backend, "t") == {"a": 2}


async def test_compact_with_no_table_open_is_harmless(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        await run.compact()
        await run.stream("s").record(1)
        await run.compact()
    async with apersist.run(apersist.Config(backend)) as run:
        assert [e.value async for e in run.stream("s").replay()] == [1]


async def test_any_str_is_a_key(backend: apersist.Backend) -> None:
    keys = ["", " ", "ключ 🔑", "a/b", "x" * 1000, "null"]
    async with apersist.run(apersist.Config(backend)) as run:
        table = await run.table("t")
        for i, key in enumerate(keys):
            table[key] = {"i": i, "none": None}
    assert await table_state(backend, "t") == {key: {"i": i, "none": None}
                                               for i, key in enumerate(keys)}
