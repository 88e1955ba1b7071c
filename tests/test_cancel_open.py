"""Cancel the task that enters, and leaves, ``async with apersist.run(config) as run:``.

Opening a store sends independent requests at once (the load, the epochs' listing, the
create-if-absent probe on S3 and Azure, commit-record reads beside a newer-checkpoint
question, segment and epoch checks), then writes the epoch record and the fence commit;
leaving makes the final commit and closes the drivers. Each trial cancels the task that
does all that at one of its await points (``cancel_points.SteppingTask``), in one of these
ways: ``task.cancel()``, ``asyncio.timeout()`` expiring, ``asyncio.wait_for()`` timing out
(after a delay), a ``TaskGroup`` whose sibling fails, (with a ``PausingDriver``) right
before or after the j-th storage call of any task, and ``twice``: ``task.cancel()`` at the
point and once more at the first await point after it was delivered, while the task
cleans up (nested timeouts, a supervisor that insists, a second Ctrl-C).

Scenarios, each on one store that its trials share (so the leftovers of one cancelled
opening are met by the next): ``new`` (an empty root, with ``stop_on_signals=True``: its
handlers must be gone after every trial), ``history`` (a few hundred commits
with a checkpoint, more than 64 commit records after it), ``live`` (another run
holds the writer role while the cancelled run opens, with ``takeover_idle_ms=1`` so the
opening reads the storage's clock too) and ``replay`` (a read-only run of ``history``'s
kind of store). The cancelled run's body records three events (writers) and leaves.

After each trial: the cancellation came out as it went in (``CancelledError``,
``TimeoutError``, the sibling's exception group), never swallowed nor turned into another
error; no task of the run is left, no exception reached the loop's handler, no warning
(``ResourceWarning`` of an unclosed session or socket) or unraisable exception was
emitted, and (when the run opened its own driver) no socket is left open; a writing run
then opens the store (own driver), finds every acknowledged event exactly once and the
cancelled body's events all or none, records one more and leaves; a read-only run finds
the same. No ``FencedError`` or ``CorruptDataError`` may appear (in ``live``, only the
older writer may be fenced: the cancelled opening may have landed its fence commit, and
then the older writer's late event must be absent). At the end of each scenario gc with
no grace period (``collect_garbage``, as ``apersist gc --grace-seconds 0``), run twice,
must collect every leftover ``_check/`` scratch key, and the store must still open with
every event.

The ``history`` store has 200 commits by default (``CI_HISTORY``: 140 on S3 and Azure):
a checkpoint at 128, then commit records read 64 at a time.

Size: ``APERSIST_CANCEL_OPEN_POINTS`` cancellations per scenario and driver mode on each
backend (``0``: every await point in every way). Unset, ``CI_POINTS`` applies (and on S3
and Azure ``CI_SCENARIOS``, ``CI_MODES``, ``CI_HISTORY``: the file takes about a minute).
``APERSIST_CANCEL_OPEN_ONLY=new,live`` limits the scenarios,
``APERSIST_CANCEL_OPEN_WAYS=cancel,twice`` the ways, ``APERSIST_CANCEL_OPEN_MODES=own``
the driver modes; ``APERSIST_CANCEL_OPEN_HISTORY`` is the history's number of commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cancel_points
import pytest
from cancel_points import PausingDriver, SiblingFailed, SteppingTask, at_step, spread

import apersist
from apersist import CorruptDataError, FencedError, _stopping
from apersist._concurrency import gather_bounded
from apersist._drivers import open_driver
from apersist._drivers.probe import SCRATCH_PREFIX
from apersist._gc import collect_garbage

STEP_TIMEOUT_S = 30.0
WAYS = ("cancel", "timeout", "taskgroup", "wait_for", "driver", "twice")
SCENARIOS = ("new", "history", "live", "replay")
# The history scenarios' store: a checkpoint at 128, then more than 64 commit records after
# it (one batch of concurrent record reads and more). APERSIST_CANCEL_OPEN_HISTORY for more.
# The test suite's default on S3 and Azure is smaller (CI_HISTORY): one checkpoint, a
# dozen records after it.
HISTORY_COMMITS = int(os.environ.get("APERSIST_CANCEL_OPEN_HISTORY", 200))
# Cancellations per scenario and driver mode unless APERSIST_CANCEL_OPEN_POINTS says (0:
# every point of every way). Sized for well under a minute on 2 cores.
CI_POINTS = {"memory": 16, "filesystem": 5, "s3": 2, "azure": 2}
# On S3 and Azure the test suite runs the scenarios whose opening differs there (the
# create-if-absent probe, the client made on first use and closed on the way out) with
# the driver the run opens itself; APERSIST_CANCEL_OPEN_* sets them all.
CI_SCENARIOS = {"s3": "new,history", "azure": "new,history"}
CI_MODES = {"s3": "own", "azure": "own"}
CI_HISTORY = {"s3": 140, "azure": 140}


def budget(kind: str) -> int:
    return int(os.environ.get("APERSIST_CANCEL_OPEN_POINTS", CI_POINTS[kind]))


# ----------------------------------------------------------------------------- the model
@dataclass
class Model:
    next_id: int = 0
    acked: list[int] = field(default_factory=list)  # must be stored, exactly once
    groups: list[list[int]] = field(default_factory=list)  # each all or none
    maybe: set[int] = field(default_factory=set)

    def ids(self, n: int) -> list[int]:
        first = self.next_id
        self.next_id += n
        return list(range(first, first + n))


def check_events(model: Model, ids: list[int], offset: Any, where: str) -> list[str]:
    problems = []
    counts = Counter(ids)
    twice = sorted(i for i, n in counts.items() if n > 1)
    if twice:
        problems.append(f"{where}: stored more than once: {twice}")
    if ids != sorted(ids):
        problems.append(f"{where}: out of order")
    lost = sorted(set(model.acked) - set(ids))
    if lost:
        problems.append(f"{where}: acknowledged events missing: {lost}")
    foreign = sorted(set(ids) - set(model.acked) - model.maybe)
    if foreign:
        problems.append(f"{where}: events nobody recorded: {foreign}")
    for group in model.groups:
        stored = [i for i in group if i in counts]
        if stored not in ([], group):
            problems.append(f"{where}: of one run's final commit {group} only {stored} stored")
    want = ids[-1] if ids else None
    if offset != want:
        problems.append(f"{where}: offset={offset} expected={want}")
    return problems


def settle(model: Model, ids: list[int]) -> None:
    """What a read found is now the truth: an unsure event found is acknowledged."""
    found = set(ids)
    for group in model.groups:
        if group and group[0] in found:
            model.acked.extend(group)
    model.acked.sort()
    model.groups.clear()
    model.maybe.clear()


# ----------------------------------------------------------------------------- a trial
@dataclass
class Trial:
    scenario: str
    mode: str  # "given": a PausingDriver given to the run; "own": the run opens its own
    way: str
    point: float | None
    steps: int = 0
    entry_steps: int | None = None  # steps when the block was entered (None: never)
    storage_events: int = 0
    delivered: int | None = None
    requested: int | None = None  # the step at which the test asked for the cancellation
    again_site: str | None = None  # the twice way: where the second cancellation landed
    site: str | None = None
    phase: str = ""  # where the cancellation landed: entry, leave, or none
    outcome: str = ""
    scratch_left: int = 0
    failures: list[str] = field(default_factory=list)
    storage_log: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)

    def describe(self) -> str:
        where = (f"asked at await point {self.requested}, delivered at {self.delivered} of {self.steps} "
                 f"(entered at {self.entry_steps}) in {self.phase} ({self.site})"
                 if self.requested is not None else f"not asked ({self.steps} await points)")
        again = f" second cancellation at {self.again_site}" if self.again_site else ""
        return (f"scenario={self.scenario} mode={self.mode} way={self.way} point={self.point} "
                f"{where}{again}")


class Stepping(SteppingTask):
    """A ``SteppingTask`` that tells the test's cancellations from anyio's own: leaving a
    run cancels its task group's scope, and anyio cancels the waiting host task for that
    (then takes it back), which ``SteppingTask.delivered`` would count as ours."""

    requested: int | None = None

    def cancel(self, msg: Any = None) -> bool:
        if not (isinstance(msg, str) and msg.startswith("Cancelled via cancel scope")) \
                and self.requested is None and not self.done():
            self.requested = self.steps
        return super().cancel(msg)


def socket_count() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                n += 1
    return n


class Watch:
    """What a trial may not leave behind: exceptions handed to the loop, warnings,
    unraisable exceptions."""

    def __init__(self) -> None:
        self.loop_errors: list[str] = []
        self.unraisable: list[str] = []
        self.caught: list[warnings.WarningMessage] = []

    @contextlib.contextmanager
    def __call__(self) -> Any:
        loop = asyncio.get_running_loop()
        old_handler = loop.get_exception_handler()
        old_hook = sys.unraisablehook
        loop.set_exception_handler(
            lambda _loop, ctx: self.loop_errors.append(
                f"{ctx.get('message')} {ctx.get('exception')!r} {ctx.get('task', '')}"))
        sys.unraisablehook = lambda u: self.unraisable.append(
            f"{u.exc_type.__name__}: {u.exc_value} in {u.object!r}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield self
            finally:
                gc.collect()
                self.caught = list(caught)
                loop.set_exception_handler(old_handler)
                sys.unraisablehook = old_hook

    def problems(self) -> list[str]:
        out = [f"loop exception handler got: {e}" for e in self.loop_errors]
        out += [f"unraisable exception: {e}" for e in self.unraisable]
        out += [f"warning: {w.category.__name__}: {w.message}" for w in self.caught]
        return out


async def cancelled_call(make: Callable[[], Any], way: str, point: float | None,
                         trial: Trial) -> tuple[BaseException | None, Stepping]:
    """Run ``make()`` in a SteppingTask, cancel it at ``point`` by ``way``; return what the
    outermost awaitable raised (None if it returned) and the task."""
    loop = asyncio.get_running_loop()
    holder: dict[str, Any] = {}

    async def in_timeout() -> None:
        async with asyncio.timeout(None) as cm:
            holder["cm"] = cm
            await make()

    storage_events = 0
    inner: Stepping

    def listen(op: str, key: str, when: str) -> None:
        nonlocal storage_events
        if not inner.done():
            storage_events += 1
            trial.storage_log.append(f"{storage_events}:{op}:{key}:{when}@{inner.steps}")
            if way == "driver" and storage_events == point:
                inner.cancel()

    outer: asyncio.Future[Any]
    if way in ("none", "driver"):
        inner = outer = Stepping(make())
    elif way == "cancel":
        inner = outer = Stepping(make(), on_step=at_step(point, lambda t: t.cancel()))
    elif way == "twice":
        # Task.cancel() at the point, and again at the first await point after it was
        # delivered (while the task cleans up): two timeouts, a supervisor that insists.
        def twice(task: Stepping) -> None:
            if task.steps == point:
                task.cancel()
            elif task.delivered is not None and not holder.get("again"):
                holder["again"] = task.steps
                trial.again_site = task.sites[-1] if task.sites else "?"
                task.cancel()
        inner = outer = Stepping(make(), on_step=twice)
    elif way == "timeout":
        inner = outer = Stepping(in_timeout(), on_step=at_step(
            point, lambda t: holder["cm"].reschedule(loop.time())))
    elif way == "wait_for":
        inner = Stepping(make())
        outer = asyncio.ensure_future(asyncio.wait_for(inner, timeout=point))
    elif way == "taskgroup":
        inner, outer = await cancel_points.in_failing_taskgroup(make, point, Stepping)
    else:
        raise AssertionError(way)
    cancel_points.listeners.append(listen)
    try:
        await asyncio.wait([outer])
    finally:
        cancel_points.listeners.remove(listen)
    trial.storage_events = storage_events
    trial.steps, trial.delivered, trial.site = inner.steps, inner.delivered, inner.delivered_site
    trial.requested = inner.requested
    if inner.requested is None:
        trial.delivered = trial.site = None  # only anyio's own cancellations reached it
    trial.sites = list(inner.sites)
    error = asyncio.CancelledError() if outer.cancelled() else outer.exception()
    return error, inner


def expected_error(way: str, error: BaseException | None) -> bool:
    if way in ("cancel", "driver", "twice"):
        return isinstance(error, asyncio.CancelledError)
    if way in ("timeout", "wait_for"):
        return isinstance(error, TimeoutError)
    if way == "taskgroup":
        return (isinstance(error, BaseExceptionGroup)
                and all(isinstance(e, SiblingFailed) for e in error.exceptions))
    return error is None


# ----------------------------------------------------------------------------- scenarios
class Scenario:
    """One store that a scenario's trials share, and how the cancelled run uses it."""

    def __init__(self, name: str, backend: apersist.Backend) -> None:
        self.name = name
        self.backend = backend
        self.model = Model()
        self.writer = name != "replay"
        self.live_task: asyncio.Task[Any] | None = None

    def config(self) -> apersist.Config:
        extra: dict[str, Any] = {"snapshot_interval_ms": 3_600_000}
        if not self.writer:
            extra["snapshot_access"] = apersist.SnapshotAccess.REPLAY
        if self.name == "live":
            extra["takeover_idle_ms"] = 1
        return apersist.Config(self.backend, **extra)

    async def seed(self, driver: Any, template: Template) -> None:
        if self.name in ("history", "replay"):
            await template.copy_to(driver, self.model)

    async def body(self, run: apersist.Run, trial: Trial) -> None:
        trial.entry_steps = asyncio.current_task().steps  # type: ignore[union-attr]
        if not self.writer:
            return  # a read-only run: nothing to record, leaving commits nothing
        ids = self.model.ids(3)
        self.model.maybe.update(ids)
        self.model.groups.append(ids)
        for i in ids:
            await run.stream("s").record({"id": i}, offset=i)

    # The live scenario: an older writer holds the store while the trial's run opens.
    async def start_live(self, driver: Any, ready: asyncio.Event, release: asyncio.Event,
                         outcome: dict[str, Any]) -> None:
        config = apersist.Config(self.backend, snapshot_interval_ms=3_600_000)
        try:
            async with apersist.run(config, driver=driver) as run:
                ids = self.model.ids(1)
                await run.stream("s").record({"id": ids[0]}, offset=ids[0])
                await run.commit()
                self.model.acked += ids
                # takeover_idle_ms=1: the store's clock (S3's and Azure's in whole seconds)
                # must see this writer idle, or the opening refuses to take over.
                await asyncio.sleep(1.05 if self.backend.kind in ("s3", "azure") else 0.005)
                ready.set()
                await release.wait()
                late = self.model.ids(1)
                self.model.maybe.update(late)
                outcome["late"] = late
                await run.stream("s").record({"id": late[0]}, offset=late[0])
                try:
                    await run.commit()
                    outcome["committed"] = True
                except FencedError as exc:
                    outcome["fenced"] = exc
                    raise
        except FencedError:
            pass
        except BaseException as exc:
            outcome["error"] = exc
            ready.set()


