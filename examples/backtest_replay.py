"""Replay modes for backtesting: record a price feed once, then run strategies over it.

    python examples/backtest_replay.py --store ./state

A live run records ticks (with their times: here a clock injected for the example, ticks
one minute apart, with an hour's outage in the middle). Backtests then replay the
recording into a strategy:

- ``SPEEDRUN_REPLAY``: as fast as possible, for a batch of backtests;
- ``REALTIME_REPLAY`` with ``realtime_speed`` and ``realtime_max_gap_ms``: at the
  recorded pace, sped up, with the outage cut short: to watch a strategy behave over time.

Replays read the store without writing to it (``SnapshotAccess.REPLAY`` and
``continue_after_replay=False``), so the recording stays as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

import apersist
from apersist.testing import FakeClock

MINUTE_MS = 60_000


async def record(store: str) -> None:
    clock = FakeClock(start_ms=1_700_000_000_000)
    price = 100.0

    async def ticks(offset: int | None) -> AsyncIterator[tuple[float, int]]:
        nonlocal price
        for i in range(0 if offset is None else offset + 1, 60):
            price = round(price * (1.01 if i % 3 else 0.985), 2)
            yield price, i
            clock.advance(60 * MINUTE_MS if i == 29 else MINUTE_MS)  # an outage after tick 29

    config = apersist.Config(apersist.Backend.filesystem(store))
    async with apersist.run(config, clock_ms=clock) as run:
        async for _ in run.source("ticks", ticks):
            pass


async def backtest(store: str, mode: str, **pace: float) -> tuple[float, float]:
    """A moving-average strategy over the recorded ticks: its profit, and the wall time."""
    config = apersist.Config(apersist.Backend.filesystem(store), persistence_mode=mode,
                             snapshot_access=apersist.SnapshotAccess.REPLAY,
                             continue_after_replay=False, **pace)  # type: ignore[arg-type]
    cash, held = 0.0, 0
    window: list[float] = []
    started = time.monotonic()
    async with apersist.run(config) as run:
        async for event in run.source("ticks", lambda offset: None):  # never read live
            window = [*window[-4:], event.value]
            average = sum(window) / len(window)
            if event.value < average and held == 0:
                cash, held = cash - event.value, 1
            elif event.value > average and held == 1:
                cash, held = cash + event.value, 0
    last = window[-1]
    return round(cash + held * last, 2), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--store", default="./backtest-state")
    args = parser.parse_args()
    asyncio.run(record(args.store))
    fast, fast_s = asyncio.run(backtest(args.store, "speedrun_replay"))
    paced, paced_s = asyncio.run(backtest(args.store, "realtime_replay", realtime_speed=6000,
                                          realtime_max_gap_ms=50))
    print(f"speedrun: profit {fast} in {fast_s:.2f} s")
    # 59 recorded gaps: 58 of a minute, at 6000x 10 ms each; the hour's outage cut to 50 ms.
    print(f"realtime at 6000x, gaps capped at 50 ms: profit {paced} in about "
          f"{round(paced_s, 1):.1f} s (the recording spans {58 + 60} minutes)")
    assert fast == paced, "a replay mode changes the pace, never the events"


if __name__ == "__main__":
    main()
