"""kill -9: a writer killed at any moment leaves a store that opens and holds whole commits.

``crash_worker.py`` records to several streams (and a table of per-stream counts) on a
store (the filesystem, S3 on moto_server, Azure on Azurite: the same test for each) and
prints a line after every commit it got back. The campaign starts it again and again on
the same store and kills it each time, in one of two ways:

- **at a random instant**: the test SIGKILLs it after a random short time, mostly timed
  from its ready line (kills while recording and committing), some from spawn (kills while
  it opens the store and takes the writer role);
- **at a named crash point** (``apersist.testing.CRASH_POINTS``): the worker wraps its
  driver in ``FaultyDriver`` and SIGKILLs itself the nth time it reaches that step of the
  commit protocol or of maintenance. The kills cycle through every point; the epoch points
  are taken at open (nth=1), the segment and commit points at a seeded random nth, in a
  later commit, often one of many segments (``--segment-bytes`` down to 1 KiB). The
  maintenance points (a commit carrying merged segments, before and after its record; a
  checkpoint) are taken at a seeded nth by a worker set up
  for maintenance: segments of 64 KiB, so that runs of small ones fit in one merged
  segment, small batches, and ``run.compact()`` in about one round of four. Such a worker
  must die by SIGKILL on its own, right after saying which point it reached: ending
  normally, failing a check or timing out is a failure.

After every kill the test opens the store in-process and checks that every stream replays
0..n-1 exactly once, in order; that n covers every acknowledged event; that
``stream.offset`` is the last replayed offset; and that the table matches the events. It
varies ``snapshot_interval_ms``, ``max_segment_bytes``, ``max_pending_bytes``
(back-pressure cuts commits mid-batch) and batch sizes (large ones make long commits).

Every worker also runs the writer's background maintenance (merges of small segments, a
checkpoint every 128 commits) and calls ``run.compact()`` now and then, so random kills
and the other points strike during maintenance too; retention stays off, so every
acknowledged event must survive.

Size: ``APERSIST_CRASH_KILLS`` kills per backend (default 28: 5 at random instants, 2 or 3
at each crash point); after ``APERSIST_CRASH_KILLS_PER_STORE`` kills (default 100) the
campaign goes on with a fresh store, so that a long campaign does not replay an ever
longer history. Reproduce a run's choices with ``APERSIST_CRASH_SEED`` (printed at the
start; the timing of random kills still varies). A summary per backend is printed; if
``APERSIST_CRASH_REPORT`` names a file, the same figures are appended to it as one JSON
line per backend.
"""

from __future__ import annotations

import asyncio
import collections
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
from servers import SUPPORT, backend_spec, worker_env

import apersist
from apersist.testing import CRASH_POINTS

WORKER = SUPPORT / "crash_worker.py"
# The durable backends: the worker is another process, so memory stores cannot take part.
CRASH_KINDS = ["filesystem", "s3", "azure"]
STREAMS = 3
KILLS = int(os.environ.get("APERSIST_CRASH_KILLS", "28"))
KILLS_PER_STORE = int(os.environ.get("APERSIST_CRASH_KILLS_PER_STORE", "100"))
REPORT = os.environ.get("APERSIST_CRASH_REPORT")
# Long enough for a slow CI machine to import and open the store; a hang fails the test.
READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
# A worker with a crash point reaches it within a few dozen commits of opening.
CRASH_TIMEOUT_S = 90.0
# Each round of the worker (at most 3000 events) ends with a commit of two segments or
# more, so even the largest nth below is reached within 16 rounds, 48,000 events: a worker
# that gets to "done" has passed its crash point without crashing.
CRASH_MAX_EVENTS = 100_000
RANDOM = "random"  # the kind of a kill at a random instant; the others are crash points
EPOCH_POINTS = frozenset(p for p in CRASH_POINTS if "epoch" in p)
SEGMENT_POINTS = frozenset(p for p in CRASH_POINTS if "segment" in p or p == "mid_commit")
MAINTENANCE_POINTS = frozenset(("before_rewrite_commit_put", "after_rewrite_commit_put",
                                "after_checkpoint_put"))
# A maintenance worker compacts in about one round of four: a checkpoint
# within a few rounds, merges within a few dozen commits.
MAINTENANCE_COMPACT_RATE = 0.25


def kill_kinds(kills: int) -> list[str]:
    """What each kill of a campaign is: every fifth a random instant, the others the crash
    points in turn, so every point comes up several times even in a short campaign."""
    kinds: list[str] = []
    points = 0
    for number in range(kills):
        if number % 5 == 4:
            kinds.append(RANDOM)
        else:
            kinds.append(CRASH_POINTS[points % len(CRASH_POINTS)])
            points += 1
    return kinds


