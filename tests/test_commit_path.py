"""The filesystem's commit path: segments and record in one thread hop (``put_then_create``).

The ordering is the invariant: the record is linked only after every segment's bytes, every
segment's name (its directory) and the record's own bytes are fsynced, so that a commit
never becomes visible or durable while a segment it names could be lost. These tests log
the system calls of a real commit and check that order; make each step fail in turn and
check that nothing of the failed commit is visible and no temporary file stays; and check
that a fenced commit leaves no temporary file either. The wrappers that inject faults or
retry do not offer the verb, so the fault and crash-point suites go through their steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import apersist
from apersist import _format as fmt
from apersist._drivers import FilesystemDriver, MemoryDriver
from apersist._drivers import filesystem as fs
from apersist._drivers.retry import RetryingDriver
from apersist.testing import FaultyDriver

STREAMS = ("a", "b")  # two streams: each commit below writes two segments
COMMITS = fmt.commits_prefix("0")


def config(root: Path) -> apersist.Config:
    return apersist.Config(apersist.Backend.filesystem(root), snapshot_interval_ms=3_600_000)


async def commit_round(run: apersist.Run, c: int) -> None:
    for name in STREAMS:
        await run.stream(name).record(c, offset=c)
    await run.commit()


def tmp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".tmp-*"))


async def replayed(root: Path) -> list[list[Any]]:
    async with apersist.run(config(root)) as run:
        return [[e.value async for e in run.stream(name).replay()] for name in STREAMS]


class SyscallLog:
    """Wraps the ``os`` calls of the filesystem driver and logs them with their paths;
    ``fail_at`` makes the n-th logged call (counting from 1) raise ``EIO`` instead."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_at: int | None = None
        self._paths: dict[int, str] = {}
        real = {name: getattr(os, name) for name in ("open", "fsync", "replace", "link")}

        def logged(name: str, describe: Callable[..., str]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                self.calls.append((name, describe(*args)))
                if self.fail_at is not None and len(self.calls) == self.fail_at:
                    raise OSError(5, "injected I/O error")
                result = real[name](*args, **kwargs)
                if name == "open":
                    self._paths[result] = str(args[0])
                return result
            return call

        monkeypatch.setattr(fs.os, "open", logged("open", lambda path, *_: str(path)))
        monkeypatch.setattr(fs.os, "fsync", logged("fsync", lambda fd: self._paths.get(fd, "?")))
        monkeypatch.setattr(fs.os, "replace", logged("replace", lambda src, dst: str(dst)))
        monkeypatch.setattr(fs.os, "link", logged("link", lambda src, dst: str(dst)))

    def reset(self) -> None:
        self.calls.clear()


def _is_tmp(path: str) -> bool:
    return Path(path).name.startswith(".tmp-")


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_the_record_is_linked_after_every_fsync_it_depends_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "store"
    async with apersist.run(config(root)) as run:
        await commit_round(run, 1)  # directories exist from now on
        log = SyscallLog(monkeypatch)
        await commit_round(run, 2)
        monkeypatch.undo()
    calls = log.calls
    links = [i for i, (name, _) in enumerate(calls) if name == "link"]
    assert len(links) == 1, calls
    link = links[0]
    record = calls[link][1]
    assert f"/{COMMITS}" in record, calls
    segments = [path for name, path in calls if name == "replace" and "/segments/" in path]
    assert len(segments) == len(STREAMS), calls
    before = calls[:link]
    fsynced = [path for name, path in before if name == "fsync"]
    # The bytes of both segments (opened as temporary files, renamed) and of the record.
    written = [path for name, path in before if name == "open" and _is_tmp(path)]
    assert len(written) == len(STREAMS) + 1, calls
    assert all(path in fsynced for path in written), calls
    # The segments' names: their directory, fsynced after the renames.
    seg_dir = str(Path(segments[0]).parent)
    last_rename = max(i for i, (name, _) in enumerate(calls) if name == "replace")
    assert any(name == "fsync" and path == seg_dir for name, path in calls[last_rename:link]), calls
    # And the record's name is durable before the commit returns: its directory after the link.
    assert ("fsync", str(Path(record).parent)) in calls[link:], calls
    # One hop, no thread left behind: every logged call ran before the commit returned.
    assert tmp_files(root) == []


async def test_a_failure_at_any_step_leaves_no_visible_commit_and_no_temporary_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Count the steps of one commit, then fail each in turn on a fresh store.
    probe = tmp_path / "probe"
    async with apersist.run(config(probe)) as run:
        await commit_round(run, 1)
        log = SyscallLog(monkeypatch)
        await commit_round(run, 2)
        monkeypatch.undo()
    steps = list(log.calls)
    link = next(i for i, (name, _) in enumerate(steps) if name == "link")
    for n in range(1, len(steps) + 1):
        root = tmp_path / f"fail-{n}"
        ctx = f"failing step {n} of {len(steps)}: {steps[n - 1]}"
        with pytest.raises(apersist.BackendError):  # noqa: PT012 - the failure is the commit's
            async with apersist.run(config(root)) as run:
                await commit_round(run, 1)
                log = SyscallLog(monkeypatch)
                log.fail_at = n
                with pytest.raises(apersist.BackendError, match="injected i/o error"):
                    await commit_round(run, 2)
                monkeypatch.undo()
        assert tmp_files(root) == [], ctx
        # Up to the link nothing of commit 2 is visible; a failure after it (the commits
        # directory's fsync) leaves the commit visible, but it was never acknowledged.
        want = [[1], [1]] if n - 1 <= link else [[1, 2], [1, 2]]
        assert await replayed(root) == want, ctx


async def test_a_fenced_commit_leaves_no_temporary_file(tmp_path: Path) -> None:
    root = tmp_path / "store"
    left: list[str] | None = None
    with pytest.raises(apersist.FencedError):  # noqa: PT012 - the commit, then leaving, fail
        async with apersist.run(config(root)) as old:
            await commit_round(old, 1)
            async with apersist.run(config(root)) as new:
                await commit_round(new, 1)
            try:
                await commit_round(old, 2)  # its record meets the number the new writer took
            finally:
                left = tmp_files(root)
    assert left == []
    assert tmp_files(root) == []


def test_only_the_filesystem_offers_the_verb(tmp_path: Path) -> None:
    # The wrappers work step by step through the fallback: FaultyDriver so that its crash
    # points (after_segment_put, mid_commit, ...) stay between steps; RetryingDriver because
    # retrying a whole commit whose record landed would put its segments again.
    assert callable(getattr(FilesystemDriver(tmp_path), "put_then_create", None))
    for driver in (MemoryDriver({}), FaultyDriver(FilesystemDriver(tmp_path)),
                   RetryingDriver(FilesystemDriver(tmp_path))):
        assert not hasattr(driver, "put_then_create"), driver
