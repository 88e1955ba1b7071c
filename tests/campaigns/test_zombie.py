"""Zombie writers: a newer process takes over a store; the older one can land nothing more.

A chain of writer processes (``zombie_worker.py``) on one store (the filesystem, S3 on
moto_server, Azure on Azurite: the same test for each): in every round a new writer opens
the store while the previous one (the "old" writer) is in one of these states:

- ``concurrent``: still committing in its loop; it meets the takeover at its next commit;
- ``sigstop``: frozen with SIGSTOP at a random moment of its loop (sometimes mid-commit)
  before the new writer starts, woken with SIGCONT after the new writer has committed;
- ``pause:<point>``: stopped by its own SIGSTOP at one step of a commit (before a segment
  upload, before the commit record's put, after it) and woken the same way.

The old writer must then get ``FencedError`` (plain, never in a group), every later commit
and leaving its block too, and land nothing after the takeover. After each round the store
is read in-process by a read-only run while the new writer goes on committing, and the
stream's history must be exactly each fenced writer's durable commits, in takeover order,
followed by a prefix of the live writer's events that holds all it acknowledged; the new
writer's own replay on opening must be exactly the fenced writers' part. The new writer is
the old one of the next round. In every round, before the old writer wakes (or, while
it goes on committing, once the new one is ready), the new writer writes a checkpoint and
``apersist gc`` runs with no grace period: it deletes every commit record the checkpoint
folds but the fence commits, and the old writer must still be fenced; after the round no
commit of an older epoch may sit above the new writer's fence commit. Some writers commit
in the background as well (``snapshot_interval_ms=0``); the others commit only when asked,
so that each ack line marks exactly what is durable.

Size: ``APERSIST_ZOMBIE_ROUNDS`` (default: each kind of round once, 5 per backend);
``APERSIST_ZOMBIE_VARIANTS`` (comma-separated) limits the kinds of round. The order of
round kinds and the timings come from ``APERSIST_ZOMBIE_SEED`` (printed at the start).
If ``APERSIST_ZOMBIE_REPORT`` names a file, one JSON line of figures is appended to it per
backend. The writers log apersist's messages at ``APERSIST_ZOMBIE_LOG`` (default ``info``:
takeovers, fences, retries) to their stderr, shown when a round fails; a writer that hangs
is asked for its stacks first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import orjson
import pytest
from conftest import make_backend
from servers import SUPPORT, backend_spec, worker_env

import apersist
from apersist import _format as fmt
from apersist._drivers import open_driver
from apersist._gc import collect_garbage

WORKER = SUPPORT / "zombie_worker.py"
# The durable backends: the writers are other processes, so memory stores cannot take part.
ZOMBIE_KINDS = ["filesystem", "s3", "azure"]
ALL_VARIANTS = ("concurrent", "sigstop", "pause:before_segment_put", "pause:before_commit_put",
                "pause:after_commit_put")
# A comma-separated subset, to focus a run on some kinds of round.
VARIANTS = tuple(os.environ.get("APERSIST_ZOMBIE_VARIANTS", ",".join(ALL_VARIANTS)).split(","))
if not VARIANTS or not set(VARIANTS) <= set(ALL_VARIANTS):
    raise ValueError(f"APERSIST_ZOMBIE_VARIANTS names unknown variants: "
                     f"variants={','.join(VARIANTS)} known={','.join(ALL_VARIANTS)}")
ROUNDS = int(os.environ.get("APERSIST_ZOMBIE_ROUNDS", str(len(VARIANTS))))
STREAM = "z"
TABLE = "counts"
# Long enough for a loaded machine to start Python, open the store and replay it; a hang
# fails the test instead of blocking it. Opening reads every commit record, so it takes
# longer as the history grows: 25 rounds on Azurite make ~2,500 commits, which a new writer
# on a loaded machine read for over a minute while the older one kept committing.
READY_TIMEOUT_S = 180.0
LINE_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
STDERR_KEEP = 20_000
# The longest pause between a writer's commits: short enough that a stop often lands inside
# a commit, long enough that the history every round replays stays small (object stores on
# local emulators serve a few hundred requests a second).
PACE_MS = {"filesystem": 20, "s3": 60, "azure": 60}
# The new writer commits this often before the old one wakes: the takeover is then
# followed by data, not just by the fence commit.
ACKS_BEFORE_WAKE = 2

T = TypeVar("T")


class WorkerEnded(Exception):
    """The worker's output ended before the line a test waited for."""


