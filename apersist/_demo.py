"""``apersist demo``: a word-count stream processor that survives ``kill -9``.

The parent process computes the expected result in memory, starts the pipeline as a child
process on a filesystem store, SIGKILLs it part-way, starts it again, and checks that the
restarted run finishes with exactly the uninterrupted result: the input events committed
before the kill are replayed, and the source resumes from the committed offset.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from ._config import Backend, Config
from ._run import run

__all__ = ["run_demo"]

_WORDS = ("stream", "state", "crash", "commit", "replay", "offset", "event", "table", "cache",
    "segment", "durable", "async", "await", "record", "restart", "fsync", "atomic", "epoch",
    "fence", "kill", "resume", "exact", "once", "batch", "group", "upload", "memory", "disk",
    "python", "asyncio", "apersist")
_PROGRESS_EVERY = 5_000


def make_event(i: int, seed: int) -> dict[str, Any]:
    """The i-th event of the demo's input: deterministic, so any run can regenerate it."""
    h = (i * 2654435761 + seed * 40503) & 0xFFFFFFFF
    n = 3 + h % 6
    words = []
    for _ in range(n):
        h = (h * 1103515245 + 12345) & 0x7FFFFFFF
        words.append(_WORDS[h % len(_WORDS)])
    return {"id": i, "user": f"u{h % 97}", "text": " ".join(words)}


def count_words(counts: Counter[str], event: dict[str, Any]) -> None:
    counts.update(event["text"].split())


def digest(counts: Counter[str]) -> str:
    return hashlib.sha256(orjson.dumps(dict(sorted(counts.items())))).hexdigest()[:16]


async def _read_input(offset: int | None, events: int, seed: int) -> AsyncIterator[tuple[Any, int]]:
    """The live source: resumes after ``offset``, yields (event, offset) pairs."""
    start = 0 if offset is None else offset + 1
    for i in range(start, events):
        if i % 250 == 0:
            await asyncio.sleep(0.001)  # an input that arrives over time, like a socket
        yield make_event(i, seed), i


def _say(**fields: Any) -> None:
    sys.stdout.write(orjson.dumps(fields).decode() + "\n")
    sys.stdout.flush()


async def _pipeline(store: str, events: int, seed: int) -> None:
    """The stream processor the demo kills and restarts (runs in the child process)."""
    config = Config(Backend.filesystem(store), snapshot_interval_ms=20)
    counts: Counter[str] = Counter()
    replayed = 0
    started = time.perf_counter()
    recovered = False

    def report_recovery() -> None:
        _say(replayed=replayed, recovery_ms=round((time.perf_counter() - started) * 1000, 1))

    async with run(config) as r:
        async for event in r.source("lines", lambda off: _read_input(off, events, seed)):
            if event.replayed:
                replayed += 1
            elif not recovered:
                recovered = True
                report_recovery()
            count_words(counts, event.value)
            if event.offset % _PROGRESS_EVERY == 0:
                _say(progress=event.offset)
        if not recovered:
            report_recovery()
    _say(result=digest(counts), words=sum(counts.values()), top=counts.most_common(5))


def _start_worker(store: str, events: int, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "apersist._demo", "--store", store, "--events", str(events),
         "--seed", str(seed)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)


def run_demo(*, events: int = 200_000, store: str | None = None, seed: int = 7) -> int:
    """Run the demo; return 0 when the restarted run matches an uninterrupted one."""
    if events < 2 * _PROGRESS_EVERY:
        raise ValueError(f"the demo needs at least {2 * _PROGRESS_EVERY} events: events={events}")
    root = Path(store) if store else Path(tempfile.mkdtemp(prefix="apersist-demo-"))
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"the demo needs an empty store directory: store={root}")
    print(f"apersist demo: word counts over {events:,} generated events, persisted in {root}")

    expected: Counter[str] = Counter()
    for i in range(events):
        count_words(expected, make_event(i, seed))
    print(f"1. reference (uninterrupted, in memory): {sum(expected.values()):,} words, "
          f"digest {digest(expected)}")

    kill_at = events * 2 // 5
    proc = _start_worker(str(root), events, seed)
    assert proc.stdout is not None
    seen = -1
    for raw in proc.stdout:
        msg = orjson.loads(raw)
        if "progress" in msg:
            seen = msg["progress"]
            if seen >= kill_at:
                os.kill(proc.pid, signal.SIGKILL)
                break
    proc.stdout.close()
    code = proc.wait()
    if code != -signal.SIGKILL:
        print(f"the first run ended before it could be killed (exit code {code}); "
              "try more --events", file=sys.stderr)
        return 1
    print(f"2. first run: killed with SIGKILL after processing about {seen + 1:,} events")

    proc = _start_worker(str(root), events, seed)
    assert proc.stdout is not None
    result: dict[str, Any] = {}
    recovery: dict[str, Any] = {}
    with proc.stdout:
        for raw in proc.stdout:
            msg = orjson.loads(raw)
            if "replayed" in msg:
                recovery = msg
            elif "result" in msg:
                result = msg
    if proc.wait() != 0 or not result:
        print(f"the restarted run failed (exit code {proc.returncode})", file=sys.stderr)
        return 1
    print(f"3. restarted run: replayed {recovery['replayed']:,} committed events in "
          f"{recovery['recovery_ms']} ms, then read the remaining "
          f"{events - recovery['replayed']:,} from the source's committed offset")
    print(f"   final: {result['words']:,} words, digest {result['result']}")
    print("   top words: " + ", ".join(f"{w}={n}" for w, n in result["top"]))
    if result["result"] == digest(expected) and result["words"] == sum(expected.values()):
        print("OK: the killed-and-restarted run gives exactly the uninterrupted result")
        cli = Path(sys.executable).with_name("apersist")
        print(f"   look inside the store with: {cli if cli.exists() else 'apersist'} inspect {root}")
        return 0
    print("MISMATCH: the restarted run differs from the uninterrupted result", file=sys.stderr)
    return 1


def _worker_main() -> None:
    parser = argparse.ArgumentParser(prog="python -m apersist._demo")
    parser.add_argument("--store", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(_pipeline(args.store, args.events, args.seed))


if __name__ == "__main__":
    _worker_main()
