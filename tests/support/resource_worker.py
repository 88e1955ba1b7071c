"""The process that ``test_resource_faults.py`` runs inside a private mount namespace.

Run as ``python resource_worker.py SCENARIO DIR``, as root, where DIR is a small tmpfs that
the caller mounted in a mount namespace of its own (``unshare -m``), so every mount made
here is private and vanishes with the process. The faults are real: the kernel answers
ENOSPC when the tmpfs is full, EACCES to an unprivileged user, EROFS on a read-only bind
mount. Scenarios:

- ``enospc``: fill the disk while committing, then replay and open on the full disk, make
  only a commit record not fit, then give space back and recover.
- ``eacces``: an unprivileged child process (uid/gid 65534) opens stores it may not write
  or read, and a store it owns is made read-only (chmod) in the middle of a run.
- ``erofs``: the store's bind mount is remounted read-only in the middle of a run.

Protocol on stdout, one JSON document per line, each flushed: ``{"step": NAME, ...facts}``.
The worker reports what happened; the test judges it. An unexpected failure of the worker
itself exits non-zero with a traceback on stderr.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

import apersist
from apersist import _format as fmt
from apersist._drivers import FilesystemDriver
from apersist._inspect import find_garbage, verify

STREAM = "events"
# Only explicit commits: "acknowledged" then means exactly the events before a commit()
# that returned, and the commit that fails holds exactly the events recorded since.
HOUR_MS = 3_600_000
NOBODY = 65534
PAD = "x" * 900  # ~1 KiB events: the 1 MiB tmpfs fills after a few hundred commits
PAGE = 4096


def emit(step: str, **facts: Any) -> None:
    # One write per line: the parent may see the output cut only between lines.
    sys.stdout.buffer.write(orjson.dumps({"step": step, **facts}) + b"\n")
    sys.stdout.buffer.flush()


def describe(exc: BaseException | None) -> dict[str, Any] | None:
    """The facts of an exception that the test checks: type, message, the OSError behind it."""
    if exc is None:
        return None
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    return {"type": type(exc).__name__, "backend_error": isinstance(exc, apersist.BackendError),
            "os_error": isinstance(exc, OSError), "message": str(exc),
            "cause_errno": (errno.errorcode.get(cause.errno or 0) if isinstance(cause, OSError)
                            else None)}


def config(root: Path, access: apersist.SnapshotAccess = apersist.SnapshotAccess.FULL, *,
           interval_ms: int = HOUR_MS) -> apersist.Config:
    # Raw segments: the scenarios fill a tiny disk at the sizes their padded values give
    # (1 to 13 KiB a commit); compressed, the padding would shrink to nothing, and the disk
    # would fill only after maintenance had merged segments, whose old ones gc then finds.
    return apersist.Config(apersist.Backend.filesystem(root), snapshot_interval_ms=interval_ms,
                           snapshot_access=access, compression=None)


def value(i: int, *, pad: bool = True) -> dict[str, Any]:
    return {"i": i, "pad": PAD} if pad else {"i": i}


def tmp_files(root: Path) -> list[str]:
    """Temporary files of the driver anywhere under ``root`` (a failed put must leave none)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".tmp-*"))


