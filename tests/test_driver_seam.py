"""The public driver seam: ``apersist.run(config, driver=...)``.

A driver given to a run is the run's storage, used as it is (no retry layer added, the
create-if-absent check only if the driver asks for it) and never closed by the run; an
object without the protocol's members is refused with ``TypeError`` at the call. The
test kit's ``FaultyDriver`` plugs in here, on every backend. Settling an ambiguous create
is the retry layer's alone: the store takes "exists" as the answer.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio.lowlevel
import pytest
from helpers import CountingDriver, counting, values

import apersist
from apersist import RetryPolicy
from apersist._drivers import open_driver
from apersist._drivers.probe import SCRATCH_PREFIX
from apersist._drivers.retry import RetryingDriver
from apersist.testing import (
    Capabilities,
    FaultyDriver,
    ObjectExistsError,
    ObjectInfo,
    SimulatedCrash,
)

QUIET = 3_600_000  # only our commit() calls commit
POLICY = RetryPolicy(max_attempts=10, initial_backoff_s=0.0005, max_backoff_s=0.002)


async def _no_wait(_seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


def _cfg(backend: apersist.Backend, **kwargs: Any) -> apersist.Config:
    return apersist.Config(backend, snapshot_interval_ms=QUIET, **kwargs)


# --------------------------------------------------------------------------- used as given


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_a_given_driver_is_the_runs_storage(backend: apersist.Backend) -> None:
    cfg = _cfg(backend)
    async with counting(cfg) as driver:
        async with apersist.run(cfg, driver=driver) as run:
            opened = driver.requests
            assert opened > 0  # loading the store and taking the writer role went through it
            await run.stream("s").record("a", offset=1)
            await run.commit()
            assert driver.requests > opened
        puts = [key for verb, key in driver.keys if verb == "put"]
        assert any("/epochs/" in key for key in puts)
        assert any("/commits/" in key for key in puts)
        assert any(key.endswith(".seg") for key in puts)
        # Used as it is: no create-if-absent check (a CountingDriver does not ask for one).
        assert not any(key.startswith(SCRATCH_PREFIX) for _, key in driver.keys)
    assert await values(backend, "s") == ["a"]  # a run over the backend's own driver


async def test_the_given_driver_replaces_the_configs_backend() -> None:
    """``config.backend`` is only named; everything goes to the driver's storage."""
    named, real = apersist.Backend.memory(), apersist.Backend.memory()
    driver = open_driver(real)
    async with apersist.run(_cfg(named), driver=driver) as run:
        assert run.config.backend is named
        await run.stream("s").record("x")
    assert named.objects == {}
    assert real.objects
    assert await values(real, "s") == ["x"]


class _AsksForTheCheck(CountingDriver):
    capabilities = Capabilities(verify_conditional_writes=True)


async def test_the_create_if_absent_check_runs_only_when_the_driver_asks() -> None:
    backend = apersist.Backend.memory()
    asking = _AsksForTheCheck(open_driver(backend))
    async with apersist.run(_cfg(backend), driver=asking):
        pass
    assert [verb for verb, key in asking.keys if key.startswith(SCRATCH_PREFIX)] == [
        "put", "put", "get", "delete"]
    silent = CountingDriver(open_driver(backend))
    async with apersist.run(_cfg(backend), driver=silent):
        pass
    assert not any(key.startswith(SCRATCH_PREFIX) for _, key in silent.keys)
    # Read-only runs write nothing, so they make no check whatever the driver says.
    asking.reset()
    async with apersist.run(apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY),
                            driver=asking):
        pass
    assert not any(key.startswith(SCRATCH_PREFIX) for _, key in asking.keys)


# --------------------------------------------------------------------------- refused at the call


class _NoList:
    name = "no-list"

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        raise AssertionError("never called")

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        raise AssertionError("never called")

    async def delete(self, keys: Sequence[str]) -> None:
        raise AssertionError("never called")

    async def aclose(self) -> None:
        raise AssertionError("never called")


class _NumberForAName(_NoList):
    name = 7  # type: ignore[assignment]

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        raise AssertionError("never called")


