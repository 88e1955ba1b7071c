"""Metrics through OpenTelemetry's API, when it is installed (``pip install apersist[otel]``).

A run gets its instruments from the meter provider given to ``apersist.run(config,
meter_provider=...)``, or else from OpenTelemetry's global one; without the package, the
run's metrics are ``NO_METRICS``, whose methods do nothing, and nothing is imported.

Nothing here runs per event: events are counted where they are already counted in bulk
(a commit's segments, a replay's chunks), so recording and replay cost the same with or
without an SDK. Every instrument is listed, with its unit and attributes, in
docs/operations.md ("Metrics"); the names follow OpenTelemetry's conventions (dotted
lowercase, a unit in UCUM, ``{annotation}`` for counts, ``error.type`` on failures).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from ._drivers.retry import RetryingDriver
from ._format import KIND_EVENTS, SegmentRef

__all__ = ["NO_METRICS", "Metrics", "RunMetrics", "metrics_for"]

_Chunk = TypeVar("_Chunk", bound=tuple[Any, ...])

logger = logging.getLogger("apersist")

METER_NAME = "apersist"
# A replay's progress is told to the SDK at most this often (and at its end): an SDK call
# costs several microseconds, a chunk of events less than that.
_REPLAY_FLUSH_NS = 500_000_000
# Bucket boundaries advised for the histograms (OpenTelemetry API 1.30 and later; the SDK's
# default buckets, 0 to 10,000, suit milliseconds, not these units).
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0)
_BYTES_BUCKETS = tuple(float(1 << n) for n in range(8, 31, 2))  # 256 B .. 1 GiB, by fours


class Metrics:
    """The no-op metrics of a run without OpenTelemetry: every method does nothing.

    Callers test ``enabled`` before gathering what a method would take, so that a run
    without metrics does no work for them at all.
    """

    enabled = False

    def committed(self, seconds: float, nbytes: int, segments: Iterable[SegmentRef]) -> None:
        """A commit landed: ``segments`` are the new segments it wrote."""

    def commit_failed(self, seconds: float, error: BaseException) -> None:
        """A commit failed with ``error`` after ``seconds``."""

    def retried(self, op: str) -> None:
        """A storage request (``op``: put, get, list, delete) is tried again."""

    def backpressure_started(self) -> None:
        """A writer waits for a commit to make room (``Scheduler.wait_capacity``)."""

    def backpressure_ended(self, seconds: float) -> None:
        """That wait is over after ``seconds`` (made room, failed or cancelled)."""

    def replaying(self, stream: str, total: int, chunks: AsyncIterator[_Chunk],
                  skip: int = 0) -> AsyncIterator[_Chunk]:
        """``chunks`` of ``stream``'s replay (``total`` events in all), counted as yielded,
        but for the first ``skip`` events (a later ``source()`` call leaves them out)."""
        return chunks

    def watch_retries(self, driver: object) -> Callable[[], None]:
        """Count the retries of ``driver``'s retry layers until the returned function is
        called."""
        return _nothing

    def close(self) -> None:
        """The run has ended: the replays it left unfinished are in progress no more."""


def _nothing() -> None:
    pass


NO_METRICS = Metrics()


class _Guarded:
    """An instrument whose failures are logged (once), never raised: a measurement is
    taken inside a commit, and a broken meter provider must not fail the commit."""

    __slots__ = ("_failed", "_inner", "_name")

    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self._name = name
        self._failed = False

    def add(self, amount: float, attributes: dict[str, str]) -> None:
        try:
            self._inner.add(amount, attributes)
        except Exception:
            self._log()

    def record(self, amount: float, attributes: dict[str, str]) -> None:
        try:
            self._inner.record(amount, attributes)
        except Exception:
            self._log()

    def _log(self) -> None:
        if not self._failed:
            self._failed = True
            logger.warning("a metric instrument failed; apersist goes on without it: "
                           "name=%s", self._name, exc_info=True)


class _Instruments:
    """One meter's instruments, made once per meter provider."""

    def __init__(self, meter: Any) -> None:
        def counter(name: str, unit: str, description: str, *, up_down: bool = False) -> _Guarded:
            make = meter.create_up_down_counter if up_down else meter.create_counter
            return _Guarded(make(name, unit=unit, description=description), name)

        def histogram(name: str, unit: str, description: str,
                      buckets: tuple[float, ...]) -> _Guarded:
            try:
                made = meter.create_histogram(name, unit=unit, description=description,
                                              explicit_bucket_boundaries_advisory=buckets)
            except TypeError:  # an API older than 1.30: the SDK's (or a view's) buckets
                made = meter.create_histogram(name, unit=unit, description=description)
            return _Guarded(made, name)

        self.events_recorded = counter(
            "apersist.events.recorded", "{event}", "Events made durable by a commit.")
        self.events_replayed = counter(
            "apersist.events.replayed", "{event}",
            "Committed events a replay has read and handed on.")
        self.replay_remaining = counter(
            "apersist.replay.remaining", "{event}",
            "Events that the replays in progress have still to hand on.", up_down=True)
        self.commits = counter(
            "apersist.commits", "{commit}", "Commits made, and commits failed (with error.type).")
        self.commit_duration = histogram(
            "apersist.commit.duration", "s",
            "How long a commit took, from its cut to its durable record.", _SECONDS_BUCKETS)
        self.commit_size = histogram(
            "apersist.commit.size", "By", "Segment bytes a commit wrote.", _BYTES_BUCKETS)
        self.retries = counter(
            "apersist.driver.retries", "{retry}",
            "Storage requests tried again after a transient failure.")
        self.backpressure_waits = counter(
            "apersist.backpressure.waits", "{wait}",
            "Times a writer waited for a commit to make room.")
        self.backpressure_duration = histogram(
            "apersist.backpressure.duration", "s",
            "How long a writer waited for a commit to make room.", _SECONDS_BUCKETS)


