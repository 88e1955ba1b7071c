"""Cancel a call at each await point it passes: the machinery of ``test_cancellation.py``.

``SteppingTask`` is asyncio's pure-Python ``Task`` that counts its steps: a coroutine that
suspends S times runs in S + 1 steps. Planned with ``cancel_at=k``, it asks for a
cancellation right after its k-th step, while it is suspended at its k-th await point
(``k=0``: before it starts), by whichever ``Way`` the test chose (``task.cancel()``,
``asyncio.timeout``, anyio's ``CancelScope``, a failing ``TaskGroup`` sibling). It records
where each suspension happened (the innermost apersist frame: ``site``) and at which step
a cancellation was actually delivered, so that a campaign knows which await points it hit,
not just how many times it cancelled. Counting steps instead of event-loop iterations
keeps the points the same on every backend: a call waiting for a server passes many loop
iterations at one await point.

``PausingDriver`` wraps a run's driver so that every storage call suspends its caller
right before and right after the call: the memory store's calls never suspend, and on
the other stores this makes every call's start and end an await point of its own. It
tells ``listeners`` first, so that a test can cancel a task there: at the j-th storage
call's start or end, whichever task makes it (a commit's uploads run in tasks of their
own, and may run in the scheduler's task rather than in the caller's).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import anyio.lowlevel
from helpers import driver_for

import apersist
from apersist._drivers import Driver, ObjectInfo
from apersist._drivers.base import capabilities_of

PACKAGE_DIR = str(Path(apersist.__file__).parent)
TESTS_DIR = str(Path(__file__).parent.parent)  # tests/, above this support folder


def _frames(awaitable: object) -> list[FrameType]:
    """The frames of a suspended coroutine chain, outermost first.

    Follows coroutines, async generators (through the ``asend``/``athrow`` object a
    coroutine awaits) and generator-based awaitables down to the future at the bottom.
    """
    frames: list[FrameType] = []
    obj: object = awaitable
    for _ in range(256):
        frame: FrameType | None
        if inspect.iscoroutine(obj):
            frame, obj = obj.cr_frame, obj.cr_await
        elif inspect.isasyncgen(obj):
            frame, obj = obj.ag_frame, obj.ag_await
        elif inspect.isgenerator(obj):
            frame, obj = obj.gi_frame, obj.gi_yieldfrom
        elif type(obj).__name__ in ("async_generator_asend", "async_generator_athrow"):
            # These do not expose their generator; the garbage collector's view does.
            gens = [r for r in gc.get_referents(obj) if inspect.isasyncgen(r)]
            frame, obj = None, (gens[0] if gens else None)
        else:
            break
        if frame is not None:
            frames.append(frame)
        if obj is None:
            break
    return frames


def site_of(coro: object) -> str:
    """Where a suspended coroutine waits: its innermost apersist frame (``file:line
    function``), else its innermost frame of the tests, else ``elsewhere``."""
    frames = _frames(coro)
    for prefix, root in ((PACKAGE_DIR, Path(PACKAGE_DIR).parent), (TESTS_DIR, Path(TESTS_DIR).parent)):
        ours = [f for f in frames if f.f_code.co_filename.startswith(prefix)]
        if ours:
            f = ours[-1]
            path = Path(f.f_code.co_filename).relative_to(root)
            return f"{path}:{f.f_lineno} {f.f_code.co_name}"
    return "elsewhere"


class SteppingTask(asyncio.tasks._PyTask):  # type: ignore[name-defined,misc]
    """A task that counts its steps and notes where it suspends.

    ``on_step(task)`` runs once when the task is made (``task.steps == 0``: it has not
    started) and after each step that leaves it suspended (``task.steps`` is then the
    number of the await point it waits at): the place to ask for a cancellation.
    ``delivered`` is the number of the await point at which a cancellation reached the
    coroutine (``0``: before it started), or ``None``; ``delivered_site`` is where.
    """

    def __init__(self, coro: Coroutine[Any, Any, Any], *,
                 on_step: Callable[[SteppingTask], None] | None = None, **kwargs: Any) -> None:
        self.steps = 0
        self.sites: list[str] = []  # sites[i]: where the task waited after step i + 1
        self.delivered: int | None = None
        self.delivered_site: str | None = None
        self.on_step = on_step
        kwargs.setdefault("loop", asyncio.get_running_loop())
        super().__init__(coro, **kwargs)
        if on_step is not None:
            on_step(self)

    def _Task__step(self, exc: BaseException | None = None) -> None:  # asyncio calls its step _Task__step
        if self.delivered is None and (self._must_cancel or isinstance(exc, asyncio.CancelledError)):
            self.delivered = self.steps
            self.delivered_site = self.sites[-1] if self.sites else "before it started"
        super()._Task__step(exc)
        if self.done():
            return
        self.steps += 1
        self.sites.append(site_of(self.get_coro()))
        if self.on_step is not None:
            self.on_step(self)


def spread(items: list[Any]) -> list[Any]:
    """``items`` reordered so that every prefix is spread over them: middle, ends, then
    the middles of the gaps."""
    if not items:
        return []
    order = [len(items) // 2, 0, len(items) - 1]
    gaps = [(0, len(items) // 2), (len(items) // 2, len(items) - 1)]
    while gaps:
        lo, hi = gaps.pop(0)
        if hi - lo > 1:
            mid = (lo + hi) // 2
            order.append(mid)
            gaps += [(lo, mid), (mid, hi)]
    seen: set[int] = set()
    return [items[i] for i in order if not (i in seen or seen.add(i))]  # type: ignore[func-returns-value]


class SiblingFailed(Exception):
    """What the failing sibling of the ``taskgroup`` way raises."""


_Task = TypeVar("_Task", bound=SteppingTask)


def at_step(k: float | None, action: Callable[[_Task], None]) -> Callable[[_Task], None]:
    """An ``on_step`` that runs ``action(task)`` when the task waits at await point ``k``."""
    def on_step(task: _Task) -> None:
        if task.steps == k:
            action(task)
    return on_step


async def in_failing_taskgroup(make: Callable[[], Coroutine[Any, Any, Any]], point: float | None,
                               task_type: type[_Task]) -> tuple[_Task, asyncio.Future[Any]]:
    """The ``taskgroup`` way: ``make()`` in a ``task_type`` inside a ``TaskGroup`` whose
    other task fails (``SiblingFailed``) once the first waits at await point ``point``,
    so that the group cancels it. Returns that task and the group's future."""
    loop = asyncio.get_running_loop()
    trigger = loop.create_future()

    async def sibling() -> None:
        if await trigger:  # False: the call ended before reaching the point
            raise SiblingFailed("the sibling task failed")

    made: list[_Task] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> _Task:
        task = task_type(coro, loop=loop, on_step=at_step(
            point, lambda t: trigger.done() or trigger.set_result(True)), **kwargs)
        task.add_done_callback(lambda t: trigger.done() or trigger.set_result(False))
        made.append(task)
        return task

    async def group() -> None:
        async with asyncio.TaskGroup() as tg:
            previous = loop.get_task_factory()
            loop.set_task_factory(factory)  # type: ignore[arg-type]
            try:
                tg.create_task(make())
            finally:
                loop.set_task_factory(previous)
            tg.create_task(sibling())

    outer = asyncio.ensure_future(group())
    await asyncio.sleep(0)  # the group has made its tasks
    return made[0], outer