@pytest.mark.parametrize(("bad", "missing"), [
    (object(), "name,put,get,list,delete,aclose"),
    ("memory", "name,put,get,list,delete,aclose"),
    (apersist.Backend.memory(), "name,put,get,list,delete,aclose"),
    (_NoList(), "list"),
    (_NumberForAName(), "name"),
])
def test_an_object_that_is_no_driver_is_refused_at_the_call(bad: object, missing: str) -> None:
    backend = apersist.Backend.memory()
    with pytest.raises(TypeError, match="driver must follow the driver protocol") as caught:
        apersist.run(_cfg(backend), driver=bad)  # type: ignore[arg-type]
    assert f"missing={missing} got={type(bad).__name__}" in str(caught.value)
    assert backend.objects == {}


def test_run_refuses_bad_arguments_at_the_call() -> None:
    """Every argument is checked when ``run()`` is called, before the block is entered."""
    with pytest.raises(TypeError, match=r"needs an apersist\.Config"):
        apersist.run("memory")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock_ms must be callable"):
        apersist.run(_cfg(apersist.Backend.memory()), clock_ms=5)  # type: ignore[arg-type]


async def test_driver_none_is_the_backends_own_driver() -> None:
    backend = apersist.Backend.memory()
    async with apersist.run(_cfg(backend), driver=None) as run:
        await run.stream("s").record(1)
    assert await values(backend, "s") == [1]


# --------------------------------------------------------------------------- the caller closes it


class _Closing(CountingDriver):
    """Counts ``aclose`` and, once closed, refuses every verb (as the S3 driver does)."""

    closed = False

    async def aclose(self) -> None:
        await super().aclose()
        self.closed = True

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        assert not self.closed, "put after aclose"
        await super().put(key, data, if_absent=if_absent)

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        assert not self.closed, "get after aclose"
        return await super().get(key, start=start, end=end)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        assert not self.closed, "list after aclose"
        async for info in super().list(prefix):
            yield info


async def test_the_run_never_closes_a_given_driver_and_it_serves_runs_in_turn(
        backend: apersist.Backend) -> None:
    cfg = _cfg(backend)
    async with contextlib.aclosing(_Closing(open_driver(backend, cfg))) as driver:
        async with apersist.run(cfg, driver=driver) as run:
            await run.stream("s").record(1)
        assert driver.calls["aclose"] == 0
        with pytest.raises(RuntimeError, match="by the body"):  # noqa: PT012 (left by the body's error)
            async with apersist.run(cfg, driver=driver) as run:
                await run.stream("s").record(2)
                raise RuntimeError("by the body")
        assert driver.calls["aclose"] == 0
        async with apersist.run(cfg, driver=driver) as run:  # the same driver, a third run
            assert [e.value async for e in run.stream("s").replay()] == [1, 2]
        assert driver.calls["aclose"] == 0
    assert driver.calls["aclose"] == 1  # closed once: by its owner


async def test_a_run_that_fails_to_open_leaves_the_given_driver_open() -> None:
    backend = apersist.Backend.memory()
    faulty = FaultyDriver(open_driver(backend))
    faulty.fail_next("list", "permanent")  # the first thing opening does: read the log
    driver = _Closing(faulty)
    with pytest.raises(apersist.BackendError, match="injected: permanent failure"):
        async with apersist.run(_cfg(backend), driver=driver):
            raise AssertionError("the run must not open")
    assert driver.calls["aclose"] == 0
    async with apersist.run(_cfg(backend), driver=driver) as run:  # still usable
        await run.stream("s").record("after")
    assert await values(backend, "s") == ["after"]


# --------------------------------------------------------------------------- the testing kit


async def test_a_faulty_driver_crashes_a_run_and_the_next_one_finds_the_durable_commits(
        backend: apersist.Backend) -> None:
    """The docs' example, on every backend: the commit record lands, the writer never hears."""
    cfg = _cfg(backend)
    crashes: list[str] = []
    async with contextlib.aclosing(FaultyDriver(open_driver(backend, cfg))) as faulty:
        # Counted from now: the 1st commit record is the fence written while opening.
        faulty.crash_at("after_commit_put", nth=3, on_crash=crashes.append)
        with pytest.raises(SimulatedCrash):  # noqa: PT012 (leaving the crashed run fails too)
            async with apersist.run(cfg, driver=faulty) as run:
                for i in range(3):
                    await run.stream("s").record(i, offset=i)
                    await run.commit()  # our 2nd commit lands, then "the process dies"
        assert crashes == ["after_commit_put"]
        assert faulty.crashed == "after_commit_put"
    async with apersist.run(cfg) as run:
        stream = run.stream("s")
        assert [e.value async for e in stream.replay()] == [0, 1]
        assert stream.offset == 1


