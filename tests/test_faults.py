"""Fault injection end to end: runs over ``RetryingDriver(FaultyDriver(real driver))``.

Transient faults (lost responses, timeouts, throttling, torn writes) are retried away: a
workload completes and the next, clean run replays every acknowledged event exactly. A
permanent fault ends the run with ``BackendError``, and the next clean run still replays
every event acknowledged before it, with no gap and no duplicate. Also: the FaultyDriver
itself, and the create-if-absent check a run makes before writing to an object store.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from conftest import make_backend
from helpers import CountingDriver, driver_for

import apersist
from apersist import BackendError, RetryPolicy
from apersist._drivers import (
    Driver,
    MemoryDriver,
    ObjectExistsError,
    TransientBackendError,
    open_driver,
)
from apersist._drivers.filesystem import FilesystemDriver
from apersist._drivers.probe import SCRATCH_PREFIX, verify_create_if_absent
from apersist._drivers.retry import RetryingDriver
from apersist.testing import FAULT_KINDS, Capabilities, FaultyDriver, check_driver

TRANSIENT = {"lost_response": 0.06, "timeout": 0.05, "throttle": 0.05, "torn_write": 0.05,
             "latency": 0.05}
# Generous attempts: with ~26% of calls failing, twenty in a row never happen.
POLICY = RetryPolicy(max_attempts=20, initial_backoff_s=0.0005, max_backoff_s=0.002)


async def _no_wait(_seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


class Faults:
    """Drivers for runs that go through ``RetryingDriver(FaultyDriver(real))``, as
    ``apersist.run(config, driver=faults.driver(config))``; ``close()`` closes them all.

    Besides the random faults, the rarer cases are planned once per run, so that every
    run meets them whatever the draws: its listings of commits and segments break off
    part-way, a commit record lands but its answer is lost, a segment upload is torn.
    An object store's own ``RetryingDriver`` is replaced by ours, around the faults.
    """

    def __init__(self, *, seed: int, **rates: float) -> None:
        self.seed = seed
        self.rates = rates
        self.made: list[FaultyDriver] = []

    def driver(self, config: apersist.Config) -> Driver:
        driver = open_driver(config.backend, config)
        if isinstance(driver, RetryingDriver):
            driver = driver.inner
        faulty = FaultyDriver(driver, seed=self.seed + len(self.made), **self.rates)
        # Format 4.0 lists a bucket of keys at a time: its prefix goes on past the folder.
        faulty.fail_next("list", "lost_response", key="writers/0/commits/*")
        faulty.fail_next("list", "lost_response", key="writers/0/segments/*")
        faulty.fail_next("put", "lost_response", key="writers/0/commits/*")
        faulty.fail_next("put", "torn_write", key="writers/0/segments/*")
        self.made.append(faulty)
        return RetryingDriver(faulty, POLICY, rng=random.Random(self.seed), sleep=_no_wait)

    async def close(self) -> None:
        for faulty in self.made:
            await faulty.aclose()


@pytest.fixture
async def faults() -> AsyncIterator[Callable[..., Faults]]:
    """Makes ``Faults``; closes every driver they made when the test ends."""
    made: list[Faults] = []

    def make(*, seed: int, **rates: float) -> Faults:
        made.append(Faults(seed=seed, **rates))
        return made[-1]

    yield make
    for each in made:
        await each.close()


def cfg(backend: apersist.Backend, **kwargs: Any) -> apersist.Config:
    return apersist.Config(backend, **kwargs)


async def replay_all(backend: apersist.Backend) -> tuple[list[Any], Any, dict[str, Any]]:
    """Events, offset and table state of a clean, read-only run."""
    config = cfg(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(config) as run:
        stream = run.stream("events")
        events = [e.value async for e in stream.replay()]
        return events, stream.offset, dict(await run.table("counts"))


# --------------------------------------------------------------------------- end to end

# Object stores run on real protocol servers (moto_server, Azurite): a smaller workload.
WORKLOAD = {"memory": (3, 6, 15), "filesystem": (3, 6, 15), "s3": (2, 3, 5), "azure": (2, 3, 5)}


@pytest.fixture(params=list(WORKLOAD))
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> apersist.Backend:
    return make_backend(store_kind, tmp_path, request)


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_transient_faults_are_retried_away(store_kind: str, store: apersist.Backend,
                                                 faults: Callable[..., Faults]) -> None:
    backend = store
    runs, batches, events = WORKLOAD[store_kind]
    faulty_runs = faults(seed=11, **TRANSIENT)
    made = faulty_runs.made
    recorded: list[Any] = []
    counts: dict[str, int] = {}
    for run_number in range(runs):
        config = cfg(backend)
        async with apersist.run(config, driver=faulty_runs.driver(config)) as run:
            stream = run.stream("events")
            # Each faulty run first replays, under faults, everything acknowledged before.
            assert [e.value async for e in stream.replay()] == recorded
            assert dict(await run.table("counts")) == counts
            table = await run.table("counts")
            for batch in range(batches):
                for i in range(events):
                    value = {"run": run_number, "batch": batch, "i": i}
                    await stream.record(value, offset=len(recorded) + 1)
                    recorded.append(value)
                    name = f"k{i % 4}"
                    table[name] = counts[name] = counts.get(name, 0) + 1
                info = await run.commit()
                assert info.seq >= 1
                assert stream.offset == len(recorded)  # acknowledged: durable now
            if run_number == 1:
                await run.compact()
    replayed, offset, table_state = await replay_all(backend)  # clean: the real driver
    assert len(made) == runs
    assert replayed == recorded
    assert offset == len(recorded)
    assert table_state == counts
    faults = {(op, kind) for faulty in made for op, _, kind in faulty.faults}
    assert faults >= {("list", "lost_response"), ("put", "lost_response"), ("put", "torn_write")}
    assert "permanent" not in {kind for _, kind in faults}
    if store_kind in ("memory", "filesystem"):  # enough calls for every random kind
        assert {kind for _, kind in faults} >= {"timeout", "throttle", "latency"}


SEGMENTS, COMMITS = "writers/*/segments/*", "writers/*/commits/*"


# A permanent fault on a segment upload and on the commit record; on the object stores,
# one of each (every run there costs real round trips).
@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
@pytest.mark.parametrize(("store_kind", "target"), [
    ("memory", SEGMENTS), ("memory", COMMITS), ("filesystem", SEGMENTS),
    ("filesystem", COMMITS), ("s3", COMMITS), ("azure", SEGMENTS)])
async def test_permanent_fault_ends_the_run_and_loses_nothing_acknowledged(
        store: apersist.Backend, faults: Callable[..., Faults], target: str) -> None:
    backend = store
    faulty_runs = faults(seed=5, **TRANSIENT)
    made = faulty_runs.made
    acknowledged: list[Any] = []
    recorded: list[Any] = []
    # A long interval: only our commit() calls commit, so "acknowledged" is exact.
    config = cfg(backend, snapshot_interval_ms=3_600_000)
    failures: list[BackendError] = []

    async def workload() -> None:
        nonlocal acknowledged
        async with apersist.run(config, driver=faulty_runs.driver(config)) as run:
            stream = run.stream("events")
            for batch in range(6):
                if batch == 4:
                    made[0].fail_next("put", "permanent", key=target)
                for i in range(10):
                    value = [batch, i]
                    await stream.record(value, offset=len(recorded) + 1)
                    recorded.append(value)
                try:
                    await run.commit()
                except BackendError as exc:
                    failures.append(exc)
                    break
                acknowledged = list(recorded)
            # The run can no longer persist: recording says so at once.
            with pytest.raises(BackendError):
                await stream.record("after the failure")

    with pytest.raises(BackendError) as left:  # leaving the block raises it again
        await workload()
    [failure] = failures
    assert type(failure) is BackendError
    assert "injected: permanent failure" in str(failure)
    assert left.value is failure
    assert ("put", "permanent") in {(op, kind) for op, _, kind in made[0].faults}
    assert len(acknowledged) == 40

    # The next runs are clean: the real driver.
    events, offset, _ = await replay_all(backend)
    assert events == acknowledged
    assert offset == len(acknowledged)
    # The store stays writable: a new run continues right after the last acknowledged event.
    async with apersist.run(cfg(backend)) as run:
        stream = run.stream("events")
        assert stream.offset == len(acknowledged)
        await stream.record("resumed", offset=len(acknowledged) + 1)
    events, offset, _ = await replay_all(backend)
    assert events == [*acknowledged, "resumed"]
    assert offset == len(acknowledged) + 1


async def test_retrying_faulty_memory_driver_passes_the_conformance_suite() -> None:
    # Torn writes are left out: a store that tears puts is not atomic for readers.
    made: list[FaultyDriver] = []

    async def make() -> Driver:
        faulty = FaultyDriver(MemoryDriver({}), seed=len(made), lost_response=0.1, timeout=0.1,
                              throttle=0.1, latency=0.05)
        made.append(faulty)
        return RetryingDriver(faulty, POLICY, rng=random.Random(0), sleep=_no_wait)

    await check_driver(make)
    faults = {(op, kind) for faulty in made for op, _, kind in faulty.faults}
    assert faults >= {(op, kind) for op in ("put", "get", "list", "delete")
                      for kind in ("lost_response", "timeout", "throttle", "latency")}


# --------------------------------------------------------------------------- FaultyDriver


async def _workload(driver: Driver) -> list[str]:
    """A fixed call sequence; returns each call's outcome."""
    outcomes = []
    for i in range(60):
        key = f"w/{i % 7}"
        try:
            if i % 3 == 0:
                await driver.put(key, b"data-%d" % i)
            elif i % 3 == 1:
                await driver.get(key)
            else:
                [info async for info in driver.list("w/")]
            outcomes.append("ok")
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    return outcomes


