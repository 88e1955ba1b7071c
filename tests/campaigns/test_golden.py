"""Format stability: the golden store of every released format version still reads.

``tests/golden/format-X.Y/`` holds a small store written by format version X.Y (made once
by ``tests/support/make_golden.py``, never regenerated) and ``expected.json``, what it must read
back as. Every later version must replay each golden store to exactly those events,
offsets, table states and cached results, on every backend, and go on writing to it; a
copy whose version is bumped to a newer major (in any object a reader reads: a commit or
epoch record, a segment, from 4.0 on the newest checkpoint) must be refused with
``IncompatibleFormatError``, and one bumped to a newer minor must still be read (see
"Compatibility" in docs/format.md). The golden files are uploaded to a fresh store first:
no run ever writes into ``tests/``.
"""

from __future__ import annotations

import base64
import datetime
import os
import re
import socket
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_backend
from helpers import read_golden_shape, stored_objects

import apersist
from apersist._drivers import open_driver
from apersist._inspect import summarize, verify

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
VERSIONS = sorted(p.name for p in GOLDEN.glob("format-*"))
CURRENT = f"format-{apersist.FORMAT_MAJOR}.{apersist.FORMAT_MINOR}"
QUIET = 3_600_000

_HEAD = struct.Struct("<8sHHI")


def golden_objects(version: str) -> dict[str, bytes]:
    store = GOLDEN / version / "store"
    return {p.relative_to(store).as_posix(): p.read_bytes()
            for p in sorted(store.rglob("*")) if p.is_file()}


def golden_expected(version: str) -> dict[str, Any]:
    expected: dict[str, Any] = orjson.loads((GOLDEN / version / "expected.json").read_bytes())
    return expected


async def upload(backend: apersist.Backend, objects: dict[str, bytes]) -> None:
    driver = open_driver(backend)
    try:
        for key, data in objects.items():
            await driver.put(key, data)
    finally:
        await driver.aclose()


async def problems(backend: apersist.Backend) -> list[str]:
    driver = open_driver(backend)
    try:
        return await verify(driver)
    finally:
        await driver.aclose()


async def read_everything(backend: apersist.Backend, expected: dict[str, Any],
                          *, access: apersist.SnapshotAccess = apersist.SnapshotAccess.REPLAY,
                          ) -> dict[str, Any]:
    """What a run reads from the store, in the shape of ``expected.json``."""
    return await read_golden_shape(backend, expected, access=access, snapshot_interval_ms=QUIET)


def assert_exactly(got: dict[str, Any], expected: dict[str, Any]) -> None:
    # Compared as orjson bytes: types count (1 vs 1.0 vs true, -0.0 vs 0.0), and so does
    # the order of events and of keys.
    if orjson.dumps(got) != orjson.dumps(expected):
        assert got == expected  # shows the difference
        raise AssertionError(f"same values, different types or order: got={got} "
                             f"expected={expected}")