@dataclass
class Kill:
    """One worker process: how it was started, what it printed, how it ended."""

    number: int
    seed: int
    args: list[str]
    point: str | None = None  # the crash point it must reach, or None: killed by the test
    nth: int = 1
    lines: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""
    returncode: int | None = None
    delay_s: float = 0.0
    from_ready: bool = True
    signalled: bool = False  # the test sent SIGKILL (a crash-point worker must not need it)

    @property
    def kind(self) -> str:
        return self.point or RANDOM

    def last(self, ev: str) -> dict[str, Any] | None:
        return next((line for line in reversed(self.lines) if line["ev"] == ev), None)

    @property
    def ready(self) -> dict[str, Any] | None:
        return self.last("ready")

    @property
    def mid_commit(self) -> bool:
        """Killed after a commit started and before its ack line: likely inside the commit."""
        protocol = [line for line in self.lines if line["ev"] != "crash"]
        return bool(protocol) and protocol[-1]["ev"] == "commit"

    def describe(self) -> str:
        tail = "\n".join(orjson.dumps(line).decode() for line in self.lines[-3:])
        how = (f"crash_point={self.point} nth={self.nth}" if self.point else
               f"delay_ms={self.delay_s * 1000:.0f} from={'ready' if self.from_ready else 'spawn'}")
        return (f"kill #{self.number} worker_seed={self.seed} args={' '.join(self.args)} "
                f"{how} returncode={self.returncode} signalled_by_test={self.signalled} "
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
    """Start the worker and collect its output until it is dead.

    A worker with a crash point is left to kill itself (SIGKILL from the test only after
    ``CRASH_TIMEOUT_S``, and recorded as such); any other is SIGKILLed after
    ``kill.delay_s`` (from its ready line or from spawn). The process is always reaped
    and its pipes drained.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), *kill.args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=worker_env())
    assert proc.stdout is not None
    assert proc.stderr is not None
    ready = asyncio.Event()
    out_task = asyncio.create_task(_read_lines(proc.stdout, kill, ready))
    err_task = asyncio.create_task(proc.stderr.read())
    try:
        if kill.point is not None:
            with contextlib.suppress(TimeoutError):  # still running: signalled below
                async with asyncio.timeout(CRASH_TIMEOUT_S):
                    await proc.wait()
        else:
            if kill.from_ready:
                waiter = asyncio.create_task(ready.wait())
                try:
                    async with asyncio.timeout(READY_TIMEOUT_S):
                        # The output ending first means the worker died before it was ready.
                        await asyncio.wait({waiter, out_task},
                                           return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
            await asyncio.sleep(kill.delay_s)
    finally:
        if proc.returncode is None:
            # ProcessLookupError: it ended on its own; its exit status says how.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
                kill.signalled = True
        async with asyncio.timeout(EXIT_TIMEOUT_S):
            await out_task
            kill.stderr = (await err_task).decode(errors="replace")
            kill.returncode = await proc.wait()


def check_crash_point_reached(kill: Kill, ctx: str) -> None:
    """A crash-point worker killed itself at its point: it said so, then died by SIGKILL."""
    assert kill.point is not None
    if kill.signalled:
        pytest.fail(f"{ctx}: the worker did not reach crash point {kill.point} within "
                    f"{CRASH_TIMEOUT_S:.0f} s; the test killed it\n{kill.describe()}")
    if kill.returncode != -signal.SIGKILL:
        pytest.fail(f"{ctx}: the worker ended on its own without reaching crash point "
                    f"{kill.point} (max-events reached, or a failed check exits 3)\n"
                    f"{kill.describe()}")
    if not kill.lines or kill.lines[-1] != {"ev": "crash", "point": kill.point}:
        pytest.fail(f"{ctx}: the worker died by SIGKILL, but its last line is not the crash "
                    f"at point={kill.point}\n{kill.describe()}")
    # Epoch records are written while opening, before the ready line; segments and later
    # commit records only after it: the crash came at the step it was meant to.
    at_open = kill.point in EPOCH_POINTS
    if (kill.ready is None) != at_open:
        where = "while opening (before ready)" if at_open else "after the store was open"
        pytest.fail(f"{ctx}: crash point {kill.point} nth={kill.nth} must strike {where}\n"
                    f"{kill.describe()}")


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


def plan_kill(number: int, kind: str, rng: random.Random, root: str) -> Kill:
    """The worker's settings for one kill, all drawn from ``rng``."""
    worker_seed = rng.getrandbits(32)
    interval_ms = (0, 5)[number % 2]
    max_batch = rng.choice((64, 64, 3000))
    # A small bound makes record() wait for commits cut in the middle of a batch.
    pending_bytes = rng.choice((64 << 20, 64 << 20, 32 << 10))
    # Small segments: a commit of a large batch spans dozens of them (and every later check
    # reads each one: more would make the campaign slow, not better).
    segment_bytes = rng.choice((1 << 10, 4 << 10, 64 << 10))
    compact_rate = 0.05
    if kind in MAINTENANCE_POINTS:
        # Merging rewrites runs of small segments into one no bigger than a segment: room
        # for 16 of them, each small (small batches), and a compact() every few rounds.
        segment_bytes, max_batch, compact_rate = 64 << 10, 64, MAINTENANCE_COMPACT_RATE
    kill = Kill(number, worker_seed, [
        root, "--seed", str(worker_seed), "--streams", str(STREAMS),
        "--interval-ms", str(interval_ms), "--segment-bytes", str(segment_bytes),
        "--max-batch", str(max_batch), "--pending-bytes", str(pending_bytes),
        "--compact-rate", str(compact_rate)])
    if kind == RANDOM:
        kill.from_ready = rng.random() < 0.8
        kill.delay_s = rng.uniform(0.02, 0.3) if kill.from_ready else rng.uniform(0.15, 0.6)
        return kill
    kill.point = kind
    if kind in EPOCH_POINTS:
        kill.nth = 1  # the epoch record is written once, while opening
    elif kind in SEGMENT_POINTS:
        # Every commit of the loop uploads two segments or more (a stream's and the
        # table's): the crash comes within a few commits, so the history each later check
        # replays grows no faster than with random kills. Small commits carry their
        # segments inline (format 5.0) unless the worker is told otherwise.
        kill.nth = rng.randint(1, 16)
        kill.args.append("--segment-objects")
    elif kind in MAINTENANCE_POINTS:
        # Counted from the worker's start: its first, second or third merge commit or
        # checkpoint.
        kill.nth = rng.randint(1, 3)
    else:
        kill.nth = rng.randint(2, 6)  # commit record 1 is the fence written while opening
    kill.args += ["--crash-point", kind, "--crash-nth", str(kill.nth),
                  "--max-events", str(CRASH_MAX_EVENTS)]
    return kill


@pytest.mark.slow
@pytest.mark.parametrize("kind", CRASH_KINDS)
async def test_kill_minus_nine_keeps_every_acknowledged_commit(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    seed = int(os.environ.get("APERSIST_CRASH_SEED", random.SystemRandom().getrandbits(32)))
    print(f"crash test ({kind}): seed={seed} kills={KILLS} kills_per_store={KILLS_PER_STORE} "
          f"(APERSIST_CRASH_SEED={seed} to reproduce)")
    rng = random.Random(seed)
    backend = root = None
    stores = 0
    committed = [0] * STREAMS  # what the last check found: a floor for every later one
    by_kind: collections.Counter[str] = collections.Counter()
    verified_events = acknowledged_events = mid_commit = before_ready = beyond_ack = 0
    started = time.perf_counter()
    for number, kill_kind in enumerate(kill_kinds(KILLS), start=1):
        if backend is None or (number - 1) % KILLS_PER_STORE == 0:
            # A fresh store now and then: each check replays the whole history of its store.
            backend = make_backend(kind, tmp_path, request)
            root = backend_spec(backend)
            committed = [0] * STREAMS
            stores += 1
        assert root is not None
        kill = plan_kill(number, kill_kind, rng, root)
        ctx = f"{kind}: seed={seed} kill #{number}/{KILLS} store #{stores}"

        try:
            await run_and_kill(kill)
        except TimeoutError:
            pytest.fail(f"{ctx}: the worker hung: not ready within {READY_TIMEOUT_S:.0f} s or "
                        f"not gone {EXIT_TIMEOUT_S:.0f} s after SIGKILL\n{kill.describe()}")

        if kill.point is not None:
            check_crash_point_reached(kill, ctx)
        elif kill.returncode != -signal.SIGKILL:
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
        by_kind[kill.kind] += 1
        verified_events += sum(committed)
        acknowledged_events += sum(floor)
        beyond_ack += committed != floor  # a commit landed that the worker never heard of
        mid_commit += kill.mid_commit
        before_ready += ready is None
    elapsed = time.perf_counter() - started
    summary = {
        "campaign": "crash", "backend": kind, "seed": seed, "kills": KILLS,
        "kills_per_store": KILLS_PER_STORE,
        "stores": stores, "by_kind": {k: by_kind[k] for k in (RANDOM, *CRASH_POINTS)},
        "killed_mid_commit": mid_commit, "killed_before_ready": before_ready,
        "kills_keeping_unacknowledged_commits": beyond_ack,
        "events_verified": verified_events, "acknowledged_events_checked": acknowledged_events,
        # Every kill above checked that no acknowledged event was lost (a loss fails there).
        "events_lost": 0, "final_counts": committed, "elapsed_s": round(elapsed, 1),
    }
    print(f"crash test ({kind}): {describe_summary(summary)}")
    if REPORT:
        append_report(Path(REPORT), summary)
    assert verified_events > 0, f"seed={seed}: no kill left any committed event to check"


def describe_summary(summary: dict[str, Any]) -> str:
    """The summary as ``key=value`` facts, the kills by kind as ``kind:count``."""
    facts = [f"{key}={value}" for key, value in summary.items()
             if key not in ("backend", "by_kind")]
    kinds = ",".join(f"{k}:{n}" for k, n in summary["by_kind"].items())
    return " ".join([*facts, f"by_kind={kinds}"])


def append_report(path: Path, summary: dict[str, Any]) -> None:
    # One JSON line per backend and campaign; the docs quote these figures.
    with path.open("ab") as report:
        report.write(orjson.dumps(summary) + b"\n")