class Template:
    """A store with a history, made once per backend and copied into each scenario's."""

    def __init__(self, backend: apersist.Backend, commits: int) -> None:
        self.backend = backend
        self.commits = commits
        self.ids: list[int] | None = None

    async def copy_to(self, driver: Any, model: Model) -> None:
        async with contextlib.AsyncExitStack() as stack:
            source = open_driver(self.backend)
            stack.push_async_callback(source.aclose)
            if self.ids is None:
                self.ids = []
                config = apersist.Config(self.backend, snapshot_interval_ms=3_600_000)
                async with apersist.run(config, driver=source) as run:
                    for i in range(self.commits):
                        await run.stream("s").record({"id": i}, offset=i)
                        await run.commit()
                        self.ids.append(i)
            keys = [info.key async for info in source.list("writers/")]

            async def copy(key: str) -> None:
                await driver.put(key, await source.get(key))

            await gather_bounded([functools.partial(copy, key) for key in keys], 32)
        model.acked += self.ids
        model.next_id = max(model.next_id, len(self.ids))


async def scratch_keys(driver: Any) -> list[str]:
    return [info.key async for info in driver.list(SCRATCH_PREFIX)]


async def verify(scenario: Scenario, driver: Any, trial: Trial | None, where: str) -> list[str]:
    """A writing run (it records one more event), then a read-only run."""
    problems: list[str] = []
    model = scenario.model
    try:
        async with apersist.run(apersist.Config(scenario.backend), driver=driver) as run:
            stream = run.stream("s")
            ids = [e.value["id"] async for e in stream.replay()]
            problems += check_events(model, ids, stream.offset, f"{where}: writer reopen")
            settle(model, ids)
            more = model.ids(1)
            await stream.record({"id": more[0]}, offset=more[0])
        model.acked += more
        config = apersist.Config(scenario.backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
        async with apersist.run(config, driver=driver) as run:
            stream = run.stream("s")
            ids = [e.value["id"] async for e in stream.replay()]
            problems += check_events(model, ids, stream.offset, f"{where}: read-only reopen")
    except (FencedError, CorruptDataError) as exc:
        problems.append(f"{where}: {type(exc).__name__} without another writer: {exc}")
    except Exception as exc:
        problems.append(f"{where}: reopening raised {type(exc).__name__}: {exc}")
    return problems


async def run_trial(scenario: Scenario, mode: str, way: str, point: float | None,
                    given: PausingDriver, check_driver: Any) -> Trial:
    trial = Trial(scenario.name, mode, way, point)
    config = scenario.config()
    live: dict[str, Any] = {}
    release = asyncio.Event()
    if scenario.name == "live":
        ready = asyncio.Event()
        scenario.live_task = asyncio.create_task(
            scenario.start_live(check_driver, ready, release, live))
        await ready.wait()
        if "error" in live:
            trial.failures.append(f"the live writer failed to open: {live['error']!r}")
            return trial

    signals = scenario.name == "new"  # with stop_on_signals: the handlers must come back

    async def lifetime() -> None:
        async with apersist.run(config, driver=given if mode == "given" else None,
                                stop_on_signals=signals) as run:
            await scenario.body(run, trial)

    before_tasks = asyncio.all_tasks()
    sockets_before = socket_count() if mode == "own" else 0
    watch = Watch()
    with watch():
        error, task = await cancelled_call(lifetime, way, point, trial)
        # Only what is needed of the outcome is kept: the exception's traceback holds the
        # run's frames (and its driver), whose leftovers must be collected in this trial.
        raised, error_repr, as_expected = error is not None, repr(error), expected_error(way, error)
        bad_error = (f"{type(error).__name__}: {error}"
                     if isinstance(error, (FencedError, CorruptDataError)) else None)
        del error, task
        for _ in range(3):
            await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() - before_tasks if not t.done()]
        if left:
            await asyncio.wait(left, timeout=1.0)
            lingering = [t for t in left if not t.done()]
            trial.failures.append(
                f"tasks still running right after the call ended: {[repr(t) for t in left]}"
                + (f"; still after 1 s: {len(lingering)}" if lingering else ""))
    trial.failures += watch.problems()
    if signals:
        handlers = getattr(asyncio.get_running_loop(), "_signal_handlers", {})
        kept = [sig.name for sig in (signal.SIGTERM, signal.SIGINT) if sig in handlers]
        if kept or _stopping._signal_runs:
            trial.failures.append(f"stop_on_signals: handlers left installed: {kept} "
                                  f"runs={len(_stopping._signal_runs)}")
    if mode == "own":
        gc.collect()
        sockets_after = socket_count()
        if sockets_after > sockets_before:
            trial.failures.append(f"sockets left open: before={sockets_before} after={sockets_after}")
    if trial.requested is None:
        trial.phase = "none"
    elif trial.entry_steps is None or trial.requested <= trial.entry_steps:
        trial.phase = "entry"
    else:
        trial.phase = "leave"
    if trial.requested is not None:
        if trial.delivered is None and not raised:
            trial.failures.append("a cancellation was asked for but never reached the task, "
                                  "and the call returned")
        if not as_expected:
            trial.failures.append(f"the cancellation came out as {error_repr} "
                                  f"(expected the {way} way's own exception)"
                                  + (f" storage={trial.storage_log[-6:]} sites={trial.sites[-4:]}"
                                     if os.environ.get("APERSIST_CANCEL_OPEN_DEBUG") else ""))
        if trial.phase == "entry" and trial.entry_steps is not None:
            trial.failures.append("the block was entered although the cancellation came "
                                  "during the entry (the entry swallowed it)")
    else:
        if raised and not (way == "taskgroup" and as_expected):
            trial.failures.append(f"not cancelled, but the call raised {error_repr}")
        if not raised and scenario.writer:
            # Left normally: the body's events are durable.
            group = scenario.model.groups.pop()
            scenario.model.maybe.difference_update(group)
            scenario.model.acked += group
            scenario.model.acked.sort()
    if bad_error:
        trial.failures.append(bad_error)
    trial.outcome = "error" if raised else "returned"
    if scenario.live_task is not None:
        release.set()
        await scenario.live_task
        scenario.live_task = None
        if "error" in live:
            trial.failures.append(f"the live writer failed: {live['error']!r}")
        if "committed" in live:
            scenario.model.acked += live["late"]
            scenario.model.maybe.difference_update(live["late"])
            scenario.model.acked.sort()
        elif "late" in live:
            scenario.model.maybe.difference_update(live["late"])  # fenced: never lands
            scenario.model.maybe.discard(live["late"][0])
    trial.scratch_left = len(await scratch_keys(check_driver))
    trial.failures += await verify(scenario, check_driver, trial, "after the trial")
    return trial


