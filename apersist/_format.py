"""The on-storage format: object keys, segment framing, commit and epoch records.

A pure codec: nothing here awaits or touches storage. ``docs/format.md`` is the prose
version of this module; change both together and bump ``FORMAT_MINOR`` (compatible
additions) or ``FORMAT_MAJOR`` (readers must refuse) when the bytes change.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from ._errors import CorruptDataError, IncompatibleFormatError

__all__ = [
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "CommitRecord",
    "EpochRecord",
    "SegmentMeta",
    "SegmentRef",
]

FORMAT_MAJOR: Final = 1
FORMAT_MINOR: Final = 0

# The log kinds a segment can hold.
KIND_EVENTS: Final = "events"          # a stream's events
KIND_TABLE: Final = "table"            # a table's deltas: [key, value] upserts, [key] deletes
KIND_TABLE_SNAPSHOT: Final = "table-snapshot"  # a table's whole state as [key, value] records
KIND_CACHE: Final = "cache"            # @cached results: [entry key, result]
KINDS: Final = frozenset({KIND_EVENTS, KIND_TABLE, KIND_TABLE_SNAPSHOT, KIND_CACHE})

NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Zero-padded so that lexical key order is numeric order.
_ID_WIDTH: Final = 20

# --------------------------------------------------------------------------- keys
# Every key is made here. Everything of one writer lives under writers/<id>/ so that several
# writers (workers) can share a root later without a format break.


def writer_prefix(writer: str) -> str:
    return f"writers/{writer}/"


def epochs_prefix(writer: str) -> str:
    return f"writers/{writer}/epochs/"


def commits_prefix(writer: str) -> str:
    return f"writers/{writer}/commits/"


def segments_prefix(writer: str) -> str:
    return f"writers/{writer}/segments/"


def epoch_key(writer: str, epoch: int) -> str:
    return f"{epochs_prefix(writer)}{epoch:0{_ID_WIDTH}d}.json"


def commit_key(writer: str, seq: int) -> str:
    return f"{commits_prefix(writer)}{seq:0{_ID_WIDTH}d}.json"


def segment_key(writer: str, epoch: int, number: int) -> str:
    """A segment key that no other writer can produce: epochs are unique per store."""
    return f"{segments_prefix(writer)}{epoch:0{_ID_WIDTH}d}-{number:0{_ID_WIDTH}d}.seg"


_NUMBERED_RE: Final = re.compile(r"(\d{20})\.json")


def number_in_key(key: str, prefix: str) -> int | None:
    """The number in a commit or epoch key under ``prefix``; None for any other key."""
    match = _NUMBERED_RE.fullmatch(key[len(prefix):]) if key.startswith(prefix) else None
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- checked JSON
# Commit and epoch records are JSON documents {"body": {...}, "crc32": N} whose checksum
# covers the exact bytes of the body, so a reader can check them without re-serializing.
_BODY_HEAD: Final = b'{"body":'
_CRC_MARK: Final = b',"crc32":'


def _encode_checked(body: Mapping[str, Any]) -> bytes:
    raw = orjson.dumps(body)
    return b"%s%s%s%d}" % (_BODY_HEAD, raw, _CRC_MARK, zlib.crc32(raw))


def _decode_checked(key: str, data: bytes) -> dict[str, Any]:
    cut = data.rfind(_CRC_MARK)
    if not data.startswith(_BODY_HEAD) or cut < 0 or not data.endswith(b"}"):
        raise CorruptDataError(f"record is not a checked JSON document: key={key} offset=0 "
                               f"size={len(data)}")
    raw = data[len(_BODY_HEAD):cut]
    try:
        stored = int(data[cut + len(_CRC_MARK):-1])
    except ValueError:
        raise CorruptDataError(f"record checksum field is damaged: key={key} offset={cut}") from None
    if zlib.crc32(raw) != stored:
        raise CorruptDataError(f"record checksum mismatch: key={key} offset={len(_BODY_HEAD)} "
                               f"size={len(data)}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CorruptDataError(f"record body is not JSON: key={key} offset={len(_BODY_HEAD)}") from exc
    if not isinstance(body, dict):
        raise CorruptDataError(f"record body is not a JSON object: key={key} offset=0")
    _check_version(key, body.get("format"))
    return body


def _check_version(key: str, version: object) -> None:
    if (not isinstance(version, list) or len(version) != 2
            or not all(isinstance(v, int) for v in version)):
        raise CorruptDataError(f"record has no valid format version: key={key} offset=0")
    if version[0] > FORMAT_MAJOR:
        raise IncompatibleFormatError(
            f"store was written by a newer apersist format: key={key} "
            f"format={version[0]}.{version[1]} supported={FORMAT_MAJOR}.x")


def _field(key: str, body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise CorruptDataError(f"record field is missing or has the wrong type: key={key} "
                               f"offset=0 field={name}")
    return value


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class EpochRecord:
    """Proof that one writer took the writer role with this epoch number."""

    writer: str
    epoch: int
    time_ms: int
    token: str

    def encode(self) -> bytes:
        return _encode_checked({
            "format": [FORMAT_MAJOR, FORMAT_MINOR], "type": "epoch", "writer": self.writer,
            "epoch": self.epoch, "time_ms": self.time_ms, "token": self.token,
        })

    @classmethod
    def decode(cls, key: str, data: bytes) -> EpochRecord:
        body = _decode_checked(key, data)
        if body.get("type") != "epoch":
            raise CorruptDataError(f"object is not an epoch record: key={key} offset=0")
        return cls(_field(key, body, "writer", str), _field(key, body, "epoch", int),
                   _field(key, body, "time_ms", int), _field(key, body, "token", str))


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """A commit's reference to one segment: enough to find, size-check and verify it."""

    key: str
    kind: str
    name: str
    records: int
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "name": self.name,
                "records": self.records, "size": self.size}


