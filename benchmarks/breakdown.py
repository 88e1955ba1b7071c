"""Where the time of ``record()``, ``replay()`` and ``run.source()`` goes, step by step.

``python -m benchmarks.breakdown [--events N] [--repeats R] [--out FILE]`` times, per event,
each step that apersist's record and replay paths take, by itself and over the same small
dicts as the suite, and the two whole paths; then the live path of the headline job
(``job.py``): its reader alone, with apersist's ``run.source()`` around it, with the table
write, and the table write and the row's ``orjson.dumps`` by themselves; then the cost of
``type=`` (values of the user's types): the same events as a dataclass, recorded, replayed
and read live with ``type=``, against the plain dicts.

The steps call apersist's own code where it has one (the framing of ``record_many``, the
segment check and walk of replay), so the table follows the code as it changes. That is
why it imports private names (``_stream._encode_batch``, ``_scheduler.BATCH_ENTRIES``): a
rename there fails here loudly, where a copy would drift silently.

Every figure is event-loop thread CPU time (``time.thread_time``), the least of
``--repeats`` runs: a busy neighbour on the machine moves it far less than wall time. It
is a profile, not a race: the suite (``python -m benchmarks``) remains the measure of
speed; this explains its record, replay and job ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import decimal
import gc
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

import orjson

import apersist
from apersist import _format as fmt
from apersist._codec import value_codec
from apersist._scheduler import BATCH_ENTRIES
from apersist._stream import Event, _encode_batch  # the serialization record_many runs
from benchmarks import job
from benchmarks.common import make_values

BATCH = 1024


def per_event_us(step: Callable[[], object], events: int, repeats: int) -> float:
    """The least thread CPU time of ``repeats`` calls of ``step``, in µs per event."""
    best = float("inf")
    for _ in range(repeats):
        started = time.thread_time()
        step()
        best = min(best, time.thread_time() - started)
    return best / events * 1e6


def per_event_us_async(step: Callable[[], Any], events: int, repeats: int) -> float:
    """``per_event_us`` for a coroutine function, each run on a fresh event loop."""
    best = float("inf")
    for _ in range(repeats):
        async def timed() -> float:
            started = time.thread_time()
            await step()
            return time.thread_time() - started
        best = min(best, asyncio.run(timed()))
    return best / events * 1e6


class Noop:
    async def record(self, value: object) -> None:
        """The cost of ``await obj.method(value)`` itself."""


def record_rows(values: list[Any], repeats: int) -> list[tuple[str, float]]:
    n = len(values)
    dumps = orjson.dumps
    kept: list[list[bytes]] = []

    def floor() -> None:
        out: list[bytes] = []
        append = out.append
        for value in values:
            append(dumps(value))
        kept[:] = [out]  # kept until the next run, as the suite's floor keeps its dumps

    def dumps_alone() -> None:
        for value in values:
            dumps(value)

    def kept_in_lists() -> None:
        batch: list[bytes] = []
        for value in values:
            batch.append(dumps(value))
            if len(batch) == BATCH_ENTRIES:
                batch = []  # freed together, as a framed open batch was

    def kept_in_bytearray() -> None:
        batch = bytearray(b"[")
        for value in values:
            batch += dumps(value)
            batch.append(44)
            if len(batch) > 1 << 14:
                batch = bytearray(b"[")

    def nan_probe() -> None:  # on each fresh result, as record() probes it
        for value in values:
            dumps(value).partition(b"null")

    def framing() -> None:
        body = bytearray()
        for first in range(0, n, BATCH):
            for value, offset, count in _encode_batch(values[first:first + BATCH], None,
                                                      1 << 30, "bench"):
                fmt.append_record(body, value, offset, 0, count)

    def clock() -> None:
        now = time.time_ns
        for _ in range(n):
            now() // 1_000_000

    def clock_window() -> None:
        now, start = time.time_ns, time.time_ns()
        end = start + 1_000_000
        for _ in range(n):
            start <= now() < end  # noqa: B015 (the comparison is what is timed)

    async def awaiting() -> None:
        record = Noop().record
        for value in values:
            await record(value)

    async def apersist_record(many: bool) -> float:
        """Thread CPU seconds of the recording loop alone (not the open or final commit)."""
        with tempfile.TemporaryDirectory() as root:
            config = apersist.Config(apersist.Backend.filesystem(root))
            async with apersist.run(config) as run:
                stream = run.stream("bench")
                started = time.thread_time()
                if many:
                    for first in range(0, n, BATCH):
                        await stream.record_many(values[first:first + BATCH])
                else:
                    record = stream.record
                    for value in values:
                        await record(value)
                return time.thread_time() - started

    async def timed_record(many: bool) -> float:
        return min([await apersist_record(many) for _ in range(repeats)]) / n * 1e6

    dumps_us = per_event_us(dumps_alone, n, repeats)
    return [
        ("floor: `orjson.dumps` + `list.append`", per_event_us(floor, n, repeats)),
        ("`orjson.dumps` alone", dumps_us),
        (f"`orjson.dumps` kept in a list, {BATCH_ENTRIES} at a time, then freed together "
         "(the open batch as a list of each event's JSON)", per_event_us(kept_in_lists, n, repeats)),
        ("`orjson.dumps` appended to a `bytearray` with a comma (the open batch as its "
         "record's text)", per_event_us(kept_in_bytearray, n, repeats)),
        ("`orjson.dumps` and the NaN probe of its result (`data.partition(b\"null\")`)",
         per_event_us(nan_probe, n, repeats)),
        ("`await` of an empty async method", per_event_us_async(awaiting, n, repeats)),
        ("`record_many`'s serialization and framing: one `dumps` of each batch of 1,024, "
         "NaN probe, one head and CRC-32 (`_encode_batch`, `append_record`)",
         per_event_us(framing, n, repeats)),
        ("one wall-clock reading (`time.time_ns() // 10**6`)", per_event_us(clock, n, repeats)),
        ("one wall-clock reading against the open millisecond (`start <= time.time_ns() < end`)",
         per_event_us(clock_window, n, repeats)),
        ("**apersist `record()`**, whole (open and final commit excluded)",
         asyncio.run(timed_record(False))),
        ("**apersist `record_many()`**, batches of 1,024, whole",
         asyncio.run(timed_record(True))),
    ]


def replay_rows(values: list[Any], repeats: int) -> list[tuple[str, float]]:
    n = len(values)
    dumped = [orjson.dumps(value) for value in values]
    segments: list[tuple[fmt.SegmentRef, bytes]] = []
    for number, first in enumerate(range(0, n, BATCH)):
        chunk = values[first:first + BATCH]
        key = fmt.segment_key("0", 1, number + 1)
        body = bytearray()
        value, offset = fmt.join_batch([orjson.dumps(v) for v in chunk], None)
        fmt.append_record(body, value, offset, 0, len(chunk))  # one batch record, as written
        data = fmt.encode_segment(fmt.SegmentMeta(key, fmt.KIND_EVENTS, "bench"), body,
                                  len(chunk))
        segments.append((fmt.SegmentRef(key, fmt.KIND_EVENTS, "bench", len(chunk), len(data)),
                         data))
    loads = orjson.loads

    def floor() -> None:
        for raw in dumped:
            loads(raw)

    def check() -> None:
        for ref, data in segments:
            fmt.SegmentView(ref, data)

    views = [fmt.SegmentView(ref, data) for ref, data in segments]

    def walk() -> None:
        for view in views:
            for _ in view.frames():
                pass

    def decode() -> None:
        for view in views:
            for _ in view.event_chunks(BATCH):
                pass

    columns = [chunk for view in views for chunk in view.event_chunks(BATCH)]

    def build() -> None:
        # replay()'s C loop: make each Event from the decoded columns.
        for values_, _offsets, times in columns:
            for _ in map(tuple.__new__, repeat(Event),
                         zip(values_, repeat(None), times, repeat(True))):
                pass

    async def yielding() -> None:
        async def generator() -> Any:
            for raw in dumped:
                yield raw
        async for _ in generator():
            pass

    async def apersist_replay(root: str) -> None:
        config = apersist.Config(apersist.Backend.filesystem(root))
        async with apersist.run(config) as run:
            async for _ in run.stream("bench").replay():
                pass

    async def fill(root: str) -> None:
        async with apersist.run(apersist.Config(apersist.Backend.filesystem(root))) as run:
            stream = run.stream("bench")
            for first in range(0, n, BATCH):
                await stream.record_many(values[first:first + BATCH])

    with tempfile.TemporaryDirectory() as root:
        asyncio.run(fill(root))
        whole = per_event_us_async(lambda: apersist_replay(root), n, repeats)
    return [
        ("floor: `orjson.loads` over each event's JSON", per_event_us(floor, n, repeats)),
        ("segment checks on read (header, trailer, body CRC-32)", per_event_us(check, n, repeats)),
        ("walking the records (`SegmentView.frames`)", per_event_us(walk, n, repeats)),
        ("walking and decoding them (`SegmentView.event_chunks`: one `orjson.loads` per batch)",
         per_event_us(decode, n, repeats)),
        ("building each `Event` from the decoded columns", per_event_us(build, n, repeats)),
        ("one `async for` step of an async generator",
         per_event_us_async(yielding, n, repeats)),
        ("**apersist `replay()`**, whole, loop thread (open included; reads run in threads)",
         whole),
    ]


def source_rows(rows: int, repeats: int) -> list[tuple[str, float]]:
    """The per-event live path of the job (``job.per_event``), step by step."""
    read = job.reader(rows)
    made = [{"k": i % job.KEYS, "v": i, "s": "abc"} for i in range(rows)]
    dumps = orjson.dumps

    def update(t: Any, v: dict[str, Any]) -> None:
        k = str(v["k"])
        c = t.get(k)
        t[k] = [1, v["v"]] if c is None else [c[0] + 1, c[1] + v["v"]]

    async def floor() -> None:
        t: dict[str, Any] = {}
        async for v, _offset in read(None):
            update(t, v)

    async def reader_alone() -> None:
        async for _item in read(None):
            pass

    def dict_writes() -> None:
        t: dict[str, Any] = {}
        for v in made:
            update(t, v)

    def dumps_rows() -> None:
        for v in made:
            dumps(v)

    async def in_run(step: Callable[[apersist.Run], Any]) -> float:
        """Thread CPU seconds of ``step`` in a fresh run (not the open or final commit)."""
        with tempfile.TemporaryDirectory() as root:
            config = apersist.Config(apersist.Backend.filesystem(root), snapshot_interval_ms=0)
            async with apersist.run(config) as run:
                await run.table(job.TABLE)  # opened before the clock starts, as the job does
                started = time.thread_time()
                await step(run)
                return time.thread_time() - started

    async def source_only(run: apersist.Run) -> None:
        async for _ev in run.source(job.SOURCE, read):
            pass

    async def source_table(run: apersist.Run) -> None:
        t = await run.table(job.TABLE)
        async for ev in run.source(job.SOURCE, read):
            if not ev.replayed:
                update(t, ev.value)

    async def table_writes(run: apersist.Run) -> None:
        t = await run.table(job.TABLE)
        for v in made:
            update(t, v)

    def timed_in_run(step: Callable[[apersist.Run], Any]) -> float:
        return min(asyncio.run(in_run(step)) for _ in range(repeats)) / rows * 1e6

    # The least that any persisted source and table can do per event in this interpreter,
    # with this API's shape (an async iterator of events, a mapping that records): what
    # the targets of issue 14 are measured against. Nothing is committed, held or checked.
    async def least_persisted() -> None:
        t = _LeastTable()
        async for ev in _least_source(read(None)):
            if not ev.replayed:
                update(t, ev.value)

    chunk = orjson.dumps(made[:BATCH_ENTRIES])

    async def least_restore() -> None:
        async def replayed() -> Any:
            for first in range(0, rows, BATCH_ENTRIES):
                values = orjson.loads(chunk)
                for event in map(tuple.__new__, repeat(Event), zip(
                        values, range(first, first + len(values)), repeat(0), repeat(True))):
                    yield event
        async for ev in replayed():
            if ev.replayed:
                continue

    return [
        ("floor: the job's loop over the same reader, a `dict` for the table, no run",
         per_event_us_async(floor, rows, repeats)),
        ("the reader alone (an async generator making each row and its offset)",
         per_event_us_async(reader_alone, rows, repeats)),
        ("the job's update with a `dict` (`get`, `str(k)`, a new list, set), rows made before",
         per_event_us(dict_writes, rows, repeats)),
        ("the same update with a `Table` in a run (group commit behind)", timed_in_run(table_writes)),
        ("`orjson.dumps` of the row", per_event_us(dumps_rows, rows, repeats)),
        ("**apersist `run.source()`** over the reader, nothing done per event",
         timed_in_run(source_only)),
        ("**apersist `run.source()` + a table write per event: the job**, whole (open and "
         "final commit excluded)", timed_in_run(source_table)),
        ("the least a persisted job can cost in Python: an async generator around the reader "
         "that serializes each row and its offset, reads the clock and keeps them; a mapping "
         "that serializes each value; no commit", per_event_us_async(least_persisted, rows,
                                                                  repeats)),
        ("the least a restore can cost in Python: one `orjson.loads` per 256 events, an async "
         "generator yielding an `Event` each, the job's loop skipping it",
         per_event_us_async(least_restore, rows, repeats)),
    ]


@dataclasses.dataclass
class Click:
    """``make_values``'s dict as a dataclass: the same fields, the same JSON."""

    user: str
    n: int
    ok: bool


