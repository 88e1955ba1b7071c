"""Compacting a big table: how long it takes and the worst event-loop stall meanwhile.

    python -m benchmarks.compaction --keys 300000 1000000

A run writes ``keys`` keys into one table on the filesystem and commits; then a 1 ms
ticker task runs while ``await run.compact()`` folds the table into a snapshot. The worst
lateness of a tick is the longest time the loop was held. Since the snapshot is framed
after the cut, in steps that yield (``Table._frame_snapshot``), what remains is copying
the table's record references at the cut and the commit's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence

import apersist


async def compact_once(keys: int) -> tuple[float, float]:
    """(compact time, worst loop stall), both in ms, for a table of ``keys`` keys."""
    with tempfile.TemporaryDirectory() as root:
        config = apersist.Config(apersist.Backend.filesystem(root), snapshot_interval_ms=60_000)
        async with apersist.run(config) as run:
            table = await run.table("t")
            for i in range(keys):
                table[f"k{i}"] = {"n": i}
                if i % 20_000 == 0:
                    await asyncio.sleep(0)
            await run.commit()
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
            await run.compact()
            took = time.perf_counter() - started
            running = False
            await ticker
    return took * 1000, worst * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[300_000, 1_000_000])
    args = parser.parse_args(argv)
    for keys in args.keys:
        took, worst = asyncio.run(compact_once(keys))
        print(f"compact of {keys:,} keys: {took:,.0f} ms, worst loop stall {worst:,.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
