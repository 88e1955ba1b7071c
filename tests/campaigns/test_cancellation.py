"""The cancellation campaign: cancel the task awaiting each public coroutine at each await
point it passes, then check that the run goes on and the store holds what it must.

The coroutines: ``run.commit()`` (also while the scheduler commits on its own, with
``snapshot_interval_ms=0``), ``stream.record()`` and ``stream.record_many()`` waiting
for back-pressure (a 1 KiB ``max_pending_bytes``), ``await run.table(name)`` (opening a
table with a snapshot and deltas), ``run.compact()``, iterating ``run.source()`` (replay,
then live events under back-pressure) and ``stream.replay()`` (several segments, read
ahead by a task of the run), and an ``@apersist.cached`` async call (with an equal call
waiting on it).

Each trial runs on a fresh store: earlier runs (``seed``) commit what the coroutine needs,
then a run records a little, calls the coroutine in a ``SteppingTask`` and cancels it once
it has suspended k times (``cancel_points.py``), in one of five ways: ``task.cancel()``,
``asyncio.timeout()`` expiring, ``asyncio.wait_for()`` timing out (after a delay, not a
step count), anyio's ``CancelScope.cancel()``, and a ``TaskGroup`` whose sibling task
fails. The run then goes on: it repeats what the coroutine was for (opens the table
again, iterates the source again, ...), records more, commits (after which
``pending_bytes`` and ``pending_deltas`` must be 0) and leaves the block
(``deltas_committed`` must equal what was recorded). A read-only run then checks the
store: every event whose ``record()`` returned is stored exactly once, in order, with its
offset; an event of a cancelled call at most once; ``stream.offset`` is the last stored
offset; tables and cache entries are exact. Every step runs under a timeout
(``STEP_TIMEOUT_S``) and fails naming the step; a ``FencedError`` (there is never another
writer) fails the trial.

k runs over every await point the call passes (a call that suspends S times: k = 0, the
task cancelled before it starts, to S), counted by a trial that is not cancelled. Every
storage call suspends before and after it (``PausingDriver``), so cancellations also land
right before and after each request, on the memory store too.

Size: ``APERSIST_CANCEL_POINTS`` cancellations per coroutine on each backend, taken in
turn from each way, each way's points spread over 0..S; ``0`` means every await point in
every way (``.ci/campaigns``). Unset, the test suite's sizes apply (``CI_POINTS``: every
point on the memory store, a few on the others). ``APERSIST_CANCEL_ONLY=commit,record``
limits the coroutines. Trials that fail do not stop the campaign: each is reported
(backend, coroutine, way, point, where the cancellation landed, what went wrong), then
the test fails. With ``APERSIST_CANCEL_REPORT`` naming a file, one JSON line of figures
per backend is appended to it (``docs/reliability.md`` quotes them).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import cancel_points
import orjson
from cancel_points import PausingDriver, SiblingFailed, SteppingTask, at_step, pausing_run, spread

import apersist
from apersist import FencedError
from apersist._drivers import MemoryDriver
from apersist.testing import check_driver

STEP_TIMEOUT_S = 30.0
WAYS = ("cancel", "timeout", "anyio", "taskgroup", "wait_for", "driver")
PAD = "x" * 400  # with a 1 KiB back-pressure bound, the third such event waits
SMALL_PENDING = 1 << 10  # the smallest bound Config accepts


# ----------------------------------------------------------------------------- the model
@dataclass
class Model:
    """What the store must hold after the trial, and what this trial's run recorded."""

    next_id: int = 0
    acked: dict[str, list[int]] = field(default_factory=dict)  # record() returned
    maybe: dict[str, set[int]] = field(default_factory=dict)  # a cancelled call's events
    table: dict[str, Any] = field(default_factory=dict)
    sure_deltas: int = 0  # this run's deltas that must be committed
    cache_args: set[int] = field(default_factory=set)
    all_or_none: list[list[int]] = field(default_factory=list)  # one record_many() each

    def ids(self, n: int) -> list[int]:
        first = self.next_id
        self.next_id += n
        return list(range(first, first + n))

    def ack(self, stream: str, ids: list[int], *, this_run: bool = True) -> None:
        self.acked.setdefault(stream, []).extend(ids)
        self.maybe.setdefault(stream, set()).difference_update(ids)
        if this_run:
            self.sure_deltas += len(ids)

    def unsure(self, stream: str, ids: list[int]) -> None:
        self.maybe.setdefault(stream, set()).update(ids)
        self.acked.setdefault(stream, [])

    async def record(self, run: apersist.Run, stream: str, n: int, *, pad: str = "",
                     this_run: bool = True) -> None:
        for i in self.ids(n):
            await run.stream(stream).record({"id": i, "pad": pad}, offset=i)
            self.ack(stream, [i], this_run=this_run)

    def set(self, table: apersist.Table, key: str, value: Any, *, this_run: bool = True) -> None:
        table[key] = value
        self.table[key] = value
        self.sure_deltas += this_run


