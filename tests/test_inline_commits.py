"""A small commit is one object (issue 17, item 4; format 5.0).

A commit whose new segments hold at most ``fmt.INLINE_BYTES`` carries them inline in its
record (``data``, base64): one create-if-absent request on every backend, one new file on
the filesystem. The segments keep their keys as their identity; their bytes live in the
record (``SegmentRef.home``). Bigger commits upload their segments first, as before. These
tests count requests per commit, replay mixed logs after reopening, fold inline segments
into a checkpoint, check that gc keeps the records that carry live segments (and collects
them once a merge moved the segments out), read such stores with salvage, dump and verify,
and refuse damaged inline data.
"""

from __future__ import annotations

import base64
import dataclasses
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import counting, driver_of, replayed, stored_objects, table_state

import apersist
from apersist import CorruptDataError
from apersist import _format as fmt
from apersist._cli import main
from apersist._gc import collect_garbage
from apersist._inspect import verify
from apersist._maintenance import FANOUT
from apersist._recover import open_readable
from apersist._salvage import salvage
from apersist._store import Store

QUIET = 3_600_000  # only our commit() calls commit
REPLAY = apersist.SnapshotAccess.REPLAY
T0 = 1_800_000_000_000
BIG = "x" * (fmt.INLINE_BYTES + 1000)  # one event bigger than the inline bound


def _cfg(backend: apersist.Backend, **kwargs: Any) -> apersist.Config:
    # Bodies stored raw unless a test says otherwise: the bound is on stored bytes, and
    # these tests size their segments in raw bytes (zstd would shrink BIG to nothing).
    kwargs.setdefault("compression", None)
    return apersist.Config(backend, snapshot_interval_ms=QUIET, **kwargs)


async def _opened(backend: apersist.Backend) -> Store:
    async with driver_of(backend) as driver:
        store = Store(driver, clock_ms=lambda: 0)
        await store.load()
        return store


def _refs(store: Store) -> list[fmt.SegmentRef]:
    return [seg.ref for kind in sorted(fmt.KINDS) for name in store.log_names(kind)
            for seg in store.segments(kind, name)]


def _segment_objects(objects: dict[str, bytes]) -> list[str]:
    return [key for key in objects if fmt.key_kind(key) == "segment"]


# --------------------------------------------------------------------------- requests


async def test_a_small_commit_is_one_request_and_one_new_object(backend: apersist.Backend) -> None:
    cfg = _cfg(backend)
    async with counting(cfg) as driver, apersist.run(cfg, driver=driver) as run:
        stream, table = run.stream("orders"), await run.table("counts")
        for n in range(3):
            before = set(await stored_objects(backend))
            driver.reset()
            await stream.record({"n": n}, offset=n)
            table[f"k{n}"] = n
            await run.commit()
            # Two segments (the stream's and the table's), one request: the record.
            assert dict(driver.calls) == {"put": 1}, driver.keys
            (_verb, key), = driver.keys
            assert fmt.key_kind(key) == "commit"
            assert set(await stored_objects(backend)) - before == {key}
    store = await _opened(backend)
    refs = _refs(store)
    assert refs
    assert all(ref.inline for ref in refs)
    assert not _segment_objects(await stored_objects(backend))
    assert [e.value for e in await replayed(backend, "orders")] == [{"n": n} for n in range(3)]
    assert await table_state(backend, "counts") == {"k0": 0, "k1": 1, "k2": 2}


async def test_a_big_commit_uploads_its_segments_then_the_record(backend: apersist.Backend) -> None:
    cfg = _cfg(backend)
    async with counting(cfg) as driver, apersist.run(cfg, driver=driver) as run:
        driver.reset()
        await run.stream("big").record(BIG)
        await run.stream("small").record("s")
        await run.commit()
        puts = [key for verb, key in driver.keys if verb == "put"]
    # Over the bound, every new segment of the commit is an object: none goes inline.
    assert [fmt.key_kind(key) for key in puts] == ["segment", "segment", "commit"]
    store = await _opened(backend)
    assert not any(ref.inline for ref in _refs(store))
    assert [e.value for e in await replayed(backend, "big")] == [BIG]


