"""The object stores as a remote store answers: the backend workloads behind a latency proxy.

moto_server and Azurite on loopback answer a small request in about a millisecond and share
this machine's cores with apersist, so what concurrency saves on a real store, 10-50 ms per
request, does not show against them. Here each workload runs through
``tests/support/latency_proxy.py``, which adds ``--latency-ms`` (default 0 and 20) to every
HTTP request, and counts the requests. Per backend and latency:

1. **commit latency of 1 and 16 segments** (16 KiB each, explicit commits only): target at
   a non-zero latency, 16 segments in at most 1.5x one segment's time (the segments go up
   concurrently, so 16 cost one round trip more than 1, not 16);
2. **requests per commit** of each (by HTTP method), from the proxy's counters;
3. **replay read-ahead**: 200 segments (of ~64 KiB) replayed as shipped against
   ``read_concurrency=1`` (one GET at a time); target at least 8x at a non-zero latency;
4. **open time of a long history**: a store of ``history`` one-event commits (5,000: its
   checkpoints are in play), entered as a writer and read-only (``SnapshotAccess.REPLAY``),
   with the requests each made.

The stores are written directly to the server (no delay: only what is measured goes
through the proxy). ``python -m benchmarks.latency --trace`` prints instead every request of
a commit, of opening a store (writer and reader) and of a run's end at 20 ms, grouped into
the round trips that waited on each other (``docs/performance.md``, "Round trips").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


import apersist

from .backends import (
    BUCKET,
    CONTAINER,
    KIB,
    STREAMS,
    Under,
    azure_under,
    config,
    create_bucket,
    create_container,
    replay_once,
    s3_under,
    text_payload,
    write_replay_stream,
)
from .common import Report, Row, Series, Settings, Target, guarded, log, median

# The proxy lives with the tests' servers (tests/support), imported as they are (backends.py).
SUPPORT = str(Path(__file__).resolve().parent.parent / "tests" / "support")
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)
from latency_proxy import LatencyProxy, TracedRequest  # noqa: E402 (tests/support, just above)

COMMIT_RATIO_TARGET = 1.5  # 16 segments' commit over 1 segment's, at a real latency
READ_AHEAD_TARGET = 8.0
COMMIT_SEGMENT = 16 * KIB


@dataclass(frozen=True, slots=True)
class LatencySettings:
    latencies: tuple[float, ...]
    commit_samples: int
    replay_segments: int
    replay_segment: int
    replay_repeats: int
    history: int  # one-event commits of the long store
    open_repeats: int

    @classmethod
    def make(cls, settings: Settings) -> LatencySettings:
        if settings.quick:
            return cls(settings.latency_ms, 3, 16, 16 * KIB, 1, 100, 1)
        return cls(settings.latency_ms, 10, 200, 64 * KIB, 2, settings.latency_history, 3)


def behind(under: Under, url: str) -> Under:
    """``under``'s backend, reached through ``url`` (a proxy in front of its server)."""
    made = s3_under(url) if under.name.startswith("S3") else azure_under(url)
    return Under(under.name, made.make, url, under.pid)


def _label(delay_ms: float) -> str:
    return f"{delay_ms:g} ms/request"


def _counts(counts: dict[str, int]) -> str:
    return " + ".join(f"{n} {method}" for method, n in sorted(counts.items())) or "none"


# --------------------------------------------------------------------------- 1, 2. commits