async def test_a_permanent_fault_of_a_given_driver_ends_the_run(backend: apersist.Backend) -> None:
    cfg = _cfg(backend)
    async with contextlib.aclosing(FaultyDriver(open_driver(backend, cfg))) as faulty:
        with pytest.raises(apersist.BackendError, match="injected: permanent failure"):  # noqa: PT012
            async with apersist.run(cfg, driver=faulty) as run:
                await run.stream("s").record("kept")
                await run.commit()
                faulty.fail_next("put", "permanent", key="writers/*/commits/*", times=None)
                await run.stream("s").record("lost")
                await run.commit()
        assert ("put", "permanent") in {(op, kind) for op, _, kind in faulty.faults}
    assert await values(backend, "s") == ["kept"]


async def test_a_retrying_faulty_driver_rides_out_lost_replies_of_every_create() -> None:
    """Each epoch and commit record's first attempt lands but its reply is lost: the retry
    layer reads the object back and settles it; the run never sees a failure."""
    backend = apersist.Backend.memory()
    faulty = FaultyDriver(open_driver(backend), seed=3)
    driver = RetryingDriver(faulty, POLICY, rng=random.Random(0), sleep=_no_wait)
    faulty.fail_next("put", "lost_response", key="writers/0/epochs/*")
    faulty.fail_next("put", "lost_response", key="writers/0/commits/*")  # the fence commit
    async with apersist.run(_cfg(backend), driver=driver) as run:
        for i in range(3):
            faulty.fail_next("put", "lost_response", key="writers/0/commits/*")
            await run.stream("s").record(i, offset=i)
            assert (await run.commit()).deltas == 1
        faulty.fail_next("put", "lost_response", key="writers/0/commits/*")
        await run.stream("s").record(3, offset=3)  # committed by leaving the block
    lost = [key for op, key, kind in faulty.faults if kind == "lost_response"]
    assert len(lost) == 6  # the epoch record, the fence, three commits and the final one
    assert sum("/epochs/" in key for key in lost) == 1
    assert await values(backend, "s") == [0, 1, 2, 3]


# --------------------------------------------------------------------------- one owner


class _ReportsOwnCreateAsTaken(CountingDriver):
    """A driver that retries a commit record's create inside itself and does not settle
    it: the first attempt lands, the second meets "exists", and that is reported."""

    armed = False

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        await super().put(key, data, if_absent=if_absent)
        if self.armed and if_absent and "/commits/" in key:
            self.armed = False
            raise ObjectExistsError(f"object already exists: key={key}")

    @property
    def gets(self) -> list[str]:
        return [key for verb, key in self.keys if verb == "get"]


async def test_the_store_leaves_settling_an_ambiguous_create_to_the_driver() -> None:
    """The retry layer is the one owner: the store takes "exists" as another writer's
    answer and reads nothing back to second-guess it (a driver that retries creates on
    its own must settle them). Nothing is lost: the record is durable."""
    backend = apersist.Backend.memory()
    driver = _ReportsOwnCreateAsTaken(open_driver(backend))
    with pytest.raises(apersist.FencedError):  # noqa: PT012 (leaving the fenced run raises it again)
        async with apersist.run(_cfg(backend), driver=driver) as run:
            await run.stream("s").record("durable", offset=1)
            driver.armed = True
            with pytest.raises(apersist.FencedError, match="epoch=1 current=1"):
                await run.commit()
    (commit_key,) = {key for key in driver.gets if "/commits/" in key}
    assert driver.gets.count(commit_key) == 1  # the fence message's read of the epoch, only
    assert await values(backend, "s") == ["durable"]