def test_the_bound_counts_the_commits_segments_together() -> None:
    """Just at the bound a commit is inline; a byte over, it is not."""
    async def commit_of(total: int) -> fmt.CommitRecord:
        backend = apersist.Backend.memory()
        async with apersist.run(_cfg(backend)) as run:
            # One event whose segment is ``total`` bytes: the framing is a fixed overhead.
            stream = run.stream("s")
            await stream.record("")
            await run.commit()
            overhead = run._store.segments(fmt.KIND_EVENTS, "s")[0].ref.size
            await stream.record("y" * (total - overhead))
            await run.commit()
            key = fmt.commit_key("0", run._store.last_seq)
        return fmt.CommitRecord.decode(key, backend.objects[key])

    import anyio
    assert anyio.run(commit_of, fmt.INLINE_BYTES).segments[0].inline
    assert not anyio.run(commit_of, fmt.INLINE_BYTES + 1).segments[0].inline


# --------------------------------------------------------------------------- replay


async def _mixed_history(backend: apersist.Backend) -> tuple[list[Any], dict[str, Any]]:
    """Commits small (inline) and big (objects), for a stream, a table and the cache."""
    calls: list[int] = []

    @apersist.cached(name="double")
    def double(n: int) -> int:
        calls.append(n)
        return 2 * n

    expected: list[Any] = []
    state: dict[str, Any] = {}
    async with apersist.run(_cfg(backend)) as run:
        stream, table = run.stream("s"), await run.table("t")
        for i in range(12):
            value: Any = BIG + str(i) if i % 4 == 3 else {"i": i}
            await stream.record(value, offset=i)
            expected.append(value)
            table[f"k{i % 5}"] = i
            state[f"k{i % 5}"] = i
            double(i)
            await run.commit()
    assert len(calls) == 12
    return expected, state


async def test_replay_after_reopen_mixes_inline_and_object_segments(
        backend: apersist.Backend) -> None:
    expected, state = await _mixed_history(backend)
    store = await _opened(backend)
    inline = [ref.inline for ref in _refs(store)]
    assert any(inline)
    assert not all(inline)
    events = await replayed(backend, "s")
    assert [e.value for e in events] == expected
    assert [e.offset for e in events] == list(range(12))
    assert await table_state(backend, "t") == state
    calls: list[int] = []

    @apersist.cached(name="double")
    def double(n: int) -> int:
        calls.append(n)
        return 2 * n

    async with apersist.run(_cfg(backend)):
        assert [double(i) for i in range(12)] == [2 * i for i in range(12)]
    assert calls == []  # every result came back from the store


async def test_replay_right_after_opening_reads_no_record_again(backend: apersist.Backend) -> None:
    """Opening reads the commit records after the checkpoint; their inline segments are
    kept (bounded), so replaying them costs no request."""
    async with apersist.run(_cfg(backend)) as run:
        for i in range(5):
            await run.stream("s").record(i)
            await run.commit()
    cfg = apersist.Config(backend, snapshot_access=REPLAY)
    async with counting(cfg) as driver, apersist.run(cfg, driver=driver) as run:
        driver.reset()
        assert [e.value async for e in run.stream("s").replay()] == list(range(5))
        assert driver.requests == 0, driver.keys
        # A second replay reads the records that carry the segments (one GET each).
        assert [e.value async for e in run.stream("s").replay()] == list(range(5))
        assert {fmt.key_kind(key) for _, key in driver.keys} == {"commit"}


