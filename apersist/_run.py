"""``run()`` and ``Run``: a run's lifecycle, its task group, commits and statistics."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import MappingProxyType
from typing import Any, TypeVar, overload

import anyio
import anyio.lowlevel

from ._barrier import claim_consumer
from ._cache import UdfCache, current_cache
from ._codec import Codec, value_codec
from ._compression import Compression
from ._concurrency import gather_bounded, run_to_the_end, unwrap_group
from ._config import Config, Retention, describe_backend
from ._drivers import Driver, open_driver
from ._drivers.base import capabilities_of, check_driver_object
from ._drivers.probe import verify_create_if_absent
from ._errors import FencedError, PersistenceError
from ._lifecycle import Lifecycle
from ._maintenance import Maintainer
from ._metrics import NO_METRICS, Metrics, metrics_for
from ._policy import Policy
from ._scheduler import CommitInfo, Scheduler
from ._stopping import handling_signals, register_source, request_stop
from ._store import Store
from ._stream import Batch, Event, Stream, wall_clock_ms
from ._table import Table, decode_table_state, load_table_state
from ._values import check_name, checked_clock

__all__ = ["Run", "run"]

logger = logging.getLogger("apersist")

T = TypeVar("T")
# The builtin, for the methods whose parameter ``type`` hides it.
_Type = builtins.type


class Run:
    """A persistent run, made by ``async with apersist.run(config) as run``."""

    def __init__(self, config: Config, *, store: Store, scheduler: Scheduler | None,
                 policy: Policy, cache: UdfCache, opened_seq: int,
                 clock_ms: Callable[[], int], metrics: Metrics = NO_METRICS) -> None:
        self._config = config
        self._metrics = metrics
        self._store = store
        self._scheduler = scheduler
        self._policy = policy
        self._cache = cache
        self._opened_seq = opened_seq
        self._clock_ms = clock_ms
        self._streams: dict[str, Stream[Any]] = {}
        self._tables: dict[str, Table[Any]] = {}
        self._table_lock = anyio.Lock()
        self._life = Lifecycle()
        self._retentions: dict[str, Retention] = {}
        self._maintainer: Maintainer | None = None
        # Starts background work (replay read-ahead) in the run's task group; set on entry.
        self._spawn: Callable[..., object] | None = None

    def __repr__(self) -> str:
        return (f"<apersist.Run backend={self._config.backend.kind} "
                f"seq={self._store.last_seq} epoch={self._store.epoch}>")

    @property
    def config(self) -> Config:
        """The configuration this run was opened with."""
        return self._config

    @property
    def continue_after_replay(self) -> bool:
        """Whether ``source()`` goes on to the live reader after the replay (from the config)."""
        return self._config.continue_after_replay

    @property
    def stats(self) -> Mapping[str, int | float]:
        """Counters: deltas recorded, bytes written, commits, pending deltas, uploads in
        flight, last commit latency, cache hits and misses. A read-only snapshot."""
        if self._scheduler is not None:
            counters = self._scheduler.stats()
        else:
            counters = {"deltas_recorded": 0, "deltas_committed": 0, "pending_deltas": 0,
                        "pending_bytes": 0, "bytes_written": 0, "commits": 0,
                        "uploads_in_flight": 0, "last_commit_latency_ms": 0.0,
                        "last_seq": self._store.last_seq}
        counters["cache_hits"] = self._cache.hits
        counters["cache_misses"] = self._cache.misses
        return MappingProxyType(counters)

    def stop(self) -> None:
        """Ask the run to end cleanly; returns at once (``stop_on_signals`` calls this).

        Every ``run.source()`` and ``run.source_batches()`` loop then ends after the event
        (or batch) in hand, which is committed with the state derived from it; a source
        waiting for its reader stops waiting. The block goes on from after its loops, and
        leaving it commits as usual: nothing processed is replayed as live again. Loops of
        your own see ``stopping`` or await ``wait_stopping()``. Asking again does nothing.
        """
        if not self._life.ended:
            logger.info("run stop requested: sources end after the event in hand")
        request_stop(self._life)

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` was called (or a signal came, with ``stop_on_signals``)."""
        return self._life.stopping

    async def wait_stopping(self) -> None:
        """Return once ``stop()`` is called (or a signal came, with ``stop_on_signals``), or
        once the run's block has been left, whichever comes first: nothing can stop a run
        that has ended, so a task still waiting then is let go rather than left waiting."""
        await self._life.stopped.wait()

    async def commit(self) -> CommitInfo:
        """Commit everything recorded so far and return once it is durable.

        With nothing pending, or under ``SnapshotAccess.REPLAY``, writes nothing and returns
        the last seq with ``deltas=0, bytes=0``. Raises ``FencedError`` if a newer writer
        owns the store, and ``BackendError`` if storage failed; both end the run's writing.
        """
        self._life.check("commit()")
        if self._scheduler is None:
            await anyio.lowlevel.checkpoint()
            return CommitInfo(self._store.last_seq, 0, 0)
        return await self._scheduler.commit()

    async def compact(self) -> None:
        """Do all maintenance now, in one commit, then write a checkpoint.

        Folds every table's deltas into a snapshot (the store's tables are opened for it),
        applies every stream's ``Retention``, merges small segments, keeps only the
        ``@cached`` entries of the versions in use (see ``docs/operations.md``), and
        checkpoints the log. Right after it, replay yields exactly the retained events. A
        run that does not write (``SnapshotAccess.REPLAY``) does nothing.
        """
        self._life.check("compact()")
        if self._scheduler is None or self._maintainer is None:
            await anyio.lowlevel.checkpoint()
            return
        if self._policy.tables_persist and self._policy.tables_load:
            for name in self._store.table_names():
                await self.table(name)
        if self._policy.tables_persist:
            for table in self._tables.values():
                table.request_compaction()
        await self._maintainer.compact()

    def _retention_of(self, stream: str) -> Retention:
        return self._retentions.get(stream, self._config.retention)

    @overload
    def stream(self, name: str, *, retention: Retention | None = None) -> Stream[Any]: ...
    @overload
    def stream(self, name: str, *, type: builtins.type[T],
               retention: Retention | None = None) -> Stream[T]: ...
    @overload
    def stream(self, name: str, *, codec: Codec[T],
               retention: Retention | None = None) -> Stream[T]: ...

    def stream(self, name: str, *, type: Any = None, codec: Codec[Any] | None = None,
               retention: Retention | None = None) -> Stream[Any]:
        """The stream called ``name`` (the same object on every call).

        ``retention`` bounds the events the store keeps for it (``apersist.Retention``);
        by default the config's ``retention``. Given again, the newest one applies.
        ``type`` (or ``codec``): its values are stored as JSON and given back as that type,
        live and replayed alike; the first call that gives one fixes it for the run, and
        another one later raises ``TypeError`` naming both.
        """
        stream = self._stream(name, retention)
        if type is not None or codec is not None:
            stream._set_codec(type, codec)
        return stream

    def _stream(self, name: str, retention: Retention | None) -> Stream[Any]:
        # Looked up only once it is a str: check_name gives anything else its ValueError.
        stream = self._streams.get(name) if _Type(name) is str else None
        if retention is not None:
            if not isinstance(retention, Retention):
                raise TypeError(f"retention must be an apersist.Retention: "
                                f"got={type(retention).__name__}")
            if stream is None:
                check_name(name, "stream")
            self._retentions[name] = retention
        if stream is None:
            check_name(name, "stream")
            stream = self._streams[name] = Stream(
                name, store=self._store, scheduler=self._scheduler, policy=self._policy,
                opened_seq=self._opened_seq, clock_ms=self._clock_ms, spawn=self._spawn,
                life=self._life, metrics=self._metrics)
        return stream

    @overload
    def source(self, name: str, reader: Callable[[Any], Any], *,
               retention: Retention | None = None) -> AsyncIterator[Event[Any]]: ...
    @overload
    def source(self, name: str, reader: Callable[[Any], Any], *, type: builtins.type[T],
               retention: Retention | None = None) -> AsyncIterator[Event[T]]: ...
    @overload
    def source(self, name: str, reader: Callable[[Any], Any], *, codec: Codec[T],
               retention: Retention | None = None) -> AsyncIterator[Event[T]]: ...

    def source(self, name: str, reader: Callable[[Any], Any], *, type: Any = None,
               codec: Codec[Any] | None = None,
               retention: Retention | None = None) -> AsyncIterator[Event[Any]]:
        """Replay the stream's committed events, then read and record live ones.

        ``reader(offset)`` is called with the stream's last committed offset (``None`` under
        ``UDF_CACHING``) and returns an async iterable of values or ``(value, offset)``
        pairs. With ``continue_after_replay=False`` the iteration ends after the replay.
        ``retention`` is the stream's, as in ``stream()``: with ``Retention(max_events=0)``
        only the offsets are kept, and the source resumes from them. ``type`` (or
        ``codec``) is the stream's, as in ``stream()``: live and replayed events hold
        values of that type.
        """
        stream = self._source_stream(name, reader, type, codec, retention)
        source = stream._source(reader, self._config.continue_after_replay)
        register_source(self._life, source)  # run.stop() may have to wake it
        return source

    @overload
    def source_batches(self, name: str, reader: Callable[[Any], Any], *,
                       retention: Retention | None = None) -> AsyncIterator[Batch[Any]]: ...
    @overload
    def source_batches(self, name: str, reader: Callable[[Any], Any], *, type: builtins.type[T],
                       retention: Retention | None = None) -> AsyncIterator[Batch[T]]: ...
    @overload
    def source_batches(self, name: str, reader: Callable[[Any], Any], *, codec: Codec[T],
                       retention: Retention | None = None) -> AsyncIterator[Batch[T]]: ...

    def source_batches(self, name: str, reader: Callable[[Any], Any], *, type: Any = None,
                       codec: Codec[Any] | None = None,
                       retention: Retention | None = None) -> AsyncIterator[Batch[Any]]:
        """``source()`` a batch at a time: for readers that get many items at once.

        ``reader(offset)`` is called as for ``source()`` and returns an async iterable of
        batches: each a list of values, or a ``(values, offset)`` tuple whose ``offset`` is
        that of the batch's last value (the reader is later called with it to resume).
        Yields ``apersist.Batch`` objects: the committed events first (``replayed=True``,
        in stored chunks of up to 256), then one per live batch, recorded before it is
        yielded, with one ``orjson.dumps`` per 256 values. A live batch is held like a
        live event: it is committed with the state derived from it, once the consumer
        asks for the next one. Replayed and live, the events are the same stream's as
        ``source()`` and ``stream().replay()`` see: the two forms may take turns.
        ``type`` (or ``codec``) is the stream's, as in ``stream()``.
        """
        stream = self._source_stream(name, reader, type, codec, retention)
        source = stream._source_batches(reader, self._config.continue_after_replay)
        register_source(self._life, source)  # run.stop() may have to wake it
        return source

    def _source_stream(self, name: str, reader: Callable[[Any], Any], type: Any,
                       codec: Codec[Any] | None, retention: Retention | None) -> Stream[Any]:
        """For ``source()`` and ``source_batches()``: the stream, its codec set, in a task
        that is now a consumer."""
        if not callable(reader):
            raise TypeError(f"reader must be callable: got={_Type(reader).__name__}")
        claim_consumer()  # see SourceBarrier.hold: the task that loops is the consumer
        stream = self.stream(name, retention=retention)
        stream._set_codec(type, codec)
        return stream

    @overload
    async def table(self, name: str) -> Table[Any]: ...
    @overload
    async def table(self, name: str, *, type: builtins.type[T]) -> Table[T]: ...
    @overload
    async def table(self, name: str, *, codec: Codec[T]) -> Table[T]: ...

    async def table(self, name: str, *, type: Any = None,
                    codec: Codec[Any] | None = None) -> Table[Any]:
        """The table called ``name``, rebuilt from its last snapshot plus later deltas.

        ``type`` (or ``codec``): its values are stored as JSON and given back as that
        type, as for ``stream()``; the first call that gives one fixes it for the run.
        """
        self._life.check("table()")
        table = self._tables.get(name) if _Type(name) is str else None
        if table is not None:
            if type is not None or codec is not None:
                await table._set_codec(type, codec)
            return table
        check_name(name, "table")
        async with self._table_lock:
            table = self._tables.get(name)
            if table is None:
                # TypeError for a type it cannot store, before the table is read.
                resolved = value_codec(type, codec)
                state: dict[str, Any] = {}
                deltas = 0
                if self._policy.tables_load:
                    state, deltas = await load_table_state(self._store, name, self._opened_seq)
                persist = self._scheduler if self._policy.tables_persist else None
                if resolved is not None:
                    await decode_table_state(state, resolved, f"table {name!r}")
                table = self._tables[name] = Table(name, state, scheduler=persist,
                                                   life=self._life,
                                                   deltas_since_snapshot=deltas,
                                                   codec=resolved)
            elif type is not None or codec is not None:
                await table._set_codec(type, codec)
        return table