# --------------------------------------------------------------------------- the store itself
def test_there_is_a_golden_store_for_the_current_format_version() -> None:
    assert CURRENT in VERSIONS, "run tests/support/make_golden.py and check the store in"


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_store_is_small_and_covers_the_format(version: str) -> None:
    objects = golden_objects(version)
    assert sum(len(d) for d in objects.values()) < 100_000
    commits = [orjson.loads(d[len(b'{"body":'):d.rfind(b',"crc32":')])
               for k, d in objects.items() if "/commits/" in k]
    kinds = {ref["kind"] for c in commits for ref in c["segments"]}
    assert kinds == {"events", "table", "table-snapshot", "cache"}
    assert len({c["epoch"] for c in commits}) >= 2
    per_log = [sum(1 for r in c["segments"] if (r["kind"], r["name"]) == (ref["kind"], ref["name"]))
               for c in commits for ref in c["segments"]]
    assert max(per_log) >= 2, "no commit cuts one log into several segments"
    if int(version.removeprefix("format-").partition(".")[0]) >= 3:
        # A commit record holds the offsets it changed: some commit changes one stream's
        # offset and leaves another's, set earlier, alone; a fence commit changes none.
        assert all(c["offset_changes"] == {} for c in commits if not c["segments"])
        have: set[str] = set()
        partial = False
        for c in commits:
            changed = set(c["offset_changes"])
            partial = partial or bool(changed and have - changed)
            have |= changed
        assert partial, "no commit leaves a stream's offset alone"
    if int(version.removeprefix("format-").partition(".")[0]) >= 4:
        # Checkpoints, a commit that merges segments, and commits after the newest
        # checkpoint: opening reads a checkpoint and then records.
        checkpoints = checkpoint_keys(objects)
        assert len(checkpoints) >= 2, "no older checkpoint beside the newest"
        newest = orjson.loads(_body(objects[checkpoints[-1]]))["seq"]
        merges = [r for c in commits for r in c.get("rewrites", [])
                  if len(r["old"]) > len(r["new"]) >= 1]
        assert merges, "no commit merges segments"
        assert any(c["seq"] > newest and c["segments"] for c in commits)
    if _version_tuple(version) >= (4, 1):
        # Epoch records name their writer: host, pid and the run's label.
        epochs = [orjson.loads(_body(objects[k])) for k in epoch_keys(objects)]
        assert [(e["host"], e["pid"], e["label"]) for e in epochs] == [
            ("golden-host", 4242, f"golden-{n}") for n in range(1, len(epochs) + 1)]
    if _version_tuple(version) >= (5, 0):
        # Small commits carry their segments inline, a big one uploads them, and bodies are
        # stored both zstd-compressed and raw, inline and as objects.
        refs = [r for c in commits for r in c["segments"]]
        inline = [base64.b64decode(r["data"]) for r in refs if "data" in r]
        uploaded = [objects[r["key"]] for r in refs if "data" not in r]
        uploaded += [objects[n["key"]] for c in commits for rewrite in c.get("rewrites", [])
                     for n in rewrite["new"]]
        assert inline
        assert uploaded
        assert {_segment_meta(s).get("codec") for s in inline} == {None, "zstd"}
        assert "zstd" in {_segment_meta(s).get("codec") for s in uploaded}


def _segment_meta(segment: bytes) -> dict[str, Any]:
    _magic, _major, _minor, meta_len = _HEAD.unpack_from(segment, 0)
    meta: dict[str, Any] = orjson.loads(segment[_HEAD.size:_HEAD.size + meta_len])
    return meta


def _version_tuple(version: str) -> tuple[int, int]:
    major, _, minor = version.removeprefix("format-").partition(".")
    return int(major), int(minor)


def _without_token(key: str, data: bytes) -> bytes:
    if not key.endswith(".json") or "/writers/" not in f"/{key}":
        return data
    body = orjson.loads(_body(data))
    body.pop("token", None)
    return orjson.dumps(body)


def test_this_writer_still_writes_the_current_golden_store(tmp_path: Path) -> None:
    """make_golden.py run now writes the current format's golden store again: the same
    keys, the same segment bytes, the same records up to their random tokens. Bytes that
    change without a new format version fail here."""
    import make_golden

    assert make_golden.main(["--out", str(tmp_path / "out")]) == 0
    made = {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
            for p in (tmp_path / "out").rglob("*") if p.is_file()}
    kept = {p.relative_to(GOLDEN / CURRENT).as_posix(): p.read_bytes()
            for p in (GOLDEN / CURRENT).rglob("*") if p.is_file()}
    assert sorted(made) == sorted(kept)
    for key, data in kept.items():
        assert _without_token(key, made[key]) == _without_token(key, data), key


# --------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("version", VERSIONS)
async def test_golden_store_replays_exactly(backend: apersist.Backend, version: str) -> None:
    objects, expected = golden_objects(version), golden_expected(version)
    await upload(backend, objects)
    assert await problems(backend) == []
    assert_exactly(await read_everything(backend, expected), expected)
    assert await stored_objects(backend) == objects  # a read-only run writes nothing


