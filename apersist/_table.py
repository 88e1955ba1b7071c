"""Persistent tables: a ``MutableMapping[str, JSON]`` whose changes are recorded as deltas."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import orjson

from . import _format as fmt
from ._scheduler import LogBuffer, Scheduler
from ._store import Store
from ._values import dumps_value

__all__ = ["Table", "load_table_state"]

# Fold deltas into a snapshot on its own once they outnumber the state this much.
_AUTO_COMPACT_MIN_DELTAS = 4096
_AUTO_COMPACT_RATIO = 2


async def load_table_state(store: Store, name: str, upto_seq: int) -> tuple[dict[str, Any], int]:
    """Rebuild a table: its newest snapshot plus the deltas committed after it.

    Returns the state and the number of deltas replayed on top of the snapshot, so the
    time to open is bounded by the state size once compaction has run.
    """
    snapshots = [s for s in store.segments(fmt.KIND_TABLE_SNAPSHOT, name) if s.seq <= upto_seq]
    state: dict[str, Any] = {}
    since = 0
    if snapshots:
        # A snapshot may span several segments of one commit.
        last_seq = snapshots[-1].seq
        async for view in store.read_segments([s.ref for s in snapshots if s.seq == last_seq]):
            for value, _off, _t in view.records():
                key, item = orjson.loads(value)
                state[key] = item
        since = last_seq
    deltas = [s.ref for s in store.segments(fmt.KIND_TABLE, name) if since < s.seq <= upto_seq]
    async for view in store.read_segments(deltas):
        for value, _off, _t in view.records():
            delta = orjson.loads(value)
            if len(delta) == 2:
                state[delta[0]] = delta[1]
            else:
                state.pop(delta[0], None)
    return state, sum(ref.records for ref in deltas)


class Table(MutableMapping[str, Any]):
    """A persistent ``str -> JSON`` mapping. Get one with ``await run.table(name)``.

    Setting a key records an upsert delta and deleting one records a delete delta; both are
    committed with the run's next commit. Values are serialized when set (``TypeError``
    naming the table if they cannot be). Mutating a value in place records nothing, and
    compaction does not pick it up either: assign it again.
    """

    def __init__(self, name: str, state: dict[str, Any], *, scheduler: Scheduler | None,
                 deltas_since_snapshot: int = 0) -> None:
        self.name = name
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
        # delta recorded. Loaded values came from JSON, so re-encoding them cannot fail.
        self._records: dict[str, bytes] = {}
        if scheduler is not None:
            self._records = {key: orjson.dumps([key, value]) for key, value in state.items()}
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
            self._append(data)
            self._records[key] = data
        self._state[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self._state:
            raise KeyError(key)
        if self._buffer is not None:
            self._append(orjson.dumps([key]))
            self._records.pop(key, None)
        del self._state[key]

    def _append(self, data: bytes) -> None:
        buf = self._buffer
        assert buf is not None
        assert self._scheduler is not None
        self._scheduler.check_writable()  # refused: nothing buffered
        nbytes = fmt.append_record(buf.body, data, b"", 0)
        buf.count += 1
        self._deltas += 1
        self._scheduler.note_appended(buf, nbytes)

    def request_compaction(self) -> None:
        """Fold this table's deltas into a snapshot in the next commit."""
        self._compact_requested = True

    def _snapshot(self) -> list[tuple[bytearray, int]] | None:
        """Called by the scheduler while cutting a commit; no await between cut and this."""
        wants = self._compact_requested or (
            self._deltas >= _AUTO_COMPACT_MIN_DELTAS
            and self._deltas > _AUTO_COMPACT_RATIO * len(self._state))
        if not wants or (self._deltas == 0 and not self._compact_requested):
            return None
        self._compact_requested = False
        self._deltas = 0
        # Cut into segments of the usual size, so a big table is no bigger a segment.
        bodies: list[tuple[bytearray, int]] = []
        body, count = bytearray(), 0
        for record in self._records.values():
            fmt.append_record(body, record, b"", 0)
            count += 1
            if len(body) >= self._segment_bytes:
                bodies.append((body, count))
                body, count = bytearray(), 0
        if count or not bodies:
            bodies.append((body, count))  # an empty table is an empty snapshot segment
        return bodies
