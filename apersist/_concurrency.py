"""Small structured-concurrency helpers: calls run concurrently within a bound, whose first
failure is raised bare, and the checks a run's tasks make on cancellations and exception
groups."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import anyio

_T = TypeVar("_T")

__all__ = ["brisk_thread_switching", "cancelled_by_another_task", "current_task_getter",
           "gather_bounded", "run_to_the_end", "unwrap_group"]

#: The interpreter's switch interval while worker threads do a run's file I/O.
BRISK_SWITCH_S = 0.0005
_brisk_users = 0
_brisk_saved: float | None = None


@contextlib.contextmanager
def brisk_thread_switching() -> Iterator[None]:
    """While a worker thread does a run's file I/O, shorten the interpreter's switch interval.

    A worker thread writing a file takes the GIL back after each system call (open, write,
    fsync, rename), and while the event loop's thread runs Python without a pause (a
    source loop over buffered input), each take waits out the whole switch interval
    (5 ms by default): a commit's few dozen system calls then took 100-250 ms, and a
    periodic commit every 100 ms fell behind. At 0.5 ms it takes about 40 ms. Set while at
    least one such call is in flight, restored after the last one, and only if it was
    longer and nobody has changed it meanwhile.
    """
    global _brisk_users, _brisk_saved
    if _brisk_users == 0:
        current = sys.getswitchinterval()
        _brisk_saved = current if current > BRISK_SWITCH_S else None
        if _brisk_saved is not None:
            sys.setswitchinterval(BRISK_SWITCH_S)
    _brisk_users += 1
    try:
        yield
    finally:
        _brisk_users -= 1
        if _brisk_users == 0 and _brisk_saved is not None:
            # Python stores the interval in microseconds: compare at that precision.
            if round(sys.getswitchinterval() * 1e6) == round(BRISK_SWITCH_S * 1e6):
                sys.setswitchinterval(_brisk_saved)
            _brisk_saved = None


def current_task_getter() -> Callable[[], asyncio.Task[Any] | None]:
    """``asyncio.current_task`` for the running loop, as cheap as it can be had.

    On Python 3.11 ``asyncio.current_task()`` costs about 250 ns: it asks for the running
    loop, and ``get_running_loop`` makes a ``getpid`` system call there. A source asks once
    per event, so it reads asyncio's table of current tasks for its own loop instead (the
    table that function reads); from 3.12 the function is C and cheap, and is used as is.
    """
    tasks = getattr(asyncio.tasks, "_current_tasks", None)
    if sys.version_info < (3, 12) and isinstance(tasks, dict):
        return functools.partial(tasks.get, asyncio.get_running_loop())
    return asyncio.current_task


def cancelled_by_another_task() -> bool:
    """Inside an ``except`` of a cancellation: whether it came from outside every anyio
    cancel scope of this task (another task's ``Task.cancel()``), not from the run ending.

    The run's background tasks end themselves on such a cancellation instead of letting it
    cancel the run's task group, which would end the run's block early and silently.
    """
    return anyio.current_effective_deadline() != -math.inf


async def run_to_the_end(call: Callable[[], Awaitable[_T]]) -> _T:
    """Await ``call()`` to its end even if the calling task is cancelled meanwhile, then
    re-raise that cancellation.

    ``anyio.CancelScope(shield=True)`` keeps anyio's cancellations out, but not asyncio's own
    ``Task.cancel()``: a second cancellation of a task that is cleaning up after a first
    one (two timeouts, a ``TaskGroup`` whose sibling fails meanwhile, a supervisor that
    insists) interrupts a shielded ``await`` all the same. ``call()`` therefore runs in a
    task of its own, which nobody else cancels, and the caller waits for it whatever
    reaches the caller. For cleanup that must not be cut short: closing a driver, whose
    HTTP session would otherwise stay open.
    """
    task = asyncio.ensure_future(call())
    interrupted: BaseException | None = None
    with anyio.CancelScope(shield=True):  # anyio's cancellations do not even reach us
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError as exc:
                interrupted = exc
    if interrupted is not None:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller sees
        raise interrupted
    return task.result()


def unwrap_group(exc: BaseException) -> BaseException:
    """The single leaf of nested one-member exception groups, else ``exc`` itself.

    Task groups wrap every failure in an ``ExceptionGroup``; apersist promises plain
    exceptions (a ``FencedError`` is never wrapped), so one-member groups are peeled.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def gather_bounded(calls: Sequence[Callable[[], Awaitable[_T]]], limit: int) -> list[_T]:
    """Run ``calls`` concurrently, at most ``limit`` at once; return their results in order.

    The first failure cancels the rest and is raised as itself (not as a group).
    """
    if len(calls) == 1:
        return [await calls[0]()]
    results: list[_T | None] = [None] * len(calls)
    limiter = anyio.CapacityLimiter(max(1, limit))

    async def one(index: int) -> None:
        async with limiter:
            results[index] = await calls[index]()

    failure: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            for index in range(len(calls)):
                tg.start_soon(one, index)
    except BaseExceptionGroup as group:
        failures = [e for e in _leaves(group) if not isinstance(e, anyio.get_cancelled_exc_class())]
        failure = failures[0] if failures else unwrap_group(group)
    if failure is not None:
        # Raised outside the handler, so that it keeps its own cause (a BackendError's
        # OSError) and does not gain the group as its context; ``raise ... from None``
        # would have erased the cause.
        raise failure
    return results  # type: ignore[return-value]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