async def test_faulty_driver_is_deterministic() -> None:
    rates = {"lost_response": 0.1, "timeout": 0.1, "throttle": 0.1, "permanent": 0.05,
             "torn_write": 0.1, "latency": 0.05}
    runs = []
    for seed in (3, 3, 4):
        faulty = FaultyDriver(MemoryDriver({}), seed=seed, max_latency_s=0.001, **rates)
        outcomes = await _workload(faulty)
        runs.append((faulty.faults, outcomes))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]
    assert {kind for _, _, kind in runs[0][0]} == set(FAULT_KINDS)


async def test_faulty_driver_fault_kinds() -> None:
    inner = MemoryDriver({})
    faulty = FaultyDriver(inner, seed=1)
    # Lost response: done, yet the caller sees a transient error.
    faulty.fail_next("put", "lost_response")
    with pytest.raises(TransientBackendError, match="injected: lost response"):
        await faulty.put("a", b"payload")
    assert await inner.get("a") == b"payload"
    # Timeout and throttling: nothing done.
    for kind in ("timeout", "throttle"):
        faulty.fail_next("put", kind, key="b")
        with pytest.raises(TransientBackendError):
            await faulty.put("b", b"x")
        assert [i.key async for i in inner.list("b")] == []
    # Permanent: a plain BackendError, not a transient one.
    faulty.fail_next("get", "permanent")
    with pytest.raises(BackendError) as caught:
        await faulty.get("a")
    assert not isinstance(caught.value, TransientBackendError)
    # Torn write: a strict prefix is stored, then a transient error.
    faulty.fail_next("put", "torn_write")
    data = bytes(range(200))
    with pytest.raises(TransientBackendError, match="torn write"):
        await faulty.put("c", data)
    stored = await inner.get("c")
    assert len(stored) < len(data)
    assert data.startswith(stored)
    # Latency: the call is done.
    faulty.fail_next("delete", "latency")
    await faulty.delete(["c"])
    assert [i.key async for i in inner.list("c")] == []
    # A listing that breaks off part-way.
    for key in ("l/1", "l/2", "l/3", "l/4"):
        await inner.put(key, b"x")
    faulty.fail_next("list", "lost_response")
    seen: list[str] = []

    async def listing() -> None:
        async for info in faulty.list("l/"):
            seen.append(info.key)

    with pytest.raises(TransientBackendError):
        await listing()
    assert seen == ["l/1", "l/2", "l/3", "l/4"][:len(seen)]
    assert [kind for _, _, kind in faulty.faults] == [
        "lost_response", "timeout", "throttle", "permanent", "torn_write", "latency",
        "lost_response"]
    assert faulty.faults[0] == ("put", "a", "lost_response")


