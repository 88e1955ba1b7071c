"""The writer process of ``test_zombie.py``: commits in a loop until a newer writer fences it.

Run as ``python zombie_worker.py SPEC --writer W --seed N [options]``. It opens a run on the
store SPEC (a JSON backend spec, see ``servers.backend_spec``), which takes the writer role
and so fences whichever writer held it. It replays the stream ``z`` and reports what it
found, then loops: records a small batch of events ``{"w": W, "i": i}`` at offset
``[W, i]`` (``i`` counts this writer's events from 0) and ``counts[W] = i + 1`` in the
table ``counts``, commits, pauses a little. When a commit (or a ``record``, once a
background commit was fenced) raises ``FencedError`` it checks that every later commit and
leaving the block raise ``FencedError`` too, and exits.

Signals from the parent: SIGUSR1 arms a self-stop at ``--pause-at`` inside the next commit
(the worker prints a ``paused`` line, then sends itself SIGSTOP; the parent wakes it with
SIGCONT); SIGUSR2 ends the loop, and the run is left normally; SIGURG asks for a
checkpoint of the log after the next commit (the parent then runs gc). The worker commits every
``--pace-ms`` at most for its first ``--burst-s`` seconds, then every ``--idle-pace-ms``;
SIGWINCH starts another burst (the parent sends it when a round begins, so that a takeover
meets a busy writer while the history stays bounded on a slow machine). SIGHUP prints the
stack of every asyncio task to stderr and SIGQUIT every thread's Python stack (the parent
sends both to a writer that hangs, before it kills it).

Protocol on stdout, one JSON document per line, each flushed:

- ``{"ev": "ready", "runs": [[w, first_i, count], ...], "offset": o, "counts": {...},
  "epoch": e, "fence": f}``: the run is open (the takeover is done); ``runs`` is the
  replayed history of ``z``, run-length encoded by writer, ``offset`` the stream's offset
  and ``counts`` the table; ``e`` is this writer's epoch and ``f`` its fence commit.
- ``{"ev": "ack", "seq": S, "n": n, "durable": d}``: a commit returned: this writer's
  events ``0..n-1`` are durable; ``d`` is the count that ``stream.offset`` says is durable.
- ``{"ev": "checkpoint", "seq": s}``: the checkpoint SIGURG asked for is written, at ``s``.
- ``{"ev": "paused", "point": p}``: the next thing the worker does is SIGSTOP itself.
- ``{"ev": "fenced", "where": "commit" | "record", "n": n, "durable": d, "acked": a}``: the
  first ``FencedError``: ``n`` events recorded (the batch that raised included), ``d``
  durable by ``stream.offset``, ``a`` durable by the last ack line.
- ``{"ev": "left", "error": name}``: leaving the block raised ``name`` (or ``null``).

Exit status 0: the run ended as the protocol says (fenced, with every later commit and
leaving fenced too; or stopped by SIGUSR2 and left normally). A failed check exits with
status 3 and a message on stderr. ``APERSIST_ZOMBIE_LOG=debug`` (or ``info``) in the
environment logs apersist's own messages to stderr, for diagnosis.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from servers import WORKER_ATTEMPT_TIMEOUT_S, backend_from_spec

import apersist
from apersist import _format as fmt
from apersist._drivers import Driver, ObjectInfo, open_driver
from apersist._drivers.base import capabilities_of
from apersist.testing import Capabilities

EXIT_CHECK_FAILED = 3
STREAM = "z"
TABLE = "counts"
# Only explicit commits: every ack line then marks exactly what is durable. (A run with
# ``--interval-ms 0`` commits in the background as well.)
QUIET_MS = 600_000
PAUSE_POINTS = ("before_segment_put", "before_commit_put", "after_commit_put")


class CheckFailed(Exception):
    """The run did not behave as the API promises for a fenced writer."""


def emit(doc: dict[str, Any]) -> None:
    # One write per line: the parent may see the output cut only between lines.
    sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
    sys.stdout.buffer.flush()


class PausingDriver:
    """Wraps the run's driver: once armed, stops this process at one step of a commit."""

    def __init__(self, inner: Driver, point: str | None) -> None:
        self._inner = inner
        self._point = point
        self.armed = False

    @property
    def capabilities(self) -> Capabilities:
        # Not the optional commit verb (nor the buffer capability that goes with it): the
        # pauses sit between the plain puts of a commit, which it would do in one call.
        return Capabilities(
            verify_conditional_writes=capabilities_of(self._inner).verify_conditional_writes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _pause_if(self, point: str) -> None:
        if self.armed and self._point == point:
            self.armed = False
            emit({"ev": "paused", "point": point})
            # The whole process stops here, threads and sockets included, as a stalled
            # machine would; nothing runs until the parent sends SIGCONT.
            os.kill(os.getpid(), signal.SIGSTOP)

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        commit_record = "/commits/" in key
        self._pause_if("before_commit_put" if commit_record else
                       "before_segment_put" if "/segments/" in key else "")
        await self._inner.put(key, data, if_absent=if_absent)
        if commit_record:
            self._pause_if("after_commit_put")

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        return await self._inner.get(key, start=start, end=end)

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        return self._inner.list(prefix)

    async def delete(self, keys: Sequence[str]) -> None:
        await self._inner.delete(keys)

    async def aclose(self) -> None:
        await self._inner.aclose()


def durable_count(stream: apersist.Stream, writer: str) -> int:
    """This writer's events that ``stream.offset`` says are durable."""
    offset = stream.offset
    if isinstance(offset, list) and offset and offset[0] == writer:
        return int(offset[1]) + 1
    return 0


def plain_fenced(exc: BaseException, what: str) -> None:
    if type(exc) is not apersist.FencedError:
        raise CheckFailed(f"{what} raised something other than a plain FencedError: "
                          f"error={exc!r}") from exc


async def replay_runs(stream: apersist.Stream) -> list[list[Any]]:
    """The replayed history, run-length encoded: [[writer, first_i, count], ...]."""
    runs: list[list[Any]] = []
    async for event in stream.replay():
        value = event.value
        if not (isinstance(value, dict) and set(value) == {"w", "i"}
                and event.offset == [value["w"], value["i"]]):
            raise CheckFailed(f"a replayed event is not one a writer recorded: "
                              f"value={value!r} offset={event.offset!r}")
        last = runs[-1] if runs else None
        if last is not None and last[0] == value["w"] and last[1] + last[2] == value["i"]:
            last[2] += 1
        else:
            runs.append([value["w"], value["i"], 1])
    return runs


async def after_fence(run: apersist.Run, stream: apersist.Stream, writer: str,
                      n: int, durable: int) -> None:
    """Every later commit raises FencedError and lands nothing; records may raise it."""
    for attempt in range(2):
        try:
            await stream.record({"w": writer, "i": n}, offset=[writer, n])
        except apersist.FencedError as exc:
            plain_fenced(exc, "record after the fence")
        n += 1
        try:
            info = await run.commit()
        except apersist.FencedError as exc:
            plain_fenced(exc, "commit after the fence")
        else:
            raise CheckFailed(f"a commit after FencedError returned: attempt={attempt} "
                              f"seq={info.seq} deltas={info.deltas}")
        if durable_count(stream, writer) != durable:
            raise CheckFailed(f"stream.offset moved after the fence: attempt={attempt} "
                              f"offset={stream.offset!r} durable_before={durable}")


def dump_tasks() -> None:
    """Where every task waits, awaited call by awaited call: for a writer that hangs (SIGHUP).

    ``Task.print_stack`` shows only the outermost frame of a suspended coroutine, so the
    chain of awaits is followed here."""
    tasks = asyncio.all_tasks()
    print(f"zombie_worker: {len(tasks)} tasks", file=sys.stderr)
    for task in tasks:
        print(f"task {task.get_name()}:", file=sys.stderr)
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = _first_attr(awaited, ("cr_frame", "gi_frame", "ag_frame"))
            if frame is not None:
                print(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}",
                      file=sys.stderr)
            awaited = _first_attr(awaited, ("cr_await", "gi_yieldfrom", "ag_await"))
    sys.stderr.flush()


