"""``@cached``: persistent memoization of sync and async functions, with single-flight."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar, overload

import anyio
import orjson

from . import _format as fmt
from ._errors import CorruptDataError, PersistenceError
from ._pacing import Pacer
from ._scheduler import Scheduler
from ._store import Store
from ._values import check_name, dumps_sorted, dumps_value

__all__ = ["UdfCache", "cached", "current_cache"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: The cache of the run whose block the current task is in (None outside any run).
current_cache: ContextVar[UdfCache | None] = ContextVar("apersist_cache", default=None)


class _Flight:
    """One in-progress computation that concurrent equal calls wait for."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: bytes | None = None
        self.error: BaseException | None = None


class UdfCache:
    """A run's cache entries: entry key -> stored result (JSON bytes)."""

    def __init__(self, entries: dict[str, bytes], scheduler: Scheduler | None) -> None:
        # Sync cached functions may run in worker threads (anyio.to_thread and the like);
        # their new entries are handed to the loop's thread, which owns the buffers.
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._entries = entries
        self._scheduler = scheduler
        self._buffer = scheduler.buffer(fmt.KIND_CACHE, fmt.CACHE_LOG) if scheduler is not None else None
        self.flights: dict[str, _Flight] = {}
        # (name, version) of every cached function called in this run: compaction keeps
        # these versions' entries (and, of functions not called, the highest version's).
        self.versions: set[tuple[str, int]] = set()
        self.hits = 0
        self.misses = 0

    @classmethod
    async def from_store(cls, store: Store, *, load: bool, upto_seq: int,
                         scheduler: Scheduler | None) -> UdfCache:
        """The cache as committed up to ``upto_seq`` (empty unless ``load``).

        Yields to the event loop every few milliseconds (``Pacer``), so a big cache does
        not stall it. Each result is kept as a slice of its record, not decoded and
        encoded again: that cost as much again on the loop, and each ``orjson.dumps``
        result holds a block of 4 KiB or more.
        """
        entries: dict[str, bytes] = {}
        if load:
            refs = [s.ref for s in store.segments_at(fmt.KIND_CACHE, fmt.CACHE_LOG, upto_seq)]
            pacer = Pacer()
            async for view in store.read_segments(refs):
                for key, result, _record in cache_entries(view):
                    entries[key] = result
                    if pacer.due():
                        await pacer.pause()
        return cls(entries, scheduler)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> bytes | None:
        return self._entries.get(key)

    def close(self) -> None:
        """The run has ended: let go of the entries and the scheduler.

        An idle worker thread keeps the context of its last job, and with it this cache;
        emptied, it no longer keeps the run's entries, buffers and tables alive.
        """
        self._entries = {}
        self._scheduler = None
        self._buffer = None

    def put(self, key: str, result: bytes) -> None:
        """Store a new entry (``result`` is its JSON) and record it, from any thread.

        On the loop's thread, raises what recording raises once the run can no longer
        persist (it has ended, or a commit failed); the entry is kept for this run's hits
        either way. From another thread the entry is handed to the loop and this never
        raises: once the run can no longer persist, or its loop is closed, the entry is
        just not persisted.
        """
        # A copy: orjson returns its output in the buffer it wrote it to, a block of 4 KiB
        # or more, which the bytes object keeps for as long as the cache does.
        result = b"%b" % result
        if threading.get_ident() != self._loop_thread:
            try:
                self._loop.call_soon_threadsafe(self._put_handed_over, key, result)
            except RuntimeError:
                # Raised by a closed loop (its run is long over): nothing can persist this.
                if not self._loop.is_closed():
                    raise
            return
        self._put(key, result)

    def _put_handed_over(self, key: str, result: bytes) -> None:
        """``put`` of an entry computed in another thread; a loop callback that never raises.

        Its caller already has the result, and a callback's exception would only be logged
        by the loop: once the run can no longer persist, the entry is kept, not recorded.
        """
        if self._scheduler is not None:
            try:
                self._scheduler.check_writable()
            except (RuntimeError, PersistenceError):
                self._entries[key] = result
                return
        self._put(key, result)

    def _put(self, key: str, result: bytes) -> None:
        self._entries[key] = result
        buf = self._buffer
        if buf is None or self._scheduler is None:
            return
        data = b"[%s,%s]" % (orjson.dumps(key), result)
        self._scheduler.append_framed(buf, data)  # refused once the run ended: nothing buffered


