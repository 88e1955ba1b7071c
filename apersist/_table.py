"""Persistent tables: a ``MutableMapping[str, JSON]`` whose changes are recorded as deltas."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any, TypeVar, overload

import anyio.lowlevel
import orjson

from . import _format as fmt
from . import _values
from ._barrier import CONSUMER
from ._codec import Codec, ValueCodec, next_codec
from ._lifecycle import Lifecycle
from ._pacing import Pacer
from ._scheduler import Scheduler, SnapshotBuilder
from ._store import Store
from ._values import checked_json, unserializable

__all__ = ["Table", "TableState", "decode_table_state", "load_table_state"]

_dumps = orjson.dumps
V = TypeVar("V")
D = TypeVar("D")
_consumer = CONSUMER.get
_RECORD_OVERHEAD = fmt.RECORD_OVERHEAD
_U = ord("u")
_QUOTE = ord('"')

# A commit lets go of the records it framed this many at a time, between looks at the
# clock: dropping a million references at once (a dict or a list of them freed) touches
# every key and record, about 15 ms of loop time in one step.
_RELEASE_STEP = 1024

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


#: What a table record must decode as (in the error for one that does not).
TABLE_RECORD = "table record does not decode as [key, value] or [key]"


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
            for index, (value, _off, _t) in enumerate(view.records()):
                try:
                    entry = loads(value)
                except orjson.JSONDecodeError:
                    entry = None
                # [key, value], nothing else (see the deltas below).
                if type(entry) is not list or len(entry) != 2 or type(entry[0]) is not str:
                    raise view.damaged_record(index, TABLE_RECORD)
                key, item = entry
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
        for index, (value, _off, _t) in enumerate(view.records()):
            try:
                delta = loads(value)
            except orjson.JSONDecodeError:
                delta = None
            # [key, value] or [key] (a deletion), nothing else: a record that decoded to
            # another shape was taken as data ("ab" set key "a" to "b", [k, v, x] deleted k)
            # and one that did not decode escaped as orjson's error, not as corruption.
            if type(delta) is not list or not 1 <= len(delta) <= 2 or type(delta[0]) is not str:
                raise view.damaged_record(index, TABLE_RECORD)
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


async def decode_table_state(state: dict[str, Any], codec: ValueCodec, where: str) -> None:
    """A loaded table's values decoded in place into ``codec``'s type, yielding to the
    event loop every few milliseconds; ``ValueError`` naming the key of one that does not
    fit. The state is nobody else's yet: keys are neither added nor removed meanwhile."""
    decode = codec.decode
    if decode is None:
        return
    pacer = Pacer()
    for key, value in state.items():
        state[key] = codec.decode_one(value, f"{where} (key {key!r})")
        if pacer.due():
            await pacer.pause()


def _item_dumps(codec: ValueCodec) -> Callable[[list[Any]], bytes]:
    """A typed table's ``[key, value]`` record: the value's JSON from its type."""
    dumps, fragment = codec.dumps, orjson.Fragment

    def item(pair: list[Any]) -> bytes:
        return _dumps([pair[0], fragment(dumps(pair[1]))])

    return item


