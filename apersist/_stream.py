"""Streams, their events, and ``source()``: replay what was committed, then go live."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice, repeat
from typing import Any, Generic, NamedTuple, TypeVar

import anyio
import orjson
from anyio.streams.memory import MemoryObjectSendStream

from . import _format as fmt
from ._barrier import CONSUMER, Held
from ._buffer import BATCH_ENTRIES
from ._codec import Codec, ValueCodec, next_codec
from ._concurrency import cancelled_by_another_task, current_task_getter
from ._lifecycle import Lifecycle
from ._metrics import NO_METRICS, Metrics
from ._pacing import COOPERATE_NS, Pacer, RealtimePace, yield_to_loop
from ._policy import Policy
from ._scheduler import Scheduler
from ._stopping import mark_holds_an_item, settle_stop_cancel, take_back_stop_cancel
from ._store import Store
from ._values import _has_nonfinite, checked_json, dumps_value, unserializable

__all__ = ["Batch", "Event", "Stream", "wall_clock_ms"]

_loads = orjson.loads
_dumps = orjson.dumps
_Fragment = orjson.Fragment
T = TypeVar("T")
# Replay reads the clock after a slice of events that took this long (its consumer's work
# included), and makes the next slices smaller: see Stream._replay_slices.
_SLICE_NS = 250_000
# The ints orjson writes (and reads back as ints): an offset in this range is written with
# b"%d" % offset, which costs less than a call of orjson.dumps.
_INT_MIN, _INT_END = -(1 << 63), 1 << 64
# A live source event joins the open batch by itself below this count; the one that fills
# it goes through the scheduler, which frames the batch.
_LIVE_LIMIT = BATCH_ENTRIES - 1


def wall_clock_ms() -> int:
    """The run's clock unless one is injected: milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


class Event(NamedTuple, Generic[T]):
    """One event of a stream: recorded now (``replayed=False``) or replayed from the store.

    Generic in its value's type: ``Event[Order]`` from a source given ``type=Order``.
    """

    value: T
    offset: Any
    time_ms: int
    replayed: bool


class Batch(NamedTuple, Generic[T]):
    """Events of a stream taken together (``run.source_batches()``): recorded now
    (``replayed=False``) or replayed from the store.

    ``values`` in order; ``offset`` is the offset of the last one (the reader's, live; the
    newest stored one of the batch, replayed), or None. A live batch is one item of the
    reader; replayed batches are the stored events in chunks of up to 256.
    """

    values: list[T]
    offset: Any
    time_ms: int
    replayed: bool


# Event(...) runs a generated __new__ in Python; tuple.__new__ is half the cost (replay's
# hot path builds one per event).
_new_event = tuple.__new__


def _encode_batch(values: Sequence[Any], offsets: list[bytes] | None, limit: int,
                  where: str, first: int = 0) -> list[tuple[bytes, bytes, int]]:
    """Serialize ``values`` into batch records (value, offset, count) of at most ``limit`` bytes.

    One ``orjson.dumps`` of a list writes exactly the JSON array of its items' JSON, so a
    batch costs one C call instead of one per value. A value that orjson refuses or that
    holds NaN or infinity raises, naming its index (``first`` + its position), as
    ``record()`` would.
    """
    try:
        data = _dumps(values)
        bad = data.find(b"null") != -1 and _has_nonfinite(values)
    except TypeError:  # refused somewhere in the batch (or too deep once inside a list)
        bad = True
    if bad or len(data) > fmt.MAX_RECORD_JSON:
        # Find the culprit with the checks record() makes, to raise its error; if every
        # value passes alone, only the batch was refused: frame them one by one.
        singles = [dumps_value(value, f"{where} (batch index {first + index})")
                   for index, value in enumerate(values)]
        return [(value, offsets[index] if offsets else b"", 1)
                for index, value in enumerate(singles)]
    if len(data) > limit and len(values) > 1:
        half = len(values) // 2
        return [*_encode_batch(values[:half], offsets and offsets[:half], limit, where, first),
                *_encode_batch(values[half:], offsets and offsets[half:], limit, where,
                               first + half)]
    if len(values) == 1:
        return [(data[1:-1], offsets[0] if offsets else b"", 1)]
    return [(data, fmt.join_offsets(offsets), len(values))]


