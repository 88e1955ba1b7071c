"""Streams, their events, and ``source()``: replay what was committed, then go live."""

from __future__ import annotations

import inspect
import time
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from itertools import repeat
from typing import Any, NamedTuple

import anyio
import anyio.lowlevel
import orjson

from . import _format as fmt
from ._policy import Policy
from ._scheduler import Scheduler
from ._store import Store
from ._values import dumps_value

__all__ = ["Event", "Stream"]

_loads = orjson.loads
_dumps = orjson.dumps
_crc32 = zlib.crc32
_pack_head = fmt.RECORD_HEAD.pack
_pack_crc = fmt.U32.pack
_OVERHEAD = fmt.RECORD_OVERHEAD
# Replay hands control back to the event loop this often, so a consumer that never awaits
# cannot starve the scheduler and other tasks.
_CHECKPOINT_EVERY = 1024


def _loads_offset(raw: bytes | None) -> Any:
    return None if raw is None else _loads(raw)


class Event(NamedTuple):
    """One event of a stream: recorded now (``replayed=False``) or replayed from the store."""

    value: Any
    offset: Any
    time_ms: int
    replayed: bool


# Event(...) runs a generated __new__ in Python; tuple.__new__ is half the cost (replay's
# hot path builds one per event).
_new_event = tuple.__new__


def _frame_batch(values: list[Any] | tuple[Any, ...], offsets: list[bytes] | None,
                 time_ms: int) -> bytearray:
    """Serialize and frame ``values`` (with ``offsets``, b"" for none) as records.

    The loop of ``record()`` without its per-call costs. Each value's JSON is copied out at
    once: holding thousands of orjson results costs several times their serialization (each
    starts as a 4 KiB allocation). A value that orjson refuses, or that holds NaN or
    infinity, raises a ``TypeError``, one of 4 GiB or more a ``struct.error``; the caller
    then checks the values one by one to name the culprit.
    """
    framed = bytearray()
    if offsets is None:  # the common case, in a loop of its own
        for value in values:
            data = _dumps(value)
            if data.find(b"null") != -1:
                dumps_value(value, "a batch")  # refuses NaN and infinity
            head = _pack_head(len(data), 0, time_ms)
            framed += head
            framed += data
            framed += _pack_crc(_crc32(data, _crc32(head)))
        return framed
    for value, off in zip(values, offsets, strict=True):
        data = _dumps(value)
        if data.find(b"null") != -1:
            dumps_value(value, "a batch")
        head = _pack_head(len(data), len(off), time_ms)
        framed += head
        framed += data
        framed += off
        framed += _pack_crc(_crc32(off, _crc32(data, _crc32(head))))
    return framed