def run(config: Config, *, stop_on_signals: bool = False,
        clock_ms: Callable[[], int] | None = None,
        driver: Driver | None = None,
        meter_provider: Any = None) -> AbstractAsyncContextManager[Run]:
    """Open a persistent run over ``config``'s store.

    Entering loads the last committed state, takes the writer role (an older writer on the
    same root is fenced) and starts the snapshot scheduler. Leaving normally or by an
    exception commits everything recorded and awaits every upload; leaving by cancellation
    commits nothing more (sources resume from the last committed offset).

    ``stop_on_signals=True``: while the block runs, the first ``SIGTERM`` or ``SIGINT``
    calls ``run.stop()`` (sources end after the event in hand, the block goes on and
    leaves normally, with its final commit); a second one cancels the task that entered
    the block, as the signal would without it. Signals are handled until the final commit is
    done; runs open at the same time share the handlers. Needs the main thread's event loop, on a
    Unix system (``RuntimeError`` on entry otherwise).
    ``clock_ms`` (milliseconds since the epoch) is injectable for tests; each reading must
    be an ``int`` in [0, 2**63) (``TypeError``/``ValueError`` at the call that read it,
    before anything is written).

    ``driver``, an object that follows the driver protocol (``apersist.testing.Driver``), is
    the storage the run uses instead of opening one for ``config.backend``: a test's fault
    injector or counter, or a storage of the caller's own (as httpx takes ``transport=``).
    It is used as it is: the run adds no retry layer (its retries, and settling an
    ambiguous create, are the driver's), checks create-if-absent only if the driver asks
    for it (``Capabilities.verify_conditional_writes``), and never closes it: the caller opened
    it, and closes it after the run, so one driver may serve several runs in turn.

    ``meter_provider``, an OpenTelemetry ``MeterProvider``, is where the run's metrics go
    (docs/operations.md, "Metrics"); by default OpenTelemetry's global one, if the package
    is installed, else nowhere.

    Raises ``TypeError`` at the call for a ``config`` that is not a ``Config``, a
    ``clock_ms`` that is not callable, a ``driver`` without the protocol's members, or a
    ``meter_provider`` without ``get_meter``.
    """
    if not isinstance(config, Config):
        raise TypeError(f"run() needs an apersist.Config: got={type(config).__name__}")
    clock = wall_clock_ms if clock_ms is None else checked_clock(clock_ms)
    if driver is not None:
        check_driver_object(driver)
    if not isinstance(stop_on_signals, bool):
        raise TypeError(f"stop_on_signals must be a bool: got={type(stop_on_signals).__name__}")
    if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
        raise TypeError(f"meter_provider must be an OpenTelemetry MeterProvider: "
                        f"got={type(meter_provider).__name__}")
    return _opened_run(config, clock, driver, stop_on_signals, meter_provider)


