"""The on-storage format: object keys, segment framing, commit and epoch records.

A pure codec: nothing here awaits or touches storage. ``docs/format.md`` is the prose
version of this module; change both together and bump ``FORMAT_MINOR`` (compatible
additions) or ``FORMAT_MAJOR`` (readers must refuse) when the bytes change.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import itertools
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
import zstandard

from ._compression import decompress_body
from ._errors import CorruptDataError, IncompatibleFormatError

__all__ = [
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "Checkpoint",
    "CommitRecord",
    "EpochRecord",
    "Rewrite",
    "SegmentMeta",
    "SegmentRef",
    "WriterInfo",
]

FORMAT_MAJOR: Final = 5
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


#: The writer id of every store this version writes: one writer per root. The key layout
#: leaves room for more (``writers/<id>/``) without a format break.
WRITER: Final = "0"

#: The name of the one ``cache`` log of a writer (``@apersist.cached`` results).
CACHE_LOG: Final = "udf"


def writer_prefix(writer: str) -> str:
    return f"writers/{writer}/"


def epochs_prefix(writer: str) -> str:
    return f"writers/{writer}/epochs/"


def commits_prefix(writer: str) -> str:
    return f"writers/{writer}/commits/"


def segments_prefix(writer: str) -> str:
    return f"writers/{writer}/segments/"


def checkpoints_prefix(writer: str) -> str:
    return f"writers/{writer}/checkpoints/"


def checkpoint_key(writer: str, seq: int) -> str:
    """The checkpoint of the log folded up to commit ``seq``."""
    return f"{checkpoints_prefix(writer)}{seq:0{_ID_WIDTH}d}.json"


#: Keys are listed a *bucket* at a time: the keys whose number shares all digits but the
#: last three, so that a listing starts near the number wanted and returns at most
#: ``BUCKET`` keys, however long the history (every backend lists by prefix).
BUCKET: Final = 1000
_BUCKET_DIGITS: Final = _ID_WIDTH - 3


def commit_bucket_prefix(writer: str, bucket: int) -> str:
    """The prefix of the commit keys numbered ``bucket * BUCKET`` to ``bucket * BUCKET + 999``."""
    return f"{commits_prefix(writer)}{bucket:0{_BUCKET_DIGITS}d}"


def segment_bucket_prefix(writer: str, epoch: int, bucket: int) -> str:
    """The prefix of one epoch's segment keys numbered ``bucket * BUCKET`` to ``+ 999``."""
    return f"{segments_prefix(writer)}{epoch:0{_ID_WIDTH}d}-{bucket:0{_BUCKET_DIGITS}d}"


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


_SEGMENT_NAME_RE: Final = re.compile(r"(\d{20})-(\d{20})\.seg")


def parse_segment_key(key: str, writer: str) -> tuple[int, int] | None:
    """``(epoch, number)`` of a segment key of ``writer`` (``segment_key``'s inverse); None
    for any other key."""
    prefix = segments_prefix(writer)
    match = _SEGMENT_NAME_RE.fullmatch(key[len(prefix):]) if key.startswith(prefix) else None
    return (int(match.group(1)), int(match.group(2))) if match else None


#: What ``key_kind`` answers, by the folder under ``writers/<id>/``.
_KEY_KINDS: Final = {"segments": "segment", "commits": "commit", "epochs": "epoch",
                     "checkpoints": "checkpoint"}


def key_kind(key: str) -> str:
    """Which object a key names: ``segment``, ``commit``, ``epoch``, ``checkpoint`` or
    ``other``."""
    parts = key.split("/", 3)
    if len(parts) == 4 and parts[0] == "writers":
        return _KEY_KINDS.get(parts[2], "other")
    return "other"


def gc_marks_key(writer: str) -> str:
    """Where ``apersist gc`` notes, by its own clock, when it first saw each of this
    writer's segments as garbage (outside ``commits/``, ``epochs/`` and ``segments/``, so
    loading a store never lists it)."""
    return f"{writer_prefix(writer)}gc/marks.json"


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
class WriterInfo:
    """Who took the writer role with an epoch: what its epoch record says.

    ``host``, ``pid`` and ``label`` are None for an epoch record written before format 4.1,
    which did not record them. ``started_ms`` is the writer's clock when it took the role
    (the record's ``time_ms``), milliseconds since the Unix epoch.
    """

    epoch: int
    started_ms: int
    host: str | None = None
    pid: int | None = None
    label: str | None = None

    @property
    def known(self) -> bool:
        """Whether the epoch record names its writer (format 4.1 and later)."""
        return self.host is not None or self.pid is not None or self.label is not None

    def facts(self, prefix: str = "") -> str:
        """The writer as ``key=value`` facts for a message: host, pid, label (if any) and
        started, each key after ``prefix``; ``host=unknown pid=unknown`` for a record that
        predates writer identities."""
        parts = [("host", "unknown" if self.host is None else self.host),
                 ("pid", "unknown" if self.pid is None else self.pid)]
        if self.label is not None:
            parts.append(("label", self.label))
        parts.append(("started", format_time_ms(self.started_ms)))
        return " ".join(f"{prefix}{name}={value}" for name, value in parts)

    def to_json(self) -> dict[str, Any]:
        """The ``writer`` entry of ``apersist inspect --json``."""
        return {"epoch": self.epoch, "host": self.host, "pid": self.pid, "label": self.label,
                "started": format_time_ms(self.started_ms), "started_ms": self.started_ms}


