"""What apersist is measured against: the floor and two ways asyncio apps persist by hand.

Every baseline gets the same values as apersist, in the same batches, in the same process
and run, and each is timed from its first event until its last batch is durable:

- **floor**: ``orjson.dumps`` + ``list.append`` (record), ``orjson.loads`` over the same
  bytes (replay), one ``write`` + ``fsync`` of a small file (commit latency). Nothing can
  record, replay or commit for less; it is not durable (record) or not a log (commit).
- **aiofiles JSON-lines log** (:class:`JsonlLog`): one file opened with ``aiofiles.open``
  in append mode; a batch is one ``write`` of its lines (``orjson.OPT_APPEND_NEWLINE``),
  then ``flush`` and ``os.fsync`` in a worker thread. Replay reads 1 MiB chunks and
  ``orjson.loads`` every line: a careful hand-written log, not a line-per-thread-hop one.
- **aiosqlite WAL** (:class:`SqliteLog`): ``journal_mode=WAL``, ``synchronous=FULL`` (a
  commit is durable, as a batch of the other two is), one ``executemany`` of the batch's
  rows (one row per event, the value as JSON text) and one ``commit`` per batch. Replay is
  one ``SELECT ... ORDER BY id`` fetched in chunks of a batch, each row ``orjson.loads``-ed.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiofiles
import aiosqlite
import orjson

Values = Sequence[Any]
READ_CHUNK = 1 << 20


# --------------------------------------------------------------------------- the floor


def floor_record(values: Values) -> tuple[float, list[bytes]]:
    """Seconds for ``orjson.dumps`` + ``list.append`` over ``values``, and the dumps."""
    dumps = orjson.dumps
    out: list[bytes] = []
    append = out.append
    start = time.perf_counter()
    for value in values:
        append(dumps(value))
    return time.perf_counter() - start, out


def floor_record_streams(values: Values, streams: int) -> float:
    """The floor of recording into ``streams`` streams: dumps, append to list ``i % streams``."""
    dumps = orjson.dumps
    outs: list[list[bytes]] = [[] for _ in range(streams)]
    appends = [out.append for out in outs]
    start = time.perf_counter()
    for i, value in enumerate(values):
        appends[i % streams](dumps(value))
    return time.perf_counter() - start


class RecordFloor:
    """Runs of the record floor over ``values``; holds the newest run's dumps.

    Every result is kept, as the floor says, and orjson makes that costly: each result
    is allocated as a 4 KiB ``bytes`` and then shrunk, so a cold heap takes a page fault
    per kept value (see the README). The previous run's dumps are freed before each run,
    so runs after the first reuse warm memory and memory holds one copy at most.
    """

    def __init__(self, values: Values) -> None:
        self.values = values
        self.dumps: list[bytes] = []
        #: Minor page faults per value of each run, in order: whether the heap was warm.
        self.faults_per_value: list[float] = []

    def run(self) -> float:
        """Seconds for one run; ``self.dumps`` then holds its serialized values."""
        self.dumps = []
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        elapsed, self.dumps = floor_record(self.values)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        self.faults_per_value.append(round(faults / max(len(self.values), 1), 3))
        return elapsed


def floor_dumps_only(values: Values) -> float:
    """Seconds for ``orjson.dumps`` alone, its result dropped (the pure CPU cost)."""
    dumps = orjson.dumps
    start = time.perf_counter()
    for value in values:
        dumps(value)
    return time.perf_counter() - start


def floor_replay(dumped: Sequence[bytes]) -> float:
    """Seconds for ``orjson.loads`` over every serialized value."""
    loads = orjson.loads
    start = time.perf_counter()
    for raw in dumped:
        loads(raw)
    return time.perf_counter() - start


def write_fsync(path: Path, data: bytes) -> None:
    """Create ``path``, write ``data``, fsync it: the floor of any durable write."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> int:
    """Create ``path`` and write ``data``; return the open descriptor (not yet fsynced)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bare_commit(commits: Path, name: str, data: bytes) -> None:
    """The bare I/O of a small filesystem commit, in the driver's order (format 5.0: the
    commit record carries its segments, so it is one new file).

    The record is written to a temporary name and fsynced, linked into place (create if
    absent), the temporary name unlinked, and the directory fsynced: two fsyncs in one
    worker-thread call, as ``FilesystemDriver.put(if_absent=True)`` makes them.
    """
    tmp = commits / f".tmp-{name}"
    fd = _write(tmp, data)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.link(tmp, commits / name)
    os.unlink(tmp)
    _fsync_dir(commits)


async def timed_write_fsync(path: Path, data: bytes) -> float:
    """Seconds for one ``write_fsync`` in a worker thread, awaited from the loop."""
    start = time.perf_counter()
    await asyncio.to_thread(write_fsync, path, data)
    elapsed = time.perf_counter() - start
    await asyncio.to_thread(path.unlink)
    return elapsed


def batches(values: Values, size: int) -> list[Values]:
    """``values`` cut into consecutive slices of ``size`` (the last may be shorter)."""
    return [values[i:i + size] for i in range(0, len(values), size)]


class BatchLog:
    """A baseline log: ``open``, ``append_batch`` (durable on return) and ``close``."""

    async def open(self) -> Any:
        raise NotImplementedError

    async def append_batch(self, batch: Values) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def record(self, values: Values, batch: int) -> float:
        """Seconds to write ``values`` in batches of ``batch``, each made durable."""
        parts = batches(values, batch)
        await self.open()
        try:
            start = time.perf_counter()
            for part in parts:
                await self.append_batch(part)
            return time.perf_counter() - start
        finally:
            await self.close()


# --------------------------------------------------------------------------- aiofiles


class JsonlLog(BatchLog):
    """A hand-written durable log: JSON lines through aiofiles, fsync per batch."""

    name = "aiofiles JSON-lines log"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._file = await aiofiles.open(self.path, "ab")

    async def close(self) -> None:
        if self._file is not None:
            await self._file.close()
            self._file = None

    async def append_batch(self, batch: Values) -> None:
        """Write ``batch`` as JSON lines and make it durable (flush + fsync)."""
        dumps, option = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        data = b"".join([dumps(value, option=option) for value in batch])
        file = self._file
        async with self._lock:  # one writer at a time keeps lines whole and in order
            await file.write(data)
            await file.flush()
        await asyncio.to_thread(os.fsync, file.fileno())

    async def replay(self, expected: int) -> float:
        """Seconds to read every line back and ``orjson.loads`` it; checks the count."""
        loads = orjson.loads
        count = 0
        start = time.perf_counter()
        async with aiofiles.open(self.path, "rb") as file:
            tail = b""
            while chunk := await file.read(READ_CHUNK):
                lines = (tail + chunk).split(b"\n")
                tail = lines.pop()
                for line in lines:
                    loads(line)
                count += len(lines)
            if tail:
                loads(tail)
                count += 1
        elapsed = time.perf_counter() - start
        if count != expected:
            raise RuntimeError(f"aiofiles log replayed {count} events, expected {expected}")
        return elapsed


# --------------------------------------------------------------------------- aiosqlite


class SqliteLog(BatchLog):
    """An event table in SQLite (WAL, synchronous=FULL) through aiosqlite, commit per batch."""

    name = "aiosqlite WAL"

    def __init__(self, path: Path, *, chunk: int = 1024) -> None:
        self.path = path
        self.chunk = chunk
        self.db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, iter_chunk_size=self.chunk)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("CREATE TABLE IF NOT EXISTS events "
                         "(id INTEGER PRIMARY KEY AUTOINCREMENT, value TEXT NOT NULL)")
        await db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        await db.commit()
        self.db = db
        return db

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
            self.db = None

    async def append_batch(self, batch: Values) -> None:
        """Insert one row per value (JSON text) and commit: durable on return."""
        assert self.db is not None
        dumps = orjson.dumps
        rows = [(dumps(value).decode(),) for value in batch]
        # One transaction at a time: concurrent producers on one connection would otherwise
        # interleave their inserts and commits (sqlite3 rejects some interleavings).
        async with self._lock:
            await self.db.executemany("INSERT INTO events (value) VALUES (?)", rows)
            await self.db.commit()

    async def replay(self, expected: int) -> float:
        """Seconds to select every event in order and ``orjson.loads`` it; checks the count."""
        loads = orjson.loads
        count = 0
        async with aiosqlite.connect(self.path, iter_chunk_size=self.chunk) as db:
            start = time.perf_counter()
            async with db.execute("SELECT value FROM events ORDER BY id") as cursor:
                async for (value,) in cursor:
                    loads(value)
                    count += 1
            elapsed = time.perf_counter() - start
        if count != expected:
            raise RuntimeError(f"aiosqlite replayed {count} events, expected {expected}")
        return elapsed

    async def write_state(self, state: dict[str, Any], batch: int) -> None:
        """Upsert ``state`` into the ``kv`` table, committing every ``batch`` keys."""
        db = await self.open()
        try:
            items = list(state.items())
            for first in range(0, len(items), batch):
                rows = [(key, orjson.dumps(value).decode()) for key, value in items[first:first + batch]]
                await db.executemany("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", rows)
                await db.commit()
        finally:
            await self.close()

    async def load_state(self, expected: int) -> float:
        """Seconds to read the ``kv`` table back into a dict (a state rebuild)."""
        loads = orjson.loads
        state: dict[str, Any] = {}
        async with aiosqlite.connect(self.path, iter_chunk_size=self.chunk) as db:
            start = time.perf_counter()
            async with db.execute("SELECT key, value FROM kv") as cursor:
                async for key, value in cursor:
                    state[key] = loads(value)
            elapsed = time.perf_counter() - start
        if len(state) != expected:
            raise RuntimeError(f"aiosqlite state has {len(state)} keys, expected {expected}")
        return elapsed
