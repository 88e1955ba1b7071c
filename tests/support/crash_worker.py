"""The process that ``test_crash.py`` kills with SIGKILL: records to several streams until killed.

Run as ``python crash_worker.py ROOT --seed N [options]``. It opens a run on the filesystem
store at ROOT, replays every stream and checks what it finds (event ``i`` of stream ``k``
is ``{"s": k, "i": i}`` at offset ``i``; ``stream.offset`` is the last one; the ``counts``
table holds each stream's event count), then continues every sequence where the last
commit left it, like a source resuming from its committed offset. In a loop it records a
batch of random size across the streams, updating the table with each event, and commits;
now and then (``--compact-rate``, per round) it calls ``run.compact()`` first. The run's own
maintenance goes on in the background: many small commits get their segments merged
(when ``--segment-bytes`` leaves room for it) and a checkpoint every 128 commits.

Protocol on stdout, one JSON document per line, each flushed:

- ``{"ev": "ready", "n": [...]}``: the store is open and checked; ``n`` are the counts found.
- ``{"ev": "commit", "n": [...]}``: a commit of everything up to these counts starts.
- ``{"ev": "ack", "seq": S, "n": [...]}``: that commit returned: these counts are durable.
- ``{"ev": "done", "n": [...]}``: ``--max-events`` reached; the run was left normally.
- ``{"ev": "crash", "point": P}``: with ``--crash-point``, the worker reached the step P and
  SIGKILLs itself right after this line.

With ``--crash-point P --crash-nth N`` every run goes through ``FaultyDriver(real driver)``,
which kills this process with SIGKILL the Nth time it reaches the step P of
``apersist.testing.CRASH_POINTS``: nothing after that step happens, as with a real kill -9.

A failed check exits with status 3 and a message on stderr. ``APERSIST_CRASH_MAX_BATCH``
in the environment overrides ``--max-batch`` (large batches make long commits, so more
kills land in the middle of one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
from typing import Any

import orjson
from servers import WORKER_ATTEMPT_TIMEOUT_S, backend_from_spec

import apersist
from apersist import _format as fmt
from apersist._drivers import Driver, open_driver
from apersist.testing import CRASH_POINTS, FaultyDriver

EXIT_CHECK_FAILED = 3


class CheckFailed(Exception):
    """What the worker found in the store on start is not what the protocol promises."""


def stream_name(k: int) -> str:
    return f"s{k}"


def emit(doc: dict[str, Any]) -> None:
    # One write per line: the parent may see the output cut only between lines.
    sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
    sys.stdout.buffer.flush()


def crash_now(point: str) -> None:
    """Say which step was reached, then die as kill -9 does: no cleanup, no final commit."""
    emit({"ev": "crash", "point": point})
    os.kill(os.getpid(), signal.SIGKILL)


def crashing_driver(config: apersist.Config, point: str, nth: int) -> Driver:
    """The run's driver when it must crash this process at ``point``, the nth time."""
    # Around the whole real driver (retries included): the crash comes at a step of the
    # commit protocol, whatever the driver did beneath to get there.
    faulty = FaultyDriver(open_driver(config.backend, config))
    faulty.crash_at(point, nth=nth, on_crash=crash_now)
    return faulty


