"""Metrics through OpenTelemetry: what a run reports, read with the SDK's in-memory reader.

Each test gives the run its own ``MeterProvider`` (``apersist.run(config,
meter_provider=...)``); the global provider, which OpenTelemetry lets a process set once,
is tried in a subprocess, and so is a run without OpenTelemetry installed.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import CountingDriver, wait_until

# The SDK is in the ``test`` extra; apersist itself needs only the API (``otel`` extra).
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import apersist
from apersist import _metrics
from apersist._config import RetryPolicy
from apersist._drivers import open_driver
from apersist._drivers.retry import RetryingDriver
from apersist.testing import FakeClock, FaultyDriver

ROOT = Path(__file__).resolve().parents[1]
QUIET = 3_600_000  # an interval no test waits for: only the commits a test asks for
FS = {"apersist.backend": "filesystem"}
MEM = {"apersist.backend": "memory"}


def _of(stream: str, backend: str = "filesystem") -> dict[str, str]:
    return {"apersist.backend": backend, "apersist.stream": stream}


class Reader:
    """A ``MeterProvider`` with an in-memory reader, and what it read, point by point."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def points(self) -> dict[tuple[str, frozenset[tuple[str, Any]]], Any]:
        """{(metric name, attributes): value}; a histogram's value is (count, sum)."""
        found: dict[tuple[str, frozenset[tuple[str, Any]]], Any] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                assert (scope.scope.name, scope.scope.version) == ("apersist", apersist.__version__)
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        value = (point.count, point.sum) if hasattr(point, "count") else point.value
                        found[metric.name, frozenset(point.attributes.items())] = value
        return found

    def value(self, name: str, attrs: dict[str, str]) -> Any:
        return self.points().get((name, frozenset(attrs.items())))

    def units(self) -> dict[str, str]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return {metric.name: metric.unit for resource in data.resource_metrics
                for scope in resource.scope_metrics for metric in scope.metrics}


@pytest.fixture
def otel() -> Reader:
    return Reader()


async def _reader(offset: Any) -> AsyncIterator[tuple[dict[str, int], int]]:
    start = 0 if offset is None else offset + 1
    for i in range(start, start + 40):
        yield {"i": i}, i


async def test_a_run_reports_its_commits_and_events_exactly(otel: Reader, tmp_path: Path) -> None:
    """Events recorded (record, record_many, a source's live events), counted per stream
    when their commit lands; commits with their duration and size; then the replay."""
    config = apersist.Config(apersist.Backend.filesystem(tmp_path / "store"),
                             snapshot_interval_ms=QUIET)
    clock = FakeClock(1_700_000_000_000)  # one millisecond: record() batches its events
    async with apersist.run(config, clock_ms=clock, meter_provider=otel.provider) as run:
        orders = run.stream("orders")
        for i in range(1000):
            await orders.record({"i": i})
        await orders.record_many(range(500), offsets=range(500))
        assert otel.value("apersist.events.recorded", _of("orders")) is None  # not durable yet
        first = await run.commit()
        assert otel.value("apersist.events.recorded", _of("orders")) == 1500
        assert otel.value("apersist.commits", FS) == 1
        async for event in run.source("live", _reader):
            if event.value["i"] == 39:
                break
        counts = await run.table("counts")
        counts["a"] = 1  # a table delta: committed, but no event
    stats = run.stats
    assert otel.value("apersist.events.recorded", _of("orders")) == 1500
    assert otel.value("apersist.events.recorded", _of("live")) == 40
    assert otel.value("apersist.commits", FS) == stats["commits"] == 2
    count, seconds = otel.value("apersist.commit.duration", FS)
    assert count == 2
    assert 0 < seconds < 60
    assert otel.value("apersist.commit.size", FS) == (2, stats["bytes_written"])
    assert first.bytes < stats["bytes_written"]
    units = otel.units()
    assert units["apersist.events.recorded"] == "{event}"
    assert units["apersist.commits"] == "{commit}"
    assert (units["apersist.commit.duration"], units["apersist.commit.size"]) == ("s", "By")

    # The next run replays; the same provider adds to the same instruments.
    async with apersist.run(config, clock_ms=clock, meter_provider=otel.provider) as run:
        assert len([e async for e in run.stream("orders").replay()]) == 1500
        assert otel.value("apersist.events.replayed", _of("orders")) == 1500
        assert len([e async for e in run.stream("orders").replay()]) == 1500  # again: counted again
        async for event in run.source("live", _reader):
            if not event.replayed:
                break
    assert otel.value("apersist.events.replayed", _of("orders")) == 3000
    assert otel.value("apersist.events.replayed", _of("live")) == 40
    assert otel.value("apersist.replay.remaining", _of("orders")) == 0
    assert otel.value("apersist.replay.remaining", _of("live")) == 0
    assert otel.value("apersist.events.recorded", _of("live")) == 41  # the live event after
    assert otel.value("apersist.commits", FS) == 3
    assert ("apersist.backpressure.waits", frozenset(FS.items())) not in otel.points()
    assert not any(name == "apersist.driver.retries" for name, _ in otel.points())