def format_time_ms(time_ms: int) -> str:
    """``time_ms`` (ms since the Unix epoch) as ISO 8601 UTC with milliseconds, for people."""
    try:
        moment = datetime.datetime.fromtimestamp(time_ms / 1000, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{time_ms}ms"  # a clock reading no calendar holds: shown as it is
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{time_ms % 1000:03d}Z"


# Format 4.1 epoch records name their writer: host, pid and an optional label. Each field
# is optional when read, so that records of 4.0 and before (which lack them) still load.
_IDENTITY_FIELDS: Final = (("host", str), ("pid", int), ("label", str))


@dataclass(frozen=True, slots=True)
class EpochRecord:
    """Proof that one writer took the writer role with this epoch number, and (format 4.1
    on) who that writer is: ``host``, ``pid`` and ``label`` (None when not recorded)."""

    writer: str
    epoch: int
    time_ms: int
    token: str
    host: str | None = None
    pid: int | None = None
    label: str | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "format": [FORMAT_MAJOR, FORMAT_MINOR], "type": "epoch", "writer": self.writer,
            "epoch": self.epoch, "time_ms": self.time_ms, "token": self.token,
        }
        for name, _kind in _IDENTITY_FIELDS:
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return _encode_checked(body)

    @classmethod
    def decode(cls, key: str, data: bytes) -> EpochRecord:
        body = _decode_checked(key, data)
        if body.get("type") != "epoch":
            raise CorruptDataError(f"object is not an epoch record: key={key} offset=0")
        identity = {name: None if body.get(name) is None else _field(key, body, name, kind)
                    for name, kind in _IDENTITY_FIELDS}
        return cls(_field(key, body, "writer", str), _field(key, body, "epoch", int),
                   _field(key, body, "time_ms", int), _field(key, body, "token", str),
                   **identity)

    def writer_info(self) -> WriterInfo:
        """Who took the writer role with this record."""
        return WriterInfo(self.epoch, self.time_ms, self.host, self.pid, self.label)


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """A commit's reference to one segment: enough to find, size-check and verify it.

    ``key`` is the segment's identity (its meta names it; rewrites and checkpoints refer to
    it by it). ``home`` says where its bytes live: None for an object of its own under
    ``key``, else the key of the commit record that holds them inline (format 5.0: a small
    commit is one object, ``INLINE_BYTES``); no object is ever written under ``key`` then.
    """

    key: str
    kind: str
    name: str
    records: int
    size: int
    home: str | None = None

    @property
    def inline(self) -> bool:
        """Whether the segment's bytes live in a commit record (``home``)."""
        return self.home is not None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "name": self.name,
                "records": self.records, "size": self.size}


#: A commit whose new segments hold at most this many bytes in all carries them inline in
#: its record (format 5.0), so that it is one create-if-absent request (one new file on the
#: filesystem) instead of one per segment plus the record. Base64 makes them a third bigger
#: in the record, and reading one decodes the whole record on the event loop: at 32 KiB
#: that is a few hundred microseconds (under the loop's ~1 ms budget per step; 128 KiB
#: took over 1 ms), while the request or fsync it saves costs far more. Bigger commits
#: upload their segments as objects, as before.
INLINE_BYTES: Final = 32 << 10
# Format 5.0 commit records may carry segments inline (``data``); a 4.x reader would find
# no object under their keys, so it is a major version.
_INLINE_IN: Final = 5


# Format 3.0 commit records hold the offsets a commit changed (``offset_changes``), where
# 1.x and 2.x ones held every stream's (``offsets``): with many streams the whole map made
# every commit record, and so opening a store, cost streams x commits.
_OFFSETS_CHANGED_IN: Final = 3


