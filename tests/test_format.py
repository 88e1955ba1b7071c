"""The pure codec: key names, segment framing, commit and epoch records, damage detection."""

from __future__ import annotations

import dataclasses
import re
import struct
import zlib
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from apersist import CorruptDataError, IncompatibleFormatError
from apersist import _format as fmt
from apersist._drivers.base import check_key

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=8,
)
json_bytes = json_values.map(orjson.dumps)
names = st.from_regex(fmt.NAME_RE, fullmatch=True)
time_ms = st.integers(-(2**63), 2**63 - 1)
# (value JSON, offset JSON or b"" for none, time_ms), as append_record takes them.
records = st.lists(st.tuples(json_bytes, st.just(b"") | json_bytes, time_ms), max_size=10)
# Cheaper records for the damage tests, whose point is the position of the damage.
_small_json = (st.integers(-(2**63), 2**63) | _text
               | st.lists(st.integers(0, 999), max_size=4)).map(orjson.dumps)
small_records = st.lists(st.tuples(_small_json, st.just(b"") | _small_json, time_ms), max_size=6)
kinds = st.sampled_from(sorted(fmt.KINDS))
u64 = st.integers(0, 2**64 - 1)


def make_segment(recs: list[tuple[bytes, bytes, int]], *, kind: str = fmt.KIND_EVENTS,
                 name: str = "orders", epoch: int = 1, number: int = 1) -> tuple[fmt.SegmentRef, bytes]:
    key = fmt.segment_key("0", epoch, number)
    body = bytearray()
    for value, offset, t in recs:
        before = len(body)
        added = fmt.append_record(body, value, offset, t)
        assert added == len(body) - before == fmt.RECORD_OVERHEAD + len(value) + len(offset)
    data = fmt.encode_segment(fmt.SegmentMeta(key, kind, name), body, len(recs))
    return fmt.SegmentRef(key, kind, name, len(recs), len(data)), data


def read_segment(ref: fmt.SegmentRef, data: bytes) -> list[tuple[bytes, bytes | None, int]]:
    return list(fmt.SegmentView(ref, data).records())


def expect_corrupt(key: str, data: bytes, read: Any) -> CorruptDataError:
    """``read()`` must raise CorruptDataError naming ``key`` and a byte offset inside ``data``."""
    with pytest.raises(CorruptDataError) as info:
        read()
    message = str(info.value)
    assert f"key={key}" in message, message
    match = re.search(r"offset=(\d+)", message)
    assert match is not None, message
    assert 0 <= int(match.group(1)) <= len(data), message
    return info.value


SAMPLE = [(b'{"a":1}', b"17", 1_700_000_000_000), (b'"text"', b"", 5), (b"[1,2,3]", b'{"p":3}', -1),
          (b"null", b"", 0)]


# --------------------------------------------------------------------------- segments: round trip


@SETTINGS
@given(recs=records, kind=kinds, name=names, epoch=u64, number=u64)
def test_segment_round_trip(recs: list[tuple[bytes, bytes, int]], kind: str, name: str,
                            epoch: int, number: int) -> None:
    ref, data = make_segment(recs, kind=kind, name=name, epoch=epoch % 10**20, number=number % 10**20)
    view = fmt.SegmentView(ref, data)
    assert view.count == len(recs)
    assert view.meta == fmt.SegmentMeta(ref.key, kind, name)
    expected = [(value, offset or None, t) for value, offset, t in recs]
    assert list(view.records()) == expected
    assert list(view.records()) == expected  # iterating again gives the same records


def test_empty_segment_round_trip() -> None:
    ref, data = make_segment([])
    assert read_segment(ref, data) == []
    assert len(data) == 20 + len(orjson.dumps({"key": ref.key, "kind": ref.kind, "name": ref.name})) + 28


def test_segment_record_values_are_bytes() -> None:
    ref, data = make_segment(SAMPLE)
    for value, offset, _ in read_segment(ref, data):
        assert type(value) is bytes
        assert offset is None or type(offset) is bytes


# --------------------------------------------------------------------------- segments: damage