async def test_fail_next_targets_keys_and_can_last() -> None:
    inner = MemoryDriver({})
    faulty = FaultyDriver(inner)
    faulty.fail_next("put", key="x/*.seg", times=None)
    await faulty.put("x/a.json", b"1")  # does not match
    for _ in range(3):
        with pytest.raises(BackendError, match="permanent"):
            await faulty.put("x/a.seg", b"1")
    faulty.clear_planned()
    await faulty.put("x/a.seg", b"1")
    # Create-if-absent puts are never torn: a planned torn write waits for a plain put.
    faulty.fail_next("put", "torn_write")
    await faulty.put("y", b"whole", if_absent=True)
    assert await inner.get("y") == b"whole"
    with pytest.raises(TransientBackendError):
        await faulty.put("z", b"whole")
    with pytest.raises(ValueError, match="fault kind"):
        faulty.fail_next("put", "gremlins")
    with pytest.raises(ValueError, match="verb"):
        faulty.fail_next("copy")
    with pytest.raises(ValueError, match="torn"):
        faulty.fail_next("get", "torn_write")
    with pytest.raises(ValueError, match="add up"):
        FaultyDriver(inner, timeout=0.6, throttle=0.6)
    assert faulty.name == "memory"
    assert faulty.verify_conditional_writes is False
    assert faulty.capabilities == Capabilities()  # faults go verb by verb: no put_then_create


async def test_faulty_driver_without_faults_passes_the_conformance_suite() -> None:
    async def make() -> Driver:
        return FaultyDriver(MemoryDriver({}), seed=0)

    await check_driver(make)


# --------------------------------------------------------------------------- create-if-absent


