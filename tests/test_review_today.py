"""Hostile review of the changes since 81e364e: the defects found, one failing test each."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import CountingDriver, driver_for

import apersist
from apersist import _format as fmt
from apersist._drivers.base import ObjectInfo


async def _one_event_commits(backend: apersist.Backend, count: int) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("s")
        for i in range(count):
            await stream.record({"i": i})
            await run.commit()


class _NextBucketFails(CountingDriver):
    """Listing the second bucket of commit keys fails (an outage, a throttled prefix)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.failed = 0

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        if prefix == fmt.commit_bucket_prefix("0", 1):
            self.failed += 1
            raise apersist.BackendError(f"listing refused (injected): key={prefix}")
        async for info in super().list(prefix):
            yield info


async def test_a_failing_speculative_listing_of_the_next_bucket_does_not_fail_the_open() -> None:
    """A log that starts near its bucket's end (checkpoint 896) but ends well inside it
    (900) never needs the next bucket: the open read it before 1310cd8. The listing of
    the next bucket made beside it now is thrown away when it succeeds, but when it
    fails its error fails the open, for an answer nobody needed."""
    backend = apersist.Backend.memory()
    await _one_event_commits(backend, 900)
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with driver_for(cfg, _NextBucketFails) as driver, \
            apersist.run(cfg, driver=driver) as run:
        assert len([e async for e in run.stream("s").replay()]) == 900


class _NextBucketFailsOnce(_NextBucketFails):
    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        if prefix == fmt.commit_bucket_prefix("0", 1) and self.failed:
            async for info in CountingDriver.list(self, prefix):
                yield info
            return
        async for info in super().list(prefix):
            yield info


@pytest.mark.parametrize("wrap", [_NextBucketFailsOnce, _NextBucketFails])
async def test_a_log_that_goes_on_into_the_next_bucket_still_needs_its_listing(wrap: Any) -> None:
    """The other side of the test above: when the log does go on into the next bucket
    (1003 commits from checkpoint 896), a failed speculative listing is never taken as an
    empty bucket. Listed again, it is read whole; failing again, the open says so."""
    backend = apersist.Backend.memory()
    await _one_event_commits(backend, fmt.BUCKET + 3)
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    if wrap is _NextBucketFails:
        with pytest.raises(apersist.BackendError, match="injected"):
            async with driver_for(cfg, wrap) as driver, apersist.run(cfg, driver=driver):
                pass
        return
    async with driver_for(cfg, wrap) as driver, apersist.run(cfg, driver=driver) as run:
        assert len([e async for e in run.stream("s").replay()]) == fmt.BUCKET + 3
    assert driver.failed == 1


# ------------------------------------------------------------- cache records and verify


@pytest.mark.usefixtures("segment_objects")
@pytest.mark.parametrize("bad", [b"[1,2]", b'["k" ,1,2]', b"result"])
async def test_apersist_verify_reports_the_cache_record_that_fails_every_open(bad: bytes) -> None:
    """29c35bf made a cache record of another shape ``CorruptDataError`` at the open:
    every run of the store now fails there. ``apersist verify`` ("read and check every
    live object") walks a cache segment's framing only, never its records' JSON, and
    reports the store healthy."""
    from test_format5_edges import _cache_store_with_record, _verified

    backend, key, at = await _cache_store_with_record(bad)
    with pytest.raises(apersist.CorruptDataError, match=f"key={key} offset={at}$"):
        async with apersist.run(apersist.Config(backend)):
            pass
    problems = await _verified(backend)
    assert [p for p in problems if f"key={key} offset={at}" in p], problems


@pytest.mark.usefixtures("segment_objects")
async def test_apersist_verify_reports_a_cached_result_that_fails_its_call() -> None:
    """Likewise a record of the right shape whose result is not JSON: the ``@cached`` call
    that reads it raises ``CorruptDataError`` (``_decoded``), verify says nothing."""
    from test_format5_edges import _cache_store_with_record, _verified

    backend, key, at = await _cache_store_with_record(b'["edges.square:1:00",{bad]')
    problems = await _verified(backend)
    assert [p for p in problems if f"key={key} offset={at}" in p], problems