@dataclass(frozen=True, slots=True)
class CommitRecord:
    """One atomic commit: the segments it adds and the stream offsets it sets.

    ``reset`` marks the first commit of a new history (``SnapshotAccess.RECORD``): readers
    ignore every commit before it. ``offsets`` maps a stream name to its offset as JSON
    bytes: the offsets this commit changed, on top of the previous commit's (``null``: the
    stream has no offset any more), or the whole map when ``whole_offsets`` (see
    ``apply_offsets``). ``major`` is the format major version that wrote the record; only
    the current one is ever encoded. ``inline`` maps the key of each of ``segments`` whose
    bytes the record carries (format 5.0, ``data``) to those bytes; such a segment's ref has
    the record's key as its ``home`` once read back.
    """

    writer: str
    seq: int
    epoch: int
    time_ms: int
    token: str
    reset: bool
    segments: tuple[SegmentRef, ...]
    offsets: Mapping[str, bytes]
    major: int = FORMAT_MAJOR
    rewrites: tuple[Rewrite, ...] = ()
    inline: Mapping[str, bytes] = dataclasses.field(default_factory=dict)

    @property
    def whole_offsets(self) -> bool:
        """Whether ``offsets`` is the whole map after this commit rather than its changes.

        A reset commit starts from an empty map, so its changes are the whole map; a format
        1 or 2 commit holds the whole map in every commit.
        """
        return self.reset or self.major < _OFFSETS_CHANGED_IN

    def apply_offsets(self, offsets: dict[str, bytes]) -> dict[str, bytes]:
        """The offsets after this commit, given those after the previous one.

        Updates ``offsets`` in place and returns it, costing what the commit changed; a
        commit that holds the whole map returns a new dict instead.
        """
        if self.whole_offsets:
            offsets = {}
        for name, raw in self.offsets.items():
            if raw == _NULL and self.major >= _OFFSETS_CHANGED_IN:
                offsets.pop(name, None)
            else:
                offsets[name] = raw
        return offsets

    def encode(self) -> bytes:
        if self.major != FORMAT_MAJOR:
            raise ValueError(f"a commit record is written only in the current format: "
                             f"major={self.major} current={FORMAT_MAJOR}")
        body = {
            "format": [FORMAT_MAJOR, FORMAT_MINOR], "type": "commit", "writer": self.writer,
            "seq": self.seq, "epoch": self.epoch, "time_ms": self.time_ms, "token": self.token,
            "reset": self.reset, "segments": [self._segment_json(s) for s in self.segments],
            "offset_changes": {name: orjson.Fragment(raw) for name, raw in self.offsets.items()},
        }
        if self.rewrites:
            body["rewrites"] = [r.to_json() for r in self.rewrites]
        return _encode_checked(body)

    def _segment_json(self, ref: SegmentRef) -> dict[str, Any]:
        item = ref.to_json()
        data = self.inline.get(ref.key)
        if data is not None:
            if len(data) != ref.size:
                raise ValueError(f"inline segment size differs from its ref: key={ref.key} "
                                 f"size={len(data)} expected={ref.size}")
            item["data"] = base64.b64encode(data).decode("ascii")
        return item

    @classmethod
    def decode(cls, key: str, data: bytes) -> CommitRecord:
        body = _decode_checked(key, data)
        if body.get("type") != "commit":
            raise CorruptDataError(f"object is not a commit record: key={key} offset=0")
        major: int = body["format"][0]  # checked by _decode_checked
        inline: dict[str, bytes] = {}
        refs = [_segment_ref(key, item, inline if major >= _INLINE_IN else None)
                for item in _field(key, body, "segments", list)]
        rewrites: list[Rewrite] = []
        if major >= _REWRITES_IN and "rewrites" in body:
            for item in _field(key, body, "rewrites", list):
                if not isinstance(item, dict):
                    raise CorruptDataError(f"commit holds a malformed rewrite: key={key} offset=0")
                kind = _field(key, item, "kind", str)
                if kind not in KINDS:
                    raise IncompatibleFormatError(f"commit rewrites a log of an unknown kind: "
                                                  f"key={key} kind={kind}")
                old = _field(key, item, "old", list)
                if not old or not all(isinstance(k, str) for k in old):
                    raise CorruptDataError(f"commit holds a malformed rewrite: key={key} offset=0")
                new = tuple(_segment_ref(key, ref) for ref in _field(key, item, "new", list))
                name = _field(key, item, "name", str)
                if any((ref.kind, ref.name) != (kind, name) for ref in new):
                    raise CorruptDataError(f"commit rewrites a log with another log's segment: "
                                           f"key={key} offset=0 log={kind}/{name}")
                rewrites.append(Rewrite(kind, name, tuple(old), new))
        # A 3.x record names only what changed, under a field that 2.x records lack: a 2.x
        # record's whole map is never taken for changes, nor changes for a whole map.
        field = "offset_changes" if major >= _OFFSETS_CHANGED_IN else "offsets"
        offsets = {name: orjson.dumps(value)
                   for name, value in _field(key, body, field, dict).items()}
        return cls(_field(key, body, "writer", str), _field(key, body, "seq", int),
                   _field(key, body, "epoch", int), _field(key, body, "time_ms", int),
                   _field(key, body, "token", str), _field(key, body, "reset", bool),
                   tuple(refs), offsets, major, tuple(rewrites), inline)


