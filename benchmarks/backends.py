"""The object-store workloads: S3 (moto_server) and Azure Blob (Azurite) on this machine.

The servers are started by ``tests/support/servers.py`` (the same code the backend tests use) on
free ports of 127.0.0.1 and stopped at the end, also after an error or Ctrl-C. For each
backend, one after the other (a server idles while the other works):

1. **record / replay** of small events, as on the filesystem: ``record()`` per event plus
   the final commit (until durable), then ``stream.replay()`` in a read-only run; next to
   the floor (``orjson.dumps`` + ``list.append``, ``orjson.loads``) over the same values.
2. **commit latency** with ``snapshot_interval_ms=0`` under 1, 8 and 64 concurrent
   producers (each records one event and awaits ``run.commit()``), next to one bare PUT.
3. **commit latency of 1 and 16 segments** (64 KiB each) with only explicit commits, next to
   one bare ``driver.put`` of a segment's size and next to the commit's own requests done
   bare; all interleaved sample by sample.
4. **concurrent against sequential uploads**: 16 objects through one driver with
   ``gather_bounded(..., 16)`` vs one after another; the commit of 16 segments with
   ``upload_concurrency=16`` vs ``=1``.
5. **replay read-ahead**: a stream of many ~64 KiB segments replayed as shipped (windows of
   up to 16 segments read at once) vs with the run's store set to ``read_concurrency=1``.

Client and servers share this machine's cores, so the CPU time each side used is reported
with the speed-ups.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apersist
from apersist._concurrency import gather_bounded
from apersist._drivers import Driver, open_driver

from .baselines import floor_record, floor_replay
from .common import (
    STREAM,
    Report,
    Row,
    Series,
    Settings,
    Target,
    guarded,
    log,
    make_values,
    median,
    percentile,
    rotated,
    timed_ms,
    version_of,
)

# The servers are the tests' own (tests/support/servers.py), imported under the one name the
# tests give it: pytest and the campaigns' worker scripts import the support files from there.
SUPPORT = str(Path(__file__).resolve().parent.parent / "tests" / "support")
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)
from servers import (  # noqa: E402 (importable once tests/support is on the path, just above)
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    S3_KEY_ID,
    S3_REGION,
    S3_SECRET,
    azure_server,
    azurite_bin,
    s3_server,
)

LOOPBACK = "127.0.0.1"
BUCKET = "apersist-bench"
CONTAINER = "apersist-bench"
STREAMS = 16  # streams of the 16-segment commits; also the upload fan-out
CONCURRENCY = 16  # Config.upload_concurrency's default, and the read window
SPEEDUP_TARGET = 8.0
COMMIT_TARGET = 2.0  # a 1-segment commit is two sequential puts: the segment, the record
RECORD_BYTES = 2048  # stands in for a commit record in the "own I/O" baseline
REPLAY_EVENT_BYTES = 1000  # JSON size of one replayed event

KIB, MIB = 1 << 10, 1 << 20


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class BackendSettings:
    events: int  # record / replay of small events
    commit_samples: int
    commit_warmup: int
    commit_segment: int  # bytes per segment in the commit-latency section (about)
    upload_object: int  # bytes per object/segment in the throughput section
    upload_repeats: int
    replay_segments: int
    replay_segment: int  # max_segment_bytes of the replayed stream
    replay_repeats: int
    producers: tuple[int, ...]

    @classmethod
    def make(cls, settings: Settings) -> BackendSettings:
        reps = settings.repeats
        if settings.quick:
            return cls(settings.backend_events, min(settings.commit_samples, 6), 1, 16 * KIB,
                       256 * KIB, reps, 8, 16 * KIB, reps, settings.producers)
        return cls(settings.backend_events, settings.commit_samples,
                   max(1, settings.commit_samples // 10), 64 * KIB, MIB, max(reps, 5), 200, 64 * KIB,
                   reps, settings.producers)


# --------------------------------------------------------------------------- machine


def azurite_version(exe: str) -> str:
    """The ``version`` of the azurite package that ``exe`` (its bin link) belongs to."""
    for parent in Path(os.path.realpath(exe)).parents:
        manifest = parent / "package.json"
        if manifest.is_file():
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(manifest.read_text(encoding="utf-8"))
                if doc.get("name") == "azurite":
                    return str(doc.get("version"))
    return "unknown"


def node_version() -> str:
    node = shutil.which("node")
    if node is None:
        return "unknown"
    try:
        return subprocess.run([node, "--version"], capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"



def server_pid(port: int) -> int | None:
    """The pid of our child process that was started to listen on ``port`` (None if none)."""
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if str(port).encode() in argv:
                return int(entry.name)
    return None


def server_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) that process ``pid`` has used so far."""
    if pid is None:
        return float("nan")
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all processes on this machine have used since boot (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class Neighbours:
    """How much CPU other processes took while the benchmark ran (they share the cores)."""

    pids: tuple[int | None, ...]
    wall: float = field(default_factory=time.perf_counter)
    busy: float = field(default_factory=machine_busy_s)
    ours: float = 0.0

    def __post_init__(self) -> None:
        self.ours = self._ours()

    def _ours(self) -> float:
        return time.process_time() + sum(server_cpu_s(pid) for pid in self.pids if pid is not None)

    def describe(self) -> str:
        wall = time.perf_counter() - self.wall
        others = (machine_busy_s() - self.busy) - (self._ours() - self.ours)
        return (f"{max(0.0, others):.1f} CPU-s in {wall:.1f} s (an average of "
                f"{max(0.0, others) / wall:.2f} of {os.cpu_count()} cores busy with other processes)")


# --------------------------------------------------------------------------- targets


@dataclass(slots=True)
class Under:
    """One backend under test: how to make a ``Backend`` for a root, and its server."""

    name: str
    make: Callable[[str], apersist.Backend]
    url: str
    pid: int | None

    def backend(self, label: str) -> apersist.Backend:
        return self.make(f"bench/{label}-{uuid.uuid4().hex[:12]}")


def s3_under(url: str) -> Under:
    settings = apersist.AwsS3Settings(BUCKET, access_key=S3_KEY_ID, secret_access_key=S3_SECRET,
                                      with_path_style=True, region=S3_REGION, endpoint=url)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    return Under("S3 (moto)", lambda root: apersist.Backend.s3(root, settings), url, server_pid(port))


def azure_under(url: str) -> Under:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    return Under("Azure (Azurite)", lambda root: apersist.Backend.azure(
        root, AZURITE_ACCOUNT, AZURITE_KEY, CONTAINER, endpoint=url), url, server_pid(port))


async def create_bucket(url: str, bucket: str = BUCKET) -> None:
    """Create ``bucket`` on the S3 server at ``url`` unless it exists."""
    from aiobotocore.session import get_session  # type: ignore[import-untyped]

    async with get_session().create_client(
            "s3", endpoint_url=url, region_name=S3_REGION,
            aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET) as client:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                 client.exceptions.BucketAlreadyExists):
            await client.create_bucket(Bucket=bucket)