@pytest.mark.parametrize("version", VERSIONS)
async def test_golden_store_takes_new_commits_and_keeps_its_history(
        backend: apersist.Backend, version: str) -> None:
    objects, expected = golden_objects(version), golden_expected(version)
    await upload(backend, objects)
    assert_exactly(await read_everything(backend, expected, access=apersist.SnapshotAccess.FULL),
                   expected)
    clock_ms = 1_800_000_000_000
    async with apersist.run(apersist.Config(backend), clock_ms=lambda: clock_ms) as run:
        await run.stream("orders").record({"new": "ü"}, offset={"new": 1})
        table = await run.table("counts")
        table["new-key"] = [1, 2]
        await run.commit()
        await run.compact()
    after = await stored_objects(backend)
    # Nothing rewritten: compact() wrote a newer checkpoint beside the others.
    assert all(after[key] == data for key, data in objects.items())
    assert len(after) > len(objects)
    want = orjson.loads(orjson.dumps(expected))
    want["streams"]["orders"]["events"].append([{"new": "ü"}, {"new": 1}, clock_ms])
    want["streams"]["orders"]["offset"] = {"new": 1}
    want["tables"]["counts"]["new-key"] = [1, 2]
    assert_exactly(await read_everything(backend, want), want)
    assert await problems(backend) == []


