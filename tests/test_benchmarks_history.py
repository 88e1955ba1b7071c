"""``benchmarks/history.py`` still runs end to end (a smoke run; its numbers are not judged)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


def test_history_smoke_run(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "benchmarks.history", "--quick", "--commits", "30",
            "--paced-seconds", "1", "--json", "--dir", str(tmp_path)]
    # The apersist of this checkout, whatever the installed one is.
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    doc = orjson.loads(done.stdout)
    [fs] = doc["results"]
    assert fs["backend"] == "filesystem"
    assert fs["errors"] == []
    [row] = fs["history"]
    for step in ("long", "baseline", "after"):
        assert row[step]["replayed"] == 30
        assert row[step]["open_s"] > 0
    assert row["build"]["commits"] == 30
    assert row["baseline_build"]["commits"] == 1
    assert row["objects"]["objects"] > row["baseline_objects"]["objects"] > 0
    assert row["objects_after"]["objects"] > 0
    [paced] = fs["paced"]
    assert paced["commits"] > 0
    assert paced["window"]["driver"]["total"] > 0
    assert paced["driver_per_hour"] > 0
    # Nothing is left behind in the working directory.
    assert list(tmp_path.iterdir()) == []
