"""Moved into the suite: ``python -m benchmarks`` (see benchmarks/README.md).

Kept so that ``python benchmarks/bench_core.py [--quick] [--events N] ...`` still works: it
runs the suite's filesystem workloads that this script used to measure (record, replay,
stall, commit latency), with the suite's options and outputs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import main  # imported after the path is set

if __name__ == "__main__":
    sys.exit(main(["--backends", "filesystem", "--only", "record,replay,stall,commit",
                   *sys.argv[1:]]))