class Stream:
    """A named, persistent, append-only sequence of events. Get one with ``run.stream()``."""

    __slots__ = ("_buffer", "_clock_ms", "_opened_seq", "_policy", "_scheduler", "_spawn",
                 "_store", "_where", "name")

    def __init__(self, name: str, *, store: Store, scheduler: Scheduler | None,
                 policy: Policy, opened_seq: int, clock_ms: Callable[[], int],
                 spawn: Callable[..., object] | None = None) -> None:
        self.name = name
        self._spawn = spawn  # starts a task in the run's task group (replay read-ahead)
        self._store = store
        self._scheduler = scheduler
        self._policy = policy
        self._opened_seq = opened_seq
        self._clock_ms = clock_ms
        self._where = f"stream {name!r}"
        self._buffer = (scheduler.buffer(fmt.KIND_EVENTS, name)
                        if scheduler is not None and policy.record_events else None)

    def __repr__(self) -> str:
        return f"<apersist.Stream name={self.name!r} offset={self.offset!r}>"

    @property
    def offset(self) -> Any:
        """The offset in the latest durable commit (this run's included), or None."""
        policy = self._policy
        if not policy.offsets_load and (self._store.last_seq <= self._opened_seq):
            return None  # a new history: stored offsets belong to the superseded one
        if not (policy.offsets_load or policy.offsets_persist):
            return None
        raw = self._store.offsets.get(self.name)
        return None if raw is None else _loads(raw)

    async def record(self, value: Any, *, offset: Any = None) -> None:
        """Record ``value`` (and the source ``offset`` it was read at) for the next commit.

        The value is serialized now: a value orjson cannot serialize raises ``TypeError``
        naming this stream. Waits only when uncommitted bytes pass the back-pressure bound.
        Durable once a later commit completes (``await run.commit()`` forces one).
        """
        buf, scheduler = self._buffer, self._scheduler
        if buf is None or scheduler is None or offset is not None:
            self._append(value, offset)
            if scheduler is not None and scheduler.over_limit:
                await scheduler.wait_capacity()
            return
        # The hot path: _append for an event without an offset, inlined.
        data = dumps_value(value, self._where)
        head = _pack_head(len(data), 0, self._clock_ms())
        body = buf.body
        body += head
        body += data
        body += _pack_crc(_crc32(data, _crc32(head)))
        buf.count += 1
        if scheduler.note_appended(buf, _OVERHEAD + len(data)):
            await scheduler.wait_capacity()

    async def record_many(self, values: Iterable[Any], *,
                          offsets: Iterable[Any] | None = None) -> None:
        """Record each of ``values`` in order, as that many ``record()`` calls would.

        All or nothing: every value and offset is serialized first, and one that cannot be
        raises ``TypeError`` (or ``ValueError``, like ``record()``) naming this stream and
        its index, with nothing of the batch recorded. ``offsets``, if given, has one item
        per value (``None``: no offset) or raises ``ValueError``; the last one that is not
        ``None`` becomes the stream's offset. The events share one ``time_ms`` and land in
        the same commit. Waits only when uncommitted bytes pass the back-pressure bound.
        """
        values = values if isinstance(values, list | tuple) else list(values)
        offs = None if offsets is None else [
            b"" if offset is None
            else dumps_value(offset, f"the offset of {self._where} (batch index {index})")
            for index, offset in enumerate(offsets)]
        if offs is not None and len(offs) != len(values):
            raise ValueError(f"record_many needs one offset per value: stream={self.name} "
                             f"values={len(values)} offsets={len(offs)}")
        buf, scheduler = self._buffer, self._scheduler
        if buf is None or scheduler is None:
            for index, value in enumerate(values):
                dumps_value(value, f"{self._where} (batch index {index})")
            last = next((off for off in reversed(offs or ()) if off), b"")
            if last and scheduler is not None and self._policy.offsets_persist:
                scheduler.set_offset(self.name, last)  # OFFSETS_ONLY
            return
        if not values:
            return
        try:
            framed = _frame_batch(values, offs, self._clock_ms())
        except Exception:
            # Find the culprit with the checks record() makes, to raise its error.
            for index, value in enumerate(values):
                dumps_value(value, f"{self._where} (batch index {index})")
            raise
        buf.extend(framed, len(values), scheduler.max_segment_bytes)
        newest = next((off for off in reversed(offs or ()) if off), None)
        if newest is not None:
            buf.offset = newest
        if scheduler.note_appended(buf, len(framed), len(values)):
            await scheduler.wait_capacity()

    def _append(self, value: Any, offset: Any) -> int:
        """Serialize and buffer one event; return its ``time_ms``."""
        data = dumps_value(value, self._where)
        off = b"" if offset is None else dumps_value(offset, f"the offset of {self._where}")
        time_ms: int = self._clock_ms()
        buf = self._buffer
        if buf is None:
            if off and self._scheduler is not None and self._policy.offsets_persist:
                self._scheduler.set_offset(self.name, off)  # OFFSETS_ONLY
            return time_ms
        # append_record, inlined: this is the hot path of record().
        head = _pack_head(len(data), len(off), time_ms)
        crc = _crc32(data, _crc32(head))
        body = buf.body
        body += head
        body += data
        if off:
            crc = _crc32(off, crc)
            body += off
            buf.offset = off
        body += _pack_crc(crc)
        buf.count += 1
        self._scheduler.note_appended(  # type: ignore[union-attr]
            buf, _OVERHEAD + len(data) + len(off))
        return time_ms

    async def replay(self) -> AsyncIterator[Event]:
        """Yield the events committed before this run opened, in record order.

        The same on every call. Streams a window of segments at a time: memory is
        bounded by the window (8 MiB or one segment), not by the history. A damaged
        segment raises ``CorruptDataError`` before any of its events is yielded. Under
        ``REALTIME_REPLAY`` the recorded gaps are kept.
        """
        if not self._policy.replay:
            return
        segments = [s.ref for s in self._store.segments(fmt.KIND_EVENTS, self.name)
                    if s.seq <= self._opened_seq]
        realtime = self._policy.realtime
        first_ms: int | None = None
        started = 0.0
        async for view in self._read_ahead(segments):
            for values, offsets, times in view.columns(_CHECKPOINT_EVERY):
                # A chunk at a time: its values are parsed and its events built by C loops
                # (map, zip), leaving the loop below one yield per event.
                events = map(_new_event, repeat(Event), zip(
                    map(_loads, values),
                    repeat(None) if offsets is None else map(_loads_offset, offsets),
                    times, repeat(True)))
                if not realtime:
                    for event in events:
                        yield event
                else:
                    for event in events:
                        if first_ms is None:
                            first_ms, started = event.time_ms, time.monotonic()
                        delay = (event.time_ms - first_ms) / 1000 - (time.monotonic() - started)
                        if delay > 0:
                            await anyio.sleep(delay)
                        yield event
                await anyio.lowlevel.checkpoint()

    async def _read_ahead(self, refs: list[fmt.SegmentRef]) -> AsyncIterator[fmt.SegmentView]:
        """The segments ``refs``, read a window ahead by a task of the run (if it has one)."""
        if self._spawn is None or len(refs) <= 1:
            async for view in self._store.read_segments(refs):
                yield view
            return
        send, receive = anyio.create_memory_object_stream[
            "list[fmt.SegmentView] | Exception"](max_buffer_size=1)
        self._spawn(self._store.feed_windows, refs, send)
        async with receive:
            async for item in receive:
                if isinstance(item, Exception):
                    raise item
                for view in item:
                    yield view

    async def _source(self, reader: Callable[[Any], Any],
                      continue_after_replay: bool) -> AsyncIterator[Event]:
        async for event in self.replay():
            yield event
        if not continue_after_replay:
            return
        live = reader(self.offset)
        if inspect.isawaitable(live):
            live = await live
        if not isinstance(live, AsyncIterable):
            raise TypeError(f"the reader of {self._where} must return an async iterable: "
                            f"got={type(live).__name__}")
        iterator = aiter(live)
        try:
            async for item in iterator:
                if isinstance(item, tuple) and len(item) == 2:
                    value, offset = item
                else:
                    value, offset = item, None
                scheduler = self._scheduler
                if scheduler is None:
                    yield Event(value, offset, self._append(value, offset), False)
                    continue
                await scheduler.wait_cut()
                time_ms = self._append(value, offset)
                if scheduler.over_limit:
                    await scheduler.wait_capacity()
                # Held until the consumer asks for the next event: a commit then holds the
                # event together with the state the consumer derived from it.
                task = anyio.get_current_task().id
                scheduler.hold(task)
                try:
                    yield Event(value, offset, time_ms, False)
                finally:
                    scheduler.release(task)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
