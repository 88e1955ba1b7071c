"""The suite's headline job done by Pathway: run by the Pathway venv's python, not apersist's.

    python pathway_job.py record  --rows N --dir STORE   # emit N rows, persisted
    python pathway_job.py restore --rows N --dir STORE   # the same program, nothing new to read

A Python connector (``pw.io.python.ConnectorSubject``) emits rows
``{"k": i % 1000, "v": i, "s": "abc"}``; the pipeline keeps a count and a sum of ``v`` per
``k`` (``groupby(k).reduce(count, sum(v))``); persistence is on the filesystem with
``snapshot_interval_ms=0``. ``restore`` runs the same program over the same persistence
directory with a subject that has nothing new to emit, as apersist's restore runs its
reader, which resumes after the last offset: Pathway replays its input snapshot and
rebuilds the groupby state from it.

It prints one JSON line: the wall seconds of ``pw.run`` (the graph built before it is not
counted: it is the same before and after a restart), the seconds of the whole process
until then (imports included), the per-key state it ended with (checked against the
expected one) and the store's size in bytes. This file imports nothing from apersist or
the suite: it runs in a virtualenv of its own (``benchmarks/peers/__init__.py`` makes it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

STARTED = time.perf_counter()

import pathway as pw  # noqa: E402 (the import is part of what the process costs)
from pathway.internals.table_subscription import subscribe  # noqa: E402

KEYS = 1000


class Rows(pw.io.python.ConnectorSubject):
    """Emits rows ``first .. rows - 1`` and ends (a finite source)."""

    def __init__(self, first: int, rows: int) -> None:
        super().__init__()
        self.first, self.rows = first, rows

    def run(self) -> None:
        emit = self.next
        for i in range(self.first, self.rows):
            emit(k=i % KEYS, v=i, s="abc")


class Schema(pw.Schema):
    k: int
    v: int
    s: str


def store_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("mode", choices=("record", "restore"))
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--dir", required=True, help="the persistence directory")
    args = parser.parse_args()
    first = args.rows if args.mode == "restore" else 0  # restore: the input is all consumed
    rows = pw.io.python.read(Rows(first, args.rows), schema=Schema, name="input")
    counts = rows.groupby(pw.this.k).reduce(pw.this.k, count=pw.reducers.count(),
                                            total=pw.reducers.sum(pw.this.v))
    state: dict[int, tuple[int, int]] = {}

    def on_change(key: object, row: dict[str, int], time: int, is_addition: bool) -> None:
        if is_addition:  # an update is a retraction and an addition of the key's row
            state[row["k"]] = (row["count"], row["total"])

    # Pathway's own subscribe skips what a restored run recomputes (its output was sent
    # before the restart); the internal one can say not to, so that the restored state
    # is seen and checked. 1,000 rows either way: nothing next to the job.
    subscribe(counts, skip_persisted_batch=False, on_change=on_change)
    config = pw.persistence.Config(pw.persistence.Backend.filesystem(args.dir),
                                   snapshot_interval_ms=0)
    started = time.perf_counter()
    pw.run(persistence_config=config, monitoring_level=pw.MonitoringLevel.NONE)
    ran = time.perf_counter() - started
    rows_seen = sum(count for count, _ in state.values())
    total = sum(t for _, t in state.values())
    expected = args.rows * (args.rows - 1) // 2
    print(json.dumps({
        "mode": args.mode, "rows": args.rows, "run_s": ran,
        "process_s": time.perf_counter() - STARTED, "keys": len(state), "rows_seen": rows_seen,
        "state_ok": rows_seen == args.rows and total == expected, "store_bytes": store_bytes(args.dir),
        "pathway": pw.__version__, "python": sys.version.split()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
