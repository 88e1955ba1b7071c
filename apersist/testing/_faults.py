"""``FaultyDriver``: a driver wrapper that injects faults and crashes at named steps of
commits, of taking the writer role and of maintenance."""

from __future__ import annotations

import builtins
import fnmatch
import os
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio

from .. import _format as fmt
from .._drivers.base import (
    Capabilities,
    Driver,
    ObjectInfo,
    TransientBackendError,
    capabilities_of,
)
from .._errors import BackendError, PersistenceError

__all__ = ["CRASH_POINTS", "FAULT_KINDS", "FaultyDriver", "SimulatedCrash"]

#: Every kind of fault :class:`FaultyDriver` injects, in the order its rates are applied:
#:
#: - ``lost_response``: the call is done, then the caller sees ``TransientBackendError``
#:   (a timeout after the request landed); a listing breaks off part-way instead.
#: - ``timeout``: ``TransientBackendError`` and nothing is done.
#: - ``throttle``: a definite, throttling-like ``TransientBackendError``; nothing is done.
#: - ``permanent``: a plain ``BackendError``; nothing is done.
#: - ``latency``: the call is done after an added delay (``anyio.sleep``).
#: - ``torn_write``: a plain ``put`` stores only a prefix of the data, then
#:   ``TransientBackendError``. Create-if-absent puts are never torn: every supported store
#:   makes them atomic, and a torn create could never be repaired by a retry.
FAULT_KINDS: Final = ("lost_response", "timeout", "throttle", "permanent", "latency", "torn_write")

_VERBS: Final = ("put", "get", "list", "delete")

#: Every named step at which :class:`FaultyDriver` can crash (see :meth:`FaultyDriver.crash_at`).
#: The driver tells the steps apart by the kind of object a ``put`` writes:
#:
#: - ``after_segment_put``: a segment upload has landed.
#: - ``mid_commit``: the commit's segments are partly uploaded: a segment upload is about to
#:   start after another has landed since the last commit record, or one has landed while
#:   another is still in flight.
#: - ``torn_segment``: a prefix of a segment lands under its key (as on a store without
#:   atomic puts), then the crash.
#: - ``before_commit_put`` / ``after_commit_put``: around the write of a commit record
#:   (``after``: durable, but the writer never hears so).
#: - ``before_epoch_put`` / ``after_epoch_put``: around the epoch record of a writer taking
#:   over the store.
#:
#: And the steps of maintenance (``apersist._maintenance``: merging, retention, checkpoints):
#:
#: - ``before_rewrite_commit_put``: every segment of a commit that carries ``rewrites`` has
#:   landed (the merged or retained segments among them), its record has not: the steps
#:   of ``before_commit_put``, counted only for such commits.
#: - ``after_rewrite_commit_put``: that commit record has landed, before anything after it
#:   (``run.compact()``'s checkpoint comes next).
#: - ``after_checkpoint_put``: a checkpoint object has landed.
CRASH_POINTS: Final = ("after_segment_put", "mid_commit", "torn_segment", "before_commit_put",
                       "after_commit_put", "before_epoch_put", "after_epoch_put",
                       "before_rewrite_commit_put", "after_rewrite_commit_put",
                       "after_checkpoint_put")
# The points that need a commit record decoded: does it carry rewrites?
_REWRITE_POINTS: Final = frozenset(("before_rewrite_commit_put", "after_rewrite_commit_put"))



def _has_rewrites(key: str, data: bytes | bytearray) -> bool:
    """Whether the commit record ``data`` carries rewrites (false if it does not decode:
    the driver's own tests write commit-shaped keys with any bytes)."""
    try:
        return bool(fmt.CommitRecord.decode(key, bytes(data)).rewrites)
    except PersistenceError:
        return False


class SimulatedCrash(BackendError):
    """Raised by every call of a :class:`FaultyDriver` that has crashed in-process.

    A call made after the crash does nothing: the storage stays as the crash left it, as if
    the process had been killed at that instant. A call already in flight when the crash
    happened may still land (and then raises this), like a request that a server had
    received before the process died.
    """


