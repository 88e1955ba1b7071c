"""The cost of a table write against a plain dict's: process CPU per loop iteration.

    python -m benchmarks.table_writes [--writes 300000] [--keys 1000] [--repeats 3]

Times the same loop, ``d[str(i % keys)] = [i, i]``, over a dict and over a persisted
table (memory backend, no commit during the loop), and ``orjson.dumps`` of one such
record for scale; the best of ``repeats`` passes each. The loop's own work (``str``, the
list, ``range``) is in both figures.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import MutableMapping, Sequence
from typing import Any

import orjson

import apersist


def per_write_us(target: MutableMapping[str, Any], writes: int, keys: int) -> float:
    started = time.process_time()
    for i in range(writes):
        target[str(i % keys)] = [i, i]
    return (time.process_time() - started) / writes * 1e6


def dumps_us(writes: int) -> float:
    dumps, record = orjson.dumps, ["123", [1, 2]]
    started = time.process_time()
    for _ in range(writes):
        dumps(record)
    return (time.process_time() - started) / writes * 1e6


async def measure(writes: int, keys: int, repeats: int) -> tuple[float, float, float]:
    """(dict, table, dumps) in µs per iteration, the best of ``repeats`` each."""
    config = apersist.Config(apersist.Backend.memory(), snapshot_interval_ms=3_600_000)
    plain: dict[str, Any] = {}
    async with apersist.run(config) as run:
        table = await run.table("t")
        per_write_us(table, keys, keys)  # warm: every key exists in both
        per_write_us(plain, keys, keys)
        best_dict = min(per_write_us(plain, writes, keys) for _ in range(repeats))
        best_table = min(per_write_us(table, writes, keys) for _ in range(repeats))
        best_dumps = min(dumps_us(writes) for _ in range(repeats))
    return best_dict, best_table, best_dumps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=300_000)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    plain, table, dumps = asyncio.run(measure(args.writes, args.keys, args.repeats))
    print(f"{args.writes:,} writes over {args.keys:,} keys, per iteration (process CPU): "
          f"dict {plain:.3f} µs, table {table:.3f} µs ({table / plain:.1f}x), "
          f"orjson.dumps of a record {dumps:.3f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