CALLS: Counter[int] = Counter()  # calls of slow_square, by argument (reset by each trial)


@apersist.cached(name="cancel-campaign", version=1)
async def slow_square(x: int) -> dict[str, int]:
    CALLS[x] += 1
    for _ in range(3):
        await asyncio.sleep(0)
    return {"x": x, "square": x * x}


# ----------------------------------------------------------------------------- scenarios
class Scenario:
    """One public coroutine: what earlier runs commit for it, what the run records before
    calling it, the call, and how the run carries on after a cancellation."""

    name = ""
    max_pending_bytes: int | None = None
    interval_ms = 3_600_000  # no timed commits: only ours, and those back-pressure asks for

    async def seed(self, backend: apersist.Backend, model: Model) -> None:
        """Earlier runs: commit what the call needs."""

    async def prepare(self, run: apersist.Run, model: Model) -> None:
        await model.record(run, "s", 2)
        await model.record(run, "t", 2)

    def call(self, run: apersist.Run, model: Model) -> Coroutine[Any, Any, Any]:
        raise NotImplementedError

    def returned(self, model: Model, result: Any) -> None:
        """The call returned ``result``: what it did is now acknowledged."""

    async def carry_on(self, run: apersist.Run, model: Model, check: Check) -> None:
        """After the (maybe cancelled) call: do again what it was for."""

    async def verify(self, run: apersist.Run, model: Model, check: Check) -> None:
        """Extra checks in the read-only run that reads the store at the end."""


class CommitScenario(Scenario):
    name = "commit"

    def call(self, run: apersist.Run, model: Model) -> Coroutine[Any, Any, Any]:
        return run.commit()


class GroupCommitScenario(CommitScenario):
    """``run.commit()`` while the scheduler commits on its own (group commit, the default):
    the events recorded just before are being committed by it when the call comes."""

    name = "commit_group"
    interval_ms = 0


class RecordScenario(Scenario):
    name = "record"
    max_pending_bytes = SMALL_PENDING

    async def prepare(self, run: apersist.Run, model: Model) -> None:
        await model.record(run, "s", 2, pad=PAD)
        self.pending = model.ids(1)
        model.unsure("s", self.pending)

    def call(self, run: apersist.Run, model: Model) -> Coroutine[Any, Any, Any]:
        i = self.pending[0]
        return run.stream("s").record({"id": i, "pad": PAD}, offset=i)

    def returned(self, model: Model, result: Any) -> None:
        model.ack("s", self.pending)


class RecordManyScenario(RecordScenario):
    name = "record_many"

    async def prepare(self, run: apersist.Run, model: Model) -> None:
        await model.record(run, "s", 1, pad=PAD)
        self.pending = model.ids(3)
        model.unsure("s", self.pending)
        model.all_or_none.append(self.pending)

    def call(self, run: apersist.Run, model: Model) -> Coroutine[Any, Any, Any]:
        return run.stream("s").record_many([{"id": i, "pad": PAD} for i in self.pending],
                                           offsets=self.pending)


async def seed_table(backend: apersist.Backend, model: Model) -> None:
    """A table with a snapshot and deltas after it, in three commits."""
    async with pausing_run(apersist.Config(backend)) as run:
        tab = await run.table("tab")
        for i in range(5):
            model.set(tab, f"k{i}", i, this_run=False)
        await run.commit()
        await run.compact()
        for i in range(5, 10):
            model.set(tab, f"k{i}", i, this_run=False)
        del tab["k0"]
        del model.table["k0"]
        await run.commit()
        model.set(tab, "k1", {"changed": True}, this_run=False)