class _Backlog:
    """One replay in progress: what it has yet to hand on (as told to the SDK), and what
    it has handed on since it last told the SDK."""

    __slots__ = ("attrs", "left", "unsaid")

    def __init__(self, attrs: dict[str, str], left: int) -> None:
        self.attrs = attrs
        self.left = left
        self.unsaid = 0


class RunMetrics(Metrics):
    """One run's metrics: the instruments of its meter provider, with its attributes."""

    enabled = True

    def __init__(self, instruments: _Instruments, backend: str) -> None:
        self._i = instruments
        self._backend = backend
        self._attrs = {"apersist.backend": backend}
        self._stream_attrs: dict[str, dict[str, str]] = {}
        self._op_attrs: dict[str, dict[str, str]] = {}
        self._backlogs: set[_Backlog] = set()  # the replays in progress

    def _of_stream(self, stream: str) -> dict[str, str]:
        attrs = self._stream_attrs.get(stream)
        if attrs is None:
            attrs = self._stream_attrs[stream] = {"apersist.backend": self._backend,
                                                  "apersist.stream": stream}
        return attrs

    def committed(self, seconds: float, nbytes: int, segments: Iterable[SegmentRef]) -> None:
        i = self._i
        i.commits.add(1, self._attrs)
        i.commit_duration.record(seconds, self._attrs)
        i.commit_size.record(nbytes, self._attrs)
        events: dict[str, int] = {}
        for ref in segments:
            if ref.kind == KIND_EVENTS:
                events[ref.name] = events.get(ref.name, 0) + ref.records
        for stream, count in events.items():
            i.events_recorded.add(count, self._of_stream(stream))

    def commit_failed(self, seconds: float, error: BaseException) -> None:
        attrs = {"apersist.backend": self._backend, "error.type": type(error).__qualname__}
        self._i.commits.add(1, attrs)
        self._i.commit_duration.record(seconds, attrs)

    def retried(self, op: str) -> None:
        attrs = self._op_attrs.get(op)
        if attrs is None:
            attrs = self._op_attrs[op] = {"apersist.backend": self._backend,
                                          "apersist.operation": op}
        self._i.retries.add(1, attrs)

    def backpressure_started(self) -> None:
        self._i.backpressure_waits.add(1, self._attrs)

    def backpressure_ended(self, seconds: float) -> None:
        self._i.backpressure_duration.record(seconds, self._attrs)

    async def replaying(self, stream: str, total: int, chunks: AsyncIterator[_Chunk],
                        skip: int = 0) -> AsyncIterator[_Chunk]:
        # An async generator here, a plain function in the base class (which hands
        # ``chunks`` back untouched): both return an async iterator of the chunks.
        attrs = self._of_stream(stream)
        replayed, remaining = self._i.events_replayed, self._i.replay_remaining
        backlog = _Backlog(attrs, total - skip)
        self._backlogs.add(backlog)
        remaining.add(backlog.left, attrs)
        clock = time.monotonic_ns
        told = clock()
        try:
            async for chunk in chunks:
                count = len(chunk[0])
                if skip:  # handed on by an earlier source() call: not counted again
                    passed = min(skip, count)
                    skip -= passed
                    count -= passed
                backlog.unsaid += count
                if clock() - told >= _REPLAY_FLUSH_NS:
                    unsaid = backlog.unsaid
                    replayed.add(unsaid, attrs)
                    remaining.add(-unsaid, attrs)
                    backlog.left -= unsaid
                    backlog.unsaid, told = 0, clock()
                yield chunk
        finally:
            # Ended, failed or abandoned: what it handed on is counted, and nothing of
            # this replay is left in the backlog.
            self._backlogs.discard(backlog)
            self._settle(backlog)

    def _settle(self, backlog: _Backlog) -> None:
        if backlog.unsaid:
            self._i.events_replayed.add(backlog.unsaid, backlog.attrs)
        if backlog.left:
            self._i.replay_remaining.add(-backlog.left, backlog.attrs)
        backlog.left = backlog.unsaid = 0

    def close(self) -> None:
        # A replay iterator kept past the run (on an object, by a task that outlives the
        # block) is in progress no more: it raises if it is asked for more.
        for backlog in self._backlogs:
            self._settle(backlog)
        self._backlogs.clear()

    def watch_retries(self, driver: object) -> Callable[[], None]:
        # The run's own retry layer (S3, Azure) or one inside a driver it was given: each
        # counts its retries here while the run lasts, then gets back the hook it had (a
        # driver may serve several runs in turn).
        layers: list[tuple[RetryingDriver, Any]] = []
        seen: object = driver
        for _ in range(16):  # wrappers wrap a few deep; a cycle must not hang us
            if isinstance(seen, RetryingDriver):
                layers.append((seen, seen.on_retry))
                seen.on_retry = self.retried
            seen = getattr(seen, "inner", None)
            if seen is None:
                break

        def unwatch() -> None:
            for layer, before in layers:
                if layer.on_retry == self.retried:
                    layer.on_retry = before

        return unwatch


