"""Long-lived stores (issue 12): open and replay time against the number of commits.

    python -m benchmarks.history                        # fs 1k,10k; S3 and Azure 1k; ~minutes
    python -m benchmarks.history --quick                # smoke run: filesystem, seconds
    python -m benchmarks.history --backends filesystem --commits 1000,10000,100000
    python -m benchmarks.history --backends s3,azure --object-commits 1000,10000 --json

A profile, not a race: the same figures before and after a change to how a store grows.
For each backend (filesystem; S3 on moto_server; Azure on Azurite, both on 127.0.0.1
through ``tests/support/servers.py``) and each commit count N:

1. **Open and replay against history.** A *long* store gets N events in N commits of one
   event each; a *baseline* store gets the same N events in N/100 commits (the
   comparison issue 12 names: replay after 20,000 one-event commits within 3x of the same
   events in 200 commits). Then, in a fresh process: the time to enter ``apersist.run`` as
   a writer (a restart: the default ``Config``), the time to replay every event
   (``async for`` over ``stream.replay()``) in that run, and the time to open read-only
   (``SnapshotAccess.REPLAY``). Each fresh process first opens an empty store, so the
   process's one-time costs (imports, the first S3 client's models) are shown apart, as
   "open, empty store". The store's objects and bytes are counted by listing it through
   apersist's driver, grouped by the key's directory.
2. **compact + gc.** ``apersist compact ROOT`` then ``apersist gc ROOT --grace-seconds 0``
   (the command line, in subprocesses) on the long store; its objects and bytes, and its
   open and replay times, again afterwards.
3. **Requests of a paced source.** With the default ``Config`` (``snapshot_interval_ms=0``:
   group commit) a ``run.source`` whose reader yields ``--paced-rate`` events per second
   for ``--paced-seconds``. Requests are counted twice: the calls apersist makes on its
   driver (a counting wrapper put in by replacing ``apersist._run.open_driver``, as the
   tests do), and the HTTP requests on the wire (every ``aiohttp.ClientSession`` request:
   aiobotocore and the Azure SDK both send through it, so list pages, batch deletes,
   retries and multipart parts each count). Only the live window is extrapolated to an
   hour; the requests of opening and of the final commit are shown apart.

Every step that opens a store runs in a process of its own (spawned), so that what writing
a store left in the heap never weighs on an open. Stores live in a temporary directory or
under a fresh prefix of the server's bucket/container, and are deleted as soon as they are
measured; the servers run only while their backend is measured. The table goes to stdout
(or one JSON document with ``--json``), progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import posixpath
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

import apersist
import apersist._run
from apersist._drivers import Driver, ObjectInfo, open_driver

from .common import load_average, log, machine_facts

REPO = Path(__file__).resolve().parent.parent
STREAM = "events"
QUIET_MS = 3_600_000  # builds commit only when the script asks
BUCKET = "apersist-history"
CONTAINER = "apersist-history"
BACKENDS = ("filesystem", "s3", "azure")


# --------------------------------------------------------------------------- where


@dataclass(frozen=True, slots=True)
class Place:
    """One backend's store root, as plain data so that a spawned process can rebuild it."""

    kind: str  # "filesystem", "s3" or "azure"
    root: str  # a directory, or a prefix inside the bucket/container
    url: str = ""  # the server's endpoint (object stores)

    def backend(self) -> apersist.Backend:
        # The tests' servers module (tests/support/servers.py), through backends.py, which
        # imports it under its one name, ``servers``.
        from .backends import AZURITE_ACCOUNT, AZURITE_KEY, S3_KEY_ID, S3_REGION, S3_SECRET

        if self.kind == "filesystem":
            return apersist.Backend.filesystem(self.root)
        if self.kind == "s3":
            settings = apersist.AwsS3Settings(BUCKET, access_key=S3_KEY_ID, secret_access_key=S3_SECRET,
                                              with_path_style=True, region=S3_REGION, endpoint=self.url)
            return apersist.Backend.s3(self.root, settings)
        return apersist.Backend.azure(self.root, AZURITE_ACCOUNT, AZURITE_KEY, CONTAINER,
                                      endpoint=self.url)

    def child(self, name: str) -> Place:
        root = os.path.join(self.root, name) if self.kind == "filesystem" else f"{self.root}/{name}"
        if self.kind == "filesystem":
            os.makedirs(root, exist_ok=True)
        return Place(self.kind, root, self.url)

    def cli(self) -> tuple[str, dict[str, str]]:
        """The root as ``apersist`` takes it on the command line, and the environment it needs."""
        from .backends import AZURITE_ACCOUNT, AZURITE_KEY, S3_KEY_ID, S3_REGION, S3_SECRET

        if self.kind == "filesystem":
            return self.root, {}
        if self.kind == "s3":
            return f"s3://{BUCKET}/{self.root}", {
                "AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": S3_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": S3_REGION}
        return f"az://{CONTAINER}/{self.root}", {
            "AZURE_STORAGE_ACCOUNT": AZURITE_ACCOUNT, "AZURE_STORAGE_KEY": AZURITE_KEY,
            "AZURE_STORAGE_ENDPOINT": self.url}


@contextlib.contextmanager
def places(kind: str, workdir: Path) -> Iterator[Place]:
    """The base place of ``kind``; its server (if any) runs until the block ends."""
    base = f"history-{uuid.uuid4().hex[:12]}"
    if kind == "filesystem":
        yield Place(kind, str(workdir / base))
        return
    from .backends import azure_server, prepare_environment, s3_server

    prepare_environment()
    server = s3_server if kind == "s3" else azure_server
    started = time.perf_counter()
    with server(workdir) as url:
        log(f"{kind}: server at {url} in {time.perf_counter() - started:.1f} s")
        asyncio.run(_create_bucket(kind, url))
        yield Place(kind, base, url)


async def _create_bucket(kind: str, url: str) -> None:
    from .backends import create_bucket, create_container

    if kind == "s3":
        await create_bucket(url, BUCKET)
    else:
        await create_container(url, CONTAINER)


# --------------------------------------------------------------------------- objects


async def _objects(place: Place) -> dict[str, Any]:
    """Every object under the store root: count and bytes, in all and per key directory."""
    driver = open_driver(place.backend())
    count, size = 0, 0
    by_dir: dict[str, list[int]] = {}
    try:
        async for info in driver.list(""):
            count += 1
            size += info.size
            entry = by_dir.setdefault(posixpath.dirname(info.key) or ".", [0, 0])
            entry[0] += 1
            entry[1] += info.size
    finally:
        await driver.aclose()
    return {"objects": count, "bytes": size,
            "by_dir": {d: {"objects": c, "bytes": b} for d, (c, b) in sorted(by_dir.items())}}


def cleanup(place: Place) -> None:
    """Delete a measured store, best effort: a failure is logged, never lost figures.

    On a server this script started, nothing is deleted: the server keeps everything in
    memory and is stopped when its backend is done. (Deleting is not free there: on
    Azurite under load, one ``delete`` of 1,000 keys timed out after 120 s.)
    """
    if place.kind == "filesystem":
        import shutil

        shutil.rmtree(place.root, ignore_errors=True)
        return
    if not os.environ.get("APERSIST_S3_ENDPOINT" if place.kind == "s3" else "APERSIST_AZURE_ENDPOINT"):
        return
    try:
        asyncio.run(_delete_all(place))
    except Exception as exc:
        log(f"cleanup of {place.root} failed, left in place: {type(exc).__name__}: {exc}")


async def _delete_all(place: Place) -> None:
    driver = open_driver(place.backend())
    try:
        keys = [info.key async for info in driver.list("")]
        for start in range(0, len(keys), 256):
            await driver.delete(keys[start:start + 256])
    finally:
        await driver.aclose()


# --------------------------------------------------------------------------- child steps


def value(i: int) -> dict[str, Any]:
    return {"user": f"u{i % 1000}", "n": i, "ok": True}


async def build(place: Place, events: int, per_commit: int) -> dict[str, Any]:
    """Record ``events`` events, committing after every ``per_commit``; the time it took."""
    config = apersist.Config(place.backend(), snapshot_interval_ms=QUIET_MS)
    started = time.perf_counter()
    commits = 0
    async with apersist.run(config) as run:
        stream = run.stream(STREAM)
        for i in range(events):
            await stream.record(value(i))
            if (i + 1) % per_commit == 0 or i + 1 == events:
                await run.commit()
                commits += 1
    took = time.perf_counter() - started
    return {"events": events, "commits": commits, "build_s": took,
            "build_ms_per_commit": took * 1000 / max(1, commits)}


async def _timed_open(backend: apersist.Backend, access: apersist.SnapshotAccess,
                      replay: bool) -> dict[str, Any]:
    """Open (and replay), timed; the driver calls and HTTP requests of each step."""
    config = apersist.Config(backend, snapshot_access=access)
    calls: Counter[str] = Counter()
    http: Counter[str] = Counter()
    out: dict[str, Any] = {}

    def requests() -> dict[str, int]:
        return {"driver": _total(calls), "http": _total(http)}

    with counting(calls, http):
        wall, cpu = time.perf_counter(), time.process_time()
        async with apersist.run(config) as run:
            out["open_s"], out["open_cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
            out["open_requests"] = opened = requests()
            if replay:
                wall, cpu = time.perf_counter(), time.process_time()
                n = 0
                async for _ in run.stream(STREAM).replay():
                    n += 1
                out["replay_s"] = time.perf_counter() - wall
                out["replay_cpu_s"] = time.process_time() - cpu
                out["replayed"] = n
                out["replay_requests"] = {k: v - opened[k] for k, v in requests().items()}
            wall = time.perf_counter()
        out["close_s"] = time.perf_counter() - wall
    return out


def _total(counter: Counter[str]) -> int:
    # "(objects written)" is a note on the calls, not a call.
    return sum(n for kind, n in counter.items() if not kind.startswith("("))


async def measure_open(place: Place, empty: Place) -> dict[str, Any]:
    """Open ``empty`` (the process's one-time costs), then ``place`` as a writer with a
    replay of every event, then ``place`` read-only."""
    first = await _timed_open(empty.backend(), apersist.SnapshotAccess.FULL, replay=False)
    backend = place.backend()
    writer = await _timed_open(backend, apersist.SnapshotAccess.FULL, replay=True)
    reader = await _timed_open(backend, apersist.SnapshotAccess.REPLAY, replay=False)
    return {"open_empty_s": first["open_s"],
            "open_s": writer["open_s"], "open_cpu_s": writer["open_cpu_s"],
            "open_requests": writer["open_requests"],
            "replay_s": writer["replay_s"], "replay_cpu_s": writer["replay_cpu_s"],
            "replay_requests": writer["replay_requests"],
            "replayed": writer["replayed"], "close_s": writer["close_s"],
            "open_readonly_s": reader["open_s"], "open_readonly_cpu_s": reader["open_cpu_s"]}


# --------------------------------------------------------------------------- request counting


class CountingDriver:
    """Counts the calls apersist makes on its driver (a retried call counts once)."""

    def __init__(self, inner: Driver, calls: Counter[str]) -> None:
        self.inner = inner
        self.calls = calls

    def __getattr__(self, name: str) -> Any:  # name, verify_conditional_writes, ...
        attr = getattr(self.inner, name)
        if name != "put_then_create":
            return attr

        # The filesystem's one-call commit (segments, then the created record): one call
        # here, but the objects it writes are counted as the puts they are.
        async def put_then_create(puts: Sequence[tuple[str, bytes | bytearray]], key: str,
                                  data: bytes) -> None:
            self.calls["put_then_create"] += 1
            self.calls["(objects written)"] += len(puts) + 1
            await attr(puts, key, data)

        return put_then_create

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self.calls["put_if_absent" if if_absent else "put"] += 1
        self.calls["(objects written)"] += 1
        await self.inner.put(key, data, if_absent=if_absent)

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        self.calls["get"] += 1
        return await self.inner.get(key, start=start, end=end)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        self.calls["list"] += 1
        async for info in self.inner.list(prefix):
            yield info

    async def delete(self, keys: Sequence[str]) -> None:
        self.calls["delete"] += 1
        await self.inner.delete(keys)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _http_kind(method: str, url: Any) -> str:
    query = str(getattr(url, "query_string", "") or str(url).partition("?")[2])
    if method == "GET" and ("list-type" in query or "comp=list" in query):
        return "LIST"
    if "comp=batch" in query or (method == "POST" and "delete" in query):
        return "BATCH-DELETE"
    return method


@contextlib.contextmanager
def counting(driver_calls: Counter[str], http: Counter[str]) -> Iterator[list[Driver]]:
    """Count driver calls of every run opened inside, and every aiohttp request."""
    import aiohttp

    made: list[Driver] = []
    # Replaced with setattr: these are private seams (the tests patch the first one too).
    real_open = apersist._run.open_driver  # type: ignore[attr-defined]
    real_request = aiohttp.ClientSession._request

    def open_counting(backend: apersist.Backend, config: apersist.Config | None = None) -> Any:
        driver = CountingDriver(real_open(backend, config), driver_calls)
        made.append(driver)
        return driver

    async def request(self: aiohttp.ClientSession, method: str, url: Any, *args: Any,
                      **kwargs: Any) -> Any:
        http[_http_kind(method.upper(), url)] += 1
        return await real_request(self, method, url, *args, **kwargs)

    setattr(apersist._run, "open_driver", open_counting)  # noqa: B010
    setattr(aiohttp.ClientSession, "_request", request)  # noqa: B010
    try:
        yield made
    finally:
        setattr(apersist._run, "open_driver", real_open)  # noqa: B010
        setattr(aiohttp.ClientSession, "_request", real_request)  # noqa: B010


async def paced(place: Place, rate: float, seconds: float) -> dict[str, Any]:
    """A source at ``rate`` events/s for ``seconds`` with the default Config: what it asks."""
    calls: Counter[str] = Counter()
    http: Counter[str] = Counter()
    total = max(1, round(rate * seconds))
    marks: dict[str, Any] = {}

    def snapshot(run: apersist.Run | None) -> dict[str, Any]:
        stats = dict(run.stats) if run is not None else {}
        return {"calls": Counter(calls), "http": Counter(http), "t": time.perf_counter(),
                "commits": stats.get("commits", 0), "bytes": stats.get("bytes_written", 0)}

    async def read(offset: Any) -> AsyncIterator[tuple[dict[str, Any], int]]:
        start = 0 if offset is None else int(offset) + 1
        began = time.perf_counter()
        for i in range(start, total):
            # Paced by the clock, not by sleeps that add up: event i is due at i / rate.
            await asyncio.sleep(max(0.0, began + (i - start) / rate - time.perf_counter()))
            yield {"order": i, "amount": 10 + i % 90, "user": f"u{i % 1000}"}, i

    with counting(calls, http) as made:
        marks["start"] = snapshot(None)
        async with apersist.run(apersist.Config(place.backend())) as run:
            marks["opened"] = snapshot(run)
            n = 0
            async for _ in run.source("orders", read):
                if n == 0:
                    marks["first"] = snapshot(run)
                n += 1
                if n == total:
                    marks["last"] = snapshot(run)
            if not made:
                raise RuntimeError("no run used apersist._run.open_driver: driver calls were not counted")
        marks["closed"] = snapshot(None)

    def between(a: str, b: str, what: str) -> dict[str, int]:
        diff = marks[b][what] - marks[a][what]
        return dict(sorted(diff.items())) | {"total": _total(diff)}

    window = marks["last"]["t"] - marks["first"]["t"]
    commits = marks["last"]["commits"] - marks["first"]["commits"]
    out: dict[str, Any] = {
        "rate_ev_s": rate, "events": total, "window_s": window, "commits": commits,
        "events_per_commit": (total - 1) / commits if commits else float("nan"),
        "commits_per_s": commits / window if window else float("nan"),
        "bytes_written": marks["last"]["bytes"] - marks["first"]["bytes"],
        "open": {"driver": between("start", "opened", "calls"), "http": between("start", "opened", "http")},
        "window": {"driver": between("first", "last", "calls"), "http": between("first", "last", "http")},
        "close": {"driver": between("last", "closed", "calls"), "http": between("last", "closed", "http")},
    }
    for side in ("driver", "http"):
        n = out["window"][side]["total"]
        out[f"{side}_per_hour"] = n / window * 3600 if window else float("nan")
        out[f"{side}_per_commit"] = n / commits if commits else float("nan")
    return out


# --------------------------------------------------------------------------- process plumbing


def _run_async(fn: Callable[..., Coroutine[Any, Any, dict[str, Any]]], *args: Any) -> dict[str, Any]:
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return asyncio.run(fn(*args))


def in_child(fn: Callable[..., Coroutine[Any, Any, dict[str, Any]]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a fresh spawned process: no heap, allocator or client carried over."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_async, fn, *args).result()


def cli(place: Place, *args: str) -> dict[str, Any]:
    """``apersist ARGS ROOT...`` (the command line of the apersist being measured), timed."""
    root, env = place.cli()
    argv = [sys.executable, "-m", "apersist._cli", *(a.replace("{root}", root) for a in args)]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=os.environ | env, capture_output=True, text=True,
                          timeout=3600, check=False)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return {"s": took, "last_line": (done.stdout.strip().splitlines() or [""])[-1]}


# --------------------------------------------------------------------------- one backend


@dataclass(slots=True)
class Sizes:
    commits: dict[str, list[int]]
    baseline_divisor: int
    paced_rates: list[float]
    paced_seconds: float
    compact: bool = True


@dataclass(slots=True)
class Result:
    backend: str
    history: list[dict[str, Any]] = field(default_factory=list)
    paced: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def measure_history(base: Place, commits: int, sizes: Sizes, row: dict[str, Any]) -> None:
    """Fill ``row`` step by step: a step that fails leaves the figures of those before it."""
    empty = base.child(f"empty-{commits}")
    long, short = base.child(f"long-{commits}"), base.child(f"baseline-{commits}")
    per_commit = sizes.baseline_divisor
    row |= {"commits": commits, "events": commits, "loadavg_start": load_average()}
    try:
        log(f"{base.kind}: writing {commits:,} one-event commits")
        row["build"] = in_child(build, long, commits, 1)
        log(f"{base.kind}: ... {row['build']['build_s']:.1f} s; writing the baseline "
            f"({commits:,} events in {max(1, commits // per_commit):,} commits)")
        row["baseline_build"] = in_child(build, short, commits, per_commit)
        row["objects"] = asyncio.run(_objects(long))
        row["baseline_objects"] = asyncio.run(_objects(short))
        log(f"{base.kind}: opening and replaying")
        row["long"] = in_child(measure_open, long, empty)
        row["baseline"] = in_child(measure_open, short, empty)
        # What the opens added (a writer's open writes a fence commit) is in "objects_before".
        row["objects_before"] = asyncio.run(_objects(long))
        if sizes.compact:
            log(f"{base.kind}: apersist compact + gc --grace-seconds 0")
            row["compact"] = cli(long, "compact", "{root}")
            row["gc"] = cli(long, "gc", "{root}", "--grace-seconds", "0")
            row["objects_after"] = asyncio.run(_objects(long))
            row["after"] = in_child(measure_open, long, empty)
        for what in ("long", "baseline", *(("after",) if "after" in row else ())):
            if row[what]["replayed"] != commits:
                raise RuntimeError(f"{what}: replayed {row[what]['replayed']} of {commits} events")
        row["replay_ratio"] = row["long"]["replay_s"] / row["baseline"]["replay_s"]
        row["open_ratio"] = row["long"]["open_s"] / row["baseline"]["open_s"]
        row["loadavg_end"] = load_average()
    finally:
        for place in (long, short, empty):
            cleanup(place)


def measure_backend(result: Result, sizes: Sizes, workdir: Path,
                    saved: Callable[[], None] = lambda: None) -> None:
    """Every figure of one backend, into ``result``; ``saved()`` after each step."""
    kind = result.backend
    started = time.perf_counter()
    with places(kind, workdir) as base:
        for commits in sizes.commits[kind]:
            row: dict[str, Any] = {}
            result.history.append(row)
            try:
                measure_history(base, commits, sizes, row)
                log(f"{kind}: {history_line(row)}")
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                result.errors.append(f"{kind} {commits} commits: {row['error']}")
                log(f"FAILED: {result.errors[-1]}")
            saved()
        for rate in sizes.paced_rates if sizes.paced_seconds > 0 else ():
            place = base.child(f"paced-{rate:g}")
            log(f"{kind}: paced source, {rate:g} events/s for {sizes.paced_seconds:g} s")
            try:
                figures = in_child(paced, place, rate, sizes.paced_seconds)
                figures["objects"] = asyncio.run(_objects(place))
                figures["loadavg_end"] = load_average()
                result.paced.append(figures)
            except Exception as exc:
                result.errors.append(f"{kind} paced {rate:g}/s: {type(exc).__name__}: {exc}")
                log(f"FAILED: {result.errors[-1]}")
            finally:
                cleanup(place)
            saved()
    result.seconds = time.perf_counter() - started


# --------------------------------------------------------------------------- report


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes} B"


def _requests_label(result: Result) -> str:
    return "driver calls" if result.backend == "filesystem" else "HTTP requests"


def _requests(result: Result, m: dict[str, Any], step: str) -> str:
    side = "driver" if result.backend == "filesystem" else "http"
    return f"{m[f'{step}_requests'][side]:,}"


def history_line(row: dict[str, Any]) -> str:
    return (f"{row['commits']:,} commits: open {ms(row['long']['open_s'])}, replay "
            f"{ms(row['long']['replay_s'])} ({row['replay_ratio']:.1f}x the baseline's)")


def render(results: Sequence[Result], meta: dict[str, Any]) -> str:
    out: list[str] = []
    add = out.append
    for result in results:
        add(f"\n## {result.backend}\n")
        complete = [row for row in result.history if "replay_ratio" in row]
        if complete:
            add(f"| commits (events) | built in | open, empty store | open (CPU) | replay (CPU) "
                f"| events/s | open read-only | {_requests_label(result)}: open + replay | objects | bytes |")
            add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for row in complete:
                for label, build_key, key, objects in (
                        ("long", "build", "long", "objects"),
                        (f"same events in {row['baseline_build']['commits']:,} commits",
                         "baseline_build", "baseline", "baseline_objects")):
                    m, b, o = row[key], row[build_key], row[objects]
                    name = f"{row['commits']:,}" if label == "long" else label
                    add(f"| {name} | {b['build_s']:,.1f} s | {ms(m['open_empty_s'])} "
                        f"| {ms(m['open_s'])} ({ms(m['open_cpu_s'])}) "
                        f"| {ms(m['replay_s'])} ({ms(m['replay_cpu_s'])}) "
                        f"| {m['replayed'] / m['replay_s']:,.0f} | {ms(m['open_readonly_s'])} "
                        f"| {_requests(result, m, 'open')} + {_requests(result, m, 'replay')} "
                        f"| {o['objects']:,} | {size(o['bytes'])} |")
            add("")
            add("| commits | replay / baseline | open / baseline | ms per one-event commit "
                "(build) | load average, start → end |")
            add("| ---: | ---: | ---: | ---: | --- |")
            for row in complete:
                load = f"{row['loadavg_start'][0]} → {row['loadavg_end'][0]}" if "loadavg_end" in row else ""
                add(f"| {row['commits']:,} | {row['replay_ratio']:.1f}x | {row['open_ratio']:.1f}x "
                    f"| {row['build']['build_ms_per_commit']:.1f} | {load} |")
            compacted = [row for row in complete if "after" in row]
            if compacted:
                add("")
                add("| commits | objects before | bytes before | compact | gc | objects after "
                    "| bytes after | open after | replay after |")
                add("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
                for row in compacted:
                    bef, aft = row["objects_before"], row["objects_after"]
                    add(f"| {row['commits']:,} | {bef['objects']:,} | {size(bef['bytes'])} "
                        f"| {ms(row['compact']['s'])} | {ms(row['gc']['s'])} | {aft['objects']:,} "
                        f"| {size(aft['bytes'])} | {ms(row['after']['open_s'])} "
                        f"| {ms(row['after']['replay_s'])} |")
                add("")
                add("Objects per key directory (long store, before → after compact + gc):")
                for row in compacted:
                    bef, aft = row["objects_before"]["by_dir"], row["objects_after"]["by_dir"]
                    parts = []
                    for d in sorted(set(bef) | set(aft)):
                        b, a = bef.get(d, {"objects": 0}), aft.get(d, {"objects": 0})
                        parts.append(f"`{d}` {b['objects']:,} → {a['objects']:,}")
                    add(f"- {row['commits']:,} commits: " + ", ".join(parts))
        for p in result.paced:
            add("")
            add(f"Paced source, default Config: {p['rate_ev_s']:g} events/s, {p['events']:,} events "
                f"over {p['window_s']:.1f} s: {p['commits']:,} commits "
                f"({p['events_per_commit']:.2f} events per commit, {p['commits_per_s']:.1f} commits/s), "
                f"{size(p['bytes_written'])} written; the store then held {p['objects']['objects']:,} "
                f"objects, {size(p['objects']['bytes'])}.")
            add("")
            add("| counted | per hour | per commit | in the window, by kind | opening | final commit |")
            add("| --- | ---: | ---: | --- | ---: | ---: |")
            for side, label in (("driver", "driver calls"), ("http", "HTTP requests")):
                w = p["window"][side]
                if side == "http" and w["total"] == 0:
                    add(f"| {label} | - | - | (no HTTP: local backend) | - | - |")
                    continue
                kinds = ", ".join(f"{k} {v:,}" for k, v in w.items() if k != "total")
                add(f"| {label} | {p[f'{side}_per_hour']:,.0f} | {p[f'{side}_per_commit']:.2f} "
                    f"| {kinds} | {p['open'][side]['total']:,} | {p['close'][side]['total']:,} |")
        for error in result.errors:
            add(f"\n**failed**: {error}")
        add(f"\n({result.backend}: {result.seconds:,.0f} s in all)")
    add("")
    add(f"apersist {meta['apersist_commit']} ({meta['apersist_path']}); "
        f"{meta['machine']['cores']} cores, {meta['machine']['cpu']}, "
        f"{meta['machine']['memory_gb']} GB; {meta['machine']['filesystem']}; "
        f"load average {meta['machine']['loadavg_at_start']} → {meta['loadavg_at_end']}; "
        f"{meta['started']}.")
    return "\n".join(out)


def apersist_commit() -> str:
    """The checkout's HEAD and the last commit that changed apersist/ (what is measured)."""
    here = Path(apersist.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        head, code = git("rev-parse", "--short=12", "HEAD"), git("log", "-1", "--format=%h", "--", ".")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return (f"HEAD {head}, apersist/ last changed in {code}"
            + (", with uncommitted changes" if dirty else ""))


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backends", default=None,
                        help="comma-separated of filesystem,s3,azure (default all; filesystem with --quick)")
    parser.add_argument("--commits", type=_ints, default=None,
                        help="filesystem commit counts (default 1000,10000; 100000 when asked)")
    parser.add_argument("--object-commits", type=_ints, default=None,
                        help="S3 and Azure commit counts (default 1000)")
    parser.add_argument("--baseline-divisor", type=int, default=100,
                        help="the baseline store has N/this commits of this many events (default 100)")
    parser.add_argument("--paced-rate", type=_floats, default=[20.0],
                        help="events/s of the paced source; a comma-separated list runs each (default 20)")
    parser.add_argument("--paced-seconds", type=float, default=None,
                        help="how long the paced source runs (default 20; 0 skips it)")
    parser.add_argument("--no-compact", action="store_true", help="skip compact + gc")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: filesystem, 200 commits, a 3 s paced source")
    parser.add_argument("--json", action="store_true", help="print one JSON document, not the table")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON document here")
    parser.add_argument("--dir", type=Path, default=None, help="where stores and server logs go")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="measure nothing: print the table of a saved --out/--json document")
    args = parser.parse_args(argv)
    if args.backends is None:
        args.backends = "filesystem" if args.quick else ",".join(BACKENDS)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    if args.commits is None:
        args.commits = [200] if args.quick else [1000, 10000]
    if args.object_commits is None:
        args.object_commits = [200] if args.quick else [1000]
    if args.paced_seconds is None:
        args.paced_seconds = 3.0 if args.quick else 20.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.from_json is not None:
        saved = orjson.loads(args.from_json.read_bytes())
        print(render([Result(r["backend"], r["history"], r["paced"], r["errors"], r["seconds"])
                      for r in saved["results"]], saved))
        return 0
    # SIGTERM unwinds like Ctrl-C: the servers are stopped and the stores deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = Sizes({"filesystem": args.commits, "s3": args.object_commits, "azure": args.object_commits},
                  args.baseline_divisor, args.paced_rate, args.paced_seconds, not args.no_compact)
    with tempfile.TemporaryDirectory(prefix="apersist-history-", dir=args.dir) as tmp:
        workdir = Path(tmp)
        meta: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "apersist_commit": apersist_commit(),
            "apersist_path": str(Path(apersist.__file__).resolve().parent),
            "machine": machine_facts(workdir),
            "settings": {"backends": args.backends, "commits": sizes.commits,
                         "baseline_divisor": sizes.baseline_divisor,
                         "paced_rates": sizes.paced_rates, "paced_seconds": sizes.paced_seconds,
                         "compact": sizes.compact, "quick": args.quick},
        }
        results: list[Result] = []

        def document() -> bytes:
            meta["loadavg_at_end"] = load_average()
            doc = meta | {"results": [{"backend": r.backend, "history": r.history, "paced": r.paced,
                                       "errors": r.errors, "seconds": r.seconds} for r in results]}
            return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str)

        def save() -> None:
            # After every step, so that a run cut short keeps what it measured.
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_bytes(document() + b"\n")

        for kind in args.backends:
            results.append(result := Result(kind))
            try:
                measure_backend(result, sizes, workdir, save)
            except Exception as exc:  # the server did not start, ...: the others still run
                result.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                log(f"FAILED: {result.errors[-1]}")
            save()
    data = document()
    print(data.decode() if args.json else render(results, meta), flush=True)
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
