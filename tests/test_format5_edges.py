"""Hostile review of storage format 5.0: compressed segments, inline commits and the
concurrent opening of a store. Each test here failed on ``main`` before its fix (or is an
``xfail(strict=True)`` describing a defect left open)."""

from __future__ import annotations

import threading
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

import apersist
from apersist import CorruptDataError
from apersist import _format as fmt
from apersist._drivers import open_driver
from apersist._salvage import salvage
from apersist._store import Store

# ----------------------------------------------------------------------------- compression


@pytest.mark.usefixtures("segment_objects")
async def test_a_small_segment_that_decompresses_big_is_checked_off_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a segment is checked in a worker thread was judged by its stored size: a
    segment of repetitive records (about 7 KiB stored for 7.5 MiB of records, under the
    32 KiB "compressed" threshold) was decompressed on the event loop's thread, stalling it
    as a 7.5 MiB raw segment (which goes to a thread) never would."""
    checked: list[tuple[int, int, bool]] = []
    original = fmt.SegmentView.__init__

    def spy(self: fmt.SegmentView, ref: fmt.SegmentRef, data: bytes) -> None:
        original(self, ref, data)
        checked.append((len(data), self.raw_bytes,
                        threading.current_thread() is threading.main_thread()))

    monkeypatch.setattr(fmt.SegmentView, "__init__", spy)
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=3_600_000)) as run:
        stream = run.stream("s")
        for _ in range(300_000):
            await stream.record({"a": "same" * 4})
    async with apersist.run(apersist.Config(
            backend, snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
        count = sum([1 async for _ in run.stream("s").replay()])
    assert count == 300_000
    big = [c for c in checked if c[1] > 1 << 20]
    assert big, checked
    assert all(stored < 32 << 10 for stored, _raw, _on_loop in big), checked  # a small object
    assert not any(on_loop for _stored, _raw, on_loop in big), checked


# ----------------------------------------------------------------------------- inline commits


def _rechecked(body: dict[str, Any]) -> bytes:
    raw = orjson.dumps(body)
    return b'{"body":%s,"crc32":%d}' % (raw, zlib.crc32(raw))


async def _three_small_commits(backend: apersist.Backend) -> list[str]:
    """Three inline commits of one event each to stream ``s``; their record keys."""
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=3_600_000,
                                            compression=None)) as run:
        first = run._store.last_seq + 1
        for i in range(3):
            await run.stream("s").record(i, offset=i)
            await run.commit()
    return [fmt.commit_key("0", seq) for seq in range(first, first + 3)]


@pytest.mark.parametrize("how", ["instead", "beside"])
async def test_a_commit_carrying_an_earlier_commits_segment_again_is_corruption(
        backend: apersist.Backend, how: str) -> None:
    """The second commit's record is edited (checksum recomputed) to carry the first
    commit's inline segment, key and data, instead of or beside its own. Each record
    passed its checks, and the log held the one segment twice: its event was replayed
    twice, as data ([0, 0, 2] or [0, 1, 0, 2])."""
    first, second, _third = await _three_small_commits(backend)
    driver = open_driver(backend)
    try:
        bodies = {k: orjson.loads(await driver.get(k))["body"] for k in (first, second)}
        (carried,) = bodies[first]["segments"]
        assert "data" in carried  # inline
        if how == "instead":
            bodies[second]["segments"] = [dict(carried)]
        else:
            bodies[second]["segments"].append(dict(carried))
        await driver.put(second, _rechecked(bodies[second]))
        with pytest.raises(CorruptDataError, match=f"key={second} offset=0 .*"
                                                   f"segment={carried['key']}"):
            await Store(driver, clock_ms=lambda: 0).load()
    finally:
        await driver.aclose()
    with pytest.raises(CorruptDataError, match=f"key={second} offset=0"):
        async with apersist.run(apersist.Config(
                backend, snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
            [e.value async for e in run.stream("s").replay()]


async def test_salvage_stops_at_a_commit_carrying_an_earlier_commits_segment_again(
        tmp_path: Path) -> None:
    """Salvage walks a log that a run refuses commit by commit: it folded the record that
    names the first commit's segment again and copied that event twice ([0, 0, 2])."""
    backend = apersist.Backend.filesystem(tmp_path / "store")
    first, second, _third = await _three_small_commits(backend)
    driver = open_driver(backend)
    try:
        bodies = {k: orjson.loads(await driver.get(k))["body"] for k in (first, second)}
        bodies[second]["segments"] = [dict(bodies[first]["segments"][0])]
        await driver.put(second, _rechecked(bodies[second]))
    finally:
        await driver.aclose()
    dest = apersist.Backend.filesystem(tmp_path / "salvaged")
    source, target = open_driver(backend), open_driver(dest)
    try:
        report = await salvage(source, target)
    finally:
        await source.aclose()
        await target.aclose()
    assert report.lost
    async with apersist.run(apersist.Config(
            dest, snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
        assert [e.value async for e in run.stream("s").replay()] == [0]
