"""Values of your own types: a feed of dataclasses, the same type live and after a restart.

    python examples/typed_orders.py --store ./state     # run it twice: the second replays

``type=Order`` on the source and ``type=Position`` on the table: apersist stores them as
JSON and gives them back as ``Order`` and ``Position`` objects, so the loop body that works
on the first run works on every later one (without a type, a replayed value would be a
dict, and ``order.qty`` would fail). Money is a ``Decimal`` and stays exact; times are
aware ``datetime`` objects. ``mypy --strict`` checks this file: it sees ``event.value``
as an ``Order``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from decimal import Decimal

import apersist


@dataclasses.dataclass(frozen=True)
class Order:
    seq: int
    symbol: str
    qty: int
    price: Decimal
    at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Position:
    qty: int = 0
    cost: Decimal = Decimal(0)

    def add(self, order: Order) -> Position:
        return Position(self.qty + order.qty, self.cost + order.qty * order.price)


async def read_orders(offset: int | None) -> AsyncIterator[tuple[Order, int]]:
    """Three new orders after ``offset`` (a broker's feed, resumed where it stopped)."""
    first = 0 if offset is None else offset + 1
    for seq in range(first, first + 3):
        at = dt.datetime(2026, 1, 5, 9, 30, tzinfo=dt.UTC) + dt.timedelta(minutes=seq)
        yield Order(seq, "ACME", 10 + seq, Decimal("101.25") + Decimal(seq) / 4, at), seq


async def main(store: str) -> None:
    config = apersist.Config(apersist.Backend.filesystem(store))
    async with apersist.run(config) as run:
        positions = await run.table("positions", type=Position)
        async for event in run.source("orders", read_orders, type=Order):
            order = event.value  # an Order, replayed or live
            kind = "replayed" if event.replayed else "live"
            print(f"{kind:8} #{order.seq} {order.qty} {order.symbol} @ {order.price} "
                  f"at {order.at:%H:%M} ({type(order).__name__})")
            if not event.replayed:
                held = positions.get(order.symbol) or Position()
                positions[order.symbol] = held.add(order)
        position = positions["ACME"]
        print(f"position: {position.qty} ACME, cost {position.cost} ({type(position).__name__})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--store", required=True, help="a directory for the store")
    asyncio.run(main(parser.parse_args().store))
