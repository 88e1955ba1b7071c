"""Read-only views of a store for the command line: summary, full verification, garbage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from . import _format as fmt
from ._drivers import Driver
from ._errors import PersistenceError
from ._store import Store

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

    def to_json(self) -> dict[str, Any]:
        return {"last_seq": self.last_seq, "live_commits": self.commits,
                "writer_epoch": self.epoch, "stored_bytes": self.stored_bytes,
                "streams": self.streams, "tables": self.tables, "cache": self.cache}


def _log_summary(store: Store, kind: str, name: str) -> dict[str, Any]:
    segs = store.segments(kind, name)
    return {"segments": len(segs), "records": sum(s.ref.records for s in segs),
            "bytes": sum(s.ref.size for s in segs)}


async def summarize(driver: Driver) -> StoreReport:
    """Load the store (checking commit records and segment sizes) and summarize it."""
    store = Store(driver, clock_ms=lambda: 0)
    await store.load()
    epochs = [info async for info in driver.list(fmt.epochs_prefix("0"))]
    report = StoreReport(store.last_seq, store.live_commits,
                         max((fmt.number_in_key(e.key, fmt.epochs_prefix("0")) or 0
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
    report.cache = _log_summary(store, fmt.KIND_CACHE, "udf")
    report.stored_bytes = sum([info.size async for info in driver.list("")])
    return report


async def verify(driver: Driver) -> list[str]:
    """Read and check every live object; return one line per damaged object (empty: all good)."""
    problems: list[str] = []
    store = Store(driver, clock_ms=lambda: 0)
    try:
        await store.load()
    except PersistenceError as exc:
        return [str(exc)]
    # Every epoch record, not only those live commits name (load() checked those): each
    # must decode and name the epoch of its own key.
    prefix = fmt.epochs_prefix("0")
    for info in [i async for i in driver.list(prefix)]:
        number = fmt.number_in_key(info.key, prefix)
        if number is None:
            continue
        try:
            await store.read_epoch(number)
        except PersistenceError as exc:
            problems.append(str(exc))
    for kind in sorted(fmt.KINDS):
        for name in store.log_names(kind):
            for seg in store.segments(kind, name):
                try:
                    view = await store.read_segment(seg.ref)
                    # Walking the records checks their framing and counts; an event
                    # batch's JSON is parsed too, to check that it holds its count.
                    walk = view.event_chunks(4096) if kind == fmt.KIND_EVENTS else view.records()
                    for _ in walk:
                        pass
                except PersistenceError as exc:
                    problems.append(str(exc))
    return problems


async def find_garbage(driver: Driver, *, grace_ms: int, now_ms: int) -> list[str]:
    """Segments that no live commit names, that no writer can still commit, past a grace period.

    A segment of an epoch older than the newest commit's epoch belongs to a writer that is
    fenced (its next commit can only fail), so if no live commit names it, none ever will.
    Segments of the current epoch are left alone: they may be uploads of a commit in flight.
    The grace period protects readers that opened the store before it changed: a segment
    counts only once the takeover that fenced its writer (and the newest reset, if any) is
    ``grace_ms`` old.
    """
    store = Store(driver, clock_ms=lambda: now_ms)
    await store.load()
    named = {seg.ref.key for kind in fmt.KINDS for name in store.log_names(kind)
             for seg in store.segments(kind, name)}
    reset = store.reset_time_ms
    if reset is not None and reset > now_ms - grace_ms:
        return []  # a reader may still be reading the history the reset superseded
    epoch_prefix = fmt.epochs_prefix("0")
    started: dict[int, int] = {}
    async for info in driver.list(epoch_prefix):
        number = fmt.number_in_key(info.key, epoch_prefix)
        if number is not None:
            # Checked against its key: another epoch's bytes here would date the takeover
            # wrongly and could let a segment be deleted inside its grace period.
            started[number] = (await store.read_epoch(number)).time_ms
    current = store.last_epoch_of_log
    garbage = []
    prefix = fmt.segments_prefix("0")
    async for info in driver.list(prefix):
        epoch_text = info.key[len(prefix):].partition("-")[0]
        if info.key in named or not epoch_text.isdigit():
            continue
        epoch = int(epoch_text)
        takeovers = [t for e, t in started.items() if epoch < e <= current]
        if epoch < current and takeovers and min(takeovers) <= now_ms - grace_ms:
            garbage.append(info.key)
    return garbage
