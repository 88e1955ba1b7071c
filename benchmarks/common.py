"""Shared pieces of the benchmark suite: results, settings, machine facts, the 1 ms ticker."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.metadata
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

STREAM = "bench"
TICK_S = 0.001  # the stall ticker's period
HIGHER_IS_BETTER = {"ev/s", "MiB/s", "x"}
Window = tuple[float, float]


def run_child(module: str, args: Sequence[str], root: Path, *,
              timeout: float = 3600) -> dict[str, Any]:
    """Run ``python -m module args`` from the repository root (a fresh process, so that its
    memory and heap start clean); its last stdout line, parsed as JSON."""
    repo = Path(__file__).resolve().parent.parent
    root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=repo,
                          capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{module} child failed (exit {done.returncode}): "
                           f"{done.stderr.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = orjson.loads(done.stdout.splitlines()[-1])
    return result


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(len(ordered) * q / 100)) - 1]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def make_values(count: int) -> list[dict[str, Any]]:
    """The events every contender records: small dicts of about 34 bytes of JSON."""
    return [{"user": f"u{i % 1000}", "n": i, "ok": True} for i in range(count)]


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` rotated by ``shift``: who goes first changes every repeat."""
    shift %= max(1, len(items))
    return list(items[shift:]) + list(items[:shift])


async def timed_ms(step: Awaitable[object]) -> float:
    """Milliseconds until ``step`` (a coroutine not yet started) completes."""
    start = time.perf_counter()
    await step
    return (time.perf_counter() - start) * 1000


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class Series:
    """One contender's samples in one workload; its value is their median."""

    label: str
    samples: list[float]
    role: str = "other"  # "apersist", "floor", "aiofiles", "aiosqlite", "batched" or "other"

    @property
    def value(self) -> float:
        return median(self.samples)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "role": self.role, "value": self.value,
                "min": min(self.samples, default=float("nan")),
                "max": max(self.samples, default=float("nan")), "samples": self.samples}


@dataclass(slots=True)
class Target:
    """A bound on apersist's value (``against=None``) or on its ratio to a baseline role."""

    against: str | None
    at_least: float | None = None
    at_most: float | None = None

    def describe(self, unit: str) -> str:
        op, bound = ("≥", self.at_least) if self.at_least is not None else ("≤", self.at_most)
        if self.against is None:
            return f"{op} {bound:g} {unit}"
        return f"{op} {bound:g}x {self.against}"


@dataclass(slots=True)
class Row:
    """One line of the table: apersist next to every baseline of one workload."""

    workload: str
    section: str  # the --only name it belongs to
    unit: str  # "ev/s", "MiB/s" (higher is better); "ms", "µs", "MB" (lower is better)
    apersist: Series
    baselines: list[Series] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    backend: str = "filesystem"
    note: str = ""

    def baseline(self, role: str) -> Series | None:
        return next((b for b in self.baselines if b.role == role), None)

    def ratio(self, series: Series) -> float:
        """apersist / baseline (for rates above 1 is faster; for times below 1 is)."""
        return self.apersist.value / series.value if series.value else float("nan")

    def judge(self, target: Target) -> bool | None:
        if target.against is None:
            value = self.apersist.value
        else:
            base = self.baseline(target.against)
            if base is None:
                return None
            value = self.ratio(base)
        if value != value:  # NaN: not measured
            return None
        if target.at_least is not None:
            return value >= target.at_least
        assert target.at_most is not None
        return value <= target.at_most

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload, "section": self.section, "backend": self.backend,
            "unit": self.unit, "apersist": self.apersist.to_json(),
            "baselines": [b.to_json() for b in self.baselines],
            "ratios": {b.label: self.ratio(b) for b in self.baselines},
            "targets": [{"target": t.describe(self.unit), "met": self.judge(t), "against": t.against,
                         "at_least": t.at_least, "at_most": t.at_most} for t in self.targets],
            "note": self.note,
        }


def row_from_json(doc: dict[str, Any]) -> Row:
    """The inverse of ``Row.to_json`` (to re-render a saved run)."""
    def series(d: dict[str, Any]) -> Series:
        return Series(d["label"], list(d["samples"]), d["role"])

    targets = []
    for t in doc["targets"]:
        if "against" in t:
            targets.append(Target(t["against"], t["at_least"], t["at_most"]))
            continue
        op, bound, *rest = t["target"].split(" ", 2)  # "≥ 0.5x floor", "≤ 5 ms"
        against = rest[0] if bound.endswith("x") and rest else None
        value = float(bound.rstrip("x"))
        targets.append(Target(against, value if op == "≥" else None, value if op == "≤" else None))
    return Row(doc["workload"], doc["section"], doc["unit"], series(doc["apersist"]),
               [series(b) for b in doc["baselines"]], targets, doc["backend"], doc["note"])


@dataclass(slots=True)
class Report:
    settings: dict[str, Any]
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)  # raw data behind the plots
    workloads: dict[str, Any] = field(default_factory=dict)  # per workload: time, load, GC
    errors: list[str] = field(default_factory=list)  # workloads that failed (the run goes on)
    runtime_s: float = 0.0

    @classmethod
    def from_json(cls, data: bytes) -> Report:
        doc = orjson.loads(data)
        return cls(doc["settings"], doc["machine"], [row_from_json(r) for r in doc["rows"]],
                   doc["notes"], doc["series"], doc["workloads"], doc.get("errors", []),
                   doc["runtime_s"])

    def to_json(self) -> bytes:
        doc = {"settings": self.settings, "machine": self.machine,
               "rows": [row.to_json() for row in self.rows], "notes": self.notes,
               "series": self.series, "workloads": self.workloads, "errors": self.errors,
               "runtime_s": self.runtime_s}
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
                            default=str)


