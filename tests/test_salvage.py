"""``apersist salvage`` and ``apersist dump`` on damaged stores, on every real backend.

One store is built per backend (filesystem, S3 on moto_server, Azure on Azurite), with
known contents: stream ``a`` of three segments of 500 events (offsets 0..1499), stream
``b`` of 10 events without offsets, table ``t`` (a snapshot of 30 keys, then 5 updates and
a delete), 8 ``@cached`` results, a checkpoint. Then, one case at a time, one object is
damaged as the corruption campaign damages objects (tests/campaigns/test_corruption.py: a
flipped bit in the header, body or trailer, a truncation, a zero-filled range, a deletion,
the bytes of another object of the same or another kind), and the command line salvages
the store into a fresh root. Each case checks the new store by opening it with
``apersist.run``: every kept event is the written one, in order, and nothing else; the
report's kept and lost add up to what was written; offsets, table and cache are as the
report says; the damaged object is named with a byte offset; the exit code is 1.

The expectations are written by hand from the build, never read back through apersist.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers
import orjson
import pytest
from conftest import TEST_BUCKET, TEST_CONTAINER, make_backend
from servers import AZURITE_ACCOUNT, AZURITE_KEY, S3_KEY_ID, S3_REGION, S3_SECRET

import apersist
from apersist import _format as fmt
from apersist._cli import main
from apersist._drivers import open_driver

A_SEGMENTS = 3
PER_SEGMENT = 500
A_EVENTS = [{"a": i} for i in range(A_SEGMENTS * PER_SEGMENT)]
B_EVENTS = [f"b{i}" for i in range(10)]
SNAPSHOT = {f"k{i:02d}": i for i in range(30)}
# The deltas after the snapshot, in the order they were set (a commit's deltas are framed
# in that order): five updates, then a delete.
DELTAS: list[tuple[str, Any]] = [*((f"k{i:02d}", 100 + i) for i in range(5)), ("k05", None)]
CACHE_ARGS = list(range(8))
CALLS: list[int] = []


@apersist.cached(name="salvage-square")
def square(n: int) -> int:
    CALLS.append(n)
    return n * n


def table_after(snapshot_kept: int, deltas_kept: int) -> dict[str, Any]:
    """The table a salvage rebuilds from the first records of the snapshot and the deltas."""
    state = dict(list(SNAPSHOT.items())[:snapshot_kept])
    for key, value in DELTAS[:deltas_kept]:
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    return state


async def build(backend: apersist.Backend) -> None:
    config = apersist.Config(backend, snapshot_interval_ms=3_600_000)
    async with apersist.run(config) as run:
        a = run.stream("a")
        for i in range(PER_SEGMENT):
            await a.record(A_EVENTS[i], offset=i)
        await run.commit()
        table = await run.table("t")
        for key, value in SNAPSHOT.items():
            table[key] = value
        for n in CACHE_ARGS:
            square(n)
        await run.commit()
        await run.compact()  # the table's snapshot, and a checkpoint
        for i in range(PER_SEGMENT, 2 * PER_SEGMENT):
            await a.record(A_EVENTS[i], offset=i)
        await run.commit()
        for value in B_EVENTS:
            await run.stream("b").record(value)
        for key, value in DELTAS:
            if value is None:
                del table[key]
            else:
                table[key] = value
        await run.commit()
        for i in range(2 * PER_SEGMENT, 3 * PER_SEGMENT):
            await a.record(A_EVENTS[i], offset=i)
        await run.commit()


@dataclass
class Seen:
    """What a run on the salvaged store shows."""

    a: list[Any] = field(default_factory=list)
    a_offsets: list[Any] = field(default_factory=list)
    a_offset: Any = None
    b: list[Any] = field(default_factory=list)
    b_offset: Any = None
    table: dict[str, Any] = field(default_factory=dict)
    misses: list[int] = field(default_factory=list)


async def observe(backend: apersist.Backend) -> Seen:
    seen = Seen()
    async with apersist.run(apersist.Config(backend)) as run:
        async for event in run.stream("a").replay():
            seen.a.append(event.value)
            seen.a_offsets.append(event.offset)
        async for event in run.stream("b").replay():
            seen.b.append(event.value)
        seen.a_offset, seen.b_offset = run.stream("a").offset, run.stream("b").offset
        seen.table = dict(await run.table("t"))
        CALLS.clear()
        for n in CACHE_ARGS:
            assert square(n) == n * n
        seen.misses = list(CALLS)
    return seen


# ----------------------------------------------------------------------------- roots


@dataclass
class Roots:
    """Command-line roots on one backend kind, and the environment they need."""

    kind: str
    tmp: Path
    request: pytest.FixtureRequest
    env: dict[str, str] = field(default_factory=dict)

    def new(self) -> tuple[str, apersist.Backend]:
        """A fresh root: its command-line spelling, and its Backend."""
        if self.kind == "filesystem":
            path = self.tmp / f"store-{uuid.uuid4().hex[:8]}"
            return str(path), apersist.Backend.filesystem(path)
        backend = make_backend(self.kind, self.tmp, self.request)
        scheme, where = ("s3", TEST_BUCKET) if self.kind == "s3" else ("az", TEST_CONTAINER)
        return f"{scheme}://{where}/{backend.root_path}", backend  # type: ignore[attr-defined]


@pytest.fixture(params=["filesystem", "s3", "azure"])
def roots(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Roots:
    kind = str(request.param)
    if kind == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        request.getfixturevalue("s3_bucket")
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY_ID,
               "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": S3_REGION}
    elif kind == "azure":
        endpoint = request.getfixturevalue("azure_endpoint")
        request.getfixturevalue("azure_container")
        env = {"AZURE_STORAGE_ACCOUNT": AZURITE_ACCOUNT, "AZURE_STORAGE_KEY": AZURITE_KEY,
               "AZURE_STORAGE_ENDPOINT": endpoint}
    else:
        env = {}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Roots(kind, tmp_path, request, env)


# ----------------------------------------------------------------------------- objects


@dataclass
class Built:
    root: str
    backend: apersist.Backend
    objects: dict[str, bytes]  # every object of the store as built
    a_segments: list[str]
    table_delta: str
    table_snapshot: str
    cache: str
    middle_commit: str  # the commit that adds a's second segment
    checkpoint: str
    epoch: str


def _commit_bodies(objects: dict[str, bytes]) -> list[dict[str, Any]]:
    prefix = fmt.commits_prefix(fmt.WRITER)
    return [orjson.loads(data)["body"] for key, data in sorted(objects.items())
            if key.startswith(prefix)]


def build_store(roots: Roots) -> Built:
    root, backend = roots.new()
    asyncio.run(build(backend))

    async def read_all() -> dict[str, bytes]:
        driver = open_driver(backend)
        try:
            return {info.key: await driver.get(info.key) async for info in driver.list("")}
        finally:
            await driver.aclose()

    objects = asyncio.run(read_all())
    refs: dict[tuple[str, str], list[str]] = {}
    middle = ""
    for body in _commit_bodies(objects):
        for ref in body["segments"]:
            refs.setdefault((ref["kind"], ref["name"]), []).append(ref["key"])
            if ref["kind"] == fmt.KIND_EVENTS and ref["name"] == "a" and len(
                    refs[(fmt.KIND_EVENTS, "a")]) == 2:
                middle = fmt.commit_key(fmt.WRITER, body["seq"])
    assert len(refs[(fmt.KIND_EVENTS, "a")]) == A_SEGMENTS, refs
    checkpoints = sorted(k for k in objects if k.startswith(fmt.checkpoints_prefix(fmt.WRITER)))
    epochs = sorted(k for k in objects if k.startswith(fmt.epochs_prefix(fmt.WRITER)))
    return Built(root, backend, objects, refs[(fmt.KIND_EVENTS, "a")],
                 refs[(fmt.KIND_TABLE, "t")][-1], refs[(fmt.KIND_TABLE_SNAPSHOT, "t")][-1],
                 refs[(fmt.KIND_CACHE, fmt.CACHE_LOG)][-1], middle, checkpoints[-1], epochs[-1])


# ----------------------------------------------------------------------------- damage


@dataclass(frozen=True)
class Damage:
    name: str
    data: bytes | None  # None: deleted


def damages(key: str, objects: dict[str, bytes], *, full: bool) -> Iterator[Damage]:
    """The corruption campaign's damage kinds, applied to ``key``."""
    data = objects[key]
    middle = len(data) // 2
    if key.endswith(".seg"):
        (meta_len,) = struct.unpack_from("<I", data, 12)
        points = {"header": 16 + meta_len // 2, "body": (16 + meta_len + 4 + len(data) - 28) // 2,
                  "trailer": len(data) - 12}
    else:
        points = {"body": middle}
    for where, position in (points if full else {"body": points["body"]}).items():
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        yield Damage(f"flip bit in the {where} offset={position}", bytes(flipped))
    yield Damage(f"truncate to length={middle}", data[:middle])
    yield Damage(f"zero-fill offset={middle} size=16",
                 data[:middle] + bytes(16) + data[middle + 16:])
    yield Damage("delete", None)
    if full:
        same = next(k for k in sorted(objects) if k != key and k.endswith(".seg")
                    ) if key.endswith(".seg") else key
        other = next(k for k in sorted(objects) if k.startswith(fmt.epochs_prefix(fmt.WRITER)))
        if same != key:
            yield Damage(f"replace with the bytes of {same} (same kind)", objects[same])
        yield Damage(f"replace with the bytes of {other} (another kind)", objects[other])