class CampaignFailed(Exception):
    """A check failed; reported once every writer is reaped (so its stderr is complete)."""

    def __init__(self, message: str, writers: tuple[Writer, ...]) -> None:
        super().__init__(message)
        self.writers = writers


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (procfs reads do not block on a disk)."""
    # The state is the field after the command name, which ends with ')'.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def append_report(path: str, figures: dict[str, Any]) -> None:
    with Path(path).open("ab") as out:
        out.write(orjson.dumps(figures) + b"\n")


@dataclass
class Writer:
    """One writer process: how it was started, what it printed, how it ended."""

    name: str
    seed: int
    args: list[str]
    interval_ms: int
    proc: asyncio.subprocess.Process | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""
    returncode: int | None = None
    woken_at: int | None = None  # len(lines) when SIGCONT was sent
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _out_done: bool = False
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(WORKER), *self.args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=worker_env(APERSIST_ZOMBIE_LOG=os.environ.get("APERSIST_ZOMBIE_LOG", "info")))
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._tasks = [asyncio.create_task(self._read_lines(self.proc.stdout)),
                       asyncio.create_task(self._read_stderr(self.proc.stderr))]

    async def _read_lines(self, stream: asyncio.StreamReader) -> None:
        try:
            while raw := await stream.readline():
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    line = None
                if not isinstance(line, dict) or "ev" not in line:
                    line = {"ev": "unexpected output", "raw": raw.decode(errors="replace")}
                self.lines.append(line)
                self._changed.set()
        finally:
            self._out_done = True
            self._changed.set()

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        # Read as it comes (a chatty worker must not block on a full pipe); keep the tail.
        while chunk := await stream.read(1 << 16):
            self.stderr = (self.stderr + chunk.decode(errors="replace"))[-STDERR_KEEP:]

    def events(self, ev: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["ev"] == ev]

    def first(self, ev: str) -> dict[str, Any] | None:
        return next((line for line in self.lines if line["ev"] == ev), None)

    def last(self, ev: str) -> dict[str, Any] | None:
        return next((line for line in reversed(self.lines) if line["ev"] == ev), None)

    @property
    def acked(self) -> int:
        """This writer's events acknowledged durable so far (by its ack lines)."""
        ack = self.last("ack")
        return 0 if ack is None else int(ack["n"])

    async def wait_for(self, found: Callable[[], T | None], what: str,
                       timeout_s: float = LINE_TIMEOUT_S) -> T:
        """Wait until ``found()`` (over the lines so far) is not None; return it.

        Raises ``WorkerEnded`` if the output ends first and ``TimeoutError`` after
        ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while True:
                self._changed.clear()
                result = found()
                if result is not None:
                    return result
                if self._out_done:
                    raise WorkerEnded(f"writer {self.name} ended before {what}")
                await self._changed.wait()

    async def wait_line(self, ev: str, timeout_s: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        return await self.wait_for(lambda: self.first(ev), f"a {ev!r} line", timeout_s)

    async def wait_acks(self, count: int, *, after: int = 0) -> dict[str, Any]:
        def enough() -> dict[str, Any] | None:
            acks = [ln for ln in self.lines[after:] if ln["ev"] == "ack"]
            return acks[-1] if len(acks) >= count else None
        return await self.wait_for(enough, f"{count} ack lines")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_stopped(self, timeout_s: float = LINE_TIMEOUT_S) -> None:
        """Wait until the kernel reports the process stopped (state T)."""
        assert self.proc is not None
        async with asyncio.timeout(timeout_s):
            while True:
                if process_state(self.proc.pid) == "T":
                    return
                if self._out_done:
                    raise WorkerEnded(f"writer {self.name} ended instead of stopping")
                await asyncio.sleep(0.005)  # polling: a stop has no event to wait on

    async def reap(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """Wait for the process to end on its own; collect its output and status."""
        assert self.proc is not None
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*self._tasks)
            self.returncode = await self.proc.wait()
        return self.returncode

    async def kill(self) -> None:
        """End the process however it is (running, stopped, gone) and reap it."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            # ProcessLookupError: it ended meanwhile; wait() below reaps it.
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
                self.proc.send_signal(signal.SIGCONT)  # a stopped process dies only when run
        with contextlib.suppress(TimeoutError):
            await self.reap()
        for task in self._tasks:
            task.cancel()

    async def dump_stacks(self) -> None:
        """Ask a hanging writer where it is (tasks and threads, on its stderr)."""
        with contextlib.suppress(ProcessLookupError):
            self.signal(signal.SIGHUP)
            self.signal(signal.SIGQUIT)
        await asyncio.sleep(1.0)  # the dump reaches the stderr reader

    def describe(self) -> str:
        tail = "\n".join(orjson.dumps(line).decode()[:300] for line in self.lines[-4:])
        return (f"writer {self.name}: seed={self.seed} args={' '.join(self.args[1:])} "
                f"returncode={self.returncode} lines={len(self.lines)} "
                f"woken_at={self.woken_at}\nlast lines:\n{tail}\n"
                f"stderr:\n{self.stderr[-STDERR_KEEP:]}")


