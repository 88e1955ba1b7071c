"""``stop_on_signals``, end to end: a real process stopped with SIGTERM mid-stream exits 0
within a bound, and its restart replays exactly what it processed, then resumes the source
right after it. On every durable backend."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_backend
from servers import SUPPORT, backend_spec, worker_env

# The worker is another process: memory stores cannot take part.
DURABLE_KINDS = ["filesystem", "s3", "azure"]
STOP_BOUND_S = 20.0  # from SIGTERM to exit, on a loaded 2-core CI machine


def _run_check(spec: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(SUPPORT / "stop_worker.py"), spec, "--check"],
                         env=worker_env(), capture_output=True, timeout=120, check=True)
    lines = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert lines, out.stderr.decode()
    assert lines[-1]["ev"] == "check", out.stderr.decode()
    return lines[-1]


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("kind", DURABLE_KINDS)
def test_a_signal_ends_the_run_cleanly_and_the_restart_resumes_after_it(
        kind: str, stop_with: signal.Signals, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    spec = backend_spec(make_backend(kind, tmp_path, request))
    worker = subprocess.Popen([sys.executable, str(SUPPORT / "stop_worker.py"), spec],
                              env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert worker.stdout is not None
    try:
        for raw in worker.stdout:  # mid-stream: once 300 events are processed
            doc = orjson.loads(raw)
            if doc["ev"] == "progress" and doc["n"] >= 300:
                break
        else:
            pytest.fail(f"the worker never got going: {worker.stderr.read().decode()}")  # type: ignore[union-attr]
        sent = time.monotonic()
        worker.send_signal(stop_with)
        rest, err = worker.communicate(timeout=STOP_BOUND_S)
        took = time.monotonic() - sent
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, err.decode()
    assert took < STOP_BOUND_S
    docs = [orjson.loads(line) for line in rest.splitlines()]
    stopped = next(d for d in docs if d["ev"] == "stopped")
    assert docs[-1] == {"ev": "done"}
    n, last = stopped["n"], stopped["last"]
    assert n >= 300
    assert last == n - 1

    found = _run_check(spec)
    assert found["replayed"] == list(range(n))  # exactly what was processed, once
    assert found["counts"] == {"n": n, "sum": n * (n - 1) // 2}
    assert found["offset"] == last  # the reader resumes right after it
    assert found["first_live"] == last + 1
