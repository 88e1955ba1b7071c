"""RetryingDriver against a scripted inner driver, with injected randomness, sleep and clock."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import anyio
import pytest

from apersist import BackendError, RetryPolicy
from apersist._drivers import (
    MemoryDriver,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    TransientBackendError,
)
from apersist._drivers.retry import RetryingDriver
from apersist.testing import Capabilities

# One scripted outcome of a call: "ok" (do it), "hang" (never answer), "land" (do it, then
# lose the answer), an exception to raise without doing anything, or a coroutine function
# to run first (then raise TransientBackendError): somebody else acting meanwhile.
Outcome = str | BaseException | Callable[[], Awaitable[None]]


class ScriptedDriver:
    """A memory store whose calls follow a script of outcomes, then succeed."""

    name = "scripted"

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.store = MemoryDriver({})
        self.calls: list[tuple[str, str]] = []
        self.closed = 0

    async def _step(self, op: str, key: str, do: Callable[[], Awaitable[object]]) -> object:
        self.calls.append((op, key))
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if outcome == "hang":
            await anyio.sleep_forever()
        if outcome == "land":
            await do()
            raise TransientBackendError(f"scripted: lost response op={op} key={key}")
        if isinstance(outcome, BaseException):
            raise outcome
        if callable(outcome):
            await outcome()
            raise TransientBackendError(f"scripted: failed while others acted op={op} key={key}")
        return await do()

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        await self._step("put", key, lambda: self.store.put(key, data, if_absent=if_absent))

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        data = await self._step("get", key, lambda: self.store.get(key, start=start, end=end))
        assert isinstance(data, bytes)
        return data

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        self.calls.append(("list", prefix))
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        return self._list(prefix, outcome)

    async def _list(self, prefix: str, outcome: Outcome) -> AsyncIterator[ObjectInfo]:
        # An int outcome n: yield the first n objects, then fail (a dropped connection).
        infos = [info async for info in self.store.list(prefix)]
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, str) and outcome.isdigit():
            for info in infos[:int(outcome)]:
                yield info
            raise TransientBackendError("scripted: connection dropped mid-listing")
        for info in infos:
            yield info

    async def delete(self, keys: Sequence[str]) -> None:
        await self._step("delete", ",".join(keys), lambda: self.store.delete(keys))

    async def aclose(self) -> None:
        self.closed += 1


class FakeTime:
    """An injected clock and sleep: sleeping moves the clock, instantly."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class MaxRandom(random.Random):
    """Full jitter at its ceiling: ``uniform(a, b)`` returns ``b``."""

    def uniform(self, a: float, b: float) -> float:
        return b


def transient(n: int) -> list[Outcome]:
    return [TransientBackendError(f"throttled #{i}") for i in range(n)]


def retrying(inner: ScriptedDriver, time: FakeTime, *, rng: random.Random | None = None,
             **policy: float) -> RetryingDriver:
    settings: dict[str, float] = {"max_attempts": 5, "initial_backoff_s": 0.1,
                                  "max_backoff_s": 1.0} | policy
    return RetryingDriver(inner, RetryPolicy(**settings),  # type: ignore[arg-type]
                          rng=rng or random.Random(0), sleep=time.sleep, clock=time.clock)


# --------------------------------------------------------------------------- basics


async def test_retries_transient_errors_then_succeeds() -> None:
    inner, time = ScriptedDriver(*transient(2)), FakeTime()
    driver = retrying(inner, time)
    await inner.store.put("k", b"value")
    assert await driver.get("k") == b"value"
    assert inner.calls == [("get", "k")] * 3
    assert len(time.slept) == 2
    await driver.put("k2", b"v2")
    assert await inner.store.get("k2") == b"v2"