class TableScenario(Scenario):
    name = "table"

    async def seed(self, backend: apersist.Backend, model: Model) -> None:
        await seed_table(backend, model)

    def call(self, run: apersist.Run, model: Model) -> Coroutine[Any, Any, Any]:
        return run.table("tab")

    def returned(self, model: Model, result: Any) -> None:
        self.opened = result

    async def carry_on(self, run: apersist.Run, model: Model, check: Check) -> None:
        tab = await run.table("tab")
        check(dict(tab) == model.table, f"the table opened after the cancellation: "
              f"got={dict(tab)} expected={model.table}")
        if getattr(self, "opened", None) is not None:
            check(self.opened is tab, "the table returned by the call is not the run's table")


class CompactScenario(Scenario):
    name = "compact"

    async def seed(self, backend: apersist.Backend, model: Model) -> None:
        await seed_table(backend, model)

    async def prepare(self, run: apersist.Run, model: Model) -> None:
        await super().prepare(run, model)
        tab = await run.table("tab")
        model.set(tab, "k2", "before compact")
        del tab["k3"]
        del model.table["k3"]
        model.sure_deltas += 1

    def call(self, run: apersist.Run, model: Model) -> Coroutine[Any, Any, Any]:
        return run.compact()


SOURCE_SEEDED = 3  # live items committed by the seed run
SOURCE_END = 9  # the reader's items are 0..SOURCE_END-1


class SourceScenario(Scenario):
    name = "source"
    max_pending_bytes = SMALL_PENDING

    def reader(self, model: Model) -> Callable[[Any], Any]:
        async def read(offset: Any) -> Any:
            start = 0 if offset is None else offset + 1
            for j in range(start, self.end):
                model.unsure("src", [j])  # from here the source may record it
                yield {"id": j, "pad": PAD}, j
        return read

    async def consume(self, run: apersist.Run, model: Model, *, this_run: bool = True) -> int:
        live = 0
        async for event in run.source("src", self.reader(model)):
            if not event.replayed:
                # The source recorded it before yielding it.
                model.ack("src", [event.offset], this_run=this_run)
                self.received.add(event.offset)
                live += 1
        return live

    async def prepare(self, run: apersist.Run, model: Model) -> None:
        await super().prepare(run, model)
        self.received: set[int] = set(model.acked["src"])  # the seed run's

    async def seed(self, backend: apersist.Backend, model: Model) -> None:
        self.end = SOURCE_SEEDED
        self.received = set()
        async with pausing_run(apersist.Config(backend)) as run:
            await self.consume(run, model, this_run=False)
        self.end = SOURCE_END

    def call(self, run: apersist.Run, model: Model) -> Coroutine[Any, Any, Any]:
        return self.consume(run, model)

    async def carry_on(self, run: apersist.Run, model: Model, check: Check) -> None:
        # The offset the next source resumes from must cover what the first one recorded.
        await run.commit()
        await self.consume(run, model)

    async def verify(self, run: apersist.Run, model: Model, check: Check) -> None:
        got = [e.value["id"] async for e in run.stream("src").replay()]
        check(got == list(range(SOURCE_END)), f"source items stored: got={got} "
              f"expected={list(range(SOURCE_END))}")
        # A live event and the state derived from it are committed together: an item
        # stored without any loop body having received it has no state derived from it,
        # and later runs only replay it.
        unseen = sorted(set(got) - self.received)
        check(not unseen, f"source items stored that no loop body received live: {unseen}")


class ReplayScenario(Scenario):
    name = "replay"

    async def seed(self, backend: apersist.Backend, model: Model) -> None:
        async with pausing_run(apersist.Config(backend)) as run:
            for _ in range(4):  # four segments: replay reads them ahead in a task of the run
                await model.record(run, "s", 3, this_run=False)
                await run.commit()
        self.seeded = list(model.acked["s"])

    async def consume(self, run: apersist.Run) -> list[int]:
        return [e.value["id"] async for e in run.stream("s").replay()]

    def call(self, run: apersist.Run, model: Model) -> Coroutine[Any, Any, Any]:
        return self.consume(run)

    def returned(self, model: Model, result: Any) -> None:
        self.got = result

    async def carry_on(self, run: apersist.Run, model: Model, check: Check) -> None:
        if getattr(self, "got", None) is not None:
            check(self.got == self.seeded, f"replay returned {self.got}, expected {self.seeded}")
        again = await self.consume(run)
        check(again == self.seeded, f"replay after the cancellation: got={again} "
              f"expected={self.seeded}")


