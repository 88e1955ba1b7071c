"""Hostile review of the operator's toolbox (issue 15): the command line's error paths,
``salvage``'s destination, ``verify``'s exit codes. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_BUCKET
from servers import S3_KEY_ID, S3_REGION, S3_SECRET

import apersist
from apersist import _cli
from apersist import _format as fmt
from apersist._cli import main
from apersist._drivers import Driver, ObjectInfo, open_driver
from apersist._errors import BackendError, WriterActiveError
from apersist._store import Store

ROOT = Path(__file__).resolve().parents[1]


async def _fill(root: Path | apersist.Backend) -> None:
    backend = root if isinstance(root, apersist.Backend) else apersist.Backend.filesystem(root)
    async with apersist.run(apersist.Config(backend)) as run:
        orders = run.stream("orders")
        for i in range(5):
            await orders.record({"n": i}, offset=i)
        counts = await run.table("counts")
        counts["a"] = 1
        await run.commit()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    asyncio.run(_fill(root))
    return root


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _cli_shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command line in a shell of its own, so that a test can close its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(["bash", "-c", f"{sys.executable} -m apersist._cli {command}"], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=120, check=False)


# ----------------------------------------------------------------------------- salvage's DEST


@pytest.mark.parametrize("dest", ["gs://bucket/salvaged", "S3://bucket/salvaged",
                                  "s3:/bucket/salvaged", "https://bucket.example/salvaged"])
def test_salvage_into_a_root_of_an_unknown_scheme_is_refused(
        store: Path, tmp_path: Path, dest: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped scheme used to become a local directory (./gs:/bucket/salvaged): the
    operator believed the store safe in the cloud while it sat in the working directory."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["salvage", str(store), dest]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "s3://" in line, line
    assert "az://" in line, line
    assert list(work.iterdir()) == []
    # Reading commands say the same, rather than "no store directory at this path".
    assert main(["inspect", dest]) == 2
    assert "s3://" in capsys.readouterr().err


@pytest.mark.parametrize("inside", ["salvaged", "writers/0/salvaged", "./writers/../salvaged"])
def test_salvage_into_a_directory_inside_root_is_refused(
        store: Path, inside: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A new store inside the damaged one: a later ``rm -rf ROOT`` of the damaged store, the
    natural next step, deletes the salvaged one with it; and ROOT's listings now hold it."""
    before = _files(store)
    assert main(["salvage", str(store), str(store / inside)]) == 2
    assert "inside" in capsys.readouterr().err
    assert _files(store) == before


