"""apersist object-store benchmark: S3 (moto_server) and Azure (Azurite), same run, same box.

Starts moto_server and Azurite itself on 127.0.0.1 (free ports; both are stopped at the
end, also on an error or Ctrl-C), then measures for each backend:

1. **commit latency** through the public API: record one segment's worth (64 KiB) into
   1 stream or into each of 16 streams of a run with ``snapshot_interval_ms=60_000`` (so
   only explicit commits write), then ``await run.commit()``: p50 and p99. Baselines, taken
   interleaved sample by sample: one bare ``driver.put`` of a segment's size through a
   driver made by ``open_driver`` (the same driver class and settings), and "its own I/O":
   the segment puts (1, or 16 at once) followed by one small create-if-absent put.
2. **upload throughput, concurrent vs sequential**: 16 objects of 1 MiB put through one
   driver with ``gather_bounded(..., 16)`` (what ``Store.commit`` does) vs one after
   another; then the same through the commit path, ``Config(upload_concurrency=16)`` vs
   ``Config(upload_concurrency=1)`` committing 16 segments of 1 MiB. MiB/s and speed-up.
3. **replay throughput, prefetch vs none**: a stream of 200 segments of ~64 KiB replayed
   with ``stream.replay()`` as shipped (windows of up to 16 segments read concurrently) vs
   with ``apersist._store._READ_CONCURRENCY = 1`` (one segment at a time). ev/s, MiB/s.

Variants alternate (their order flips every round) after a warm-up; throughputs are the
best of ``--repeats`` rounds, latencies percentiles over all samples. Client and servers
share this machine's cores, so the CPU time each side used is reported with the speed-ups.
Targets are printed, never asserted.

    python benchmarks/bench_backends.py [--quick] [--repeats R] [--samples N] [--json PATH]
                                        [--backends s3,azure]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import apersist
import apersist._store as store_module
from apersist._concurrency import gather_bounded
from apersist._drivers import Driver, open_driver

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
S3_KEY_ID = "testing"
S3_SECRET = "testing"
S3_REGION = "us-east-1"
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft).
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
               "K1SZFPTOtr/KBHBeksoGMGw==")
AZURITE_BIN = ROOT / ".cache/infra/node_modules/.bin/azurite-blob"
BUCKET = "apersist-bench"
CONTAINER = "apersist-bench"
STREAMS = 16  # streams of the 16-segment commits; also the upload fan-out
CONCURRENCY = 16  # Config.upload_concurrency's default, and the read window
SPEEDUP_TARGET = 8.0
COMMIT_TARGET = 2.0  # a 1-segment commit is two sequential puts: the segment, the record
RECORD_BYTES = 2048  # stands in for a commit record in the "own I/O" baseline
REPLAY_EVENT_BYTES = 1000  # JSON size of one replayed event
KIB, MIB = 1 << 10, 1 << 20


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Settings:
    commit_samples: int
    commit_warmup: int
    commit_segment: int  # bytes per segment in the commit-latency section (about)
    upload_object: int  # bytes per object/segment in the throughput section
    upload_repeats: int
    replay_segments: int
    replay_segment: int  # max_segment_bytes of the replayed stream
    replay_repeats: int
    backends: tuple[str, ...]

    @classmethod
    def make(cls, *, quick: bool, repeats: int | None, samples: int | None,
             backends: tuple[str, ...]) -> Settings:
        if quick:
            return cls(samples or 15, 2, 16 * KIB, 256 * KIB, repeats or 2, 16, 16 * KIB,
                       repeats or 2, backends)
        return cls(samples or 200, 20, 64 * KIB, MIB, repeats or 5, 200, 64 * KIB,
                   repeats or 3, backends)


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class Row:
    """One table row: apersist's number next to its baseline's (or the other variant's)."""

    metric: str
    backend: str
    unit: str  # "ms" (lower is better), "MiB/s" or "ev/s" (higher is better)
    value: float
    base: float
    base_label: str
    target: str = "—"
    met: bool | None = None  # None: no target for this row
    detail: str = ""  # appended to the apersist cell
    base_detail: str = ""  # appended to the baseline cell
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.value / self.base if self.base else float("nan")

    def at_least(self, bound: float) -> Row:
        self.target, self.met = f"≥ {bound:g}x", self.ratio >= bound
        return self

    def at_most(self, bound: float) -> Row:
        self.target, self.met = f"≤ {bound:g}x", self.ratio <= bound
        return self

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ratio"] = self.ratio
        return doc


@dataclass(slots=True)
class Report:
    settings: dict[str, Any]
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    runtime_s: float = 0.0


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(len(ordered) * q / 100)) - 1]


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return [round(x, 2) for x in load]


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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