async def _put(backend: apersist.Backend, key: str, data: bytes | None) -> None:
    driver = open_driver(backend)
    try:
        if data is None:
            await driver.delete([key])
        else:
            await driver.put(key, data)
    finally:
        await driver.aclose()


# ----------------------------------------------------------------------------- expectations


def check_common(doc: dict[str, Any], seen: Seen, code: int) -> list[str]:
    """What every case must show, whatever was damaged."""
    problems = []
    streams = doc["streams"]
    for name, written in (("a", A_EVENTS), ("b", B_EVENTS)):
        if name not in streams:
            continue
        log = streams[name]
        got = seen.a if name == "a" else seen.b
        if got != written[:log["kept"]]:
            problems.append(f"stream {name}: kept events differ from the written ones: "
                            f"got={len(got)} reported kept={log['kept']}")
        if log["kept"] + log["lost"] != log["written"]:
            problems.append(f"stream {name}: kept + lost != written: {log}")
    if seen.a_offsets != list(range(len(seen.a))):
        problems.append("stream a: the kept events' offsets are not theirs")
    if doc["complete"] != (code == 0):
        problems.append(f"exit code {code} disagrees with complete={doc['complete']}")
    return problems


def names_damage(doc: dict[str, Any], key: str) -> bool:
    found = [d for d in doc["log_damage"] if d["key"] == key]
    for part in [*doc["streams"].values(), *doc["tables"].values(), doc["cache"]]:
        found += [d for d in part["damage"] if d["key"] == key]
    return any(f"key={key}" in d["message"] and "offset=" in d["message"] for d in found)