@asynccontextmanager
async def _opened_run(config: Config, clock: Callable[[], int], given: Driver | None,
                      stop_on_signals: bool, meter_provider: Any) -> AsyncIterator[Run]:
    """``run()`` once its arguments are checked: open, yield the run, commit and close."""
    policy = Policy.of(config)
    metrics = metrics_for(meter_provider, config.backend.kind)
    # A driver we open is ours to close; a driver we are given stays the caller's.
    driver = open_driver(config.backend, config) if given is None else given
    unwatch = metrics.watch_retries(driver)
    try:
        store = Store(driver, clock_ms=clock, upload_concurrency=config.upload_concurrency,
                      label=config.writer_label)
        opened = time.perf_counter()
        # What opening needs besides the log goes out beside loading it, so that on an
        # object store its round trips do not come on top of the load's: the newest epoch
        # number, and (once, before writing anything) the create-if-absent check, without
        # which a store that lets two creators win would break commits and fencing
        # silently. The check touches only a scratch key it deletes.
        # Their failures wait for the load's, so that a store that cannot be read always
        # says so the same way (its first listing), whichever request failed first.
        newest_epoch: list[int] = []
        check_failed: list[Exception] = []

        async def list_epochs() -> None:
            # On failure acquire_writer() lists again, and raises what it meets then.
            with contextlib.suppress(PersistenceError):
                newest_epoch.append(await store.newest_epoch())

        async def check_create_if_absent() -> None:
            try:
                await verify_create_if_absent(driver)
            except Exception as exc:  # raised below, once the load has had its say
                check_failed.append(exc)

        opening: list[Callable[[], Awaitable[None]]] = [store.load]
        if policy.writer:
            opening.append(list_epochs)
            if capabilities_of(driver).verify_conditional_writes:
                opening.append(check_create_if_absent)
        await gather_bounded(opening, len(opening))
        if check_failed:
            raise check_failed[0]
        if not policy.writer and store.last_seq == 0:
            # A read-only run of a mistyped root would otherwise replay nothing, silently.
            logger.warning("no store at this root: a read-only run (SnapshotAccess.REPLAY) "
                           "replays nothing: %s", describe_backend(config.backend))
        scheduler = None
        if policy.writer:
            if config.takeover_idle_ms is not None:
                await store.refuse_active_writer(config.takeover_idle_ms)
            await store.acquire_writer(newest_epoch[0] if newest_epoch else None)
            scheduler = Scheduler(store, interval_ms=config.snapshot_interval_ms,
                                  max_pending_bytes=config.max_pending_bytes,
                                  max_segment_bytes=config.max_segment_bytes, metrics=metrics,
                                  compression=Compression(config.compression,
                                                          config.compression_level))
            if policy.reset:
                scheduler.request_reset()
        opened_seq = store.last_seq
        store.mark_opened()
        cache = await UdfCache.from_store(store, load=policy.cache_load, upto_seq=opened_seq,
                                    scheduler=scheduler if policy.cache_persist else None)
        the_run = Run(config, store=store, scheduler=scheduler, policy=policy, cache=cache,
                      opened_seq=opened_seq, clock_ms=clock, metrics=metrics)
        logger.info("run opened: backend=%s seq=%d epoch=%s commits=%d open_ms=%.1f",
                    config.backend.kind, store.last_seq, store.epoch, store.live_commits,
                    (time.perf_counter() - opened) * 1000)
        token = current_cache.set(cache if policy.cache_use else None)
        raised: BaseException | None = None
        try:
            # Signals are handled until the final commit is done, not only while the block
            # runs: a first signal during that commit lets it finish.
            with (handling_signals(the_run._life, asyncio.current_task()) if stop_on_signals
                  else contextlib.nullcontext()):
                async with anyio.create_task_group() as tg:
                    the_run._spawn = tg.start_soon
                    if scheduler is not None:
                        tg.start_soon(scheduler.run, name="apersist-scheduler")
                        maintainer = the_run._maintainer = Maintainer(
                            store, scheduler, max_segment_bytes=config.max_segment_bytes,
                            retention_of=the_run._retention_of, clock_ms=clock,
                            cache=cache if policy.cache_persist else None)
                        tg.start_soon(maintainer.run, name="apersist-maintenance")
                    try:
                        yield the_run
                    except Exception as body_exc:
                        # Leaving by an exception still commits what was recorded; the
                        # user's exception stays the one raised, except that a fenced run
                        # always says so (with the user's exception as its context).
                        raised = body_exc
                        if scheduler is not None:
                            try:
                                await scheduler.finish(by_exception=True)
                            except FencedError:
                                raise
                            except PersistenceError as exc:
                                logger.error("final commit failed while leaving by an "
                                             "exception: %s", exc)
                        raise
                    else:
                        if scheduler is not None:
                            await scheduler.finish(by_exception=False)
                        if the_run._maintainer is not None:
                            await the_run._maintainer.at_end()
                    finally:
                        the_run._life.ended = True
                        # A task still awaiting wait_stopping() (one outside the block)
                        # would otherwise wait for good: nothing can stop an ended run.
                        the_run._life.stopped.set()
                        if scheduler is not None:
                            scheduler.close()
                        tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The task group wraps the body's own exception: hand back that very object
            # (even when it is itself a group), with its cause and context as they were.
            if raised is not None and group.exceptions == (raised,):
                leaf: BaseException = raised
            else:
                leaf = unwrap_group(group)
            context, suppress = leaf.__context__, leaf.__suppress_context__
            try:
                raise leaf from leaf.__cause__
            finally:
                leaf.__context__, leaf.__suppress_context__ = context, suppress
        finally:
            current_cache.reset(token)
            cache.close()
    finally:
        unwatch()
        metrics.close()
        if given is None:
            # To its end even if this task is cancelled (again) meanwhile: a shield does not
            # stop asyncio's own Task.cancel(), and an interrupted close leaves the driver's
            # HTTP session and connections open.
            await run_to_the_end(driver.aclose)
