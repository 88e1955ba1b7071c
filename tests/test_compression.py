"""Compressed segments (format 5.0): what is stored, what reads back, and what is refused.

A segment's body is stored as one zstd frame when that makes it smaller (``Config.
compression``, on by default); its header's ``codec`` says so. Every read path must give
back exactly what was recorded, whichever way each segment was stored, and damage to a
compressed body must surface as ``CorruptDataError`` naming the key and the body's offset,
never as wrong data.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from helpers import stored_objects, values

import apersist
from apersist import _compression as compression
from apersist import _format as fmt
from apersist import _maintenance as maintenance
from apersist._cli import main
from apersist._errors import CorruptDataError

# Their subject is segment bodies as stored: every commit uploads its segments as objects
# (a small one would otherwise carry them inline in its record, tests/test_inline_commits.py).
pytestmark = pytest.mark.usefixtures("segment_objects")

_HEAD = struct.Struct("<8sHHI")
_TRAILER_SIZE = 28


def pathway_row(i: int) -> dict[str, Any]:
    """The 1M-row Pathway job's rows (benchmarks/job.py)."""
    return {"k": i % 1000, "v": i, "s": "abc"}


def segment_parts(data: bytes) -> tuple[dict[str, Any], int, bytes]:
    """(meta, where the stored body starts, the stored body) of a segment's bytes."""
    (meta_len,) = struct.unpack_from("<I", data, 12)
    meta = orjson.loads(data[_HEAD.size:_HEAD.size + meta_len])
    start = _HEAD.size + meta_len + 4
    return meta, start, data[start:len(data) - _TRAILER_SIZE]


async def segments(backend: apersist.Backend) -> dict[str, bytes]:
    return {k: d for k, d in (await stored_objects(backend)).items() if k.endswith(".seg")}


async def record_rows(backend: apersist.Backend, first: int, n: int, **config: Any) -> None:
    """Record rows ``first`` to ``first + n``, committed once, at the run's end."""
    config.setdefault("snapshot_interval_ms", 3_600_000)
    async with apersist.run(apersist.Config(backend, **config)) as run:
        stream = run.stream("rows")
        for i in range(first, first + n):
            await stream.record(pathway_row(i), offset=i)


# ----------------------------------------------------------------------------- round trips