def machine_facts() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        "apersist": apersist.__version__,
        "aiobotocore / botocore": f"{version_of('aiobotocore')} / {version_of('botocore')}",
        "azure-storage-blob / azure-core": (f"{version_of('azure-storage-blob')} / "
                                            f"{version_of('azure-core')}"),
        "aiohttp": version_of("aiohttp"),
        "anyio": version_of("anyio"),
        "loadavg_at_start": load_average(),
        "placement": (f"client (this process) and both servers share the {os.cpu_count()} "
                      f"cores, over loopback {LOOPBACK}; servers keep everything in memory"),
    }


# --------------------------------------------------------------------------- servers


@dataclass(slots=True)
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    startup_s: float
    version: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM this one process, SIGKILL it if it has not exited after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)  # Azurite can take 2-3 s to close right after heavy load
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_port(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """True once ``port`` on loopback accepts a connection; False if ``proc`` died or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@contextlib.contextmanager
def serve(name: str, argv: Sequence[str], log_path: Path, version: str,
          timeout: float = 60.0) -> Iterator[Server]:
    """Run ``argv`` (``{port}`` -> a free loopback port) until it listens; stop it on exit.

    A port taken between choosing and binding it makes the server die: up to 3 tries.
    """
    for attempt in range(1, 4):
        port = free_port()
        started = time.perf_counter()
        with log_path.open("ab") as sink:
            proc = subprocess.Popen([a.replace("{port}", str(port)) for a in argv],
                                    stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
        try:
            if not wait_for_port(proc, port, timeout):
                log(f"{name} did not start (try {attempt}, exit={proc.poll()})")
                continue
            server = Server(name, proc, port, log_path, time.perf_counter() - started, version)
            log(f"{name} {version} listening on {LOOPBACK}:{port} (pid {proc.pid}, "
                f"{server.startup_s:.2f} s)")
            yield server
            return
        finally:
            stop_process(proc)
    tail = log_path.read_bytes()[-3000:].decode(errors="replace") if log_path.exists() else ""
    raise RuntimeError(f"{name} did not start; log tail:\n{tail}")


def moto_argv() -> list[str]:
    beside = Path(sys.executable).with_name("moto_server")
    exe = str(beside) if beside.exists() else shutil.which("moto_server")
    if not exe:
        raise RuntimeError("moto_server is missing: pip install 'moto[server]'")
    return [exe, "-H", LOOPBACK, "-p", "{port}"]


def azurite_exe() -> str:
    exe = os.environ.get("AZURITE_BIN") or str(AZURITE_BIN)
    if not Path(exe).exists():
        exe = shutil.which("azurite-blob") or ""
    if not exe:
        raise RuntimeError("azurite-blob is missing: npm install --prefix .cache/infra azurite@3.37.0")
    return exe


def azurite_argv(exe: str) -> list[str]:
    # Run the bin directly (never through npx: killing npx leaves node listening).
    return [exe, "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--inMemoryPersistence",
            "--blobHost", LOOPBACK, "--blobPort", "{port}"]


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) that process ``pid`` has used so far."""
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

    pids: tuple[int, ...]
    wall: float = field(default_factory=time.perf_counter)
    busy: float = field(default_factory=machine_busy_s)
    ours: float = 0.0

    def __post_init__(self) -> None:
        self.ours = self._ours()

    def _ours(self) -> float:
        return time.process_time() + sum(server_cpu_s(pid) for pid in self.pids)

    def describe(self) -> str:
        wall = time.perf_counter() - self.wall
        others = (machine_busy_s() - self.busy) - (self._ours() - self.ours)
        return (f"{max(0.0, others):.1f} CPU-s in {wall:.1f} s (an average of "
                f"{max(0.0, others) / wall:.2f} of {os.cpu_count()} cores busy with other processes)")


# --------------------------------------------------------------------------- targets


@dataclass(slots=True)
class Target:
    """One backend under test: how to make a ``Backend`` for a root, and its server."""

    name: str
    make: Callable[[str], apersist.Backend]
    server: Server

    def backend(self, label: str) -> apersist.Backend:
        return self.make(f"bench/{label}-{uuid.uuid4().hex[:12]}")


def s3_target(server: Server) -> Target:
    settings = apersist.AwsS3Settings(BUCKET, access_key=S3_KEY_ID, secret_access_key=S3_SECRET,
                                      with_path_style=True, region=S3_REGION,
                                      endpoint=f"http://{LOOPBACK}:{server.port}")
    return Target("S3 (moto)", lambda root: apersist.Backend.s3(root, settings), server)


def azure_target(server: Server) -> Target:
    endpoint = f"http://{LOOPBACK}:{server.port}/{AZURITE_ACCOUNT}"
    return Target("Azure (Azurite)", lambda root: apersist.Backend.azure(
        root, AZURITE_ACCOUNT, AZURITE_KEY, CONTAINER, endpoint=endpoint), server)


async def create_bucket(port: int) -> None:
    from aiobotocore.session import get_session  # type: ignore[import-untyped]

    async with get_session().create_client(
            "s3", endpoint_url=f"http://{LOOPBACK}:{port}", region_name=S3_REGION,
            aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET) as client:
        await client.create_bucket(Bucket=BUCKET)


async def create_container(port: int) -> None:
    from azure.storage.blob.aio import BlobServiceClient

    credential = {"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY}
    async with BlobServiceClient(f"http://{LOOPBACK}:{port}/{AZURITE_ACCOUNT}",
                                 credential=credential) as service:
        await service.create_container(CONTAINER)


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


async def timed_ms(step: Awaitable[object]) -> float:
    """Milliseconds until ``step`` (a coroutine not yet started) completes."""
    start = time.perf_counter()
    await step
    return (time.perf_counter() - start) * 1000


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
def metered(cpu: Cpu, server_pid: int, requests: int) -> Iterator[None]:
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
            raise RuntimeError(f"commit wrote {info.bytes} bytes, expected {streams} segments")

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


async def section_commit_latency(target: Target, settings: Settings, report: Report) -> None:
    name = target.name
    payload = text_payload(settings.commit_segment - 256)  # framing and header fill the rest
    async with apersist.run(config(target.backend("commit"))) as run, \
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
        for q in (50, 99):
            row = Row(f"{label}: p{q}", name, "ms", percentile(mine, q), percentile(s["bare"], q),
                      bare, samples={"apersist": mine, "baseline": s["bare"]})
            rows.append(row.at_most(COMMIT_TARGET) if streams == 1 and q == 50 else row)
        own = s[f"own{streams}"]
        what = "1 PUT" if streams == 1 else f"{streams} concurrent PUTs"
        rows.append(Row(f"{label}: p50, vs its own I/O", name, "ms", percentile(mine, 50),
                        percentile(own, 50), f"{what} + 1 create-if-absent PUT of "
                        f"{RECORD_BYTES / KIB:.0f} KiB", samples={"apersist": mine, "baseline": own}))
    report.rows += rows
    report.notes[f"{name}, commit latency: segment bytes"] = segment


# --------------------------------------------------------------------------- 2. upload throughput


async def driver_round(driver: Driver, label: str, count: int, data: bytes, *, concurrent: bool,
                       cpu: Cpu, pid: int) -> float:
    """MiB/s of one round of ``count`` puts; the objects are deleted afterwards (untimed)."""
    keys = [f"up/{label}/{i:02d}" for i in range(count)]
    with metered(cpu, pid, count):
        start = time.perf_counter()
        await put_all(driver, keys, data, concurrent=concurrent)
        elapsed = time.perf_counter() - start
    await driver.delete(keys)
    return count * len(data) / MIB / elapsed


async def section_driver_upload(target: Target, settings: Settings, report: Report) -> None:
    name, pid = target.name, target.server.proc.pid
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
    row = Row(f"upload {size} through one driver: gather_bounded(16) vs one by one", name, "MiB/s",
              max(rates["concurrent"]), max(rates["sequential"]), "sequential puts",
              samples=rates).at_least(SPEEDUP_TARGET)
    report.rows.append(row)
    report.notes[f"{name}, driver uploads"] = cpu_note(cpu, "sequential", "concurrent")


async def commit_round(run: apersist.Run, payload: str, cpu: Cpu, pid: int) -> float:
    """MiB/s of one commit of one segment in each of the run's 16 streams."""
    for i in range(STREAMS):
        await run.stream(f"s{i:02d}").record(payload)
    with metered(cpu, pid, STREAMS + 1):  # the segments and the commit record
        start = time.perf_counter()
        info = await run.commit()
        elapsed = time.perf_counter() - start
    return info.bytes / MIB / elapsed


async def section_commit_upload(target: Target, settings: Settings, report: Report) -> None:
    name, pid = target.name, target.server.proc.pid
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
    row = Row(f"commit of {size}: upload_concurrency=16 vs =1", name, "MiB/s",
              max(rates["concurrency 16"]), max(rates["concurrency 1"]), "upload_concurrency=1",
              samples=rates).at_least(SPEEDUP_TARGET)
    report.rows.append(row)
    report.notes[f"{name}, commit uploads"] = cpu_note(cpu, "concurrency 1", "concurrency 16")


# --------------------------------------------------------------------------- 3. replay


async def write_replay_stream(backend: apersist.Backend, settings: Settings) -> tuple[int, int, int]:
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


async def replay_once(stream: apersist.Stream, events: int, *, window: int) -> float:
    """Seconds to replay ``stream`` reading ``window`` segments at once (patched, restored)."""
    saved = store_module._READ_CONCURRENCY
    store_module._READ_CONCURRENCY = window
    try:
        count = 0
        start = time.perf_counter()
        async for _event in stream.replay():
            count += 1
        elapsed = time.perf_counter() - start
    finally:
        store_module._READ_CONCURRENCY = saved
    if count != events:
        raise RuntimeError(f"replay yielded {count} events, expected {events}")
    return elapsed


async def section_replay(target: Target, settings: Settings, report: Report) -> None:
    name, pid = target.name, target.server.proc.pid
    backend = target.backend("replay")
    log(f"{name}: writing {settings.replay_segments} segments to replay")
    events, segments, nbytes = await write_replay_stream(backend, settings)
    windows = {"prefetch": store_module._READ_CONCURRENCY, "window 1": 1}
    rates: dict[str, list[float]] = {v: [] for v in windows}
    cpu = {v: Cpu() for v in windows}
    access = apersist.SnapshotAccess.REPLAY
    async with apersist.run(apersist.Config(backend, snapshot_access=access)) as run:
        stream = run.stream("replay")
        for window in windows.values():
            await replay_once(stream, events, window=window)  # warm-up
        log(f"{name}: replay, {settings.replay_repeats} rounds")
        for _index, variant in alternate(settings.replay_repeats, "window 1", "prefetch"):
            with metered(cpu[variant], pid, segments):
                elapsed = await replay_once(stream, events, window=windows[variant])
            rates[variant].append(events / elapsed)

    def mib_s(rate: float) -> str:
        return f" ({rate * nbytes / events / MIB:,.1f} MiB/s)"

    best, base = max(rates["prefetch"]), max(rates["window 1"])
    report.rows.append(Row(
        f"replay {segments} segments of {nbytes / segments / KIB:.0f} KiB ({events:,} events): "
        f"windowed prefetch vs 1 at a time", name, "ev/s", best, base,
        "_READ_CONCURRENCY = 1", detail=mib_s(best), base_detail=mib_s(base), samples=rates))
    report.notes[f"{name}, replay"] = cpu_note(cpu, "window 1", "prefetch")


# --------------------------------------------------------------------------- driver


SECTIONS: tuple[Callable[[Target, Settings, Report], Awaitable[None]], ...] = (
    section_commit_latency, section_driver_upload, section_commit_upload, section_replay)


async def run_all(targets: Sequence[Target], settings: Settings, report: Report) -> None:
    for target in targets:
        if target.name.startswith("S3"):
            await create_bucket(target.server.port)
        else:
            await create_container(target.server.port)
    neighbours = Neighbours(tuple(target.server.proc.pid for target in targets))
    # One section at a time, backend after backend: a server idles while the other works,
    # so neither competes with the other for the two cores.
    for section in SECTIONS:
        for target in targets:
            await section(target, settings, report)
    report.notes["CPU used by other processes while measuring"] = neighbours.describe()


def start_servers(stack: contextlib.ExitStack, settings: Settings, log_dir: Path) -> list[Target]:
    targets = []
    if "s3" in settings.backends:
        server = stack.enter_context(serve("moto_server", moto_argv(), log_dir / "moto.log",
                                           f"moto {version_of('moto')}"))
        targets.append(s3_target(server))
    if "azure" in settings.backends:
        exe = azurite_exe()
        server = stack.enter_context(serve(
            "azurite", azurite_argv(exe), log_dir / "azurite.log",
            f"azurite {azurite_version(exe)} on node {node_version()}"))
        targets.append(azure_target(server))
    return targets


# --------------------------------------------------------------------------- output


def fmt_value(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "n/a"
    if unit == "ev/s":
        return f"{value:,.0f} ev/s"
    if unit == "MiB/s":
        return f"{value:,.1f} MiB/s"
    return f"{value:,.2f} ms" if value < 100 else f"{value:,.0f} ms"


def fmt_target(row: Row) -> str:
    if row.met is None:
        return row.target
    return f"{row.target}: {'met' if row.met else '**missed**'}"


def render_markdown(report: Report) -> str:
    s = report.settings
    lines = [
        "## apersist object-store benchmark",
        "",
        f"S3 = moto_server, Azure = Azurite, both on {LOOPBACK}, started by this run. "
        f"Commit latency: {s['commit_samples']} samples (after {s['commit_warmup']} warm-up), "
        f"all variants interleaved; throughput: best of {s['upload_repeats']} (uploads) / "
        f"{s['replay_repeats']} (replay) alternating rounds. Ratio = apersist / baseline.",
        "",
        "| metric | backend | apersist | baseline / variant | ratio | target |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in report.rows:
        lines.append(f"| {row.metric} | {row.backend} | {fmt_value(row.value, row.unit)}{row.detail} | "
                     f"{fmt_value(row.base, row.unit)}{row.base_detail} ({row.base_label}) | "
                     f"{row.ratio:.2f}x | {fmt_target(row)} |")
    lines += ["", "Machine:", ""]
    lines += [f"- {key}: {value}" for key, value in report.machine.items()]
    lines += ["", "Notes:", ""]
    lines += [f"- {key}: {value}" for key, value in report.notes.items()]
    lines += [f"- runtime: {report.runtime_s:.1f} s", ""]
    return "\n".join(lines)


def to_json(report: Report) -> str:
    doc = asdict(report)
    doc["rows"] = [row.to_json() for row in report.rows]
    return json.dumps(doc, indent=2, default=str)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 16 KiB / 256 KiB segments, 15 commit samples, 2 rounds")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of each throughput comparison (default 5 uploads, 3 replay; "
                             "2 with --quick)")
    parser.add_argument("--samples", type=int, default=None,
                        help="commit-latency samples (default 200; 15 with --quick)")
    parser.add_argument("--backends", default="s3,azure",
                        help="comma-separated subset of s3,azure (default both)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the results (with every sample) as JSON to PATH")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.samples is not None and args.samples < 1:
        parser.error("--samples must be at least 1")
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if not backends or set(backends) - {"s3", "azure"}:
        parser.error("--backends takes s3, azure or both")
    args.backends = backends
    return args


def exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C does, so the servers are stopped on the way out."""
    raise SystemExit(128 + signum)


def prepare_environment() -> None:
    """Loopback only: no proxy for it, and never botocore's instance-metadata probe."""
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    for var in ("NO_PROXY", "no_proxy"):
        current = os.environ.get(var, "")
        os.environ[var] = ",".join(x for x in (current, LOOPBACK, "localhost") if x)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.make(quick=args.quick, repeats=args.repeats, samples=args.samples,
                             backends=args.backends)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    prepare_environment()
    started = time.perf_counter()
    report = Report(settings=asdict(settings), machine=machine_facts())
    with tempfile.TemporaryDirectory(prefix="apersist-bench-backends-") as tmp, \
            contextlib.ExitStack() as servers:
        targets = start_servers(servers, settings, Path(tmp))
        for target in targets:
            report.machine[f"{target.name} server"] = target.server.version
            report.notes[f"{target.name} server startup"] = f"{target.server.startup_s:.2f} s"
        asyncio.run(run_all(targets, settings, report))
    report.machine["loadavg_at_end"] = load_average()
    report.runtime_s = time.perf_counter() - started
    print(render_markdown(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(to_json(report) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