@SETTINGS
@given(recs=small_records, data=st.data())
def test_segment_any_flipped_byte_is_detected(recs: list[tuple[bytes, bytes, int]],
                                              data: st.DataObject) -> None:
    ref, blob = make_segment(recs)
    position = data.draw(st.integers(0, len(blob) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    damaged = bytearray(blob)
    damaged[position] ^= mask
    expect_corrupt(ref.key, blob, lambda: read_segment(ref, bytes(damaged)))


@pytest.mark.parametrize("position", range(8, 16))
@pytest.mark.parametrize("mask", [0x01, 0x02, 0x80, 0xFF])
def test_segment_damaged_version_or_length_field_is_corruption(position: int, mask: int) -> None:
    # A flipped major version byte must not pass for a newer format: the header CRC says it is damage.
    ref, blob = make_segment(SAMPLE)
    damaged = bytearray(blob)
    damaged[position] ^= mask
    expect_corrupt(ref.key, blob, lambda: read_segment(ref, bytes(damaged)))


@SETTINGS
@given(recs=small_records, data=st.data())
def test_segment_truncation_is_detected(recs: list[tuple[bytes, bytes, int]], data: st.DataObject) -> None:
    ref, blob = make_segment(recs)
    length = data.draw(st.integers(0, len(blob) - 1), label="length")
    torn = blob[:length]
    # Against the commit's size ...
    expect_corrupt(ref.key, blob, lambda: read_segment(ref, torn))
    # ... and even when the size was recorded wrongly too: the structure itself gives it away.
    lying_ref = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records, length)
    expect_corrupt(ref.key, blob, lambda: read_segment(lying_ref, torn))


def test_segment_every_truncation_is_detected() -> None:
    ref, blob = make_segment(SAMPLE)
    for length in range(len(blob)):
        torn = blob[:length]
        lying_ref = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records, length)
        expect_corrupt(ref.key, blob, lambda torn=torn, r=lying_ref: read_segment(r, torn))


@SETTINGS
@given(recs=small_records, data=st.data())
def test_segment_zero_filled_range_is_detected(recs: list[tuple[bytes, bytes, int]],
                                               data: st.DataObject) -> None:
    ref, blob = make_segment(recs)
    start = data.draw(st.integers(0, len(blob) - 1), label="start")
    length = data.draw(st.integers(1, len(blob) - start), label="length")
    damaged = blob[:start] + bytes(length) + blob[start + length:]
    assume(damaged != blob)
    expect_corrupt(ref.key, blob, lambda: read_segment(ref, damaged))


@SETTINGS
@given(recs=small_records, data=st.data())
def test_segment_extra_bytes_are_detected(recs: list[tuple[bytes, bytes, int]], data: st.DataObject) -> None:
    ref, blob = make_segment(recs)
    extra = data.draw(st.binary(min_size=1, max_size=40), label="extra")
    at = data.draw(st.integers(0, len(blob)), label="at")
    grown = blob[:at] + extra + blob[at:]
    lying_ref = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records, len(grown))
    expect_corrupt(ref.key, grown, lambda: read_segment(lying_ref, grown))


@pytest.mark.parametrize("delta", [-100, -1, 1, 7])
def test_segment_size_differs_from_its_ref(delta: int) -> None:
    ref, blob = make_segment(SAMPLE)
    wrong = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records, ref.size + delta)
    error = expect_corrupt(ref.key, blob, lambda: read_segment(wrong, blob))
    assert "size" in str(error)


def test_segment_under_another_key_is_detected() -> None:
    ref, blob = make_segment(SAMPLE, epoch=1, number=1)
    other_key = fmt.segment_key("0", 1, 2)
    moved = fmt.SegmentRef(other_key, ref.kind, ref.name, ref.records, ref.size)
    error = expect_corrupt(other_key, blob, lambda: read_segment(moved, blob))
    assert "belongs elsewhere" in str(error)
    assert f"holds={ref.key}" in str(error)


@pytest.mark.parametrize(("kind", "name"), [(fmt.KIND_TABLE, "orders"), (fmt.KIND_EVENTS, "other")])
def test_segment_of_another_log_is_detected(kind: str, name: str) -> None:
    ref, blob = make_segment(SAMPLE, kind=fmt.KIND_EVENTS, name="orders")
    wrong = fmt.SegmentRef(ref.key, kind, name, ref.records, ref.size)
    expect_corrupt(ref.key, blob, lambda: read_segment(wrong, blob))


def test_another_segments_bytes_under_this_key_are_detected() -> None:
    # Two segments of equal size: the sizes agree, the embedded key does not.
    ref_a, blob_a = make_segment(SAMPLE, number=1)
    _, blob_b = make_segment(list(reversed(SAMPLE)), number=2)
    assert len(blob_a) == len(blob_b)
    expect_corrupt(ref_a.key, blob_b, lambda: read_segment(ref_a, blob_b))


def test_other_objects_bytes_as_a_segment_are_detected() -> None:
    ref, _ = make_segment(SAMPLE)
    commit = fmt.CommitRecord("0", 1, 1, 0, "t", False, (), {}).encode()
    for blob in (commit, b"\x00" * 100, b"x" * 60):
        wrong = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records, len(blob))
        expect_corrupt(ref.key, blob, lambda blob=blob, wrong=wrong: read_segment(wrong, blob))


def test_segment_record_count_differs_from_its_ref() -> None:
    ref, blob = make_segment(SAMPLE)
    wrong = fmt.SegmentRef(ref.key, ref.kind, ref.name, ref.records + 1, ref.size)
    expect_corrupt(ref.key, blob, lambda: read_segment(wrong, blob))