async def test_a_compressed_store_round_trips_on_every_backend(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("rows")
        for i in range(3000):
            await stream.record(pathway_row(i), offset=i)
        table = await run.table("t")
        for i in range(200):
            table[f"key-{i}"] = {"n": i, "pad": "x" * 20}
    stored = await segments(backend)
    codecs = [segment_parts(data)[0].get("codec") for data in stored.values()]
    assert "zstd" in codecs
    async with apersist.run(apersist.Config(backend,
                                            snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
        events = [e async for e in run.stream("rows").replay()]
        assert [e.value for e in events] == [pathway_row(i) for i in range(3000)]
        assert [e.offset for e in events] == list(range(3000))
        assert dict(await run.table("t")) == {f"key-{i}": {"n": i, "pad": "x" * 20}
                                              for i in range(200)}


async def test_a_tiny_body_is_stored_raw() -> None:
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream("s").record(1)
    (data,) = (await segments(backend)).values()
    meta, _start, body = segment_parts(data)
    assert "codec" not in meta
    assert len(body) < compression.MIN_COMPRESS_BYTES
    assert await values(backend, "s") == [1]


def test_a_body_that_does_not_shrink_is_stored_raw() -> None:
    incompressible = os.urandom(4096)  # a frame of it would be bigger than it
    assert compression.compress_body(incompressible, compression.DEFAULT) == (None, None)
    assert compression.compress_body(b"x" * 4096, compression.RAW) == (None, None)
    stored, codec = compression.compress_body(b"x" * 4096, compression.DEFAULT)
    assert codec == "zstd"
    assert stored is not None
    assert len(stored) < 100


async def test_compression_none_stores_every_body_raw() -> None:
    backend = apersist.Backend.memory()
    await record_rows(backend, 0, 2000, compression=None)
    stored = await segments(backend)
    assert stored
    assert all("codec" not in segment_parts(d)[0] for d in stored.values())
    assert all(d[8:12] == struct.pack("<HH", 5, 0) for d in stored.values())  # still 5.0
    assert await values(backend, "rows") == [pathway_row(i) for i in range(2000)]


@pytest.mark.parametrize(("first", "then"), [(None, "zstd"), ("zstd", None)])
async def test_a_store_written_one_way_then_the_other_replays_everything(
        first: str | None, then: str | None) -> None:
    backend = apersist.Backend.memory()
    await record_rows(backend, 0, 1500, compression=first)
    await record_rows(backend, 1500, 1500, compression=then)
    codecs = {segment_parts(d)[0].get("codec") for d in (await segments(backend)).values()}
    assert codecs == {None, "zstd"}
    assert await values(backend, "rows") == [pathway_row(i) for i in range(3000)]
    # Merging the mixed segments decompresses what must be, and compresses anew.
    async with apersist.run(apersist.Config(backend, compression=then or first)) as run:
        await run.compact()
    assert await values(backend, "rows") == [pathway_row(i) for i in range(3000)]


async def test_merged_segments_are_compressed_anew() -> None:
    backend = apersist.Backend.memory()
    for part in range(maintenance.FANOUT):  # as many small segments as one merge takes
        await record_rows(backend, part * 100, 100)
    before = await segments(backend)
    async with apersist.run(apersist.Config(backend)) as run:
        await run.compact()
    after = await segments(backend)
    merged = [d for k, d in after.items() if k not in before]
    assert merged
    assert all(segment_parts(d)[0].get("codec") == "zstd" for d in merged)
    n = 100 * maintenance.FANOUT
    (data,) = merged  # the old ones stay until apersist gc collects them
    assert struct.unpack_from("<Q", data, len(data) - _TRAILER_SIZE)[0] == n
    assert await values(backend, "rows") == [pathway_row(i) for i in range(n)]


async def test_bytes_per_event_of_the_pathway_rows_stay_small(tmp_path: Path) -> None:
    """A real store on disk: the Pathway job's rows take at most 10 bytes an event (raw
    framing takes 38). The benchmark suite (``python -m benchmarks``, "Compression") is
    the measurement; this only guards against losing the compression."""
    backend = apersist.Backend.filesystem(tmp_path / "store")
    n = 100_000
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("rows")
        for i in range(n):
            await stream.record(pathway_row(i), offset=i)
    stored = sum(p.stat().st_size for p in (tmp_path / "store").rglob("*.seg"))
    assert stored / n <= 10, f"{stored / n:.2f} bytes per event"


# ----------------------------------------------------------------------------- damage


def compressed_segment(records: int = 400) -> tuple[fmt.SegmentRef, bytes, bytes]:
    """(ref, segment, raw body) of a segment whose body is stored compressed."""
    key = fmt.segment_key("0", 1, 1)
    body = bytearray()
    for i in range(records):
        fmt.append_record(body, orjson.dumps(pathway_row(i)), b"%d" % i, 1000 + i)
    stored, codec = compression.compress_body(body, compression.DEFAULT)
    assert stored is not None
    assert codec == "zstd"
    data = fmt.encode_segment(fmt.SegmentMeta(key, fmt.KIND_EVENTS, "rows"), stored, records,
                              codec)
    return fmt.SegmentRef(key, fmt.KIND_EVENTS, "rows", records, len(data)), data, bytes(body)


def with_stored_body(data: bytes, stored: bytes) -> bytes:
    """``data`` with its stored body replaced and the trailer made to match: damage that
    the body's CRC cannot catch (as if written so), left to decompression to find."""
    (meta_len,) = struct.unpack_from("<I", data, 12)
    head = data[:_HEAD.size + meta_len + 4]
    (count,) = struct.unpack_from("<Q", data, len(data) - _TRAILER_SIZE)
    return head + stored + fmt.encode_segment_trailer(count, stored)


def test_a_compressed_segment_reads_as_its_records() -> None:
    ref, data, raw = compressed_segment()
    view = fmt.SegmentView(ref, data)
    assert view.codec == "zstd"
    assert view.raw_bytes == len(raw) > view.stored_bytes
    assert bytes(view.body()) == raw
    assert [orjson.loads(v) for v, _o, _t in view.records()] == [pathway_row(i)
                                                                 for i in range(400)]


def test_a_flipped_byte_in_a_compressed_body_is_caught_by_its_crc() -> None:
    ref, data, _raw = compressed_segment()
    _meta, start, stored = segment_parts(data)
    damaged = bytearray(data)
    damaged[start + len(stored) // 2] ^= 0x01
    with pytest.raises(CorruptDataError, match=f"checksum mismatch: key={ref.key} offset={start}"):
        fmt.SegmentView(ref, bytes(damaged))


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_damaged_frame_whose_crc_holds_is_refused(where: str) -> None:
    ref, data, _raw = compressed_segment()
    _meta, start, stored = segment_parts(data)
    at = {"start": 5, "middle": len(stored) // 2, "end": len(stored) - 2}[where]
    flipped = bytearray(stored)
    flipped[at] ^= 0x40
    bad = with_stored_body(data, bytes(flipped))
    ref = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records, len(bad))
    with pytest.raises(CorruptDataError, match=f"key={ref.key} offset={start}"):
        list(fmt.SegmentView(ref, bad).frames())


def test_a_truncated_frame_is_refused() -> None:
    ref, data, _raw = compressed_segment()
    _meta, start, stored = segment_parts(data)
    bad = with_stored_body(data, stored[:len(stored) // 2])
    ref = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records, len(bad))
    with pytest.raises(CorruptDataError, match=f"key={ref.key} offset={start}"):
        fmt.SegmentView(ref, bad)


def test_bytes_after_the_frame_are_refused() -> None:
    ref, data, _raw = compressed_segment()
    _meta, start, stored = segment_parts(data)
    bad = with_stored_body(data, stored + b"\x00" * 8)
    ref = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records, len(bad))
    with pytest.raises(CorruptDataError, match=f"key={ref.key} offset={start}"):
        fmt.SegmentView(ref, bad)


def _with_content_size(frame: bytes, size: int) -> bytes:
    """``frame`` with its header's content size field rewritten to ``size`` (same width)."""
    descriptor = frame[4]
    width = {0: 1 if descriptor & 0x20 else 0, 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    at = 5 + (0 if descriptor & 0x20 else 1) + {0: 0, 1: 1, 2: 2, 3: 4}[descriptor & 3]
    value = size - 256 if width == 2 else size
    return frame[:at] + value.to_bytes(width, "little") + frame[at + width:]


@pytest.mark.parametrize("lie", [-1, +1])
def test_a_frame_whose_content_size_lies_is_refused(lie: int) -> None:
    ref, data, raw = compressed_segment()
    _meta, start, stored = segment_parts(data)
    bad = with_stored_body(data, _with_content_size(stored, len(raw) + lie))
    assert zstandard.frame_content_size(segment_parts(bad)[2]) == len(raw) + lie
    ref = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records, len(bad))
    with pytest.raises(CorruptDataError, match=f"key={ref.key} offset={start}"):
        list(fmt.SegmentView(ref, bad).frames())


def test_a_frame_without_its_content_size_is_refused() -> None:
    ref, data, raw = compressed_segment()
    _meta, start, _stored = segment_parts(data)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    bad = with_stored_body(data, unsized)
    ref = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records, len(bad))
    with pytest.raises(CorruptDataError, match=f"does not declare its size: key={ref.key} "
                                               f"offset={start}"):
        fmt.SegmentView(ref, bad)


def test_a_decompression_bomb_is_refused_before_it_is_expanded() -> None:
    """A real bomb: some KiB that declare (and would expand to) more than a GiB of zeros."""
    size = compression.MAX_BODY_BYTES + (1 << 20)
    writer = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=size)
    zeros = bytes(1 << 20)
    bomb = b"".join(writer.compress(zeros) for _ in range(size >> 20)) + writer.flush()
    assert len(bomb) < 1 << 20
    assert zstandard.frame_content_size(bomb) == size
    ref, data, _raw = compressed_segment()
    _meta, start, _stored = segment_parts(data)
    bad = with_stored_body(data, bomb)
    ref = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records, len(bad))
    with pytest.raises(CorruptDataError, match=f"implausible size: key={ref.key} offset={start}"):
        fmt.SegmentView(ref, bad)


def test_an_unknown_codec_is_refused() -> None:
    ref, data, _raw = compressed_segment()
    _meta, _start, stored = segment_parts(data)
    head = fmt.encode_segment_head(fmt.SegmentMeta(ref.key, ref.kind, ref.name), "lzma")
    bad = head + stored + data[len(data) - _TRAILER_SIZE:]
    ref = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records, len(bad))
    with pytest.raises(CorruptDataError, match=f"codec is unknown: key={ref.key}"):
        fmt.SegmentView(ref, bad)