async def test_gives_up_after_max_attempts_chaining_the_last_error() -> None:
    errors = transient(10)
    inner, time = ScriptedDriver(*errors), FakeTime()
    driver = retrying(inner, time, max_attempts=4)
    with pytest.raises(BackendError) as caught:
        await driver.put("a/key", b"x")
    exc = caught.value
    assert type(exc) is BackendError  # plain: not retried again by anyone above
    assert exc.__cause__ is errors[3]
    message = str(exc)
    assert "after 4 attempts over" in message
    for fact in ("op=put", "key=a/key", "driver=scripted", "max_attempts=4"):
        assert fact in message
    assert len(inner.calls) == 4
    assert len(time.slept) == 3


async def test_total_timeout_bounds_the_retries() -> None:
    # Delays at their ceiling: 0.4 after the first failure, then 0.8, which would end at
    # 1.2s > 1.0s: the retry gives up after two attempts instead of sleeping past the bound.
    inner, time = ScriptedDriver(*transient(100)), FakeTime()
    driver = retrying(inner, time, rng=MaxRandom(), max_attempts=100, initial_backoff_s=0.4,
                      max_backoff_s=10.0, total_timeout_s=1.0)
    with pytest.raises(BackendError) as caught:
        await driver.get("k")
    assert type(caught.value) is BackendError
    assert "after 2 attempts over 0.40s" in str(caught.value)
    assert len(inner.calls) == 2
    assert time.slept == [0.4]


async def test_a_sleep_that_overruns_the_total_timeout_ends_the_retries() -> None:
    inner, time = ScriptedDriver(*transient(5)), FakeTime()

    async def oversleep(seconds: float) -> None:
        time.now += seconds + 5.0  # the process was descheduled for a while

    driver = RetryingDriver(inner, RetryPolicy(total_timeout_s=2.0), rng=random.Random(0),
                            sleep=oversleep, clock=time.clock)
    with pytest.raises(BackendError, match="after 1 attempt over"):
        await driver.get("k")
    assert len(inner.calls) == 1


async def test_attempt_timeout_counts_as_transient() -> None:
    inner, time = ScriptedDriver("hang"), FakeTime()
    driver = retrying(inner, time, attempt_timeout_s=0.02)
    await driver.put("k", b"v")
    assert inner.calls == [("put", "k")] * 2
    assert await inner.store.get("k") == b"v"
    assert len(time.slept) == 1


async def test_attempts_that_all_time_out_end_in_backend_error() -> None:
    inner, time = ScriptedDriver("hang", "hang"), FakeTime()
    driver = retrying(inner, time, attempt_timeout_s=0.01, max_attempts=2)
    with pytest.raises(BackendError) as caught:
        await driver.get("k")
    cause = caught.value.__cause__
    assert isinstance(cause, TransientBackendError)
    assert "timed out" in str(cause)
    assert "after 2 attempts" in str(caught.value)


@pytest.mark.parametrize("error", [
    BackendError("access denied"),
    ObjectNotFoundError("object not found: key=k"),
    ValueError("invalid object key"),
])
async def test_other_errors_pass_straight_through(error: Exception) -> None:
    inner, time = ScriptedDriver(error), FakeTime()
    driver = retrying(inner, time)
    with pytest.raises(type(error)) as caught:
        await driver.get("k")
    assert caught.value is error
    assert inner.calls == [("get", "k")]
    assert time.slept == []


async def test_object_exists_is_not_retried_nor_read_back() -> None:
    # No earlier attempt failed, so an existing object cannot be ours, even with our bytes.
    inner, time = ScriptedDriver(), FakeTime()
    driver = retrying(inner, time)
    await inner.store.put("k", b"same")
    with pytest.raises(ObjectExistsError):
        await driver.put("k", b"same", if_absent=True)
    assert inner.calls == [("put", "k")]
    assert time.slept == []


async def test_cancellation_is_not_retried() -> None:
    inner, time = ScriptedDriver("hang"), FakeTime()
    driver = retrying(inner, time)
    with anyio.move_on_after(0.02) as scope:
        await driver.get("k")
    assert scope.cancelled_caught
    assert inner.calls == [("get", "k")]
    assert time.slept == []


