"""A queue-fed service: orders from a broker feed per-customer totals, and a deploy
(SIGTERM) stops it cleanly.

    python examples/queue_service.py --store ./state           # runs until Ctrl-C / SIGTERM
    python examples/queue_service.py --store ./state --stop-after 500

The broker here is simulated: a task puts orders on an ``asyncio.Queue`` as they "arrive",
each with its sequence number, and a restart asks it to resume after the last committed
one (as a Kafka consumer seeks to an offset). The service keeps the totals in a table,
so it keeps only the offsets of the stream (``Retention(max_events=0)``): a restart
replays nothing and goes on from where the last run stopped.

With ``stop_on_signals=True`` the first SIGTERM or Ctrl-C ends the source loop after the
order in hand, the final commit lands, and the process exits 0; nothing processed is
processed again after the restart. ``--stop-after N`` calls ``run.stop()`` itself after N
orders (the smoke test's way of sending the signal).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import apersist

CUSTOMERS = ("ada", "bob", "cy")


async def broker(queue: asyncio.Queue[tuple[dict[str, Any], int]], after: int | None) -> None:
    """Orders arriving from the network, from the one after ``after`` on."""
    seq = 0 if after is None else after + 1
    while True:
        order = {"customer": CUSTOMERS[seq % len(CUSTOMERS)], "cents": 100 + seq % 50}
        await queue.put((order, seq))
        seq += 1
        await asyncio.sleep(0.001)


async def serve(store: str, stop_after: int | None) -> dict[str, Any]:
    config = apersist.Config(apersist.Backend.filesystem(store), snapshot_interval_ms=200)
    queue: asyncio.Queue[tuple[dict[str, Any], int]] = asyncio.Queue(maxsize=100)
    feed: asyncio.Task[None] | None = None

    async def orders(offset: int | None) -> AsyncIterator[tuple[dict[str, Any], int]]:
        nonlocal feed
        feed = asyncio.create_task(broker(queue, offset))  # subscribe after the offset
        while True:
            yield await queue.get()

    async with apersist.run(config, stop_on_signals=True) as run:
        totals = await run.table("totals")
        processed = 0
        source = run.source("orders", orders, retention=apersist.Retention(max_events=0))
        async for event in source:
            if event.replayed:
                continue  # none here: the table holds their effect, and the stream only offsets
            order = event.value
            totals[order["customer"]] = totals.get(order["customer"], 0) + order["cents"]
            processed += 1
            if processed == stop_after:
                run.stop()  # what SIGTERM does with stop_on_signals=True
        if feed is not None:
            feed.cancel()  # unsubscribe
        print(f"stopped cleanly after {processed} orders; last offset {event.offset}")
        return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--store", default="./queue-service-state")
    parser.add_argument("--stop-after", type=int, default=None)
    args = parser.parse_args()
    totals = asyncio.run(serve(args.store, args.stop_after))
    print("totals (cents):", totals)


if __name__ == "__main__":
    main()
