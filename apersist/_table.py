"""Persistent tables: a ``MutableMapping[str, JSON]`` whose changes are recorded as deltas."""

from __future__ import annotations

import functools
from collections.abc import Iterator, MutableMapping
from typing import Any

import orjson

from . import _format as fmt
from ._buffer import LogBuffer
from ._lifecycle import Lifecycle
from ._pacing import Pacer
from ._scheduler import Scheduler, SnapshotBuilder
from ._store import Store
from ._values import dumps_value

__all__ = ["Table", "TableState", "load_table_state"]

# Fold deltas into a snapshot on its own once they outnumber the state this much.
_AUTO_COMPACT_MIN_DELTAS = 4096
_AUTO_COMPACT_RATIO = 2


class TableState(dict[str, Any]):
    """A table's state as ``load_table_state`` rebuilt it: ``key -> value``.

    ``records`` holds, for a store this run writes to, the JSON record (``[key, value]``)
    each key was read from, for ``Table`` to write into its snapshots (see
    ``Table.__init__``); None otherwise. Each is a slice of a segment, a bytes object no
    bigger than its text: re-encoding the values would cost as much as decoding them did,
    on the event loop, and leave each ``orjson.dumps`` result in a block of 4 KiB or more.
    """

    __slots__ = ("records",)

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, bytes] | None = None


async def load_table_state(store: Store, name: str, upto_seq: int, *,
                           keep_records: bool | None = None) -> tuple[TableState, int]:
    """Rebuild a table: its newest snapshot plus the deltas committed after it.

    Returns the state and the number of deltas replayed on top of the snapshot, so the
    time to open is bounded by the state size once compaction has run. Yields to the event
    loop every few milliseconds (``Pacer``), so a big table does not stall it. The state
    keeps its records (``TableState.records``) if ``keep_records``, by default when this
    store has the writer role (a read-only run never compacts).
    """
    if keep_records is None:
        keep_records = store.epoch is not None
    snapshots = store.segments_at(fmt.KIND_TABLE_SNAPSHOT, name, upto_seq)
    state = TableState()
    records: dict[str, bytes] = {}
    if keep_records:
        state.records = records
    loads = orjson.loads
    pacer = Pacer()
    since = 0
    if snapshots:
        # A snapshot may span several segments of one commit.
        last_seq = snapshots[-1].seq
        async for view in store.read_segments([s.ref for s in snapshots if s.seq == last_seq]):
            for value, _off, _t in view.records():
                key, item = loads(value)
                state[key] = item
                # Between the two inserts: a dict that grows copies itself (about 20 to
                # 40 ms past 700k keys), and both grow at the same key. A step then holds
                # one of those copies, never both.
                if pacer.due():
                    await pacer.pause()
                if keep_records:
                    records[key] = value
        since = last_seq
    deltas = [s.ref for s in store.segments_at(fmt.KIND_TABLE, name, upto_seq) if since < s.seq]
    async for view in store.read_segments(deltas):
        for value, _off, _t in view.records():
            delta = loads(value)
            if len(delta) == 2:
                state[delta[0]] = delta[1]
                if pacer.due():  # between the two inserts, as above
                    await pacer.pause()
                if keep_records:
                    records[delta[0]] = value
            else:
                state.pop(delta[0], None)
                records.pop(delta[0], None)
                if pacer.due():
                    await pacer.pause()
    return state, sum(ref.records for ref in deltas)