# Instruments made once per meter provider: making them again would register them again
# (OpenTelemetry's proxy meter keeps every instrument it was asked for).
_by_provider: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_global: list[_Instruments] = []
_otel_missing = False


def metrics_for(meter_provider: Any, backend: str) -> Metrics:
    """The metrics of a run on ``backend``: from ``meter_provider`` if given, else from
    OpenTelemetry's global provider, or ``NO_METRICS`` when OpenTelemetry is not installed
    (imported here, at the first run, so that ``import apersist`` never pays for it)."""
    from . import __version__

    if meter_provider is not None:
        try:
            instruments = _by_provider.get(meter_provider)
        except TypeError:  # not weakly referenceable: its instruments are made for each run
            return RunMetrics(_Instruments(meter_provider.get_meter(METER_NAME, __version__)),
                              backend)
        if instruments is None:
            instruments = _by_provider[meter_provider] = _Instruments(
                meter_provider.get_meter(METER_NAME, __version__))
        return RunMetrics(instruments, backend)
    global _otel_missing
    if not _global:
        if _otel_missing:
            return NO_METRICS
        try:
            from opentelemetry import metrics as otel_metrics  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            _otel_missing = True  # looked for once per process
            return NO_METRICS
        # A meter of the global provider: OpenTelemetry's proxy until one is set, after
        # which it forwards to that one, so a provider set after the first run still counts.
        _global.append(_Instruments(otel_metrics.get_meter(METER_NAME, __version__)))
    return RunMetrics(_global[0], backend)
