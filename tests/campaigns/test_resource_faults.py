"""Resource faults on the filesystem driver: disk full, permission denied, read-only filesystem.

The faults are real, not mocked. Each scenario of ``resource_worker.py`` runs as root in a
mount namespace of its own (``unshare -m``) on a private tmpfs: a 1 MiB tmpfs fills up
(ENOSPC) and is given space back with a remount; an unprivileged child (uid 65534) meets
EACCES on stores it may not write or read and on its own store after a chmod; a bind mount
remounted read-only gives EROFS. The worker reports what happened, one JSON line per step;
the tests here judge it. Every failure must be an ``apersist.BackendError`` whose message
says what failed, on which key, with the errno's name; a run that failed loses nothing that
was acknowledged, shows no part of a failed commit, and a later run continues the store.

These tests need root and ``unshare``/``mount``. Without them they fail, saying so: they
never skip, so a CI machine that cannot run them is noticed.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import orjson
import pytest
from servers import SUPPORT, worker_env

WORKER = SUPPORT / "resource_worker.py"
# Each scenario takes about a second; a hang (a commit that never returns) fails the test.
TIMEOUT_S = 60.0
MOUNT_FAILED = 97
TMPFS_SIZE = "1m"

Report = dict[str, dict[str, Any]]


@functools.cache
def _scenario(name: str) -> Report | str:
    """Run one worker scenario once per session; its steps by name, or why it could not run."""
    if os.geteuid() != 0:
        return (f"resource-fault tests need root (to mount a private tmpfs in a mount "
                f"namespace, and to run a writer as uid 65534): euid={os.geteuid()}")
    missing = [tool for tool in ("unshare", "mount") if shutil.which(tool) is None]
    if missing:
        return f"resource-fault tests need util-linux tools on PATH: missing={','.join(missing)}"
    # Under /tmp, made traversable: the unprivileged writer must reach the mount point.
    top = tempfile.mkdtemp(prefix="apersist-resource-")
    try:
        os.chmod(top, 0o755)
        script = ('mount -t tmpfs -o "size=$2,mode=0755" apersist-resource "$1" '
                  f'|| exit {MOUNT_FAILED}; exec "$3" "$4" "$5" "$1"')
        try:
            proc = subprocess.run(
                ["unshare", "-m", "sh", "-c", script, "sh", top, TMPFS_SIZE, sys.executable,
                 str(WORKER), name], capture_output=True, timeout=TIMEOUT_S, check=False,
                env=worker_env())
        except subprocess.TimeoutExpired as exc:
            return (f"resource worker hung: scenario={name} timeout_s={TIMEOUT_S}\nstdout tail:\n"
                    f"{(exc.stdout or b'')[-3000:].decode(errors='replace')}")
    finally:
        # The tmpfs lived in the worker's namespace only: out here the directory is empty.
        os.rmdir(top)
    stderr = proc.stderr.decode(errors="replace")[-4000:]
    if proc.returncode != 0:
        why = ("mounting a tmpfs in a private mount namespace failed (needs root with "
               "CAP_SYS_ADMIN and unshare)"
               if proc.returncode in (1, MOUNT_FAILED) and b'"step"' not in proc.stdout
               else "resource worker failed")
        return f"{why}: scenario={name} returncode={proc.returncode}\nstderr:\n{stderr}"
    report: Report = {}
    for line in proc.stdout.splitlines():
        doc = orjson.loads(line)
        report[doc.pop("step")] = doc
    if "end" not in report:
        return f"resource worker stopped early: scenario={name} steps={list(report)}\n{stderr}"
    return report


def scenario(name: str) -> Report:
    report = _scenario(name)
    if isinstance(report, str):
        pytest.fail(report, pytrace=False)
    return report


def assert_backend_error(error: dict[str, Any] | None, code: str, *, verb: str = "put",
                         key: str = "", path: str | None = None) -> str:
    """A ``BackendError`` (not a bare OSError) caused by errno ``code``, saying what failed
    on which key; returns the message."""
    assert error is not None, "expected a BackendError, nothing was raised"
    message: str = error["message"]
    assert error["backend_error"], f"{error['type']} is not a BackendError: {message}"
    assert not error["os_error"], f"a BackendError that is also an OSError: {message}"
    assert error["cause_errno"] == code, message
    reason = {"ENOSPC": "no space left on device", "EACCES": "permission denied",
              "EROFS": "read-only file system"}[code]
    label = "prefix" if verb == "list" else "key"
    assert re.match(rf"filesystem {verb} failed: {reason}: {label}={re.escape(key)}\S* "
                    rf"errno={code}( |$)", message), message
    if path is not None:
        assert f" path={path}" in message, message
    return message


def assert_events(facts: dict[str, Any], n: int) -> None:
    """The replay is events 0..n-1, each once, in order, at its own offset; no part of more."""
    assert facts["error"] is None, facts["error"]
    assert facts["events"] == [[i, i] for i in range(n)], (
        f"expected events 0..{n - 1}, got {len(facts['events'])}: {facts['events'][-3:]}")
    assert facts["offset"] == (n - 1 if n else None)


def recovered_count(acked: int, attempted: int, replayed: list[Any]) -> int:
    """A failed commit is all or nothing: the store holds what was acknowledged, or that
    plus the whole failed commit if it became durable all the same."""
    n = len(replayed)
    assert n in (acked, attempted), (
        f"a later run replays {n} events: expected the {acked} acknowledged ones, or all "
        f"{attempted} if the failed commit landed whole")
    return n


def assert_recovered(recover: dict[str, Any], n: int, extra: int) -> None:
    """A later writable run replays exactly ``n`` events, commits ``extra`` more; everything
    verifies."""
    assert_events(recover["writable"], n)
    assert recover["writable"]["stage"] == "done"
    assert recover["writable"]["commit"]["deltas"] == extra
    assert_events(recover["final"], n + extra)
    assert recover["verify"] == [], recover["verify"]


# --------------------------------------------------------------------------- disk full
def test_disk_full_ends_the_run_with_a_backend_error_naming_key_and_errno() -> None:
    fill = scenario("enospc")["fill"]
    assert fill["acked"] > 0, "the first commit already failed: the tmpfs is too small"
    assert fill["attempted"] > fill["acked"]
    assert_backend_error(fill["commit_error"], "ENOSPC", key="writers/0/")
    # The run is over: recording raises the same error, and the block is left by it
    # (not by an OSError, an exception group or a hang).
    assert fill["record_after_same"] is True
    assert fill["stage"] == "body"
    assert fill["error"] == fill["commit_error"]


def test_disk_full_leaves_no_temporary_files() -> None:
    report = scenario("enospc")
    for step in ("fill", "full_disk", "commit_record"):
        assert report[step]["tmp_files"] == [], (step, report[step]["tmp_files"])


def test_a_full_disk_still_replays_and_refuses_a_new_writer_at_open() -> None:
    report = scenario("enospc")
    fill, full = report["fill"], report["full_disk"]
    n = recovered_count(fill["acked"], fill["attempted"], full["replay"]["events"])
    assert full["replay"]["stage"] == "done"
    assert_events(full["replay"], n)
    # Taking the writer role writes an epoch record: on a full disk that fails at open.
    assert full["writer"]["stage"] == "open"
    assert_backend_error(full["writer"]["error"], "ENOSPC", key="writers/0/epochs/")


def test_a_commit_whose_record_does_not_fit_never_becomes_visible() -> None:
    report = scenario("enospc")
    step = report["commit_record"]
    n = len(report["full_disk"]["replay"]["events"])
    assert_events({**step, "error": None}, n)  # what that run replayed on opening
    assert step["stage"] == "body"
    assert_backend_error(step["error"], "ENOSPC", key="writers/0/commits/")
    # The segment landed in the one free page; only the commit naming it did not.
    assert len(step["new_segments"]) == 1, step["new_segments"]
    recover = report["recover"]
    assert len(recover["writable"]["events"]) == n, "the uncommitted event became visible"
    # The orphaned segment is garbage that gc may reclaim, not a problem for anyone.
    assert recover["garbage"] == [f"writers/0/segments/{step['new_segments'][0]}"]


def test_with_space_back_a_new_run_recovers_every_acknowledged_commit_and_goes_on() -> None:
    report = scenario("enospc")
    fill, recover = report["fill"], report["recover"]
    n = recovered_count(fill["acked"], fill["attempted"], recover["writable"]["events"])
    assert_recovered(recover, n, extra=25)
    # Temporary files a crash left behind are neither listed, replayed nor verified; and
    # no run added any.
    assert recover["tmp_files"] == recover["planted"]


# --------------------------------------------------------------------------- permission denied
def test_opening_a_root_the_user_cannot_write_fails_at_open_naming_the_path() -> None:
    report = scenario("eacces")
    top = report["start"]["top"]
    unwritable = report["open_unwritable"]
    assert unwritable["stage"] == "open"
    assert_backend_error(unwritable["error"], "EACCES", key="writers/0/epochs/",
                         path=f"{top}/ro-store/writers/0/epochs/.tmp-")
    uncreatable = report["open_uncreatable"]
    assert uncreatable["stage"] == "open"
    # The root does not exist and its parent may not be written: the mkdir names it.
    assert_backend_error(uncreatable["error"], "EACCES", key="writers/0/epochs/",
                         path=f"{top}/locked/new-store")
    # Failing to open harmed nothing and left nothing behind.
    assert report["after"]["ro_store_unchanged"] is True
    assert report["after"]["locked_entries"] == []
    assert report["after"]["child_status"] == 0


def test_a_read_only_run_replays_a_root_the_user_cannot_write() -> None:
    step = scenario("eacces")["replay_unwritable"]
    assert step["stage"] == "done"
    assert_events(step, 40)
    # REPLAY writes nothing: commit() returns the last seq with nothing in it.
    assert step["commit"]["deltas"] == 0
    assert step["commit"]["bytes"] == 0
    assert step["commit"]["seq"] >= 1


def test_a_root_the_user_cannot_read_is_an_error_not_an_empty_store() -> None:
    report = scenario("eacces")
    step = report["open_unreadable"]
    # Listing used to swallow EACCES (os.walk ignores errors), so this replayed nothing.
    # Opening first lists the checkpoints (format 4.0): that listing is refused.
    for run in ("replay", "writer"):
        assert step[run]["stage"] == "open", (run, step[run])
        assert_backend_error(step[run]["error"], "EACCES", verb="list",
                             key="writers/0/checkpoints/",
                             path=f"{report['start']['top']}/secret-store")


def test_an_unreadable_segment_fails_the_replay_naming_it() -> None:
    step = scenario("eacces")["segment_unreadable"]
    assert step["stage"] == "body"
    message = assert_backend_error(step["error"], "EACCES", verb="get",
                                   key="writers/0/segments/")
    key = message.partition(" key=")[2].partition(" ")[0]
    assert f"/segment-store/{key} " in message, message


def test_a_root_made_read_only_mid_run_ends_the_run_and_loses_nothing() -> None:
    report = scenario("eacces")
    step = report["read_only_midrun"]
    assert step["acked"] > 0
    assert_backend_error(step["commit_error"], "EACCES", key="writers/0/",
                         path=f"{report['start']['top']}/user-store/writers/0/")
    assert step["record_after_same"] is True
    assert step["stage"] == "body"
    assert step["error"] == step["commit_error"]
    assert step["tmp_files"] == []
    n = recovered_count(step["acked"], step["attempted"], report["recover"]["writable"]["events"])
    # While still read-only, a read-only run sees the same as the later writable one.
    assert_events(step["replay_while_read_only"], n)
    assert_recovered(report["recover"], n, extra=10)
    assert report["recover"]["tmp_files"] == []


# --------------------------------------------------------------------------- read-only filesystem
def test_a_filesystem_remounted_read_only_mid_run_ends_the_run_and_loses_nothing() -> None:
    report = scenario("erofs")
    step = report["read_only_midrun"]
    assert step["acked"] > 0
    assert_backend_error(step["commit_error"], "EROFS", key="writers/0/")
    assert step["record_after_same"] is True
    assert step["error"] == step["commit_error"]
    assert step["tmp_files"] == []
    n = recovered_count(step["acked"], step["attempted"], report["recover"]["writable"]["events"])
    assert_recovered(report["recover"], n, extra=10)


def test_a_read_only_run_replays_a_read_only_filesystem() -> None:
    report = scenario("erofs")
    step = report["read_only_fs"]
    n = len(report["recover"]["writable"]["events"])
    assert step["replay"]["stage"] == "done"
    assert_events(step["replay"], n)
    assert step["replay"]["commit"]["deltas"] == 0
    assert step["writer"]["stage"] == "open"
    assert_backend_error(step["writer"]["error"], "EROFS", key="writers/0/epochs/")


def test_background_commits_that_fail_end_recording_and_keep_what_was_durable() -> None:
    step = scenario("erofs")["background"]
    assert step["stage"] == "body"
    assert_backend_error(step["error"], "EROFS", key="writers/0/")
    durable = step["durable_offset"]
    assert durable is not None, "no commit finished before the remount"
    replayed = len(step["recover"]["writable"]["events"])
    # stream.offset is the latest commit the run saw finish; one in flight at the fault
    # may have landed whole, never in part.
    assert durable + 1 <= replayed <= step["recorded"]
    assert_recovered(step["recover"], replayed, extra=5)


def test_leaving_a_run_whose_final_commit_fails_raises_the_backend_error() -> None:
    step = scenario("erofs")["exit"]
    assert step["stage"] == "exit"
    assert_backend_error(step["error"], "EROFS", key="writers/0/segments/")
    assert_recovered(step["recover"], 0, extra=5)
