"""The ``apersist`` command line: inspect, verify, dump, compact and gc a store; run the demo."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

from . import _format as fmt
from ._config import AwsS3Settings, Backend, Config, Retention, SnapshotAccess
from ._drivers import open_driver
from ._errors import PersistenceError
from ._gc import collect_garbage
from ._inspect import summarize, verify
from ._run import run

__all__ = ["backend_from_root", "main"]


def backend_from_root(root: str) -> Backend:
    """``s3://bucket/prefix``, ``az://container/prefix`` or a filesystem path.

    Credentials come from the usual environment variables: the AWS chain for S3;
    ``AZURE_STORAGE_ACCOUNT``, ``AZURE_STORAGE_KEY`` and optionally
    ``AZURE_STORAGE_ENDPOINT`` for Azure.
    """
    if root.startswith("s3://"):
        bucket, _, prefix = root[5:].partition("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        settings = AwsS3Settings(
            bucket, region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
            endpoint=endpoint, with_path_style=endpoint is not None)
        return Backend.s3(prefix, settings)
    if root.startswith("az://"):
        container, _, prefix = root[5:].partition("/")
        account = os.environ.get("AZURE_STORAGE_ACCOUNT", "")
        key = os.environ.get("AZURE_STORAGE_KEY", "")
        if not account or not key:
            raise ValueError("az:// roots need AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY")
        return Backend.azure(prefix, account, key, container,
                             endpoint=os.environ.get("AZURE_STORAGE_ENDPOINT"))
    if not os.path.isdir(root):
        raise ValueError(f"no store directory at this path: root={root}")
    return Backend.filesystem(root)


def _print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


async def _inspect(root: str, as_json: bool) -> int:
    driver = open_driver(backend_from_root(root))
    try:
        report = await summarize(driver)
    finally:
        await driver.aclose()
    if as_json:
        _print_json(report.to_json())
        return 0
    print(f"store: {root}")
    print(f"commits: {report.commits} live, last seq {report.last_seq}; "
          f"writer epoch {report.epoch}; {report.stored_bytes} bytes stored")
    print(report.writer_line())
    print(f"streams ({len(report.streams)}):")
    for name, info in report.streams.items():
        print(f"  {name}: {info['records']} events in {info['segments']} segments, "
              f"{info['bytes']} bytes, offset {orjson.dumps(info['offset']).decode()}")
    print(f"tables ({len(report.tables)}):")
    for name, info in report.tables.items():
        print(f"  {name}: {info['snapshot_records']} snapshot records + "
              f"{info['delta_records']} deltas, {info['bytes']} bytes")
    print(f"cache: {report.cache['records']} entries, {report.cache['bytes']} bytes")
    return 0


async def _verify(root: str) -> int:
    driver = open_driver(backend_from_root(root))
    try:
        problems = await verify(driver)
    finally:
        await driver.aclose()
    for line in problems:
        print(f"damaged: {line}")
    if problems:
        print(f"verify failed: {len(problems)} damaged object(s)", file=sys.stderr)
        return 1
    print("verify ok: every live object checked")
    return 0


async def _dump(root: str, stream: str) -> int:
    config = Config(backend_from_root(root), snapshot_access=SnapshotAccess.REPLAY)
    out = sys.stdout.buffer
    async with run(config) as r:
        async for event in r.stream(stream).replay():
            out.write(orjson.dumps({"value": event.value, "offset": event.offset,
                                   "time_ms": event.time_ms}) + b"\n")
    out.flush()
    return 0


async def _compact(root: str, max_events: int | None, max_age_ms: int | None) -> int:
    retention = Retention(max_events=max_events, max_age_ms=max_age_ms)
    async with run(Config(backend_from_root(root), retention=retention)) as r:
        tables = r._store.table_names()
        await r.compact()  # opens every table of the store to fold it
        segments = sum(len(r._store.segments(kind, name)) for kind in sorted(fmt.KINDS)
                       for name in r._store.log_names(kind))
        print(f"compacted {len(tables)} table(s); {segments} live segment(s); checkpoint at "
              f"seq {r._store.checkpoint_seq}; last seq {r._store.last_seq}")
    return 0


async def _gc(root: str, dry_run: bool, grace_s: float) -> int:
    driver = open_driver(backend_from_root(root))
    try:
        # gc's own clock dates the garbage (see apersist/_gc.py); writers' clocks never do.
        plan = await collect_garbage(driver, grace_ms=round(grace_s * 1000),
                                     now_ms=time.time_ns() // 1_000_000, dry_run=dry_run)
    finally:
        await driver.aclose()
    if plan.damaged_marker is not None:
        print(f"apersist gc: the gc marker is damaged and was {'not ' if dry_run else ''}"
              f"replaced; every garbage key counts as first seen now: "
              f"{plan.damaged_marker}", file=sys.stderr)
    would = "would " if dry_run else ""
    for key in plan.due:
        print(f"{would}delete {key}")
    new = set(plan.new)
    for key, seen in plan.waiting.items():
        left_s = (seen + plan.grace_ms - plan.now_ms) / 1000
        if key in new:
            print(f"{would}mark {key} (deletable in {left_s:.0f} s)")
        else:
            print(f"keep {key} (first seen {(plan.now_ms - seen) / 1000:.0f} s ago, "
                  f"deletable in {left_s:.0f} s)")
    if dry_run:
        print(f"{len(plan.due)} garbage object(s) would be deleted, "
              f"{len(plan.waiting)} marked; nothing written (dry run)")
    else:
        print(f"{len(plan.due)} garbage object(s) deleted, {len(plan.waiting)} marked "
              f"(deleted by a later gc once garbage for {grace_s:g} s)")
    return 0


def _grace_seconds(text: str) -> float:
    """``--grace-seconds``: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"the grace period must be a number of seconds, 0 or more: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apersist", description="Inspect and maintain apersist stores; run the demo.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="commits, streams, offsets, tables, sizes, writer epoch")
    p.add_argument("root", help="a directory, s3://bucket/prefix or az://container/prefix")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p = sub.add_parser("verify", help="read and check every live object")
    p.add_argument("root")
    p = sub.add_parser("dump", help="one JSON line per committed event of a stream")
    p.add_argument("root")
    p.add_argument("stream")
    p = sub.add_parser("compact", help="all maintenance: fold tables, merge small segments, drop "
                                       "old cache versions, checkpoint (takes the writer role: "
                                       "a running writer is fenced)")
    p.add_argument("root")
    p.add_argument("--max-events", type=int, default=None,
                   help="retention of every stream: keep its last N events (0: offsets only)")
    p.add_argument("--max-age-ms", type=int, default=None,
                   help="retention of every stream: keep the events this recent, by this "
                        "machine's clock")
    p = sub.add_parser("gc", help="mark what no checkpoint or live commit needs (old segments, "
                                  "folded commit records, old checkpoints, leftovers); delete "
                                  "what was marked at least the grace period ago")
    p.add_argument("root")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be deleted and marked; write and delete nothing")
    p.add_argument("--grace-seconds", type=_grace_seconds, default=3600.0,
                   help="delete an object only once an earlier gc run saw it as garbage at "
                        "least this long ago, by gc's own clock, so that readers that opened "
                        "before it became garbage keep it (default 3600; 0 deletes at once)")
    p = sub.add_parser("demo", help="word counts persisted on the filesystem, killed with "
                                    "SIGKILL part-way, restarted, checked")
    p.add_argument("--events", type=int, default=200_000, help="events in the input stream")
    p.add_argument("--store", help="store directory (default: a new temporary directory)")
    p.add_argument("--seed", type=int, default=7)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``apersist`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return asyncio.run(_inspect(args.root, args.json))
        if args.command == "verify":
            return asyncio.run(_verify(args.root))
        if args.command == "dump":
            return asyncio.run(_dump(args.root, args.stream))
        if args.command == "compact":
            return asyncio.run(_compact(args.root, args.max_events, args.max_age_ms))
        if args.command == "gc":
            return asyncio.run(_gc(args.root, args.dry_run, args.grace_seconds))
        from ._demo import run_demo  # the demo pulls in subprocess handling; load it lazily

        return run_demo(events=args.events, store=args.store, seed=args.seed)
    except (PersistenceError, ValueError) as exc:
        print(f"apersist {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
