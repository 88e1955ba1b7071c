"""Moved into the suite: ``python -m benchmarks --only backends`` (see benchmarks/README.md).

Kept so that ``python benchmarks/bench_backends.py [--quick] [--backends s3,azure] ...``
still works: it runs the suite's object-store workloads on S3 (moto) and Azure (Azurite).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import main  # imported after the path is set

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a == "--backends" or a.startswith("--backends=") for a in args):
        args = ["--backends", "s3,azure", *args]
    sys.exit(main(["--only", "backends", *args]))