@dataclass
class Campaign:
    """The state of the chain of writers on one store, and the figures of the run."""

    kind: str
    seed: int
    backend: apersist.Backend
    spec: str
    rng: random.Random
    writers: list[Writer] = field(default_factory=list)
    # Every fenced writer's durable events, in takeover order: (writer, count).
    landed: list[tuple[str, int]] = field(default_factory=list)
    # The live writer's events seen committed by a check: it must never land fewer.
    floor: int = 0
    figures: Counter[str] = field(default_factory=Counter)

    def fail(self, ctx: str, message: str, *writers: Writer) -> NoReturn:
        raise CampaignFailed(f"{self.kind}: seed={self.seed} {ctx}: {message}", writers)

    def new_writer(self, number: int, pause_at: str | None) -> Writer:
        seed = self.rng.getrandbits(32)
        # Every third writer also commits in the background (group commit), so that a
        # fence can meet a commit nobody asked for.
        interval_ms = 0 if number % 3 == 2 else 600_000
        args = [self.spec, "--writer", f"w{number}", "--seed", str(seed),
                "--interval-ms", str(interval_ms), "--pace-ms", str(PACE_MS[self.kind]),
                "--segment-bytes", str(self.rng.choice((1 << 10, 4 << 10, 64 << 10)))]
        if pause_at is not None:
            args += ["--pause-at", pause_at]
        writer = Writer(f"w{number}", seed, args, interval_ms)
        self.writers.append(writer)
        return writer

    def expected_runs(self) -> list[list[Any]]:
        """The fenced writers' part of the history, as the worker encodes replays."""
        return [[name, 0, count] for name, count in self.landed if count]

    def expected_counts(self) -> dict[str, int]:
        return {name: count for name, count in self.landed if count}


async def start_writer(writer: Writer) -> None:
    """Start ``writer`` and wait until it has opened the store (taken the writer role)."""
    await writer.start()
    await writer.wait_line("ready", READY_TIMEOUT_S)