class CachedScenario(Scenario):
    name = "cached"
    X = 7

    async def prepare(self, run: apersist.Run, model: Model) -> None:
        await super().prepare(run, model)
        CALLS.clear()
        self.sibling: asyncio.Task[Any] | None = None

    def call(self, run: apersist.Run, model: Model) -> Coroutine[Any, Any, Any]:
        async def owner_and_waiter() -> Any:
            return await slow_square(self.X)
        return owner_and_waiter()

    def started(self, model: Model) -> None:
        # An equal call, made right after the one under test: it waits on its flight.
        self.sibling = asyncio.create_task(slow_square(self.X))

    def returned(self, model: Model, result: Any) -> None:
        self.result = result

    async def carry_on(self, run: apersist.Run, model: Model, check: Check) -> None:
        expected = {"x": self.X, "square": self.X * self.X}
        assert self.sibling is not None
        got = await self.sibling
        check(got == expected, f"the equal call waiting on the cancelled one returned {got}")
        again = await slow_square(self.X)
        check(again == expected, f"the call after the cancellation returned {again}")
        model.cache_args.add(self.X)
        model.sure_deltas += 1  # one cache entry, whoever computed it
        check(CALLS[self.X] <= 2, f"the function ran {CALLS[self.X]} times")

    async def verify(self, run: apersist.Run, model: Model, check: Check) -> None:
        before = sum(CALLS.values())
        for x in sorted(model.cache_args):
            await slow_square(x)
        check(sum(CALLS.values()) == before, "a stored result was not found by the next run")


SCENARIOS: dict[str, type[Scenario]] = {s.name: s for s in (
    CommitScenario, GroupCommitScenario, RecordScenario, RecordManyScenario, TableScenario, CompactScenario,
    SourceScenario, ReplayScenario, CachedScenario)}


