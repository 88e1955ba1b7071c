"""The corruption campaign: every stored object, damaged in every way, is caught or ignored.

A small real store is built: three streams, a table compacted twice, cached results, a
reset that supersedes a first history, three epochs, commits of several segments each
(small ``max_segment_bytes``) and a leftover upload that no commit names. Then, one case
at a time, one object is damaged through the backend's driver: a flipped bit (header, body,
trailer), a truncation, a zero-filled range, a deletion, or the bytes of another object
(of the same kind and of another kind). A new run opens the store, replays every stream,
rebuilds the table and consults the cache, all under a timeout. Each case must end in one
of these ways:

- ``CorruptDataError`` whose message names the damaged object's key and a byte offset;
- the undamaged replay, exactly, when no replay reads the object: it is named by no live
  commit (history before the reset, the leftover, an epoch record no live commit names)
  or a newer snapshot of its table superseded it (such damage may also be reported);
- the one damage no reader can tell from a normal store, the newest commit record
  deleted (exactly what a commit that was never made looks like): the replay as of the
  commit before it, with no error and no wrong value;
- worked around, the undamaged replay exactly: the newest checkpoint deleted (a reader
  starts from an older one, or from the first commit). Commit records a checkpoint folds, older
  checkpoints and the epoch records only those commits name are never read, so their
  damage is ignored like that of history before a reset (``apersist verify`` names it).

Anything else fails: a wrong value, fewer events or entries without an error, another
exception, a hang. The campaign lists every failing case, then prints a summary line
(and appends it as JSON to the file named by ``APERSIST_CORRUPTION_REPORT``, if set).
Size: the backends named in ``APERSIST_CORRUPTION_FULL`` (default ``memory``) run the full
matrix; the others run each object kind under each damage kind once.
"""

from __future__ import annotations

import copy
import os
import re
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from conftest import make_backend

import apersist
from apersist import _format as fmt
from apersist._drivers import Driver, open_driver
from apersist._inspect import verify

T0, T1, T2, T3 = (1_700_000_000_000 + n * 1_000_000 for n in range(4))
# Small segments, so that commits and table snapshots span several segments.
MAX_SEGMENT_BYTES = 1024
CASE_TIMEOUT_S = 30.0
CACHE_ARGS = range(8)
STREAMS = ("a", "b", "c", "d")
TABLE = "t"

# What the replay may do when an object is damaged, decided from the commit records.
NEEDED = "needed"              # read by the replay: damage must raise CorruptDataError
SUPERSEDED = "superseded"      # named by a live commit, but a newer table snapshot covers it
UNREFERENCED = "unreferenced"  # named by no live commit: damage must be ignored

CALLS: list[int] = []


@apersist.cached(name="corruption-square")
def square(n: int) -> dict[str, int]:
    CALLS.append(n)  # a call means a miss: a committed cache entry was not found
    return {"n": n, "square": n * n}


@dataclass
class State:
    """What a replay shows: every stream's events and offset, the table, the cache."""

    events: dict[str, list[tuple[Any, Any, int]]] = field(
        default_factory=lambda: {name: [] for name in STREAMS})
    offsets: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(STREAMS))
    table: dict[str, Any] = field(default_factory=dict)
    cache: dict[int, Any] = field(default_factory=dict)
    misses: list[int] = field(default_factory=list)  # cached calls that had to compute

    def differences(self, expected: State) -> list[str]:
        """How this state differs from ``expected``, each difference named (empty: equal)."""
        found = []
        for name in STREAMS:
            got, want = self.events[name], expected.events[name]
            if got != want:
                kind = "fewer events" if len(got) < len(want) else "wrong events"
                found.append(f"stream {name}: {kind}: got={len(got)} expected={len(want)}")
            if self.offsets[name] != expected.offsets[name]:
                found.append(f"stream {name}: wrong offset: got={self.offsets[name]!r} "
                             f"expected={expected.offsets[name]!r}")
        if self.table != expected.table:
            found.append(f"table {TABLE}: wrong state: got={len(self.table)} keys "
                         f"expected={len(expected.table)} keys")
        if self.cache != expected.cache:
            found.append("cache: wrong results")
        if self.misses != expected.misses:
            found.append(f"cache: committed entries missing: args={self.misses}")
        return found


def config(backend: apersist.Backend, **kwargs: Any) -> apersist.Config:
    # No timed commits: the build decides where every commit falls.
    return apersist.Config(backend, snapshot_interval_ms=3_600_000,
                           max_segment_bytes=MAX_SEGMENT_BYTES, **kwargs)