# --------------------------------------------------------------------------- ambiguous create


async def test_ambiguous_create_that_landed_succeeds() -> None:
    inner, time = ScriptedDriver("land"), FakeTime()
    driver = retrying(inner, time)
    await driver.put("commit/1", b"ours, token=abc", if_absent=True)
    # The first attempt landed, the second met the object and read it back.
    assert inner.calls == [("put", "commit/1"), ("put", "commit/1"), ("get", "commit/1")]
    assert await inner.store.get("commit/1") == b"ours, token=abc"


async def test_ambiguous_create_after_an_attempt_timeout_succeeds() -> None:
    async def land_then_hang() -> None:
        await inner.store.put("commit/1", b"ours", if_absent=True)
        await anyio.sleep_forever()

    inner, time = ScriptedDriver(land_then_hang), FakeTime()
    driver = retrying(inner, time, attempt_timeout_s=0.02)
    await driver.put("commit/1", b"ours", if_absent=True)
    assert [op for op, _ in inner.calls] == ["put", "put", "get"]


async def test_ambiguous_create_lost_to_another_writer_raises_exists() -> None:
    async def another_writer_creates() -> None:
        await inner.store.put("commit/1", b"theirs", if_absent=True)

    inner, time = ScriptedDriver(another_writer_creates), FakeTime()
    driver = retrying(inner, time)
    with pytest.raises(ObjectExistsError):
        await driver.put("commit/1", b"ours", if_absent=True)
    assert [op for op, _ in inner.calls] == ["put", "put", "get"]
    assert await inner.store.get("commit/1") == b"theirs"


async def test_ambiguous_create_whose_object_vanished_raises_exists() -> None:
    inner, time = ScriptedDriver("land"), FakeTime()
    inner.outcomes.append("ok")  # the second put meets the object ...

    async def vanish_then_read(key: str, *, start: int | None = None,
                               end: int | None = None) -> bytes:
        await inner.store.delete([key])  # ... which is deleted before the read-back
        return await inner.store.get(key)

    driver = retrying(inner, time)
    inner.get = vanish_then_read  # type: ignore[method-assign]
    with pytest.raises(ObjectExistsError):
        await driver.put("commit/1", b"ours", if_absent=True)


# --------------------------------------------------------------------------- backoff


async def test_backoff_is_full_jitter_within_bounds() -> None:
    inner, time = ScriptedDriver(*transient(8)), FakeTime()
    driver = retrying(inner, time, rng=random.Random(42), max_attempts=8, initial_backoff_s=0.1,
                      max_backoff_s=1.0)
    with pytest.raises(BackendError):
        await driver.get("k")
    ceilings = [min(1.0, 0.1 * 2 ** n) for n in range(7)]
    assert len(time.slept) == 7
    assert all(0 <= d <= c for d, c in zip(time.slept, ceilings, strict=True))
    # Exactly uniform(0, ceiling) drawn from the injected rng, in order: reproducible.
    replay = random.Random(42)
    assert time.slept == [replay.uniform(0, c) for c in ceilings]


async def test_backoff_ceiling_doubles_and_caps() -> None:
    inner, time = ScriptedDriver(*transient(8)), FakeTime()
    driver = retrying(inner, time, rng=MaxRandom(), max_attempts=8, initial_backoff_s=0.1,
                      max_backoff_s=1.0)
    with pytest.raises(BackendError):
        await driver.get("k")
    assert time.slept == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


async def test_retries_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    inner, time = ScriptedDriver(*transient(2)), FakeTime()
    driver = retrying(inner, time)
    with caplog.at_level(logging.DEBUG, logger="apersist"):
        await driver.delete(["x/a", "x/b"])
    lines = [r for r in caplog.records if "retrying storage request" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.DEBUG, logging.WARNING]
    message = lines[1].getMessage()
    for fact in ("op=delete", "key=x/a,x/b", "attempt=2", "delay_s=", "throttled #1"):
        assert fact in message


# --------------------------------------------------------------------------- list