def _segment_ref(key: str, item: object, inline: dict[str, bytes] | None = None) -> SegmentRef:
    """A segment reference of the commit record stored at ``key``, checked.

    With ``inline`` (a 5.x record's own segments), a segment may carry its bytes (``data``,
    base64): they are checked to be base64 of the segment's size, put in ``inline`` under
    the segment's key, and the ref's ``home`` is ``key``. Anywhere else ``data`` is
    corruption (a record of an older major version, a rewrite's new segment).
    """
    if not isinstance(item, dict):
        raise CorruptDataError(f"record names a malformed segment: key={key} offset=0")
    segment = _field(key, item, "key", str)
    home = None
    if "data" in item:
        if inline is None:
            raise CorruptDataError(f"record carries segment data where none may be: key={key} "
                                   f"offset=0 segment={segment}")
        text = item["data"]
        try:
            if not isinstance(text, str):
                raise ValueError("not a string")
            # Strict: only the base64 alphabet, and padding only at the end.
            raw = binascii.a2b_base64(text, strict_mode=True)
        except (ValueError, binascii.Error):
            raise CorruptDataError(f"inline segment data is not base64: key={key} offset=0 "
                                   f"segment={segment}") from None
        if len(raw) != _field(key, item, "size", int):
            raise CorruptDataError(f"inline segment data size differs from its ref: key={key} "
                                   f"offset=0 segment={segment} size={len(raw)} "
                                   f"expected={item['size']}")
        if segment in inline:
            raise CorruptDataError(f"record carries one segment twice: key={key} offset=0 "
                                   f"segment={segment}")
        inline[segment] = raw
        home = key
    ref = SegmentRef(segment, _field(key, item, "kind", str),
                     _field(key, item, "name", str), _field(key, item, "records", int),
                     _field(key, item, "size", int), home)
    if ref.kind not in KINDS:
        raise IncompatibleFormatError(f"record names a segment of an unknown kind: "
                                      f"key={key} kind={ref.kind}")
    return ref


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Part of a commit: the run of segments ``old`` of one log replaced, in place, by ``new``.

    Maintenance writes these: merged segments (the same records, fewer objects), and the
    retention of a stream (the first segments dropped, ``new`` empty or holding the tail
    of the last one dropped). ``old`` must be consecutive in the log when the commit is
    applied; a reader that finds otherwise reports the commit as corrupt.
    """

    kind: str
    name: str
    old: tuple[str, ...]
    new: tuple[SegmentRef, ...]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "old": list(self.old),
                "new": [ref.to_json() for ref in self.new]}


#: A checkpoint's log entry ``[seq, key, records, size]`` gains a 5th item, 1, for a
#: segment carried inline by commit ``seq`` (format 5.0).
_INLINE_MARK: Final = {False: (), True: (1,)}

# Format 4.0 commit records may hold ``rewrites``; a 3.x reader would ignore the field and
# replay merged events twice, so it is a major version.
_REWRITES_IN: Final = 4


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The commit log folded up to commit ``seq``: what opening a store starts from.

    ``logs`` maps each live log ``(kind, name)`` to its segments as ``(seq, ref)``, ``seq``
    being the commit that added the segment, in log order; a table's segments from before
    its newest snapshot are already left out. ``offsets`` is the whole offset map after
    ``seq``. ``fences`` lists the first commit of every epoch (the writer-role takeovers),
    which garbage collection keeps for good: a fenced writer's next commit number is always
    one of them. ``last_segment`` is the highest segment number of ``epoch`` that a commit
    up to ``seq`` named. A checkpoint is a pure function of commits 1 to ``seq``, so any
    writer (a fenced one too) writes the same content for the same ``seq``.
    """

    writer: str
    seq: int
    epoch: int
    time_ms: int
    token: str
    commits: int
    reset_time_ms: int | None
    fences: tuple[int, ...]
    last_segment: int
    offsets: Mapping[str, bytes]
    logs: Mapping[tuple[str, str], tuple[tuple[int, SegmentRef], ...]]

    def encode(self) -> bytes:
        logs = [{"kind": kind, "name": name,
                 "segments": [[seq, ref.key, ref.records, ref.size, *_INLINE_MARK[ref.inline]]
                              for seq, ref in segs]}
                for (kind, name), segs in self.logs.items() if segs]
        return _encode_checked({
            "format": [FORMAT_MAJOR, FORMAT_MINOR], "type": "checkpoint", "writer": self.writer,
            "seq": self.seq, "epoch": self.epoch, "time_ms": self.time_ms, "token": self.token,
            "commits": self.commits, "reset_time_ms": self.reset_time_ms,
            "fences": list(self.fences), "last_segment": self.last_segment,
            "offsets": {name: orjson.Fragment(raw) for name, raw in self.offsets.items()},
            "logs": logs,
        })

    @classmethod
    def decode(cls, key: str, data: bytes) -> Checkpoint:
        body = _decode_checked(key, data)
        if body.get("type") != "checkpoint":
            raise CorruptDataError(f"object is not a checkpoint: key={key} offset=0")
        reset_time = body.get("reset_time_ms")
        fences = _field(key, body, "fences", list)
        if ((reset_time is not None and (not isinstance(reset_time, int)
                                         or isinstance(reset_time, bool)))
                or not all(isinstance(f, int) and not isinstance(f, bool) for f in fences)):
            raise CorruptDataError(f"checkpoint field has the wrong type: key={key} offset=0")
        logs: dict[tuple[str, str], tuple[tuple[int, SegmentRef], ...]] = {}
        writer = _field(key, body, "writer", str)
        # A 5th item (1) marks a segment carried inline by the commit that added it.
        lengths = (4, 5) if body["format"][0] >= _INLINE_IN else (4,)
        for item in _field(key, body, "logs", list):
            if not isinstance(item, dict):
                raise CorruptDataError(f"checkpoint holds a malformed log: key={key} offset=0")
            kind, name = _field(key, item, "kind", str), _field(key, item, "name", str)
            if kind not in KINDS:
                raise IncompatibleFormatError(f"checkpoint holds a log of an unknown kind: "
                                              f"key={key} kind={kind}")
            segs = []
            for entry in _field(key, item, "segments", list):
                if (not isinstance(entry, list) or len(entry) not in lengths
                        or not isinstance(entry[1], str)
                        or not all(isinstance(n, int) and not isinstance(n, bool)
                                   for n in (entry[0], entry[2], entry[3]))
                        or entry[4:] not in ([], [1])):
                    raise CorruptDataError(f"checkpoint names a malformed segment: key={key} "
                                           f"offset=0 log={kind}/{name}")
                home = commit_key(writer, entry[0]) if len(entry) == 5 else None
                segs.append((entry[0], SegmentRef(entry[1], kind, name, entry[2], entry[3],
                                                  home)))
            logs[(kind, name)] = tuple(segs)
        offsets = {name: orjson.dumps(value)
                   for name, value in _field(key, body, "offsets", dict).items()}
        return cls(_field(key, body, "writer", str), _field(key, body, "seq", int),
                   _field(key, body, "epoch", int), _field(key, body, "time_ms", int),
                   _field(key, body, "token", str), _field(key, body, "commits", int),
                   reset_time, tuple(fences), _field(key, body, "last_segment", int),
                   offsets, logs)