async def test_replay_progress_is_reported_as_it_goes(otel: Reader, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``apersist.replay.remaining`` falls as chunks are handed on and is 0 once the replay
    ends, or is abandoned part-way."""
    monkeypatch.setattr(_metrics, "_REPLAY_FLUSH_NS", 0)  # tell the SDK at every chunk
    config = apersist.Config(apersist.Backend.filesystem(tmp_path / "store"),
                             snapshot_interval_ms=QUIET)
    clock = FakeClock(1_700_000_000_000)
    async with apersist.run(config, clock_ms=clock) as run:
        await run.stream("s").record_many(range(1000))
    async with apersist.run(config, clock_ms=clock, meter_provider=otel.provider) as run:
        replay = run.stream("s").replay()
        assert (await replay.__anext__()).value == 0
        # The first chunk (a batch record of 256) is handed on, the rest still to come.
        assert otel.value("apersist.events.replayed", _of("s")) == 256
        assert otel.value("apersist.replay.remaining", _of("s")) == 744
        for _ in range(255):
            await replay.__anext__()
        assert otel.value("apersist.replay.remaining", _of("s")) == 744
        assert (await replay.__anext__()).value == 256
        assert otel.value("apersist.replay.remaining", _of("s")) == 488
        # Abandoned: once asyncio has closed the generators under it (each at the loop's
        # next turn), nothing of it stays in the backlog.
        await replay.aclose()
        await wait_until(lambda: otel.value("apersist.replay.remaining", _of("s")) == 0)
        assert otel.value("apersist.events.replayed", _of("s")) == 512


async def _no_wait(_seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_retries_are_counted_through_a_faulty_driver(otel: Reader) -> None:
    """A retry layer inside the driver a run is given counts each retry, by verb; the
    layer gets its hook back when the run ends."""
    backend = apersist.Backend.memory()
    faulty = FaultyDriver(open_driver(backend))
    driver = RetryingDriver(faulty, RetryPolicy(max_attempts=10), rng=random.Random(0),
                            sleep=_no_wait)
    config = apersist.Config(backend, snapshot_interval_ms=QUIET)
    async with apersist.run(config, driver=driver, meter_provider=otel.provider) as run:
        faulty.fail_next("put", "throttle", key="writers/0/segments/*", times=3)
        faulty.fail_next("put", "timeout", key="writers/0/commits/*")
        await run.stream("s").record("x")
        await run.commit()
        assert otel.value("apersist.driver.retries",
                          {**MEM, "apersist.operation": "put"}) == 4
    assert driver.on_retry is None
    async with apersist.run(config, driver=driver, meter_provider=otel.provider) as run:
        faulty.fail_next("get", "lost_response", times=2)
        assert [e.value async for e in run.stream("s").replay()] == ["x"]
    assert otel.value("apersist.driver.retries", {**MEM, "apersist.operation": "get"}) == 2
    assert otel.value("apersist.driver.retries", {**MEM, "apersist.operation": "put"}) == 4
    assert otel.units()["apersist.driver.retries"] == "{retry}"
    await driver.aclose()


async def test_a_failed_commit_is_counted_with_its_error_type(otel: Reader) -> None:
    backend = apersist.Backend.memory()
    faulty = FaultyDriver(open_driver(backend))
    config = apersist.Config(backend, snapshot_interval_ms=QUIET)

    async def a_run_whose_second_commit_fails() -> None:
        async with apersist.run(config, driver=faulty, meter_provider=otel.provider) as run:
            await run.stream("s").record("kept")
            await run.commit()
            await run.stream("s").record("lost")
            faulty.fail_next("put", "permanent", key="writers/0/commits/*")
            await run.commit()

    with pytest.raises(apersist.BackendError):
        await a_run_whose_second_commit_fails()
    failed = {**MEM, "error.type": "BackendError"}
    assert otel.value("apersist.commits", MEM) == 1
    assert otel.value("apersist.commits", failed) == 1
    assert otel.value("apersist.commit.duration", failed)[0] == 1
    assert otel.value("apersist.commit.size", MEM)[0] == 1  # only a commit that landed
    assert otel.value("apersist.events.recorded", _of("s", "memory")) == 1
    await faulty.aclose()


async def test_back_pressure_waits_are_counted(otel: Reader) -> None:
    config = apersist.Config(apersist.Backend.memory(), snapshot_interval_ms=QUIET,
                             max_pending_bytes=4096)
    async with apersist.run(config, meter_provider=otel.provider) as run:
        stream = run.stream("s")
        for i in range(500):
            await stream.record({"payload": "p" * 100}, offset=i)
        # Under the long interval only back-pressure commits, and each commit so far
        # ended a wait of the one writer (the final one, below, ends none).
        commits = run.stats["commits"]
        assert otel.value("apersist.backpressure.waits", MEM) == commits > 5
    waits = otel.value("apersist.backpressure.waits", MEM)
    assert waits == commits
    count, seconds = otel.value("apersist.backpressure.duration", MEM)
    assert count == waits
    assert seconds > 0
    assert otel.units()["apersist.backpressure.duration"] == "s"


class _CountingMeter:
    """A meter whose instruments count their calls (and take no advisory buckets, as an
    OpenTelemetry API older than 1.30)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.made: list[str] = []

    def get_meter(self, name: str, version: str | None = None) -> _CountingMeter:
        return self

    def _instrument(self, name: str, **_kwargs: Any) -> Any:
        self.made.append(name)
        meter = self

        class Instrument:
            def add(self, amount: float, attributes: Any = None) -> None:
                meter.calls.append((name, amount))

            record = add

        return Instrument()

    create_counter = create_up_down_counter = _instrument

    def create_histogram(self, name: str, unit: str = "", description: str = "") -> Any:
        return self._instrument(name)


async def test_no_instrument_is_called_per_event(tmp_path: Path) -> None:
    """Events are counted in bulk: 20,000 events recorded, live and replayed make a few
    calls of the instruments, not one per event. Instruments are made once per provider."""
    meter = _CountingMeter()
    config = apersist.Config(apersist.Backend.filesystem(tmp_path / "store"))

    async def reader(offset: Any) -> AsyncIterator[int]:
        for i in range(5000):
            yield i

    for _ in range(2):
        async with apersist.run(config, meter_provider=meter) as run:
            for i in range(5000):
                await run.stream("a").record(i)
            async for event in run.source("b", reader):
                if event.value == 4999 and not event.replayed:
                    break
            async for _event in run.stream("a").replay():
                pass
    assert len(meter.made) == len(set(meter.made)) == 9
    commits = sum(amount for name, amount in meter.calls if name == "apersist.commits")
    per_commit = 3 + 2  # count, duration, size; the events of each of two streams
    per_replay = 3  # at its end: replayed, and the backlog's rise and fall
    assert len(meter.calls) <= commits * per_commit + 4 * per_replay
    recorded = sum(amount for name, amount in meter.calls if name == "apersist.events.recorded")
    assert recorded == 20_000
    replayed = sum(amount for name, amount in meter.calls if name == "apersist.events.replayed")
    assert replayed == 5000 + 5000  # the second run's: b by its source, a by replay()


async def test_meter_provider_is_checked_at_the_call() -> None:
    config = apersist.Config(apersist.Backend.memory())
    with pytest.raises(TypeError, match="meter_provider must be an OpenTelemetry MeterProvider"):
        apersist.run(config, meter_provider=object())


async def test_a_driver_without_a_retry_layer_is_left_alone(otel: Reader) -> None:
    backend = apersist.Backend.memory()
    driver = CountingDriver(open_driver(backend))
    async with apersist.run(apersist.Config(backend), driver=driver,
                            meter_provider=otel.provider) as run:
        await run.stream("s").record(1)
    assert not hasattr(driver, "on_retry")


def _python(code: str, tmp_path: Path) -> str:
    (tmp_path / "probe.py").write_text(textwrap.dedent(code), encoding="utf-8")
    proc = subprocess.run([sys.executable, "probe.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def test_without_opentelemetry_a_run_works_and_imports_nothing(tmp_path: Path) -> None:
    out = _python("""
        import sys
        sys.modules["opentelemetry"] = None  # as if it were not installed
        import asyncio
        import apersist
        from apersist import _metrics

        async def main():
            config = apersist.Config(apersist.Backend.filesystem("store"))
            async with apersist.run(config) as run:
                await run.stream("s").record_many(range(300))
                await run.commit()
                assert run._metrics is _metrics.NO_METRICS
            async with apersist.run(config) as run:
                print(len([e async for e in run.stream("s").replay()]), run.stats["commits"])

        asyncio.run(main())
        print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
        print(sys.modules["opentelemetry"])
    """, tmp_path)
    assert out == "300 0\n['opentelemetry']\nNone\n"


def test_importing_apersist_imports_no_opentelemetry(tmp_path: Path) -> None:
    """Installed, OpenTelemetry is imported at the first run, not by ``import apersist``."""
    out = _python("""
        import sys
        import apersist, apersist.testing
        print(any(name.startswith("opentelemetry") for name in sys.modules))
    """, tmp_path)
    assert out == "False\n"


def test_the_global_meter_provider_is_used_even_when_set_after_a_run(tmp_path: Path) -> None:
    out = _python("""
        import asyncio
        import apersist
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        config = apersist.Config(apersist.Backend.memory())

        async def once():
            async with apersist.run(config) as run:
                await run.stream("s").record_many(range(7))

        asyncio.run(once())  # before any provider is set: reported nowhere
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        asyncio.run(once())
        for resource in reader.get_metrics_data().resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name in ("apersist.commits", "apersist.events.recorded"):
                        for point in metric.data.data_points:
                            print(metric.name, point.value)
    """, tmp_path)
    assert out == "apersist.commits 1\napersist.events.recorded 7\n"


async def test_the_retry_layer_of_an_object_store_run_is_watched(otel: Reader) -> None:
    """S3 and Azure runs open their own retry layer: its retries count the same way."""
    from apersist import AwsS3Settings, Backend

    backend = Backend.s3("root", AwsS3Settings("bucket", access_key="k", secret_access_key="s",
                                               endpoint="http://127.0.0.1:9"))
    driver = open_driver(backend)  # makes no request
    assert isinstance(driver, RetryingDriver)
    metrics = _metrics.metrics_for(otel.provider, backend.kind)
    unwatch = metrics.watch_retries(driver)
    assert driver.on_retry is not None
    driver.on_retry("list")
    unwatch()
    assert driver.on_retry is None
    assert otel.value("apersist.driver.retries", {"apersist.backend": "s3",
                                                  "apersist.operation": "list"}) == 1
    await driver.aclose()


class _BrokenMeter(_CountingMeter):
    """A meter whose instruments raise on every measurement."""

    def _instrument(self, name: str, **_kwargs: Any) -> Any:
        class Instrument:
            def add(self, amount: float, attributes: Any = None) -> None:
                raise RuntimeError("exporter on fire")

            record = add

        return Instrument()

    create_counter = create_up_down_counter = _instrument


async def test_a_broken_meter_fails_no_commit(caplog: pytest.LogCaptureFixture) -> None:
    """Measurements are taken inside commits: an instrument that raises is logged once
    and left out, and the run persists as ever."""
    backend = apersist.Backend.memory()
    config = apersist.Config(backend, snapshot_interval_ms=QUIET)
    broken = _BrokenMeter()
    for _ in range(2):
        async with apersist.run(config, meter_provider=broken) as run:
            await run.stream("s").record_many(range(3))
            assert (await run.commit()).deltas == 3
            assert len([e async for e in run.stream("s").replay()]) in (0, 3)
    async with apersist.run(config) as run:
        assert [e.value async for e in run.stream("s").replay()] == [0, 1, 2] * 2
    failed = [r for r in caplog.records if r.getMessage().startswith("a metric instrument failed")]
    names = [r.getMessage().rsplit("name=", 1)[1] for r in failed]
    assert sorted(set(names)) == sorted(names)  # once each, per provider
    assert {"apersist.commits", "apersist.events.recorded", "apersist.events.replayed"} <= set(
        names)
