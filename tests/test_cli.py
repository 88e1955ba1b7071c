"""The ``apersist`` command line on a real filesystem store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import apersist
from apersist._cli import backend_from_root, main


async def _fill(root: Path) -> None:
    config = apersist.Config(apersist.Backend.filesystem(root))
    async with apersist.run(config) as run:
        orders = run.stream("orders")
        for i in range(5):
            await orders.record({"n": i}, offset=i)
        counts = await run.table("counts")
        counts["a"] = 1
        counts["b"] = 2
        await run.commit()
        await run.stream("clicks").record("x")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    asyncio.run(_fill(root))
    return root


def test_inspect_json_names_every_stream(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(store), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["streams"]) == {"orders", "clicks"}
    assert doc["streams"]["orders"]["records"] == 5
    assert doc["streams"]["orders"]["offset"] == 4
    assert doc["streams"]["clicks"]["offset"] is None
    assert doc["tables"]["counts"]["delta_records"] == 2
    assert doc["writer_epoch"] == 1
    assert doc["last_seq"] >= 2


def test_inspect_text(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    assert "orders: 5 events" in out
    assert "counts:" in out


def test_dump_prints_one_json_line_per_event(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dump", str(store), "orders"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["value"] for line in lines] == [{"n": i} for i in range(5)]
    assert [line["offset"] for line in lines] == list(range(5))


def test_dump_writes_nothing(store: Path) -> None:
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    assert main(["dump", str(store), "orders"]) == 0
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
def test_verify_ok_then_names_a_damaged_segment(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(store)]) == 0
    assert "verify ok" in capsys.readouterr().out
    segment = sorted((store / "writers/0/segments").iterdir())[0]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert segment.name in out
    assert "offset=" in out


def test_compact_keeps_table_state(store: Path) -> None:
    assert main(["compact", str(store)]) == 0

    async def read() -> dict[str, int]:
        config = apersist.Config(apersist.Backend.filesystem(store))
        async with apersist.run(config) as run:
            return dict(await run.table("counts"))

    assert asyncio.run(read()) == {"a": 1, "b": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
def test_gc_marks_first_and_deletes_only_what_an_earlier_run_marked_a_grace_period_ago(
        store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    segments = store / "writers/0/segments"
    # An upload of epoch 1 that no commit names (its writer was killed before committing).
    orphan = segments / f"{1:020d}-{999:020d}.seg"
    orphan.write_bytes(b"junk")
    key = f"writers/0/segments/{orphan.name}"
    marker = store / "writers/0/gc/marks.json"
    # Epoch 1 is still the newest commit's epoch: its orphan may be a commit in flight.
    assert main(["gc", str(store), "--grace-seconds", "0"]) == 0
    assert "0 garbage object(s) deleted, 0 marked" in capsys.readouterr().out
    assert orphan.exists()
    assert not marker.exists()
    asyncio.run(_fill(store))  # a new writer (epoch 2) takes over: epoch 1 is fenced
    # A dry run says what a run would do and writes nothing.
    before = _files(store)
    assert main(["gc", str(store), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would mark {key} (deletable in 3600 s)" in out
    assert "0 garbage object(s) would be deleted, 1 marked; nothing written (dry run)" in out
    assert _files(store) == before
    # The first run only marks, by its own clock; nothing is old enough yet.
    assert main(["gc", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"mark {key}" in out
    assert "0 garbage object(s) deleted, 1 marked" in out
    assert orphan.exists()
    assert marker.exists()
    assert main(["gc", str(store)]) == 0
    assert f"keep {key} (first seen 0 s ago, deletable in 3600 s)" in capsys.readouterr().out
    assert orphan.exists()
    assert main(["gc", str(store), "--dry-run", "--grace-seconds", "0"]) == 0
    assert f"would delete {key}" in capsys.readouterr().out
    assert orphan.exists()
    assert main(["gc", str(store), "--grace-seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert f"delete {key}" in out
    assert "1 garbage object(s) deleted, 0 marked" in out
    assert not orphan.exists()
    assert main(["verify", str(store)]) == 0


@pytest.mark.parametrize("grace", ["-1", "-0.5", "nan", "inf", "soon"])
def test_gc_refuses_a_grace_period_that_is_not_a_number_of_seconds(
        store: Path, capsys: pytest.CaptureFixture[str], grace: str) -> None:
    before = _files(store)
    with pytest.raises(SystemExit) as exit_:
        main(["gc", str(store), f"--grace-seconds={grace}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"the grace period must be a number of seconds, 0 or more: '{grace}'" in err
    assert _files(store) == before


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
def test_gc_reports_a_damaged_marker_and_starts_over(
        store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (store / "writers/0/segments" / f"{1:020d}-{999:020d}.seg").write_bytes(b"junk")
    asyncio.run(_fill(store))
    assert main(["gc", str(store)]) == 0
    marker = store / "writers/0/gc/marks.json"
    marker.write_bytes(marker.read_bytes().replace(b'"marks"', b'"marXs"'))
    capsys.readouterr()
    assert main(["verify", str(store)]) == 1
    assert "writers/0/gc/marks.json" in capsys.readouterr().out
    assert main(["gc", str(store)]) == 0
    captured = capsys.readouterr()
    assert "the gc marker is damaged and was replaced" in captured.err
    assert "key=writers/0/gc/marks.json" in captured.err
    assert "1 marked" in captured.out
    assert main(["verify", str(store)]) == 0


def test_bad_root_gives_an_error_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "s3://"]) == 2
    assert "ValueError" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "no-such-store")]) == 2
    assert "no store directory" in capsys.readouterr().err


def test_backend_from_root(tmp_path: Path) -> None:
    assert backend_from_root(str(tmp_path)) == apersist.Backend.filesystem(tmp_path)
    s3 = backend_from_root("s3://my-bucket/some/prefix")
    assert s3.kind == "s3"


def test_console_script_help() -> None:
    exe = Path(sys.executable).with_name("apersist")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "apersist._cli"]
    out = subprocess.run([*argv, "--help"], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "error"})
    for command in ("inspect", "verify", "dump", "compact", "gc", "demo"):
        assert command in out.stdout


def test_compact_applies_the_retention_it_is_given(tmp_path: Path) -> None:
    root = tmp_path / "store"

    async def write() -> None:
        async with apersist.run(apersist.Config(apersist.Backend.filesystem(root))) as run:
            for i in range(10):
                await run.stream("s").record(i, offset=i)
                await run.commit()

    asyncio.run(write())
    assert main(["compact", str(root), "--max-events", "3"]) == 0
    with pytest.raises(SystemExit) as exit_:  # a usage error, refused before the store is opened
        main(["compact", str(root), "--max-events", "-1"])
    assert exit_.value.code == 2

    async def read() -> tuple[list[Any], Any]:
        cfg = apersist.Config(apersist.Backend.filesystem(root), snapshot_access="replay")
        async with apersist.run(cfg) as run:
            return [e.value async for e in run.stream("s").replay()], run.stream("s").offset

    assert asyncio.run(read()) == ([7, 8, 9], 9)


# ----------------------------------------------------------------------------- every command

ROOT = Path(__file__).resolve().parents[1]


def _cli(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run this checkout's command line in a process of its own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "apersist._cli", *argv], capture_output=True,
                          text=True, env=env, timeout=120, check=False, **kwargs)


def test_version() -> None:
    done = _cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == (f"apersist {apersist.__version__} (store format "
                                   f"{apersist.FORMAT_MAJOR}.{apersist.FORMAT_MINOR})")


def _json(argv: list[str], capsys: pytest.CaptureFixture[str], code: int = 0) -> dict[str, Any]:
    assert main(argv) == code, argv
    doc = json.loads(capsys.readouterr().out)  # one document, nothing else on stdout
    assert doc["exit_code"] == code
    return dict(doc)


def test_every_command_prints_one_json_document(
        store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(store)
    doc = _json(["inspect", root, "--json"], capsys)
    assert {"last_seq", "live_commits", "writer_epoch", "stored_bytes", "streams", "tables",
            "cache"} <= set(doc)
    assert _json(["verify", root, "--json"], capsys) == {"ok": True, "damaged": [],
                                                         "exit_code": 0}
    doc = _json(["dump", root, "orders", "--json"], capsys)
    assert (doc["name"], doc["kind"], doc["count"], doc["complete"], doc["damage"]) == (
        "orders", "stream", 5, True, [])
    assert doc["items"][0] == {"value": {"n": 0}, "offset": 0, "time_ms": doc["items"][0]["time_ms"]}
    doc = _json(["salvage", root, str(tmp_path / "copy"), "--json"], capsys)
    assert doc["complete"] is True
    assert doc["streams"]["orders"]["kept"] == 5
    doc = _json(["gc", root, "--dry-run", "--json"], capsys)
    assert set(doc) == {"dry_run", "grace_seconds", "now_ms", "deleted", "marked", "new",
                        "damaged_marker", "exit_code"}
    assert doc["dry_run"] is True
    doc = _json(["compact", root, "--json"], capsys)
    assert set(doc) == {"tables", "live_segments", "checkpoint_seq", "last_seq", "exit_code"}
    assert doc["tables"] == 1
    # An error is a document too, besides its line on stderr.
    assert main(["dump", root, "nope", "--json"]) == 2
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["error"]["type"] == "UnknownNameError"
    assert doc["exit_code"] == 2
    assert len(captured.err.splitlines()) == 1


def _damage_a_commit(store: Path) -> Path:
    commit = sorted((store / "writers/0/commits").iterdir())[1]
    commit.write_bytes(commit.read_bytes().replace(b'"commit"', b'"commiT"'))
    return commit


def test_an_error_is_one_line_without_a_traceback_unless_debug(store: Path) -> None:
    commit = _damage_a_commit(store)
    done = _cli("inspect", str(store))
    assert done.returncode == 1  # damage found
    [line] = done.stderr.splitlines()
    assert line.startswith("apersist inspect: CorruptDataError: record checksum mismatch: ")
    assert f"key=writers/0/commits/{commit.name}" in line
    assert done.stdout == ""
    debug = _cli("inspect", str(store), "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1] == line


def test_a_closed_pipe_ends_dump_quietly(tmp_path: Path) -> None:
    root = tmp_path / "big"

    async def fill() -> None:
        async with apersist.run(apersist.Config(apersist.Backend.filesystem(root))) as run:
            for i in range(20_000):  # far more than a pipe holds
                await run.stream("s").record({"i": i, "pad": "x" * 40}, offset=i)

    asyncio.run(fill())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, "-m", "apersist._cli", "dump", str(root), "s"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # as `| head -1` does
        err = proc.stderr.read()
        assert proc.wait(60) == 141
    assert json.loads(first)["value"]["i"] == 0
    assert err == b""


def test_dump_names_what_exists_when_the_name_is_unknown(
        store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dump", str(store), "Orders"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert "no stream or table of that name in the store; did you mean: orders?" in line
    assert "name=Orders known: stream clicks, stream orders, table counts" in line
    # A table's name dumps its rows; --table insists on a table.
    assert main(["dump", str(store), "counts"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rows == [{"key": "a", "value": 1}, {"key": "b", "value": 2}]
    assert main(["dump", str(store), "orders", "--table"]) == 2
    assert "no table of that name" in capsys.readouterr().err


def test_inspect_prints_keys_it_does_not_know(
        store: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from apersist._inspect import StoreReport

    plain = StoreReport.to_json
    monkeypatch.setattr(StoreReport, "to_json",
                        lambda self: {**plain(self), "shards": {"count": 2}})
    assert main(["inspect", str(store)]) == 0
    assert 'shards: {"count":2}' in capsys.readouterr().out.splitlines()


def test_progress_is_drawn_on_a_terminal_only(store: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    program = ("import sys, apersist._progress as p; p.DELAY_S = 0; "
               "from apersist._cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in (["verify", str(store)], ["dump", str(store), "orders"],
                    ["gc", str(store), "--dry-run"]):
        leader, follower = pty.openpty()
        # A terminal of 100 columns: one that has no size (0 columns) gets a bar of nothing.
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        try:
            done = subprocess.run([sys.executable, "-c", program, *command], stdout=subprocess.PIPE,
                                  stderr=follower, env=env, timeout=60, check=False)
            os.close(follower)
            drawn = b""
            with contextlib.suppress(OSError):  # EIO once the terminal has nothing more
                while chunk := os.read(leader, 65536):
                    drawn += chunk
        finally:
            os.close(leader)
        assert done.returncode == 0, command
        # tqdm's bar: the command's name, a count and a rate, redrawn with carriage returns.
        assert command[0].encode() in drawn, (command, drawn)
        assert b"/s]" in drawn, (command, drawn)
        piped = subprocess.run([sys.executable, "-c", program, *command], capture_output=True,
                               env=env, timeout=60, check=False)
        assert (piped.returncode, piped.stderr) == (0, b""), command


def test_dump_reads_the_log_up_to_its_last_whole_commit(
        store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    newest = sorted((store / "writers/0/commits").iterdir())[-1]  # the commit of "clicks"
    newest.write_bytes(newest.read_bytes()[:-3])
    assert main(["dump", str(store), "orders"]) == 1
    captured = capsys.readouterr()
    assert [json.loads(x)["value"] for x in captured.out.splitlines()] == [{"n": i} for i in range(5)]
    [line] = captured.err.splitlines()
    assert f"key=writers/0/commits/{newest.name} offset=" in line
    # "clicks" was added by the damaged commit: as far as the log reads, it does not exist.
    assert main(["dump", str(store), "clicks"]) == 2
    err = capsys.readouterr().err
    assert "known: stream orders, table counts (the commit log reads only up to commit" in err
    assert f"key=writers/0/commits/{newest.name}" in err


def test_demo_with_json_prints_only_its_document_on_stdout(tmp_path: Path) -> None:
    done = _cli("demo", "--events", "10000", "--store", str(tmp_path / "demo"), "--json")
    assert json.loads(done.stdout) == {"ok": True, "exit_code": 0}, done.stderr
    assert "OK: the killed-and-restarted run gives exactly the uninterrupted result" in done.stderr
    # A bad argument is a usage error, before anything runs.
    bad = _cli("demo", "--events", "-5")
    assert bad.returncode == 2
    assert "must be a whole number, 0 or more: '-5'" in bad.stderr


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
def test_a_damaged_trailer_loses_no_event(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Only the trailer of the segment of "orders" is hit: every record still passes its own
    # checksum, so dump prints every event, and salvage keeps them, but both report it.
    segment = sorted((store / "writers/0/segments").iterdir())[0]
    data = bytearray(segment.read_bytes())
    data[-12] ^= 0x01  # the trailer's CRC of its own fields
    segment.write_bytes(bytes(data))
    assert main(["dump", str(store), "orders"]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 5
    assert "all 5 events were printed: the damage lost none" in captured.err
    assert f"key=writers/0/segments/{segment.name}" in captured.err
    assert main(["salvage", str(store), str(store.parent / "copy")]) == 1
    out = capsys.readouterr().out
    assert (f"stream orders: kept 5 of 5 events, damaged at key=writers/0/segments/{segment.name} "
            f"offset=") in out
    assert "(no record lost: they all read); offset 4" in out