async def create_container(url: str, container: str = CONTAINER) -> None:
    """Create ``container`` on the Azure server at ``url`` unless it exists."""
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob.aio import BlobServiceClient

    credential = {"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY}
    async with BlobServiceClient(url, credential=credential) as service:
        with contextlib.suppress(ResourceExistsError):
            await service.create_container(container)


# --------------------------------------------------------------------------- helpers


def text_payload(nbytes: int) -> str:
    """A random ASCII string whose JSON form is about ``nbytes`` long."""
    raw = base64.b64encode(os.urandom(nbytes)).decode("ascii")
    return raw[:max(1, nbytes - 2)]


def config(backend: apersist.Backend, **options: Any) -> apersist.Config:
    """A run that writes only on explicit commits.

    Every measurement records and then commits at once, without yielding in between, so
    when the 60 s timer fires, the scheduler finds nothing of its own to commit.
    """
    return apersist.Config(backend, snapshot_interval_ms=60_000, **options)


@contextlib.asynccontextmanager
async def opened_driver(backend: apersist.Backend, concurrency: int = CONCURRENCY) -> AsyncIterator[Driver]:
    """A driver as a run would make it (``open_driver`` with the run's ``Config``)."""
    driver = open_driver(backend, config(backend, upload_concurrency=concurrency))
    try:
        yield driver
    finally:
        await driver.aclose()


async def put_all(driver: Driver, keys: Sequence[str], data: bytes, *, concurrent: bool) -> None:
    """Put ``data`` under every key: 16 at once as a commit does, or one after another."""
    if concurrent:
        await gather_bounded([lambda k=key: driver.put(k, data) for key in keys], CONCURRENCY)
    else:
        for key in keys:
            await driver.put(key, data)


@dataclass(slots=True)
class Cpu:
    """Wall time, requests, and the CPU time client and server used, over measured windows."""

    wall_s: float = 0.0
    client_s: float = 0.0
    server_s: float = 0.0
    requests: int = 0

    def per_request_ms(self) -> tuple[float, float, float]:
        """(wall, client CPU, server CPU) milliseconds per request."""
        n = self.requests or float("nan")
        return 1000 * self.wall_s / n, 1000 * self.client_s / n, 1000 * self.server_s / n

    def describe(self) -> str:
        wall, client, server = self.per_request_ms()
        span = self.wall_s or float("nan")
        return (f"{wall:.2f} ms wall/request, CPU/request client {client:.2f} ms + server "
                f"{server:.2f} ms (client {100 * self.client_s / span:.0f} %, server "
                f"{100 * self.server_s / span:.0f} % of one core)")


def cpu_ceiling(serial: Cpu, parallel: Cpu) -> float:
    """The speed-up of ``parallel`` over ``serial`` that CPU alone allows on this machine.

    With enough requests in flight, a request still needs the CPU its client and server
    spend on it; each side is one busy thread at most (the GIL, node's event loop) and
    together they cannot use more than every core. The ceiling is the serial wall time
    per request over that floor.
    """
    _, client, server = parallel.per_request_ms()
    floor = max(client, server, (client + server) / (os.cpu_count() or 1))
    return serial.per_request_ms()[0] / floor if floor else float("nan")


def cpu_note(cpu: dict[str, Cpu], serial: str, parallel: str) -> str:
    return (f"{serial}: {cpu[serial].describe()}; {parallel}: {cpu[parallel].describe()}; "
            f"speed-up the CPU allows: {cpu_ceiling(cpu[serial], cpu[parallel]):.1f}x")


@contextlib.contextmanager
def metered(cpu: Cpu, server_pid: int | None, requests: int) -> Iterator[None]:
    wall, client, server = time.perf_counter(), time.process_time(), server_cpu_s(server_pid)
    try:
        yield
    finally:
        cpu.wall_s += time.perf_counter() - wall
        cpu.client_s += time.process_time() - client
        cpu.server_s += server_cpu_s(server_pid) - server
        cpu.requests += requests


def alternate(rounds: int, first: str, second: str) -> Iterator[tuple[int, str]]:
    """(round, variant) pairs: both variants every round, their order flipped each round."""
    for index in range(rounds):
        pair = (first, second) if index % 2 == 0 else (second, first)
        for variant in pair:
            yield index, variant


# --------------------------------------------------------------------------- 1. commit latency


class CommitLatency:
    """Interleaved samples of 1- and 16-segment commits and of their bare I/O."""

    STEPS = ("bare", "own1", "commit1", "own16", "commit16")

    def __init__(self, run: apersist.Run, driver: Driver, payload: str) -> None:
        self.run = run
        self.driver = driver
        self.payload = payload
        self.streams = [run.stream(f"s{i:02d}") for i in range(STREAMS)]
        self.segment = b""  # a segment's bytes, set by calibrate()
        self.record = os.urandom(RECORD_BYTES)
        self.samples: dict[str, list[float]] = {step: [] for step in self.STEPS}
        self._n = 0
        self._last_ms = 0.0
        self._bare_keys: list[str] = []

    async def calibrate(self) -> int:
        """Commit one segment to learn a segment's real size; the bare puts use it."""
        await self.streams[0].record(self.payload)
        info = await self.run.commit()
        self.segment = os.urandom(info.bytes)
        return info.bytes

    def _key(self, what: str) -> str:
        self._n += 1
        key = f"bare/{what}-{self._n:08d}"
        self._bare_keys.append(key)
        return key

    async def commit(self, streams: int) -> None:
        for stream in self.streams[:streams]:
            await stream.record(self.payload)
        start = time.perf_counter()
        info = await self.run.commit()
        self._last_ms = (time.perf_counter() - start) * 1000
        if info.bytes < len(self.segment) * streams:
            raise RuntimeError(f"commit wrote {info.bytes} bytes, expected {streams} segments "
                               f"of about {len(self.segment)}")

    async def own_io(self, segments: int) -> None:
        """What a commit of ``segments`` does on the wire: the puts, then a created record."""
        keys = [self._key("seg") for _ in range(segments)]
        await put_all(self.driver, keys, self.segment, concurrent=segments > 1)
        await self.driver.put(self._key("rec"), self.record, if_absent=True)

    async def step(self, name: str) -> float:
        if name == "bare":
            return await timed_ms(self.driver.put(self._key("bare"), self.segment))
        if name.startswith("own"):
            return await timed_ms(self.own_io(int(name[3:])))
        await self.commit(int(name[6:]))  # times the commit alone, not the recording
        return self._last_ms

    async def sample(self, index: int, keep: bool) -> None:
        """One round of every step, the order rotated by ``index``."""
        shift = index % len(self.STEPS)
        for name in self.STEPS[shift:] + self.STEPS[:shift]:
            ms = await self.step(name)
            if keep:
                self.samples[name].append(ms)
        # Untimed: the baseline's objects go, so the server's memory grows only by the commits.
        keys, self._bare_keys = self._bare_keys, []
        await self.driver.delete(keys)


async def section_commit_latency(target: Under, settings: BackendSettings, report: Report) -> None:
    name = target.name
    payload = text_payload(settings.commit_segment - 256)  # framing and header fill the rest
    # Raw segments: the rows are of segments of a given size (compressed, the same text's
    # segments vary in size, and a 16-stream commit's more than one's), and the bare I/O
    # beside them puts that many bytes.
    async with apersist.run(config(target.backend("commit"), compression=None)) as run, \
            opened_driver(target.backend("commit-bare")) as driver:
        bench = CommitLatency(run, driver, payload)
        segment = await bench.calibrate()
        total = settings.commit_warmup + settings.commit_samples
        for index in range(total):
            if index == settings.commit_warmup:
                log(f"{name}: commit latency, {settings.commit_samples} samples")
            await bench.sample(index, keep=index >= settings.commit_warmup)
    s = bench.samples
    bare = f"one bare PUT of {segment / KIB:.0f} KiB"
    rows = []
    for streams in (1, STREAMS):
        label = f"commit latency, {streams} segment{'s' * (streams > 1)} of {segment / KIB:.0f} KiB"
        mine = s[f"commit{streams}"]
        own = s[f"own{streams}"]
        what = "1 PUT" if streams == 1 else f"{streams} concurrent PUTs"
        for q in (50, 99):
            targets = [Target("floor", at_most=COMMIT_TARGET)] if streams == 1 and q == 50 else []
            rows.append(Row(
                f"{label}: p{q}", "backends", "ms",
                Series("run.commit()", [percentile(mine, q)], "apersist"),
                [Series(bare, [percentile(s["bare"], q)], "floor"),
                 Series(f"its own I/O bare: {what} + 1 create-if-absent PUT of "
                        f"{RECORD_BYTES / KIB:.0f} KiB", [percentile(own, q)])],
                targets, backend=name, note=f"{len(mine)} samples, interleaved"))
    report.rows += rows
    report.notes[f"{name}, commit latency: segment bytes"] = segment


# --------------------------------------------------------------------------- 2. upload throughput


async def driver_round(driver: Driver, label: str, count: int, data: bytes, *, concurrent: bool,
                       cpu: Cpu, pid: int | None) -> float:
    """MiB/s of one round of ``count`` puts; the objects are deleted afterwards (untimed)."""
    keys = [f"up/{label}/{i:02d}" for i in range(count)]
    with metered(cpu, pid, count):
        start = time.perf_counter()
        await put_all(driver, keys, data, concurrent=concurrent)
        elapsed = time.perf_counter() - start
    await driver.delete(keys)
    return count * len(data) / MIB / elapsed


async def section_driver_upload(target: Under, settings: BackendSettings, report: Report) -> None:
    name, pid = target.name, target.pid
    data = os.urandom(settings.upload_object)
    rates: dict[str, list[float]] = {"concurrent": [], "sequential": []}
    cpu = {variant: Cpu() for variant in rates}
    async with opened_driver(target.backend("upload")) as driver:
        for variant in ("sequential", "concurrent"):  # warm-up: opens the pool's connections
            await driver_round(driver, f"warm-{variant}", STREAMS, data,
                               concurrent=variant == "concurrent", cpu=Cpu(), pid=pid)
        log(f"{name}: driver uploads, {settings.upload_repeats} rounds")
        for index, variant in alternate(settings.upload_repeats, "sequential", "concurrent"):
            rates[variant].append(await driver_round(
                driver, f"{index}-{variant}", STREAMS, data, concurrent=variant == "concurrent",
                cpu=cpu[variant], pid=pid))
    size = f"{STREAMS} x {settings.upload_object / KIB:.0f} KiB"
    report.rows.append(Row(
        f"upload {size} through one driver: gather_bounded(16) vs one by one", "backends", "MiB/s",
        Series("concurrent puts", rates["concurrent"], "apersist"),
        [Series("sequential puts", rates["sequential"], "sequential")],
        [Target("sequential", at_least=SPEEDUP_TARGET)], backend=name))
    report.notes[f"{name}, driver uploads"] = cpu_note(cpu, "sequential", "concurrent")


async def commit_round(run: apersist.Run, payload: str, cpu: Cpu, pid: int | None) -> float:
    """MiB/s of one commit of one segment in each of the run's 16 streams."""
    for i in range(STREAMS):
        await run.stream(f"s{i:02d}").record(payload)
    with metered(cpu, pid, STREAMS + 1):  # the segments and the commit record
        start = time.perf_counter()
        info = await run.commit()
        elapsed = time.perf_counter() - start
    return info.bytes / MIB / elapsed


async def section_commit_upload(target: Under, settings: BackendSettings, report: Report) -> None:
    name, pid = target.name, target.pid
    payload = text_payload(settings.upload_object - 256)
    variants = {"concurrency 16": CONCURRENCY, "concurrency 1": 1}
    rates: dict[str, list[float]] = {v: [] for v in variants}
    cpu = {v: Cpu() for v in variants}
    async with contextlib.AsyncExitStack() as stack:
        runs = {v: await stack.enter_async_context(apersist.run(config(
            target.backend(f"commit-c{n}"), upload_concurrency=n))) for v, n in variants.items()}
        for variant, run in runs.items():
            await commit_round(run, payload, Cpu(), pid)  # warm-up
            log(f"{name}: warm commit, {variant}")
        log(f"{name}: commit uploads, {settings.upload_repeats} rounds")
        for _index, variant in alternate(settings.upload_repeats, "concurrency 1", "concurrency 16"):
            rates[variant].append(await commit_round(runs[variant], payload, cpu[variant], pid))
    size = f"{STREAMS} segments of {settings.upload_object / KIB:.0f} KiB"
    report.rows.append(Row(
        f"commit of {size}: upload_concurrency=16 vs =1", "backends", "MiB/s",
        Series("upload_concurrency=16", rates["concurrency 16"], "apersist"),
        [Series("upload_concurrency=1", rates["concurrency 1"], "sequential")],
        [Target("sequential", at_least=SPEEDUP_TARGET)], backend=name))
    report.notes[f"{name}, commit uploads"] = cpu_note(cpu, "concurrency 1", "concurrency 16")


# --------------------------------------------------------------------------- 3. replay


async def write_replay_stream(backend: apersist.Backend, settings: BackendSettings) -> tuple[int, int, int]:
    """Record a stream of ``replay_segments`` segments; return (events, segments, bytes)."""
    value_chars = REPLAY_EVENT_BYTES - 2 - 9  # quotes and the 9-digit index
    per_segment = max(1, settings.replay_segment // REPLAY_EVENT_BYTES)
    events = per_segment * settings.replay_segments
    filler = text_payload(value_chars + 2)
    async with apersist.run(config(backend, max_segment_bytes=settings.replay_segment)) as run:
        stream = run.stream("replay")
        for i in range(events):
            await stream.record(f"{i:09d}{filler}")
        info = await run.commit()
        # Private, for the report only: how many segments the stream was cut into.
        segments = len(run._store.segments("events", "replay"))
    return events, segments, info.bytes


async def replay_once(run: apersist.Run, stream: apersist.Stream, events: int, *,
                      window: int) -> float:
    """Seconds to replay ``stream`` reading ``window`` segments at once (set, restored)."""
    store = run._store  # private: the store's read_concurrency is no Config field
    saved = store.read_concurrency
    store.read_concurrency = window
    try:
        count = 0
        start = time.perf_counter()
        async for _event in stream.replay():
            count += 1
        elapsed = time.perf_counter() - start
    finally:
        store.read_concurrency = saved
    if count != events:
        raise RuntimeError(f"replay yielded {count} events, expected {events}")
    return elapsed


async def section_replay(target: Under, settings: BackendSettings, report: Report) -> None:
    name, pid = target.name, target.pid
    backend = target.backend("replay")
    log(f"{name}: writing {settings.replay_segments} segments to replay")
    events, segments, nbytes = await write_replay_stream(backend, settings)
    rates: dict[str, list[float]] = {v: [] for v in ("prefetch", "window 1")}
    cpu = {v: Cpu() for v in rates}
    access = apersist.SnapshotAccess.REPLAY
    async with apersist.run(apersist.Config(backend, snapshot_access=access)) as run:
        windows = {"prefetch": run._store.read_concurrency, "window 1": 1}  # as shipped; 1
        stream = run.stream("replay")
        for window in windows.values():
            await replay_once(run, stream, events, window=window)  # warm-up
        log(f"{name}: replay, {settings.replay_repeats} rounds")
        for _index, variant in alternate(settings.replay_repeats, "window 1", "prefetch"):
            with metered(cpu[variant], pid, segments):
                elapsed = await replay_once(run, stream, events, window=windows[variant])
            rates[variant].append(events / elapsed)

    per_event_mib = nbytes / events / MIB
    report.rows.append(Row(
        f"replay {segments} segments of {nbytes / segments / KIB:.0f} KiB ({events:,} events): "
        f"windowed prefetch vs 1 at a time", "backends", "ev/s",
        Series("prefetch (as shipped)", rates["prefetch"], "apersist"),
        [Series("read_concurrency=1", rates["window 1"], "sequential")], backend=name,
        note=f"{median(rates['prefetch']) * per_event_mib:,.1f} MiB/s vs "
             f"{median(rates['window 1']) * per_event_mib:,.1f} MiB/s"))
    report.notes[f"{name}, replay"] = cpu_note(cpu, "window 1", "prefetch")



# --------------------------------------------------------------------------- 4. small events


async def section_small_events(target: Under, settings: BackendSettings, report: Report) -> None:
    """Record (until durable) and replay of small events, next to the floor, as on a disk."""
    name, n = target.name, settings.events
    values = make_values(n)
    d: dict[str, list[float]] = {"rec": [], "durable": [], "replay": [], "floor": [], "loads": []}
    commits: list[int] = []
    for rep in range(settings.replay_repeats + 1):  # repeat 0 is the warm-up
        log(f"{name}: record/replay {n:,} events, repeat {rep}/{settings.replay_repeats}")
        backend = target.backend("small")
        elapsed, dumps = floor_record(values)
        loads_s = floor_replay(dumps)
        del dumps
        async with apersist.run(apersist.Config(backend)) as run:
            record = run.stream(STREAM).record
            start = time.perf_counter()
            for value in values:
                await record(value)
            recorded = time.perf_counter()
            await run.commit()
            committed = time.perf_counter()
            count = int(run.stats["commits"])
        access = apersist.SnapshotAccess.REPLAY
        async with apersist.run(apersist.Config(backend, snapshot_access=access)) as run:
            seen = 0
            replay_start = time.perf_counter()
            async for _event in run.stream(STREAM).replay():
                seen += 1
            replay_s = time.perf_counter() - replay_start
        if seen != n:
            raise RuntimeError(f"{name}: replay yielded {seen} events, expected {n}")
        if rep:
            d["floor"].append(n / elapsed)
            d["loads"].append(n / loads_s)
            d["rec"].append(n / (recorded - start))
            d["durable"].append(n / (committed - start))
            d["replay"].append(n / replay_s)
            commits.append(count)
    floor = Series("orjson.dumps + list.append", d["floor"], "floor")
    report.rows += [
        Row(f"record {n:,} events, 1 stream: `record()` per event", "backends", "ev/s",
            Series("record()", d["rec"], "apersist"), [floor], backend=name),
        Row(f"record {n:,} events, 1 stream, until durable: `record()` + final commit", "backends",
            "ev/s", Series("record() + commit", d["durable"], "apersist"), [floor], backend=name,
            note=f"commits per run: {commits}"),
        Row(f"replay {n:,} events, 1 stream", "backends", "ev/s",
            Series("stream.replay()", d["replay"], "apersist"),
            [Series("orjson.loads over the floor's dumps", d["loads"], "floor")], backend=name),
    ]


# --------------------------------------------------------------------------- 5. producers


async def section_producers(target: Under, settings: BackendSettings, report: Report) -> None:
    """Commit latency with ``snapshot_interval_ms=0`` under concurrent producers."""
    import asyncio

    from .core import SMALL_VALUE, concurrent_latencies

    name = target.name
    backend = target.backend("producers")
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=0)) as run, \
            opened_driver(target.backend("producers-bare")) as driver:
        stream = run.stream(STREAM)
        keys: list[str] = []

        async def commit() -> None:
            await stream.record(SMALL_VALUE)
            await run.commit()

        async def bare() -> None:
            keys.append(f"bare/{len(keys):08d}")
            await driver.put(keys[-1], b"x" * 160)

        for producers in settings.producers:
            per = max(2, math.ceil(settings.commit_samples / producers))
            samples: dict[str, list[float]] = {"apersist": [], "bare": []}
            await concurrent_latencies(commit, producers, 1)  # warm-up
            log(f"{name}: commit latency, {producers} producer{'s' * (producers > 1)}, "
                f"{per} commits each")
            for index in range(per):
                for step, fn in rotated([("apersist", commit), ("bare", bare)], index):
                    samples[step] += await concurrent_latencies(fn, producers, 1)
            await driver.delete(keys)
            keys.clear()
            await asyncio.sleep(0)
            for q in (50, 99):
                report.rows.append(Row(
                    f"commit latency p{q}, {producers} concurrent producer{'s' * (producers > 1)}, "
                    "interval 0",
                    "backends", "ms",
                    Series("record 1 event + run.commit()", [percentile(samples["apersist"], q)],
                           "apersist"),
                    [Series("one bare PUT of 160 B (as many at once)",
                            [percentile(samples["bare"], q)], "floor")],
                    backend=name, note=f"{len(samples['apersist'])} samples"))