# ----------------------------------------------------------------------------- a trial
class Check:
    """Collects the failed checks of one trial (they do not stop it)."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)


class StepClock:
    """One timeout for the whole trial, moved at each step: a step that hangs is named."""

    def __init__(self) -> None:
        self.name = "start"
        self.timeout: asyncio.Timeout | None = None

    def __call__(self, name: str) -> None:
        self.name = name
        assert self.timeout is not None
        self.timeout.reschedule(asyncio.get_running_loop().time() + STEP_TIMEOUT_S)


@dataclass
class Trial:
    scenario: str
    way: str
    point: float | None  # the await point asked for (a delay in seconds for wait_for)
    steps: int = 0  # await points the call passed
    call_s: float = 0.0  # how long the call took
    storage_events: int = 0  # starts and ends of storage calls while it ran
    delivered: int | None = None  # the await point the cancellation reached
    site: str | None = None
    outcome: str = ""
    sites: list[str] = field(default_factory=list)
    events_verified: int = 0
    unsure_stored: int | None = None  # of a cancelled record/record_many: events stored
    unsure_total: int = 0
    elapsed_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    def describe(self) -> str:
        where = (f"delivered at await point {self.delivered} ({self.site})"
                 if self.delivered is not None else f"not delivered ({self.steps} await points)")
        return (f"coroutine={self.scenario} way={self.way} point={self.point} {where} "
                f"[APERSIST_CANCEL_TRIAL={self.scenario}:{self.way}:{self.point}]")


async def call_and_cancel(scenario: Scenario, run: apersist.Run, model: Model, way: str,
                          point: float | None, trial: Trial) -> None:
    """Call the coroutine in a ``SteppingTask``, cancel it at ``point`` by ``way``."""
    returned: list[Any] = []
    holder: dict[str, Any] = {}
    loop = asyncio.get_running_loop()

    async def the_call() -> None:
        result = await scenario.call(run, model)
        returned.append(result)

    async def in_timeout() -> None:
        async with asyncio.timeout(None) as cm:
            holder["cm"] = cm
            await the_call()

    async def in_scope() -> None:
        with anyio.CancelScope() as scope:
            holder["scope"] = scope
            await the_call()

    inner: SteppingTask
    outer: asyncio.Future[Any]
    storage_events = 0

    def listen(op: str, key: str, when: str) -> None:
        # Storage calls made while the call runs (by any task): the driver way cancels
        # the call at the start or end of the point-th.
        nonlocal storage_events
        if not inner.done():
            storage_events += 1
            if way == "driver" and storage_events == point:
                inner.cancel()

    if way in ("none", "driver"):
        inner = SteppingTask(the_call())
        outer = inner
    elif way == "cancel":
        inner = SteppingTask(the_call(), on_step=at_step(point, lambda t: t.cancel()))
        outer = inner
    elif way == "timeout":
        inner = SteppingTask(in_timeout(), on_step=at_step(
            point, lambda t: holder["cm"].reschedule(loop.time())))
        outer = inner
    elif way == "anyio":
        inner = SteppingTask(in_scope(), on_step=at_step(point, lambda t: holder["scope"].cancel()))
        outer = inner
    elif way == "wait_for":
        inner = SteppingTask(the_call())
        outer = asyncio.ensure_future(asyncio.wait_for(inner, timeout=point))
    elif way == "taskgroup":
        inner, outer = await cancel_points.in_failing_taskgroup(the_call, point, SteppingTask)
    else:
        raise AssertionError(f"unknown way {way}")
    if isinstance(scenario, CachedScenario):
        scenario.started(model)
    began = time.perf_counter()
    cancel_points.listeners.append(listen)
    try:
        await asyncio.wait([outer])
    finally:
        cancel_points.listeners.remove(listen)
    trial.call_s = time.perf_counter() - began
    trial.storage_events = storage_events
    trial.steps, trial.delivered, trial.site = inner.steps, inner.delivered, inner.delivered_site
    trial.sites = inner.sites
    error = asyncio.CancelledError() if outer.cancelled() else outer.exception()
    expected: tuple[type[BaseException], ...] = {
        "none": (), "cancel": (asyncio.CancelledError,), "driver": (asyncio.CancelledError,),
        "timeout": (TimeoutError,), "anyio": (), "wait_for": (TimeoutError,),
        "taskgroup": (BaseExceptionGroup,)}[way]
    if returned:
        scenario.returned(model, returned[0])
        trial.outcome = "returned" if trial.delivered is None else "returned although cancelled"
    else:
        trial.outcome = "cancelled"
    if error is not None:
        if isinstance(error, BaseExceptionGroup):
            others = [e for e in error.exceptions if not isinstance(e, SiblingFailed)]
            if others:
                raise AssertionError(f"the call raised {others!r}")
        elif not isinstance(error, expected):
            raise AssertionError(f"the call raised {error!r}") from error
    if trial.outcome == "returned although cancelled":
        trial.failures.append(
            "the call swallowed the cancellation: it returned instead of raising "
            "(its caller waited on; asyncio.timeout would not raise TimeoutError)")
    if not returned and trial.delivered is None and way != "taskgroup":
        trial.failures.append("the call neither returned nor saw a cancellation")


async def run_trial(make_store: Callable[[], apersist.Backend], scenario: Scenario, way: str,
                    point: float | None) -> Trial:
    trial = Trial(scenario.name, way, point)
    check = Check()
    model = Model()
    backend = make_store()
    step = StepClock()
    started = time.perf_counter()
    extra = {} if scenario.max_pending_bytes is None else {
        "max_pending_bytes": scenario.max_pending_bytes}
    config = apersist.Config(backend, snapshot_interval_ms=scenario.interval_ms, **extra)
    last_stats: dict[str, Any] = {}
    try:
        async with asyncio.timeout(STEP_TIMEOUT_S) as timeout:
            step.timeout = timeout
            step("seed runs")
            await scenario.seed(backend, model)
            step("open")
            async with pausing_run(config) as run:
                step("prepare")
                await scenario.prepare(run, model)
                step("the call")
                await call_and_cancel(scenario, run, model, way, point, trial)
                step("carry on: " + scenario.name)
                await scenario.carry_on(run, model, check)
                step("record after the cancellation")
                await model.record(run, "s", 2)
                await model.record(run, "t", 2)
                tab = await run.table("tab")
                model.set(tab, "after", point)
                step("commit after the cancellation")
                await run.commit()
                stats = dict(run.stats)
                check(stats["pending_bytes"] == 0 and stats["pending_deltas"] == 0
                      and stats["uploads_in_flight"] == 0,
                      f"after a commit that returned, pending_bytes={stats['pending_bytes']} "
                      f"pending_deltas={stats['pending_deltas']} "
                      f"uploads_in_flight={stats['uploads_in_flight']} (expected 0)")
                check(stats["deltas_committed"] == stats["deltas_recorded"],
                      f"after a commit that returned, deltas_committed="
                      f"{stats['deltas_committed']} deltas_recorded={stats['deltas_recorded']}")
                step("record before leaving")
                await model.record(run, "s", 1)
                step("leave")
            last_stats = dict(run.stats)
            step("reopen and read")
            await verify_store(backend, scenario, model, check, trial)
            stored_unsure = trial.unsure_stored or 0
            expected = model.sure_deltas + stored_unsure
            check(last_stats["deltas_committed"] == last_stats["deltas_recorded"] == expected,
                  f"after leaving: deltas_committed={last_stats['deltas_committed']} "
                  f"deltas_recorded={last_stats['deltas_recorded']} expected={expected}")
            check(last_stats["pending_bytes"] == 0,
                  f"after leaving: pending_bytes={last_stats['pending_bytes']}")
    except TimeoutError:
        check(False, f"step {step.name!r} hung (no progress in {STEP_TIMEOUT_S:.0f}s)")
    except FencedError as exc:
        check(False, f"FencedError without another writer at step {step.name!r}: {exc}")
    except Exception as exc:
        check(False, f"step {step.name!r} raised {type(exc).__name__}: {exc}")
    trial.failures += check.failures
    trial.elapsed_s = time.perf_counter() - started
    return trial


async def verify_store(backend: apersist.Backend, scenario: Scenario, model: Model, check: Check,
                       trial: Trial) -> None:
    """A read-only run: each stream, the table and the cache against the model."""
    config = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with pausing_run(config) as run:
        unsure_stored = 0
        for name in sorted(set(model.acked) | set(model.maybe)):
            stream = run.stream(name)
            events = [e async for e in stream.replay()]
            ids = [e.value["id"] for e in events]
            trial.events_verified += len(ids)
            acked, maybe = set(model.acked.get(name, ())), model.maybe.get(name, set())
            counts = Counter(ids)
            twice = sorted(i for i, n in counts.items() if n > 1)
            check(not twice, f"stream {name}: stored more than once: {twice}")
            check(ids == sorted(ids), f"stream {name}: out of order: {ids}")
            lost = sorted(acked - set(ids))
            check(not lost, f"stream {name}: acknowledged events missing: {lost} (stored {ids})")
            foreign = sorted(set(ids) - acked - maybe)
            check(not foreign, f"stream {name}: events nobody recorded: {foreign}")
            wrong = [(e.value["id"], e.offset) for e in events if e.offset != e.value["id"]]
            check(not wrong, f"stream {name}: wrong offsets (id, offset): {wrong}")
            want = ids[-1] if ids else None
            check(stream.offset == want, f"stream {name}: offset={stream.offset} expected={want}")
            for group in model.all_or_none:
                stored = [i for i in group if i in counts]
                check(stored in ([], group), f"stream {name}: of record_many({group}) only "
                      f"{stored} stored")
            unsure_stored += len(maybe & set(ids))
            if name != "src":  # a cancelled record() or record_many()
                trial.unsure_total += len(maybe)
        trial.unsure_stored = unsure_stored
        table = dict(await run.table("tab"))
        check(table == model.table, f"table: got={table} expected={model.table}")
        await scenario.verify(run, model, check)


# ----------------------------------------------------------------------------- campaign
# Cancellations per coroutine on each backend unless APERSIST_CANCEL_POINTS says (0: every
# await point in every way). Sized for about a minute on 2 cores in the test suite: a run
# on the test S3 server costs about 0.3 s to open (its client), a trial three runs.
CI_POINTS = {"memory": 0, "filesystem": 12, "s3": 1, "azure": 6}


def budget(kind: str) -> int:
    return int(os.environ.get("APERSIST_CANCEL_POINTS", CI_POINTS.get(kind, 1)))


def plan(steps: int, duration_s: float, points: int,
         storage_events: int = 0) -> list[tuple[str, float | None]]:
    """The (way, point) pairs to try: every await point 0..steps in every way (wait_for:
    eight delays over the call's duration; driver: each start and end of a storage call),
    or the first ``points`` of them taken in turn from each way, each way's points spread."""
    per_way: dict[str, list[float | None]] = {}
    for way in WAYS:
        if way == "wait_for":
            per_way[way] = [0.0] + [round(duration_s * i / 8, 6) for i in range(1, 8)]
        elif way == "driver":
            per_way[way] = list(range(1, storage_events + 1))
        else:
            first = 1 if way in ("timeout", "anyio") else 0  # their scope exists from step 1
            per_way[way] = list(range(first, steps + 1))
        per_way[way] = spread(per_way[way])
    pairs = [(way, per_way[way][r]) for r in range(max(map(len, per_way.values())))
             for way in WAYS if r < len(per_way[way])]
    return pairs if points <= 0 else pairs[:points]


@dataclass
class Figures:
    await_points: int = 0
    storage_events: int = 0
    sites: set[str] = field(default_factory=set)
    covered: set[str] = field(default_factory=set)
    trials: int = 0
    cancellations: int = 0
    completed: int = 0
    events_verified: int = 0
    failures: list[str] = field(default_factory=list)
    unsure: Counter[str] = field(default_factory=Counter)
    by_way: Counter[str] = field(default_factory=Counter)


async def campaign(kind: str, make_store: Callable[[], apersist.Backend],
                   scenarios: list[str], points: int,
                   only_trial: tuple[str, float | None] | None = None) -> dict[str, Figures]:
    figures: dict[str, Figures] = {}
    for name in scenarios:
        fig = figures[name] = Figures()

        async def one(way: str, point: float | None, fig: Figures = fig, name: str = name) -> Trial:
            trial = await run_trial(make_store, SCENARIOS[name](), way, point)
            fig.trials += 1
            fig.events_verified += trial.events_verified
            if way == "none":
                fig.await_points = max(fig.await_points, trial.steps)
                fig.storage_events = max(fig.storage_events, trial.storage_events)
            fig.sites.update(trial.sites)
            if trial.delivered is not None:
                fig.cancellations += 1
                fig.by_way[way] += 1
                if trial.site:
                    fig.covered.add(trial.site)
            if trial.outcome.startswith("returned"):
                fig.completed += 1
            if trial.unsure_total and trial.delivered:
                stored = "stored" if trial.unsure_stored else "not stored"
                fig.unsure[f"{trial.outcome}: {stored}"] += 1
            if trial.failures:
                fig.failures.append(f"{kind}: {trial.describe()}: " + " | ".join(trial.failures))
            return trial

        baseline = await one("none", None)
        pairs = (plan(baseline.steps, 0.0, points, baseline.storage_events)
                 if only_trial is None else [only_trial])
        if only_trial is None and any(way == "wait_for" for way, _ in pairs):
            # wait_for's delays are spread over how long an uncancelled call takes (the
            # first trial paid for warming up).
            timed = await one("none", None)
            pairs = plan(baseline.steps, timed.call_s, points, baseline.storage_events)
        for way, point in pairs:
            await one(way, point)
    return figures


def report(kind: str, figures: dict[str, Figures], elapsed: float, points: int) -> dict[str, Any]:
    rows = []
    for name, fig in figures.items():
        rows.append(f"  {name:<12} await points={fig.await_points:>4} "
                    f"storage call ends={fig.storage_events:>3} "
                    f"sites={len(fig.sites):>3} covered={len(fig.covered):>3} "
                    f"trials={fig.trials:>4} cancellations={fig.cancellations:>4} "
                    f"completed={fig.completed:>4} events={fig.events_verified:>6} "
                    f"failures={len(fig.failures)}"
                    + (f" cancelled-record: {dict(fig.unsure)}" if fig.unsure else ""))
    print(f"\ncancellation campaign ({kind}): points={points or 'every'}\n" + "\n".join(rows))
    total = {
        "campaign": "cancellation", "backend": kind, "points": points,
        "coroutines": len(figures),
        "await_points": sum(f.await_points for f in figures.values()),
        "storage_call_ends": sum(f.storage_events for f in figures.values()),
        "sites_covered": sum(len(f.covered) for f in figures.values()),
        "sites_seen": sum(len(f.sites | f.covered) for f in figures.values()),
        "trials": sum(f.trials for f in figures.values()),
        "cancellations": sum(f.cancellations for f in figures.values()),
        "completed": sum(f.completed for f in figures.values()),
        "events_verified": sum(f.events_verified for f in figures.values()),
        "failures": sum(len(f.failures) for f in figures.values()),
        "elapsed_s": round(elapsed, 1),
        "by_coroutine": {name: {"await_points": f.await_points,
                                "storage_call_ends": f.storage_events, "sites": sorted(f.sites),
                                "covered": sorted(f.covered), "trials": f.trials,
                                "cancellations": f.cancellations, "completed": f.completed,
                                "events_verified": f.events_verified,
                                "failures": len(f.failures), "by_way": dict(f.by_way),
                                "cancelled_record": dict(f.unsure)}
                         for name, f in figures.items()},
    }
    print("cancellation campaign (" + kind + "): " + " ".join(
        f"{k}={v}" for k, v in total.items() if k != "by_coroutine"))
    return total


async def test_cancellation_campaign(backend_kind: str,
                                     backend_factory: Callable[[str], apersist.Backend]) -> None:
    made = iter(range(1_000_000))
    only = os.environ.get("APERSIST_CANCEL_ONLY")
    names = only.split(",") if only else list(SCENARIOS)
    only_trial = None
    if trial := os.environ.get("APERSIST_CANCEL_TRIAL"):  # coroutine:way:point, as reported
        name, way, point = trial.split(":")
        names, only_trial = [name], (way, float(point) if way == "wait_for" else int(point))
    started = time.perf_counter()
    points = budget(backend_kind)
    figures = await campaign(backend_kind, lambda: backend_factory(f"c{next(made)}"), names, points,
                             only_trial)
    total = report(backend_kind, figures, time.perf_counter() - started, points)
    if path := os.environ.get("APERSIST_CANCEL_REPORT"):
        async with await anyio.open_file(path, "ab") as out:
            await out.write(orjson.dumps(total) + b"\n")
    failures = [f for fig in figures.values() for f in fig.failures]
    assert not failures, f"{len(failures)} failed trials:\n" + "\n".join(failures)


# ----------------------------------------------------------------------------- the machinery
async def _three_sleeps() -> str:
    for _ in range(3):
        await asyncio.sleep(0)
    return "done"


async def test_a_stepping_task_counts_await_points_and_cancels_at_each() -> None:
    plain = SteppingTask(_three_sleeps())
    await asyncio.wait([plain])
    assert (plain.result(), plain.steps, plain.delivered) == ("done", 3, None)
    assert all(site.startswith("tests/campaigns/test_cancellation.py:") for site in plain.sites)
    for k in range(4):  # 0: before it starts; 3: at its last await point
        task = SteppingTask(_three_sleeps(),
                            on_step=lambda t, k=k: t.cancel() if t.steps == k else None)
        await asyncio.wait([task])
        assert task.cancelled(), k
        assert task.delivered == k


async def test_a_site_is_the_innermost_apersist_frame() -> None:
    config = apersist.Config(apersist.Backend.memory(), snapshot_interval_ms=3_600_000)
    async with apersist.run(config) as run:
        await run.stream("s").record(1)
        commit = SteppingTask(run.commit())
        await asyncio.wait([commit])
        assert commit.result().deltas == 1
        assert commit.sites, "a commit passes an await point"
        assert all(site.startswith("apersist/_") for site in commit.sites), commit.sites


def test_the_plan_covers_every_point_in_every_way_and_its_prefixes_spread() -> None:
    every = plan(4, 0.01, 0)
    ways = Counter(way for way, _ in every)
    assert ways == {"cancel": 5, "taskgroup": 5, "timeout": 4, "anyio": 4, "wait_for": 8}
    assert Counter(way for way, _ in plan(4, 0.01, 0, 6))["driver"] == 6
    assert {p for way, p in every if way == "cancel"} == {0, 1, 2, 3, 4}
    assert plan(4, 0.01, 3) == [("cancel", 2), ("timeout", 3), ("anyio", 3)]
    assert sorted(spread(list(range(10)))) == list(range(10))
    assert spread(list(range(10)))[:3] == [5, 0, 9]


async def test_the_pausing_driver_is_a_faithful_driver() -> None:
    async def make() -> PausingDriver:
        return PausingDriver(MemoryDriver({}))

    await check_driver(make)  # type: ignore[arg-type]