def check_new_writer_view(campaign: Campaign, new: Writer, ctx: str) -> None:
    """The new writer's replay on opening is exactly the fenced writers' durable part."""
    ready = new.first("ready")
    assert ready is not None
    runs = campaign.expected_runs()
    if ready["runs"] != runs:
        campaign.fail(ctx, f"the new writer replayed a history other than the fenced writers' "
                           f"durable commits: expected runs={runs} got runs={ready['runs']}",
                      new, *campaign.writers[-2:-1])
    last = next(([name, count - 1] for name, count in reversed(campaign.landed) if count), None)
    if ready["offset"] != last:
        campaign.fail(ctx, f"the new writer opened with the wrong offset: expected={last} "
                           f"got={ready['offset']}", new)
    if ready["counts"] != campaign.expected_counts():
        campaign.fail(ctx, f"the new writer opened with a table that does not match the "
                           f"events: expected={campaign.expected_counts()} "
                           f"got={ready['counts']}", new)


async def read_store(campaign: Campaign, ctx: str, *, writer_role: bool = False
                     ) -> tuple[list[list[Any]], Any, dict[str, Any]]:
    """The history of the stream (run-length encoded), its offset and the table, read
    in-process; read-only unless ``writer_role`` (then the run takes over the store)."""
    access = apersist.SnapshotAccess.FULL if writer_role else apersist.SnapshotAccess.REPLAY
    config = apersist.Config(campaign.backend, snapshot_access=access)
    runs: list[list[Any]] = []
    try:
        async with apersist.run(config) as run:
            stream = run.stream(STREAM)
            async for event in stream.replay():
                value = event.value
                if not (isinstance(value, dict) and set(value) == {"w", "i"}
                        and event.offset == [value["w"], value["i"]]):
                    campaign.fail(ctx, f"a replayed event is not one a writer recorded: "
                                       f"value={value!r} offset={event.offset!r}")
                last = runs[-1] if runs else None
                if last is not None and last[0] == value["w"] and last[1] + last[2] == value["i"]:
                    last[2] += 1
                else:
                    runs.append([value["w"], value["i"], 1])
            counts = dict(await run.table(TABLE))
            offset = stream.offset
    except apersist.PersistenceError as exc:
        campaign.fail(ctx, f"the store did not open: error={exc!r}", *campaign.writers[-2:])
    campaign.figures["events_verified"] += sum(run[2] for run in runs)
    return runs, offset, counts


async def check_live_history(campaign: Campaign, live: Writer, ctx: str) -> None:
    """While ``live`` commits: the fenced writers' durable part, then a prefix of live's
    events that holds every event it acknowledged before the read."""
    acked = live.acked
    runs, offset, counts = await read_store(campaign, ctx)
    fenced_part = campaign.expected_runs()
    head, tail = runs[:len(fenced_part)], runs[len(fenced_part):]
    seen = tail[0][2] if tail else 0
    if head != fenced_part or len(tail) > 1 or (tail and tail[0][:2] != [live.name, 0]):
        campaign.fail(ctx, f"the history is not the fenced writers' durable commits followed "
                           f"by the live writer's: expected runs={fenced_part} + "
                           f"[[{live.name!r}, 0, n]] got runs={runs}",
                      live, *campaign.writers[-2:-1])
    if seen < max(acked, campaign.floor):
        campaign.fail(ctx, f"acknowledged events of the live writer are missing: "
                           f"acked={acked} seen_before={campaign.floor} got={seen}", live)
    campaign.floor = seen
    want_offset = ([live.name, seen - 1] if seen else
                   next(([n, c - 1] for n, c in reversed(campaign.landed) if c), None))
    want_counts = campaign.expected_counts() | ({live.name: seen} if seen else {})
    if offset != want_offset or counts != want_counts:
        campaign.fail(ctx, f"the offset or the table is not atomic with the events: "
                           f"expected offset={want_offset} counts={want_counts} "
                           f"got offset={offset} counts={counts}", live)