def plan(steps: int, duration_s: float, storage_events: int, points: int,
         mode: str) -> list[tuple[str, float | None]]:
    per_way: dict[str, list[Any]] = {}
    for way in WAYS:
        if way == "wait_for":
            per_way[way] = [0.0] + [round(duration_s * i / 8, 6) for i in range(1, 8)]
        elif way == "driver":
            per_way[way] = list(range(1, storage_events + 1)) if mode == "given" else []
        else:
            per_way[way] = list(range(1 if way == "timeout" else 0, steps + 1))
        per_way[way] = spread(per_way[way])
    ways = os.environ.get("APERSIST_CANCEL_OPEN_WAYS", ",".join(WAYS)).split(",")
    pairs = [(way, per_way[way][r]) for r in range(max(map(len, per_way.values())))
             for way in ways if r < len(per_way[way])]
    return pairs if points <= 0 else pairs[:points]


@dataclass
class Figures:
    entry_points: int = 0
    leave_points: int = 0
    storage_events: int = 0
    trials: int = 0
    cancellations: Counter[str] = field(default_factory=Counter)
    sites: set[str] = field(default_factory=set)
    scratch_left: int = 0
    failures: list[str] = field(default_factory=list)


async def campaign(kind: str, backend_factory: Callable[[str], apersist.Backend],
                   names: list[str], points: int) -> dict[str, Figures]:
    figures: dict[str, Figures] = {}
    history = int(os.environ.get("APERSIST_CANCEL_OPEN_HISTORY",
                                 CI_HISTORY.get(kind, HISTORY_COMMITS)))
    template = Template(backend_factory("template"), history)
    for name in names:
        modes = os.environ.get("APERSIST_CANCEL_OPEN_MODES", CI_MODES.get(kind, "given,own"))
        for mode in modes.split(","):
            fig = figures[f"{name}/{mode}"] = Figures()
            scenario = Scenario(name, backend_factory(f"{name}-{mode}"))
            async with contextlib.AsyncExitStack() as stack:
                plain = open_driver(scenario.backend)
                stack.push_async_callback(plain.aclose)
                given = PausingDriver(open_driver(scenario.backend))
                stack.push_async_callback(given.aclose)
                await scenario.seed(plain, template)

                async def one(way: str, point: float | None, *, fig: Figures = fig,
                              scenario: Scenario = scenario, mode: str = mode,
                              given: PausingDriver = given, plain: Any = plain,
                              name: str = name) -> Trial:
                    async with asyncio.timeout(STEP_TIMEOUT_S * 3):
                        try:
                            trial = await run_trial(scenario, mode, way, point, given, plain)
                        except TimeoutError:
                            trial = Trial(name, mode, way, point, failures=["the trial hung"])
                    fig.trials += 1
                    if trial.requested is not None:
                        fig.cancellations[trial.phase] += 1
                        if trial.site:
                            fig.sites.add(f"{trial.phase}: {trial.site}")
                    fig.scratch_left = max(fig.scratch_left, trial.scratch_left)
                    if trial.failures:
                        fig.failures.append(f"{kind}: {trial.describe()}: "
                                            + " | ".join(trial.failures))
                    return trial

                started = time.perf_counter()
                timed = await one("none", None)
                duration = time.perf_counter() - started
                pairs = plan(timed.steps, duration, timed.storage_events, points, mode)
                if any(way == "wait_for" for way, _ in pairs):
                    # wait_for's delays spread over an uncancelled trial's time (the first
                    # paid for warming up).
                    started = time.perf_counter()
                    timed = await one("none", None)
                    duration = min(time.perf_counter() - started, 2.0)
                    pairs = plan(timed.steps, duration, timed.storage_events, points, mode)
                fig.entry_points = timed.entry_steps or 0
                fig.leave_points = timed.steps - (timed.entry_steps or 0)
                fig.storage_events = timed.storage_events
                for way, point in pairs:
                    await one(way, point)
                # Leftovers: gc with no grace, twice, collects every scratch key.
                for _ in range(2):
                    await collect_garbage(plain, grace_ms=0, now_ms=int(time.time() * 1000))
                left = await scratch_keys(plain)
                if left:
                    fig.failures.append(f"{kind}: {name}/{mode}: scratch keys left after "
                                        f"gc twice: {left}")
                fig.failures += [f"{kind}: {name}/{mode}: {p}" for p in
                                 await verify(scenario, plain, None, "after gc")]
    return figures