@dataclass(frozen=True, slots=True)
class CommitRecord:
    """One atomic commit: the segments it adds and every stream's offset after it.

    ``reset`` marks the first commit of a new history (``SnapshotAccess.RECORD``): readers
    ignore every commit before it. ``offsets`` maps a stream name to its offset as JSON bytes.
    """

    writer: str
    seq: int
    epoch: int
    time_ms: int
    token: str
    reset: bool
    segments: tuple[SegmentRef, ...]
    offsets: Mapping[str, bytes]

    def encode(self) -> bytes:
        body = {
            "format": [FORMAT_MAJOR, FORMAT_MINOR], "type": "commit", "writer": self.writer,
            "seq": self.seq, "epoch": self.epoch, "time_ms": self.time_ms, "token": self.token,
            "reset": self.reset, "segments": [s.to_json() for s in self.segments],
            "offsets": {name: orjson.Fragment(raw) for name, raw in self.offsets.items()},
        }
        return _encode_checked(body)

    @classmethod
    def decode(cls, key: str, data: bytes) -> CommitRecord:
        body = _decode_checked(key, data)
        if body.get("type") != "commit":
            raise CorruptDataError(f"object is not a commit record: key={key} offset=0")
        refs = []
        for item in _field(key, body, "segments", list):
            if not isinstance(item, dict):
                raise CorruptDataError(f"commit names a malformed segment: key={key} offset=0")
            ref = SegmentRef(_field(key, item, "key", str), _field(key, item, "kind", str),
                             _field(key, item, "name", str), _field(key, item, "records", int),
                             _field(key, item, "size", int))
            if ref.kind not in KINDS:
                raise IncompatibleFormatError(f"commit names a segment of an unknown kind: "
                                              f"key={key} kind={ref.kind}")
            refs.append(ref)
        offsets = {name: orjson.dumps(value)
                   for name, value in _field(key, body, "offsets", dict).items()}
        return cls(_field(key, body, "writer", str), _field(key, body, "seq", int),
                   _field(key, body, "epoch", int), _field(key, body, "time_ms", int),
                   _field(key, body, "token", str), _field(key, body, "reset", bool),
                   tuple(refs), offsets)


# --------------------------------------------------------------------------- segments
# segment := header body trailer
# header  := MAGIC(8) major:u16 minor:u16 meta_len:u32 meta(JSON) header_crc:u32
# body    := record*
# record  := value_len:u32 offset_len:u32 time_ms:i64 value offset crc:u32
#            (crc covers the 16 header bytes, value and offset; offset_len 0 means no offset)
# trailer := count:u64 body_len:u64 body_crc:u32 trailer_crc:u32 END_MAGIC(4)
SEGMENT_MAGIC: Final = b"\x89APSEG\r\n"
SEGMENT_END: Final = b"APSE"
_HEAD: Final = struct.Struct("<8sHHI")
U32: Final = struct.Struct("<I")
RECORD_HEAD: Final = struct.Struct("<IIq")
_TRAILER: Final = struct.Struct("<QQII4s")
RECORD_OVERHEAD: Final = RECORD_HEAD.size + U32.size