async def check_stream(run: apersist.Run, counts: apersist.Table, k: int) -> int:
    """Replay stream ``k``; check every event, the offset and the table; return the count."""
    stream = run.stream(stream_name(k))
    n = 0
    async for event in stream.replay():
        want = {"s": k, "i": n}
        if event.value != want or event.offset != n or not event.replayed:
            raise CheckFailed(f"stream {stream.name}: event #{n} is wrong: expected value={want} "
                              f"offset={n}, got value={event.value} offset={event.offset} "
                              f"replayed={event.replayed}")
        n += 1
    last = n - 1 if n else None
    if stream.offset != last:
        raise CheckFailed(f"stream {stream.name}: offset={stream.offset!r} but the last "
                          f"replayed offset is {last!r} (n={n})")
    in_table = counts.get(stream.name, 0)
    if in_table != n:
        raise CheckFailed(f"stream {stream.name}: table counts={in_table!r} but {n} events "
                          f"were replayed")
    return n


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    if args.segment_objects:
        # Small commits upload their segments too (format 5.0 would carry them inline),
        # so that the segment crash points are reached.
        fmt.INLINE_BYTES = 0  # type: ignore[misc]
    max_batch = int(os.environ.get("APERSIST_CRASH_MAX_BATCH", args.max_batch))
    # The store: a JSON backend spec (see servers.backend_spec) or a filesystem path.
    backend = (backend_from_spec(args.root) if args.root.startswith("{")
               else apersist.Backend.filesystem(args.root))
    config = apersist.Config(backend,  # type: ignore[arg-type]
                             snapshot_interval_ms=args.interval_ms,
                             max_segment_bytes=args.segment_bytes,
                             max_pending_bytes=args.pending_bytes,
                             retry=apersist.RetryPolicy(attempt_timeout_s=WORKER_ATTEMPT_TIMEOUT_S))
    # The real driver, or a crashing one around it: given to the run, so closed here.
    driver = (open_driver(backend, config) if args.crash_point is None
              else crashing_driver(config, args.crash_point, args.crash_nth))
    async with contextlib.aclosing(driver), apersist.run(config, driver=driver) as run:
        counts = await run.table("counts")
        streams = [run.stream(stream_name(k)) for k in range(args.streams)]
        n = [await check_stream(run, counts, k) for k in range(args.streams)]
        emit({"ev": "ready", "n": n})
        recorded = 0
        while recorded < args.max_events:
            # Mostly small batches, sometimes a large one: a long commit to be killed in.
            size = rng.randint(1, max_batch) if rng.random() < 0.2 else rng.randint(1, 64)
            for _ in range(size):
                k = rng.randrange(args.streams)
                i = n[k]
                # Table first, then record: record() appends before it can await, so no
                # commit can be cut between the two and the table always matches the events.
                counts[streams[k].name] = i + 1
                await streams[k].record({"s": k, "i": i}, offset=i)
                n[k] = i + 1
                if rng.random() < 0.02:
                    # Let the snapshot scheduler run mid-batch: background commits.
                    await asyncio.sleep(0)
            recorded += size
            if rng.random() < args.compact_rate:
                await run.compact()
            emit({"ev": "commit", "n": n})
            info = await run.commit()
            emit({"ev": "ack", "seq": info.seq, "n": n})
            if rng.random() < 0.5:
                # A source waiting for input; also keeps the commits per kill (and so the
                # history every later check replays) from growing too fast.
                await asyncio.sleep(rng.uniform(0, 0.01))
    emit({"ev": "done", "n": n})


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("root", help="a filesystem path or a JSON backend spec")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--interval-ms", type=int, default=0)
    parser.add_argument("--segment-bytes", type=int, default=1 << 10)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--pending-bytes", type=int, default=64 << 20,
                        help="back-pressure bound: record() waits for a commit past it")
    parser.add_argument("--max-events", type=int, default=1 << 62)
    parser.add_argument("--compact-rate", type=float, default=0.05,
                        help="the chance that a round calls run.compact() before its commit")
    parser.add_argument("--segment-objects", action="store_true",
                        help="every commit uploads its segments, however small (no inline)")
    parser.add_argument("--crash-point", choices=CRASH_POINTS,
                        help="SIGKILL this process when the driver reaches this step")
    parser.add_argument("--crash-nth", type=int, default=1,
                        help="crash the nth time the step is reached (counted from the start)")
    args = parser.parse_args(argv)
    if args.crash_nth < 1:
        parser.error(f"--crash-nth must be at least 1: got={args.crash_nth}")
    return args


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    try:
        asyncio.run(main(arguments))
    except CheckFailed as exc:
        print(f"crash_worker: check failed: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CHECK_FAILED)