async def commit_latency(target: Under, proxy: LatencyProxy, sizes: LatencySettings,
                         report: Report) -> None:
    delay = proxy.delay_ms
    payload = text_payload(COMMIT_SEGMENT - 256)
    samples: dict[int, list[float]] = {1: [], STREAMS: []}
    requests: dict[int, dict[str, int]] = {}
    async with apersist.run(config(target.backend("latency-commit"))) as run:
        streams = [run.stream(f"s{i:02d}") for i in range(STREAMS)]
        for index in range(sizes.commit_samples + 1):  # sample 0 warms the connections up
            for n in (1, STREAMS) if index % 2 else (STREAMS, 1):
                for stream in streams[:n]:
                    await stream.record(payload)
                proxy.reset()
                start = time.perf_counter()
                await run.commit()
                elapsed = (time.perf_counter() - start) * 1000
                if index:
                    samples[n].append(elapsed)
                    requests[n] = proxy.counts()
    report.rows.append(Row(
        f"commit latency at {_label(delay)}: {STREAMS} segments vs 1 (16 KiB each), p50", "backends",
        "ms", Series(f"{STREAMS} segments", [median(samples[STREAMS])], "apersist"),
        [Series("1 segment", [median(samples[1])], "one segment")],
        [Target("one segment", at_most=COMMIT_RATIO_TARGET)] if delay else [], backend=target.name,
        note=f"{len(samples[1])} samples each, interleaved; requests per commit: 1 segment "
             f"{_counts(requests[1])}, {STREAMS} segments {_counts(requests[STREAMS])}"))
    for n in (1, STREAMS):
        report.rows.append(Row(
            f"requests per commit at {_label(delay)}: {n} segment{'s' * (n > 1)}", "backends",
            "requests", Series("HTTP requests", [float(sum(requests[n].values()))], "apersist"),
            backend=target.name, note=f"by method: {_counts(requests[n])}"))
    report.series.setdefault("latency", {}).setdefault(target.name, {})[str(delay)] = {
        "commit_1_ms": median(samples[1]), f"commit_{STREAMS}_ms": median(samples[STREAMS]),
        "requests_1": requests[1], f"requests_{STREAMS}": requests[STREAMS]}


# --------------------------------------------------------------------------- 3. replay


async def replay_read_ahead(target: Under, direct: Under, proxy: LatencyProxy,
                            sizes: LatencySettings, report: Report) -> None:
    delay = proxy.delay_ms
    root = direct.backend("latency-replay")  # written without delay
    bs = _ReplaySizes(sizes.replay_segments, sizes.replay_segment)
    events, segments, _ = await write_replay_stream(root, bs)  # type: ignore[arg-type] (duck-typed)
    proxied = behind(direct, proxy.url).make(_root_of(root))
    rates: dict[str, list[float]] = {"ahead": [], "one": []}
    requests: dict[str, int] = {}
    access = apersist.SnapshotAccess.REPLAY
    async with apersist.run(apersist.Config(proxied, snapshot_access=access)) as run:
        shipped = run._store.read_concurrency  # private: no Config field sets it
        stream = run.stream("replay")
        await replay_once(run, stream, events, window=shipped)  # warm-up
        for index in range(sizes.replay_repeats):
            for variant in ("one", "ahead") if index % 2 == 0 else ("ahead", "one"):
                proxy.reset()
                window = 1 if variant == "one" else shipped
                rates[variant].append(events / await replay_once(run, stream, events, window=window))
                requests[variant] = proxy.total()
    report.rows.append(Row(
        f"replay at {_label(delay)}: {segments} segments of {sizes.replay_segment / KIB:.0f} KiB, "
        f"read-ahead ({shipped}) vs 1 at a time", "backends", "ev/s",
        Series(f"read_concurrency={shipped} (as shipped)", rates["ahead"], "apersist"),
        [Series("read_concurrency=1", rates["one"], "sequential")],
        [Target("sequential", at_least=READ_AHEAD_TARGET)] if delay else [], backend=target.name,
        note=f"{events:,} events; requests per replay: {requests['ahead']} read-ahead, "
             f"{requests['one']} one at a time"))
    entry = report.series.setdefault("latency", {}).setdefault(target.name, {}).setdefault(str(delay), {})
    entry["replay_ahead_s"] = events / median(rates["ahead"])
    entry["replay_one_s"] = events / median(rates["one"])


@dataclass(frozen=True, slots=True)
class _ReplaySizes:
    """What ``write_replay_stream`` reads of ``BackendSettings``."""

    replay_segments: int
    replay_segment: int


def _root_of(backend: apersist.Backend) -> str:
    return str(backend.root_path)  # S3Backend and AzureBackend have one


# --------------------------------------------------------------------------- 4. open