def append_record(body: bytearray, value: bytes, offset: bytes, time_ms: int) -> int:
    """Frame one record onto ``body``; return the bytes added. ``offset=b""`` means none."""
    head = RECORD_HEAD.pack(len(value), len(offset), time_ms)
    crc = zlib.crc32(value, zlib.crc32(head))
    body += head
    body += value
    if offset:
        crc = zlib.crc32(offset, crc)
        body += offset
    body += U32.pack(crc)
    return RECORD_OVERHEAD + len(value) + len(offset)


@dataclass(frozen=True, slots=True)
class SegmentMeta:
    """What a segment says about itself; checked against the commit that names it."""

    key: str
    kind: str
    name: str


def encode_segment_head(meta: SegmentMeta) -> bytes:
    raw = orjson.dumps({"key": meta.key, "kind": meta.kind, "name": meta.name})
    head = _HEAD.pack(SEGMENT_MAGIC, FORMAT_MAJOR, FORMAT_MINOR, len(raw)) + raw
    return head + U32.pack(zlib.crc32(head))


def encode_segment_trailer(count: int, body: bytes | bytearray) -> bytes:
    fields = struct.pack("<QQI", count, len(body), zlib.crc32(body))
    return fields + U32.pack(zlib.crc32(fields)) + SEGMENT_END


def encode_segment(meta: SegmentMeta, body: bytes | bytearray, count: int) -> bytes:
    """Build a whole segment around a body of framed records (see ``append_record``)."""
    return b"".join((encode_segment_head(meta), body, encode_segment_trailer(count, body)))