def _first_attr(obj: object, names: Sequence[str]) -> Any:
    """The first of ``names`` that ``obj`` has and is not None (a coroutine, a generator
    and an async generator name the same things differently), else None."""
    return next((value for name in names if (value := getattr(obj, name, None)) is not None),
                None)


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    writer: str = args.writer
    backend = backend_from_spec(args.spec)
    pausing: list[PausingDriver] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def arm() -> None:
        for driver in pausing:
            driver.armed = True

    loop.add_signal_handler(signal.SIGUSR1, arm)
    burst_until = loop.time() + args.burst_s

    def burst() -> None:
        nonlocal burst_until
        burst_until = loop.time() + args.burst_s

    loop.add_signal_handler(signal.SIGWINCH, burst)
    checkpoint_due = asyncio.Event()
    loop.add_signal_handler(signal.SIGURG, checkpoint_due.set)
    loop.add_signal_handler(signal.SIGUSR2, stop.set)
    loop.add_signal_handler(signal.SIGHUP, dump_tasks)

    config = apersist.Config(backend,  # type: ignore[arg-type]
                             snapshot_interval_ms=args.interval_ms,
                             max_segment_bytes=args.segment_bytes,
                             retry=apersist.RetryPolicy(attempt_timeout_s=WORKER_ATTEMPT_TIMEOUT_S))
    n = acked = 0
    fenced_seen = False
    # A failed check is kept, not raised inside the block: leaving a fenced run raises
    # FencedError, which would bury it as that error's context.
    failure: CheckFailed | None = None
    left_error: str | None = None
    # The run of this process (there is one) goes through a pausing driver; given to the
    # run, so closed here.
    if args.pause_at is not None and "segment" in args.pause_at:
        # Its commits must upload their segments to reach that step (format 5.0 carries a
        # small commit's segments inline in its record).
        fmt.INLINE_BYTES = 0  # type: ignore[misc]
    pausing.append(PausingDriver(open_driver(backend, config), args.pause_at))
    try:
        async with contextlib.aclosing(pausing[0]), \
                apersist.run(config, driver=pausing[0]) as run:
            stream = run.stream(STREAM)
            counts = await run.table(TABLE)
            try:
                runs = await replay_runs(stream)
                emit({"ev": "ready", "runs": runs, "offset": stream.offset,
                      "counts": dict(counts), "epoch": run._store.epoch,
                      "fence": run._store.fences[-1]})
                while not stop.is_set():
                    where = "record"
                    try:
                        for _ in range(rng.randint(1, args.max_batch)):
                            # Table first, then record: record() appends before it can
                            # await, so no commit is cut between the two.
                            counts[writer] = n + 1
                            await stream.record({"w": writer, "i": n}, offset=[writer, n])
                            n += 1
                        where = "commit"
                        if rng.random() < 0.05:
                            await run.compact()  # a commit with a table snapshot in it
                        info = await run.commit()
                    except apersist.FencedError as exc:
                        plain_fenced(exc, where)
                        durable = durable_count(stream, writer)
                        emit({"ev": "fenced", "where": where, "n": n, "durable": durable,
                              "acked": acked})
                        fenced_seen = True
                        await after_fence(run, stream, writer, n, durable)
                        break
                    acked = n
                    durable = durable_count(stream, writer)
                    if durable != n:
                        raise CheckFailed(f"stream.offset is not the last acknowledged "
                                          f"event: durable={durable} acked={n} "
                                          f"offset={stream.offset!r}")
                    emit({"ev": "ack", "seq": info.seq, "n": n, "durable": durable})
                    if checkpoint_due.is_set():
                        checkpoint_due.clear()
                        emit({"ev": "checkpoint", "seq": await run._store.write_checkpoint()})
                    # A writer between inputs; also bounds the history later rounds replay.
                    pace_ms = args.pace_ms if loop.time() < burst_until else args.idle_pace_ms
                    await asyncio.sleep(rng.uniform(pace_ms / 4, pace_ms) / 1000)
            except CheckFailed as exc:
                failure = exc
    except apersist.FencedError as exc:
        left_error = type(exc).__name__
        if failure is None and not fenced_seen:
            failure = CheckFailed(f"leaving the block raised FencedError before any commit "
                                  f"did: n={n} acked={acked}")
        elif type(exc) is not apersist.FencedError:
            failure = failure or CheckFailed(f"leaving the block raised something other "
                                             f"than a plain FencedError: error={exc!r}")
    emit({"ev": "left", "error": left_error})
    if failure is not None:
        raise failure
    if fenced_seen and left_error is None:
        raise CheckFailed(f"leaving a fenced run raised nothing: n={n} acked={acked}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("spec", help="a JSON backend spec (servers.backend_spec)")
    parser.add_argument("--writer", required=True, help="this writer's id in its events")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--interval-ms", type=int, default=QUIET_MS)
    parser.add_argument("--segment-bytes", type=int, default=4 << 10)
    parser.add_argument("--max-batch", type=int, default=20)
    parser.add_argument("--pace-ms", type=float, default=20.0,
                        help="the longest pause between commits during a burst")
    parser.add_argument("--burst-s", type=float, default=10.0,
                        help="seconds at --pace-ms after starting and after each SIGWINCH")
    parser.add_argument("--idle-pace-ms", type=float, default=500.0,
                        help="the longest pause between commits outside a burst")
    parser.add_argument("--pause-at", choices=PAUSE_POINTS,
                        help="where SIGUSR1 makes the next commit stop this process")
    return parser.parse_args(argv)


if __name__ == "__main__":
    # A loop stuck without awaiting cannot run the SIGHUP handler; this one runs in C.
    faulthandler.register(signal.SIGQUIT, all_threads=True)
    if level := os.environ.get("APERSIST_ZOMBIE_LOG"):
        # Diagnosis: apersist's own log (takeovers, store loads, fences, retries) on stderr.
        # Only apersist's: at info the Azure SDK logs every request with its headers, which
        # slows a writer down several times over.
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(relativeCreated)8.0f %(name)s %(message)s")
        logging.getLogger("apersist").setLevel(level.upper())
    try:
        asyncio.run(main(parse_args(sys.argv[1:])))
    except CheckFailed as exc:
        print(f"zombie_worker: check failed: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CHECK_FAILED)