def offset_changes(before: Mapping[str, bytes], after: Mapping[str, bytes]) -> dict[str, bytes]:
    """The ``offsets`` of a commit record that turns the map ``before`` into ``after``.

    The streams whose offset differs from ``before``, and ``null`` for a stream that has
    an offset in ``before`` and none in ``after`` (never the case for maps that only add
    and overwrite, as a writer's do). Costs the size of ``after``, in C for the most part.
    """
    get = before.get
    changes = {name: raw for name, raw in after.items() if get(name) != raw}
    added = sum(1 for name in changes if name not in before)
    if len(after) - added < len(before):  # some stream of ``before`` is not in ``after``
        changes.update((name, _NULL) for name in before if name not in after)
    return changes


# --------------------------------------------------------------------------- segments
# segment := header body trailer
# header  := MAGIC(8) major:u16 minor:u16 meta_len:u32 meta(JSON) header_crc:u32
# body    := record*
# record  := value_len:u32 offset_len:u32 count:u32 time_ms:i64 value offset crc:u32
#            (crc covers the 20 head bytes, value and offset; offset_len 0 means no offset)
# trailer := count:u64 body_len:u64 body_crc:u32 trailer_crc:u32 END_MAGIC(4)
#
# Format 5 stores the body compressed when meta says so ("codec": "zstd"): the bytes
# between header and trailer are then one zstd frame of the records above, and the
# trailer's body_len and body_crc describe those stored bytes, so storage damage is caught
# before anything is decompressed. Without "codec" the body is stored raw, as before.
#
# A record holds ``count`` entries that share its time_ms. With count 1, value is the entry
# and offset its offset. With more (event logs only: a batch), value is a JSON array of the
# entries' values and offset is empty (none has an offset) or a JSON array of as many
# offsets, null for none. One dumps, one CRC and one loads per batch instead of per event
# is what makes record_many() and replay cheap. Format 1 records had no count (always 1).
SEGMENT_MAGIC: Final = b"\x89APSEG\r\n"
SEGMENT_END: Final = b"APSE"
_HEAD: Final = struct.Struct("<8sHHI")
U32: Final = struct.Struct("<I")
RECORD_HEAD: Final = struct.Struct("<IIIq")
RECORD_HEAD_V1: Final = struct.Struct("<IIq")  # format 1: value_len offset_len time_ms
_TRAILER: Final = struct.Struct("<QQII4s")
RECORD_OVERHEAD: Final = RECORD_HEAD.size + U32.size
# Every record's value and offset fit a u32 length.
MAX_RECORD_JSON: Final = 2**32 - 1
_NULL: Final = b"null"


