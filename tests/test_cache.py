"""``@apersist.cached``: sync and async, across runs, single-flight, versions, names, worker threads."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections import Counter
from typing import Any

import anyio
import anyio.to_thread
import pytest

import apersist


def counted() -> tuple[Counter[Any], Any, Any]:
    """A call counter plus a sync and an async cached function that use it."""
    calls: Counter[Any] = Counter()

    @apersist.cached
    def double(x: Any) -> Any:
        calls[("sync", repr(x))] += 1
        return {"double": x * 2}

    @apersist.cached
    async def triple(x: Any) -> Any:
        calls[("async", repr(x))] += 1
        await anyio.lowlevel.checkpoint()
        return [x * 3]

    return calls, double, triple


def test_sync_stays_sync_and_async_stays_async() -> None:
    _, double, triple = counted()
    assert not inspect.iscoroutinefunction(double)
    assert inspect.iscoroutinefunction(triple)
    assert double.__name__ == "double"
    assert triple.__name__ == "triple"
    assert double(2) == {"double": 4}  # a plain value, not an awaitable


def test_outside_a_run_it_just_calls() -> None:
    calls, double, triple = counted()
    assert double(1) == {"double": 2}
    assert double(1) == {"double": 2}
    assert anyio.run(triple, 1) == [3]
    assert anyio.run(triple, 1) == [3]
    assert calls == {("sync", "1"): 2, ("async", "1"): 2}

    @apersist.cached
    def identity(x: Any) -> Any:
        return x

    # Nothing is checked either: the function is just called.
    token = object()
    assert identity(token) is token


async def test_outside_a_run_in_async_code_it_just_calls() -> None:
    calls, _, triple = counted()
    assert await triple(2) == [6]
    assert await triple(2) == [6]
    assert calls[("async", "2")] == 2


async def test_a_repeated_call_returns_the_stored_result_in_this_run_and_later_ones(
        backend: apersist.Backend) -> None:
    calls, double, triple = counted()
    async with apersist.run(apersist.Config(backend)) as run:
        assert double(5) == {"double": 10}
        assert double(5) == {"double": 10}
        assert await triple(5) == [15]
        assert await triple(5) == [15]
        assert double(6) == {"double": 12}
        assert calls == {("sync", "5"): 1, ("async", "5"): 1, ("sync", "6"): 1}
        assert run.stats["cache_hits"] == 2
    async with apersist.run(apersist.Config(backend)) as run:
        assert double(5) == {"double": 10}
        assert await triple(5) == [15]
        assert double(6) == {"double": 12}
        assert await triple(7) == [21]
    assert calls == {("sync", "5"): 1, ("async", "5"): 1, ("sync", "6"): 1, ("async", "7"): 1}
    async with apersist.run(apersist.Config(backend)):
        assert await triple(7) == [21]
    assert calls[("async", "7")] == 1


async def test_keyword_and_positional_arguments_make_the_key(backend: apersist.Backend) -> None:
    seen: list[Any] = []

    @apersist.cached
    def combine(a: int, b: int = 0, *, c: int = 0) -> int:
        seen.append((a, b, c))
        return a * 100 + b * 10 + c

    async with apersist.run(apersist.Config(backend)):
        assert combine(1, b=2, c=3) == 123
        assert combine(1, c=3, b=2) == 123  # keyword order does not matter
        assert combine(1, 2, c=3) == 123   # a different call shape is a different key
        assert combine(3, b=2, c=1) == 321
    assert seen == [(1, 2, 3), (1, 2, 3), (3, 2, 1)]


async def test_concurrent_equal_async_calls_run_the_function_once(
        backend: apersist.Backend) -> None:
    calls = 0
    release = anyio.Event()

    @apersist.cached
    async def slow(x: int) -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return x + 1

    results: list[int] = []

    async def call(x: int) -> None:
        results.append(await slow(x))

    async with apersist.run(apersist.Config(backend)):
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(call, 41)
            await anyio.wait_all_tasks_blocked()
            assert calls == 1
            release.set()
        assert results == [42] * 10
        assert calls == 1
        assert await slow(41) == 42
        assert calls == 1


async def test_a_failing_call_is_not_stored_and_concurrent_waiters_share_the_error(
        backend: apersist.Backend) -> None:
    calls = 0
    release = anyio.Event()
    errors: list[BaseException] = []

    @apersist.cached
    async def flaky(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()
            raise LookupError("transient")
        return x

    async def call() -> None:
        try:
            await flaky(1)
        except LookupError as exc:
            errors.append(exc)

    async with apersist.run(apersist.Config(backend)):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            release.set()
        assert len(errors) == 3
        assert calls == 1
        assert await flaky(1) == 1
        assert calls == 2
        assert await flaky(1) == 1
        assert calls == 2


async def test_changing_the_version_invalidates_old_entries(backend: apersist.Backend) -> None:
    calls: list[int] = []

    def make(version: int) -> Any:
        @apersist.cached(name="scorer", version=version)
        def score(x: int) -> int:
            calls.append(version)
            return x * version

        return score

    v1 = make(1)
    async with apersist.run(apersist.Config(backend)):
        assert v1(10) == 10
    v2 = make(2)
    async with apersist.run(apersist.Config(backend)):
        assert v2(10) == 20
        assert v2(10) == 20
        assert v1(10) == 10  # the old version's entry is still its own
    assert calls == [1, 2]


async def test_name_is_the_identity_of_the_entries(backend: apersist.Backend) -> None:
    @apersist.cached(name="geocode")
    async def geocode_v1(address: str) -> dict[str, Any]:
        return {"address": address, "lat": 1.5}

    async with apersist.run(apersist.Config(backend)):
        assert await geocode_v1("main st") == {"address": "main st", "lat": 1.5}

    @apersist.cached(name="geocode")
    async def geocode_other(address: str) -> dict[str, Any]:
        raise AssertionError("must be answered from the cache")

    @apersist.cached(name="geocode-2")
    async def geocode_renamed(address: str) -> dict[str, Any]:
        return {"renamed": True}

    async with apersist.run(apersist.Config(backend)):
        assert await geocode_other("main st") == {"address": "main st", "lat": 1.5}
        assert await geocode_renamed("main st") == {"renamed": True}


def first(x: int) -> str:
    return "first"


def second(x: int) -> str:
    return "second"


async def test_the_default_name_is_module_and_qualname(backend: apersist.Backend) -> None:
    one = apersist.cached(first)
    two = apersist.cached(second)
    same_as_one = apersist.cached(name=f"{first.__module__}.{first.__qualname__}")(second)
    async with apersist.run(apersist.Config(backend)):
        assert one(1) == "first"
        assert two(1) == "second"
        assert same_as_one(1) == "first"


async def test_unserializable_arguments_raise_type_error(backend: apersist.Backend) -> None:
    calls: Counter[str] = Counter()

    @apersist.cached
    def sync_fn(x: Any) -> int:
        calls["sync"] += 1
        return 1

    @apersist.cached
    async def async_fn(x: Any) -> int:
        calls["async"] += 1
        return 1

    async with apersist.run(apersist.Config(backend)):
        with pytest.raises(TypeError):
            sync_fn(object())
        with pytest.raises(TypeError):
            await async_fn({1, 2})
        with pytest.raises(TypeError):
            sync_fn(x=b"bytes")
    assert calls == {}


async def test_unserializable_results_raise_type_error_and_are_not_stored(
        backend: apersist.Backend) -> None:
    calls: Counter[str] = Counter()

    @apersist.cached
    def sync_fn(x: int) -> Any:
        calls["sync"] += 1
        return object() if calls["sync"] == 1 else x

    @apersist.cached
    async def async_fn(x: int) -> Any:
        calls["async"] += 1
        return float("nan") if calls["async"] == 1 else x

    async with apersist.run(apersist.Config(backend)):
        with pytest.raises(TypeError):
            sync_fn(1)
        with pytest.raises(TypeError):
            await async_fn(1)
        assert sync_fn(1) == 1
        assert await async_fn(1) == 1
        assert sync_fn(1) == 1
        assert await async_fn(1) == 1
    assert calls == {"sync": 2, "async": 2}
    async with apersist.run(apersist.Config(backend)):
        assert sync_fn(1) == 1
        assert await async_fn(1) == 1
    assert calls == {"sync": 2, "async": 2}


def test_bad_decorator_arguments() -> None:
    with pytest.raises(ValueError, match="name"):
        apersist.cached(name="bad name")
    with pytest.raises(TypeError):
        apersist.cached(version="2")  # type: ignore[arg-type]


async def test_the_cache_belongs_to_the_run_whose_block_it_is(backend: apersist.Backend) -> None:
    calls, double, _ = counted()
    async with apersist.run(apersist.Config(backend)):
        double(1)
    double(1)  # outside: just called
    assert calls[("sync", "1")] == 2
    async with apersist.run(apersist.Config(backend)):
        double(1)
    assert calls[("sync", "1")] == 2


async def test_a_none_result_is_cached_too(backend: apersist.Backend) -> None:
    calls: list[int] = []

    @apersist.cached(name="returns-none")
    async def nothing(x: int) -> None:
        calls.append(x)

    for _ in range(2):
        async with apersist.run(apersist.Config(backend)):
            assert await nothing(1) is None
            assert await nothing(1) is None
    assert calls == [1]


# ----------------------------------------------------------------------------- worker threads
async def test_sync_cached_function_in_a_worker_thread_is_persisted() -> None:
    calls: list[int] = []

    @apersist.cached(name="square-in-thread")
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)):
        assert await anyio.to_thread.run_sync(square, 7) == 49
    async with apersist.run(apersist.Config(backend)):
        assert await anyio.to_thread.run_sync(square, 7) == 49
    assert calls == [7]


async def test_a_sync_call_finishing_in_a_thread_after_the_run_ended_raises_in_no_callback() -> None:
    """The thread hands its entry to the loop; once the run has ended it is not persisted,
    and nothing raises in the loop's callback (which asyncio would log as an error)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    @apersist.cached(name="slow-in-thread")
    def slow(x: int) -> int:
        calls.append(x)
        started.set()
        release.wait(10)
        return x + 1

    backend = apersist.Backend.memory()
    results: list[int] = []

    async def call_in_thread() -> None:
        results.append(await anyio.to_thread.run_sync(slow, 1))

    try:
        async with anyio.create_task_group() as tg:
            async with apersist.run(apersist.Config(backend)):
                tg.start_soon(call_in_thread)  # in the run's context: its cache
                await anyio.to_thread.run_sync(started.wait, 10)
            release.set()  # the run has ended: the call finishes now
        # The thread handed its entry over before its result, so the callback has run.
        await anyio.sleep(0.01)
    finally:
        loop.set_exception_handler(None)
    assert results == [2]
    assert reported == []
    async with apersist.run(apersist.Config(backend)):
        assert await anyio.to_thread.run_sync(slow, 1) == 2  # not persisted: called again
    assert calls == [1, 1]


def test_a_sync_call_finishing_in_a_thread_after_the_loop_closed_returns_its_result() -> None:
    """Handing the entry to a closed loop raises in the thread; the call returns anyway."""
    started, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    @apersist.cached(name="slow-after-the-loop")
    def slow(x: int) -> int:
        started.set()
        release.wait(10)
        return x + 1

    def call() -> None:
        try:
            outcome.append(slow(1))
        except BaseException as exc:  # what the thread's caller would get
            outcome.append(exc)

    async def main() -> threading.Thread:
        async with apersist.run(apersist.Config(apersist.Backend.memory())):
            thread = threading.Thread(target=contextvars.copy_context().run, args=(call,))
            thread.start()
            await anyio.to_thread.run_sync(started.wait, 10)
        return thread

    thread = asyncio.run(main())  # closes its loop
    release.set()
    thread.join(10)
    assert outcome == [2]