def test_segment_damaged_record_is_located() -> None:
    ref, blob = make_segment(SAMPLE)
    head = len(blob) - (sum(fmt.RECORD_OVERHEAD + len(v) + len(o) for v, o, _ in SAMPLE) + 28)
    second = head + fmt.RECORD_OVERHEAD + len(SAMPLE[0][0]) + len(SAMPLE[0][1])
    damaged = bytearray(blob)
    damaged[second + fmt.RECORD_HEAD.size] ^= 0x20  # inside the second record's value
    error = expect_corrupt(ref.key, blob, lambda: read_segment(ref, bytes(damaged)))
    assert f"offset={second}" in str(error)


def _reheader(blob: bytes, major: int, minor: int) -> bytes:
    """The segment with another version in its header and a header CRC that matches it."""
    (meta_len,) = struct.unpack_from("<I", blob, 12)
    head_end = 16 + meta_len
    head = blob[:8] + struct.pack("<HH", major, minor) + blob[12:head_end]
    return head + struct.pack("<I", zlib.crc32(head)) + blob[head_end + 4:]


def test_segment_of_a_newer_major_version_is_refused() -> None:
    ref, blob = make_segment(SAMPLE)
    for major in (fmt.FORMAT_MAJOR + 1, 0xFFFF):
        with pytest.raises(IncompatibleFormatError, match=f"key={ref.key}"):
            read_segment(ref, _reheader(blob, major, 0))


def test_segment_of_a_newer_minor_version_is_read() -> None:
    ref, blob = make_segment(SAMPLE)
    newer = _reheader(blob, fmt.FORMAT_MAJOR, fmt.FORMAT_MINOR + 3)
    assert read_segment(ref, newer) == read_segment(ref, blob)


# --------------------------------------------------------------------------- commit and epoch records

segment_refs = st.builds(
    fmt.SegmentRef,
    key=st.builds(fmt.segment_key, st.just("0"), st.integers(0, 10**20 - 1), st.integers(0, 10**20 - 1)),
    kind=kinds, name=names, records=st.integers(0, 2**63), size=st.integers(0, 2**63))
commits = st.builds(
    fmt.CommitRecord, writer=names, seq=st.integers(0, 2**63), epoch=st.integers(0, 2**63),
    time_ms=time_ms, token=_text, reset=st.booleans(),
    segments=st.lists(segment_refs, max_size=5).map(tuple),
    offsets=st.dictionaries(names, json_bytes, max_size=5))
small_commits = st.builds(
    fmt.CommitRecord, writer=st.just("0"), seq=st.integers(0, 2**63), epoch=st.integers(0, 2**63),
    time_ms=time_ms, token=st.just("f932065e59a34cb1b5b0d90372f54062"), reset=st.booleans(),
    segments=st.lists(segment_refs, max_size=2).map(tuple),
    offsets=st.dictionaries(st.sampled_from(["a", "orders", "x.y-z"]), _small_json, max_size=3))
epochs = st.builds(fmt.EpochRecord, writer=names, epoch=st.integers(0, 2**63), time_ms=time_ms,
                   token=_text)


@SETTINGS
@given(commit=commits)
def test_commit_record_round_trip(commit: fmt.CommitRecord) -> None:
    key = fmt.commit_key(commit.writer, commit.seq % 10**20)
    data = commit.encode()
    decoded = fmt.CommitRecord.decode(key, data)
    assert decoded == commit
    assert decoded.encode() == data
    doc = orjson.loads(data)  # the whole record is plain JSON
    assert doc["body"]["format"] == [fmt.FORMAT_MAJOR, fmt.FORMAT_MINOR]
    assert doc["crc32"] == zlib.crc32(data[len(b'{"body":'):data.rfind(b',"crc32":')])


@SETTINGS
@given(epoch=epochs)
def test_epoch_record_round_trip(epoch: fmt.EpochRecord) -> None:
    key = fmt.epoch_key(epoch.writer, epoch.epoch % 10**20)
    data = epoch.encode()
    assert fmt.EpochRecord.decode(key, data) == epoch
    assert orjson.loads(data)["body"]["type"] == "epoch"


COMMIT = fmt.CommitRecord(
    writer="0", seq=7, epoch=2, time_ms=1_700_000_000_123, token="abc", reset=False,
    segments=(fmt.SegmentRef(fmt.segment_key("0", 2, 1), fmt.KIND_EVENTS, "orders", 3, 200),),
    # An offset holding the checksum mark itself: the reader must split at the *last* one.
    offsets={"orders": b'{"a":1,"crc32":2}', "other": b"null"},
)
COMMIT_KEY = fmt.commit_key("0", 7)


def _checked(body: dict[str, Any]) -> bytes:
    raw = orjson.dumps(body)
    return b'{"body":%s,"crc32":%d}' % (raw, zlib.crc32(raw))