async def checkpoint_and_collect(campaign: Campaign, new: Writer, ctx: str) -> None:
    """The new writer checkpoints; gc (grace 0) then deletes what the checkpoint folds."""
    new.signal(signal.SIGURG)
    ckpt = await new.wait_line("checkpoint")
    driver = open_driver(campaign.backend)
    try:
        plan = await collect_garbage(driver, grace_ms=0, now_ms=time.time_ns() // 1_000_000)
        fence = fmt.commit_key(fmt.WRITER, int((new.first("ready") or {})["fence"]))
        await driver.get(fence)  # ObjectNotFoundError (a PersistenceError) if collected
        if fence in plan.due:
            campaign.fail(ctx, f"gc deleted the new writer's fence commit: key={fence}", new)
    except apersist.PersistenceError as exc:
        campaign.fail(ctx, f"gc failed: error={exc!r}", new)
    finally:
        await driver.aclose()
    if plan.checkpoint_seq < int(ckpt["seq"]):
        campaign.fail(ctx, f"gc did not load the new checkpoint: checkpoint={ckpt['seq']} "
                           f"loaded={plan.checkpoint_seq}", new)
    for key in plan.due:
        campaign.figures[f"gc_deleted_{fmt.key_kind(key)}s"] += 1


async def check_no_zombie_commit(campaign: Campaign, new: Writer, ctx: str) -> None:
    """No commit record of an older epoch than the new writer's lies above its fence."""
    ready = new.first("ready")
    assert ready is not None
    epoch, fence = int(ready["epoch"]), int(ready["fence"])
    prefix = fmt.commits_prefix(fmt.WRITER)
    driver = open_driver(campaign.backend)
    try:
        async for info in driver.list(prefix):
            seq = fmt.number_in_key(info.key, prefix)
            if seq is None or seq <= fence:
                continue
            record = fmt.CommitRecord.decode(info.key, await driver.get(info.key))
            if record.epoch < epoch:
                campaign.fail(ctx, f"a fenced writer landed a commit after the takeover: "
                                   f"key={info.key} epoch={record.epoch} fence={fence} "
                                   f"new_epoch={epoch}", *campaign.writers[-2:])
    finally:
        await driver.aclose()


async def fence_round(campaign: Campaign, number: int, variant: str, old: Writer,
                      new: Writer) -> None:
    """One takeover of ``old`` by ``new`` in the way ``variant`` names; check both."""
    ctx = f"round #{number}/{ROUNDS} variant={variant} old={old.name} new={new.name}"
    marks = [("start", time.perf_counter())]
    # A burst of commits from the old writer: between rounds it commits slowly, so that the
    # history (which every takeover reads) grows with the rounds, not with the machine's load.
    old.signal(signal.SIGWINCH)
    await old.wait_acks(1)
    marks.append(("old_acked", time.perf_counter()))
    if variant == "sigstop":
        # Anywhere in its loop: between commits, recording, or inside a commit.
        await asyncio.sleep(campaign.rng.uniform(0, 0.03))
        old.signal(signal.SIGSTOP)
        await old.wait_stopped()
    elif variant.startswith("pause:"):
        old.signal(signal.SIGUSR1)
        paused = await old.wait_line("paused")
        if paused["point"] != variant.partition(":")[2]:
            campaign.fail(ctx, f"the old writer paused elsewhere: point={paused['point']}", old)
        await old.wait_stopped()
    acks_before = len(old.events("ack"))
    marks.append(("old_stalled", time.perf_counter()))
    try:
        await start_writer(new)
    except TimeoutError:
        await new.dump_stacks()
        campaign.fail(ctx, f"the new writer did not take over within {READY_TIMEOUT_S:.0f} s: "
                           f"acks_by_old_meanwhile={len(old.events('ack')) - acks_before} "
                           f"old_last_seq={(old.last('ack') or {}).get('seq')}", new, old)
    marks.append(("new_ready", time.perf_counter()))
    if variant != "concurrent":
        await new.wait_acks(ACKS_BEFORE_WAKE)
    # The fence commit is all that stops the old writer: gc must keep it, however much
    # else the new writer's checkpoint lets it delete.
    await checkpoint_and_collect(campaign, new, ctx)
    marks.append(("collected", time.perf_counter()))
    if variant != "concurrent":
        # The new writer has taken over and committed data; now the stalled one wakes.
        old.woken_at = len(old.lines)
        old.signal(signal.SIGCONT)
    marks.append(("old_woken", time.perf_counter()))
    try:
        fenced = await old.wait_line("fenced")
    except TimeoutError:
        campaign.fail(ctx, f"the old writer was never fenced: it went on committing after the "
                           f"takeover: old_acks_since_new_started="
                           f"{len(old.events('ack')) - acks_before} "
                           f"new_acks={len(new.events('ack'))}", old, new)
    await old.wait_line("left")
    if await old.reap() != 0:
        campaign.fail(ctx, "the fenced writer failed a check (status 3) or crashed", old)
    marks.append(("old_gone", time.perf_counter()))
    if old.last("left") != {"ev": "left", "error": "FencedError"}:
        campaign.fail(ctx, f"leaving the fenced run did not raise FencedError: "
                           f"left={old.last('left')}", old)

    durable = int(fenced["durable"])
    acks_after_wake = (0 if old.woken_at is None else
                       sum(1 for ln in old.lines[old.woken_at:] if ln["ev"] == "ack"))
    if durable < old.acked or durable < campaign.floor:
        campaign.fail(ctx, f"the fenced writer lost durable events: durable={durable} "
                           f"acked={old.acked} seen_committed={campaign.floor}", old)
    if old.interval_ms and not (durable == old.acked == fenced["acked"]):
        # Only explicit commits: what is durable is exactly what was acknowledged.
        campaign.fail(ctx, f"the fenced writer's durable events are not its acknowledged "
                           f"ones: durable={durable} acked={old.acked} "
                           f"fenced_acked={fenced['acked']}", old)
    # Once the takeover has landed, no commit of the old writer can: at most the one it
    # was inside when it stopped, if its record had reached the store. With explicit
    # commits only, each ack is the commit it asked for, so the pause point decides.
    # (A background commit may land the paused one while the asked-for one is fenced.)
    allowed = {"pause:before_segment_put": (0,), "pause:before_commit_put": (0,),
               "pause:after_commit_put": (1,) if old.interval_ms else (0, 1)
               }.get(variant, (0, 1))
    if acks_after_wake not in allowed:
        campaign.fail(ctx, f"the woken writer's acks after the takeover are not the ones its "
                           f"stop allows: acks_after_wake={acks_after_wake} "
                           f"allowed={allowed}", old)
    await check_no_zombie_commit(campaign, new, ctx)
    campaign.landed.append((old.name, durable))
    campaign.floor = 0
    check_new_writer_view(campaign, new, ctx)
    await check_live_history(campaign, new, ctx)
    marks.append(("verified", time.perf_counter()))
    print(f"  round #{number} {variant}: " + " ".join(
        f"{name}={(at - marks[0][1]):.1f}s" for name, at in marks[1:]))

    campaign.figures["fenced"] += 1
    campaign.figures[f"fenced_at_{fenced['where']}"] += 1
    campaign.figures[f"variant_{variant}"] += 1
    campaign.figures["acks_after_wake"] += acks_after_wake
    campaign.figures["events_lost_by_fence"] += int(fenced["n"]) - durable
    campaign.figures["commits_acked"] += len(old.events("ack"))


async def finish(campaign: Campaign, last: Writer) -> None:
    """Stop the live writer normally; take the store over in-process; check it whole."""
    ctx = f"the end: last={last.name}"
    acked_before = last.acked
    last.signal(signal.SIGUSR2)
    left = await last.wait_line("left")
    if await last.reap() != 0 or left["error"] is not None:
        campaign.fail(ctx, f"the last writer did not end normally: left={left}", last)
    if last.acked < max(acked_before, campaign.floor):
        campaign.fail(ctx, f"the last writer's acks went back: acked={last.acked} "
                           f"before={acked_before} seen_committed={campaign.floor}", last)
    campaign.landed.append((last.name, last.acked))
    campaign.figures["commits_acked"] += len(last.events("ack"))
    runs, offset, counts = await read_store(campaign, ctx, writer_role=True)
    want_offset = next(([n, c - 1] for n, c in reversed(campaign.landed) if c), None)
    if (runs != campaign.expected_runs() or offset != want_offset
            or counts != campaign.expected_counts()):
        campaign.fail(ctx, f"the final history is not each writer's durable commits in "
                           f"takeover order: expected runs={campaign.expected_runs()} "
                           f"offset={want_offset} counts={campaign.expected_counts()} "
                           f"got runs={runs} offset={offset} counts={counts}", last)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ZOMBIE_KINDS)