async def test_cancel_open_campaign(backend_kind: str,
                                    backend_factory: Callable[[str], apersist.Backend]) -> None:
    only = os.environ.get("APERSIST_CANCEL_OPEN_ONLY", CI_SCENARIOS.get(backend_kind))
    names = only.split(",") if only else list(SCENARIOS)
    points = budget(backend_kind)
    started = time.perf_counter()
    figures = await campaign(backend_kind, backend_factory, names, points)
    print(f"\ncancel-open campaign ({backend_kind}): points={points or 'every'} "
          f"elapsed={time.perf_counter() - started:.1f}s")
    for key, fig in figures.items():
        print(f"  {key:<16} entry points={fig.entry_points:>3} leave points={fig.leave_points:>3} "
              f"storage events={fig.storage_events:>3} trials={fig.trials:>4} "
              f"cancellations={dict(fig.cancellations)} sites={len(fig.sites)} "
              f"max scratch keys left={fig.scratch_left} failures={len(fig.failures)}")
    failures = [f for fig in figures.values() for f in fig.failures]
    assert not failures, f"{len(failures)} failed trials:\n" + "\n".join(failures[:40])


# ----------------------------------------------------------------------------- found by it
class SlowClosing:
    """The driver a run opens, whose ``aclose()`` takes a few loop turns (as an S3 client's
    does: its lock, then aiobotocore's exit stack) and says whether it got to the end."""

    def __init__(self, inner: Any, started: asyncio.Event) -> None:
        self.inner = inner
        self.name = inner.name
        self.capabilities = getattr(inner, "capabilities", None)
        self.started = started
        self.closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def aclose(self) -> None:
        self.started.set()
        for _ in range(5):
            await asyncio.sleep(0)
        await self.inner.aclose()
        self.closed = True