def expect_for(target: str, built: Built, damage: Damage, doc: dict[str, Any],
               seen: Seen) -> list[str]:
    """What salvage must give when ``target`` is damaged so."""
    problems = []
    a = doc["streams"].get("a", {"kept": 0})
    table = doc["tables"].get("t", {})
    full_table = table_after(len(SNAPSHOT), len(DELTAS))
    if target == "a-segment":
        # The first segment whole; of the damaged second one, the records before the
        # damage (all of them when only the trailer is hit); the third is lost unless the
        # damaged segment's records all read whole.
        if not PER_SEGMENT <= a["kept"] <= 3 * PER_SEGMENT:
            problems.append(f"stream a kept {a['kept']}")
        lost_whole = damage.data is None or "header" in damage.name or "replace" in damage.name
        if lost_whole and a["kept"] != PER_SEGMENT:
            problems.append(f"stream a kept {a['kept']}, expected {PER_SEGMENT}")
        if "trailer" in damage.name and a["kept"] != len(A_EVENTS):
            problems.append(f"a damaged trailer lost records: kept {a['kept']}")
        want_offset = a["kept"] - 1 if a["kept"] else None
        if seen.a_offset != want_offset:
            problems.append(f"stream a offset {seen.a_offset}, expected {want_offset}")
        if seen.b != B_EVENTS or seen.table != full_table or seen.misses:
            problems.append("damage to a segment of stream a changed another log")
    elif target in ("table-delta", "table-snapshot"):
        want = table_after(table["snapshot_kept"], table["deltas_kept"])
        if seen.table != want:
            problems.append(f"table: got {seen.table}, expected {want}")
        if target == "table-delta" and table["snapshot_kept"] != len(SNAPSHOT):
            problems.append("damage to a delta segment lost snapshot records")
        if target == "table-snapshot" and table["deltas_kept"] != len(DELTAS):
            problems.append("damage to the snapshot lost deltas")
        if seen.a != A_EVENTS or seen.b != B_EVENTS or seen.misses:
            problems.append("damage to the table changed another log")
    elif target == "cache":
        kept = doc["cache"]["kept"]
        if seen.misses != CACHE_ARGS[kept:]:
            problems.append(f"cache: misses {seen.misses}, expected {CACHE_ARGS[kept:]}")
        if seen.a != A_EVENTS or seen.table != full_table:
            problems.append("damage to the cache changed another log")
    elif target == "middle-commit":
        # The state of the commit before: a's first segment, the table's snapshot only,
        # the cache; nothing of b. The commits from the damaged one on are lost.
        if seen.a != A_EVENTS[:PER_SEGMENT] or seen.a_offset != PER_SEGMENT - 1:
            problems.append(f"stream a: {len(seen.a)} events, offset {seen.a_offset}")
        if seen.b or seen.table != SNAPSHOT or seen.misses:
            problems.append("not the state of the commit before the damaged one")
        # The commits after the last whole one: the damaged (or missing) one and the two
        # after it.
        if doc["lost_commits"] != 3:
            problems.append(f"lost_commits={doc['lost_commits']}, expected 3")
        # What the two readable commits after it added is reported; the damaged one's is not
        # known.
        later = doc["lost_in_later_commits"]
        if (later["streams"], later["tables"], later["unreadable_commits"]) != (
                {"a": PER_SEGMENT, "b": len(B_EVENTS)}, {"t": len(DELTAS)}, 1):
            problems.append(f"lost_in_later_commits={later}")
    elif target in ("checkpoint", "epoch"):
        # Worked around: the log reads whole from the commit records; nothing is lost.
        if (seen.a, seen.b, seen.table, seen.misses) != (A_EVENTS, B_EVENTS, full_table, []):
            problems.append("a damaged checkpoint or epoch record lost data")
        if seen.a_offset != len(A_EVENTS) - 1:
            problems.append(f"stream a offset {seen.a_offset}")
    return problems