def test_commit_record_with_the_checksum_mark_inside_round_trips() -> None:
    assert fmt.CommitRecord.decode(COMMIT_KEY, COMMIT.encode()) == COMMIT


@SETTINGS
@given(commit=small_commits, data=st.data())
def test_commit_record_any_flipped_byte_is_detected(commit: fmt.CommitRecord, data: st.DataObject) -> None:
    blob = commit.encode()
    position = data.draw(st.integers(0, len(blob) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    damaged = bytearray(blob)
    damaged[position] ^= mask
    expect_corrupt(COMMIT_KEY, blob, lambda: fmt.CommitRecord.decode(COMMIT_KEY, bytes(damaged)))


def test_commit_record_every_flipped_byte_is_detected() -> None:
    blob = COMMIT.encode()
    for position in range(len(blob)):
        for mask in (0x01, 0x10, 0xFF):
            damaged = bytearray(blob)
            damaged[position] ^= mask
            expect_corrupt(COMMIT_KEY, blob,
                           lambda d=bytes(damaged): fmt.CommitRecord.decode(COMMIT_KEY, d))


def test_commit_record_every_truncation_is_detected() -> None:
    blob = COMMIT.encode()
    for length in range(len(blob)):
        expect_corrupt(COMMIT_KEY, blob,
                       lambda length=length: fmt.CommitRecord.decode(COMMIT_KEY, blob[:length]))


@pytest.mark.parametrize("blob", [
    b"", b"not json", b"{}", b'{"body":{}}', b'{"a":1}', b"\x00" * 50, b'{"body":{"x":1},"crc32":}',
    b'{"body":{"x":1},"crc32":12ab}', b'{"body":{"x":1},"crc32":1}',
    _checked({"format": [1, 0], "type": "commit"})[:-1],
])
def test_commit_record_not_a_checked_document(blob: bytes) -> None:
    expect_corrupt(COMMIT_KEY, blob, lambda: fmt.CommitRecord.decode(COMMIT_KEY, blob))


def test_commit_record_checked_but_not_a_json_object() -> None:
    raw = b"[1,2,3"
    for blob in (b'{"body":%s,"crc32":%d}' % (raw, zlib.crc32(raw)), _checked([1, 2]),  # type: ignore[arg-type]
                 _checked({"type": "commit"}), _checked({"format": "1.0", "type": "commit"})):
        expect_corrupt(COMMIT_KEY, blob, lambda blob=blob: fmt.CommitRecord.decode(COMMIT_KEY, blob))


def test_other_record_types_are_refused() -> None:
    epoch = fmt.EpochRecord("0", 1, 0, "t").encode()
    expect_corrupt(COMMIT_KEY, epoch, lambda: fmt.CommitRecord.decode(COMMIT_KEY, epoch))
    key = fmt.epoch_key("0", 1)
    commit = COMMIT.encode()
    expect_corrupt(key, commit, lambda: fmt.EpochRecord.decode(key, commit))
    _, segment = make_segment(SAMPLE)
    expect_corrupt(COMMIT_KEY, segment, lambda: fmt.CommitRecord.decode(COMMIT_KEY, segment))


def test_commit_record_with_wrong_field_types_is_corrupt() -> None:
    body = orjson.loads(COMMIT.encode())["body"]
    for field, value in [("seq", "7"), ("seq", True), ("reset", 0), ("segments", {}),
                         ("offset_changes", []), ("offset_changes", None), ("token", None)]:
        blob = _checked({**body, field: value})
        with pytest.raises(CorruptDataError, match=f"key={COMMIT_KEY}"):
            fmt.CommitRecord.decode(COMMIT_KEY, blob)


# --------------------------------------------------------------------------- offsets: changes, not the map
# From format 3.0 on a commit record holds the offsets it changed (``offset_changes``); 1.x
# and 2.x records held every stream's (``offsets``).

offset_maps = st.dictionaries(st.sampled_from([f"s{i}" for i in range(12)]), _small_json, max_size=12)


@SETTINGS
@given(before=offset_maps, after=offset_maps, reset=st.booleans())
def test_offset_changes_applied_to_the_map_before_give_the_map_after(
        before: dict[str, bytes], after: dict[str, bytes], reset: bool) -> None:
    """Whatever two maps: the changes, encoded, decoded and applied, give the map after."""
    changes = dict(after) if reset else fmt.offset_changes(before, after)
    record = fmt.CommitRecord("0", 2, 1, 0, "t", reset, (), changes)
    decoded = fmt.CommitRecord.decode(fmt.commit_key("0", 2), record.encode())
    assert decoded == record
    assert decoded.apply_offsets(dict(before)) == after
    # Only what changed is written: a stream whose offset stays is never named.
    if not reset:
        assert all(before.get(name) != raw for name, raw in changes.items())
        assert set(changes) <= set(before) | set(after)


def test_offset_changes_name_only_the_streams_that_changed() -> None:
    before = {f"s{i}": b"%d" % i for i in range(10_000)}
    after = {**before, "s7": b'{"pos":8}', "new": b"1"}
    assert fmt.offset_changes(before, after) == {"s7": b'{"pos":8}', "new": b"1"}
    assert fmt.offset_changes(before, before) == {}
    # A stream that loses its offset is named with null, which removes it.
    gone = dict(before)
    del gone["s3"]
    assert fmt.offset_changes(before, gone) == {"s3": b"null"}
    record = fmt.CommitRecord("0", 2, 1, 0, "t", False, (), {"s3": b"null", "s4": b"44"})
    offsets = dict(before)
    assert record.apply_offsets(offsets) is offsets  # in place: costs what changed
    assert "s3" not in offsets
    assert offsets["s4"] == b"44"
    assert len(offsets) == 9_999


def test_a_commit_record_does_not_grow_with_the_streams_it_leaves_alone() -> None:
    before = {f"stream-{i}": b'{"file":"part-%d","line":%d}' % (i, i) for i in range(10_000)}
    after = {**before, "stream-5": b'{"file":"part-5","line":6}'}
    record = fmt.CommitRecord("0", 9, 1, 0, "t", False, (), fmt.offset_changes(before, after))
    blob = record.encode()
    assert len(blob) < 300
    assert orjson.loads(blob)["body"]["offset_changes"] == {"stream-5": {"file": "part-5", "line": 6}}


def test_a_reset_commit_holds_the_whole_map() -> None:
    record = fmt.CommitRecord("0", 5, 2, 0, "t", True, (), {"a": b"1"})
    assert record.whole_offsets
    assert record.apply_offsets({"old": b"9", "a": b"0"}) == {"a": b"1"}


def _old_commit_body(major: int) -> dict[str, Any]:
    """A commit record as format 1.0 and 2.0 wrote it: ``offsets`` is the whole map."""
    body = orjson.loads(COMMIT.encode())["body"]
    body["format"] = [major, 0]
    body["offsets"] = body.pop("offset_changes")
    return dict(body)


@pytest.mark.parametrize("major", [1, 2])
def test_commit_records_of_formats_1_and_2_hold_the_whole_map(major: int) -> None:
    decoded = fmt.CommitRecord.decode(COMMIT_KEY, _checked(_old_commit_body(major)))
    assert (decoded.major, decoded.reset, decoded.whole_offsets) == (major, False, True)
    assert decoded.offsets == COMMIT.offsets
    # The whole map replaces the one before: a stream it does not name has no offset.
    assert decoded.apply_offsets({"gone": b"3", "orders": b"1"}) == dict(COMMIT.offsets)
    # JSON null was an offset like any other there, never a removal.
    assert decoded.apply_offsets({})["other"] == b"null"
    with pytest.raises(ValueError, match="current format"):
        decoded.encode()  # only the current format is written


@pytest.mark.parametrize("major", [1, 2])
def test_the_map_of_one_version_is_never_read_as_the_other(major: int) -> None:
    # A 2.x record with 3.x's field, or a 3.x record with 2.x's, is damaged, never misread.
    old = _old_commit_body(major)
    old["offset_changes"] = old.pop("offsets")
    with pytest.raises(CorruptDataError, match=f"key={COMMIT_KEY}.*field=offsets"):
        fmt.CommitRecord.decode(COMMIT_KEY, _checked(old))
    new = orjson.loads(COMMIT.encode())["body"]
    new["offsets"] = new.pop("offset_changes")
    with pytest.raises(CorruptDataError, match=f"key={COMMIT_KEY}.*field=offset_changes"):
        fmt.CommitRecord.decode(COMMIT_KEY, _checked(new))


def test_this_format_is_a_new_major_version() -> None:
    """A 4.x reader would take a 5.0 segment's compressed body for framed records (it
    ignores meta fields it does not know), and would find no object under a 5.0 commit's
    inline segments: it must refuse the store instead. (4.0 was a major bump too: a 3.x
    reader would keep the segments a commit's ``rewrites`` replace.)"""
    assert fmt.FORMAT_MAJOR == 5
    assert orjson.loads(COMMIT.encode())["body"]["format"] == [5, fmt.FORMAT_MINOR]


def test_a_commit_with_rewrites_round_trips_and_a_3x_one_has_none() -> None:
    new = fmt.SegmentRef(fmt.segment_key("0", 2, 9), fmt.KIND_EVENTS, "orders", 7, 300)
    record = dataclasses.replace(COMMIT, rewrites=(fmt.Rewrite(
        fmt.KIND_EVENTS, "orders", (fmt.segment_key("0", 1, 1), fmt.segment_key("0", 1, 2)),
        (new,)),))
    assert fmt.CommitRecord.decode(COMMIT_KEY, record.encode()) == record
    body = orjson.loads(record.encode())["body"]
    body["format"] = [3, 0]  # a 3.x record's "rewrites" would be a field it does not know
    assert fmt.CommitRecord.decode(COMMIT_KEY, _checked(body)).rewrites == ()
    body = orjson.loads(record.encode())["body"]
    body["rewrites"][0]["new"][0]["name"] = "other"
    with pytest.raises(CorruptDataError, match="another log"):
        fmt.CommitRecord.decode(COMMIT_KEY, _checked(body))


def test_a_checkpoint_round_trips_and_damage_is_reported() -> None:
    ref = fmt.SegmentRef(fmt.segment_key("0", 1, 1), fmt.KIND_EVENTS, "orders", 2, 201)
    ckpt = fmt.Checkpoint("0", 5, 2, 1_700_000_000_000, "t" * 32, 4, None, (1, 3), 1,
                          {"orders": b"7"}, {(fmt.KIND_EVENTS, "orders"): ((2, ref),)})
    key = fmt.checkpoint_key("0", 5)
    assert fmt.Checkpoint.decode(key, ckpt.encode()) == ckpt
    data = bytearray(ckpt.encode())
    data[40] ^= 1
    with pytest.raises(CorruptDataError, match=f"key={key}"):
        fmt.Checkpoint.decode(key, bytes(data))
    assert fmt.key_kind(key) == "checkpoint"


@pytest.mark.parametrize("version", [[fmt.FORMAT_MAJOR + 1, 0], [99, 7]])
def test_records_of_a_newer_major_version_are_refused(version: list[int]) -> None:
    commit_body = {**orjson.loads(COMMIT.encode())["body"], "format": version}
    with pytest.raises(IncompatibleFormatError, match=f"key={COMMIT_KEY}"):
        fmt.CommitRecord.decode(COMMIT_KEY, _checked(commit_body))
    key = fmt.epoch_key("0", 1)
    epoch_body = {**orjson.loads(fmt.EpochRecord("0", 1, 0, "t").encode())["body"], "format": version}
    with pytest.raises(IncompatibleFormatError, match=f"key={key}"):
        fmt.EpochRecord.decode(key, _checked(epoch_body))


def test_records_of_a_newer_minor_version_are_read() -> None:
    body = {**orjson.loads(COMMIT.encode())["body"], "format": [fmt.FORMAT_MAJOR, 9], "new": "field"}
    assert fmt.CommitRecord.decode(COMMIT_KEY, _checked(body)) == COMMIT


def test_commit_naming_an_unknown_segment_kind_is_refused() -> None:
    body = orjson.loads(COMMIT.encode())["body"]
    body["segments"][0]["kind"] = "a-kind-from-the-future"
    with pytest.raises(IncompatibleFormatError, match="kind"):
        fmt.CommitRecord.decode(COMMIT_KEY, _checked(body))


# --------------------------------------------------------------------------- keys

ids = st.integers(0, 10**20 - 1)


@SETTINGS
@given(a=ids, b=ids)
def test_numbered_keys_sort_numerically(a: int, b: int) -> None:
    for make in (fmt.commit_key, fmt.epoch_key):
        key_a, key_b = make("0", a), make("0", b)
        assert (key_a < key_b) == (a < b)
        assert (key_a == key_b) == (a == b)


@SETTINGS
@given(numbers=st.lists(st.tuples(ids, ids), min_size=2, max_size=20))
def test_segment_keys_sort_by_epoch_then_number(numbers: list[tuple[int, int]]) -> None:
    keys = {fmt.segment_key("0", epoch, number): (epoch, number) for epoch, number in numbers}
    assert [keys[key] for key in sorted(keys)] == sorted(keys.values())


@SETTINGS
@given(writer=names, number=ids)
def test_key_shapes(writer: str, number: int) -> None:
    digits = f"{number:020d}"
    assert fmt.commit_key(writer, number) == f"writers/{writer}/commits/{digits}.json"
    assert fmt.epoch_key(writer, number) == f"writers/{writer}/epochs/{digits}.json"
    assert fmt.segment_key(writer, number, 3) == f"writers/{writer}/segments/{digits}-{3:020d}.seg"
    for key in (fmt.commit_key(writer, number), fmt.epoch_key(writer, number),
                fmt.segment_key(writer, number, number)):
        assert check_key(key) == key  # every key the format makes is a valid driver key
        assert key.startswith(fmt.writer_prefix(writer))
    assert fmt.number_in_key(fmt.commit_key(writer, number), fmt.commits_prefix(writer)) == number
    assert fmt.number_in_key(fmt.epoch_key(writer, number), fmt.epochs_prefix(writer)) == number
    # Every key is parsed where it is made: its kind, and a segment's epoch and number.
    assert fmt.parse_segment_key(fmt.segment_key(writer, number, 3), writer) == (number, 3)
    assert fmt.key_kind(fmt.segment_key(writer, number, 3)) == "segment"
    assert fmt.key_kind(fmt.commit_key(writer, number)) == "commit"
    assert fmt.key_kind(fmt.epoch_key(writer, number)) == "epoch"
    assert fmt.key_kind(fmt.gc_marks_key(writer)) == "other"
    assert fmt.parse_segment_key(fmt.commit_key(writer, number), writer) is None


@pytest.mark.parametrize("key", [
    "writers/0/segments/1-2.seg", "writers/0/segments/00000000000000000001.seg",
    "writers/0/segments/00000000000000000001-00000000000000000002.seg.tmp",
    "writers/1/segments/00000000000000000001-00000000000000000002.seg",
    "other/writers/0/segments/00000000000000000001-00000000000000000002.seg",
])
def test_keys_that_are_not_this_writers_segments(key: str) -> None:
    assert fmt.parse_segment_key(key, "0") is None


@pytest.mark.parametrize(("key", "kind"), [
    ("writers/0/segmentsx/a", "other"), ("writers/0/segments", "other"), ("segments/a", "other"),
    ("commit/segments/1", "other"), ("writers/0/gc/marks.json", "other"),
    ("writers/7/commits/x", "commit"), ("writers/0/epochs/00000000000000000001.json", "epoch"),
])
def test_key_kinds(key: str, kind: str) -> None:
    assert fmt.key_kind(key) == kind


def test_key_numbers_are_twenty_digits() -> None:
    assert fmt.commit_key("0", 0) == "writers/0/commits/00000000000000000000.json"
    assert fmt.commit_key("0", 42) == "writers/0/commits/00000000000000000042.json"
    assert fmt.epoch_key("0", 2**64 - 1) == "writers/0/epochs/18446744073709551615.json"
    assert fmt.segment_key("0", 1, 2) == (
        "writers/0/segments/00000000000000000001-00000000000000000002.seg")
    assert fmt.commit_key("0", 9) < fmt.commit_key("0", 10) < fmt.commit_key("0", 100)


@pytest.mark.parametrize("key", [
    "writers/0/commits/1.json", "writers/0/commits/0000000000000000000001.json",
    "writers/0/commits/00000000000000000001.json.tmp", "writers/0/commits/00000000000000000001",
    "writers/0/commits/x0000000000000000001.json", "writers/0/commits/sub/00000000000000000001.json",
    "writers/1/commits/00000000000000000001.json", "writers/0/epochs/00000000000000000001.json",
    "writers/0/commits/.tmp-00000000000000000001.json", "writers/0/commits/",
])
def test_number_in_key_ignores_other_keys(key: str) -> None:
    assert fmt.number_in_key(key, fmt.commits_prefix("0")) is None


def test_prefixes_nest() -> None:
    writer = fmt.writer_prefix("0")
    for prefix in (fmt.commits_prefix("0"), fmt.epochs_prefix("0"), fmt.segments_prefix("0")):
        assert prefix.startswith(writer)
        assert prefix.endswith("/")
    # One writer's prefix is not a string prefix of another's ("1/" vs "10/").
    assert not fmt.writer_prefix("10").startswith(fmt.writer_prefix("1"))


# --------------------------------------------------------------------------- batch records (format 2.0)


def make_batch_segment(batches: list[tuple[list[bytes], list[bytes] | None, int]], *,
                       kind: str = fmt.KIND_EVENTS) -> tuple[fmt.SegmentRef, bytes]:
    """A segment of batch records framed as the writer frames them (``join_batch``)."""
    key = fmt.segment_key("0", 1, 1)
    body = bytearray()
    for values, offsets, t in batches:
        value, offset = fmt.join_batch(values, offsets)
        fmt.append_record(body, value, offset, t, len(values))
    count = sum(len(values) for values, _, _ in batches)
    data = fmt.encode_segment(fmt.SegmentMeta(key, kind, "orders"), body, count)
    return fmt.SegmentRef(key, kind, "orders", count, len(data)), data


def decoded_events(ref: fmt.SegmentRef, data: bytes, limit: int = 1024) -> list[tuple[Any, Any, int]]:
    out: list[tuple[Any, Any, int]] = []
    for values, offsets, times in fmt.SegmentView(ref, data).event_chunks(limit):
        assert len(values) == len(times)
        assert offsets is None or len(offsets) == len(values)
        out += zip(values, offsets or [None] * len(values), times, strict=True)
    return out


batches = st.lists(st.tuples(
    st.lists(st.tuples(json_values, st.none() | json_values.filter(lambda v: v is not None)),
             min_size=1, max_size=6),
    time_ms), max_size=6)


@SETTINGS
@given(groups=batches, limit=st.integers(1, 8))
def test_batch_records_round_trip(groups: list[tuple[list[tuple[Any, Any]], int]], limit: int) -> None:
    """Any mix of single and batch records, with and without offsets, replays as written."""
    framed = []
    for items, t in groups:
        offsets = [b"" if o is None else orjson.dumps(o) for _, o in items]
        framed.append(([orjson.dumps(v) for v, _ in items], offsets if any(offsets) else None, t))
    ref, data = make_batch_segment(framed)
    expected = [(orjson.loads(orjson.dumps(v)), orjson.loads(orjson.dumps(o)), t)
                for items, t in groups for v, o in items]
    assert decoded_events(ref, data, limit) == expected
    assert sum(f[3] for f in fmt.SegmentView(ref, data).frames()) == len(expected)


def test_a_batch_is_one_record_holding_json_arrays() -> None:
    ref, data = make_batch_segment([([b'{"a":1}', b'"x"', b"[2]"], [b"7", b"", b'{"p":1}'], 42)])
    (value, offset, t, count, _at), = fmt.SegmentView(ref, data).frames()
    assert (value, offset, t, count) == (b'[{"a":1},"x",[2]]', b'[7,null,{"p":1}]', 42, 3)
    assert decoded_events(ref, data) == [({"a": 1}, 7, 42), ("x", None, 42), ([2], {"p": 1}, 42)]


def test_a_batch_of_one_is_a_single_record() -> None:
    assert fmt.join_batch([b'{"a":1}'], [b"5"]) == (b'{"a":1}', b"5")
    assert fmt.join_batch([b'{"a":1}'], None) == (b'{"a":1}', b"")
    assert fmt.join_batch([b"1", b"2"], None) == (b"[1,2]", b"")


def _segment_with_records(recs: list[tuple[bytes, bytes, int, int]], count: int,
                          kind: str = fmt.KIND_EVENTS) -> tuple[fmt.SegmentRef, bytes]:
    """Records framed with any counts (valid CRCs), under a trailer that says ``count``."""
    key = fmt.segment_key("0", 1, 1)
    body = bytearray()
    for value, offset, t, n in recs:
        fmt.append_record(body, value, offset, t, n)
    data = fmt.encode_segment(fmt.SegmentMeta(key, kind, "orders"), body, count)
    return fmt.SegmentRef(key, kind, "orders", count, len(data)), data


@pytest.mark.parametrize(("recs", "count"), [
    ([(b"[1,2,3]", b"", 0, 2)], 2),             # the array holds 3 items, the record says 2
    ([(b"[1,2]", b"[1]", 0, 2)], 2),            # offsets of another length
    ([(b'{"a":1}', b"", 0, 2)], 2),             # a batch whose value is no array
    ([(b"1", b"", 0, 0)], 0),                   # a record of no entry
    ([(b"1", b"", 0, 1), (b"[1,2]", b"", 0, 2)], 2),  # counts add up past the trailer's
    ([(b"[1,2]", b"", 0, 2)], 3),               # counts fall short of the trailer's
])
def test_batch_counts_that_do_not_hold_are_corrupt(recs: list[tuple[bytes, bytes, int, int]],
                                                   count: int) -> None:
    ref, data = _segment_with_records(recs, count)
    expect_corrupt(ref.key, data, lambda: decoded_events(ref, data))


def test_a_batch_in_a_table_segment_is_corrupt() -> None:
    ref, data = _segment_with_records([(b'[["k",1],["j",2]]', b"", 0, 2)], 2, kind=fmt.KIND_TABLE)
    with pytest.raises(CorruptDataError, match=f"holds a batch in a table log: key={ref.key}"):
        list(fmt.SegmentView(ref, data).records())


def test_a_format_1_segment_is_read_with_its_own_framing() -> None:
    """Format 1.0 records have a 16-byte head and no count: one entry each."""
    key = fmt.segment_key("0", 1, 1)
    body = bytearray()
    for value, offset, t in SAMPLE:
        head = fmt.RECORD_HEAD_V1.pack(len(value), len(offset), t)
        body += head + value + offset + fmt.U32.pack(zlib.crc32(offset, zlib.crc32(value, zlib.crc32(head))))
    data = _reheader(fmt.encode_segment(fmt.SegmentMeta(key, fmt.KIND_EVENTS, "orders"), body,
                                        len(SAMPLE)), 1, 0)
    ref = fmt.SegmentRef(key, fmt.KIND_EVENTS, "orders", len(SAMPLE), len(data))
    assert read_segment(ref, data) == [(v, o or None, t) for v, o, t in SAMPLE]
    assert decoded_events(ref, data) == [(orjson.loads(v), orjson.loads(o) if o else None, t)
                                         for v, o, t in SAMPLE]
    damaged = bytearray(data)
    damaged[len(data) - 28 - 6] ^= 0x01  # inside the last record's value
    expect_corrupt(ref.key, data, lambda: read_segment(ref, bytes(damaged)))
