"""Read-only views of a store for the command line: summary, full verification, garbage."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import _format as fmt
from ._cache import cache_entries
from ._concurrency import gather_bounded
from ._drivers import Driver, ObjectNotFoundError
from ._errors import CorruptDataError
from ._gc import plan_gc, read_marker
from ._recover import lost_commit_log
from ._store import Store
from ._table import TABLE_RECORD

__all__ = ["StoreReport", "find_garbage", "summarize", "verify"]


@dataclass(slots=True)
class StoreReport:
    """What ``apersist inspect`` prints."""

    last_seq: int
    commits: int
    epoch: int
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    stored_bytes: int = 0
    #: The writer that holds the store (the newest commit's epoch), as its epoch record
    #: names it; None for a store with no commit.
    writer: fmt.WriterInfo | None = None

    def to_json(self) -> dict[str, Any]:
        return {"last_seq": self.last_seq, "live_commits": self.commits,
                "writer_epoch": self.epoch, "stored_bytes": self.stored_bytes,
                "writer": None if self.writer is None else self.writer.to_json(),
                "streams": self.streams, "tables": self.tables, "cache": self.cache}

    def writer_line(self) -> str:
        """The ``writer:`` line of ``apersist inspect``'s text output."""
        if self.writer is None:
            return "writer: none (no commit yet)"
        return f"writer: epoch {self.writer.epoch}, {self.writer.facts()}"


def _log_summary(store: Store, kind: str, name: str) -> dict[str, Any]:
    segs = store.segments(kind, name)
    return {"segments": len(segs), "records": sum(s.ref.records for s in segs),
            "bytes": sum(s.ref.size for s in segs)}


async def summarize(driver: Driver) -> StoreReport:
    """Load the store (checking commit records and segment sizes) and summarize it."""
    store = Store(driver, clock_ms=lambda: 0)
    await store.load()
    epochs = [info async for info in driver.list(fmt.epochs_prefix(fmt.WRITER))]
    report = StoreReport(store.last_seq, store.live_commits,
                         max((fmt.number_in_key(e.key, fmt.epochs_prefix(fmt.WRITER)) or 0
                              for e in epochs), default=0))
    names = set(store.log_names(fmt.KIND_EVENTS)) | set(store.offsets)
    for name in sorted(names):
        info = _log_summary(store, fmt.KIND_EVENTS, name)
        raw = store.offsets.get(name)
        info["offset"] = None if raw is None else orjson.loads(raw)
        report.streams[name] = info
    for name in sorted(set(store.log_names(fmt.KIND_TABLE))
                       | set(store.log_names(fmt.KIND_TABLE_SNAPSHOT))):
        deltas = _log_summary(store, fmt.KIND_TABLE, name)
        snaps = _log_summary(store, fmt.KIND_TABLE_SNAPSHOT, name)
        report.tables[name] = {"delta_records": deltas["records"],
                               "snapshot_records": snaps["records"],
                               "bytes": deltas["bytes"] + snaps["bytes"]}
    report.cache = _log_summary(store, fmt.KIND_CACHE, fmt.CACHE_LOG)
    report.stored_bytes = sum([info.size async for info in driver.list("")])
    report.writer = await store.holder()
    return report