def _value_and_offset(item: Any) -> tuple[Any, Any]:
    """A reader's item: a 2-tuple (a subclass too) is ``(value, offset)``, anything else
    a value without one. (The live hot path of ``source()`` inlines this.)"""
    if (type(item) is tuple or isinstance(item, tuple)) and len(item) == 2:
        return item[0], item[1]
    return item, None


@contextmanager
def _ending_on_stop(life: Lifecycle) -> Iterator[None]:
    """Around a ``source()`` or ``source_batches()`` call: run.stop() may wake it with a
    cancellation while it waits (see _stopping); the call then ends there, normally. When
    it ends with the run stopping, a cancellation of run.stop()'s that never reached it is
    taken back."""
    try:
        yield
    except asyncio.CancelledError:
        if not take_back_stop_cancel(life):
            raise
    finally:
        if life.stopping:
            settle_stop_cancel(life)


class Stream(Generic[T]):
    """A named, persistent, append-only sequence of events. Get one with ``run.stream()``.

    Generic in its values' type: ``Stream[Order]`` from ``run.stream(name, type=Order)``.
    """

    __slots__ = ("_buffer", "_clock_ms", "_clock_ns", "_codec", "_fast_bytes", "_holding",
                 "_life", "_metrics", "_opened_seq", "_policy", "_replayed_by_sources",
                 "_scheduler", "_source_gen", "_spawn", "_store", "_value_dumps", "_wall",
                 "_where", "_yielded_ns", "name")

    def __init__(self, name: str, *, store: Store, scheduler: Scheduler | None,
                 policy: Policy, opened_seq: int, clock_ms: Callable[[], int],
                 spawn: Callable[..., object] | None = None,
                 life: Lifecycle | None = None, metrics: Metrics = NO_METRICS) -> None:
        self.name = name
        self._metrics = metrics  # counts replayed events a chunk at a time
        self._life = life or Lifecycle()
        # source() in this run: how many replayed events it has yielded (a later call goes
        # on from there, never replays twice), and which call is the current one.
        self._replayed_by_sources = 0
        self._source_gen = 0
        self._holding: Held | None = None  # the live event the current source holds
        self._spawn = spawn  # starts a task in the run's task group (replay read-ahead)
        self._store = store
        self._scheduler = scheduler
        self._policy = policy
        self._opened_seq = opened_seq
        self._clock_ms = clock_ms
        # record() reads the clock in nanoseconds: the wall clock is then time.time_ns
        # itself, with no Python call around it (which would cost as much as the reading).
        self._wall = clock_ms is wall_clock_ms
        self._clock_ns: Callable[[], int] = (
            time.time_ns if self._wall else lambda: clock_ms() * 1_000_000)
        # When a call of this stream last yielded to the event loop, in the clock that
        # record() reads anyway (time.time_ns; time.monotonic_ns for an injected clock).
        self._yielded_ns = time.time_ns() if self._wall else time.monotonic_ns()
        self._where = f"stream {name!r}"
        self._buffer = (scheduler.buffer(fmt.KIND_EVENTS, name)
                        if scheduler is not None and policy.record_events else None)
        self._fast_bytes = scheduler.fast_value_bytes if scheduler is not None else 0
        # type= or codec= (see _set_codec): what turns a value into its JSON, read once per
        # record() (orjson.dumps itself for an untyped stream), and back on replay.
        self._codec: ValueCodec | None = None
        self._value_dumps: Callable[[Any], bytes] = _dumps

    def _set_codec(self, value_type: Any, codec: Codec[Any] | None) -> None:
        """Give this stream its values' type: the first call that names one fixes it for
        the run; another type later raises ``TypeError`` naming both."""
        resolved = next_codec(self._codec, value_type, codec, self._where)
        if resolved is not None:
            self._codec = resolved
            self._value_dumps = resolved.dumps

    def _fragments(self, values: Sequence[Any], first: int = 0) -> list[Any]:
        """A typed stream's ``values`` as orjson fragments of their JSON (what the batch
        paths serialize); ``TypeError`` naming the index of one that cannot be stored."""
        dumps = self._value_dumps
        stored = []
        for index, value in enumerate(values, first):
            try:
                stored.append(_Fragment(dumps(value)))
            except TypeError as exc:
                raise unserializable(f"{self._where} (batch index {index})", exc) from None
        return stored

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

    async def record(self, value: T, *, offset: Any = None) -> None:
        """Record ``value`` (and the source ``offset`` it was read at) for the next commit.

        The value is serialized now: a value orjson cannot serialize raises ``TypeError``
        naming this stream. Waits only when uncommitted bytes pass the back-pressure bound.
        Durable once a later commit completes (``await run.commit()`` forces one).
        """
        buf = self._buffer
        if buf is None or offset is not None:
            self._append(value, offset)
            if self._scheduler is not None and self._scheduler.over_limit:
                await self._scheduler.wait_capacity()
            else:
                await self._cooperate()
            return
        # The hot path, for an event without an offset. Most events add their JSON to the
        # open batch and nothing else: the scheduler allows that (LogBuffer.fast_from_ns) for
        # the rest of a millisecond once it has seen one of its events, and accounts for
        # them when the batch is framed. The first event of each millisecond, and any
        # large one, takes the scheduler's own path (add_event).
        scheduler: Scheduler = self._scheduler  # type: ignore[assignment]  # set with _buffer
        try:
            data = self._value_dumps(value)  # orjson.dumps, or the stream's type's
        except TypeError as exc:
            raise unserializable(self._where, exc) from None
        now = self._clock_ns()
        if not buf.fast_from_ns <= now < buf.fast_until_ns or len(data) > self._fast_bytes:
            # At least once a millisecond (the fast path's window), and on every large
            # event: the place where record() yields to the event loop if it is due.
            # (A typed value's dumps refused NaN and infinity itself: its size only.)
            checked = checked_json(data, None if self._codec else value, self._where)
            if scheduler.add_event(buf, checked, b"", now // 1_000_000):
                await scheduler.wait_capacity()
            else:
                await self._cooperate()
            return
        # A "null" (orjson's NaN and infinity) needs a "u": `117 in data` is one memchr,
        # cheaper than the substring test, which runs only then.
        if 117 in data and data.partition(b"null")[1] and self._codec is None:
            checked_json(data, value, self._where)  # raises for NaN or infinity
        # LogBuffer.append, inlined for an event without an offset: the one place outside
        # _buffer that writes a LogBuffer's fields, kept because record() is the hottest
        # path there is. This path with per-batch accounting took about 40 % off record()'s
        # loop CPU per event in A/B runs (CHANGELOG, "Faster record()"); the literal 44
        # (",") spares a global lookup per event.
        batch = buf.open_json
        batch += data
        batch.append(44)  # ","
        count = buf.open_count = buf.open_count + 1
        if count >= BATCH_ENTRIES:
            if scheduler.frame(buf):
                await scheduler.wait_capacity()
            else:  # an injected clock that stands still never leaves the fast path
                await self._cooperate()

    async def record_many(self, values: Iterable[T], *,
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
        if self._codec is not None:
            values = self._fragments(values)
        offs = None if offsets is None else [
            b"" if offset is None
            else dumps_value(offset, f"the offset of {self._where} (batch index {index})")
            for index, offset in enumerate(offsets)]
        if offs is not None and len(offs) != len(values):
            raise ValueError(f"record_many needs one offset per value: stream={self.name} "
                             f"values={len(values)} offsets={len(offs)}")
        buf, scheduler = self._buffer, self._scheduler
        if buf is None or scheduler is None:
            self._life.check("record_many()")
            await self._encode_records(values, offs, scheduler)  # checked in every mode
            last = next((off for off in reversed(offs or ()) if off), b"")
            if last and scheduler is not None and self._policy.offsets_persist:
                scheduler.set_offset(self.name, last)  # OFFSETS_ONLY
            return
        if not values:
            return
        records = await self._encode_records(values, offs, scheduler)
        # Nothing is buffered before every value has been serialized: all or nothing.
        scheduler.check_writable()
        time_ms = self._clock_ms()
        scheduler.frame(buf)  # events recorded before this batch come first
        over = False
        for value, offset, count in records:
            over = scheduler.append_framed(buf, value, offset, time_ms, count)  # seals if full
        newest = next((off for off in reversed(offs or ()) if off), None)
        if newest is not None:
            buf.offset = buf.recorded_offset = newest
        if over:
            await scheduler.wait_capacity()
        else:
            await self._cooperate()

    async def _encode_records(self, values: Sequence[Any], offs: list[bytes] | None,
                              scheduler: Scheduler | None) -> list[tuple[bytes, bytes, int]]:
        """``values`` (and their offsets' JSON) as batch records (value, offset, count).

        A record holds at most BATCH_ENTRIES values and takes at most a quarter of a
        segment, so that a segment passes the segment size by a quarter at most (or by one
        value bigger than that). A long list is serialized in steps that yield to the event
        loop (``Pacer``): a million values take about 100 ms.
        """
        limit = max((scheduler.max_segment_bytes if scheduler is not None
                     else fmt.MAX_RECORD_JSON) // 4, 1)
        records: list[tuple[bytes, bytes, int]] = []
        pacer = Pacer(COOPERATE_NS / 1e9) if len(values) > BATCH_ENTRIES else None
        for first in range(0, len(values), BATCH_ENTRIES):
            records += _encode_batch(values[first:first + BATCH_ENTRIES],
                                     offs and offs[first:first + BATCH_ENTRIES], limit,
                                     self._where, first)
            if pacer is not None and pacer.due():
                await pacer.pause()
        return records

    def _append(self, value: Any, offset: Any) -> int:
        """Serialize and buffer one event; return its ``time_ms``."""
        data, off, time_ms = self._encode(value, offset)
        buf = self._buffer
        if buf is None:
            self._life.check("record()")  # nothing is buffered here, but say so all the same
            if off and self._scheduler is not None and self._policy.offsets_persist:
                self._scheduler.set_offset(self.name, off)  # OFFSETS_ONLY
            return time_ms
        self._scheduler.add_event(buf, data, off, time_ms)  # type: ignore[union-attr]
        return time_ms

    def _encode(self, value: Any, offset: Any) -> tuple[bytes, bytes, int]:
        """One event's JSON, its offset's JSON (b"" for none) and its ``time_ms``."""
        if self._codec is None:
            data = dumps_value(value, self._where)
        else:
            try:
                data = self._value_dumps(value)  # which refuses NaN and infinity itself
            except TypeError as exc:
                raise unserializable(self._where, exc) from None
            data = checked_json(data, None, self._where)  # the size
        off = b"" if offset is None else dumps_value(offset, f"the offset of {self._where}")
        return data, off, self._clock_ms()

    def _recorded_offset(self) -> Any:
        """The newest offset this run recorded for this stream, else ``offset``."""
        raw: bytes | None = None
        if self._buffer is not None:
            raw = self._buffer.newest_offset
        elif self._scheduler is not None:
            raw = self._scheduler.recorded_offsets.get(self.name)
        return self.offset if raw is None else _loads(raw)

    async def replay(self) -> AsyncIterator[Event[T]]:
        """Yield the events committed before this run opened, in record order.

        The same on every call. Streams a window of segments at a time: memory is
        bounded by the window (8 MiB or one segment), not by the history. A damaged
        segment raises ``CorruptDataError`` before any of its events is yielded. Under
        ``REALTIME_REPLAY`` the recorded gaps are kept. Yields to the event loop about
        every millisecond (docs/concepts.md, "Schedule points").
        """
        life = self._life
        async for events in self._replay_slices():
            for event in events:
                yield event
                if life.ended:  # carried past the block: refused now, not a slice later
                    life.check("replay()")

    async def _replay_slices(self, skip: int = 0) -> AsyncIterator[Iterable[Event[T]]]:
        """The committed events in slices, the hot path of replay and of ``source()``.

        A chunk (``_replay_chunks``) is built by C loops (map, zip), leaving the consumer's
        loop one yield per event; chunks that small leave the garbage collector asleep (see
        ``BATCH_ENTRIES``). The clock is read between two slices: past ``COOPERATE_NS``
        since the last yield, this yields to the event loop. A consumer that spends long on
        each event gets smaller slices, so that it is asked again within a fraction of that.
        ``skip``: the first events a caller leaves out (see ``_replay_chunks``).
        """
        clock = time.perf_counter_ns
        per = BATCH_ENTRIES  # events between two readings of the clock
        yielded = last = clock()
        async for values, offsets, times in self._replay_chunks(skip):
            events = map(_new_event, repeat(Event), zip(
                values, repeat(None) if offsets is None else offsets, times, repeat(True)))
            count = len(values)
            while count > 0:
                yield events if count <= per else islice(events, per)
                count -= per
                now = clock()
                spent, last = now - last, now
                if spent > _SLICE_NS:
                    per = max(1, per * _SLICE_NS // spent)
                elif per < BATCH_ENTRIES:
                    per = min(BATCH_ENTRIES, per * 2)
                if now - yielded >= COOPERATE_NS:
                    await yield_to_loop()
                    yielded = last = clock()

    async def _realtime(self, segments: list[fmt.SegmentRef]) -> AsyncIterator[
            tuple[list[Any], list[Any], list[int]]]:
        """``REALTIME_REPLAY``: the committed events one at a time, as one-event chunks,
        with the recorded gaps between them (scaled and capped as ``Config`` says)."""
        pace = RealtimePace(speed=self._policy.realtime_speed,
                            max_gap_ms=self._policy.realtime_max_gap_ms)
        async for view in self._read_ahead(segments):
            for values, offsets, times in view.event_chunks(BATCH_ENTRIES):
                self._life.check("replay()")
                for value, offset, time_ms in zip(
                        values, repeat(None) if offsets is None else offsets, times, strict=False):
                    await pace.wait(time_ms)
                    yield [value], [offset], [time_ms]

    async def _read_ahead(self, refs: list[fmt.SegmentRef]) -> AsyncIterator[fmt.SegmentView]:
        """The segments ``refs``, read a window ahead by a task of the run (if it has one)."""
        if self._spawn is None or len(refs) <= 1:
            async for view in self._store.read_segments(refs):
                yield view
            return
        send, receive = anyio.create_memory_object_stream[
            "list[fmt.SegmentView] | Exception"](max_buffer_size=1)
        self._spawn(self._feed, refs, send)
        seen = 0
        async with receive:
            async for item in receive:
                if isinstance(item, Exception):
                    raise item
                seen += len(item)
                for view in item:
                    yield view
        if seen < len(refs):
            # The feeding task ended early: never end a replay silently short.
            self._life.check("replay()")
            raise RuntimeError(f"the replay of {self._where} stopped early: its read-ahead "
                               f"task was cancelled by another task: segments={seen} of "
                               f"{len(refs)}")

    async def _feed(self, refs: list[fmt.SegmentRef],
                    send: MemoryObjectSendStream[list[fmt.SegmentView] | Exception]) -> None:
        """``Store.feed_windows`` as a task of the run that another task may cancel."""
        try:
            await self._store.feed_windows(refs, send)
        except anyio.get_cancelled_exc_class():
            if not cancelled_by_another_task():
                raise
            # Cancelling the run's task group would end the block silently; the consumer
            # sees the replay end short and says why (send is closed by now).

    def _take_over(self) -> tuple[int, int]:
        """A new ``source()`` call of this stream: (its generation, replayed events to skip).

        A later call of the same run (a service reconnecting after its reader failed) goes
        on where the earlier ones stopped: the rest of the replay, if any, then the reader
        from the newest offset recorded, so nothing is delivered twice.
        """
        self._life.check("source()")
        earlier = self._holding
        if earlier is not None and not earlier.settled and self._scheduler is not None:
            # The consumer of an earlier call left it holding an event and has moved on: the
            # event is settled now (kept unless its task was interrupted), before this call
            # records anything after it.
            self._holding = None
            self._scheduler.barrier.release(earlier, finished=False)
        self._source_gen += 1
        return self._source_gen, self._replayed_by_sources

    async def _live(self, reader: Callable[[Any], Any]) -> AsyncIterator[Any]:
        """The reader's live iterable, called with the newest offset recorded."""
        live = reader(self._recorded_offset())
        if inspect.isawaitable(live):
            live = await live
        if not isinstance(live, AsyncIterable):
            raise TypeError(f"the reader of {self._where} must return an async iterable: "
                            f"got={type(live).__name__}")
        return aiter(live)

    def _recording_scheduler(self) -> Scheduler | None:
        """What this run stores of a live event: the event (and offset), the offset only
        (OFFSETS_ONLY), or nothing (UDF_CACHING, REPLAY access): then the scheduler is None
        and the event just passes."""
        if self._buffer is None and not self._policy.offsets_persist:
            return None
        return self._scheduler

    async def _source(self, reader: Callable[[Any], Any],
                      continue_after_replay: bool) -> AsyncIterator[Event[T]]:
        with _ending_on_stop(self._life):
            generation, skip = self._take_over()
            life = self._life
            if life.stopping:
                # Called after run.stop(): ends at once, but once through the event loop,
                # so that a loop around the source that misses `run.stopping` (a reconnect
                # loop) slows to the loop's pace instead of starving it.
                await yield_to_loop()
                return
            seen = 0
            async for events in self._replay_slices(skip):
                if life.stopping:  # run.stop(): a slice is at most a millisecond of the loop's
                    return
                for event in events:
                    seen += 1
                    if seen > skip:
                        self._replayed_by_sources = seen
                        yield event
                        if life.ended:  # carried past the block: refused now, as replay()
                            life.check("source()")
            if not continue_after_replay or life.stopping:
                return
            iterator = await self._live(reader)
            scheduler = self._recording_scheduler()
            try:
                if scheduler is None:
                    async for item in iterator:
                        if generation != self._source_gen:
                            raise self._superseded()
                        value, offset = _value_and_offset(item)
                        yield Event(value, offset, self._append(value, offset), False)
                        if life.stopping:  # run.stop(): end after the event in hand
                            return
                        await self._cooperate()
                    return
                # The live hot path: one held event at a time, in a ``Held`` reused for each;
                # its JSON made here, before the consumer sees the value. Everything per event
                # is inlined, and the common case takes the fewest steps: each step it saves
                # is a few percent of the job users run (docs/performance.md).
                barrier = scheduler.barrier
                holds = barrier.held
                held = Held(self._buffer, self.name)
                buf = held.buf
                consumer_of = CONSUMER.get
                task_now = current_task_getter()
                wall = self._wall
                clock_ns = self._clock_ns
                where = self._where
                fast_bytes = self._fast_bytes
                live_values: list[bytes] = buf.live_values if buf is not None else []
                live_offsets: list[bytes] = buf.live_offsets if buf is not None else []
                live_ms = -1
                dumps = self._value_dumps  # orjson.dumps, or the stream's type's
                runner: asyncio.Task[Any] | None = None  # the task that ran the last hold()
                # The stream's hold while this call is live: held while not settled (a later
                # source() call settles it, see _take_over).
                self._holding = held
                if buf is not None:
                    buf.source_hold = held  # what the consumer records here goes after its event
                yielded = clock_ns() if wall else time.monotonic_ns()
                async for item in iterator:
                    if generation != self._source_gen:
                        raise self._superseded()
                    if barrier._cut_barrier is not None:
                        await barrier.wait_cut()  # a waiting cut goes first
                    if (type(item) is tuple or isinstance(item, tuple)) and len(item) == 2:
                        value, offset = item
                        off = (b"" if offset is None
                               else b"%d" % offset
                               if type(offset) is int and _INT_MIN <= offset < _INT_END
                               else dumps_value(offset, f"the offset of {where}"))
                    else:
                        value, offset, off = item, None, b""
                    try:
                        data = dumps(value)
                    except TypeError as exc:
                        raise unserializable(where, exc) from None
                    # checked_json's tests, when they can fail: a "null" (orjson's NaN and
                    # infinity) needs a "u", and `117 in data` is one memchr; a large value
                    # may pass the record size.
                    if len(data) > fast_bytes or (117 in data and data.partition(b"null")[1]):
                        # NaN, infinity (an untyped value's: a type's dumps refused them),
                        # too long: raises
                        checked_json(data, None if self._codec else value, where)
                    now = clock_ns()
                    time_ms = now // 1_000_000
                    if scheduler._unusable is not None:
                        scheduler.check_writable()
                    # Held, not yet buffered, until the consumer asks for the next event: a
                    # commit then holds the event together with the state the consumer derived
                    # from it, and a consumer interrupted part-way leaves it out of the final
                    # commit (see _barrier). SourceBarrier.hold, inlined for the usual case:
                    # the same task, with the same Consumer, as for the event before. Another
                    # task goes through hold() even with the same Consumer (one inherited with
                    # its context): an iterator handed to a task, or a task that only fetches
                    # the event for its creator (asyncio.wait_for on 3.11), which hold() tells.
                    consumer = held.consumer
                    task = task_now()
                    if consumer is None or consumer_of() is not consumer or task is not runner:
                        barrier.hold(held, task, data, off, time_ms)
                        runner = task
                    else:
                        held.mark = consumer.writes
                        held.settled = held.buffered = False
                        held.value, held.offset, held.time_ms = data, off, time_ms
                        holds.add(held)
                    try:
                        yield _new_event(Event, (value, offset, time_ms, False))
                    except BaseException:
                        barrier.close_held(held)  # _holding stays: a later source() settles it
                        raise
                    # The consumer asks for the next event: the event is buffered now
                    # (SourceBarrier.release, inlined), unless a cut decided on it meanwhile.
                    if barrier._cut_barrier is not None:
                        barrier.changed()  # a cut waits for holds: it looks again
                    if held.settled:
                        pass  # a cut decided on it while its consumer waited
                    elif held.buffered:  # buffered when its consumer recorded on this stream
                        held.settled = True
                    else:
                        held.settled = True
                        # Into the stream's live lists by itself while the scheduler need not see
                        # it: two list appends (LogBuffer.live_values; folded into one record
                        # before anything else touches the log, and at every cut).
                        count = len(live_values)
                        if (0 < count < _LIVE_LIMIT and time_ms == live_ms
                                and len(data) <= fast_bytes and scheduler._unusable is None):
                            live_values.append(data)
                            live_offsets.append(off)
                        else:
                            if buf is not None and len(data) <= fast_bytes:
                                over = scheduler.add_live(buf, data, off, time_ms)
                                live_ms = time_ms
                            else:  # a large event (a record of its own), or offsets only
                                over = scheduler._buffer_held(held)
                            if over:
                                await scheduler.wait_capacity()
                                if life.stopping:
                                    return
                                continue
                    if life.stopping:  # run.stop(): end after the event in hand, now buffered
                        return
                    if not wall:
                        now = time.monotonic_ns()
                    if not yielded <= now < yielded + COOPERATE_NS:
                        await yield_to_loop()
                        yielded = clock_ns() if wall else time.monotonic_ns()
            finally:
                await self._end_live(iterator, self._holding)

    async def _source_batches(self, reader: Callable[[Any], Any],
                              continue_after_replay: bool) -> AsyncIterator[Batch[T]]:
        """``run.source_batches()``: ``_source`` a batch at a time (see ``Run.source_batches``)."""
        with _ending_on_stop(self._life):
            generation, skip = self._take_over()
            life = self._life
            if life.stopping:  # called after run.stop(): see _source
                await yield_to_loop()
                return
            seen = 0
            clock = time.perf_counter_ns
            yielded = clock()
            async for values, offsets, times in self._replay_chunks(skip):
                if life.stopping:
                    return
                first, seen = seen, seen + len(values)
                if seen <= skip:
                    continue
                if first < skip:  # an earlier call stopped inside this chunk
                    values = values[skip - first:]
                    offsets = None if offsets is None else offsets[skip - first:]
                self._replayed_by_sources = seen
                newest = None if offsets is None else next(
                    (off for off in reversed(offsets) if off is not None), None)
                yield Batch(values, newest, times[-1], True)
                now = clock()
                if not yielded <= now < yielded + COOPERATE_NS:
                    await yield_to_loop()
                    yielded = clock()
            if not continue_after_replay or life.stopping:
                return
            iterator = await self._live(reader)
            scheduler = self._recording_scheduler()
            barrier = scheduler.barrier if scheduler is not None else None
            held = Held(self._buffer, self.name)
            task_now = current_task_getter()
            where = self._where
            if self._buffer is not None and scheduler is not None:
                self._buffer.source_hold = held  # what the consumer records goes after its batch
            try:
                async for item in iterator:
                    if generation != self._source_gen:
                        raise self._superseded()
                    values, offset = _value_and_offset(item)
                    if not isinstance(values, list):
                        if isinstance(values, str | bytes | dict) or not isinstance(values, Iterable):
                            raise TypeError(f"the reader of {where} yields batches: a list of "
                                            f"values or a (values, offset) tuple; got="
                                            f"{type(values).__name__}")
                        values = list(values)
                    if barrier is not None and barrier._cut_barrier is not None:
                        await barrier.wait_cut()  # a waiting cut goes first
                    off = b"" if offset is None else dumps_value(offset, f"the offset of {where}")
                    stored = values if self._codec is None else self._fragments(values)
                    # The last value carries the offset, in a record of its own; the others go
                    # in batch records without offsets (a list of nulls would cost 5 bytes each).
                    records = await self._encode_records(stored[:-1], None, scheduler)
                    if values:
                        records.append((dumps_value(stored[-1], f"{where} (batch index "
                                                                f"{len(values) - 1})"), off, 1))
                    time_ms = self._clock_ns() // 1_000_000
                    if scheduler is None or barrier is None:
                        self._life.check("source_batches()")
                        yield Batch(values, offset, time_ms, False)
                        if life.stopping:  # run.stop(): end after the batch in hand
                            return
                        await self._cooperate()
                        continue
                    scheduler.check_writable()
                    # Held, as a live event is (see _source), with its records.
                    barrier.hold(held, task_now(), b"", off, time_ms)
                    held.records = records
                    self._holding = held
                    try:
                        yield Batch(values, offset, time_ms, False)
                    except BaseException:
                        barrier.close_held(held)  # _holding stays: a later call settles it
                        raise
                    self._holding = None
                    if barrier.release(held, finished=True):
                        await scheduler.wait_capacity()
                    elif not life.stopping:
                        await self._cooperate()
                    if life.stopping:  # run.stop(): end after the batch in hand, now buffered
                        return
            finally:
                await self._end_live(iterator, held)

    async def _end_live(self, iterator: Any, hold: Held | None) -> None:
        """A live source ends: what its consumer records no longer waits to go after its
        event (``LogBuffer.source_hold``), and the reader's iterator is closed."""
        if self._buffer is not None and self._buffer.source_hold is hold:
            self._buffer.source_hold = None
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()

    async def _replay_chunks(self, skip: int = 0) -> AsyncIterator[
            tuple[list[Any], list[Any] | None, list[int]]]:
        """The committed events as (values, offsets, times) chunks: a batch record, or up
        to ``BATCH_ENTRIES`` single ones; one event at a time, each on its recorded time,
        under ``REALTIME_REPLAY``. What replay, ``source()`` and batch sources read.

        ``skip``: the first events the caller leaves out, which an earlier ``source()`` call
        of this run handed on already; the metrics do not count them again.
        """
        self._life.check("replay()")
        if not self._policy.replay:
            return
        segments = [s.ref for s in self._store.segments_at(fmt.KIND_EVENTS, self.name,
                                                               self._opened_seq)]
        chunks: AsyncIterator[tuple[list[Any], list[Any] | None, list[int]]] = (
            self._realtime(segments) if self._policy.realtime else self._stored(segments))
        if self._metrics.enabled:  # counted a chunk at a time, never per event
            total = sum(s.records for s in segments)
            if total > skip:
                chunks = self._metrics.replaying(self.name, total, chunks, skip)
        codec, seen = self._codec, 0
        async for chunk in chunks:
            if codec is not None:  # a typed stream's values, decoded a chunk at a time
                chunk = codec.decode_values(chunk[0], chunk[1], seen, self._where), *chunk[1:]
                seen += len(chunk[0])
            yield chunk

    async def _stored(self, segments: list[fmt.SegmentRef]) -> AsyncIterator[
            tuple[list[Any], list[Any] | None, list[int]]]:
        """``segments``' events in chunks (``_replay_chunks`` but for ``REALTIME_REPLAY``)."""
        async for view in self._read_ahead(segments):
            for chunk in view.event_chunks(BATCH_ENTRIES):
                if self._life.ended:  # an iterator carried past the block
                    self._life.check("replay()")
                yield chunk

    def _superseded(self) -> RuntimeError:
        return RuntimeError(f"a newer run.source() call took over {self._where}: "
                            "iterate only the newest one")

    async def _cooperate(self) -> None:
        """Yield to the event loop if this stream's calls have held it ``COOPERATE_NS``.

        Measured on the clock record() reads anyway (the wall clock), or on the monotonic
        clock when the run's clock is injected (a test's clock may stand still). A clock
        set back counts as due, never as an endless wait.
        """
        clock = time.time_ns if self._wall else time.monotonic_ns
        now = clock()
        if not self._yielded_ns <= now < self._yielded_ns + COOPERATE_NS:
            await yield_to_loop()
            self._yielded_ns = clock()


# While these run, a live source holds an item its reader gave and no consumer has seen
# (or, for _end_live, its reader cleans up: closing a connection, acknowledging what it
# handed over): run.stop() does not wake it there, nor cut that cleanup short.
mark_holds_an_item(Stream._encode_records)
mark_holds_an_item(Stream._end_live)
