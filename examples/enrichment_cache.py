"""Enrichment through a slow async call, with ``@apersist.cached`` on a client's method.

    python examples/enrichment_cache.py --store ./state

Each event carries an address; the pipeline enriches it with a slow lookup (a geocoding
service, here 50 ms of sleep). ``@apersist.cached(key=...)`` persists each result, keyed
by the address alone (``self``, the client, is not JSON and does not identify the call):
a second run, or a restart after a crash, gets every result from the store without
calling the service, and concurrent lookups of one address call it once.
"""

from __future__ import annotations

import argparse
import asyncio

import apersist

ADDRESSES = ["1 Main St", "2 Oak Ave", "1 Main St", "3 Elm Rd", "2 Oak Ave", "1 Main St"]


class Geocoder:
    """A client of a slow service; ``calls`` counts the requests it really made."""

    def __init__(self, region: str) -> None:
        self.region = region
        self.calls = 0

    @apersist.cached(name="geocode", version=1, key=lambda self, address: [self.region, address])
    async def locate(self, address: str) -> dict[str, float]:
        self.calls += 1
        await asyncio.sleep(0.05)  # the network
        number = sum(map(ord, address))
        return {"lat": 50 + number % 10 / 10, "lon": 4 + number % 7 / 10}


async def enrich(store: str) -> int:
    geocoder = Geocoder(region="eu")
    async with apersist.run(apersist.Config(apersist.Backend.filesystem(store))) as run:
        located = await run.table("located")
        # The lookups of one batch run concurrently; repeated addresses call the service once.
        places = await asyncio.gather(*(geocoder.locate(a) for a in ADDRESSES))
        for address, place in zip(ADDRESSES, places, strict=True):
            located[address] = place
        print(f"{len(ADDRESSES)} lookups, {geocoder.calls} calls to the service; "
              f"cache hits so far: {run.stats['cache_hits']}")
    return geocoder.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--store", default="./enrichment-state")
    args = parser.parse_args()
    first = asyncio.run(enrich(args.store))
    second = asyncio.run(enrich(args.store))  # a restart: every result comes from the store
    print(f"first run: {first} calls; second run: {second} calls")


if __name__ == "__main__":
    main()