class SegmentView:
    """A checked, in-memory segment whose records can be iterated lazily.

    Construction verifies the header, the trailer and the body checksum, so a torn or
    corrupted segment is refused before a single record is handed out.
    """

    __slots__ = ("_body_end", "_body_start", "_data", "count", "key", "meta")

    def __init__(self, ref: SegmentRef, data: bytes) -> None:
        key = ref.key
        self.key = key
        self._data = data
        if len(data) != ref.size:
            raise CorruptDataError(f"segment size differs from its commit: key={key} "
                                   f"offset={min(len(data), ref.size)} size={len(data)} "
                                   f"expected={ref.size}")
        if len(data) < _HEAD.size + U32.size + _TRAILER.size:
            raise CorruptDataError(f"segment is truncated: key={key} offset={len(data)}")
        magic, major, minor, meta_len = _HEAD.unpack_from(data, 0)
        if magic != SEGMENT_MAGIC:
            raise CorruptDataError(f"segment magic is wrong: key={key} offset=0")
        head_end = _HEAD.size + meta_len
        if head_end + U32.size + _TRAILER.size > len(data):
            raise CorruptDataError(f"segment header length is damaged: key={key} offset=12")
        (head_crc,) = U32.unpack_from(data, head_end)
        if zlib.crc32(memoryview(data)[:head_end]) != head_crc:
            raise CorruptDataError(f"segment header checksum mismatch: key={key} offset={head_end}")
        # The version is trusted only once the header checksum holds, so a damaged version field
        # is corruption, not a "newer format". The header frame (magic, version, meta_len, meta,
        # crc) is therefore the same in every major version.
        if major > FORMAT_MAJOR:
            raise IncompatibleFormatError(f"segment was written by a newer apersist format: "
                                          f"key={key} format={major}.{minor}")
        meta = orjson.loads(data[_HEAD.size:head_end])
        self.meta = SegmentMeta(meta.get("key"), meta.get("kind"), meta.get("name"))
        if self.meta != SegmentMeta(key, ref.kind, ref.name):
            raise CorruptDataError(f"segment belongs elsewhere: key={key} offset={_HEAD.size} "
                                   f"holds={self.meta.key}")
        trailer_at = len(data) - _TRAILER.size
        count, body_len, body_crc, trailer_crc, end = _TRAILER.unpack_from(data, trailer_at)
        if end != SEGMENT_END or zlib.crc32(data[trailer_at:trailer_at + 20]) != trailer_crc:
            raise CorruptDataError(f"segment trailer is damaged or missing: key={key} "
                                   f"offset={trailer_at}")
        self._body_start = head_end + U32.size
        self._body_end = trailer_at
        if body_len != self._body_end - self._body_start or count != ref.records:
            raise CorruptDataError(f"segment length or count differs from its trailer: key={key} "
                                   f"offset={trailer_at} records={count} expected={ref.records}")
        self.count = count
        if zlib.crc32(memoryview(data)[self._body_start:self._body_end]) != body_crc:
            self._raise_at_first_damaged_record()
            raise CorruptDataError(f"segment body checksum mismatch: key={key} "
                                   f"offset={self._body_start}")

    def _raise_at_first_damaged_record(self) -> None:
        """Walk the records checking each CRC; raise naming the first damaged one's offset."""
        data, pos, end, key = self._data, self._body_start, self._body_end, self.key
        unpack, head_size = RECORD_HEAD.unpack_from, RECORD_HEAD.size
        seen = 0
        while pos < end:
            if pos + RECORD_OVERHEAD > end:
                raise CorruptDataError(f"segment record header is truncated: key={key} offset={pos}")
            vlen, olen, _time_ms = unpack(data, pos)
            vstart = pos + head_size
            oend = vstart + vlen + olen
            if oend + 4 > end:
                raise CorruptDataError(f"segment record length is damaged: key={key} offset={pos}")
            view = memoryview(data)
            crc = zlib.crc32(view[vstart:oend], zlib.crc32(view[pos:vstart]))
            if crc != U32.unpack_from(data, oend)[0]:
                raise CorruptDataError(f"segment record checksum mismatch: key={key} "
                                       f"offset={pos}")
            pos = oend + 4
            seen += 1
        if seen != self.count:
            raise CorruptDataError(f"segment record count differs from its trailer: key={key} "
                                   f"offset={pos} records={seen} expected={self.count}")

    def records(self) -> Iterator[tuple[bytes, bytes | None, int]]:
        """Yield (value JSON, offset JSON or None, time_ms) for each record, in order.

        The body checksum already held (see ``__init__``), so the framing is the writer's:
        this loop only walks it. It is the hot path of replay.
        """
        data, pos, end = self._data, self._body_start, self._body_end
        unpack, head_size = RECORD_HEAD.unpack_from, RECORD_HEAD.size
        while pos < end:
            vlen, olen, time_ms = unpack(data, pos)
            vstart = pos + head_size
            vend = vstart + vlen
            if olen:
                pos = vend + olen
                yield data[vstart:vend], data[vend:pos], time_ms
            else:
                pos = vend
                yield data[vstart:vend], None, time_ms
            pos += 4
        if pos != end:
            raise CorruptDataError(f"segment records overrun the body: key={self.key} offset={end}")

    def columns(self, limit: int) -> Iterator[tuple[list[bytes], list[bytes | None] | None,
                                                     list[int]]]:
        """The records in chunks of up to ``limit``: (values, offsets, times) as parallel lists.

        ``offsets`` is None for a chunk with no offset at all. The same walk as ``records()``,
        for a caller that decodes a chunk at a time (replay) rather than a record at a time.
        """
        data, pos, end = self._data, self._body_start, self._body_end
        unpack, head_size = RECORD_HEAD.unpack_from, RECORD_HEAD.size
        left = self.count  # checked against the commit and the trailer
        while left:
            size = min(limit, left)
            left -= size
            values: list[bytes] = []
            times: list[int] = []
            offsets: list[bytes | None] | None = None
            add_value, add_time = values.append, times.append
            try:
                for index in range(size):
                    vlen, olen, time_ms = unpack(data, pos)
                    pos += head_size
                    add_value(data[pos:pos + vlen])
                    add_time(time_ms)
                    pos += vlen
                    if olen:
                        if offsets is None:
                            offsets = [None] * index
                        offsets.append(data[pos:pos + olen])
                        pos += olen
                    elif offsets is not None:
                        offsets.append(None)
                    pos += 4
            except struct.error:  # framing that runs off the end of the object
                raise CorruptDataError(f"segment records overrun the body: key={self.key} "
                                       f"offset={end}") from None
            if pos > end:  # a count that the framing does not bear out: never hand it out
                break
            yield values, offsets, times
        if pos != end:
            raise CorruptDataError(f"segment records overrun the body: key={self.key} offset={end}")