def append_record(body: bytearray, value: bytes | bytearray, offset: bytes | bytearray,
                  time_ms: int, count: int = 1) -> int:
    """Frame one record onto ``body``; return the bytes added. ``offset=b""`` means none.

    With ``count`` above 1, ``value`` (and ``offset``, unless empty) must be JSON arrays of
    that many items (see ``join_batch``).
    """
    head = RECORD_HEAD.pack(len(value), len(offset), count, time_ms)
    crc = zlib.crc32(value, zlib.crc32(head))
    body += head
    body += value
    if offset:
        crc = zlib.crc32(offset, crc)
        body += offset
    body += U32.pack(crc)
    return RECORD_OVERHEAD + len(value) + len(offset)


def join_batch(values: list[bytes], offsets: list[bytes] | None) -> tuple[bytes, bytes]:
    """The value and offset fields of a batch record of ``values`` (JSON each).

    ``offsets`` has one item per value, ``b""`` for none, or is None when none has one. A
    batch of one is framed as a single entry, exactly as ``record()`` frames one.
    """
    if len(values) == 1:
        return values[0], (offsets[0] if offsets else b"")
    return b"[%s]" % b",".join(values), join_offsets(offsets)


def join_offsets(offsets: list[bytes] | None) -> bytes:
    """A batch record's offset field: empty when no entry has one, else their JSON array
    (``null`` for an entry without one)."""
    if not offsets or not any(offsets):
        return b""
    return b"[%s]" % b",".join([off or _NULL for off in offsets])


@dataclass(frozen=True, slots=True)
class SegmentMeta:
    """What a segment says about itself; checked against the commit that names it."""

    key: str
    kind: str
    name: str


#: Segments of this major version and later may store their body compressed.
CODEC_SINCE: Final = 5


def encode_segment_head(meta: SegmentMeta, codec: str | None = None) -> bytes:
    """The header frame; ``codec`` names how the body is stored (None: raw)."""
    fields = {"key": meta.key, "kind": meta.kind, "name": meta.name}
    if codec is not None:
        fields["codec"] = codec
    raw = orjson.dumps(fields)
    head = _HEAD.pack(SEGMENT_MAGIC, FORMAT_MAJOR, FORMAT_MINOR, len(raw)) + raw
    return head + U32.pack(zlib.crc32(head))


def encode_segment_trailer(count: int, body: bytes | bytearray) -> bytes:
    fields = struct.pack("<QQI", count, len(body), zlib.crc32(body))
    return fields + U32.pack(zlib.crc32(fields)) + SEGMENT_END


def encode_segment(meta: SegmentMeta, body: bytes | bytearray, count: int,
                   codec: str | None = None) -> bytes:
    """Build a whole segment around a stored body: framed records (see ``append_record``),
    or with ``codec`` those records compressed (see ``_compression.compress_body``)."""
    return b"".join((encode_segment_head(meta, codec), body,
                     encode_segment_trailer(count, body)))


def looks_compressed(data: bytes | bytearray) -> bool:
    """Whether a segment's header seems to name a codec: a hint, unchecked (the header's
    checksum is not verified), for deciding where to check the segment. Decompressing
    costs far more per stored byte than checking a raw body, so a compressed segment goes
    to a worker thread at a smaller stored size."""
    if len(data) < _HEAD.size:
        return False
    magic, major, _minor, meta_len = _HEAD.unpack_from(data, 0)
    return (magic == SEGMENT_MAGIC and major >= CODEC_SINCE
            and b'"codec"' in data[_HEAD.size:_HEAD.size + meta_len])


