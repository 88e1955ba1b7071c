"""The README's demo, end to end: kill -9 part-way, restart, same result as uninterrupted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_survives_sigkill_with_the_exact_result(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "apersist._cli", "demo", "--events", "30000",
         "--store", str(tmp_path / "store")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "killed with SIGKILL" in proc.stdout
    assert "OK: the killed-and-restarted run gives exactly the uninterrupted result" in proc.stdout
    replay_line = next(line for line in proc.stdout.splitlines() if "replayed" in line)
    replayed = int(replay_line.split("replayed ")[1].split(" ")[0].replace(",", ""))
    assert 0 < replayed < 30000  # the restart really replayed part of the input