async def test_a_damaged_compressed_segment_is_corrupt_data_at_replay(tmp_path: Path) -> None:
    backend = apersist.Backend.filesystem(tmp_path / "store")
    await record_rows(backend, 0, 2000)
    key, data = next(iter((await segments(backend)).items()))
    _meta, start, stored = segment_parts(data)
    damaged = bytearray(data)
    damaged[start + len(stored) // 3] ^= 0x10
    (tmp_path / "store" / key).write_bytes(bytes(damaged))
    with pytest.raises(apersist.CorruptDataError, match=f"key={key} offset={start}"):
        await values(backend, "rows")


def test_salvage_loses_a_damaged_compressed_segment_whole_and_keeps_the_others(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    source = tmp_path / "source"
    backend = apersist.Backend.filesystem(source)
    for part in range(3):
        asyncio.run(record_rows(backend, part * 1000, 1000))
    keys = sorted(asyncio.run(segments(backend)))
    assert len(keys) == 3
    data = (source / keys[1]).read_bytes()
    _meta, _start, stored = segment_parts(data)
    # Damage the frame and make the trailer match, so that only decompression can tell.
    flipped = bytearray(stored)
    flipped[len(stored) // 2] ^= 0x40
    (source / keys[1]).write_bytes(with_stored_body(data, bytes(flipped)))
    assert main(["verify", str(source)]) == 1
    capsys.readouterr()
    dest = tmp_path / "dest"
    assert main(["salvage", str(source), str(dest), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    rows = doc["streams"]["rows"]
    assert rows["kept"] == 1000
    assert rows["lost"] == 2000
    (damage,) = rows["damage"]
    assert damage["key"] == keys[1]
    assert "lost whole" in damage["message"]
    assert f"key={keys[1]}" in damage["message"]
    salvaged = apersist.Backend.filesystem(dest)
    assert asyncio.run(values(salvaged, "rows")) == [pathway_row(i) for i in range(1000)]
    # The salvaged store is written compressed too.
    assert any(segment_parts(d)[0].get("codec") == "zstd"
               for d in asyncio.run(segments(salvaged)).values())


# ----------------------------------------------------------------------------- configuration


def test_config_defaults_to_zstd_level_3() -> None:
    config = apersist.Config(apersist.Backend.memory())
    assert (config.compression, config.compression_level) == ("zstd", 3)
    off = apersist.Config(apersist.Backend.memory(), compression=None)
    assert off.compression is None


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"compression": "lz4"}, ValueError, "compression must be one of \\['zstd'\\] or None"),
    ({"compression": "ZSTD"}, ValueError, "compression='ZSTD'"),
    ({"compression": 1}, TypeError, "compression must be a str or None: got=int"),
    ({"compression_level": 0}, ValueError, "compression_level must be from 1 to 22"),
    ({"compression_level": 23}, ValueError, "compression_level=23"),
    ({"compression_level": 3.0}, TypeError, "compression_level must be an int"),
    ({"compression_level": True}, TypeError, "compression_level must be an int"),
])
def test_config_refuses_an_unknown_codec_or_level(kwargs: dict[str, Any], error: type[Exception],
                                                  message: str) -> None:
    with pytest.raises(error, match=message):
        apersist.Config(apersist.Backend.memory(), **kwargs)


@pytest.mark.parametrize("level", [1, 19])
async def test_every_level_reads_back(level: int) -> None:
    backend = apersist.Backend.memory()
    await record_rows(backend, 0, 1000, compression_level=level)
    assert await values(backend, "rows") == [pathway_row(i) for i in range(1000)]


@pytest.mark.parametrize(("rows", "merged"), [(250, 3), (1000, 0)])
async def test_a_merge_is_bounded_by_raw_bytes_not_by_stored_ones(rows: int, merged: int) -> None:
    """Merges are planned on stored sizes, which compression makes many times smaller than
    the records: a merged segment must still hold at most ``max_segment_bytes`` of raw
    records (so readers never meet bodies beyond what writers cut), and a group that would
    not merge into fewer segments is left alone rather than rewritten again and again."""
    backend = apersist.Backend.memory()
    max_bytes = 64 << 10  # 250 rows: about 10 KiB raw; 1000: about 38 KiB
    for part in range(maintenance.FANOUT):
        await record_rows(backend, part * rows, rows, max_segment_bytes=max_bytes)
    before = await segments(backend)
    async with apersist.run(apersist.Config(backend, max_segment_bytes=max_bytes)) as run:
        await run.compact()
    new = {k: d for k, d in (await segments(backend)).items() if k not in before}
    assert len(new) == merged
    for key, data in new.items():
        (count,) = struct.unpack_from("<Q", data, len(data) - _TRAILER_SIZE)
        view = fmt.SegmentView(fmt.SegmentRef(key, fmt.KIND_EVENTS, "rows", count, len(data)), data)
        assert view.raw_bytes <= max_bytes
    n = rows * maintenance.FANOUT
    assert await values(backend, "rows") == [pathway_row(i) for i in range(n)]


def test_a_high_levels_compressor_is_not_kept_by_the_thread_that_used_it() -> None:
    """A compressor keeps the working memory of the biggest body it compressed (137 MiB
    at level 22 after 8 MiB), and one was kept per level in every thread that compressed:
    up to gigabytes across anyio's worker threads. Levels above ``MAX_KEPT_LEVEL`` make
    one per body; lower ones (cheap, and on the commit path) are still kept."""
    body = b"".join(orjson.dumps({"i": i, "s": "abc" * (i % 7)}) for i in range(2_000))
    high = compression.MAX_KEPT_LEVEL + 1

    def kept_after(level: int) -> tuple[set[int], bytes | None]:
        stored, _codec = compression.compress_body(body, compression.Compression("zstd", level))
        return set(getattr(compression._local, "compressors", {})), stored

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        low_kept, _ = pool.submit(kept_after, 3).result()
        high_kept, stored = pool.submit(kept_after, high).result()
    assert low_kept == high_kept == {3}
    assert stored is not None
    assert compression.decompress_body("k", 0, "zstd", stored) == body