async def test_a_fenced_writer_lands_nothing_after_the_takeover(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    seed = int(os.environ.get("APERSIST_ZOMBIE_SEED", random.SystemRandom().getrandbits(32)))
    print(f"zombie campaign ({kind}): seed={seed} rounds={ROUNDS} "
          f"(APERSIST_ZOMBIE_SEED={seed} to reproduce)")
    rng = random.Random(seed)
    backend = make_backend(kind, tmp_path, request)
    campaign = Campaign(kind, seed, backend, backend_spec(backend), rng)
    # Each kind of round once in every len(VARIANTS) rounds, from a seeded start.
    first = rng.randrange(len(VARIANTS))
    variants = [VARIANTS[(first + r) % len(VARIANTS)] for r in range(ROUNDS)]
    # Writer k is the old one of round k + 1: its pause point is fixed when it starts.
    pause_points = [v.partition(":")[2] if v.startswith("pause:") else None for v in variants]
    started = time.perf_counter()
    failure: CampaignFailed | None = None
    try:
        old = campaign.new_writer(0, pause_points[0] if ROUNDS else None)
        try:
            await start_writer(old)
            for number in range(1, ROUNDS + 1):
                pause_at = pause_points[number] if number < ROUNDS else None
                new = campaign.new_writer(number, pause_at)
                await fence_round(campaign, number, variants[number - 1], old, new)
                old = new
            await finish(campaign, old)
        except WorkerEnded as exc:
            campaign.fail("campaign", f"{exc}: it crashed or failed a check",
                          *campaign.writers[-2:])
        except TimeoutError:
            campaign.fail("campaign", "a writer hung: no expected line in time, not stopped "
                          "or not gone", *campaign.writers[-2:])
    except CampaignFailed as exc:
        failure = exc
    finally:
        # Every writer is reaped before anything is reported: a stopped or busy one would
        # outlive the test, and a reaped one's stderr is complete.
        for writer in campaign.writers:
            await writer.kill()
    figures = {"campaign": "zombie", "backend": kind, "seed": seed,
               "result": "failed" if failure else "passed",
               "rounds": ROUNDS, "fenced": campaign.figures["fenced"],
               "fenced_at_commit": campaign.figures["fenced_at_commit"],
               "fenced_at_record": campaign.figures["fenced_at_record"],
               "acks_after_wake": campaign.figures["acks_after_wake"],
               "events_lost_by_fence": campaign.figures["events_lost_by_fence"],
               "commits_acked": campaign.figures["commits_acked"],
               "events_verified": campaign.figures["events_verified"],
               "history_events": sum(count for _, count in campaign.landed),
               "gc_deleted_commits": campaign.figures["gc_deleted_commits"],
               "gc_deleted_checkpoints": campaign.figures["gc_deleted_checkpoints"],
               "gc_deleted_segments": campaign.figures["gc_deleted_segments"],
               "writers": len(campaign.writers),
               "variants": {v: campaign.figures[f"variant_{v}"] for v in VARIANTS},
               "elapsed_s": round(time.perf_counter() - started, 1)}
    print(f"zombie campaign ({kind}): " + " ".join(
        f"{k}={v}" for k, v in figures.items() if k not in ("backend", "variants")))
    if report := os.environ.get("APERSIST_ZOMBIE_REPORT"):
        append_report(report, figures)
    if failure is not None:
        pytest.fail(f"{failure}\n" + "\n".join(w.describe() for w in failure.writers))