async def test_a_checkpoint_folds_inline_segments_and_the_store_reopens(
        backend: apersist.Backend) -> None:
    async with apersist.run(_cfg(backend)) as run:
        for i in range(4):
            await run.stream("s").record(i, offset=i)
            await run.commit()
        assert await run._store.write_checkpoint() == run._store.last_seq
        await run.stream("s").record(4, offset=4)
        await run.commit()
    objects = await stored_objects(backend)
    (ckpt_key,) = [k for k in objects if fmt.key_kind(k) == "checkpoint"]
    body = orjson.loads(objects[ckpt_key])["body"]
    (log,) = body["logs"]
    # [seq, key, records, size, 1]: the 5th item marks a segment carried by commit seq.
    assert all(len(entry) == 5 and entry[4] == 1 for entry in log["segments"])
    ckpt = fmt.Checkpoint.decode(ckpt_key, objects[ckpt_key])
    for seq, ref in ckpt.logs[(fmt.KIND_EVENTS, "s")]:
        assert ref.home == fmt.commit_key("0", seq)
    assert [(e.value, e.offset) for e in await replayed(backend, "s")] == [
        (i, i) for i in range(5)]


# --------------------------------------------------------------------------- gc


async def _small_commits(backend: apersist.Backend, start: int, count: int) -> None:
    async with apersist.run(_cfg(backend)) as run:
        for i in range(start, start + count):
            await run.stream("s").record(i, offset=i)
            await run.commit()
        await run._store.write_checkpoint()


async def test_gc_keeps_the_records_of_live_inline_segments_and_collects_them_after_a_merge(
        backend: apersist.Backend) -> None:
    # Fewer segments than a merge takes: they stay inline, in their commits' records.
    await _small_commits(backend, 0, FANOUT - 1)
    store = await _opened(backend)
    homes = {ref.home for ref in _refs(store)}
    assert len(homes) == FANOUT - 1
    assert store.checkpoint_seq == store.last_seq
    async with driver_of(backend) as driver:
        plan = await collect_garbage(driver, grace_ms=0, now_ms=T0)
    assert not homes & set(plan.due)
    objects = await stored_objects(backend)
    assert homes <= set(objects)  # each carries a live segment: its only copy
    assert [e.value for e in await replayed(backend, "s")] == list(range(FANOUT - 1))
    # One more makes FANOUT: maintenance merges them (reading them from their records)
    # into a segment of its own; then their records are folded garbage like any other.
    async with apersist.run(_cfg(backend)) as run:
        await run.stream("s").record(FANOUT - 1, offset=FANOUT - 1)
        await run.commit()
        await run.compact()
        live = run._store.segments(fmt.KIND_EVENTS, "s")
        assert [seg.ref.inline for seg in live] == [False]
        fences = {fmt.commit_key("0", seq) for seq in run._store.fences}
    assert _segment_objects(await stored_objects(backend)) == [live[0].ref.key]
    async with driver_of(backend) as driver:
        plan = await collect_garbage(driver, grace_ms=0, now_ms=T0 + 1)
    assert homes - fences <= set(plan.due)
    assert not (homes - fences) & set(await stored_objects(backend))
    assert [(e.value, e.offset) for e in await replayed(backend, "s")] == [
        (i, i) for i in range(FANOUT)]


async def test_a_missing_record_that_carries_a_live_segment_is_corruption(
        backend: apersist.Backend) -> None:
    await _small_commits(backend, 0, 3)
    store = await _opened(backend)
    home = _refs(store)[1].home
    assert home is not None
    async with driver_of(backend) as driver:
        await driver.delete([home])
        with pytest.raises(CorruptDataError, match=f"key={home} offset=0"):
            await Store(driver, clock_ms=lambda: 0).load()


# --------------------------------------------------------------------------- tools