# ----------------------------------------------------------------------------- the store


async def build_store(backend: apersist.Backend, driver: Driver) -> tuple[State, State]:
    """Write the campaign's store; return the expected replay, and the one before the last commit.

    The expectations are kept by hand as the data is recorded, not read back through
    apersist, so that a wrong replay cannot agree with them.
    """
    # Run 0 (epoch 1): a first history, which run 1's reset supersedes.
    async with apersist.run(config(backend), clock_ms=lambda: T0) as run:
        for i in range(5):
            await run.stream("a").record({"old": i}, offset=i)
        (await run.table(TABLE))["old"] = 1
        for n in range(3):
            square(n)
    expected = State()
    # Run 1 (epoch 2): a new history; commits of several segments; a compaction.
    async with apersist.run(config(backend, snapshot_access=apersist.SnapshotAccess.RECORD),
                            clock_ms=lambda: T1) as run:
        a, b, table = run.stream("a"), run.stream("b"), await run.table(TABLE)
        for i in range(40):
            value = {"i": i, "pad": "x" * 40}
            await a.record(value, offset=i)
            expected.events["a"].append((value, i, T1))
        expected.offsets["a"] = 39
        for i in range(5):
            await b.record(f"b{i}")
            expected.events["b"].append((f"b{i}", None, T1))
        for k in range(30):
            table[f"k{k:02d}"] = expected.table[f"k{k:02d}"] = {"v": k, "pad": "y" * 30}
        for n in range(5):
            square(n)
        await run.commit()  # the reset commit
        for i in range(5, 10):
            await b.record(f"b{i}", offset={"pos": i})
            expected.events["b"].append((f"b{i}", {"pos": i}, T1))
        expected.offsets["b"] = {"pos": 9}
        del table["k00"], expected.table["k00"]
        table["k01"] = expected.table["k01"] = "changed"
        await run.commit()
        table["k02"] = expected.table["k02"] = [1, 2, 3]
        await run.compact()  # the first table snapshot
        table["k03"] = expected.table["k03"] = None
        del table["k04"], expected.table["k04"]
        for i in range(40, 45):
            await a.record(i, offset=i)
            expected.events["a"].append((i, i, T1))
        expected.offsets["a"] = 44
        for n in range(5, 8):
            square(n)
    # Run 2 (epoch 3): more deltas, a second snapshot, then a last commit.
    async with apersist.run(config(backend), clock_ms=lambda: T2) as run:
        c, table = run.stream("c"), await run.table(TABLE)
        for i in range(20):
            value = ["c", i, "z" * 40]
            await c.record(value, offset=i)
            expected.events["c"].append((value, i, T2))
        expected.offsets["c"] = 19
        table["k05"] = expected.table["k05"] = {"v": "five"}
        await run.commit()
        # Two segments of one size (batch records of as many equal-length values): replacing
        # one by the other passes the size check, so only the header's own key can catch it.
        d = run.stream("d")
        for letter in "de":
            batch = [letter * 10] * 3
            await d.record_many(batch)
            expected.events["d"] += [(value, None, T2) for value in batch]
            await run.commit()
        table["k06"] = expected.table["k06"] = 6.5
        await run.compact()  # the second snapshot supersedes the first; a checkpoint
        # A commit after the checkpoint, so that a reader reads two commit records.
        await c.record("after", offset=20)
        expected.events["c"].append(("after", 20, T2))
        expected.offsets["c"] = 20
        await run.commit()
        before_last = copy.deepcopy(expected)
        await run.stream("a").record("last", offset=100)
        expected.events["a"].append(("last", 100, T2))
        expected.offsets["a"] = 100
        table["last"] = expected.table["last"] = True
    for state in (expected, before_last):
        state.cache = {n: {"n": n, "square": n * n} for n in CACHE_ARGS}
    # A leftover: a well-formed upload of epoch 3 whose commit never landed.
    key = fmt.segment_key("0", 3, 999)
    body = bytearray()
    fmt.append_record(body, b'"never committed"', b"999", T2)
    await driver.put(key, fmt.encode_segment(fmt.SegmentMeta(key, fmt.KIND_EVENTS, "a"), body, 1))
    return expected, before_last


