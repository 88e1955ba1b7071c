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
           "gather_bounded", "unwrap_group"]

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

    try:
        async with anyio.create_task_group() as tg:
            for index in range(len(calls)):
                tg.start_soon(one, index)
    except BaseExceptionGroup as group:
        failures = [e for e in _leaves(group) if not isinstance(e, anyio.get_cancelled_exc_class())]
        error = failures[0] if failures else unwrap_group(group)
    else:
        return results  # type: ignore[return-value]
    # Raised outside the ``except``: ``raise error from None`` there set the error's own
    # ``__cause__`` to None, so a BackendError lost the OSError behind it (its errno) when
    # it came out of a group (opening a store whose root cannot be listed, say), and a
    # plain ``raise error`` there would chain the group as its context. Here it is raised
    # as it was made.
    raise error


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