def test_salvage_into_a_parent_of_root_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ROOT inside DEST: DEST is not empty, refused as such (this held up)."""
    root = tmp_path / "a" / "store"
    asyncio.run(_fill(root))
    assert main(["salvage", str(root), str(tmp_path / "a")]) == 2
    assert "must be empty" in capsys.readouterr().err


def test_salvage_into_a_prefix_inside_root_on_s3_is_refused(
        tmp_path: Path, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": S3_KEY_ID,
                        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                        "AWS_DEFAULT_REGION": S3_REGION}.items():
        monkeypatch.setenv(name, value)
    prefix = f"rev15-{os.getpid()}-{tmp_path.name}"
    root = f"s3://{TEST_BUCKET}/{prefix}"
    asyncio.run(_fill(_cli.backend_from_root(root)))
    assert main(["salvage", root, f"{root}/salvaged"]) == 2
    assert "inside" in capsys.readouterr().err
    # A sibling prefix that merely starts with the same letters is not inside.
    assert main(["salvage", root, f"{root}-salvaged"]) == 0


# ----------------------------------------------------------------------------- stderr closed


@pytest.mark.parametrize("redirect", ["2>&-; echo rc=$?",
                                      "2>&1 >/dev/null | true; echo rc=${PIPESTATUS[0]}"])
def test_an_error_with_stderr_closed_still_exits_2(tmp_path: Path, redirect: str) -> None:
    """Exit 1 means damage found: a missing root with stderr closed (a daemon, ``2>&-``) or
    piped into a reader that went away used to exit 1, from the traceback of the failed
    write of the error line."""
    done = _cli_shell(f"inspect {tmp_path / 'missing'} {redirect}", tmp_path)
    assert done.stdout.strip().splitlines()[-1] == "rc=2", done


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
def test_damage_with_stderr_closed_still_exits_1(store: Path, tmp_path: Path) -> None:
    segment = next((store / "writers/0/segments").iterdir())
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    done = _cli_shell(f"verify {store} 2>&-; echo rc=$?", tmp_path)
    assert done.stdout.strip().splitlines()[-1] == "rc=1", done


# ----------------------------------------------------------------------------- verify


def test_verify_of_a_store_of_a_newer_format_is_not_damage(
        store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A newer apersist wrote the store: verify called it damage (exit 1, ``damaged: ...``),
    which sends an operator to salvage a store that is whole, while inspect, dump and
    salvage exit 2 with IncompatibleFormatError, as documented."""
    commit = sorted((store / "writers/0/commits").iterdir())[-1]
    body = fmt._decode_checked("k", commit.read_bytes())
    body["format"] = [fmt.FORMAT_MAJOR + 1, 0]
    commit.write_bytes(fmt._encode_checked(body))
    assert main(["verify", str(store), "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["type"] == "IncompatibleFormatError"
    assert "damaged" not in captured.out


class _FailingGets:
    """A driver whose reads of segments fail as a backend outage does."""

    def __init__(self, inner: Driver) -> None:
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        if "/segments/" in key:
            raise BackendError(f"connection reset by peer: key={key}")
        return await self.inner.get(key, start=start, end=end)

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        await self.inner.put(key, data, if_absent=if_absent)

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        return self.inner.list(prefix)

    async def delete(self, keys: Sequence[str]) -> None:
        await self.inner.delete(keys)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
def test_verify_that_meets_a_backend_failure_is_not_damage(
        store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A network failure while verify reads segments was printed as ``damaged: ...`` and
    exited 1: the store is whole, the backend was not."""
    real = _cli.open_driver
    monkeypatch.setattr(_cli, "open_driver", lambda backend: _FailingGets(real(backend)))
    assert main(["verify", str(store)]) == 2
    captured = capsys.readouterr()
    assert "damaged" not in captured.out
    assert captured.err.startswith("apersist verify: BackendError: ")


# ----------------------------------------------------------------------------- a lost commit log


def _lose_the_commit_log(store: Path) -> None:
    """What ``aws s3 rm --recursive .../commits/`` or a bucket lifecycle rule does: every
    commit record and checkpoint gone; the epoch record and the segments, with the data,
    left."""
    for folder in ("commits", "checkpoints"):
        for path in sorted((store / "writers/0" / folder).rglob("*"), reverse=True):
            if path.is_file():
                path.unlink()
    assert any((store / "writers/0/segments").rglob("*.seg"))


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
def test_verify_of_a_store_whose_commit_log_is_gone_is_damage(
        store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Segments are written only after their epoch's fence commit, which gc keeps for good:
    segments with no commit record and no checkpoint mean the log was lost. verify said
    ``verify ok`` (exit 0), so the operator never learnt the data was unreachable."""
    _lose_the_commit_log(store)
    assert main(["verify", str(store)]) == 1
    assert "commit log" in capsys.readouterr().out


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
def test_salvage_of_a_store_whose_commit_log_is_gone_does_not_say_nothing_was_lost(
        store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """salvage printed ``nothing lost: the source was whole`` and exited 0."""
    _lose_the_commit_log(store)
    assert main(["salvage", str(store), str(tmp_path / "copy"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["complete"] is False
    assert any("commit log" in d["message"] for d in doc["log_damage"])


def test_a_new_store_whose_writer_stopped_before_its_fence_is_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An epoch record and nothing else (a writer stopped before its fence commit) is a
    whole, empty store: no damage (this held up, and must stay so)."""
    async def epoch_only() -> None:
        store = Store(open_driver(apersist.Backend.filesystem(tmp_path / "s")), clock_ms=lambda: 1)
        await store._put_created(fmt.epoch_key(fmt.WRITER, 1), fmt.EpochRecord(
            fmt.WRITER, 1, 1, "t").encode())
        await store._driver.aclose()

    asyncio.run(epoch_only())
    assert main(["verify", str(tmp_path / "s")]) == 0
    capsys.readouterr()


# ----------------------------------------------------------------------------- writers' names


def test_the_command_lines_writers_name_themselves(
        store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``compact`` fences a running service and ``salvage`` writes a new store: the
    service's FencedError and ``inspect`` then named host and pid only (label null), not
    that it was the operator's command line."""
    assert main(["compact", str(store)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["writer"]["label"] == "apersist-compact"
    assert main(["salvage", str(store), str(tmp_path / "copy")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "copy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["writer"]["label"] == "apersist-salvage"


@pytest.mark.parametrize("label", ["a\x9b2Jb", "a\x80b", "a\x9fb"])
def test_a_writer_label_with_a_c1_control_character_is_refused(label: str) -> None:
    """The docs say "without spaces or control characters"; C1 controls (U+0080..U+009F;
    U+009B is the 8-bit CSI of terminals) passed, and ``apersist inspect`` printed them."""
    with pytest.raises(ValueError, match="writer_label"):
        apersist.Config(apersist.Backend.memory(), writer_label=label)


# ----------------------------------------------------------------------------- dump


def test_dump_of_an_unknown_name_in_a_store_of_many_streams_is_one_short_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The error line listed every stream and table: with thousands, one line of hundreds
    of kilobytes at 3 a.m. The close names and a count are what helps."""
    root = tmp_path / "many"

    async def fill() -> None:
        async with apersist.run(apersist.Config(apersist.Backend.filesystem(root))) as run:
            for i in range(3000):
                await run.stream(f"orders-{i:05d}").record(i)

    asyncio.run(fill())
    assert main(["dump", str(root), "orders-0001x"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert len(line) < 2000, len(line)
    assert "did you mean: orders-" in line, line
    assert "3000" in line, line


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
def test_gc_of_a_store_whose_commit_log_is_gone_deletes_nothing(
        store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With no commit naming them, every segment is garbage to gc: ``gc --grace-seconds 0``
    deleted the only data left of the store, with exit 0."""
    _lose_the_commit_log(store)
    before = _files(store)
    assert main(["gc", str(store), "--grace-seconds", "0"]) == 1
    assert "commit log" in capsys.readouterr().err
    assert _files(store) == before


@pytest.mark.parametrize(("name", "noun"), [("orders", "events"), ("counts", "rows")])
def test_dump_of_a_store_with_a_damaged_epoch_record_says_nothing_was_cut(
        store: Path, name: str, noun: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The commit log reads whole past a damaged epoch record, and every event is printed;
    dump said ``stream orders is damaged; the 5 events before the damage were printed``,
    which tells the operator that later events were lost."""
    epoch = next((store / "writers/0/epochs").iterdir())
    data = bytearray(epoch.read_bytes())
    data[40] ^= 1
    epoch.write_bytes(bytes(data))
    assert main(["dump", str(store), name]) == 1
    captured = capsys.readouterr()
    count = len(captured.out.splitlines())
    [line] = captured.err.splitlines()
    assert f"all {count} {noun} were printed" in line, line
    assert f"{name} is damaged" not in line, line
    assert "key=writers/0/epochs/" in line


# ----------------------------------------------------------------------------- takeover_idle_ms


async def test_a_writer_that_committed_while_the_store_was_opened_is_active(tmp_path: Path) -> None:
    """The idle check measured the age of the newest commit *as loaded*: a writer that
    committed after the opening run listed the log (a load of a long log takes seconds on
    S3) was judged by its older commit, and taken over while at work."""
    backend = apersist.Backend.filesystem(tmp_path / "s")
    async with apersist.run(apersist.Config(backend, writer_label="busy")) as busy:
        await busy.stream("s").record(1)
        await busy.commit()
        hour_ago = time.time() - 3600
        for path in (tmp_path / "s").rglob("*.json"):
            os.utime(path, (hour_ago, hour_ago))
        driver = open_driver(backend)
        try:
            opening = Store(driver, clock_ms=lambda: time.time_ns() // 1_000_000)
            await opening.load()  # sees the commit of an hour ago
            await busy.stream("s").record(2)
            await busy.commit()  # the busy writer commits now
            with pytest.raises(WriterActiveError) as info:
                await opening.refuse_active_writer(60_000)
            assert info.value.holder is not None
            assert info.value.holder.label == "busy"
        finally:
            await driver.aclose()


def test_dump_of_a_stream_that_only_later_commits_hold_is_damage(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The name is right, and the commit records after the damage that still decode name
    it: dump said ``UnknownNameError`` and exit 2 (a typo), where the stream was lost to
    damage (exit 1, damage found)."""
    root = tmp_path / "s"

    async def fill() -> None:
        async with apersist.run(apersist.Config(apersist.Backend.filesystem(root))) as run:
            await run.stream("orders").record(1)
            await run.commit()
            await run.stream("orders").record(2)
            await run.commit()
            await run.stream("late").record("x")
            await run.commit()

    asyncio.run(fill())
    commits = sorted(p for p in (root / "writers/0/commits").rglob("*.json"))
    damaged = commits[-2]  # the second commit of orders; "late" comes in the one after it
    damaged.write_bytes(damaged.read_bytes().replace(b'"commit"', b'"commiT"'))
    assert main(["dump", str(root), "late"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "CorruptDataError" in line, line
    assert f"key=writers/0/commits/{damaged.name}" in line, line


# ----------------------------------------------------------------------------- memory


async def test_reading_a_log_for_dump_and_salvage_holds_a_bounded_window_of_bytes() -> None:
    """``read_log`` fetched 8 segments at once whatever their size: with a writer's
    ``max_segment_bytes`` of 256 MiB, ``dump`` and ``salvage`` held 2 GiB before printing a
    line. A run's replay bounds its window by bytes (8 MiB, or one segment if bigger)."""
    from apersist import _recover

    backend = apersist.Backend.memory()
    segment = 2 << 20
    config = apersist.Config(backend, max_segment_bytes=segment, max_pending_bytes=64 << 20,
                             snapshot_interval_ms=3_600_000)
    async with apersist.run(config) as run:
        stream = run.stream("big")
        # 24 MiB of 2 KB events: at least 10 segments. A segment is cut when its open
        # batch is framed, up to a quarter past 2 MiB, so 16 MiB made 7 or 8 of them.
        for i in range(12 * 1024):
            await stream.record("x" * 2000, offset=i)
        await run.commit()

    fetched = 0

    class Counting(_FailingGets):
        async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
            nonlocal fetched
            data = await self.inner.get(key, start=start, end=end)
            if "/segments/" in key:
                fetched += len(data)
            return data

    driver = Counting(open_driver(backend))
    try:
        opened = await _recover.open_readable(driver)
        refs = [s.ref for s in opened.store.segments(fmt.KIND_EVENTS, "big")]
        assert len(refs) >= 8
        async for _part in _recover.read_log(opened.store, fmt.KIND_EVENTS, "big"):
            break
        assert fetched <= max(8 << 20, max(r.size for r in refs)), (fetched, len(refs))
    finally:
        await driver.aclose()