#: Called by every ``PausingDriver`` call with ``(op, key, "start")`` before it and
#: ``(op, key, "end")`` after it, right before its caller suspends there (set by a test).
listeners: list[Callable[[str, str, str], None]] = []


def _note(op: str, key: str, when: str) -> None:
    for listener in listeners:
        listener(op, key, when)


class PausingDriver:
    """Wraps a driver: every call suspends its caller once before and once after it,
    right after telling ``listeners``."""

    def __init__(self, inner: Driver) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0
        # The wrapped driver's capabilities: its put_then_create is used when that offers one.
        self.capabilities = capabilities_of(inner)

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self.calls += 1
        _note("put", key, "start")
        await anyio.lowlevel.checkpoint()
        await self.inner.put(key, data, if_absent=if_absent)
        _note("put", key, "end")
        await anyio.lowlevel.checkpoint()

    async def put_then_create(self, puts: Sequence[tuple[str, bytes | bytearray]], key: str,
                               data: bytes) -> None:
        self.calls += 1
        _note("put_then_create", key, "start")
        await anyio.lowlevel.checkpoint()
        await self.inner.put_then_create(puts, key, data)  # type: ignore[attr-defined]
        _note("put_then_create", key, "end")
        await anyio.lowlevel.checkpoint()

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        self.calls += 1
        _note("get", key, "start")
        await anyio.lowlevel.checkpoint()
        data = await self.inner.get(key, start=start, end=end)
        _note("get", key, "end")
        await anyio.lowlevel.checkpoint()
        return data

    async def sizes(self, keys: Sequence[str]) -> dict[str, int]:
        """Point lookups, when the wrapped driver has them (``Capabilities.point_lookups``)."""
        self.calls += 1
        _note("sizes", ",".join(keys[:3]), "start")
        await anyio.lowlevel.checkpoint()
        found: dict[str, int] = await self.inner.sizes(keys)  # type: ignore[attr-defined]
        _note("sizes", ",".join(keys[:3]), "end")
        await anyio.lowlevel.checkpoint()
        return found

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        self.calls += 1
        _note("list", prefix, "start")
        await anyio.lowlevel.checkpoint()
        async for info in self.inner.list(prefix):
            yield info
        _note("list", prefix, "end")
        await anyio.lowlevel.checkpoint()

    async def delete(self, keys: Sequence[str]) -> None:
        self.calls += 1
        _note("delete", ",".join(keys), "start")
        await anyio.lowlevel.checkpoint()
        await self.inner.delete(keys)
        _note("delete", ",".join(keys), "end")
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def pausing_run(config: apersist.Config) -> AsyncIterator[apersist.Run]:
    """``apersist.run(config)`` over a ``PausingDriver`` around the driver it would open."""
    async with driver_for(config, PausingDriver) as driver, \
            apersist.run(config, driver=driver) as run:
        yield run