@contextlib.contextmanager
def workload_scope(report: Report, name: str) -> Any:
    """Note a workload's wall time, load average and garbage collections."""
    log(f"== {name}")
    before = [s["collections"] for s in gc.get_stats()]
    load = load_average()
    started = time.perf_counter()
    try:
        yield
    finally:
        after = [s["collections"] for s in gc.get_stats()]
        report.workloads[name] = {
            "seconds": round(time.perf_counter() - started, 2),
            "loadavg_before": load, "loadavg_after": load_average(),
            "gc_collections_by_generation": [b - a for a, b in zip(before, after, strict=True)],
        }


async def guarded(report: Report, name: str, step: Awaitable[None]) -> None:
    """Run one workload; a failure is recorded and the suite goes on with the next one.

    The error lands in ``report.errors`` (and the table's notes); ``run.py`` then exits
    non-zero, so a smoke run still fails, but the other workloads' numbers are kept.
    """
    try:
        await step
    except Exception as exc:  # a workload's failure must not lose the others' results
        log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        report.errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:500]}")


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` and its mount point (Linux only)."""
    real = os.path.realpath(path)
    mount, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(mount):
                mount, kind = point, fields[2]
    return f"{kind} (mounted at {mount})" if mount else kind


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (NaN where the OS has none)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return [round(x, 2) for x in load]


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def memory_total_gb() -> float:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1e6, 1)
    return float("nan")


def transparent_hugepage() -> str:
    """The kernel's THP mode (the bracketed one): it sets what a page fault costs."""
    try:
        modes = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split()
    except OSError:
        return "unknown"
    return next((mode.strip("[]") for mode in modes if mode.startswith("[")), "unknown")


def machine_facts(root: Path) -> dict[str, Any]:
    import sqlite3

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": memory_total_gb(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        "versions": {name: version_of(name) for name in (
            "apersist", "orjson", "anyio", "aiofiles", "aiosqlite", "aiobotocore", "botocore",
            "azure-storage-blob", "azure-core", "moto", "matplotlib")} | {"sqlite": sqlite3.sqlite_version},
        "temp_dir": str(root),
        "filesystem": filesystem_of(root),
        "gc": {"enabled": gc.isenabled(), "thresholds": list(gc.get_threshold())},
        "switch_interval_s": sys.getswitchinterval(),
        "transparent_hugepage": transparent_hugepage(),
        "loadavg_at_start": load_average(),
    }


class Stores:
    """Fresh store directories under one temporary root, removed as soon as unneeded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made = 0

    def new(self, label: str) -> Path:
        self._made += 1
        path = self.root / f"{label}-{self._made}"
        path.mkdir(parents=True)
        return path

    @staticmethod
    def drop(path: Path | None) -> None:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- ticker


class Ticker:
    """A task that sleeps 1 ms in a loop and notes how late each wake-up was."""

    def __init__(self, period: float = TICK_S) -> None:
        self.period = period
        self.ticks: list[tuple[float, float]] = []  # (sleep started, seconds late)
        self.sleeping_since = 0.0
        self._woke = asyncio.Event()

    async def run(self) -> None:
        period, clock, ticks = self.period, time.perf_counter, self.ticks
        while True:
            started = self.sleeping_since = clock()
            await asyncio.sleep(period)
            ticks.append((started, clock() - started - period))
            woke, self._woke = self._woke, asyncio.Event()
            woke.set()

    async def resync(self) -> float:
        """Return now, once the ticker has started a sleep at or after now.

        The tick in flight (possibly very late after a stretch of code that never
        yielded) completes first, so a window opened at the returned time holds no
        lateness caused before it.
        """
        now = time.perf_counter()
        while self.sleeping_since < now:
            await self._woke.wait()
        return now

    def lags_ms(self, windows: Sequence[Window]) -> list[float]:
        """Lateness (ms) of every tick whose sleep started inside one of ``windows``."""
        return [late * 1000 for started, late in self.ticks
                if any(a <= started < b for a, b in windows)]


@contextlib.asynccontextmanager
async def ticking() -> AsyncIterator[Ticker]:
    ticker = Ticker()
    task = asyncio.create_task(ticker.run())
    try:
        yield ticker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --------------------------------------------------------------------------- settings


@dataclass(slots=True)
class Settings:
    """Every size knob of the suite (``python -m benchmarks --help`` lists them)."""

    root: Path
    quick: bool
    events: int  # record, replay and stall
    repeats: int
    batch: int  # events per batch: record_many, and each baseline's durable unit
    streams: int
    commit_samples: int  # per contender and producer count
    producers: tuple[int, ...]
    memory_events: tuple[int, ...]
    table_sizes: tuple[int, ...]
    state_keys: tuple[int, ...]  # table and cache state: memory, open, stall (state.py)
    cache_calls: int
    backend_events: int  # record/replay on S3 and Azure
    backends: tuple[str, ...]
    history_commits: tuple[int, ...] = (1000, 5000, 20000)  # open and replay against history
    job_rows: int = 1_000_000  # the headline job (job.py)
    peers: bool = False  # run the job in Pathway 0.33.0 too (peers/)
    latency_ms: tuple[float, ...] = (0.0, 20.0)  # the object stores' workloads behind the proxy
    latency_history: int = 5000  # commits of the long store opened behind the proxy

    @property
    def warmup_events(self) -> int:
        return min(20_000, max(1_000, self.events // 10))

    def to_json(self) -> dict[str, Any]:
        return {name: (str(getattr(self, name)) if name == "root" else getattr(self, name))
                for name in self.__slots__}  # type: ignore[attr-defined]