async def observe(backend: apersist.Backend) -> State:
    """What the next run sees: it opens the store, replays everything, consults the cache."""
    seen = State()
    CALLS.clear()
    async with apersist.run(config(backend), clock_ms=lambda: T3) as run:
        for name in STREAMS:
            stream = run.stream(name)
            seen.events[name] = [(e.value, e.offset, e.time_ms) async for e in stream.replay()]
            seen.offsets[name] = stream.offset
        seen.table = dict(await run.table(TABLE))
        seen.cache = {n: square(n) for n in CACHE_ARGS}
    seen.misses = list(CALLS)
    return seen


# ----------------------------------------------------------------------------- the objects

COMMIT_RE = re.compile(r"writers/0/commits/(\d{20})\.json")
CHECKPOINT_RE = re.compile(r"writers/0/checkpoints/(\d{20})\.json")
EPOCH_RE = re.compile(r"writers/0/epochs/(\d{20})\.json")


@dataclass(frozen=True)
class StoredObject:
    key: str
    kind: str  # commit, epoch, checkpoint, or the log kind of a segment ("segment" if no
    # commit names it)
    role: str  # NEEDED, SUPERSEDED or UNREFERENCED
    data: bytes


def classify(objects: dict[str, bytes]) -> list[StoredObject]:
    """Every object of the store, with what the replay may do when it is damaged.

    Decided from the commit records and checkpoint keys as the format defines them (plain
    JSON here), not by apersist's own reader. A reader starts from the newest checkpoint,
    so the commit records it folds are never read, nor the older checkpoints, nor the
    epoch records only those commits name.
    """
    commits = sorted(key for key in objects if COMMIT_RE.fullmatch(key))
    bodies = [orjson.loads(objects[key])["body"] for key in commits]
    checkpoints = sorted(key for key in objects if CHECKPOINT_RE.fullmatch(key))
    folded = int(CHECKPOINT_RE.fullmatch(checkpoints[-1]).group(1)) if checkpoints else 0  # type: ignore[union-attr]
    live = bodies[max(i for i, body in enumerate(bodies) if body["reset"]):]
    snapshot_seq = max(body["seq"] for body in live
                       if any(s["kind"] == fmt.KIND_TABLE_SNAPSHOT for s in body["segments"]))
    segments: dict[str, tuple[str, str]] = {}
    homes: dict[str, str] = {}  # an inline segment (5.0: "data") -> the commit carrying it
    for body, key in zip(bodies, commits, strict=True):
        if body not in live:
            continue
        for rewrite in body.get("rewrites", []):  # maintenance: runs of segments replaced
            for old in rewrite["old"]:
                segments.pop(old, None)
            for ref in rewrite["new"]:
                segments[ref["key"]] = (ref["kind"], NEEDED)
        for ref in body["segments"]:
            role = NEEDED
            if ref["kind"] == fmt.KIND_TABLE_SNAPSHOT and body["seq"] != snapshot_seq:
                role = SUPERSEDED
            if ref["kind"] == fmt.KIND_TABLE and body["seq"] <= snapshot_seq:
                role = SUPERSEDED
            segments[ref["key"]] = (ref["kind"], role)
            if "data" in ref:
                homes[ref["key"]] = key
    # A commit record folded into the checkpoint is still read if it carries a live
    # segment that the replay reads: it is that segment's only copy.
    needed_homes = {home for seg, home in homes.items() if segments.get(seg, ("", ""))[1] == NEEDED}
    read = [body for body in live if body["seq"] > folded]
    live_epochs = {body["epoch"] for body in read}
    if folded and any(body["seq"] <= folded for body in live):
        live_epochs.add(bodies[folded - 1]["epoch"])  # the checkpoint's own epoch
    found = []
    for key, data in sorted(objects.items()):
        if key in commits:
            role = (NEEDED if int(COMMIT_RE.fullmatch(key).group(1)) > folded  # type: ignore[union-attr]
                    or key in needed_homes else UNREFERENCED)
            found.append(StoredObject(key, "commit", role, data))
        elif key in checkpoints:
            role = NEEDED if key == checkpoints[-1] else UNREFERENCED
            found.append(StoredObject(key, "checkpoint", role, data))
        elif match := EPOCH_RE.fullmatch(key):
            role = NEEDED if int(match.group(1)) in live_epochs else UNREFERENCED
            found.append(StoredObject(key, "epoch", role, data))
        elif key in segments:
            found.append(StoredObject(key, *segments[key], data))
        else:
            assert key.endswith(".seg"), f"an object the campaign does not know: {key}"
            found.append(StoredObject(key, "segment", UNREFERENCED, data))
    return found


# ----------------------------------------------------------------------------- the damage