async def verify(driver: Driver) -> list[str]:
    """Read and check every live object; return one line per damaged object (empty: all good).

    Only damage (``CorruptDataError``) is returned: a backend that fails (``BackendError``)
    or a store of a newer format (``IncompatibleFormatError``) raises, for the store may
    well be whole.
    """
    problems: list[str] = []
    store = Store(driver, clock_ms=lambda: 0)
    try:
        await store.load()
    except CorruptDataError as exc:
        return [str(exc)]
    lost = await lost_commit_log(driver, store.last_seq)
    if lost is not None:
        problems.append(lost.message)
    # Every epoch record, not only those live commits name (load() checked those): each
    # must decode and name the epoch of its own key.
    prefix = fmt.epochs_prefix(fmt.WRITER)
    for info in [i async for i in driver.list(prefix)]:
        number = fmt.number_in_key(info.key, prefix)
        if number is None:
            continue
        try:
            await store.read_epoch(number)
        except CorruptDataError as exc:
            problems.append(str(exc))
    # Every commit record and checkpoint, those a checkpoint folds included (opening reads
    # only the newest checkpoint and the commits after it).
    for prefix, decode in ((fmt.commits_prefix(fmt.WRITER), fmt.CommitRecord.decode),
                           (fmt.checkpoints_prefix(fmt.WRITER), fmt.Checkpoint.decode)):
        checks = [functools.partial(_check_numbered, driver, info.key, number, decode)
                  async for info in driver.list(prefix)
                  if (number := fmt.number_in_key(info.key, prefix)) is not None]
        # A few at once, as opening reads commit records: one round trip each otherwise.
        problems += [p for p in await gather_bounded(checks, store.read_concurrency) if p]
    # The gc marker, if gc ever wrote one (a damaged one only postpones gc, but is damage).
    try:
        await read_marker(driver, fmt.WRITER)
    except CorruptDataError as exc:
        problems.append(str(exc))
    for kind in sorted(fmt.KINDS):
        for name in store.log_names(kind):
            for seg in store.segments(kind, name):
                try:
                    view = await store.read_segment(seg.ref)
                    # Walking the records checks their framing and counts; an event
                    # batch's JSON is parsed too, to check that it holds its count.
                    # A table's or the cache's records are decoded as opening (or the
                    # call that reads a cached result) decodes them: what fails there is
                    # damage here too.
                    walk = (view.event_chunks(4096) if kind == fmt.KIND_EVENTS
                            else _checked_records(view, kind))
                    for _ in walk:
                        pass
                except CorruptDataError as exc:
                    problems.append(str(exc))
    return problems


async def _check_numbered(driver: Driver, key: str, number: int,
                          decode: Callable[[str, bytes], fmt.CommitRecord | fmt.Checkpoint]
                          ) -> str | None:
    """Why the commit record or checkpoint at ``key`` is damaged, or None if it is good."""
    try:
        record = decode(key, await driver.get(key))
    except ObjectNotFoundError:
        return None  # collected since it was listed
    except CorruptDataError as exc:
        return str(exc)
    if record.seq != number or record.writer != fmt.WRITER:
        return (f"record names another position: key={key} offset=0 seq={record.seq} "
                f"writer={record.writer}")
    return None


async def find_garbage(driver: Driver, *, grace_ms: int, now_ms: int) -> list[str]:
    """The keys a gc run at ``now_ms`` (gc's clock) would delete, in order; writes nothing.

    Garbage is dated by the gc marker, never by writers' clocks (see ``_gc``): with no
    marker only ``grace_ms`` 0 finds anything due. ``apersist gc`` is ``collect_garbage``.
    """
    return list((await plan_gc(driver, grace_ms=grace_ms, now_ms=now_ms)).due)


def _checked_records(view: fmt.SegmentView, kind: str) -> Iterator[None]:
    """Walk the records of a table's or the cache's segment, raising ``CorruptDataError``
    for one that opening the store (``load_table_state``, ``UdfCache.from_store``) or a
    ``@cached`` call reading its result would refuse."""
    if kind == fmt.KIND_CACHE:
        for index, (_key, result, _record) in enumerate(cache_entries(view)):
            try:
                orjson.loads(result)
            except orjson.JSONDecodeError:
                raise view.damaged_record(index, "cache record's result does not decode") from None
            yield
        return
    sizes = (1, 2) if kind == fmt.KIND_TABLE else (2,)  # a delta may delete: [key]
    for index, (value, _offset, _time_ms) in enumerate(view.records()):
        try:
            item = orjson.loads(value)
        except orjson.JSONDecodeError:
            item = None
        # load_table_state's test (inlined there, on the open's path of every record)
        if type(item) is not list or len(item) not in sizes or type(item[0]) is not str:
            raise view.damaged_record(index, TABLE_RECORD)
        yield
