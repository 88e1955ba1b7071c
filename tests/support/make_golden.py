"""Write the golden store of the current format version: ``tests/golden/format-X.Y/``.

Run once per released format version and check the result in; never regenerate a released
one (``tests/campaigns/test_golden.py`` reads it with every later version)::

    python tests/support/make_golden.py            # writes tests/golden/format-X.Y/ (the current)
    python tests/support/make_golden.py --out DIR  # anywhere else (DIR must not exist)

The store is written on the filesystem backend by two runs (two writer epochs). It holds
streams with offsets (unicode and nested values among them), a table with a compaction
snapshot and deltas after it, a commit that cuts one stream into several segments, and a
cached result: every log kind of the format. From format 2.0 on it also holds batch
records: a ``record_many`` batch with and without offsets, and ``record()`` calls of one
millisecond, which share one record. From format 3.0 on, where a commit record holds only
the offsets it changed, it also holds a stream whose offset is set by the first run and
left alone by the second (which records an event without an offset on it), so that the
second run's commit names some streams' offsets and not others'. From format 4.0 on a third
run (a third epoch) makes ``FANOUT + 4`` commits of one event each to one stream, then
``run.compact()``: a commit with a new table snapshot, a commit whose ``rewrites`` merge the
first ``FANOUT`` of those segments into one, and a checkpoint (run 1's ``compact()`` wrote
an older one); then more events and a table delta,
committed as the run ends, after the newest checkpoint. From format 4.1 on the epoch records
name their writer: each run has a ``writer_label`` (``golden-1`` to ``golden-3``), and the host
and process id are fixed (``golden-host``, 4242) so that the bytes do not depend on the
machine that wrote them. From format 5.0 on segment bodies are stored zstd-compressed (those
under 128 bytes raw), and a small commit carries its segments inline in its record: the third
run's one-event commits are inline, and it ends with a commit of a batch that compresses well
(inline, compressed) and one of values that do not compress, too big for a record to carry
(segment objects). ``expected.json`` next to
``store/`` lists what a reader must get back: each stream's events (value, offset, time_ms)
and final offset, each table's state and the cached results.

The output is byte-for-byte reproducible: the clock is injected, the random tokens of the
commit, epoch and checkpoint records come from a seeded generator, the writers' host and
process id are fixed, and the writer's
background maintenance is held off while the store is written (only ``run.compact()``
merges and checkpoints), so that no task's timing decides which commit carries a merge.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import orjson
from helpers import read_golden_shape

import apersist
from apersist import _maintenance, _store

TESTS = Path(__file__).resolve().parent.parent  # tests/, which holds golden/
QUIET = 3_600_000  # commit only when told to: the commits are part of the golden bytes
T0 = 1_700_000_000_000

# Values chosen to exercise the JSON codec: unicode beyond the BMP, escapes, big and
# negative integers, floats, nesting, empty containers.
ORDERS_RUN1: list[tuple[Any, Any]] = [
    ({"id": 1, "item": "café ☕", "qty": 2}, 1),
    ({"id": 2, "item": "🍣 sushi", "tags": ["raw", "fish"], "price": 12.5}, 2),
    ("plain text", None),
    ({"id": 3, "nested": {"a": [1, [2, [3, {"b": None}]]], "e": {}, "l": []}}, {"file": "ö.csv", "line": 3}),
]
ORDERS_RUN2: list[tuple[Any, Any]] = [
    ({"id": 4, "big": 2**64 - 1, "neg": -(2**63), "f": -0.0, "tiny": 5e-324}, {"file": "ö.csv", "line": 4}),
    (["line\nbreak", "tab\t", "quote\"", "back\\slash", "\u2028", "\x00"], None),
    (True, [5, "五"]),
]
CLICKS = [None, False, 0, 1.5, "", [], {}]
BULK_COUNT = 24  # records of ~120 bytes with max_segment_bytes=1024: 3 segments in one commit
TABLE_RUN1_BEFORE = {"alice": 1, "bob": {"n": [1, 2]}, "carol": "ĉ", "dave": None}
TABLE_RUN1_AFTER = {"erin": 5, "alice": 2}  # deltas after the snapshot
TABLE_RUN2 = {"frank": [1.25, "x"], "bob": {"n": [3]}}
CACHE_ARGS = [3, "ß", [1, 2]]
# Format 2.0: batch records (several events in one record).
BATCH_VALUES: list[Any] = [{"b": 1}, "two", None, [3, {"x": None}], 5.5]
BATCH_OFFSETS: list[Any] = [10, None, {"pos": 12}, None, 14]
BURST = [{"burst": i, "s": "ë" * i} for i in range(6)]  # record() calls in one millisecond
# Format 3.0: an offset set in run 1 that run 2's commits leave alone.
TICKS_RUN1: list[tuple[Any, Any]] = [("tick-1", {"tick": 1, "at": "ŧ"})]
TICKS_RUN2: list[tuple[Any, Any]] = [("tick-2 (no offset)", None)]
# Format 4.0: one-event commits, enough for compact() to merge a run of them (FANOUT), then
# events and a table delta after the checkpoint.
SMALL_COMMITS = _maintenance.FANOUT + 4
SMALL_AFTER = 2
TABLE_RUN3 = {"grace": {"ŋ": [4]}, "alice": 3}
# Format 5.0: a batch that zstd shrinks (a compressed segment, small enough that its commit
# carries it inline), then values that do not shrink, too many bytes for a commit record to
# carry (segment objects of their own). Seeded, so the bytes are reproducible.
WIDE = [{"wide": i, "text": "the same words again and again " * 3} for i in range(120)]
NOISE = [base64.b64encode(random.Random(5000 + i).randbytes(3072)).decode() for i in range(14)]


def square(x: Any) -> Any:
    return {"arg": x, "sq": x * x if isinstance(x, int) else None}


class Clock:
    """The injected clock: a fixed time the script moves on explicitly."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def seeded_uuid4(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