async def build_history(backend: apersist.Backend, commits: int) -> None:
    """``commits`` commits of one event each (explicit commits only)."""
    async with apersist.run(config(backend)) as run:
        stream = run.stream("history")
        for i in range(commits):
            await stream.record({"n": i})
            await run.commit()


async def open_history(target: Under, long_root: str, proxy: LatencyProxy, sizes: LatencySettings,
                       report: Report) -> None:
    delay = proxy.delay_ms
    backend = target.make(long_root)
    times: dict[str, list[float]] = {"writer": [], "reader": []}
    requests: dict[str, dict[str, int]] = {}
    for index in range(sizes.open_repeats + 1):  # 0 warms up (the SDK's first client)
        for role in ("writer", "reader"):
            access = apersist.SnapshotAccess.REPLAY if role == "reader" else None
            cfg = apersist.Config(backend, snapshot_access=access) if access else config(backend)
            proxy.reset()
            start = time.perf_counter()
            async with apersist.run(cfg):
                opened = time.perf_counter() - start
                counts = proxy.counts()
            if index:
                times[role].append(opened * 1000)
                requests[role] = counts
    for role in ("writer", "reader"):
        report.rows.append(Row(
            f"open a store of {sizes.history:,} commits at {_label(delay)}: "
            f"{'as a writer' if role == 'writer' else 'read-only (replay)'}", "backends", "ms",
            Series("enter apersist.run", times[role], "apersist"), backend=target.name,
            note=f"requests: {_counts(requests[role])}"))
    entry = report.series.setdefault("latency", {}).setdefault(target.name, {}).setdefault(str(delay), {})
    entry["open_writer_ms"] = median(times["writer"])
    entry["open_reader_ms"] = median(times["reader"])
    entry["open_writer_requests"] = requests["writer"]
    entry["open_reader_requests"] = requests["reader"]


# --------------------------------------------------------------------------- the section


async def section_latency(direct: Under, settings: Settings, report: Report) -> None:
    """Every latency workload on one backend, at each of ``settings.latency_ms``."""
    sizes = LatencySettings.make(settings)
    long_store = direct.backend("latency-history")
    log(f"{direct.name}: writing a store of {sizes.history:,} commits")
    started = time.perf_counter()
    await build_history(long_store, sizes.history)
    report.notes[f"{direct.name}, latency: long store written in"] = f"{time.perf_counter() - started:.1f} s"
    for delay in sizes.latencies:
        with LatencyProxy(direct.url, delay_ms=delay) as proxy:
            target = behind(direct, proxy.url)
            log(f"{direct.name} at {_label(delay)}: commit latency")
            await guarded(report, f"{direct.name} at {_label(delay)}: commits",
                          commit_latency(target, proxy, sizes, report))
            log(f"{direct.name} at {_label(delay)}: replay read-ahead")
            await guarded(report, f"{direct.name} at {_label(delay)}: replay",
                          replay_read_ahead(target, direct, proxy, sizes, report))
            log(f"{direct.name} at {_label(delay)}: open a long history")
            await guarded(report, f"{direct.name} at {_label(delay)}: open",
                          open_history(target, _root_of(long_store), proxy, sizes, report))
    report.notes["latency model"] = (
        "tests/support/latency_proxy.py in its own thread and loop: each HTTP request is held "
        "for the delay before it goes on to the server (connections are not delayed); "
        f"latencies {', '.join(_label(d) for d in sizes.latencies)}")


# --------------------------------------------------------------------------- --trace


def round_trips(trace: Sequence[TracedRequest]) -> list[list[TracedRequest]]:
    """``trace`` grouped into round trips that waited on each other: a request starts a new
    group when every request before it had been answered when it arrived."""
    groups: list[list[TracedRequest]] = []
    answered = float("-inf")
    for request in sorted(trace, key=lambda r: r.arrived):
        if not groups or request.arrived >= answered:
            groups.append([])
        groups[-1].append(request)
        answered = max(answered, request.answered or request.forwarded)
    return groups