async def test_a_cancellation_does_not_interrupt_closing_the_runs_own_driver(
        backend_kind: str, backend: apersist.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run closes the driver it opened even when its task is cancelled while it closes it:
    once (the block left normally, the cancellation arriving during the close, as an
    ``asyncio.wait_for`` around the whole program expiring then), or again (two timeouts,
    a ``TaskGroup`` sibling failing during a cancellation's cleanup, a supervisor that
    insists). ``anyio.CancelScope(shield=True)`` does not stop asyncio's own
    ``Task.cancel()``, and an S3 driver interrupted there left its aiohttp session open
    (``ResourceWarning: Unclosed client session``) and its connections with it."""
    from apersist import _run

    made: list[SlowClosing] = []
    closing = asyncio.Event()

    def slow_open(backend: apersist.Backend, config: Any = None) -> SlowClosing:
        made.append(SlowClosing(open_driver(backend, config), closing))
        return made[-1]

    monkeypatch.setattr(_run, "open_driver", slow_open)
    for phase in ("closing", "entry", "leave"):
        closing.clear()
        body_entered = asyncio.Event()
        hold = asyncio.Event()

        async def lifetime(phase: str = phase, body_entered: asyncio.Event = body_entered,
                           hold: asyncio.Event = hold) -> None:
            async with apersist.run(apersist.Config(backend)) as run:
                await run.stream("s").record(phase)
                body_entered.set()
                if phase == "leave":
                    await hold.wait()  # cancelled here, then again while closing

        task = asyncio.create_task(lifetime())
        if phase == "entry":
            await asyncio.sleep(0)  # it has started opening: its first await point
            task.cancel()
        elif phase == "leave":
            await body_entered.wait()
            task.cancel()
        await closing.wait()  # the run is closing its driver: cancel it (once more)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert made[-1].closed, f"{phase}: a cancellation interrupted closing the driver"
    # The store opens normally afterwards: the block left normally committed its record.
    config = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(config) as run:
        assert [e.value async for e in run.stream("s").replay()] in (
            ["closing"], ["closing", "leave"])