# ----------------------------------------------------------------------------- the tests


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_salvage_of_a_whole_store_copies_everything(
        roots: Roots, capsys: pytest.CaptureFixture[str]) -> None:
    built = build_store(roots)
    dest, dest_backend = roots.new()
    code, doc, _err = run_cli(["salvage", built.root, dest, "--json"], capsys)
    assert code == 0, doc
    assert doc["complete"] is True
    assert doc["streams"]["a"] == {"written": 1500, "kept": 1500, "lost": 0, "damage": [],
                                   "committed_offset": 1499, "offset": 1499}
    seen = asyncio.run(observe(dest_backend))
    assert seen.a == A_EVENTS
    assert seen.a_offsets == list(range(1500))
    assert (seen.a_offset, seen.b, seen.b_offset) == (1499, B_EVENTS, None)
    assert seen.table == table_after(len(SNAPSHOT), len(DELTAS))
    assert seen.misses == []
    # A salvaged store is whole: verify reads every object of it.
    assert main(["verify", dest]) == 0
    # The destination must be empty: a second salvage into it is refused, and changes nothing.
    assert main(["salvage", built.root, dest]) == 2
    assert "must be empty" in capsys.readouterr().err


TARGETS: dict[str, Callable[[Built], str]] = {
    "a-segment": lambda b: b.a_segments[1],
    "table-delta": lambda b: b.table_delta,
    "table-snapshot": lambda b: b.table_snapshot,
    "cache": lambda b: b.cache,
    "middle-commit": lambda b: b.middle_commit,
    "checkpoint": lambda b: b.checkpoint,
    "epoch": lambda b: b.epoch,
}


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
def test_salvage_keeps_what_reads_and_names_what_was_lost(
        roots: Roots, capsys: pytest.CaptureFixture[str]) -> None:
    built = build_store(roots)
    failures: list[str] = []
    rows: list[dict[str, Any]] = []
    for target, pick in TARGETS.items():
        key = pick(built)
        for damage in damages(key, built.objects, full=target == "a-segment"):
            asyncio.run(_put(built.backend, key, damage.data))
            try:
                dest, dest_backend = roots.new()
                code, doc, err = run_cli(["salvage", built.root, dest, "--json"], capsys)
                seen = asyncio.run(observe(dest_backend))
            finally:
                asyncio.run(_put(built.backend, key, built.objects[key]))
            case = f"{target} {key}: {damage.name}"
            problems = check_common(doc, seen, code)
            problems += expect_for(target, built, damage, doc, seen)
            if target == "checkpoint" and damage.data is None:
                # A store without its newest checkpoint is a store that never wrote it (the
                # corruption campaign's "worked around"): read from the commit records,
                # whole, and nothing to report.
                if code != 0 or not doc["complete"] or err:
                    problems.append(f"a deleted checkpoint was reported: {code} {err!r}")
            else:
                if code != 1:
                    problems.append(f"exit code {code}, expected 1 (damage found)")
                if not names_damage(doc, key):
                    problems.append(f"the report does not name the damaged object: {doc}")
                if "Traceback" in err or len(err.strip().splitlines()) != 1:
                    problems.append(f"stderr is not one line: {err!r}")
            failures += [f"{case}: {p}" for p in problems]
            rows.append({"backend": roots.kind, "target": target, "damage": damage.name,
                         "a_kept": doc["streams"].get("a", {}).get("kept", 0),
                         "a_lost": doc["streams"].get("a", {}).get("lost", 0),
                         "written": len(A_EVENTS), "lost_commits": doc["lost_commits"],
                         "table_keys": doc["tables"].get("t", {}).get("keys"),
                         "cache_kept": doc["cache"]["kept"]})
    report = os.environ.get("APERSIST_SALVAGE_REPORT")
    if report:
        with Path(report).open("ab") as out:
            out.write(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    assert not failures, "\n".join(failures)
    assert len(rows) >= 20


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
def test_dump_prints_what_reads_before_the_damage_then_exits_1(
        roots: Roots, capsys: pytest.CaptureFixture[str]) -> None:
    built = build_store(roots)
    key = built.a_segments[1]
    data = bytearray(built.objects[key])
    data[len(data) // 2] ^= 0x01
    asyncio.run(_put(built.backend, key, bytes(data)))
    assert main(["dump", built.root, "a"]) == 1
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert PER_SEGMENT <= len(lines) < 2 * PER_SEGMENT
    assert [line["value"] for line in lines] == A_EVENTS[:len(lines)]
    assert [line["offset"] for line in lines] == list(range(len(lines)))
    [err] = captured.err.splitlines()
    assert f"key={key} offset=" in err
    assert f"the {len(lines)} events before the damage were printed" in err
    # Another log of the store is whole: its dump exits 0.
    assert main(["dump", built.root, "b"]) == 0
    assert [json.loads(x)["value"] for x in capsys.readouterr().out.splitlines()] == B_EVENTS
    assert main(["dump", built.root, "t", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {item["key"]: item["value"] for item in doc["items"]} == table_after(30, 6)
    assert (doc["kind"], doc["complete"], doc["exit_code"]) == ("table", True, 0)


def test_a_root_that_holds_no_store_is_an_error(
        roots: Roots, capsys: pytest.CaptureFixture[str]) -> None:
    built = build_store(roots)
    mistyped = built.root.rstrip("/") + "-typo"
    if roots.kind == "filesystem":
        os.mkdir(mistyped)
    for command in (["inspect"], ["verify"], ["dump", "--", "a"], ["gc"], ["compact"]):
        argv = [command[0], mistyped, *command[1:]]
        assert main(argv) == 2, argv
        [err] = capsys.readouterr().err.splitlines()
        assert "no apersist store at this root" in err
    assert main(["inspect", mistyped, "--allow-empty", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["last_seq"], doc["streams"], doc["exit_code"]) == (0, {}, 0)
    assert main(["inspect", built.root, "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["streams"]) == {"a", "b"}


# ----------------------------------------------------------------------------- older formats

GOLDEN = Path(__file__).resolve().parent / "golden"


async def read_golden_shape(backend: apersist.Backend, expected: dict[str, Any]) -> dict[str, Any]:
    """What a writing run reads from a store, in the shape of a golden store's ``expected.json``."""
    return await helpers.read_golden_shape(backend, expected,
                                           access=apersist.SnapshotAccess.FULL)


@pytest.mark.parametrize("version", sorted(p.name for p in GOLDEN.glob("format-*")))
def test_salvage_of_every_golden_store_reads_back_exactly(
        version: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store of every released format is salvaged whole, into the current format: its
    events (values, offsets, ``time_ms``, in order), offsets, tables and cached results."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(GOLDEN / version / "store", source)
    expected = orjson.loads((GOLDEN / version / "expected.json").read_bytes())
    code, doc, _err = run_cli(["salvage", str(source), str(tmp_path / "dest"), "--json"], capsys)
    assert (code, doc["complete"]) == (0, True), doc
    got = asyncio.run(read_golden_shape(apersist.Backend.filesystem(tmp_path / "dest"), expected))
    assert orjson.dumps(got) == orjson.dumps(expected)
    # A damaged segment of the oldest format is read record by record as well.
    if version == "format-1.0":
        segment = next(p for p in sorted((source / "writers/0/segments").iterdir())
                       if b'"kind":"events"' in p.read_bytes()[:200])
        data = bytearray(segment.read_bytes())
        data[-40] ^= 0x01  # inside the last record
        segment.write_bytes(bytes(data))
        code, doc, _err = run_cli(["salvage", str(source), str(tmp_path / "dest2"), "--json"],
                                  capsys)
        assert code == 1
        [(name, log)] = [(n, s) for n, s in doc["streams"].items() if s["damage"]]
        assert log["damage"][0]["key"] == f"writers/0/segments/{segment.name}"
        assert 0 < log["kept"] < log["written"]
        got = asyncio.run(read_golden_shape(apersist.Backend.filesystem(tmp_path / "dest2"),
                                            expected))
        assert got["streams"][name]["events"] == expected["streams"][name]["events"][:log["kept"]]


def test_a_refused_commit_leaves_the_state_of_the_commit_before(tmp_path: Path) -> None:
    """A commit record that decodes but that a reader refuses (a reset whose rewrite names
    segments its log does not hold) is not half applied: the state stays that of the last
    whole commit, whose events are all salvaged."""
    from apersist._recover import open_readable

    root = tmp_path / "store"

    async def write() -> None:
        async with apersist.run(apersist.Config(apersist.Backend.filesystem(root))) as run:
            for i in range(3):
                await run.stream("s").record(i, offset=i)

    asyncio.run(write())
    commits = sorted((root / "writers/0/commits").iterdir())
    last = orjson.loads(commits[-1].read_bytes())["body"]
    seq = last["seq"] + 1
    bad = fmt.CommitRecord(
        writer=fmt.WRITER, seq=seq, epoch=last["epoch"], time_ms=0, token="x", reset=True,
        segments=(), offsets={},
        rewrites=(fmt.Rewrite(fmt.KIND_EVENTS, "s", ("writers/0/segments/nowhere.seg",), ()),))
    (root / fmt.commit_key(fmt.WRITER, seq)).write_bytes(bad.encode())

    async def read() -> tuple[int, list[str], list[int], list[str]]:
        driver = open_driver(apersist.Backend.filesystem(root))
        try:
            opened = await open_readable(driver)
            store = opened.store
            segs = store.segments(fmt.KIND_EVENTS, "s")
            return (store.last_seq, [d.key for d in opened.damage],
                    [seg.ref.records for seg in segs], list(store.offsets))
        finally:
            await driver.aclose()

    last_seq, damaged, records, offsets = asyncio.run(read())
    assert last_seq == seq - 1
    assert damaged == [fmt.commit_key(fmt.WRITER, seq)]
    assert sum(records) == 3
    assert offsets == ["s"]
