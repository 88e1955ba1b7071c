"""``apersist dump``: a stream's events or a table's rows, as far as they can be read.

Reads through ``_recover``, so a damaged store still gives everything before its damage:
the events of a stream up to its first damaged record, a table's rows from its snapshot
and deltas up to theirs. The damage is returned, never skipped: the command then exits 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import _format as fmt
from ._errors import CorruptDataError
from ._progress import progress_bar
from ._recover import Damage, OpenedStore, read_log
from ._store import Store

__all__ = ["DumpResult", "UnknownNameError", "dump_stream", "dump_table", "resolve", "table_records",
           "table_rows"]


# Names listed by the error of an unknown name, at most.
_LISTED = 20


class UnknownNameError(ValueError):
    """``dump`` was given a name that is neither a stream nor a table of the store."""


@dataclass(slots=True)
class DumpResult:
    """What a dump printed: how many lines, and the damage that ended it (empty: none)."""

    name: str
    kind: str  # "stream" or "table"
    count: int = 0
    damage: list[Damage] = field(default_factory=list)
    cut: bool = False  # whether damage ended the dump short (else every record read)


def resolve(opened: OpenedStore, name: str, *, table: bool) -> str:
    """The kind of ``name``, ``"stream"`` or ``"table"``: a stream first, unless ``table``.

    Raises ``UnknownNameError`` listing the names that exist, with the close ones (case
    ignored) first.
    """
    streams, tables = opened.stream_names(), opened.table_names()
    if not table and name in streams:
        return "stream"
    if name in tables:
        return "table"
    kinds = (fmt.KIND_TABLE, fmt.KIND_TABLE_SNAPSHOT) + (() if table else (fmt.KIND_EVENTS,))
    lost = sorted({k for k, n in opened.beyond if n == name and k in kinds})
    if lost and opened.damage:
        # Not a typo: the commits that hold it come after the damage that ends the log.
        what = "stream" if lost == [fmt.KIND_EVENTS] else "table" if fmt.KIND_EVENTS not in lost else (
            "stream or table")
        raise CorruptDataError(f"the {what} {name} is only in commits after the last whole one "
                               f"(commit {opened.store.last_seq}), which damage cut off: none of "
                               f"it can be read; damaged: {opened.damage[0].message}")
    kind = "table" if table else "stream or table"
    known = [f"table {t}" for t in tables] if table else (
        [f"stream {s}" for s in streams] + [f"table {t}" for t in tables])
    candidates = {n.lower(): n for n in (tables if table else streams + tables)}
    close = [candidates[c] for c in difflib.get_close_matches(name.lower(), list(candidates), n=3,
                                                              cutoff=0.6)]
    hint = f" did you mean: {', '.join(close)}?" if close else ""
    # A store may hold thousands of names: the first few and a count keep this one line.
    listing = ", ".join(known[:_LISTED]) if known else "none"
    if len(known) > _LISTED:
        listing += f", ... ({len(known)} in all)"
    # A name added by a commit after the damage cannot be seen: say the log is cut short.
    cut = (f" (the commit log reads only up to commit {opened.store.last_seq}; damaged: "
           f"{opened.damage[0].message})" if opened.damage else "")
    raise UnknownNameError(f"no {kind} of that name in the store;{hint} name={name} "
                           f"known: {listing}{cut}")


async def dump_stream(opened: OpenedStore, name: str,
                      emit: Callable[[dict[str, Any]], None]) -> DumpResult:
    """Hand ``emit`` one ``{"value", "offset", "time_ms"}`` per readable event of ``name``,
    in order, up to the first damage."""
    result = DumpResult(name, "stream", damage=list(opened.damage))
    total = sum(seg.ref.records for seg in opened.store.segments(fmt.KIND_EVENTS, name))
    with progress_bar(f"dump {name}", total=total, unit="event") as bar:
        async for part in read_log(opened.store, fmt.KIND_EVENTS, name):
            for frame in part.frames:
                offsets = frame.offsets or [None] * frame.count
                for value, offset in zip(frame.entries, offsets, strict=True):
                    emit({"value": value, "offset": offset, "time_ms": frame.time_ms})
                result.count += frame.count
                bar.update(frame.count)
            if part.damage is not None:
                result.damage.insert(0, part.damage)
                result.cut = not part.whole
    # The store's own damage cuts the dump only if it ended the commit log early (a damaged
    # epoch record, or an older checkpoint read instead of a damaged newer one, lose nothing).
    result.cut = result.cut or opened.lost_commits > 0
    return result


def table_records(store: Store, name: str) -> tuple[int, int]:
    """The records a table's state is read from: its newest snapshot's, and its deltas'
    after that snapshot's commit (those of the snapshot's own commit are in it already, as
    ``load_table_state`` reads a table). Older snapshots and deltas are not read."""
    snapshots = store.segments(fmt.KIND_TABLE_SNAPSHOT, name)
    since = snapshots[-1].seq if snapshots else 0
    return (sum(s.ref.records for s in snapshots if s.seq == since),
            sum(s.ref.records for s in store.segments(fmt.KIND_TABLE, name) if s.seq > since))


async def table_rows(opened: OpenedStore, name: str,
                     on_records: Callable[[int], object] | None = None
                     ) -> tuple[dict[str, bytes], list[Damage], dict[str, int]]:
    """A table's state as far as it reads: each key's record (``[key, value]`` JSON), the
    damage met, and counts (``snapshot_records``/``snapshot_kept``, ``delta_records``/
    ``deltas_kept``).

    The newest snapshot's records up to its first damage, then the deltas after it up to
    theirs. A delta holds its key's whole value, so the deltas read apply on top of a
    snapshot cut short by damage: a key they touch gets its newest value either way.
    """
    rows: dict[str, bytes] = {}
    damage: list[Damage] = []
    store = opened.store
    snapshot_records, delta_records = table_records(store, name)
    counts = {"snapshot_records": snapshot_records, "snapshot_kept": 0,
              "delta_records": delta_records, "deltas_kept": 0}
    snapshots = store.segments(fmt.KIND_TABLE_SNAPSHOT, name)
    since = snapshots[-1].seq if snapshots else 0
    for kind, kept, after in ((fmt.KIND_TABLE_SNAPSHOT, "snapshot_kept", 0),
                              (fmt.KIND_TABLE, "deltas_kept", since)):
        async for part in read_log(store, kind, name, after_seq=after):
            for frame in part.frames:
                item = frame.entries[0]
                if len(item) == 2:
                    rows[item[0]] = frame.value
                else:
                    rows.pop(item[0], None)
                counts[kept] += 1
            if on_records is not None:
                on_records(part.entries)
            if part.damage is not None:
                damage.append(part.damage)
    return rows, damage, counts


async def dump_table(opened: OpenedStore, name: str,
                     emit: Callable[[dict[str, Any]], None]) -> DumpResult:
    """Hand ``emit`` one ``{"key", "value"}`` per row of table ``name``, as far as it reads."""
    result = DumpResult(name, "table", damage=list(opened.damage))
    total = sum(table_records(opened.store, name))
    with progress_bar(f"dump {name}", total=total, unit="record") as bar:
        rows, damage, counts = await table_rows(opened, name, bar.update)
    result.damage[:0] = damage
    # A table whose damaged segments all read (only a trailer hit) lost no row.
    result.cut = opened.lost_commits > 0 or counts["snapshot_kept"] < counts["snapshot_records"] or (
        counts["deltas_kept"] < counts["delta_records"])
    for record in rows.values():
        key, value = orjson.loads(record)
        emit({"key": key, "value": value})
        result.count += 1
    return result