async def test_salvage_dump_and_verify_read_inline_segments(
        backend: apersist.Backend, tmp_path: Path) -> None:
    expected, state = await _mixed_history(backend)
    async with driver_of(backend) as driver:
        assert await verify(driver) == []
        opened = await open_readable(driver)
        assert not opened.damage
    dest = apersist.Backend.filesystem(tmp_path / "salvaged")
    async with driver_of(backend) as source, driver_of(dest) as target:
        report = await salvage(source, target)
    assert not report.lost
    assert [e.value for e in await replayed(dest, "s")] == expected
    assert await table_state(dest, "t") == state
    async with driver_of(dest) as driver:
        assert await verify(driver) == []


def test_the_command_line_reads_a_store_with_inline_segments(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import anyio
    root = tmp_path / "store"
    backend = apersist.Backend.filesystem(root)
    anyio.run(_small_commits, backend, 0, 3)
    assert main(["verify", str(root)]) == 0
    capsys.readouterr()
    assert main(["dump", str(root), "s"]) == 0
    assert [orjson.loads(line)["value"] for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")] == [0, 1, 2]
    assert main(["inspect", str(root), "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    store = anyio.run(_opened, backend)
    # The byte counts are the segments' own, wherever their bytes live.
    assert orjson.dumps(doc).count(b'"bytes":%d' % sum(ref.size for ref in _refs(store))) >= 1


# --------------------------------------------------------------------------- damage


def _segment(key: str, value: bytes = b'"v"') -> bytes:
    body = bytearray()
    fmt.append_record(body, value, b"", 1)
    return fmt.encode_segment(fmt.SegmentMeta(key, fmt.KIND_EVENTS, "s"), body, 1)


SEG_KEY = fmt.segment_key("0", 1, 1)
COMMIT_KEY = fmt.commit_key("0", 2)


def _record(data: bytes = b"") -> fmt.CommitRecord:
    data = data or _segment(SEG_KEY)
    ref = fmt.SegmentRef(SEG_KEY, fmt.KIND_EVENTS, "s", 1, len(data), COMMIT_KEY)
    return fmt.CommitRecord("0", 2, 1, T0, "t" * 32, False, (ref,), {}, inline={SEG_KEY: data})


def _rechecked(body: dict[str, Any]) -> bytes:
    raw = orjson.dumps(body)
    return b'{"body":%s,"crc32":%d}' % (raw, zlib.crc32(raw))


def test_an_inline_segment_round_trips_through_its_record() -> None:
    record = _record()
    decoded = fmt.CommitRecord.decode(COMMIT_KEY, record.encode())
    assert decoded == record
    assert decoded.segments[0].home == COMMIT_KEY
    view = fmt.SegmentView(decoded.segments[0], decoded.inline[SEG_KEY])
    assert [v for v, _, _ in view.records()] == [b'"v"']


@pytest.mark.parametrize("damage", ["not base64", "wrong size", "not a string"])
def test_damaged_inline_data_is_refused(damage: str) -> None:
    body = orjson.loads(_record().encode())["body"]
    item = body["segments"][0]
    if damage == "not base64":
        item["data"] = item["data"][:-4] + "!@#$"
    elif damage == "wrong size":
        item["data"] = base64.b64encode(_segment(SEG_KEY, b'"vv"')).decode()
    else:
        item["data"] = 12
    with pytest.raises(CorruptDataError, match=f"key={COMMIT_KEY} offset=0"):
        fmt.CommitRecord.decode(COMMIT_KEY, _rechecked(body))


def test_a_flipped_base64_character_is_caught_by_the_segment_checks() -> None:
    """The record's checksum catches a flip; under a recomputed one, the segment's own
    checks do: never data."""
    body = orjson.loads(_record().encode())["body"]
    text = body["segments"][0]["data"]
    at = len(text) // 2
    body["segments"][0]["data"] = text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1:]
    with pytest.raises(CorruptDataError):
        fmt.CommitRecord.decode(COMMIT_KEY, _rechecked(body)[:-3] + b"0}")
    decoded = fmt.CommitRecord.decode(COMMIT_KEY, _rechecked(body))
    with pytest.raises(CorruptDataError, match=f"key={SEG_KEY}"):
        fmt.SegmentView(decoded.segments[0], decoded.inline[SEG_KEY])


def test_inline_data_in_an_older_major_version_or_a_rewrite_is_corruption() -> None:
    body = orjson.loads(_record().encode())["body"]
    body["format"] = [4, 1]
    with pytest.raises(CorruptDataError, match=f"key={COMMIT_KEY} offset=0"):
        fmt.CommitRecord.decode(COMMIT_KEY, _rechecked(body))
    body = orjson.loads(_record().encode())["body"]
    item = dict(body["segments"][0])
    body["rewrites"] = [{"kind": fmt.KIND_EVENTS, "name": "s", "old": [SEG_KEY], "new": [item]}]
    with pytest.raises(CorruptDataError, match=f"key={COMMIT_KEY} offset=0"):
        fmt.CommitRecord.decode(COMMIT_KEY, _rechecked(body))


def test_a_checkpoints_inline_mark_is_checked() -> None:
    ref = fmt.SegmentRef(SEG_KEY, fmt.KIND_EVENTS, "s", 1, 40, COMMIT_KEY)
    ckpt = fmt.Checkpoint("0", 3, 1, T0, "t" * 32, 3, None, (1,), 1, {},
                          {(fmt.KIND_EVENTS, "s"): ((2, ref),)})
    key = fmt.checkpoint_key("0", 3)
    assert fmt.Checkpoint.decode(key, ckpt.encode()) == ckpt
    for entry in ([2, SEG_KEY, 1, 40, 2], [2, SEG_KEY, 1, 40, 1, 1]):
        body = orjson.loads(ckpt.encode())["body"]
        body["logs"][0]["segments"] = [entry]
        with pytest.raises(CorruptDataError, match=f"key={key} offset=0"):
            fmt.Checkpoint.decode(key, _rechecked(body))
    body = orjson.loads(ckpt.encode())["body"]
    body["format"] = [4, 1]
    with pytest.raises(CorruptDataError, match=f"key={key} offset=0"):
        fmt.Checkpoint.decode(key, _rechecked(body))


async def test_a_store_whose_inline_data_is_damaged_replays_nothing_of_it() -> None:
    backend = apersist.Backend.memory()
    async with apersist.run(_cfg(backend)) as run:
        await run.stream("s").record("a")
        await run.commit()
        key = fmt.commit_key("0", run._store.last_seq)
    body = orjson.loads(backend.objects[key])["body"]
    text = body["segments"][0]["data"]
    raw = bytearray(base64.b64decode(text))
    raw[-20] ^= 1  # in the body, under a checksum recomputed for the record
    body["segments"][0]["data"] = base64.b64encode(bytes(raw)).decode()
    backend.objects[key] = _rechecked(body)
    with pytest.raises(CorruptDataError, match=fmt.segment_key("0", 1, 1)):
        await replayed(backend, "s")
    async with driver_of(backend) as driver:
        problems = await verify(driver)
    assert len(problems) == 1
    assert fmt.segment_key("0", 1, 1) in problems[0]


def test_segment_refs_compare_with_their_home() -> None:
    ref = fmt.SegmentRef(SEG_KEY, fmt.KIND_EVENTS, "s", 1, 40)
    assert not ref.inline
    assert dataclasses.replace(ref, home=COMMIT_KEY).inline


async def test_the_bound_is_on_stored_bytes_so_compressed_segments_go_inline() -> None:
    """A commit of more raw bytes than the bound is one object when zstd shrinks it under."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        await run.stream("s").record_many([BIG, BIG])
        info = await run.commit()
        key = fmt.commit_key("0", info.seq)
        record = fmt.CommitRecord.decode(key, backend.objects[key])
    assert info.bytes < fmt.INLINE_BYTES < 2 * len(BIG)
    assert [ref.inline for ref in record.segments] == [True]
    assert [e.value for e in await replayed(backend, "s")] == [BIG, BIG]