async def _keys(driver: RetryingDriver, prefix: str = "") -> list[str]:
    return [info.key async for info in driver.list(prefix)]


async def test_list_resumes_after_the_last_key_without_duplicates() -> None:
    inner, time = ScriptedDriver("3", "5", TransientBackendError("throttled")), FakeTime()
    keys = [f"p/{i:02d}" for i in range(8)]
    for key in keys:
        await inner.store.put(key, b"x")
    driver = retrying(inner, time)
    assert await _keys(driver, "p/") == keys
    assert inner.calls == [("list", "p/")] * 4
    assert len(time.slept) == 3


async def test_list_gives_up_after_max_attempts() -> None:
    inner, time = ScriptedDriver("1", "1", "1"), FakeTime()
    for key in ("a", "b", "c"):
        await inner.store.put(key, b"x")
    driver = retrying(inner, time, max_attempts=3)
    seen: list[str] = []

    async def listing() -> None:
        async for info in driver.list(""):
            seen.append(info.key)

    with pytest.raises(BackendError) as caught:
        await listing()
    assert seen == ["a"]  # what was yielded stays yielded, once
    assert "after 3 attempts" in str(caught.value)
    assert "op=list" in str(caught.value)
    assert isinstance(caught.value.__cause__, TransientBackendError)


async def test_list_passes_permanent_errors_through() -> None:
    error = BackendError("access denied")
    inner, time = ScriptedDriver(error), FakeTime()
    driver = retrying(inner, time)
    with pytest.raises(BackendError) as caught:
        await _keys(driver)
    assert caught.value is error
    assert time.slept == []


async def test_list_stops_early_when_the_consumer_does() -> None:
    inner, time = ScriptedDriver(), FakeTime()
    for key in ("a", "b", "c"):
        await inner.store.put(key, b"x")
    driver = retrying(inner, time)
    listing = driver.list("")
    assert (await listing.__anext__()).key == "a"
    await listing.aclose()  # type: ignore[attr-defined]
    assert inner.calls == [("list", "")]


# --------------------------------------------------------------------------- the wrapper


async def test_wrapper_keeps_the_inner_name_and_closes_it() -> None:
    inner = ScriptedDriver()
    driver = RetryingDriver(inner, RetryPolicy())
    assert driver.name == "scripted"
    # The wrapped driver's need for the create-if-absent check and its taking buffers, and
    # nothing more: it retries verb by verb, so it never offers put_then_create.
    assert driver.capabilities == Capabilities()
    everything = ScriptedDriver()
    everything.capabilities = Capabilities(  # type: ignore[attr-defined]
        put_then_create=True, accepts_buffers=True, verify_conditional_writes=True)
    assert RetryingDriver(everything).capabilities == Capabilities(
        accepts_buffers=True, verify_conditional_writes=True)
    await driver.aclose()
    await driver.aclose()
    assert inner.closed == 2


async def test_ranged_get_is_passed_on() -> None:
    inner, time = ScriptedDriver(TransientBackendError("reset")), FakeTime()
    await inner.store.put("k", b"0123456789")
    driver = retrying(inner, time)
    assert await driver.get("k", start=2, end=5) == b"234"


async def test_a_long_listing_that_keeps_progressing_never_times_out() -> None:
    """The retry budget counts from the last key that arrived, not from the start."""
    import anyio

    from apersist import RetryPolicy
    from apersist._drivers.memory import MemoryDriver
    from apersist._drivers.retry import RetryingDriver

    inner = MemoryDriver({})
    for i in range(6):
        await inner.put(f"k/{i}", b"x")
    driver = RetryingDriver(inner, RetryPolicy(total_timeout_s=0.05, attempt_timeout_s=0.05))
    keys = []
    async for info in driver.list("k/"):
        keys.append(info.key)
        await anyio.sleep(0.03)  # the caller is slow: 6 x 30 ms is well past 50 ms
    assert keys == [f"k/{i}" for i in range(6)]