@pytest.mark.parametrize("kind", ["memory", "filesystem"])
@pytest.mark.parametrize("version", VERSIONS)
async def test_the_writer_of_every_golden_store_is_named_and_a_new_one_names_itself(
        kind: str, version: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Epoch records name their writer from format 4.1 on. Older ones, which do not, still
    open: ``apersist inspect`` reports their writer's epoch and start, with no host, pid or
    label. A writer of this version that continues the store names itself."""
    objects = golden_objects(version)
    backend = make_backend(kind, tmp_path, request)
    await upload(backend, objects)

    async def writer() -> dict[str, Any]:
        driver = open_driver(backend)
        try:
            entry: dict[str, Any] = (await summarize(driver)).to_json()["writer"]
            return entry
        finally:
            await driver.aclose()

    newest = orjson.loads(_body(objects[epoch_keys(objects)[-1]]))
    named = _version_tuple(version) >= (4, 1)
    assert await writer() == {
        "epoch": newest["epoch"], "host": "golden-host" if named else None,
        "pid": 4242 if named else None, "label": "golden-3" if named else None,
        "started": apersist_time(newest["time_ms"]), "started_ms": newest["time_ms"]}
    async with apersist.run(apersist.Config(backend, writer_label="continued")) as run:
        await run.stream("orders").record("from this version")
    after = await writer()
    assert (after["epoch"], after["host"], after["pid"], after["label"]) == (
        newest["epoch"] + 1, socket.gethostname(), os.getpid(), "continued")
    assert await problems(backend) == []


def apersist_time(time_ms: int) -> str:
    """``time_ms`` as inspect shows it: ISO 8601 UTC with milliseconds."""
    moment = datetime.datetime.fromtimestamp(time_ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{time_ms % 1000:03d}Z"


# --------------------------------------------------------------------------- newer versions
def _checked_json(body: bytes) -> bytes:
    return b'{"body":%s,"crc32":%d}' % (body, zlib.crc32(body))


def _body(data: bytes) -> bytes:
    return data[len(b'{"body":'):data.rfind(b',"crc32":')]


def bump_record(data: bytes, major: int, minor: int) -> bytes:
    """A commit or epoch record with only its version (and so its CRC) changed."""
    body = _body(data)
    found = re.findall(rb'"format":\[\d+,\d+\]', body)
    assert len(found) == 1
    return _checked_json(body.replace(found[0], b'"format":[%d,%d]' % (major, minor)))


def bump_segment(data: bytes, major: int, minor: int) -> bytes:
    magic, _major, _minor, meta_len = _HEAD.unpack_from(data, 0)
    head = _HEAD.pack(magic, major, minor, meta_len) + data[_HEAD.size:_HEAD.size + meta_len]
    bumped = head + struct.pack("<I", zlib.crc32(head)) + data[len(head) + 4:]
    # Only the version and the header CRC differ: the damage checks must all still pass.
    changed = [i for i, (a, b) in enumerate(zip(data, bumped, strict=True)) if a != b]
    crc_at = _HEAD.size + meta_len
    assert changed
    assert all(8 <= i < 12 or crc_at <= i < crc_at + 4 for i in changed)
    return bumped


def commit_keys(objects: dict[str, bytes]) -> list[str]:
    return sorted(k for k in objects if re.search(r"/commits/\d{20}\.json$", k))


def epoch_keys(objects: dict[str, bytes]) -> list[str]:
    return sorted(k for k in objects if re.search(r"/epochs/\d{20}\.json$", k))


def checkpoint_keys(objects: dict[str, bytes]) -> list[str]:
    return sorted(k for k in objects if re.search(r"/checkpoints/\d{20}\.json$", k))


def first_read_commit(objects: dict[str, bytes]) -> str:
    """The first commit record a reader opening the store reads: the first after the
    newest checkpoint (the commits folded into it are never read), else the first of all."""
    commits = commit_keys(objects)
    if not checkpoint_keys(objects):
        return commits[0]
    start = orjson.loads(_body(objects[checkpoint_keys(objects)[-1]]))["seq"]
    return next(k for k in commits if orjson.loads(_body(objects[k]))["seq"] > start)


def segment_of_kind(objects: dict[str, bytes], kind: str) -> str:
    """The newest segment of ``kind``: it is live (older table deltas are superseded by the
    snapshot, so a reader rightly never opens them)."""
    keys = [ref["key"] for key in commit_keys(objects)
            for ref in orjson.loads(_body(objects[key]))["segments"] if ref["kind"] == kind]
    assert keys, f"the golden store has no segment of kind {kind}"
    return str(keys[-1])


SEGMENT_KINDS = ["events", "table", "table-snapshot", "cache"]
FAST_KINDS = ["memory", "filesystem"]


@pytest.mark.parametrize("kind", FAST_KINDS)
@pytest.mark.parametrize("where", ["first-commit", "last-commit", "epoch", "checkpoint",
                                   *(f"segment:{k}" for k in SEGMENT_KINDS)])
async def test_a_newer_major_version_is_refused(
        kind: str, where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    objects, expected = golden_objects(CURRENT), golden_expected(CURRENT)
    if where.startswith("segment:"):
        key = segment_of_kind(objects, where.partition(":")[2])
        edit_segment(objects, key, lambda seg: bump_segment(seg, apersist.FORMAT_MAJOR + 1, 0))
    else:
        # The first commit a reader reads (from 4.0 on, the first after the checkpoint),
        # the last, the newest epoch, the newest checkpoint.
        key = {"first-commit": lambda: first_read_commit(objects),
               "last-commit": lambda: commit_keys(objects)[-1],
               "epoch": lambda: epoch_keys(objects)[-1],
               "checkpoint": lambda: checkpoint_keys(objects)[-1]}[where]()
        objects[key] = bump_record(objects[key], apersist.FORMAT_MAJOR + 1, 0)
    backend = make_backend(kind, tmp_path, request)
    await upload(backend, objects)
    with pytest.raises(apersist.IncompatibleFormatError, match=re.escape(key)):
        await read_everything(backend, expected)
    if not where.startswith("segment:"):
        # A writer refuses at open, before it writes anything: the newer store is unharmed.
        with pytest.raises(apersist.IncompatibleFormatError, match=re.escape(key)):
            async with apersist.run(apersist.Config(backend)):
                pass
        assert await stored_objects(backend) == objects


def edit_segment(objects: dict[str, bytes], key: str, edit: Callable[[bytes], bytes]) -> None:
    """Replace segment ``key`` by ``edit`` of its bytes, where they are: its own object, or
    (format 5.0) inline in the commit record that added it, whose entry then names the new
    size. A segment inline is never folded into a checkpoint in the golden stores' newest
    commits, which are the ones edited here."""
    if key in objects:
        objects[key] = edit(objects[key])
        return
    for record_key in commit_keys(objects):
        def inline(body: dict[str, Any]) -> None:
            for ref in body["segments"]:
                if ref["key"] == key:
                    data = edit(base64.b64decode(ref["data"]))
                    ref["data"], ref["size"] = base64.b64encode(data).decode(), len(data)
        if any(ref["key"] == key and "data" in ref
               for ref in orjson.loads(_body(objects[record_key]))["segments"]):
            objects[record_key] = rewrite_record(objects[record_key], inline)
            return
    raise AssertionError(f"no segment {key} in the golden store")


def rewrite_record(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    body = orjson.loads(_body(data))
    edit(body)
    return _checked_json(orjson.dumps(body))


def segment_with_minor(data: bytes, minor: int) -> bytes:
    """The segment as a newer minor version could write it: its meta has an extra field."""
    magic, major, _minor, meta_len = _HEAD.unpack_from(data, 0)
    meta = orjson.loads(data[_HEAD.size:_HEAD.size + meta_len])
    meta["added_in_minor"] = [1, "x"]
    raw = orjson.dumps(meta)
    head = _HEAD.pack(magic, major, minor, len(raw)) + raw
    # Body and trailer stay as they are: their checks cover only the body.
    return head + struct.pack("<I", zlib.crc32(head)) + data[_HEAD.size + meta_len + 4:]


@pytest.mark.parametrize("kind", FAST_KINDS)
async def test_a_newer_minor_version_is_read_and_written_to(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    objects, expected = golden_objects(CURRENT), golden_expected(CURRENT)
    major, minor = expected["format"][0], expected["format"][1] + 1
    for key in [k for k in objects if k.endswith(".seg")]:
        objects[key] = segment_with_minor(objects[key], minor)

    sizes = {key: len(data) for key, data in objects.items()}

    def newer(body: dict[str, Any]) -> None:
        body["format"] = [major, minor]
        body["added_in_minor"] = {"x": [1, 2]}  # a field this version does not know
        refs = [*body.get("segments", []),
                *(ref for rewrite in body.get("rewrites", []) for ref in rewrite["new"])]
        for ref in refs:
            if "data" in ref:  # a segment inline in its commit record (5.0)
                data = segment_with_minor(base64.b64decode(ref["data"]), minor)
                ref["data"] = base64.b64encode(data).decode()
                sizes[ref["key"]] = len(data)
            ref["size"] = sizes[ref["key"]]
            ref["added_in_minor"] = True
        for log in body.get("logs", []):  # a checkpoint's: [seq, key, records, size, ...]
            for seg in log["segments"]:
                seg[3] = sizes[seg[1]]
            log["added_in_minor"] = True

    records = commit_keys(objects) + epoch_keys(objects) + checkpoint_keys(objects)
    for key in records:
        objects[key] = rewrite_record(objects[key], newer)
    backend = make_backend(kind, tmp_path, request)
    await upload(backend, objects)
    assert await problems(backend) == []
    assert_exactly(await read_everything(backend, expected), expected)
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream("clicks").record("from an older minor")
    after = await stored_objects(backend)
    assert all(after[key] == data for key, data in objects.items())  # nothing rewritten
    want = orjson.loads(orjson.dumps(expected))
    events = [e[:2] for e in (await read_everything(backend, want))["streams"]["clicks"]["events"]]
    assert events == [e[:2] for e in want["streams"]["clicks"]["events"]] + [
        ["from an older minor", None]]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_golden_store_is_not_newer_than_this_reader(version: str) -> None:
    major, minor = golden_expected(version)["format"]
    assert version == f"format-{major}.{minor}"
    assert major <= apersist.FORMAT_MAJOR
