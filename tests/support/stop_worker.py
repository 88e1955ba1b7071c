"""The process that ``test_stop_signals.py`` stops with SIGTERM: a source feeding a table.

Run as ``python stop_worker.py SPEC`` (``servers.backend_spec``). It opens a run with
``stop_on_signals=True`` and reads an endless source (event ``i`` is ``{"i": i}`` at offset
``i``, one a millisecond), counting the events and summing ``i`` in the table ``counts``.
With ``--check`` it instead replays what is stored, takes one live event, and reports.

Protocol on stdout, one JSON document per line, each flushed:

- ``{"ev": "progress", "n": N}``: every 100 events processed;
- ``{"ev": "stopped", "n": N, "last": I}``: the source loop ended (after the stop);
- ``{"ev": "done"}``: the block was left, its final commit landed;
- ``--check``: ``{"ev": "check", "replayed": [...], "counts": {...}, "offset": O,
  "first_live": I}``: the replayed values' ``i``, the table, the offset the reader was
  called with, and the first live event's ``i``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson
from servers import backend_from_spec

import apersist


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
    sys.stdout.buffer.flush()


async def numbers(offset: int | None, calls: list[Any]) -> AsyncIterator[tuple[dict[str, int], int]]:
    calls.append(offset)
    i = 0 if offset is None else offset + 1
    while True:
        await asyncio.sleep(0.001)  # a live feed: the loop waits on it
        yield {"i": i}, i
        i += 1


async def work(config: apersist.Config) -> None:
    calls: list[Any] = []
    async with apersist.run(config, stop_on_signals=True) as run:
        counts = await run.table("counts")
        n, last = 0, None
        async for event in run.source("input", lambda off: numbers(off, calls)):
            counts["n"] = counts.get("n", 0) + 1
            counts["sum"] = counts.get("sum", 0) + event.value["i"]
            n, last = n + 1, event.value["i"]
            if n % 100 == 0:
                emit({"ev": "progress", "n": n})
        emit({"ev": "stopped", "n": n, "last": last})
    emit({"ev": "done"})


async def check(config: apersist.Config) -> None:
    calls: list[Any] = []
    async with apersist.run(config) as run:
        counts = await run.table("counts")
        replayed: list[int] = []
        first_live = None
        async for event in run.source("input", lambda off: numbers(off, calls)):
            if event.replayed:
                replayed.append(event.value["i"])
                continue
            first_live = event.value["i"]
            break
        emit({"ev": "check", "replayed": replayed, "counts": dict(counts),
              "offset": calls[0] if calls else "not called", "first_live": first_live})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    config = apersist.Config(backend_from_spec(args.spec), snapshot_interval_ms=50)  # type: ignore[arg-type]
    asyncio.run(check(config) if args.check else work(config))


if __name__ == "__main__":
    main()
