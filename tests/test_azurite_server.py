"""The test Azure server: Azurite runs without its periodic garbage collection, whose sweep
froze the server for minutes near the end of a CI run (why: ``azurite_no_gc.js``). This
checks that the wrapper still postpones it with the Azurite that .ci/test installs.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from servers import _serve, azurite_bin, azurite_command

# BlobGCManager logs this line after its first sweep, which runs as the server starts.
GC_SLEEP = re.compile(r"markSweepLoop\(\) Sleep for (\d+)ms")


def gc_interval_ms(argv_head: list[str], tmp_path: Path, name: str) -> int:
    """The delay before a second sweep, as the server started by ``argv_head`` logs it."""
    debug = tmp_path / f"{name}-debug.log"
    argv = [*argv_head, "--silent", "--disableTelemetry", "--inMemoryPersistence",
            "--blobHost", "127.0.0.1", "--blobPort", "{port}", "--debug", str(debug)]
    with _serve(name, argv, tmp_path / f"{name}.log"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = GC_SLEEP.search(debug.read_text(errors="replace")) if debug.exists() else None
            if found:
                return int(found.group(1))
            time.sleep(0.1)
    raise AssertionError(f"{name} logged no garbage collection schedule in 30 s: {debug}")


def test_the_tests_azurite_never_runs_its_periodic_garbage_collection(tmp_path: Path) -> None:
    # Azurite as installed collects every 10 minutes: the reason for the wrapper.
    assert gc_interval_ms([azurite_bin()], tmp_path, "azurite-as-installed") == 10 * 60 * 1000
    # Started the way the tests and benchmarks start it: not for 24.8 days (setTimeout's most).
    assert gc_interval_ms(azurite_command(), tmp_path, "azurite-for-tests") == 2**31 - 1