async def write_store(root: Path) -> dict[str, Any]:
    """Write the store under ``root``; return what a reader must get back."""
    clock = Clock()
    backend = apersist.Backend.filesystem(root)
    cached_square = apersist.cached(name="golden.square", version=1)(square)
    events: dict[str, list[list[Any]]] = {"orders": [], "clicks": [], "bulk": [],
                                          "batch": [], "burst": [], "ticks": []}
    offsets: dict[str, Any] = {}

    async def record(stream: apersist.Stream, value: Any, offset: Any) -> None:
        clock.now += 1_000
        await stream.record(value, offset=offset)
        events[stream.name].append([value, offset, clock.now])
        if offset is not None:
            offsets[stream.name] = offset

    config = apersist.Config(backend, snapshot_interval_ms=QUIET, max_segment_bytes=1024,
                             writer_label="golden-1")
    # Run 1 (epoch 1): events, a table compacted into a snapshot then changed, a cache entry.
    async with apersist.run(config, clock_ms=clock) as run:
        orders, clicks = run.stream("orders"), run.stream("clicks")
        for value, offset in ORDERS_RUN1:
            await record(orders, value, offset)
        for value in CLICKS:
            await record(clicks, value, None)
        ticks = run.stream("ticks")
        for value, offset in TICKS_RUN1:
            await record(ticks, value, offset)
        table = await run.table("counts")
        for key, value in TABLE_RUN1_BEFORE.items():
            table[key] = value
        del table["dave"]
        for arg in CACHE_ARGS:
            cached_square(arg)
        clock.now += 1_000
        await run.commit()
        clock.now += 1_000
        await run.compact()  # a commit with only the table snapshot
        for key, value in TABLE_RUN1_AFTER.items():
            table[key] = value
        clock.now += 1_000
    # Run 2 (epoch 2): more events, one commit cut into several segments, more deltas.
    config2 = apersist.Config(backend, snapshot_interval_ms=QUIET, max_segment_bytes=1024,
                              writer_label="golden-2")
    async with apersist.run(config2, clock_ms=clock) as run:
        orders, bulk = run.stream("orders"), run.stream("bulk")
        for value, offset in ORDERS_RUN2:
            await record(orders, value, offset)
        for i in range(BULK_COUNT):
            await record(bulk, {"i": i, "pad": "ü" * 40, "sq": i * i}, i)
        ticks = run.stream("ticks")
        for value, offset in TICKS_RUN2:
            await record(ticks, value, offset)
        clock.now += 1_000
        batch = run.stream("batch")
        await batch.record_many(BATCH_VALUES, offsets=BATCH_OFFSETS)
        events["batch"] += [[v, o, clock.now] for v, o in zip(BATCH_VALUES, BATCH_OFFSETS, strict=True)]
        await batch.record_many(BATCH_VALUES[:2])  # a batch without offsets
        events["batch"] += [[v, None, clock.now] for v in BATCH_VALUES[:2]]
        offsets["batch"] = BATCH_OFFSETS[-1]
        clock.now += 1_000
        burst = run.stream("burst")
        for value in BURST:
            await burst.record(value)
            events["burst"].append([value, None, clock.now])
        table = await run.table("counts")
        for key, value in TABLE_RUN2.items():
            table[key] = value
        del table["carol"]
        clock.now += 1_000
    # Run 3 (epoch 3): many small commits, merged and checkpointed by compact(); then more.
    # Segments of the default size: 16 small ones fit in one merged segment.
    config3 = apersist.Config(backend, snapshot_interval_ms=QUIET, writer_label="golden-3")
    async with apersist.run(config3, clock_ms=clock) as run:
        small = run.stream("small")
        events["small"] = []
        for i in range(SMALL_COMMITS):
            await record(small, {"small": i}, {"n": i})
            await run.commit()
        clock.now += 1_000
        await run.compact()  # a commit (the table's snapshot), a commit of the merge, a checkpoint
        for i in range(SMALL_COMMITS, SMALL_COMMITS + SMALL_AFTER):
            await record(small, {"small": i, "after": "the checkpoint"}, {"n": i})
        table = await run.table("counts")
        for key, value in TABLE_RUN3.items():
            table[key] = value
        clock.now += 1_000
        for name, values in (("wide", WIDE), ("noise", NOISE)):
            await run.stream(name).record_many(values)
            events[name] = [[v, None, clock.now] for v in values]
            clock.now += 1_000
            await run.commit()
    state = {**TABLE_RUN1_BEFORE, **TABLE_RUN1_AFTER, **TABLE_RUN2, **TABLE_RUN3}
    del state["dave"], state["carol"]
    return {
        "format": [apersist.FORMAT_MAJOR, apersist.FORMAT_MINOR],
        "streams": {name: {"events": evs, "offset": offsets.get(name)}
                    for name, evs in events.items()},
        "tables": {"counts": state},
        "cache": {"name": "golden.square", "version": 1,
                  "calls": [[arg, square(arg)] for arg in CACHE_ARGS]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    version = f"{apersist.FORMAT_MAJOR}.{apersist.FORMAT_MINOR}"
    parser.add_argument("--out", type=Path, default=TESTS / "golden" / f"format-{version}")
    args = parser.parse_args(argv)
    out: Path = args.out
    if out.exists():
        print(f"refusing to overwrite a golden store: path={out}", file=sys.stderr)
        return 1
    rng = random.Random(20260101)
    real_uuid4 = uuid.uuid4
    uuid.uuid4 = lambda: seeded_uuid4(rng)  # the records' tokens, made reproducible
    # The background maintenance never looks for merges: compact() alone decides them.
    real_look = _maintenance.MERGE_LOOK_EVERY
    _maintenance.MERGE_LOOK_EVERY = 1 << 30
    real_process = _store.this_process
    _store.this_process = lambda: ("golden-host", 4242)  # the epoch records' host and pid
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "store"
            expected = asyncio.run(write_store(root))
            # What was written must read back as what was meant, before it is kept.
            got = asyncio.run(read_golden_shape(apersist.Backend.filesystem(root), expected))
            if orjson.dumps(got) != orjson.dumps(expected):
                print("the store does not read back as written", file=sys.stderr)
                return 1
            out.mkdir(parents=True)
            shutil.copytree(root, out / "store")
    finally:
        uuid.uuid4 = real_uuid4
        _maintenance.MERGE_LOOK_EVERY = real_look
        _store.this_process = real_process
    (out / "expected.json").write_bytes(orjson.dumps(expected, option=orjson.OPT_INDENT_2) + b"\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"golden store written: path={out} bytes={total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