@dataclass(frozen=True)
class Damage:
    name: str
    data: bytes | None  # None: the object is deleted


def _points(obj: StoredObject) -> dict[str, int]:
    """Named byte positions in the header, body and trailer of the object."""
    data = obj.data
    if obj.key.endswith(".seg"):
        (meta_len,) = struct.unpack_from("<I", data, 12)
        head_end, trailer = 16 + meta_len, len(data) - 28
        return {"magic": 0, "version": 8, "meta": 16 + meta_len // 2, "header-crc": head_end,
                "body": (head_end + 4 + trailer) // 2, "trailer-count": trailer,
                "trailer-body-crc": trailer + 16, "end-magic": len(data) - 1}
    cut = data.rfind(b',"crc32":')
    return {"prefix": 0, "body-first": 8, "body": (8 + cut) // 2, "crc-mark": cut,
            "crc-digits": cut + 9, "end": len(data) - 1}


def _substitutes(obj: StoredObject, objects: list[StoredObject]) -> list[StoredObject]:
    """Another object of the same kind (a segment of the same size if there is one), if
    there is one, and one of another kind."""
    family = (lambda o: o.key.endswith(".seg")) if obj.key.endswith(".seg") else (
        lambda o: o.kind == obj.kind)
    same = [o for o in objects if family(o) and o.key != obj.key]
    same.sort(key=lambda o: (abs(len(o.data) - len(obj.data)), o.key))
    other_kind = "epoch" if obj.kind == "commit" else "commit"
    other = next(o for o in objects if o.kind == other_kind)
    return [*same[:1], other]


def damages(obj: StoredObject, objects: list[StoredObject], *, full: bool) -> Iterator[Damage]:
    """Every damage of the campaign to ``obj`` (``full``), or each kind once at one position."""
    data = obj.data
    points = _points(obj)
    middle = len(data) // 2
    flips = points if full else {"body": points["body"]}
    for where, position in flips.items():
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        yield Damage(f"flip bit at {where} offset={position}", bytes(flipped))
    lengths = {0, 1, middle, len(data) - 1} if full else {middle}
    if full and obj.key.endswith(".seg"):
        lengths |= {points["header-crc"] + 4, points["trailer-count"]}  # header only, no trailer
    for length in sorted(lengths):
        yield Damage(f"truncate to length={length}", data[:length])
    ranges = [(0, 16), (middle, 16), (0, len(data))] if full else [(middle, 16)]
    for start, size in ranges:
        zeroed = data[:start] + bytes(size) + data[start + size:]
        if zeroed != data:
            yield Damage(f"zero-fill offset={start} size={size}", zeroed)
    yield Damage("delete", None)
    for substitute in _substitutes(obj, objects):
        kind = "same kind" if substitute.kind == obj.kind or (obj.key.endswith(".seg") and (
            substitute.key.endswith(".seg"))) else "another kind"
        yield Damage(f"replace with the bytes of {substitute.key} ({kind})", substitute.data)