def declared_raw_size(data: bytes | bytearray) -> int:
    """The size a compressed segment's body says it decompresses to (its zstd frame's
    content size), or 0 if ``data`` does not look like one: a hint, unchecked, like
    ``looks_compressed``. The stored size says little about the work of checking a
    compressed segment: records that repeat compress a thousandfold and more, so a few
    KiB stored can be tens of MiB to decompress and walk (and a hostile frame may declare
    up to ``_compression.MAX_BODY_BYTES``)."""
    if not looks_compressed(data):
        return 0
    (meta_len,) = U32.unpack_from(data, 12)
    start = _HEAD.size + meta_len + U32.size
    try:
        # A frame header is at most 18 bytes.
        return max(0, zstandard.frame_content_size(bytes(data[start:start + 18])))
    except zstandard.ZstdError:
        return 0


class SegmentView:
    """A checked, in-memory segment whose records can be iterated lazily.

    Construction verifies the header, the trailer and the body checksum, so a torn or
    corrupted segment is refused before a single record is handed out. A compressed body
    (format 5) is decompressed then, once the checksum of its stored bytes holds: the view
    keeps only the decompressed records (``codec`` says how they were stored,
    ``stored_bytes`` and ``raw_bytes`` how big the body was stored and is).
    """

    __slots__ = ("_body_end", "_body_start", "_data", "_head", "codec", "count", "key", "major",
                 "meta", "raw_bytes", "stored_bytes")

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
        self.major = major
        self._head = RECORD_HEAD_V1 if major == 1 else RECORD_HEAD
        meta = orjson.loads(data[_HEAD.size:head_end])
        self.meta = SegmentMeta(meta.get("key"), meta.get("kind"), meta.get("name"))
        codec = meta.get("codec") if major >= CODEC_SINCE else None
        if codec is not None and not isinstance(codec, str):
            raise CorruptDataError(f"segment codec field is damaged: key={key} offset={_HEAD.size}")
        self.codec: str | None = codec
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
        self.stored_bytes = self.raw_bytes = body_len
        if zlib.crc32(memoryview(data)[self._body_start:self._body_end]) != body_crc:
            if codec is None:
                self._raise_at_first_damaged_record()
            # A compressed body cannot be walked record by record: it is lost as a whole.
            raise CorruptDataError(f"segment body checksum mismatch: key={key} "
                                   f"offset={self._body_start}")
        if codec is not None:
            raw = decompress_body(key, self._body_start, codec,
                                  memoryview(data)[self._body_start:self._body_end])
            # From here on the view holds the records alone: the stored (compressed) bytes
            # are dropped with ``data``, so a read never keeps both copies.
            self._data, self._body_start, self._body_end = raw, 0, len(raw)
            self.raw_bytes = len(raw)

    def body(self) -> memoryview:
        """The checked body: the framed records (decompressed, if they were stored
        compressed), which another segment's body may take on as they are (format 2.0 and
        later; a 1.x body's records are framed otherwise)."""
        return memoryview(self._data)[self._body_start:self._body_end]

    def _raise_at_first_damaged_record(self) -> None:
        """Walk the records checking each CRC; raise naming the first damaged one's offset."""
        data, pos, end, key = self._data, self._body_start, self._body_end, self.key
        head = self._head
        unpack, head_size, overhead = head.unpack_from, head.size, head.size + U32.size
        seen = 0
        while pos < end:
            if pos + overhead > end:
                raise CorruptDataError(f"segment record header is truncated: key={key} offset={pos}")
            fields = unpack(data, pos)
            vlen, olen = fields[0], fields[1]
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
            seen += 1 if self.major == 1 else fields[2]
        if seen != self.count:
            raise CorruptDataError(f"segment record count differs from its trailer: key={key} "
                                   f"offset={pos} records={seen} expected={self.count}")

    def frames(self) -> Iterator[tuple[bytes, bytes | None, int, int, int]]:
        """Yield (value JSON, offset JSON or None, time_ms, count, position) for each record.

        The body checksum already held (see ``__init__``), so the framing is the writer's:
        this loop only walks it, checking that the counts add up to the trailer's.
        """
        data, pos, end, key = self._data, self._body_start, self._body_end, self.key
        unpack, head_size = self._head.unpack_from, self._head.size
        v1 = self.major == 1
        left = self.count
        try:
            while pos < end:
                if v1:
                    vlen, olen, time_ms = unpack(data, pos)
                    count = 1
                else:
                    vlen, olen, count, time_ms = unpack(data, pos)
                vstart = pos + head_size
                vend = vstart + vlen
                pos = vend + olen + 4
                left -= count
                if pos > end:
                    break
                if count < 1 or left < 0:
                    raise CorruptDataError(f"segment record count is damaged: key={key} "
                                           f"offset={vstart - head_size} count={count}")
                yield (data[vstart:vend], (data[vend:vend + olen] if olen else None), time_ms,
                       count, vstart - head_size)
        except struct.error:  # framing that runs off the end of the object
            pass
        if pos != end:
            raise CorruptDataError(f"segment records overrun the body: key={key} offset={end}")
        if left:
            raise CorruptDataError(f"segment record count differs from its trailer: key={key} "
                                   f"offset={end} records={self.count - left} expected={self.count}")

    def damaged_record(self, index: int, what: str) -> CorruptDataError:
        """The error for record ``index`` (counted from 0) whose JSON is not ``what`` (a
        writer's bug, or damage under recomputed checksums), naming the record's position.
        Walks the framing again: only an error path calls this."""
        at = next(itertools.islice(self.frames(), index, None))[4]
        return CorruptDataError(f"{what}: key={self.key} offset={at}")

    def records(self) -> Iterator[tuple[bytes, bytes | None, int]]:
        """Yield (value JSON, offset JSON or None, time_ms) for each record of a log whose
        records hold one entry each (tables, the cache): a batch there is corruption."""
        for value, offset, time_ms, count, at in self.frames():
            if count != 1:
                raise CorruptDataError(f"segment record holds a batch in a {self.meta.kind} log: "
                                       f"key={self.key} offset={at} count={count}")
            yield value, offset, time_ms

    def event_chunks(self, limit: int) -> Iterator[tuple[list[Any], list[Any] | None, list[int]]]:
        """The entries, decoded, in chunks: (values, offsets, times) as parallel lists.

        ``offsets`` is None for a chunk with no offset at all. A batch record is one chunk
        (one ``loads`` of its array); runs of single-entry records are gathered into chunks
        of up to ``limit``. This is the hot path of replay.
        """
        loads, key = orjson.loads, self.key
        values: list[bytes] = []
        offsets: list[bytes | None] | None = None
        times: list[int] = []
        overhead = self._head.size + U32.size  # a record's framing: its head and CRC
        first_at = 0  # where the chunk's first record starts, for a message
        for value, offset, time_ms, count, at in self.frames():
            if count == 1:
                if not values:
                    first_at = at
                if offset is not None and offsets is None:
                    offsets = [None] * len(values)
                values.append(value)
                times.append(time_ms)
                if offsets is not None:
                    offsets.append(offset)
                if len(values) < limit:
                    continue
                yield _decode_singles(values, offsets, times, key, first_at, overhead)
                values, offsets, times = [], None, []
                continue
            if values:
                yield _decode_singles(values, offsets, times, key, first_at, overhead)
                values, offsets, times = [], None, []
            try:
                items = loads(value)
                offs = None if offset is None else loads(offset)
            except orjson.JSONDecodeError:
                items = offs = None
            if (not isinstance(items, list) or len(items) != count
                    or not (offset is None or (isinstance(offs, list) and len(offs) == count))):
                raise CorruptDataError(f"segment batch record does not hold its count: key={key} "
                                       f"offset={at} count={count}")
            yield items, offs, [time_ms] * count
        if values:
            yield _decode_singles(values, offsets, times, key, first_at, overhead)


def _decode_singles(values: list[bytes], offsets: list[bytes | None] | None,
                    times: list[int], key: str, first_at: int,
                    overhead: int) -> tuple[list[Any], list[Any] | None, list[int]]:
    loads = orjson.loads
    try:
        decoded = None if offsets is None else [None if o is None else loads(o) for o in offsets]
        return list(map(loads, values)), decoded, times
    except orjson.JSONDecodeError:
        pass
    # A record whose framing holds but whose JSON does not (a writer's bug, or damage under
    # checksums recomputed: a compressed body's records are covered by its frame's checksum,
    # never checked one by one). It escaped as orjson's JSONDecodeError, from replay and from
    # ``apersist verify`` alike: it is corruption, at the record's position (only this error
    # path walks the chunk again, so the hot path pays nothing).
    at = first_at
    for index, value in enumerate(values):
        offset = None if offsets is None else offsets[index]
        try:
            loads(value)
            if offset is not None:
                loads(offset)
        except orjson.JSONDecodeError:
            break
        at += overhead + len(value) + (0 if offset is None else len(offset))
    raise CorruptDataError(f"segment record does not decode: key={key} offset={at}") from None
