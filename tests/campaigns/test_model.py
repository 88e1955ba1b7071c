"""A model-based test: record, commit, crash and reopen, checked against an in-memory model.

A hypothesis state machine keeps one real run open across its rules and mirrors every
operation in a plain model: events per stream (value, offset, time) and table contents.
The model knows exactly where the commit boundaries are: the snapshot interval is an hour,
so only ``commit()``, ``compact()`` and leaving the block commit. It keeps two states:
``current`` (everything recorded) and ``acked`` (the last acknowledged commit).

A crash is in-process: every run's driver is a ``FaultyDriver`` around the real one, which
freezes the storage either at once or at a named step of a commit in flight (or of the
epoch/fence writes while a run opens). The crashed run is torn down and a new run opened
on the same store; it must replay, for every stream, exactly the events of the commit the
crash left durable: the acknowledged one, or the one in flight if the crash came after its
commit record landed. No loss, no duplicate, order kept, ``stream.offset`` the last
replayed offset, and each table equal to the model's at that same commit (events and
table updates are atomic together).

Size: ``APERSIST_MODEL_EXAMPLES`` examples per backend (default 15), each up to
``STEPS`` rules. A small run may draw few crashes, so ``test_every_crash_point`` also
crashes a commit once at each step, on each backend, through the same machine.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.from_thread
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import apersist
from apersist import PersistenceError
from apersist._drivers import open_driver
from apersist.testing import FakeClock, FaultyDriver, SimulatedCrash

EXAMPLES = int(os.environ.get("APERSIST_MODEL_EXAMPLES", "15"))
STEPS = 25

STREAMS = ("s0", "s1", "s2")
TABLES = ("t0", "t1")
KEYS = ("a", "b", "c", "d")

# Steps of a commit in flight. Only a crash after the commit record landed makes it durable.
COMMIT_POINTS = ("after_segment_put", "mid_commit", "torn_segment", "before_commit_put",
                 "after_commit_put")
# Steps of opening a run: the epoch record, then an empty fence commit. None is durable data.
OPEN_POINTS = ("before_epoch_put", "after_epoch_put", "before_commit_put", "after_commit_put")

# Small JSON values. Occasionally a long string, so that with 1 KiB segments one stream's
# batch spans several segments and a commit has more steps to crash between.
_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
            | st.integers(300, 700).map(lambda n: "x" * n))
VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=4)


@dataclass
class State:
    """What a run should see: events per stream as (value, offset, time_ms), and tables."""

    events: dict[str, list[tuple[Any, Any, int]]] = field(
        default_factory=lambda: {name: [] for name in STREAMS})
    tables: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {name: {} for name in TABLES})

    def offset(self, stream: str) -> Any:
        """``stream.offset`` at this state: the last offset recorded, None if there is none."""
        return next((off for _, off, _ in reversed(self.events[stream]) if off is not None), None)


def _ignore_crash(point: str) -> None:
    """``on_crash``: crash in-process (the driver freezes) instead of killing pytest."""


class Drivers:
    """Every run the machine opens gets ``run(config, driver=drivers(config))``: a
    ``FaultyDriver`` around the real one. The machine closes each after its run."""

    def __init__(self) -> None:
        self.last: FaultyDriver | None = None
        self.crash_on_open: str | None = None  # armed on the next driver made
        self.commit_crashes: Counter[str] = Counter()  # by point, over every example

    def __call__(self, config: apersist.Config) -> FaultyDriver:
        faulty = FaultyDriver(open_driver(config.backend, config))
        if self.crash_on_open is not None:
            faulty.crash_at(self.crash_on_open, on_crash=_ignore_crash)
            self.crash_on_open = None
        self.last = faulty
        return faulty


class RunMachine(RuleBasedStateMachine):
    """One store, one open run at a time, and the model of what it must hold."""

    def __init__(self, backend: apersist.Backend, drivers: Drivers) -> None:
        super().__init__()
        self.backend = backend
        self.drivers = drivers
        self.clock = FakeClock()
        # An hour: no background commits, so the model knows every commit boundary.
        self.config = apersist.Config(backend, snapshot_interval_ms=3_600_000,
                                      max_segment_bytes=1024)
        self.current = State()
        self.acked = State()
        self.pending_deltas = 0
        # Table keys changed since the last commit: a commit persists one delta per key.
        self.changed_keys: set[tuple[str, str]] = set()
        self.last_seq = 0
        # The run lives in one task of the portal's loop, entered and left by that task.
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self._run_cm: contextlib.AbstractContextManager[apersist.Run] | None = None
        self._driver: FaultyDriver | None = None  # the open run's, closed after it
        self.run: apersist.Run | None = None
        self.open_tables: set[str] = set()
        self.seen_offsets: dict[str, Any] = {}
        self._open()

    # ------------------------------------------------------------------ run lifecycle
    def _open(self, crash_point: str | None = None) -> None:
        """Open a new run; with ``crash_point``, first a run that crashes while opening."""
        self.portal.call(self._check_store)
        if crash_point is not None:
            self.drivers.crash_on_open = crash_point
            driver = self.drivers(self.config)
            doomed = self.portal.wrap_async_context_manager(
                apersist.run(self.config, clock_ms=self.clock, driver=driver))
            try:
                with pytest.raises(SimulatedCrash):
                    doomed.__enter__()
            finally:
                self.portal.call(driver.aclose)
            assert self.drivers.last is not None
            assert self.drivers.last.crashed == crash_point
        self._driver = self.drivers(self.config)
        self._run_cm = self.portal.wrap_async_context_manager(
            apersist.run(self.config, clock_ms=self.clock, driver=self._driver))
        self.run = self._run_cm.__enter__()
        self.open_tables = set()
        self.pending_deltas = 0
        self.changed_keys = set()
        self.last_seq = int(self.run.stats["last_seq"])
        self._call(self._check_streams, self.run)

    def _close(self) -> None:
        """Leave the run's block, which commits what is pending (if the storage lets it)."""
        cm, self._run_cm, self.run = self._run_cm, None, None
        driver, self._driver = self._driver, None
        assert cm is not None
        assert driver is not None
        try:
            cm.__exit__(None, None, None)
        finally:
            self.portal.call(driver.aclose)  # given to the run, so ours to close

    def teardown(self) -> None:
        try:
            if self._run_cm is not None:
                with contextlib.suppress(PersistenceError):
                    self._close()
        finally:
            self._portal_cm.__exit__(None, None, None)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` (awaited if async) in the run's loop, then note the offsets.

        One hop to the loop thread per operation: on a loaded machine each hop costs about
        a millisecond.
        """
        run = self.run
        assert run is not None

        async def call() -> Any:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
            self.seen_offsets = {name: run.stream(name).offset for name in STREAMS}
            return result

        return self.portal.call(call)

    # ------------------------------------------------------------------ checks
    async def _check_streams(self, run: apersist.Run) -> None:
        """Every stream replays exactly the acknowledged events."""
        for name in STREAMS:
            stream = run.stream(name)
            got = [(e.value, e.offset, e.time_ms, e.replayed) async for e in stream.replay()]
            want = [(*event, True) for event in self.acked.events[name]]
            assert got == want, f"stream {name} replays something else than its last commit"

    async def _check_store(self) -> None:
        """A read-only run finds the acknowledged state: streams, offsets and every table.

        The writer run opens tables only when a rule needs them (a table it never opens
        is not compacted), so here is where each table is checked after every reopen.
        """
        config = apersist.Config(self.backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
        async with contextlib.aclosing(self.drivers(config)) as driver, \
                apersist.run(config, clock_ms=self.clock, driver=driver) as reader:
            await self._check_streams(reader)
            for name in STREAMS:
                assert reader.stream(name).offset == self.acked.offset(name), f"stream {name}"
            for name in TABLES:
                got = dict(await reader.table(name))
                assert got == self.acked.tables[name], f"table {name} differs from its last commit"

    async def _table(self, name: str) -> apersist.Table:
        """The run's table; the first time in a run, it must equal the model's."""
        assert self.run is not None
        table = await self.run.table(name)
        if name not in self.open_tables:
            self.open_tables.add(name)
            # Nothing of this table was recorded in this run yet: current == acked here.
            assert dict(table) == self.current.tables[name] == self.acked.tables[name], (
                f"table {name} on open differs from its last commit")
        return table

    @invariant()
    def offsets_are_the_acknowledged_ones(self) -> None:
        # stream.offset follows this run's durable commits, not what is merely recorded.
        assert self.seen_offsets == {name: self.acked.offset(name) for name in STREAMS}

    # ------------------------------------------------------------------ rules
    @rule(stream=st.sampled_from(STREAMS), values=st.lists(VALUES, min_size=1, max_size=4),
          with_offsets=st.booleans())
    def record(self, stream: str, values: list[Any], with_offsets: bool) -> None:
        batch = []
        for i, value in enumerate(values, start=1):
            last = self.current.offset(stream)
            # A source's offsets grow; some records carry none (they keep the offset).
            offset = ((last or 0) + 1) if with_offsets else None
            # Each event its own time (the clock moves before each record), checked on replay.
            self.current.events[stream].append((value, offset, self.clock.now_ms + i))
            batch.append((value, offset))
            self.pending_deltas += 1

        async def record_batch() -> None:
            assert self.run is not None
            for value, offset in batch:
                self.clock.advance(1)
                await self.run.stream(stream).record(value, offset=offset)

        self._call(record_batch)

    @rule(table=st.sampled_from(TABLES), key=st.sampled_from(KEYS), value=VALUES)
    def set_key(self, table: str, key: str, value: Any) -> None:
        async def set_item() -> None:
            (await self._table(table))[key] = value

        self._call(set_item)
        self.current.tables[table][key] = value
        self.changed_keys.add((table, key))

    @rule(table=st.sampled_from(TABLES), key=st.sampled_from(KEYS))
    def delete_key(self, table: str, key: str) -> None:
        async def delete_item() -> bool:
            opened = await self._table(table)
            try:
                del opened[key]
            except KeyError:
                return False
            return True

        deleted = self._call(delete_item)
        # Deleting a missing key raises KeyError and records nothing.
        assert deleted == (key in self.current.tables[table])
        if deleted:
            del self.current.tables[table][key]
            self.changed_keys.add((table, key))

    @rule()
    def commit(self) -> None:
        assert self.run is not None
        info = self._call(self.run.commit)
        pending = self.pending_deltas + len(self.changed_keys)
        assert info.deltas == pending
        # A new number only when there was something to commit.
        assert (info.seq > self.last_seq) if pending else (info.seq == self.last_seq)
        self.last_seq = info.seq
        self._acknowledge()

    @rule()
    def compact(self) -> None:
        assert self.run is not None
        before = self.last_seq
        self._call(self.run.compact)
        self.last_seq = int(self.run.stats["last_seq"])
        # Folding the open tables into snapshots is a commit, of everything pending too.
        # With no table open there is nothing to fold: it need not commit.
        if self.open_tables:
            assert self.last_seq > before
        if self.last_seq > before:
            self._acknowledge()

    def _acknowledge(self) -> None:
        self.acked = copy.deepcopy(self.current)
        self.pending_deltas = 0
        self.changed_keys = set()

    @rule(crash=st.booleans(), open_crash=st.none() | st.sampled_from(OPEN_POINTS))
    def reopen(self, crash: bool, open_crash: str | None) -> None:
        """Leave the run (a final commit) or crash between operations; open a new run.

        With ``open_crash``, the first new run crashes while opening, and another opens.
        """
        if crash:
            self._crash_and_reopen(self.acked, open_crash)
        else:
            self._close()
            self._acknowledge()
            self._open(open_crash)

    # Only with something to commit: otherwise a commit writes nothing to crash in.
    @precondition(lambda self: self.pending_deltas > 0 or self.changed_keys)
    @rule(point=st.sampled_from(COMMIT_POINTS), nth=st.integers(1, 3), by_compact=st.booleans(),
          open_crash=st.none() | st.sampled_from(OPEN_POINTS))
    def crash_in_commit(self, point: str, nth: int, by_compact: bool,
                        open_crash: str | None) -> None:
        """Commit (or compact) with a crash planned at the ``nth`` arrival at ``point``."""
        run, faulty = self.run, self.drivers.last
        assert run is not None
        assert faulty is not None
        # One commit writes one commit record, but maybe several segments.
        faulty.crash_at(point, nth=1 if point.endswith("commit_put") else nth,
                        on_crash=_ignore_crash)
        try:
            if by_compact:
                self.compact()
            else:
                self.commit()
        except SimulatedCrash:
            assert faulty.crashed == point
            self.drivers.commit_crashes[point] += 1
            # The commit record landed: the commit is durable though never acknowledged.
            self._crash_and_reopen(self.current if point == "after_commit_put" else self.acked,
                                   open_crash)
            return
        # The commit never reached the point (too few segments, or a compaction with no
        # table open that committed nothing): what it acknowledged stays, and the crash
        # comes right after it.
        assert faulty.crashed is None
        self._crash_and_reopen(self.acked, open_crash)

    def _crash_and_reopen(self, durable: State, open_crash: str | None) -> None:
        """Crash (if the storage is not frozen yet), tear the run down, open a new one.

        The new run must find ``durable``: what the crash left committed.
        """
        assert self.drivers.last is not None
        self.drivers.last.freeze()
        # Leaving commits what is pending: on frozen storage that fails.
        with contextlib.suppress(SimulatedCrash):
            self._close()
        self.current = copy.deepcopy(durable)
        self.acked = copy.deepcopy(durable)
        self._open(open_crash)


@pytest.fixture
def drivers() -> Drivers:
    return Drivers()


def _backends(kind: str, tmp_path: Path) -> Iterator[apersist.Backend]:
    """A fresh, empty store of ``kind`` for each example."""
    while True:
        if kind == "memory":
            yield apersist.Backend.memory()
        else:
            yield apersist.Backend.filesystem(tmp_path / f"store-{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("kind", ["memory", "filesystem"])
def test_record_commit_crash_reopen(kind: str, tmp_path: Path, drivers: Drivers) -> None:
    stores = _backends(kind, tmp_path)
    run_state_machine_as_test(
        lambda: RunMachine(next(stores), drivers),
        settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]))


# Hypothesis may draw few crashes in a small run: every crash point, once for sure.
@pytest.mark.parametrize("kind", ["memory", "filesystem"])
@pytest.mark.parametrize(("point", "open_crash"),
                         list(zip(COMMIT_POINTS, [*OPEN_POINTS, None], strict=True)))
@pytest.mark.parametrize("by_compact", [False, True])
def test_every_crash_point(kind: str, point: str, open_crash: str | None, by_compact: bool,
                           tmp_path: Path, drivers: Drivers, request: pytest.FixtureRequest) -> None:
    if "segment" in point or point == "mid_commit":
        # A crash among segment uploads: the commit must upload its segments (a small one
        # carries them inline in its record, format 5.0, and has no such step).
        request.getfixturevalue("segment_objects")
    machine = RunMachine(next(_backends(kind, tmp_path)), drivers)
    try:
        machine.set_key("t0", "a", 1)
        machine.commit()
        # Two logs pending: two segments, so the commit has a middle to crash in.
        machine.record("s0", [1, "x" * 700], with_offsets=True)
        machine.set_key("t0", "b", 2)
        machine.crash_in_commit(point, nth=1, by_compact=by_compact, open_crash=open_crash)
        assert drivers.commit_crashes == {point: 1}
        machine.offsets_are_the_acknowledged_ones()
        # The new run goes on where the crash left it.
        machine.record("s0", [3], with_offsets=True)
        machine.delete_key("t0", "a")
        machine.reopen(crash=False, open_crash=None)
        machine.offsets_are_the_acknowledged_ones()
    finally:
        machine.teardown()