class Table(MutableMapping[str, V]):
    """A persistent ``str -> JSON`` mapping. Get one with ``await run.table(name)``.

    Generic in its values' type: ``Table[Total]`` from ``run.table(name, type=Total)``.

    Setting a key records an upsert delta and deleting one records a delete delta; both are
    committed with the run's next commit, which persists each key's last change only (a
    key set many times between two commits is one delta). Values are serialized when set
    (``TypeError`` naming the table if they cannot be). Mutating a value in place records
    nothing, and compaction does not pick it up either: assign it again.
    """

    def __init__(self, name: str, state: dict[str, Any], *, scheduler: Scheduler | None,
                 deltas_since_snapshot: int = 0, life: Lifecycle | None = None,
                 codec: ValueCodec | None = None) -> None:
        self.name = name
        # type= or codec=: what writes a ``[key, value]`` record (orjson.dumps itself for
        # an untyped table). ``state`` holds values of that type already.
        self._codec = codec
        self._dumps: Callable[[list[Any]], bytes] = (
            _dumps if codec is None else _item_dumps(codec))
        self._life = life or Lifecycle()
        self._state = state
        self._scheduler = scheduler
        self._where = f"table {name!r}"
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
        # The keys changed since the last cut, each with its last record (None: deleted),
        # the same bytes objects as in _records; handed over whole at the cut (_take_dirty)
        # and framed after it. None where the table is not persisted. A key is accounted
        # with the scheduler when it enters (Scheduler.add_deltas), never again until the
        # next cut, so a write to a key already here does not call the scheduler at all.
        self._dirty: dict[str, bytes | None] | None = None
        # Whether a key was deleted since the last cut (_fold_into_records then removes
        # the deleted ones from _records).
        self._deletions = False
        if scheduler is not None:
            if (isinstance(state, TableState) and state.records is not None
                    and len(state.records) == len(state)):
                self._records, state.records = state.records, None
            else:
                self._records = {key: b"%b" % self._dumps([key, value])
                                 for key, value in state.items()}
            self._dirty = {}
            scheduler.register_deltas(name, self._take_dirty)
            scheduler.register_snapshot(name, self._snapshot)

    def __repr__(self) -> str:
        return f"<apersist.Table name={self.name!r} len={len(self._state)}>"

    async def _set_codec(self, value_type: Any, codec: Codec[Any] | None) -> None:
        """Give this table its values' type (``run.table(name, type=...)`` once the table is
        open): the first call that names one fixes it for the run, its values decoded now;
        another type later raises ``TypeError`` naming both."""
        resolved = next_codec(self._codec, value_type, codec, self._where)
        if resolved is None:
            return
        # In one step, with no await: the table is in use, and a value set meanwhile would
        # be decoded twice. A table opened untyped first (by run.compact()) is the case.
        # All or nothing: a value that does not fit leaves the table as it was (untyped),
        # not half decoded, so that the call may be made again once the value is fixed.
        # Decoded from fresh JSON (the key's record, else the value written again): a
        # dataclass's decoder converts its dict in place, and the dicts here are the ones
        # the table was given, the caller's own.
        records, loads = self._records, orjson.loads
        dirty = self._dirty or {}  # a key written since the last cut has its record there
        decoded = {name: resolved.decode_one(
            loads(dirty.get(name) or records[name])[1]
            if name in dirty or name in records else loads(_dumps(value)),
            f"{self._where} (key {name!r})") for name, value in self._state.items()}
        self._state.update(decoded)
        self._codec = resolved
        self._dumps = _item_dumps(resolved)
        await anyio.lowlevel.checkpoint()

    def __getitem__(self, key: str) -> V:
        return self._state[key]  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def __contains__(self, key: object) -> bool:
        return key in self._state

    @overload
    def get(self, key: str, /) -> V | None: ...
    @overload
    def get(self, key: str, /, default: V | D) -> V | D: ...

    def get(self, key: str, default: Any = None) -> Any:
        """``table[key]`` if ``key`` is in the table, else ``default``.

        Mapping's own ``get`` calls ``__getitem__`` inside a ``try``: three Python steps
        where the dict's ``get`` is one C call, in the loop body of the job users run.
        """
        return self._state.get(key, default)

    def __setitem__(self, key: str, value: V) -> None:
        # The hot path: one dumps, one copy, two dict writes (docs/performance.md, "Table
        # writes"); every check that is not one of those steps is folded into one test.
        # Checked in every mode, so a value is refused the same way whether or not this
        # run persists tables; before anything changes, so a refused one changes nothing.
        try:
            data = self._dumps([key, value])  # orjson.dumps, or the table's type's
        except TypeError as exc:
            raise self._refused(key, exc) from None
        # Only a str key's record starts with '["' (byte 1 is the key's opening quote:
        # a number, null or a list would be refused here). checked_json's own tests,
        # first of all whether the text has a "null" (orjson's NaN and infinity), are
        # skipped when it has no "u" at all: an int operand makes `in` one memchr,
        # several times cheaper than partition() (numbers-only records).
        if (data[1] != _QUOTE or (_U in data and data.partition(b"null")[1])
                or len(data) > _values.MAX_JSON_BYTES):
            self._check_record(key, value, data)
        dirty = self._dirty
        if dirty is not None:
            if key not in dirty:
                # First change since the cut: raises once the run has ended or failed
                # (then nothing is buffered, see Scheduler._drop_deltas).
                self._scheduler.add_deltas(1, _RECORD_OVERHEAD + len(data))  # type: ignore[union-attr]
            # A copy: orjson returns its output in the buffer it wrote it to, a block of
            # 4 KiB or more (8 KiB for 600 bytes), which the bytes object keeps for life.
            # Kept per key, that was a table's memory (~4.3 GB for 1M small keys); the
            # copy is right-sized, and the block, freed at once, serves the next dumps.
            # b"%b" % data is the cheapest copy (about 50 ns for a small record); bytes()
            # and data[:] return data itself. The cut moves it into _records (_take_dirty).
            dirty[key] = b"%b" % data
            # A live source event held by this task is committed with this change.
            consumer = _consumer()
            if consumer is not None:
                consumer.writes += 1
        else:
            self._life.check("table writes")  # nothing is recorded here; say so all the same
        self._state[key] = value

    def _refused(self, key: object, exc: TypeError) -> TypeError:
        """The error for a write whose record orjson refused: its key's, if that is not a
        str, else its value's."""
        return self._key_error(key) if not isinstance(key, str) else unserializable(self._where, exc)

    def _check_record(self, key: object, value: Any, data: bytes) -> None:
        """A write's record that the hot path's one test did not pass: raise if its key is
        not a str, or if its text is not what the value says (NaN, infinity: an untyped
        value's, a type's dumps refused them) or too long."""
        if not isinstance(key, str):
            raise self._key_error(key)
        checked_json(data, None if self._codec else value, self._where)

    def _key_error(self, key: object) -> TypeError:
        return TypeError(f"{self._where} keys must be str: got={type(key).__name__}")

    def __delitem__(self, key: str) -> None:
        if key not in self._state:
            raise KeyError(key)
        dirty = self._dirty
        if dirty is not None:
            if key not in dirty:
                # About the framed ``[key]`` (escapes aside): accounting is approximate.
                self._scheduler.add_deltas(1, _RECORD_OVERHEAD + len(key) + 4)  # type: ignore[union-attr]
            dirty[key] = None
            self._deletions = True
            consumer = _consumer()  # as in __setitem__
            if consumer is not None:
                consumer.writes += 1
        else:
            self._life.check("table writes")
        del self._state[key]

    def request_compaction(self) -> None:
        """Fold this table's deltas into a snapshot in the next commit."""
        self._compact_requested = True

    def _take_dirty(self) -> SnapshotBuilder | None:
        """Called by the scheduler at a cut (``DeltaSource``): hands over the keys changed
        since the last cut, in O(1), as the builder that frames their deltas after the cut.

        The handed-over dict is never written again, so the builder frames each key's
        record as it was at the cut, whatever the table does meanwhile.
        """
        dirty = self._dirty
        if not dirty:
            return None
        self._dirty = {}
        self._deltas += len(dirty)
        self._fold_into_records(dirty)
        return functools.partial(self._frame_deltas, dirty)

    def _fold_into_records(self, dirty: dict[str, bytes | None]) -> None:
        """Bring ``_records`` up to date with the changes ``dirty`` holds: writes keep their
        record only in ``_dirty`` (one dict write fewer per write), and a cut folds them in
        with one C-level update; deleted keys, if any, leave afterwards."""
        records = self._records
        records.update(dirty)  # type: ignore[arg-type]
        if self._deletions:
            self._deletions = False
            for key, record in dirty.items():
                if record is None:
                    del records[key]

    def _snapshot(self) -> SnapshotBuilder | None:
        """Called by the scheduler while cutting a commit; no await between cut and this.

        Takes the records as they are at the cut (one C-level copy of the references) and
        returns the builder that frames them, which the scheduler awaits after the cut.
        The scheduler then drops this cut's deltas of the table: the snapshot holds them.
        """
        wants = self._compact_requested or (
            self._deltas >= _AUTO_COMPACT_MIN_DELTAS
            and self._deltas > _AUTO_COMPACT_RATIO * len(self._state))
        if not wants or (self._deltas == 0 and not self._compact_requested):
            return None
        self._compact_requested = False
        self._deltas = 0
        return functools.partial(self._frame_snapshot, list(self._records.values()))

    async def _frame_deltas(self, dirty: dict[str, bytes | None]) -> list[tuple[bytearray, int]]:
        """Frame the deltas handed over at a cut, then let go of them a step at a time
        (``_RELEASE_STEP``)."""
        bodies = await self._frame(_delta_records(dirty))
        pacer = Pacer()
        popitem = dirty.popitem
        while dirty:
            for _ in range(min(len(dirty), _RELEASE_STEP)):
                popitem()
            if pacer.due():
                await pacer.pause()
        return bodies

    async def _frame_snapshot(self, records: list[bytes]) -> list[tuple[bytearray, int]]:
        """Frame the records copied at a cut, then let go of them a step at a time."""
        bodies = await self._frame(records)
        pacer = Pacer()
        while records:
            del records[-_RELEASE_STEP:]
            if pacer.due():
                await pacer.pause()
        return bodies

    async def _frame(self, records: Iterable[bytes]) -> list[tuple[bytearray, int]]:
        """Frame ``records`` as segment bodies, in steps that yield to the loop (framing a
        million records took about half a second in one go)."""
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


def _delta_records(dirty: dict[str, bytes | None]) -> Iterator[bytes]:
    """Each changed key's delta: its last record, or ``[key]`` if it was deleted last.

    One per key, so their order does not matter; replay applies a commit's deltas after
    the earlier commits' ones.
    """
    dumps = orjson.dumps
    for key, record in dirty.items():
        yield dumps([key]) if record is None else record