def _kill_this_process(point: str) -> None:
    # SIGKILL, not exit(): no cleanup, no flush, no finally block runs: a real kill -9.
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(slots=True)
class _PlannedFault:
    op: str
    kind: str
    pattern: str | None
    times: int | None  # None: every matching call from now on

    def matches(self, op: str, key: str, *, tearable: bool) -> bool:
        if op != self.op or (self.kind == "torn_write" and not tearable):
            return False
        return self.pattern is None or fnmatch.fnmatchcase(key, self.pattern)


class FaultyDriver:
    """Wraps any driver and injects faults into its calls, reproducibly.

    Each call of ``put``/``get``/``list``/``delete`` (those named in ``ops``) draws from a
    ``random.Random(seed)`` at the moment it is made, before it awaits anything: with
    probability ``lost_response``, ``timeout``, ``throttle``, ``permanent``, ``latency`` or
    ``torn_write`` it suffers that fault (see :data:`FAULT_KINDS`), otherwise it passes
    through. The same seed and the same sequence of calls give the same faults. Faults
    planned with :meth:`fail_next` come first and draw nothing. Every injected fault is
    appended to :attr:`faults` as ``(op, key, kind)`` (a listing's key is its prefix, a
    delete's its keys joined by ``,``), so a test can assert that they happened.

    Wrap it in ``RetryingDriver`` to test the retry layer and everything above it::

        faulty = FaultyDriver(MemoryDriver({}), seed=7, lost_response=0.1, throttle=0.1)
        driver = RetryingDriver(faulty, RetryPolicy(initial_backoff_s=0.001))
    """

    def __init__(self, inner: Driver, *, seed: int = 0, lost_response: float = 0.0,
                 timeout: float = 0.0, throttle: float = 0.0, permanent: float = 0.0,
                 latency: float = 0.0, torn_write: float = 0.0, max_latency_s: float = 0.005,
                 ops: Iterable[str] = _VERBS) -> None:
        rates = {"lost_response": lost_response, "timeout": timeout, "throttle": throttle,
                 "permanent": permanent, "latency": latency, "torn_write": torn_write}
        for kind, rate in rates.items():
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
                raise ValueError(f"a fault rate is a probability in [0, 1]: {kind}={rate!r}")
        if sum(rates.values()) > 1:
            raise ValueError(f"fault rates add up to more than 1: total={sum(rates.values())}")
        if not 0 <= max_latency_s < float("inf"):
            raise ValueError(f"max_latency_s must be finite and >= 0: max_latency_s={max_latency_s}")
        self._ops = frozenset(ops)
        if unknown := self._ops - set(_VERBS):
            raise ValueError(f"unknown driver verbs: ops={sorted(unknown)} known={list(_VERBS)}")
        self.inner = inner
        self.name: str = inner.name
        #: Every injected fault, in order: ``(op, key, kind)``.
        self.faults: builtins.list[tuple[str, str, str]] = []
        #: While false, no random faults are drawn (planned ones still happen).
        self.enabled = True
        self._rates = rates
        self._max_latency_s = float(max_latency_s)
        self._rng = random.Random(seed)
        self._planned: builtins.list[_PlannedFault] = []
        self._crash_point: str | None = None
        self._crash_countdown = 0
        self._on_crash: Callable[[str], object] = _kill_this_process
        self._segments_landed = 0  # since the last commit record
        self._segments_in_flight = 0
        #: The crash point this driver crashed at, once it has (in-process crashes only).
        self.crashed: str | None = None

    def __repr__(self) -> str:
        return f"FaultyDriver({self.inner!r}, faults={len(self.faults)})"

    @property
    def capabilities(self) -> Capabilities:
        """The wrapped driver's ``verify_conditional_writes`` (injecting faults does not
        change the storage), and nothing else: faults are injected verb by verb, so this
        wrapper does not offer ``put_then_create``."""
        return Capabilities(
            verify_conditional_writes=capabilities_of(self.inner).verify_conditional_writes)

    @property
    def verify_conditional_writes(self) -> bool:
        """The wrapped driver's answer (``capabilities.verify_conditional_writes``)."""
        return self.capabilities.verify_conditional_writes

    def fail_next(self, op: str, kind: str = "permanent", *, key: str | None = None,
                  times: int | None = 1) -> None:
        """Make the next ``times`` calls of ``op`` (on keys matching ``key``) fail with ``kind``.

        ``key`` is a glob pattern (``fnmatch``, where ``*`` also matches ``/``), or None for
        any key; a listing matches on its prefix, a delete if any of its keys matches.
        ``times=None`` makes every matching call from now on fail. A planned ``torn_write``
        applies to plain puts only. Raises ``ValueError`` for an unknown verb or kind.
        """
        if op not in _VERBS:
            raise ValueError(f"unknown driver verb: op={op!r} known={list(_VERBS)}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind: kind={kind!r} known={list(FAULT_KINDS)}")
        if kind == "torn_write" and op != "put":
            raise ValueError(f"only a put can be torn: op={op!r}")
        if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
            raise ValueError(f"times must be a positive int or None: times={times!r}")
        self._planned.append(_PlannedFault(op, kind, key, times))

    def clear_planned(self) -> None:
        """Forget every fault planned with :meth:`fail_next` that has not happened yet."""
        self._planned.clear()

    # ---------------------------------------------------------------- crashing
    def crash_at(self, point: str, *, nth: int = 1,
                 on_crash: Callable[[str], object] | None = None) -> None:
        """Crash the ``nth`` time the step ``point`` (one of :data:`CRASH_POINTS`) is reached.

        By default the crash kills this process with SIGKILL, at that instant. Pass
        ``on_crash`` to be called instead (with the point's name); the driver then
        :meth:`freeze`-s, so the call that crashed and every later one raise
        :class:`SimulatedCrash` and change nothing. Counting starts now; a later call
        replaces the plan. Raises ``ValueError`` for an unknown point or a bad ``nth``.
        """
        if point not in CRASH_POINTS:
            raise ValueError(f"unknown crash point: point={point!r} known={list(CRASH_POINTS)}")
        if isinstance(nth, bool) or not isinstance(nth, int) or nth < 1:
            raise ValueError(f"nth must be a positive int: nth={nth!r}")
        self._crash_point = point
        self._crash_countdown = nth
        self._on_crash = _kill_this_process if on_crash is None else on_crash

    def freeze(self, point: str = "now") -> None:
        """Crash in-process now: every later call raises :class:`SimulatedCrash`, doing nothing."""
        if self.crashed is None:
            self.crashed = point

    def _check_alive(self, op: str, key: str) -> None:
        if self.crashed is not None:
            raise SimulatedCrash(f"injected: the process crashed: op={op} key={key} "
                                 f"point={self.crashed} driver={self.name}")

    def _due(self, point: str) -> bool:
        """Count one arrival at ``point``: true if the planned crash is due here, now."""
        if self._crash_point != point:
            return False
        self._crash_countdown -= 1
        return self._crash_countdown == 0

    def _crash(self, point: str, key: str) -> None:
        self._crash_point = None
        self._on_crash(point)  # by default never returns
        self.freeze(point)
        self._check_alive("put", key)

    def _at(self, point: str, key: str) -> None:
        if self._due(point):
            self._crash(point, key)

    # ---------------------------------------------------------------- deciding
    def _decide(self, op: str, keys: Sequence[str], *, tearable: bool = False) -> str | None:
        """The fault this call suffers, if any; recorded in ``faults``. Never awaits."""
        shown = ",".join(keys)
        kind: str | None = None
        for plan in self._planned:
            if any(plan.matches(op, key, tearable=tearable) for key in keys or [""]):
                kind = plan.kind
                if plan.times is not None:
                    plan.times -= 1
                    if plan.times == 0:
                        self._planned.remove(plan)
                break
        else:
            if self.enabled and op in self._ops:
                draw = self._rng.random()
                for candidate in FAULT_KINDS:
                    rate = self._rates[candidate]
                    if draw < rate:
                        kind = candidate
                        break
                    draw -= rate
                if kind == "torn_write" and not tearable:
                    kind = None  # only plain puts tear; this draw passes
        if kind is not None:
            self.faults.append((op, shown, kind))
        return kind

    def _error(self, op: str, key: str, kind: str) -> BackendError:
        facts = f"op={op} key={key} driver={self.name}"
        if kind == "permanent":
            return BackendError(f"injected: permanent failure: {facts}")
        reason = {"lost_response": "lost response", "timeout": "timed out, nothing done",
                  "throttle": "throttled, slow down", "torn_write": "torn write"}[kind]
        return TransientBackendError(f"injected: {reason}: {facts}")

    async def _apply(self, op: str, key: str, kind: str | None,
                     call: Callable[[], Awaitable[Any]], latency_s: float) -> Any:
        if kind is None:
            return await call()
        if kind == "latency":
            await anyio.sleep(latency_s)
            return await call()
        if kind == "lost_response":
            try:
                await call()
            except BackendError as exc:  # whatever the answer was, the caller never sees it
                raise self._error(op, key, kind) from exc
            raise self._error(op, key, kind)
        raise self._error(op, key, kind)  # timeout, throttle, permanent: nothing is done

    def _latency(self, kind: str | None) -> float:
        return self._rng.uniform(0, self._max_latency_s) if kind == "latency" else 0.0

    # ---------------------------------------------------------------- verbs
    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """The inner ``put``, unless a fault or a planned crash strikes."""
        self._check_alive("put", key)
        obj = fmt.key_kind(key)
        if obj == "segment":
            if self._segments_landed:
                self._at("mid_commit", key)  # some of this commit's segments landed, not this
            if self._due("torn_segment"):
                await self.inner.put(key, bytes(data[:len(data) // 2]))
                self._crash("torn_segment", key)
            self._segments_in_flight += 1
            try:
                await self._put(key, data, if_absent=if_absent)
            finally:
                self._segments_in_flight -= 1
            self._check_alive("put", key)  # crashed while this call was in flight
            self._segments_landed += 1
            if self._segments_in_flight:
                self._at("mid_commit", key)  # this one landed, others of the commit have not
            self._at("after_segment_put", key)
            return
        rewrites = (obj == "commit" and self._crash_point in _REWRITE_POINTS
                    and _has_rewrites(key, data))
        if obj in ("commit", "epoch"):
            self._at(f"before_{obj}_put", key)
        if rewrites:
            self._at("before_rewrite_commit_put", key)
        await self._put(key, data, if_absent=if_absent)
        self._check_alive("put", key)
        if obj == "commit":
            self._segments_landed = 0
        if obj in ("commit", "epoch"):
            self._at(f"after_{obj}_put", key)
        if rewrites:
            self._at("after_rewrite_commit_put", key)
        elif obj == "checkpoint":
            self._at("after_checkpoint_put", key)

    async def _put(self, key: str, data: bytes, *, if_absent: bool) -> None:
        kind = self._decide("put", [key], tearable=not if_absent)
        latency = self._latency(kind)
        if kind == "torn_write":
            cut = self._rng.randrange(len(data)) if data else 0
            await self.inner.put(key, bytes(data[:cut]))
            raise self._error("put", key, kind)
        await self._apply("put", key, kind,
                          lambda: self.inner.put(key, data, if_absent=if_absent), latency)

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        """The inner ``get``, unless a fault strikes."""
        self._check_alive("get", key)
        kind = self._decide("get", [key])
        latency = self._latency(kind)
        data: bytes = await self._apply("get", key, kind,
                                        lambda: self.inner.get(key, start=start, end=end), latency)
        return data

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """The inner ``list``, unless a fault strikes (decided now, at the call)."""
        self._check_alive("list", prefix)
        kind = self._decide("list", [prefix])
        latency = self._latency(kind)
        cut = self._rng.random() if kind == "lost_response" else 1.0
        return self._list(prefix, kind, latency, cut)

    async def _list(self, prefix: str, kind: str | None, latency_s: float,
                    cut: float) -> AsyncIterator[ObjectInfo]:
        if kind in ("timeout", "throttle", "permanent"):
            raise self._error("list", prefix, kind)
        if kind == "latency":
            await anyio.sleep(latency_s)
        if kind != "lost_response":
            async for info in self.inner.list(prefix):
                yield info
            return
        # The connection drops part-way: some of the listing arrives, then an error.
        infos = [info async for info in self.inner.list(prefix)]
        for info in infos[:int(cut * len(infos))]:
            yield info
        raise self._error("list", prefix, kind)

    async def delete(self, keys: Sequence[str]) -> None:
        """The inner ``delete``, unless a fault strikes."""
        self._check_alive("delete", ",".join(keys))
        kind = self._decide("delete", list(keys))
        latency = self._latency(kind)
        await self._apply("delete", ",".join(keys), kind, lambda: self.inner.delete(keys), latency)

    async def aclose(self) -> None:
        """Close the wrapped driver (never faulty)."""
        await self.inner.aclose()