@dataclasses.dataclass(slots=True)
class SlottedClick:
    """``Click`` with ``slots=True``: orjson writes it through a slower path."""

    user: str
    n: int
    ok: bool


@dataclasses.dataclass
class Payment:
    """A value whose fields JSON has no type for: stored as text, decoded by annotation."""

    user: str
    amount: decimal.Decimal
    at: dt.datetime


def typed_rows(values: list[dict[str, Any]], repeats: int) -> list[tuple[str, float]]:
    """``type=`` against plain values: record, replay and the live path of ``run.source()``."""
    n = len(values)
    clicks = [Click(**value) for value in values]
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    payments = [Payment(v["user"], decimal.Decimal(v["n"]) / 100, at) for v in values]
    click_codec, payment_codec = value_codec(Click, None), value_codec(Payment, None)
    assert click_codec is not None
    assert payment_codec is not None
    slotted = [SlottedClick(**value) for value in values]
    loaded = [orjson.loads(orjson.dumps(value)) for value in values]
    loaded_payments = [orjson.loads(payment_codec.dumps(p)) for p in payments]

    def step(fn: Callable[[Any], object], items: list[Any]) -> float:
        def each() -> None:
            for item in items:
                fn(item)
        return per_event_us(each, n, repeats)

    def decode(codec: Any, items: list[Any]) -> float:
        # As replay decodes: map over a chunk of fresh dicts (copied outside the clock).
        chunks = [[dict(d) for d in items[first:first + BATCH_ENTRIES]]
                  for first in range(0, n, BATCH_ENTRIES)]

        def each() -> None:
            for chunk in chunks:
                codec.decode_values(chunk, None, 0, "bench")
        best = per_event_us(each, n, 1)
        for _ in range(repeats - 1):  # fresh dicts for every run: decoding converts in place
            chunks[:] = [[dict(d) for d in items[first:first + BATCH_ENTRIES]]
                         for first in range(0, n, BATCH_ENTRIES)]
            best = min(best, per_event_us(each, n, 1))
        return best

    async def record(items: list[Any], kind: type | None) -> float:
        with tempfile.TemporaryDirectory() as root:
            config = apersist.Config(apersist.Backend.filesystem(root))
            async with apersist.run(config) as run:
                stream = run.stream("bench") if kind is None else run.stream("bench", type=kind)
                put = stream.record
                started = time.thread_time()
                for item in items:
                    await put(item)
                return time.thread_time() - started

    def timed_record(items: list[Any], kind: type | None) -> float:
        return min(asyncio.run(record(items, kind)) for _ in range(repeats)) / n * 1e6

    def timed_replay(items: list[Any], kind: type | None) -> float:
        async def fill(root: str) -> None:
            async with apersist.run(apersist.Config(apersist.Backend.filesystem(root))) as run:
                stream = run.stream("bench") if kind is None else run.stream("bench", type=kind)
                for first in range(0, n, BATCH):
                    await stream.record_many(items[first:first + BATCH])

        async def replay(root: str) -> None:
            async with apersist.run(apersist.Config(apersist.Backend.filesystem(root))) as run:
                stream = run.stream("bench") if kind is None else run.stream("bench", type=kind)
                async for _ in stream.replay():
                    pass

        with tempfile.TemporaryDirectory() as root:
            asyncio.run(fill(root))
            return per_event_us_async(lambda: replay(root), n, repeats)

    def timed_source(items: list[Any], kind: type | None) -> float:
        async def read(offset: Any) -> Any:
            for index, item in enumerate(items):
                yield item, index

        async def live() -> float:
            with tempfile.TemporaryDirectory() as root:
                config = apersist.Config(apersist.Backend.filesystem(root))
                async with apersist.run(config) as run:
                    events = (run.source("bench", read) if kind is None
                              else run.source("bench", read, type=kind))
                    started = time.thread_time()
                    async for _ in events:
                        pass
                    return time.thread_time() - started
        return min(asyncio.run(live()) for _ in range(repeats)) / n * 1e6

    return [
        ("floor: **apersist `record()`** of the plain dicts, whole", timed_record(values, None)),
        ("`orjson.dumps` of the dict", step(orjson.dumps, values)),
        ("`orjson.dumps` of the dataclass (orjson writes it natively)", step(orjson.dumps, clicks)),
        ("`orjson.dumps` of the same dataclass with `slots=True`", step(orjson.dumps, slotted)),
        ("the typed encoder on the dataclass (`isinstance` check, `orjson.dumps` with the "
         "`default` hook, NaN probe)", step(click_codec.dumps, clicks)),
        ("**apersist `record()`** of the dataclasses with `type=Click`, whole",
         timed_record(clicks, Click)),
        ("**apersist `replay()`** of the plain dicts, whole", timed_replay(values, None)),
        ("decoding a replayed chunk into `Click`s (`Click(**d)` mapped over the chunk)",
         decode(click_codec, loaded)),
        ("**apersist `replay()`** with `type=Click`, whole", timed_replay(clicks, Click)),
        ("**apersist `run.source()`** live over the plain dicts, nothing done per event",
         timed_source(values, None)),
        ("**apersist `run.source()`** live with `type=Click`", timed_source(clicks, Click)),
        ("the typed encoder on a `Payment` (a `Decimal` and a `datetime` field: the `default` "
         "hook writes the Decimal as text)", step(payment_codec.dumps, payments)),
        ("decoding a replayed chunk into `Payment`s (`Decimal(text)`, "
         "`datetime.fromisoformat`)", decode(payment_codec, loaded_payments)),
        ("**apersist `record()`** with `type=Payment`, whole", timed_record(payments, Payment)),
        ("**apersist `replay()`** with `type=Payment`, whole", timed_replay(payments, Payment)),
    ]