def describe(phase: str, trace: Sequence[TracedRequest], elapsed_s: float, root: str) -> list[str]:
    groups = round_trips(trace)
    lines = [f"### {phase}: {len(trace)} requests in {len(groups)} sequential round trips, "
             f"{elapsed_s * 1000:.0f} ms", ""]
    start = min((r.arrived for r in trace), default=0.0)
    for number, group in enumerate(groups, 1):
        what = ", ".join(_what(r, root) for r in group[:4])
        more = f" (+{len(group) - 4} more)" if len(group) > 4 else ""
        lines.append(f"{number}. +{(group[0].arrived - start) * 1000:.0f} ms: {what}{more}")
    return [*lines, ""]


def _what(request: TracedRequest, root: str) -> str:
    """``PUT key``, ``GET key``, ``LIST prefix`` or ``POST (batch delete)``, relative to ``root``."""
    query = parse_qs(request.query)
    if "prefix" in query:
        return f"LIST {query['prefix'][0].removeprefix(root + '/') or '(root)'}"
    if request.method == "POST":
        return "POST (batch delete)"
    return f"{request.method} {_short(request.path, root)}"


def _short(path: str, root: str) -> str:
    for cut in (f"/{BUCKET}/{root}/", f"/{CONTAINER}/{root}/", f"/{BUCKET}", f"/{CONTAINER}"):
        if cut in path:
            return path.split(cut, 1)[1] or "(root)"
    return path


@contextlib.contextmanager
def phase(proxy: LatencyProxy, out: list[str], name: str, root: str) -> Iterator[None]:
    proxy.reset()
    start = time.perf_counter()
    yield
    out += describe(name, proxy.trace(), time.perf_counter() - start, root)


async def trace_backend(direct: Under, delay_ms: float, history: int) -> list[str]:
    out = [f"## {direct.name} at {_label(delay_ms)}", ""]
    long_store = direct.backend("trace-history")
    await build_history(long_store, history)
    with LatencyProxy(direct.url, delay_ms=delay_ms, trace=True) as proxy:
        target = behind(direct, proxy.url)
        payload = text_payload(COMMIT_SEGMENT - 256)
        fresh = target.backend("trace")
        root = _root_of(fresh)
        with phase(proxy, out, "open a new store as a writer", root):
            run_cm = apersist.run(config(fresh))
            run = await run_cm.__aenter__()
        try:
            streams = [run.stream(f"s{i:02d}") for i in range(STREAMS)]
            await streams[0].record(payload)
            await run.commit()  # warm-up
            for n in (1, STREAMS):
                for stream in streams[:n]:
                    await stream.record(payload)
                with phase(proxy, out, f"commit of {n} segment{'s' * (n > 1)}", root):
                    await run.commit()
            await streams[0].record(payload)
        finally:
            with phase(proxy, out, "the run's end (one event recorded since the last commit)", root):
                await run_cm.__aexit__(None, None, None)
        root = _root_of(long_store)
        long_backend = target.make(root)
        with phase(proxy, out, f"open a store of {history:,} commits as a writer", root):
            async with apersist.run(config(long_backend)):
                pass
        access = apersist.SnapshotAccess.REPLAY
        with phase(proxy, out, f"open a store of {history:,} commits read-only (replay)", root):
            async with apersist.run(apersist.Config(long_backend, snapshot_access=access)):
                pass
    return out


async def _trace_main(args: argparse.Namespace, unders: Sequence[Under]) -> list[str]:
    out: list[str] = []
    for under in unders:
        if under.name.startswith("S3"):
            await create_bucket(under.url)
        else:
            await create_container(under.url)
        out += await trace_backend(under, args.latency_ms, args.history)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from .backends import servers
    from .common import machine_facts

    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency",
                                     description="every request of a commit, an open and a "
                                                 "run's end, through the latency proxy")
    parser.add_argument("--trace", action="store_true", required=True,
                        help="print the requests, grouped into sequential round trips")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--history", type=int, default=5000,
                        help="one-event commits of the long store (5000)")
    parser.add_argument("--backends", default="s3,azure")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="apersist-trace-") as tmp:
        report = Report(settings={}, machine=machine_facts(Path(tmp)))
        backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        with servers(backends, Path(tmp), report) as unders:
            lines = asyncio.run(_trace_main(args, unders))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