#: What a cache record must decode as (in the error for one that does not).
_CACHE_RECORD = "cache record does not decode as [key, result]"


def split_entry(record: bytes) -> tuple[str, bytes] | None:
    """(key, result JSON) of a stored entry, the record ``[key, result]`` (see ``put``), or
    None for a record of another shape.

    The result is sliced out of the record, not decoded: its JSON is checked when a call
    reads it (``_decoded``). A key is a function's name, a version and hex digits
    (``_entry_key``), so its JSON has no escapes and ends at the first ``",``; a record
    whose key has a backslash before that (an escape), or any other shape, is decoded and
    its result encoded again.
    """
    end = record.find(b'",', 2)
    if (end > 0 and record.startswith(b'["') and record.endswith(b"]")
            and record.find(b"\\", 2, end) == -1):
        return record[2:end].decode(), record[end + 2:-1]
    try:
        entry = orjson.loads(record)
    except orjson.JSONDecodeError:
        return None
    if type(entry) is not list or len(entry) != 2 or type(entry[0]) is not str:
        return None
    return entry[0], b"%b" % orjson.dumps(entry[1])


def cache_entries(view: fmt.SegmentView) -> Iterator[tuple[str, bytes, bytes]]:
    """(key, result JSON, record) of each entry of a cache segment, as ``split_entry``
    splits it; a record of another shape is ``CorruptDataError`` at its position. What
    opening, compaction and ``apersist verify`` read the cache with."""
    for index, (record, _offset, _time_ms) in enumerate(view.records()):
        entry = split_entry(record)
        if entry is None:
            raise view.damaged_record(index, _CACHE_RECORD)
        yield entry[0], entry[1], record


def _decoded(stored: bytes, where: str, entry: str) -> Any:
    """A stored result, decoded. Its record passed every checksum, so JSON that does not
    decode is a writer's bug or damage under recomputed checksums: corruption, named at
    the call that read it, not orjson's own error."""
    try:
        return orjson.loads(stored)
    except orjson.JSONDecodeError:
        # The entry keeps no position (results are slices, kept small); verify finds it.
        raise CorruptDataError(f"{where} does not decode: entry={entry} (`apersist verify` "
                               "names its segment and offset)") from None