def representatives(objects: list[StoredObject]) -> list[StoredObject]:
    """One object of each kind for the subset: a needed one of every log kind, a middle and
    the newest commit, the newest epoch record, and the leftover."""
    needed = [o for o in objects if o.role == NEEDED]
    chosen = [next(o for o in needed if o.kind == kind)
              for kind in (fmt.KIND_EVENTS, fmt.KIND_TABLE, fmt.KIND_TABLE_SNAPSHOT, fmt.KIND_CACHE)]
    commits = [o for o in objects if o.kind == "commit"]
    chosen += [commits[len(commits) // 2], commits[-1]]
    chosen.append([o for o in needed if o.kind == "epoch"][-1])
    chosen.append(next(o for o in objects if o.kind == "segment"))
    chosen.append([o for o in objects if o.kind == "checkpoint"][-1])
    return chosen


# ----------------------------------------------------------------------------- the campaign


async def apply(driver: Driver, obj: StoredObject, damage: Damage) -> None:
    if damage.data is None:
        await driver.delete([obj.key])
    else:
        await driver.put(obj.key, damage.data)


async def restore(driver: Driver, originals: dict[str, bytes], damaged: str) -> None:
    """Put the store back as it was built: the damaged object, and nothing the run added."""
    await driver.put(damaged, originals[damaged])
    present = {info.key: info.size async for info in driver.list("")}
    added = [key for key in present if key not in originals]
    if added:
        await driver.delete(added)
    sizes = {key: len(data) for key, data in originals.items()}
    assert {k: v for k, v in present.items() if k in originals} == sizes, "restore failed"


def names_key_and_offset(message: str, key: str) -> bool:
    return (f"key={key} " in message or message.endswith(f"key={key}")) and bool(
        re.search(r"\boffset=\d+", message))


async def run_campaign(backend: apersist.Backend, *, full: bool,
                       inline: bool = False) -> tuple[Counter[str], list[str]]:
    """Build the store, run every case; return the tally of outcomes and the failed cases.

    ``inline``: the store's small commits carry their segments in their records (format
    5.0), so its segment objects are only those of big commits and merges; otherwise every
    segment is an object."""
    tally: Counter[str] = Counter()
    failures: list[str] = []
    driver = open_driver(backend)
    try:
        expected, before_last = await build_store(backend, driver)
        originals = {info.key: await driver.get(info.key) async for info in driver.list("")}
        objects = classify(originals)
        roles = Counter((o.kind, o.role) for o in objects)
        if inline:
            # Records that carry live segments, folded into the checkpoint and still read.
            folded_homes = [o for o in objects if o.kind == "commit" and o.role == NEEDED
                            and o.key < max(k for k in originals if CHECKPOINT_RE.fullmatch(k))
                            .replace("checkpoints", "commits")]
            assert folded_homes, roles
        for needed in () if inline else ("commit", "epoch", "checkpoint", fmt.KIND_EVENTS, fmt.KIND_TABLE,
                       fmt.KIND_TABLE_SNAPSHOT, fmt.KIND_CACHE):
            assert roles[(needed, NEEDED)] >= (2 if needed == "commit" else 1), roles
        for kind_and_role in [("epoch", UNREFERENCED), ("segment", UNREFERENCED),
                              ("commit", UNREFERENCED), ("checkpoint", UNREFERENCED),
                              (fmt.KIND_TABLE, SUPERSEDED), (fmt.KIND_TABLE_SNAPSHOT, SUPERSEDED)]:
            assert inline or roles[kind_and_role], roles
        sizes = Counter(len(o.data) for o in objects if o.key.endswith(".seg"))
        # Two segments of one size: replacing one by the other passes the size check, so
        # only the segment's own key in its header can catch it.
        assert inline or max(sizes.values()) >= 2, sizes
        assert (await observe(backend)).differences(expected) == []  # the undamaged replay
        await restore(driver, originals, objects[0].key)
        newest_commit = max(o.key for o in objects if o.kind == "commit")
        targets = objects if full else representatives(objects)
        for obj in targets:
            for damage in damages(obj, objects, full=full):
                case = f"{obj.key} ({obj.kind}, {obj.role}): {damage.name}"
                outcome = await one_case(backend, driver, obj, damage, expected, before_last,
                                         newest_commit, with_verify=full)
                await restore(driver, originals, obj.key)
                tally["cases"] += 1
                if outcome in ("detected", "ignored_unreferenced", "ignored_superseded",
                               "undetectable_newest_commit_deleted", "worked_around"):
                    tally[outcome] += 1
                else:
                    tally["wrong"] += 1
                    failures.append(f"{case}: {outcome}")
        after = {info.key: await driver.get(info.key) async for info in driver.list("")}
        assert after == originals, "the campaign left the store changed"
    finally:
        await driver.aclose()
    return tally, failures


async def one_case(backend: apersist.Backend, driver: Driver, obj: StoredObject, damage: Damage,
                   expected: State, before_last: State, newest_commit: str, *,
                   with_verify: bool) -> str:
    """Damage ``obj``, let a new run replay; return the outcome, or why it is a failure.

    ``with_verify``: ``apersist verify`` must also name the damaged object, unless it is a
    segment no live state names (verify checks live segments: a superseded table segment
    is not one), an unreferenced object
    deleted (nothing names it), or the deleted newest commit record (no reader can see it).
    """
    await apply(driver, obj, damage)
    if with_verify:
        try:
            with anyio.fail_after(CASE_TIMEOUT_S):
                problems = await verify(driver)
        except TimeoutError:
            return f"hang: verify gave no answer within {CASE_TIMEOUT_S}s"
        deleted = damage.data is None
        # A superseded table segment is out of the live state, like one no commit names:
        # garbage that gc collects, which verify does not read.
        invisible = (obj.kind == "segment" or obj.role == SUPERSEDED
                     or (obj.role == UNREFERENCED and deleted)
                     or (obj.key == newest_commit and deleted)
                     or (obj.kind == "checkpoint" and deleted))
        if invisible and problems:
            return f"verify reported an undamaged store: {problems}"
        if not invisible and not any(names_key_and_offset(p, obj.key) for p in problems):
            return f"verify did not name the damaged object and an offset: {problems}"
    try:
        with anyio.fail_after(CASE_TIMEOUT_S):
            seen = await observe(backend)
    except apersist.CorruptDataError as exc:
        if obj.role == UNREFERENCED:
            return f"damage to an object no live commit names was reported: {exc}"
        if obj.kind == "checkpoint" and damage.data is None:
            return f"a deleted checkpoint was not worked around: {exc}"
        if not names_key_and_offset(str(exc), obj.key):
            return f"the error does not name the object and an offset: {exc}"
        return "detected"
    except TimeoutError:
        return f"hang: no outcome within {CASE_TIMEOUT_S}s"
    except Exception as exc:  # anything but CorruptDataError is a failure of the case
        return f"unexpected {type(exc).__name__}: {exc}"
    if obj.key == newest_commit and damage.data is None:
        # Undetectable: without its newest commit record the store is exactly a store whose
        # last commit was never made. It must open at the commit before, and be right there.
        differences = seen.differences(before_last)
        return "; ".join(differences) or "undetectable_newest_commit_deleted"
    differences = seen.differences(expected)
    if differences:
        return "; ".join(differences)
    if obj.kind == "checkpoint" and damage.data is None:
        # Without the newest checkpoint, a reader starts from an older one or from the
        # first commit: every commit record is still there.
        return "worked_around"
    if obj.role == NEEDED:
        return "damage to an object the replay reads went unnoticed"
    return "ignored_superseded" if obj.role == SUPERSEDED else "ignored_unreferenced"


def report(kind: str, scope: str, tally: Counter[str]) -> None:
    ignored = tally["ignored_unreferenced"] + tally["ignored_superseded"]
    figures = {"campaign": "corruption", "backend": kind, "scope": scope, "cases": tally["cases"],
               "detected": tally["detected"], "ignored_unreferenced": ignored,
               "ignored_superseded": tally["ignored_superseded"],
               "undetectable_newest_commit_deleted": tally["undetectable_newest_commit_deleted"],
               "worked_around": tally["worked_around"], "wrong": tally["wrong"]}
    print(f"\ncorruption campaign: backend={kind} scope={scope} cases={tally['cases']} "
          f"detected={tally['detected']} ignored_unreferenced={ignored} wrong={tally['wrong']} "
          f"(ignored_unreferenced includes superseded table segments="
          f"{tally['ignored_superseded']}; undetectable: newest commit deleted="
          f"{tally['undetectable_newest_commit_deleted']}; worked around: the newest "
          f"checkpoint deleted={tally['worked_around']})")
    path = os.environ.get("APERSIST_CORRUPTION_REPORT")
    if path:
        with Path(path).open("ab") as out:
            out.write(orjson.dumps(figures) + b"\n")


def check(kind: str, scope: str, tally: Counter[str], failures: list[str],
          capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        report(kind, scope, tally)
    assert not failures, f"{len(failures)} case(s) failed:\n" + "\n".join(failures[:40])
    assert tally["detected"], tally
    assert tally["ignored_unreferenced"], tally
    assert tally["undetectable_newest_commit_deleted"] == 1, tally


# The backends that run the full matrix; the others run each object kind under each damage
# kind once. The CI size keeps the full matrix to memory (its cases cost no I/O);
# ``APERSIST_CORRUPTION_FULL=memory,filesystem,s3,azure`` is the full-size campaign.
FULL_KINDS = set(os.environ.get("APERSIST_CORRUPTION_FULL", "memory").split(","))


@pytest.mark.usefixtures("segment_objects")  # every segment an object, damaged in every way
@pytest.mark.parametrize("kind", ["memory", "filesystem", "s3", "azure"])
async def test_corruption_campaign(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    full = kind in FULL_KINDS
    tally, failures = await run_campaign(make_backend(kind, tmp_path, request), full=full)
    check(kind, "full" if full else "subset", tally, failures, capsys)


async def test_corruption_campaign_of_inline_segments(capsys: pytest.CaptureFixture[str]) -> None:
    """The same store with small commits carrying their segments (format 5.0), every object
    damaged in every way: a record that carries a live segment is read, folded into the
    checkpoint or not, so its damage is detected; the others' is ignored."""
    tally, failures = await run_campaign(apersist.Backend.memory(), full=True, inline=True)
    check("memory", "full, inline", tally, failures, capsys)
