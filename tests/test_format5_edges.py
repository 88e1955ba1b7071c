"""Hostile review of storage format 5.0: compressed segments, inline commits and the
concurrent opening of a store. Each test here failed on ``main`` before its fix (or is an
``xfail(strict=True)`` describing a defect left open)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import apersist
from apersist import _format as fmt

# ----------------------------------------------------------------------------- compression


@pytest.mark.usefixtures("segment_objects")
async def test_a_small_segment_that_decompresses_big_is_checked_off_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a segment is checked in a worker thread was judged by its stored size: a
    segment of repetitive records (about 7 KiB stored for 7.5 MiB of records, under the
    32 KiB "compressed" threshold) was decompressed on the event loop's thread, stalling it
    as a 7.5 MiB raw segment (which goes to a thread) never would."""
    checked: list[tuple[int, int, bool]] = []
    original = fmt.SegmentView.__init__

    def spy(self: fmt.SegmentView, ref: fmt.SegmentRef, data: bytes) -> None:
        original(self, ref, data)
        checked.append((len(data), self.raw_bytes,
                        threading.current_thread() is threading.main_thread()))

    monkeypatch.setattr(fmt.SegmentView, "__init__", spy)
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=3_600_000)) as run:
        stream = run.stream("s")
        for _ in range(300_000):
            await stream.record({"a": "same" * 4})
    async with apersist.run(apersist.Config(
            backend, snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
        count = sum([1 async for _ in run.stream("s").replay()])
    assert count == 300_000
    big = [c for c in checked if c[1] > 1 << 20]
    assert big, checked
    assert all(stored < 32 << 10 for stored, _raw, _on_loop in big), checked  # a small object
    assert not any(on_loop for _stored, _raw, on_loop in big), checked