class Table(MutableMapping[str, Any]):
    """A persistent ``str -> JSON`` mapping. Get one with ``await run.table(name)``.

    Setting a key records an upsert delta and deleting one records a delete delta; both are
    committed with the run's next commit. Values are serialized when set (``TypeError``
    naming the table if they cannot be). Mutating a value in place records nothing, and
    compaction does not pick it up either: assign it again.
    """

    def __init__(self, name: str, state: dict[str, Any], *, scheduler: Scheduler | None,
                 deltas_since_snapshot: int = 0, life: Lifecycle | None = None) -> None:
        self.name = name
        self._life = life or Lifecycle()
        self._state = state
        self._scheduler = scheduler
        self._where = f"table {name!r}"
        self._buffer: LogBuffer | None = None
        self._deltas = deltas_since_snapshot
        self._compact_requested = False
        self._segment_bytes = scheduler.max_segment_bytes if scheduler is not None else 0
        # The record each key was last set with (``[key, value]`` as JSON). A snapshot writes
        # these bytes, not the live objects: a value mutated in place after it was set (say,
        # into something orjson refuses) can then neither fail the commit that compacts
        # (losing the other logs' batches it has already cut) nor persist a state that no
        # delta recorded. A state loaded from the store comes with the records it was read
        # from (TableState.records); one handed in otherwise is encoded here (it came from
        # JSON, so that cannot fail).
        self._records: dict[str, bytes] = {}
        if scheduler is not None:
            if (isinstance(state, TableState) and state.records is not None
                    and len(state.records) == len(state)):
                self._records, state.records = state.records, None
            else:
                self._records = {key: b"%b" % orjson.dumps([key, value])
                                 for key, value in state.items()}
            self._buffer = scheduler.buffer(fmt.KIND_TABLE, name)
            scheduler.register_snapshot(name, self._snapshot)

    def __repr__(self) -> str:
        return f"<apersist.Table name={self.name!r} len={len(self._state)}>"

    def __getitem__(self, key: str) -> Any:
        return self._state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def __contains__(self, key: object) -> bool:
        return key in self._state

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"{self._where} keys must be str: got={type(key).__name__}")
        # Checked in every mode, so a value is refused the same way whether or not this
        # run persists tables.
        data = dumps_value([key, value], self._where)
        if self._buffer is not None:
            self._append(data)  # raises once the run has ended
            # A copy: orjson returns its output in the buffer it wrote it to, a block of
            # 4 KiB or more (8 KiB for 600 bytes), which the bytes object keeps for life.
            # Kept per key, that was a table's memory (~4.3 GB for 1M small keys); the
            # copy is right-sized, and the block, freed at once, serves the next dumps.
            # b"%b" % data is the cheapest copy (about 50 ns for a small record); bytes()
            # and data[:] return data itself.
            self._records[key] = b"%b" % data
        else:
            self._life.check("table writes")  # nothing is recorded here; say so all the same
        self._state[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self._state:
            raise KeyError(key)
        if self._buffer is not None:
            self._append(orjson.dumps([key]))
            self._records.pop(key, None)
        else:
            self._life.check("table writes")
        del self._state[key]

    def _append(self, data: bytes) -> None:
        buf = self._buffer
        assert buf is not None
        assert self._scheduler is not None
        self._scheduler.append_framed(buf, data)  # refused once the run ended: nothing buffered
        self._deltas += 1

    def request_compaction(self) -> None:
        """Fold this table's deltas into a snapshot in the next commit."""
        self._compact_requested = True

    def _snapshot(self) -> SnapshotBuilder | None:
        """Called by the scheduler while cutting a commit; no await between cut and this.

        Takes the records as they are at the cut (one C-level copy of the references) and
        returns the builder that frames them, which the scheduler awaits after the cut.
        """
        wants = self._compact_requested or (
            self._deltas >= _AUTO_COMPACT_MIN_DELTAS
            and self._deltas > _AUTO_COMPACT_RATIO * len(self._state))
        if not wants or (self._deltas == 0 and not self._compact_requested):
            return None
        self._compact_requested = False
        self._deltas = 0
        return functools.partial(self._frame_snapshot, list(self._records.values()))

    async def _frame_snapshot(self, records: list[bytes]) -> list[tuple[bytearray, int]]:
        """Frame ``records`` as snapshot segment bodies, in steps that yield to the loop
        (framing a million records took about half a second in one go)."""
        # Cut into segments of the usual size, so a big table is no bigger a segment.
        bodies: list[tuple[bytearray, int]] = []
        body, count = bytearray(), 0
        pacer = Pacer()
        for record in records:
            fmt.append_record(body, record, b"", 0)
            count += 1
            if len(body) >= self._segment_bytes:
                bodies.append((body, count))
                body, count = bytearray(), 0
            if pacer.due():
                await pacer.pause()
        if count or not bodies:
            bodies.append((body, count))  # an empty table is an empty snapshot segment
        return bodies