async def _least_source(items: Any) -> Any:
    """A persisted source stripped to what any must do per event (see source_rows)."""
    dumps, clock = orjson.dumps, time.time_ns
    values: list[bytes] = []
    offsets: list[bytes] = []
    async for value, offset in items:
        data, off = dumps(value), b"%d" % offset
        time_ms = clock() // 1_000_000
        yield tuple.__new__(Event, (value, offset, time_ms, False))
        values.append(data)
        offsets.append(off)
        if len(values) >= BATCH_ENTRIES:
            values, offsets = [], []


_dict_set = dict.__setitem__


class _LeastTable(dict[str, Any]):
    """A mapping stripped to what a recording table must do per write (see source_rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, bytes] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.records[key] = orjson.dumps([key, value])
        _dict_set(self, key, value)


def render(events: int, repeats: int, sections: list[tuple[str, list[tuple[str, float]], bool]]) -> str:
    lines = [f"Per event, µs of event-loop thread CPU, least of {repeats} runs over {events:,} "
             f"small dicts (`python -m benchmarks.breakdown --events {events}`). The target "
             f"\"≥ 0.5x the floor\" allows twice the floor's time per event (record and "
             f"replay); the job's target is Pathway's rate, not its floor.", ""]
    for title, rows, budget in sections:
        floor = rows[0][1]
        lines += [f"| {title}: step | µs per event | times the floor's time |", "| --- | ---: | ---: |"]
        lines += [f"| {label} | {us:.3f} | {us / floor:.2f} |" for label, us in rows]
        if budget:
            lines += [f"| target budget (twice the floor) | {2 * floor:.3f} | 2.00 |"]
        lines += [""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    values = make_values(args.events)
    gc.freeze()  # the inputs are not garbage: keep the collector off them, as the suite does
    table = render(args.events, args.repeats, [
        ("record", record_rows(values, args.repeats), True),
        ("replay", replay_rows(values, args.repeats), True),
        ("job, `run.source()` live path", source_rows(args.events, args.repeats), False),
        ("typed values, `type=`", typed_rows(values, args.repeats), False)])
    print(table)
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
