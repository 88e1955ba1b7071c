"""Committing and compacting a big table: how long each takes and the worst event-loop
stall meanwhile.

    python -m benchmarks.compaction --keys 300000 1000000

A run writes ``keys`` keys into one table on the filesystem; a 1 ms ticker task runs
while ``await run.commit()`` writes their deltas, then while ``await run.compact()`` folds
the table into a snapshot. The worst lateness of a tick is the longest time the loop was
held. The deltas and the snapshot are framed after the cut, in steps that yield
(``Table._frame``); the cut hands a table's changed keys over in O(1) and copies the
references to its records for a snapshot, and what remains is that copy and the commit's
own work.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import apersist


async def timed(step: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """(time ``step()`` took, worst loop stall meanwhile), both in ms."""
    worst = 0.0
    running = True

    async def tick() -> None:
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await step()
    took = time.perf_counter() - started
    running = False
    await ticker
    return took * 1000, worst * 1000


async def commit_then_compact(keys: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(commit of ``keys`` changed keys, compact of a table of ``keys`` keys): each
    (time, worst loop stall) in ms."""
    with tempfile.TemporaryDirectory() as root:
        config = apersist.Config(apersist.Backend.filesystem(root), snapshot_interval_ms=60_000)
        async with apersist.run(config) as run:
            table = await run.table("t")
            for i in range(keys):
                table[f"k{i}"] = {"n": i}
                if i % 20_000 == 0:
                    await asyncio.sleep(0)
            committed = await timed(run.commit)
            compacted = await timed(run.compact)
    return committed, compacted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[300_000, 1_000_000])
    args = parser.parse_args(argv)
    for keys in args.keys:
        (commit_ms, commit_stall), (compact_ms, compact_stall) = asyncio.run(
            commit_then_compact(keys))
        print(f"commit of {keys:,} changed keys: {commit_ms:,.0f} ms, worst loop stall "
              f"{commit_stall:,.1f} ms; compact: {compact_ms:,.0f} ms, worst loop stall "
              f"{compact_stall:,.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
