"""Commit records and open time against the number of streams (issue 18, item 10).

A profile, not a race: for each stream count S it writes a filesystem store in which S
streams each got one event with an offset (one commit), then makes C commits of one event
each (one stream's offset changes per commit), and reports:

- the bytes of the commit record of a one-event commit, and of the fence commit a writer
  writes when it takes over;
- the time to open the store read-only (``SnapshotAccess.REPLAY``: list and read every
  commit record, check the segments) and as a writer (the same, plus the epoch record and
  the fence commit), wall clock and the process's CPU time, each the best of ``--repeats``.

Writing and opening each run in a fresh process.

A commit record that repeats every stream's offset grows with S, and opening then costs
S x C; one that holds what changed costs neither::

    python -m benchmarks.offsets                       # 4,000 and 10,000 streams, 200 commits
    python -m benchmarks.offsets --streams 1000 --commits 50
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import apersist

QUIET = 3_600_000  # commits happen only when the script asks for them


def _commit_sizes(root: Path) -> list[int]:
    commits = sorted((root / "writers" / "0" / "commits").glob("*.json"))
    return [p.stat().st_size for p in commits]


async def write_store(root: Path, streams: int, commits: int) -> None:
    config = apersist.Config(apersist.Backend.filesystem(root), snapshot_interval_ms=QUIET)
    async with apersist.run(config) as run:
        handles = [run.stream(f"s{i}") for i in range(streams)]
        for i, stream in enumerate(handles):
            await stream.record({"i": i}, offset=i)
        await run.commit()
        for n in range(commits):
            await handles[n % streams].record({"n": n}, offset=streams + n)
            await run.commit()


async def open_store(root: Path, access: apersist.SnapshotAccess, streams: int) -> tuple[float, float]:
    """Seconds to open the store: wall clock, and CPU of the process (threads included)."""
    config = apersist.Config(apersist.Backend.filesystem(root), snapshot_interval_ms=QUIET,
                             snapshot_access=access)
    started, cpu = time.perf_counter(), time.process_time()
    async with apersist.run(config) as run:
        took = time.perf_counter() - started, time.process_time() - cpu
        # The last stream's offset was set by the first commit only (with fewer commits
        # than streams): every later commit left it alone.
        last = streams - 1
        assert run.stream(f"s{last}").offset == last
    return took


async def _written(root: Path, streams: int, commits: int) -> dict[str, float]:
    started = time.perf_counter()
    await write_store(root, streams, commits)
    return {"write_s": time.perf_counter() - started,
            "write_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "one_event_commit_bytes": _commit_sizes(root)[-1]}


async def _opened(root: Path, streams: int, repeats: int) -> dict[str, float]:
    replay = [await open_store(root, apersist.SnapshotAccess.REPLAY, streams) for _ in range(repeats)]
    # Each writer open adds a fence commit: measured last, after the read-only opens.
    writer = [await open_store(root, apersist.SnapshotAccess.FULL, streams) for _ in range(repeats)]
    return {"fence_commit_bytes": _commit_sizes(root)[-1],
            "open_replay_s": min(w for w, _ in replay), "open_replay_cpu_s": min(c for _, c in replay),
            "open_writer_s": min(w for w, _ in writer), "open_writer_cpu_s": min(c for _, c in writer)}


def _in_fresh_process(step: str, *args: Any) -> dict[str, float]:
    """Run one step in a process of its own: what writing a store leaves in the heap (and
    the allocator) must not weigh on the opens, nor one stream count on the next."""
    fn = {"write": _written, "open": _opened}[step]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run, fn, *args).result()


def _run(fn: Callable[..., Awaitable[dict[str, float]]], *args: Any) -> dict[str, float]:
    return asyncio.run(fn(*args))


def measure(streams: int, commits: int, repeats: int, workdir: Path) -> dict[str, float]:
    root = workdir / f"store-{streams}"
    result = {"streams": streams, "commits": commits,
              **_in_fresh_process("write", root, streams, commits),
              **_in_fresh_process("open", root, streams, repeats)}
    shutil.rmtree(root)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="4000,10000",
                        help="comma-separated stream counts (default 4000,10000)")
    parser.add_argument("--commits", type=int, default=200,
                        help="one-event commits after the first (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="opens timed, best kept")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    counts = [int(s) for s in args.streams.split(",") if s]
    print("| streams | commits | one-event commit record | fence commit record "
          "| open read-only (CPU) | open as writer (CPU) | writing the store (peak RSS) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for count in counts:
            r = measure(count, args.commits, args.repeats, Path(tmp))
            print(f"| {count:,} | {args.commits:,} | {r['one_event_commit_bytes']:,} B "
                  f"| {r['fence_commit_bytes']:,} B "
                  f"| {r['open_replay_s'] * 1000:,.0f} ms ({r['open_replay_cpu_s'] * 1000:,.0f} ms) "
                  f"| {r['open_writer_s'] * 1000:,.0f} ms ({r['open_writer_cpu_s'] * 1000:,.0f} ms) "
                  f"| {r['write_s']:,.1f} s ({r['write_peak_rss_mib']:,.0f} MiB) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
