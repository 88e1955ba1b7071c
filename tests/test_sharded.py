"""Big tables and caches are held in parts, so none grows by copying all of itself at once.

CPython grows a dict by copying every entry in one C call (28 ms at 700k keys on the CI
VM): opening a million-key table stalled the event loop that long, whatever the pacing.
These tests check the structure that prevents it (no timing here: the stall itself is
measured by ``python -m benchmarks.state``), and that the mapping behaves as a dict does.
"""

from __future__ import annotations

from typing import Any

import pytest

import apersist
from apersist._sharded import MASK, ShardedDict
from apersist._table import load_table_state

QUIET = 60_000
KEYS = 20_000


def spread(parts: list[dict[str, Any]]) -> tuple[int, int]:
    sizes = [len(part) for part in parts]
    return min(sizes), max(sizes)


def test_it_behaves_as_a_mutable_mapping() -> None:
    d: ShardedDict[int] = ShardedDict()
    plain: dict[str, int] = {}
    for i in range(1000):
        d[f"k{i}"] = plain[f"k{i}"] = i
    for i in range(0, 1000, 3):
        del d[f"k{i}"]
        del plain[f"k{i}"]
    d["k1"] = plain["k1"] = -1
    assert len(d) == len(plain) == 666
    assert d == plain
    assert sorted(d) == sorted(plain)
    assert sorted(d.items()) == sorted(plain.items())
    assert sorted(d.values_list()) == sorted(plain.values())
    assert "k1" in d
    assert "k0" not in d
    assert d.get("k0") is None
    assert d.get("k0", 7) == 7
    assert d.get("k2") == 2
    assert d.pop("k2") == 2
    assert "k2" not in d
    with pytest.raises(KeyError):
        d["k0"]
    with pytest.raises(KeyError):
        del d["k0"]
    with pytest.raises(TypeError):
        [] in d  # noqa: B015 - unhashable, as a dict says
    d.clear()
    assert len(d) == 0
    assert list(d) == []


def test_keys_spread_over_every_part() -> None:
    d: ShardedDict[int] = ShardedDict()
    for i in range(64_000):
        d[f"user-{i:08d}"] = i
    assert len(d.parts) == MASK + 1
    low, high = spread(d.parts)
    # 1,000 a part on average; the str hash spreads them evenly.
    assert 800 < low <= high < 1200


async def test_a_table_opens_into_parts_with_its_records(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        for i in range(KEYS):
            table[f"k{i}"] = i
        await run.compact()
        for i in range(0, KEYS, 2):
            table[f"k{i}"] = -i  # deltas after the snapshot
        del table["k1"]
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        state, deltas = await load_table_state(run._store, "t", run._store.last_seq)
        assert deltas == KEYS // 2 + 1
        expected = {f"k{i}": (-i if i % 2 == 0 else i) for i in range(KEYS) if i != 1}
        assert state == expected
        assert state.records is not None
        assert len(state.records) == len(expected)
        low, high = spread(state.parts)
        assert low > 0
        assert high < 2 * KEYS // (MASK + 1)  # no part holds much of it
        table = await run.table("t")
        assert dict(table) == expected
        assert len(table) == len(expected)
        assert table.get("k1") is None
        assert table["k2"] == -2
        assert "k3" in table
        # Written and compacted from its parts, it reopens the same.
        table["k1"] = "back"
        await run.compact()
    async with apersist.run(apersist.Config(backend)) as run:
        assert dict(await run.table("t")) == {**expected, "k1": "back"}


async def test_the_cache_opens_into_parts(backend: apersist.Backend) -> None:
    calls = 0

    @apersist.cached
    def square(x: int) -> int:
        nonlocal calls
        calls += 1
        return x * x

    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)):
        assert [square(i) for i in range(2000)] == [i * i for i in range(2000)]
    async with apersist.run(apersist.Config(backend)) as run:
        entries = run._cache._entries
        assert isinstance(entries, ShardedDict)
        assert len(entries) == 2000
        assert spread(entries.parts)[0] > 0
        assert [square(i) for i in range(2000)] == [i * i for i in range(2000)]
    assert calls == 2000  # every call of the second run was a hit
