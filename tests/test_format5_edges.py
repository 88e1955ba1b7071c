"""Hostile review of storage format 5.0: compressed segments, inline commits and the
concurrent opening of a store. Each test here failed on ``main`` before its fix (or is an
``xfail(strict=True)`` describing a defect left open)."""

from __future__ import annotations

import asyncio
import struct
import threading
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard

import apersist
from apersist import CorruptDataError
from apersist import _format as fmt
from apersist._cache import _entry_key
from apersist._concurrency import gather_bounded
from apersist._drivers import open_driver
from apersist._gc import collect_garbage
from apersist._inspect import verify
from apersist._maintenance import FANOUT
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


# ----------------------------------------------------------------------------- damaged bodies


def _row(i: int) -> bytes:
    return orjson.dumps({"i": i, "pad": "x" * 20})


def _framed(records: list[bytes]) -> bytearray:
    body = bytearray()
    for value in records:
        fmt.append_record(body, value, b"", 1)
    return body


async def _store_with_body(body: bytes, count: int) -> tuple[apersist.Backend, str]:
    """A memory store whose one stream segment holds ``body`` (framed records) compressed,
    with every checksum outside the records (zstd frame, body, trailer, commit record) as
    a writer computes it. Returns the store and the segment's key."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=3_600_000)) as run:
        for i in range(count):
            await run.stream("s").record({"i": i, "pad": "x" * 20})
    (key,) = [k for k in backend.objects if k.endswith(".seg")]
    old = backend.objects[key]
    frame = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(body)
    new = fmt.encode_segment(fmt.SegmentMeta(key, fmt.KIND_EVENTS, "s"), frame, count, "zstd")
    backend.objects[key] = new
    (commit,) = [k for k in backend.objects
                 if fmt.key_kind(k) == "commit" and key.encode() in backend.objects[k]]
    record = orjson.loads(backend.objects[commit])["body"]
    for item in record["segments"]:
        if item["key"] == key:
            assert item["size"] == len(old)
            item["size"] = len(new)
    backend.objects[commit] = _rechecked(record)
    return backend, key


async def _replayed(backend: apersist.Backend) -> list[Any]:
    async with apersist.run(apersist.Config(
            backend, snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
        return [e.value async for e in run.stream("s").replay()]


async def _verified(backend: apersist.Backend) -> list[str]:
    driver = open_driver(backend)
    try:
        return await verify(driver)
    finally:
        await driver.aclose()


@pytest.mark.usefixtures("segment_objects")
@pytest.mark.parametrize("bad", [b'{"i": 1   ', b"NaN"])
async def test_a_record_whose_json_does_not_decode_is_corrupt_data(bad: bytes) -> None:
    """A compressed body's records are covered by its frame's checksum, never checked one
    by one: a record whose framing (and record CRC) holds but whose JSON does not (a
    writer's bug, or damage under recomputed checksums) escaped replay and ``apersist
    verify`` as orjson's ``JSONDecodeError`` (verify crashed instead of reporting), not
    ``CorruptDataError`` naming the key and the record's offset."""
    records = [_row(i) for i in range(200)]
    records[100] = bad
    backend, key = await _store_with_body(bytes(_framed(records)), 200)
    at = len(_framed(records[:100]))
    with pytest.raises(CorruptDataError, match=f"key={key} offset={at}$"):
        await _replayed(backend)
    problems = await _verified(backend)
    assert len(problems) == 1
    assert f"key={key} offset={at}" in problems[0]


@pytest.mark.usefixtures("segment_objects")
async def test_a_frame_that_decompresses_to_damaged_record_framing_is_corrupt_data() -> None:
    """Held on main (a guard): a valid zstd frame whose first record's length runs past
    the body is refused naming the key, at replay and by verify; nothing is replayed."""
    records = [_row(i) for i in range(50)]
    body = _framed(records)
    struct.pack_into("<I", body, 0, len(body))  # the first record's value length
    backend, key = await _store_with_body(bytes(body), 50)
    with pytest.raises(CorruptDataError, match=f"key={key} offset="):
        await _replayed(backend)
    problems = await _verified(backend)
    assert len(problems) == 1
    assert f"key={key}" in problems[0]


async def _store_with_record(kind: str, name: str, write: Callable[[apersist.Run], Awaitable[None]],
                             bad: bytes, index: int = 2) -> tuple[apersist.Backend, str, int]:
    """A memory store whose one segment of ``kind`` and ``name`` (written by ``write``, raw)
    holds record ``index`` replaced by ``bad``, every checksum as a writer computes it.
    Returns the store, the segment's key and the bad record's offset."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=3_600_000,
                                            compression=None)) as run:
        await write(run)
    driver = open_driver(backend)
    try:
        store = Store(driver, clock_ms=lambda: 0)
        await store.load()
        (seg,) = store.segments(kind, name)
        ref = seg.ref
        view = await store.read_segment(ref)
        records = [value for value, _o, _t in view.records()]
    finally:
        await driver.aclose()
    records[index] = bad
    body = _framed(records)
    new = fmt.encode_segment(fmt.SegmentMeta(ref.key, kind, name), body, len(records))
    backend.objects[ref.key] = new
    assert ref.home is None
    for key in [k for k in backend.objects if fmt.key_kind(k) in ("commit", "checkpoint")]:
        text = backend.objects[key]
        if ref.key.encode() in text:
            body_ = orjson.loads(text)["body"]
            raw = orjson.dumps(body_).replace(b'"size":%d' % ref.size, b'"size":%d' % len(new))
            raw = raw.replace(b'"%s",%d,%d' % (ref.key.encode(), ref.records, ref.size),
                              b'"%s",%d,%d' % (ref.key.encode(), ref.records, len(new)))
            backend.objects[key] = _rechecked(orjson.loads(raw))
    (meta_len,) = struct.unpack_from("<I", new, 12)
    body_start = 16 + meta_len + 4  # after the header frame and its CRC
    return backend, ref.key, body_start + len(_framed(records[:index]))


async def _table_store_with_record(bad: bytes, *, snapshot: bool
                                   ) -> tuple[apersist.Backend, str, int]:
    """``_store_with_record`` for table ``t`` of five keys, its deltas or its snapshot."""
    async def write(run: apersist.Run) -> None:
        table = await run.table("t")
        for i in range(5):
            table[f"k{i}"] = i
        if snapshot:
            await run.compact()
    kind = fmt.KIND_TABLE_SNAPSHOT if snapshot else fmt.KIND_TABLE
    return await _store_with_record(kind, "t", write, bad)


@pytest.mark.usefixtures("segment_objects")
@pytest.mark.parametrize("snapshot", [False, True], ids=["delta", "snapshot"])
@pytest.mark.parametrize("bad", [b"NaN", b'"ab"', b'["k2",2,3]', b"[1,2]"])
async def test_a_table_record_of_another_shape_is_corrupt_data(bad: bytes, snapshot: bool) -> None:
    """A table record must be ``[key, value]`` (or ``[key]``, a delta's deletion). One that
    did not decode escaped as orjson's error; one of another shape was taken as data: the
    string "ab" set key "a" to "b", ``["k2", 2, 3]`` deleted k2, ``[1, 2]`` set key 1."""
    backend, key, at = await _table_store_with_record(bad, snapshot=snapshot)
    with pytest.raises(CorruptDataError, match=f"table record .* key={key} offset={at}$"):
        async with apersist.run(apersist.Config(
                backend, snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
            dict(await run.table("t"))


@apersist.cached(name="edges.square")
def _square(x: int) -> int:
    return x * x


async def _cache_store_with_record(bad: bytes) -> tuple[apersist.Backend, str, int]:
    """``_store_with_record`` for the cache: five entries of ``_square``, the third ``bad``."""
    async def write(run: apersist.Run) -> None:
        for i in range(5):
            _square(i)
    return await _store_with_record(fmt.KIND_CACHE, fmt.CACHE_LOG, write, bad)


@pytest.mark.usefixtures("segment_objects")
@pytest.mark.parametrize("bad", [b"NaN", b'"ab"', b'["k" ,1,2]', b"[1,2]", b'[" x",'])
async def test_a_cache_record_of_another_shape_is_corrupt_data(bad: bytes) -> None:
    """A cache record must be ``[key, result]``: one that did not decode escaped from the
    open as orjson's ``JSONDecodeError``, and one of another shape as a ``ValueError`` of
    unpacking. Both are corruption, at the record's position, at the open that read it."""
    backend, key, at = await _cache_store_with_record(bad)
    with pytest.raises(CorruptDataError, match=f"cache record .* key={key} offset={at}$"):
        async with apersist.run(apersist.Config(
                backend, snapshot_access=apersist.SnapshotAccess.REPLAY)):
            pass


@pytest.mark.usefixtures("segment_objects")
async def test_a_cached_result_that_does_not_decode_is_corrupt_data_at_the_call() -> None:
    """A record of the right shape whose result is not JSON is kept undecoded at the open
    (results are sliced, not decoded); the call that read it raised orjson's
    ``JSONDecodeError``. It raises ``CorruptDataError`` naming the function and the entry,
    and the other entries still answer from the cache."""
    entry = _entry_key("edges.square", 1, (2,), {})
    backend, _key, _at = await _cache_store_with_record(b'["%s",{bad]' % entry.encode())
    async with apersist.run(apersist.Config(
            backend, snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
        assert _square(3) == 9
        with pytest.raises(CorruptDataError,
                           match=f"edges.square does not decode: entry={entry} .*apersist verify"):
            _square(2)
        assert run.stats["cache_hits"] == 2  # both found; the damaged one fails to decode


# ----------------------------------------------------------------------------- opening


class _GcDuringRead:
    """Forwards to ``inner``. The commit records a load reads wait until its newer-
    checkpoint question was answered ("no"); then a writer commits and checkpoints, and
    gc with no grace deletes the records that checkpoint folds, before any is read: what
    a busy writer and ``apersist gc --grace 0`` can do between any two requests."""

    def __init__(self, inner: Any, backend: apersist.Backend) -> None:
        self.inner, self.backend = inner, backend
        self.capabilities, self.name = inner.capabilities, inner.name
        self.asked, self.done = asyncio.Event(), asyncio.Event()
        self.armed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def list(self, prefix: str) -> Any:
        async def listing() -> Any:
            async for info in self.inner.list(prefix):
                yield info
            if prefix == fmt.checkpoints_prefix("0"):
                self.asked.set()
        return listing()

    async def get(self, key: str, **kwargs: Any) -> bytes:
        if fmt.key_kind(key) == "commit" and not self.done.is_set():
            if not self.armed:
                await self.done.wait()
            else:
                self.armed = False
                await self.asked.wait()
                async with apersist.run(apersist.Config(self.backend,
                                                        snapshot_interval_ms=3_600_000)) as run:
                    await run.stream("s").record(99, offset=99)
                    await run.commit()
                    await run._store.write_checkpoint()
                await collect_garbage(self.inner, grace_ms=0, now_ms=T0)
                self.done.set()
        data: bytes = await self.inner.get(key, **kwargs)
        return data


T0 = 1_800_000_000_000


@pytest.mark.usefixtures("segment_objects")
async def test_opening_beside_gc_with_no_grace_retries_when_records_vanish_after_the_question(
        ) -> None:
    """Opening reads the commit records after its checkpoint while it asks whether a newer
    checkpoint is listed; records that vanish (gc folded them into a newer checkpoint) mean
    "start again from that one". But the answer could come before the checkpoint was
    written: the records then vanished after a "no", and a healthy store failed to open
    with ``CorruptDataError: commit record vanished while opening``."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=3_600_000)) as run:
        for i in range(3):
            await run.stream("s").record(i, offset=i)
            await run.commit()
    inner = open_driver(backend)
    try:
        racing = _GcDuringRead(inner, backend)
        store = Store(racing, clock_ms=lambda: 0)  # type: ignore[arg-type]
        await store.load()
        assert racing.done.is_set()  # the race did happen
        assert store.checkpoint_seq == store.last_seq == 6
        assert [seg.ref.records for seg in store.segments(fmt.KIND_EVENTS, "s")] == [1, 1, 1, 1]
    finally:
        await inner.aclose()


class _MergeAndGcBeforeSegmentCheck:
    """Forwards to ``inner``. When a load checks its live segments (``sizes``), first a
    writer merges them (``compact``) and checkpoints, and gc with no grace deletes the
    segments merged away: between the load's reading of the records and its check."""

    def __init__(self, inner: Any, backend: apersist.Backend) -> None:
        self.inner, self.backend = inner, backend
        self.capabilities, self.name = inner.capabilities, inner.name
        self.armed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def sizes(self, keys: list[str]) -> dict[str, int]:
        if self.armed and any(fmt.key_kind(k) == "segment" for k in keys):
            self.armed = False
            async with apersist.run(apersist.Config(self.backend,
                                                    snapshot_interval_ms=3_600_000)) as run:
                await run.compact()
                await run._store.write_checkpoint()
            await collect_garbage(self.inner, grace_ms=0, now_ms=T0)
        found: dict[str, int] = await self.inner.sizes(keys)
        return found


@pytest.mark.usefixtures("segment_objects")
async def test_opening_beside_a_merge_and_gc_with_no_grace_starts_again() -> None:
    """The retry on a newer checkpoint covered only commit records that vanish: segments
    that a merge committed meanwhile moved out of the log, and that gc (no grace) then
    deleted, failed a healthy store's opening with ``CorruptDataError: commit names a
    missing segment``."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=3_600_000)) as run:
        for i in range(FANOUT):
            await run.stream("s").record(i, offset=i)
            await run.commit()
    inner = open_driver(backend)
    try:
        racing = _MergeAndGcBeforeSegmentCheck(inner, backend)
        store = Store(racing, clock_ms=lambda: 0)  # type: ignore[arg-type]
        await store.load()
        assert not racing.armed  # the race did happen
        (merged,) = store.segments(fmt.KIND_EVENTS, "s")
        assert merged.ref.records == FANOUT
    finally:
        await inner.aclose()
    async with apersist.run(apersist.Config(
            backend, snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
        assert [e.value async for e in run.stream("s").replay()] == list(range(FANOUT))


async def test_an_error_out_of_concurrent_opening_keeps_its_cause() -> None:
    """Opening runs the load, the epoch listing and the create-if-absent probe at once
    (``gather_bounded``), which raised the first failure ``from None``: that set the
    failure's own ``__cause__`` to None, so a ``BackendError`` lost the ``OSError`` (errno)
    behind it whenever two calls ran (a writer's opening of a root it cannot list:
    tests/campaigns/test_resource_faults.py failed or passed by timing)."""

    async def fails() -> None:
        try:
            raise PermissionError(13, "permission denied")
        except OSError as exc:
            raise apersist.BackendError("filesystem list failed: permission denied") from exc

    async def waits() -> None:
        await asyncio.sleep(1)

    with pytest.raises(apersist.BackendError) as caught:
        await gather_bounded([fails, waits], 2)
    assert isinstance(caught.value.__cause__, PermissionError)
    assert caught.value.__cause__.errno == 13
    assert not isinstance(caught.value.__context__, BaseExceptionGroup)

    backend = apersist.Backend.memory()
    driver = open_driver(backend)

    async def no_listing(prefix: str) -> Any:
        try:
            raise PermissionError(13, "permission denied")
        except OSError as exc:
            raise apersist.BackendError(f"list failed: prefix={prefix}") from exc
        yield  # an async generator, as list is

    driver.list = no_listing  # type: ignore[method-assign]
    with pytest.raises(apersist.BackendError) as caught:
        async with apersist.run(apersist.Config(backend), driver=driver):
            pass
    assert isinstance(caught.value.__cause__, PermissionError)
    await driver.aclose()
