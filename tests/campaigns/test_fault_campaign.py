"""The fault campaign: many runs in a row on one store, every storage call at risk.

Every run goes through ``RetryingDriver(FaultyDriver(real driver))`` with seeded random
faults of every kind: lost responses, timeouts, throttling, torn writes, latency, and a
few permanent errors. A run replays what the store holds, checks it against the model,
then records batches (events with offsets, and table updates) and commits each. Transient
faults must be ridden out; a permanent one ends the run with ``BackendError`` (at open, at
replay, at a commit or on leaving), and the next run must find exactly the acknowledged
state, or the state of the one commit that was in flight when the fault struck (a commit
is atomic: all of it or none). Nothing acknowledged is lost, nothing is replayed twice.

Size: ``APERSIST_FAULT_RUNS`` runs per backend (default 6). Reproduce a campaign with
``APERSIST_FAULT_SEED`` (printed). With ``APERSIST_FAULT_REPORT`` naming a file, one JSON
line of figures per backend is appended to it (``docs/reliability.md`` quotes them).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest
from conftest import make_backend

import apersist
from apersist import BackendError, RetryPolicy
from apersist._drivers import Driver, open_driver
from apersist._drivers.retry import RetryingDriver
from apersist.testing import FaultyDriver

RUNS = int(os.environ.get("APERSIST_FAULT_RUNS", "6"))
RATES = {"lost_response": 0.05, "timeout": 0.04, "throttle": 0.04, "torn_write": 0.04,
         "latency": 0.04, "permanent": 0.004}
# Enough attempts that transient faults alone never exhaust them (26% of calls fail).
POLICY = RetryPolicy(max_attempts=25, initial_backoff_s=0.0005, max_backoff_s=0.002)
# Batches per run and events per batch: object stores cost real round trips per call.
WORK = {"memory": (8, 25), "filesystem": (8, 25), "s3": (4, 10), "azure": (4, 10)}


async def _no_wait(_seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


class Model:
    """What the store must hold: the events and table of every acknowledged commit."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.table: dict[str, int] = {}

    def state(self) -> tuple[list[Any], dict[str, int]]:
        return list(self.events), dict(self.table)


async def read_store(backend: apersist.Backend) -> tuple[list[Any], dict[str, int], Any]:
    """Events, table and offset as a clean, read-only run sees them."""
    config = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(config) as run:
        stream = run.stream("events")
        events = [e.value async for e in stream.replay()]
        return events, dict(await run.table("counts")), stream.offset


@pytest.mark.parametrize("kind", list(WORK))
async def test_fault_campaign_loses_nothing_acknowledged(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    seed = int(os.environ.get("APERSIST_FAULT_SEED", random.SystemRandom().getrandbits(32)))
    print(f"fault campaign ({kind}): seed={seed} runs={RUNS} (APERSIST_FAULT_SEED to reproduce)")
    backend = make_backend(kind, tmp_path, request)
    rng = random.Random(seed)
    made: list[FaultyDriver] = []

    def open_faulty(config: apersist.Config) -> Driver:
        driver = open_driver(config.backend, config)
        if isinstance(driver, RetryingDriver):  # an object store's own retries: ours instead
            driver = driver.inner
        faulty = FaultyDriver(driver, seed=rng.getrandbits(32), max_latency_s=0.002, **RATES)
        made.append(faulty)
        return RetryingDriver(faulty, POLICY, rng=random.Random(rng.getrandbits(32)),
                              sleep=_no_wait)

    batches, per_batch = WORK[kind]
    # Only our commit() calls commit, so the model knows every commit boundary.
    config = apersist.Config(backend, snapshot_interval_ms=3_600_000)
    acked = Model()
    in_flight: tuple[list[Any], dict[str, int]] | None = None  # a commit the fault cut short
    failures: list[tuple[str, BackendError]] = []
    commits = events_checked = 0
    started = time.perf_counter()
    for number in range(RUNS):
        ctx = f"{kind}: seed={seed} run #{number}"
        driver = open_faulty(config)
        try:
            async with apersist.run(config, driver=driver) as run:
                stream = run.stream("events")
                table = await run.table("counts")
                events = [e.value async for e in stream.replay()]
                found = (events, dict(table))
                allowed = [acked.state()] + ([in_flight] if in_flight else [])
                assert found in allowed, (
                    f"{ctx}: the store holds neither the acknowledged state nor the in-flight "
                    f"commit: found {len(events)} events, acknowledged {len(acked.events)}")
                # Whichever it was, that is now the durable state; continue from it.
                acked.events, acked.table = list(found[0]), dict(found[1])
                in_flight = None
                events_checked += len(events)
                assert stream.offset == (len(events) or None), f"{ctx}: offset"
                for batch in range(batches):
                    for i in range(per_batch):
                        value = {"run": number, "batch": batch, "i": i}
                        key = f"k{i % 5}"
                        table[key] = table.get(key, 0) + 1
                        await stream.record(value, offset=len(acked.events) + i + 1)
                    pending = (acked.events + [{"run": number, "batch": batch, "i": i}
                                               for i in range(per_batch)], dict(table))
                    in_flight = pending
                    await run.commit()
                    acked.events, acked.table = pending
                    in_flight = None
                    commits += 1
                    assert stream.offset == len(acked.events), f"{ctx}: offset after commit"
        except BackendError as exc:
            # A permanent fault (or one the retries ran out on): the run is over.
            failures.append((ctx, exc))
        finally:
            await driver.aclose()  # given to the run, so ours to close
    for ctx, exc in failures:  # each must be one of ours, not some other failure
        assert "injected" in f"{exc} {exc.__cause__}", f"{ctx}: a failure no fault explains: {exc!r}"
    events, table_state, offset = await read_store(backend)  # clean: the real driver
    allowed = [acked.state()] + ([in_flight] if in_flight else [])
    # Acknowledged events the final replay holds, in order, from the start.
    kept = next((i for i, (a, b) in enumerate(zip(acked.events, events, strict=False))
                 if a != b), min(len(acked.events), len(events)))
    faults = sum(len(faulty.faults) for faulty in made)
    kinds = sorted({kind for faulty in made for _, _, kind in faulty.faults})
    figures = {"campaign": "faults", "backend": kind, "seed": seed, "runs": RUNS,
               "failed_runs": len(failures), "commits": commits, "faults_injected": faults,
               "fault_kinds": kinds, "events_checked": events_checked + len(events),
               "final_events": len(events), "events_lost": len(acked.events) - kept,
               "elapsed_s": round(time.perf_counter() - started, 1)}
    print(f"fault campaign ({kind}): " + " ".join(f"{k}={v}" for k, v in figures.items()))
    if report := os.environ.get("APERSIST_FAULT_REPORT"):
        async with await anyio.open_file(report, "ab") as out:
            await out.write(orjson.dumps(figures) + b"\n")
    assert (events, table_state) in allowed, f"{kind}: seed={seed}: final state"
    assert offset == (len(events) or None)
    assert faults > 0, f"{kind}: seed={seed}: no fault was injected"
    assert commits > 0, f"{kind}: seed={seed}: no commit was acknowledged"