class _IgnoresIfAbsent(MemoryDriver):
    """A store like s3rver: the condition is ignored, every create wins."""

    name = "ignores-if-absent"
    capabilities = Capabilities(verify_conditional_writes=True)  # as an object store's

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        await anyio.lowlevel.checkpoint()  # a request's round trip: the racers interleave
        await super().put(key, data)


class _RefusesEverything(MemoryDriver):
    name = "refuses-creates"

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if if_absent:
            raise ObjectExistsError(f"object already exists: key={key}")
        await super().put(key, data)


class _LoserOverwrites(MemoryDriver):
    """Refuses the second create, but only after storing its bytes."""

    name = "loser-overwrites"

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        existed = key in self._objects
        await super().put(key, data)
        if if_absent and existed:
            raise ObjectExistsError(f"object already exists: key={key}")


@pytest.fixture(params=["memory", "filesystem"])
def real_driver(request: pytest.FixtureRequest, tmp_path: Path) -> Driver:
    if request.param == "memory":
        return MemoryDriver({})
    return FilesystemDriver(tmp_path / "store")


async def test_verify_passes_on_honest_drivers(real_driver: Driver) -> None:
    await verify_create_if_absent(real_driver)
    await verify_create_if_absent(RetryingDriver(real_driver, POLICY))
    assert [info async for info in real_driver.list("")] == []  # the scratch keys are gone


async def test_verify_passes_under_transient_faults() -> None:
    inner = MemoryDriver({})
    for seed in range(20):
        faulty = FaultyDriver(inner, seed=seed, lost_response=0.3, timeout=0.1, throttle=0.1)
        await verify_create_if_absent(RetryingDriver(faulty, POLICY, sleep=_no_wait))
    assert [info async for info in inner.list("")] == []


@pytest.mark.parametrize(("driver_type", "problem"), [
    (_IgnoresIfAbsent, "2 of 2 racing if_absent puts of one new key succeeded"),
    (_RefusesEverything, "0 of 2 racing if_absent puts"),
    (_LoserOverwrites, "not the bytes of the put that succeeded"),
])
async def test_verify_refuses_broken_stores(driver_type: Callable[[dict[str, bytes]], Driver],
                                            problem: str) -> None:
    objects: dict[str, bytes] = {}
    with pytest.raises(BackendError) as caught:
        await verify_create_if_absent(driver_type(objects))
    message = str(caught.value)
    assert message.startswith("storage does not honour create-if-absent")
    assert problem in message
    assert f"driver={driver_type(objects).name}" in message
    assert f"key={SCRATCH_PREFIX}" in message
    assert objects == {}  # the scratch key is deleted either way


async def test_verify_passes_backend_failures_through() -> None:
    faulty = FaultyDriver(MemoryDriver({}))
    faulty.fail_next("put", "permanent", key=f"{SCRATCH_PREFIX}*", times=None)
    with pytest.raises(BackendError, match="injected: permanent failure"):
        await verify_create_if_absent(faulty)


async def test_run_refuses_a_store_that_ignores_if_absent() -> None:
    backend = apersist.Backend.memory()
    driver = RetryingDriver(_IgnoresIfAbsent(backend.objects))
    with pytest.raises(BackendError, match="storage does not honour create-if-absent"):
        async with apersist.run(cfg(backend), driver=driver):
            raise AssertionError("the run must not open")
    assert backend.objects == {}  # refused before writing anything: no epoch, no commit
    # A read-only run writes nothing, so it makes no check.
    events, _, _ = await replay_all(backend)
    assert events == []


async def test_run_checks_once_at_open_and_an_idle_run_stays_silent() -> None:
    backend = apersist.Backend.memory()
    counting = CountingDriver(open_driver(backend))
    counting.capabilities = Capabilities(verify_conditional_writes=True)  # as an object store's
    async with apersist.run(cfg(backend), driver=RetryingDriver(counting, POLICY)) as run:
        checks = [key for verb, key in counting.keys if key.startswith(SCRATCH_PREFIX)]
        assert [verb for verb, key in counting.keys if key.startswith(SCRATCH_PREFIX)] == [
            "put", "put", "get", "delete"]
        assert len(set(checks)) == 1
        await run.stream("s").record(1)
        await run.commit()
        counting.reset()
        await run.commit()  # nothing new to commit
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        assert counting.requests == 0
    assert not any(key.startswith(SCRATCH_PREFIX) for key in backend.objects)


async def test_memory_and_filesystem_runs_make_no_check(tmp_path: Path) -> None:
    made: list[CountingDriver] = []
    for backend in (apersist.Backend.memory(), apersist.Backend.filesystem(tmp_path / "s")):
        config = cfg(backend)
        async with driver_for(config, CountingDriver) as driver, \
                apersist.run(config, driver=driver):
            made.append(driver)
    for driver in made:
        assert isinstance(driver, CountingDriver)
        assert not any(key.startswith(SCRATCH_PREFIX) for _, key in driver.keys)