def _entry_key(name: str, version: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    # NaN and infinities are refused: written as null, f(nan) would share f(None)'s entry.
    raw = dumps_sorted([args, kwargs], f"the arguments of a call of {name} "
                                       "(key= on @cached chooses what identifies a call)")
    return _hashed(name, version, raw)


def _hashed(name: str, version: int, raw: bytes) -> str:
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    return f"{name}@{version}:{digest}"


def _key_maker(name: str, version: int,
               key: Callable[..., Any] | None) -> Callable[[tuple[Any, ...], dict[str, Any]], str]:
    """The entry key of a call of cached function ``name``: by its arguments, or by ``key``.

    The default key is ``[args, kwargs]``, so ``key=lambda *a, **kw: [a, kw]`` names the
    same entries as no ``key`` at all.
    """
    if key is None:
        return functools.partial(_entry_key, name, version)
    key_fn = getattr(key, "__qualname__", None) or repr(key)
    facts = f"function={name} key={key_fn}"

    def make(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        try:
            value = key(*args, **kwargs)
        except Exception as exc:
            raise TypeError(f"the key function of a cached function raised: {facts} "
                            f"error={exc!r}") from exc
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()  # never awaited: closed here rather than warned about later
            raise TypeError(f"the key function of a cached function must return the key, "
                            f"not an awaitable: {facts} got={type(value).__name__}")
        return _hashed(name, version, dumps_sorted(
            value, f"the key of a call of {name}: a key function must return a JSON "
                   f"value (key={key_fn})"))

    return make


@overload
def cached(fn: _F, /) -> _F: ...
@overload
def cached(*, name: str | None = None, version: int = 1,
           key: Callable[..., Any] | None = None) -> Callable[[_F], _F]: ...


def cached(fn: Any = None, /, *, name: str | None = None, version: int = 1,
           key: Callable[..., Any] | None = None) -> Any:
    """Persist a function's results by its arguments (or by ``key``), across runs.

    Use as ``@cached`` or ``@cached(name="geocode", version=2, key=...)`` on a sync or an
    async function or method (a sync function stays sync). Inside a run whose mode
    persists the cache, a call whose key was seen before (in this run or an earlier one)
    returns the stored result without calling the function; concurrent calls of an async
    function with the same key call it once. The key is the call's arguments, or what
    ``key(*args, **kwargs)`` returns: a JSON value that identifies the call, for methods
    (``key`` gets ``self``) and arguments that are not JSON. Changing ``version``
    invalidates older entries. Outside a run the function is just called. Arguments (or
    keys) and results must be JSON-serializable: ``TypeError`` otherwise, and also when
    ``key`` raises (its exception chained).
    """
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"version must be an int: got={type(version).__name__}")
    if name is not None:
        check_name(name, "cached function")
    if key is not None and not callable(key):
        raise TypeError(f"key must be a function of the call's arguments: "
                        f"got={type(key).__name__}")
    if inspect.iscoroutinefunction(key):
        raise TypeError(f"key must be a plain function that returns the key, not an async "
                        f"one: key={getattr(key, '__qualname__', key)!s}")

    def decorate(func: _F) -> _F:
        if isinstance(func, staticmethod | classmethod):
            # Written above @staticmethod or @classmethod: the function inside is cached,
            # and wrapped again, so the class still binds it as it would have.
            inner: Any = decorate(func.__func__)
            return type(func)(inner)
        if not callable(func):
            raise TypeError(f"@cached needs a function: got={type(func).__name__}")
        cache_name = name or f"{func.__module__}.{func.__qualname__}"
        where = f"the result of cached function {cache_name}"
        entry_key = _key_maker(cache_name, version, key)

        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                cache = current_cache.get()
                if cache is None:
                    return await func(*args, **kwargs)
                entry = entry_key(args, kwargs)
                cache.versions.add((cache_name, version))
                while True:
                    stored = cache.get(entry)
                    if stored is not None:
                        cache.hits += 1
                        return _decoded(stored, where, entry)
                    flight = cache.flights.get(entry)
                    if flight is None:
                        break
                    await flight.done.wait()  # someone else is computing it
                    if isinstance(flight.error, Exception):
                        raise flight.error
                    # Its caller was cancelled: look again, and compute it here if needed.
                flight = cache.flights[entry] = _Flight()
                cache.misses += 1
                try:
                    result = await func(*args, **kwargs)
                    cache.put(entry, dumps_value(result, where))
                    return result
                except BaseException as exc:
                    flight.error = exc
                    raise
                finally:
                    del cache.flights[entry]
                    flight.done.set()

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            cache = current_cache.get()
            if cache is None:
                return func(*args, **kwargs)
            entry = entry_key(args, kwargs)
            cache.versions.add((cache_name, version))
            stored = cache.get(entry)
            if stored is not None:
                cache.hits += 1
                return _decoded(stored, where, entry)
            cache.misses += 1
            result = func(*args, **kwargs)
            cache.put(entry, dumps_value(result, where))
            return result

        return sync_wrapper  # type: ignore[return-value]

    if fn is not None:
        return decorate(fn)
    return decorate