# --------------------------------------------------------------------------- driver


SECTIONS: tuple[Callable[[Under, BackendSettings, Report], Awaitable[None]], ...] = (
    section_small_events, section_producers, section_commit_latency, section_driver_upload,
    section_commit_upload, section_replay)


def prepare_environment() -> None:
    """Loopback only: no proxy for it, and never botocore's instance-metadata probe."""
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    for var in ("NO_PROXY", "no_proxy"):
        current = os.environ.get(var, "")
        os.environ[var] = ",".join(x for x in (current, LOOPBACK, "localhost") if x)


@contextlib.contextmanager
def servers(backends: Sequence[str], log_dir: Path, report: Report) -> Iterator[list[Under]]:
    """moto_server and/or Azurite on loopback (``tests/support/servers.py``), stopped on the way out."""
    prepare_environment()
    unders: list[Under] = []
    with contextlib.ExitStack() as stack:
        if "s3" in backends:
            started = time.perf_counter()
            url = stack.enter_context(s3_server(log_dir))
            unders.append(s3_under(url))
            report.machine["S3 server"] = f"moto {version_of('moto')} at {url}"
            report.notes["S3 (moto) server startup"] = f"{time.perf_counter() - started:.2f} s"
        if "azure" in backends:
            started = time.perf_counter()
            url = stack.enter_context(azure_server(log_dir))
            unders.append(azure_under(url))
            report.machine["Azure server"] = (f"azurite {azurite_version(azurite_bin())} on node "
                                              f"{node_version()} at {url}, periodic GC off")
            report.notes["Azure (Azurite) server startup"] = f"{time.perf_counter() - started:.2f} s"
        report.machine["server placement"] = (
            f"client (this process) and servers share the {os.cpu_count()} cores, over loopback "
            f"{LOOPBACK}; servers keep everything in memory")
        yield unders


async def run_backends(unders: Sequence[Under], settings: Settings, report: Report, *,
                       sections: bool = True) -> None:
    """The object-store workloads (``sections=False``: only those behind the latency proxy)."""
    bs = BackendSettings.make(settings)
    for under in unders:
        if under.name.startswith("S3"):
            await create_bucket(under.url)
        else:
            await create_container(under.url)
    neighbours = Neighbours(tuple(under.pid for under in unders))
    # One section at a time, backend after backend: a server idles while the other works,
    # so neither competes with the other for the cores.
    for section in SECTIONS if sections else ():
        for under in unders:
            await guarded(report, f"{under.name}: {section.__name__.removeprefix('section_')}",
                          section(under, bs, report))
    from .latency import section_latency

    # Behind the latency proxy, as a remote store answers (latency.py); last, on its own.
    for under in unders:
        await guarded(report, f"{under.name}: latency", section_latency(under, settings, report))
    report.notes["backends: CPU used by other processes while measuring"] = neighbours.describe()
