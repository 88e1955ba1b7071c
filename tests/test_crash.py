"""kill -9: a writer killed at any moment leaves a store that opens and holds whole commits.

``crash_worker.py`` records to several streams (and a table of per-stream counts) on a
store (the filesystem, S3 on moto_server, Azure on Azurite: the same test for each) and
prints a line after every commit it got back. The test starts it,
SIGKILLs it after a random short time, then opens the same store in-process and checks
that every stream replays 0..n-1 exactly once, in order; that n covers every acknowledged
event; that ``stream.offset`` is the last replayed offset; and that the table matches the
events. It repeats kill and check on the same store, varying ``snapshot_interval_ms``,
``max_segment_bytes`` (down to 1 KiB: a commit spans many segments), ``max_pending_bytes``
(back-pressure cuts commits mid-batch) and batch sizes (large ones make long commits to
be killed in); some kills are timed from spawn, to land while the store is being opened.

Size: ``APERSIST_CRASH_KILLS`` (default 20 per backend). Reproduce a run's choices with
``APERSIST_CRASH_SEED`` (printed at the start; kill timing still varies).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_backend
from servers import backend_spec

import apersist

WORKER = Path(__file__).with_name("crash_worker.py")
# The durable backends: the worker is another process, so memory stores cannot take part.
CRASH_KINDS = ["filesystem", "s3", "azure"]
STREAMS = 3
KILLS = int(os.environ.get("APERSIST_CRASH_KILLS", "20"))
# Long enough for a slow CI machine to import and open the store; a hang fails the test.
READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0


@dataclass
class Kill:
    """One worker process: how it was started, what it printed, how it ended."""

    number: int
    seed: int
    args: list[str]
    lines: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""
    returncode: int | None = None
    delay_s: float = 0.0
    from_ready: bool = True

    def last(self, ev: str) -> dict[str, Any] | None:
        return next((line for line in reversed(self.lines) if line["ev"] == ev), None)

    @property
    def ready(self) -> dict[str, Any] | None:
        return self.last("ready")

    @property
    def mid_commit(self) -> bool:
        """Killed after a commit started and before its ack line: likely inside the commit."""
        return bool(self.lines) and self.lines[-1]["ev"] == "commit"

    def describe(self) -> str:
        tail = "\n".join(orjson.dumps(line).decode() for line in self.lines[-3:])
        return (f"kill #{self.number} worker_seed={self.seed} args={' '.join(self.args)} "
                f"delay_ms={self.delay_s * 1000:.0f} "
                f"from={'ready' if self.from_ready else 'spawn'} returncode={self.returncode} "
                f"lines={len(self.lines)}\nlast lines:\n{tail}\nstderr:\n{self.stderr[-3000:]}")


async def _read_lines(stream: asyncio.StreamReader, kill: Kill, ready: asyncio.Event) -> None:
    while True:
        raw = await stream.readline()
        if not raw.endswith(b"\n"):
            return  # EOF; a line cut by the kill is ignored (it only lowers the bound)
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            line = None
        if not isinstance(line, dict) or "ev" not in line:
            line = {"ev": "unexpected output", "raw": raw.decode(errors="replace")}
        kill.lines.append(line)
        if line["ev"] == "ready":
            ready.set()


async def run_and_kill(kill: Kill) -> None:
    """Start the worker, SIGKILL it after ``kill.delay_s`` (from its ready line or from
    spawn), and collect its output. The process is always reaped and its pipes drained."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), *kill.args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    ready = asyncio.Event()
    out_task = asyncio.create_task(_read_lines(proc.stdout, kill, ready))
    err_task = asyncio.create_task(proc.stderr.read())
    try:
        if kill.from_ready:
            waiter = asyncio.create_task(ready.wait())
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    # The output ending first means the worker died before it was ready.
                    await asyncio.wait({waiter, out_task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        await asyncio.sleep(kill.delay_s)
    finally:
        if proc.returncode is None:
            # ProcessLookupError: it ended on its own; its exit status says how.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(EXIT_TIMEOUT_S):
            await out_task
            kill.stderr = (await err_task).decode(errors="replace")
            kill.returncode = await proc.wait()


async def verify(backend: apersist.Backend, kill: Kill, floor: list[int], ctx: str) -> list[int]:
    """Open the store in-process and check every invariant; return each stream's count.

    ``floor[k]`` is the least count stream k must have: acknowledged or seen committed.
    """
    config = apersist.Config(backend)
    try:
        async with apersist.run(config) as run:
            counts = await run.table("counts")
            found: list[int] = []
            for k in range(STREAMS):
                stream = run.stream(f"s{k}")
                n = 0
                async for event in stream.replay():
                    if event.value != {"s": k, "i": n} or event.offset != n:
                        got = event.value.get("i") if isinstance(event.value, dict) else None
                        what = ("a gap: events are missing" if isinstance(got, int) and got > n
                                else "a duplicate or reordered event")
                        pytest.fail(f"{ctx}: stream {stream.name}: {what} at position {n}: "
                                    f"expected value={{'s': {k}, 'i': {n}}} offset={n}, "
                                    f"got value={event.value!r} offset={event.offset!r}\n"
                                    f"{kill.describe()}")
                    n += 1
                if n < floor[k]:
                    pytest.fail(f"{ctx}: stream {stream.name}: committed events were lost: "
                                f"expected at least {floor[k]} (acknowledged or seen before), "
                                f"got {n}\n{kill.describe()}")
                want_offset = n - 1 if n else None
                if stream.offset != want_offset:
                    pytest.fail(f"{ctx}: stream {stream.name}: expected offset={want_offset!r} "
                                f"(the last replayed), got offset={stream.offset!r}\n"
                                f"{kill.describe()}")
                if counts.get(stream.name, 0) != n:
                    pytest.fail(f"{ctx}: stream {stream.name}: table 'counts' is not atomic "
                                f"with the events: expected count={n}, "
                                f"got {counts.get(stream.name)!r}\n{kill.describe()}")
                found.append(n)
            extra = sorted(set(counts) - {f"s{k}" for k in range(STREAMS)})
            if extra:
                pytest.fail(f"{ctx}: table 'counts' has unexpected keys {extra}\n"
                            f"{kill.describe()}")
            return found
    except apersist.PersistenceError as exc:
        pytest.fail(f"{ctx}: the store did not open after the kill: {exc!r}\n{kill.describe()}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", CRASH_KINDS)
async def test_kill_minus_nine_keeps_every_acknowledged_commit(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    seed = int(os.environ.get("APERSIST_CRASH_SEED", random.SystemRandom().getrandbits(32)))
    print(f"crash test ({kind}): seed={seed} kills={KILLS} "
          f"(APERSIST_CRASH_SEED={seed} to reproduce)")
    rng = random.Random(seed)
    backend = make_backend(kind, tmp_path, request)
    root = backend_spec(backend)
    committed = [0] * STREAMS  # what the last check found: a floor for every later one
    verified_events = mid_commit = before_ready = 0
    started = time.perf_counter()
    for number in range(1, KILLS + 1):
        worker_seed = rng.getrandbits(32)
        interval_ms = (0, 5)[number % 2]
        segment_bytes = rng.choice((1 << 10, 4 << 10, 64 << 10))
        max_batch = rng.choice((64, 64, 3000))
        # A small bound makes record() wait for commits cut in the middle of a batch.
        pending_bytes = rng.choice((64 << 20, 64 << 20, 32 << 10))
        kill = Kill(number, worker_seed, [
            root, "--seed", str(worker_seed), "--streams", str(STREAMS),
            "--interval-ms", str(interval_ms), "--segment-bytes", str(segment_bytes),
            "--max-batch", str(max_batch), "--pending-bytes", str(pending_bytes)])
        # Mostly timed from the ready line (kills while recording and committing); some from
        # spawn, to land while the worker opens the store and takes the writer role.
        kill.from_ready = rng.random() < 0.8
        kill.delay_s = rng.uniform(0.02, 0.3) if kill.from_ready else rng.uniform(0.15, 0.6)
        ctx = f"{kind}: seed={seed} kill #{number}/{KILLS}"

        try:
            await run_and_kill(kill)
        except TimeoutError:
            pytest.fail(f"{ctx}: the worker hung: not ready within {READY_TIMEOUT_S:.0f} s or "
                        f"not gone {EXIT_TIMEOUT_S:.0f} s after SIGKILL\n{kill.describe()}")

        if kill.returncode != -signal.SIGKILL:
            pytest.fail(f"{ctx}: the worker ended on its own instead of being killed "
                        f"(a failed check exits 3):\n{kill.describe()}")
        ready = kill.ready
        if ready is not None and ready["n"] != committed:
            pytest.fail(f"{ctx}: the worker opened the store and found counts={ready['n']}, "
                        f"but the check before it found {committed}\n{kill.describe()}")
        ack = kill.last("ack")
        floor = [max(a, b) for a, b in zip(committed, ack["n"] if ack else committed,
                                           strict=True)]
        committed = await verify(backend, kill, floor, ctx)
        verified_events += sum(committed)
        mid_commit += kill.mid_commit
        before_ready += ready is None
    elapsed = time.perf_counter() - started
    print(f"crash test ({kind}): seed={seed} kills={KILLS} killed_mid_commit={mid_commit} "
          f"killed_before_ready={before_ready} events_verified={verified_events} "
          f"final_counts={committed} elapsed_s={elapsed:.1f}")
    assert sum(committed) > 0, f"seed={seed}: no kill left any committed event to check"