def fingerprint(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes: what "nothing harmed" compares."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


async def replayed(run: apersist.Run) -> dict[str, Any]:
    """The replayed events as (i, offset) pairs, plus the stream's offset."""
    stream = run.stream(STREAM)
    events = [[e.value["i"], e.offset] async for e in stream.replay()]
    return {"events": events, "offset": stream.offset}


Body = Callable[[apersist.Run, dict[str, Any]], Awaitable[None]]


async def attempt(cfg: apersist.Config, body: Body | None = None) -> dict[str, Any]:
    """Open a run, run ``body`` in it, leave it; report where it failed, if it did.

    ``stage`` is ``open`` (entering raised), ``body`` (the body raised), ``exit`` (leaving
    raised after the body finished) or ``done``. ``body`` adds its facts to the dict it is given.
    """
    facts: dict[str, Any] = {}
    stage = "open"
    error: BaseException | None = None
    try:
        async with apersist.run(cfg) as run:
            stage = "body"
            facts.update(await replayed(run))
            if body is not None:
                await body(run, facts)
            stage = "exit"
    except Exception as exc:  # reported for the test to judge
        error = exc
    else:
        stage = "done"
    return {"stage": stage, "error": describe(error), **facts}


async def commit_until_failure(run: apersist.Run, facts: dict[str, Any], *, max_commits: int,
                               fault: Callable[[int], None] | None = None) -> None:
    """Record batches of events and commit each, until a commit fails; note what was acked.

    ``fault(commits_so_far)`` is called before each commit (to make storage fail mid-run).
    Re-raises the commit's failure, so that the run is left by it.
    """
    stream = run.stream(STREAM)
    recorded = acked = 0
    facts.update(acked=acked, attempted=None, commit_error=None, record_after=None,
                 record_after_same=False)
    for number in range(max_commits):
        # Batches of 1..13 events: segments of 1..13 KiB, so the disk fills at varied points.
        for _ in range(1 + (number * 7) % 13):
            await stream.record(value(recorded), offset=recorded)
            recorded += 1
        if fault is not None:
            fault(number)
        try:
            await run.commit()
        except Exception as exc:
            facts.update(attempted=recorded, commit_error=describe(exc), commits=number)
            # The run can no longer persist: recording must say so instead of buffering.
            try:
                await stream.record(value(recorded), offset=recorded)
            except Exception as again:
                facts["record_after"] = describe(again)
                facts["record_after_same"] = again is exc
            raise
        acked = recorded
        facts["acked"] = acked
    facts["commits"] = max_commits


async def recover(root: Path, extra: int) -> dict[str, Any]:
    """A writable run replays, continues the sequence with ``extra`` events and commits;
    then a read-only run replays everything, and the store is verified."""

    async def go_on(run: apersist.Run, facts: dict[str, Any]) -> None:
        stream = run.stream(STREAM)
        n = len(facts["events"])
        for i in range(n, n + extra):
            await stream.record(value(i), offset=i)
        info = await run.commit()
        facts["commit"] = {"seq": info.seq, "deltas": info.deltas}

    writable = await attempt(config(root), go_on)
    final = await attempt(config(root, apersist.SnapshotAccess.REPLAY))
    driver = FilesystemDriver(root)
    problems = await verify(driver)
    # Segments of a failed commit are garbage of an older epoch: gc can reclaim them.
    garbage = await find_garbage(driver, grace_ms=0, now_ms=2**62)
    return {"writable": writable, "final": final, "verify": problems, "garbage": garbage,
            "tmp_files": tmp_files(root)}


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def fill(path: Path) -> int:
    """Append to ``path`` until the filesystem is full; return the file's size."""
    chunk = b"f" * PAGE
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        while os.write(fd, chunk):
            pass
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return path.stat().st_size


# ------------------------------------------------------------------------------ enospc
async def enospc(top: Path) -> None:
    root = top / "store"
    filler = top / "filler"
    # Made now: on a full tmpfs even creating an empty file fails (ENOSPC).
    filler.touch()

    # 1. Commit until the disk is full: the run must end with BackendError.
    async def writer(run: apersist.Run, facts: dict[str, Any]) -> None:
        await commit_until_failure(run, facts, max_commits=2000)

    emit("fill", **await attempt(config(root), writer), tmp_files=tmp_files(root))

    # 2. The disk stays full (a filler takes what the failed commit freed): reading still
    # works; taking the writer role (an epoch record) fails at open.
    fill(filler)
    emit("full_disk",
         replay=await attempt(config(root, apersist.SnapshotAccess.REPLAY)),
         writer=await attempt(config(root)),
         tmp_files=tmp_files(root))

    # 3. Only the commit record does not fit: the segment lands (one free page for it),
    # the commit that would name it does not. The event must never become visible.
    async def one_page_left(run: apersist.Run, facts: dict[str, Any]) -> None:
        n = len(facts["events"])
        await run.stream(STREAM).record(value(n, pad=False), offset=n)
        size = fill(filler)
        os.truncate(filler, size - PAGE)
        segments = root / "writers" / "0" / "segments"
        before = {p.name for p in segments.iterdir()}
        try:
            await run.commit()
        finally:
            facts["new_segments"] = sorted({p.name for p in segments.iterdir()} - before)

    mount("-o", "remount,size=2m", str(top))  # room to open a writer; filled up again above
    emit("commit_record", **await attempt(config(root), one_page_left),
         tmp_files=tmp_files(root))

    # 4. Space comes back: everything acknowledged is there, and the run goes on.
    mount("-o", "remount,size=64m", str(top))
    filler.unlink()
    # What a writer killed in the middle of a put leaves behind (the driver removes its
    # temporary file on every failure it survives): the store must not mind them.
    planted = [root / "writers" / "0" / d / f".tmp-{d}-left-by-a-crash"
               for d in ("commits", "segments", "epochs")]
    for path in planted:
        path.write_bytes(b"torn")
    emit("recover", **await recover(root, extra=25),
         planted=sorted(str(p.relative_to(root)) for p in planted))


# ------------------------------------------------------------------------------ eacces
async def make_store(root: Path, events: int) -> None:
    async with apersist.run(config(root)) as run:
        stream = run.stream(STREAM)
        for i in range(events):
            await stream.record(value(i), offset=i)


def read_only_tree(root: Path, mode: int) -> None:
    """Set ``mode`` on every directory under ``root`` (the owner may: it is a real chmod)."""
    for dirpath, _dirs, _files in os.walk(root):
        os.chmod(dirpath, mode)


async def as_nobody(top: Path) -> None:
    """What the unprivileged child does; every check is reported, none is judged here."""

    async def drops(run: apersist.Run, facts: dict[str, Any]) -> None:
        # A read-only run drops what it is given and writes nothing, even on commit.
        await run.stream(STREAM).record(value(-1), offset=-1)
        info = await run.commit()
        facts["commit"] = {"seq": info.seq, "deltas": info.deltas, "bytes": info.bytes}

    emit("open_unwritable", **await attempt(config(top / "ro-store")))
    emit("open_uncreatable", **await attempt(config(top / "locked" / "new-store")))
    emit("replay_unwritable",
         **await attempt(config(top / "ro-store", apersist.SnapshotAccess.REPLAY), drops))
    emit("segment_unreadable",
         **await attempt(config(top / "segment-store", apersist.SnapshotAccess.REPLAY)))
    emit("open_unreadable",
         replay=await attempt(config(top / "secret-store", apersist.SnapshotAccess.REPLAY)),
         writer=await attempt(config(top / "secret-store")))

    root = top / "user-store"

    def chmod_after_three(number: int) -> None:
        if number == 3:
            read_only_tree(root, 0o555)

    async def writer(run: apersist.Run, facts: dict[str, Any]) -> None:
        await commit_until_failure(run, facts, max_commits=10, fault=chmod_after_three)

    midrun = await attempt(config(root), writer)
    midrun["tmp_files"] = tmp_files(root)
    midrun["replay_while_read_only"] = await attempt(config(root, apersist.SnapshotAccess.REPLAY))
    emit("read_only_midrun", **midrun)
    read_only_tree(root, 0o755)
    emit("recover", **await recover(root, extra=10))


async def eacces_setup(top: Path) -> None:
    # Stores a root-owned process made: the child may read them, not write them.
    await make_store(top / "ro-store", 40)
    (top / "locked").mkdir(mode=0o755)
    await make_store(top / "secret-store", 5)
    os.chmod(top / "secret-store", 0o700)
    await make_store(top / "segment-store", 5)
    for segment in (top / "segment-store" / "writers" / "0" / "segments").iterdir():
        os.chmod(segment, 0o600)
    (top / "user-store").mkdir()
    os.chown(top / "user-store", NOBODY, NOBODY)


def eacces(top: Path) -> None:
    asyncio.run(eacces_setup(top))
    before = fingerprint(top / "ro-store")
    emit("setup", ro_store_files=len(before))

    # Root ignores file permissions, so the checks run in a child that drops to nobody.
    # Everything it needs is imported already: it may not read this interpreter's files.
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            asyncio.run(as_nobody(top))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    emit("after", child_status=os.waitstatus_to_exitcode(status),
         ro_store_unchanged=fingerprint(top / "ro-store") == before,
         locked_entries=sorted(p.name for p in (top / "locked").iterdir()))


# ------------------------------------------------------------------------------ erofs
async def erofs(top: Path) -> None:
    mnt = top / "mnt"
    mnt.mkdir()
    mount("--bind", str(mnt), str(mnt))  # a mount of its own, to remount read-only later
    root = mnt / "store"

    def read_only_after_three(number: int) -> None:
        if number == 3:
            remount_read_only(mnt)

    async def writer(run: apersist.Run, facts: dict[str, Any]) -> None:
        await commit_until_failure(run, facts, max_commits=10,
                                   fault=read_only_after_three)

    async def drops(run: apersist.Run, facts: dict[str, Any]) -> None:
        await run.stream(STREAM).record(value(-1), offset=-1)
        info = await run.commit()
        facts["commit"] = {"seq": info.seq, "deltas": info.deltas, "bytes": info.bytes}

    midrun = await attempt(config(root), writer)
    midrun["tmp_files"] = tmp_files(root)
    emit("read_only_midrun", **midrun)
    emit("read_only_fs",
         replay=await attempt(config(root, apersist.SnapshotAccess.REPLAY), drops),
         writer=await attempt(config(root)))
    mount("-o", "remount,rw,bind", str(mnt))
    emit("recover", **await recover(root, extra=10))

    # The background scheduler (interval 0) meets the fault: record() says so, and the
    # store keeps exactly what the run last saw durable (stream.offset).
    async def background(run: apersist.Run, facts: dict[str, Any]) -> None:
        stream = run.stream(STREAM)
        i = 0
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                if i == 50:
                    remount_read_only(mnt)
                await stream.record(value(i), offset=i)
                i += 1
                await asyncio.sleep(0.001)
        finally:
            facts.update(recorded=i, durable_offset=stream.offset)

    bg_root = mnt / "store-bg"
    bg = await attempt(config(bg_root, interval_ms=0), background)
    mount("-o", "remount,rw,bind", str(mnt))
    emit("background", **bg, recover=await recover(bg_root, extra=5))

    # Only the final commit, made while leaving the block, meets the fault.
    async def leave_after_fault(run: apersist.Run, facts: dict[str, Any]) -> None:
        stream = run.stream(STREAM)
        for i in range(5):
            await stream.record(value(i), offset=i)  # no await yields: nothing commits yet
        remount_read_only(mnt)

    exit_root = mnt / "store-exit"
    left = await attempt(config(exit_root, interval_ms=0), leave_after_fault)
    mount("-o", "remount,rw,bind", str(mnt))
    emit("exit", **left, recover=await recover(exit_root, extra=5))


def remount_read_only(mnt: Path) -> None:
    """Remount the bind mount read-only; retried, as it is refused (EBUSY) while a commit
    in a worker thread has a file open for writing."""
    deadline = time.monotonic() + 5
    while subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)],
                         capture_output=True, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not remount read-only: mnt={mnt}")
        time.sleep(0.002)


def main() -> None:
    scenario, top = sys.argv[1], Path(sys.argv[2])
    # The scenarios fill, lock and damage segment files and their directory: every commit
    # uploads its segments (format 5.0 would carry a small commit's inline in its record).
    fmt.INLINE_BYTES = 0  # type: ignore[misc]
    emit("start", top=str(top))
    if scenario == "eacces":
        eacces(top)  # forks: not from inside an event loop
    else:
        asyncio.run({"enospc": enospc, "erofs": erofs}[scenario](top))
    emit("end")


if __name__ == "__main__":
    main()
