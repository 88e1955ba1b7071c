"""The ``apersist`` command line: inspect, verify, dump, salvage, compact and gc a store; run
the demo.

Every command takes ``--json`` (one JSON document on stdout) and ``--debug`` (tracebacks and
the ``apersist`` logger's DEBUG lines on stderr). Exit codes: 0 success, 1 damage found,
2 a usage error, a root that holds no store, or any other failure; 130 interrupted; 141
stdout closed by its reader (``| head``). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import re
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import orjson

from . import __version__
from . import _format as fmt
from ._config import AwsS3Settings, AzureBackend, Backend, Config, FilesystemBackend, Retention, S3Backend
from ._drivers import Driver, open_driver
from ._dump import dump_stream, dump_table, resolve
from ._errors import CorruptDataError, PersistenceError
from ._gc import collect_garbage
from ._inspect import summarize, verify
from ._progress import CountingDriver, progress_bar
from ._recover import Damage, is_store, lost_commit_log, open_readable
from ._run import run
from ._salvage import LogReport, SalvageReport, salvage

__all__ = ["NotAStoreError", "backend_from_root", "main"]

# Exit codes, documented in docs/api.md ("The apersist command line").
EXIT_OK = 0
EXIT_DAMAGE = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141  # as a process killed by SIGPIPE: 128 + 13

# Keys of the inspect report that the text output prints in its own lines; any other key
# (added by a newer report) is printed generically after them.
_INSPECT_KEYS = frozenset({"last_seq", "live_commits", "writer_epoch", "stored_bytes", "writer", "streams",
                           "tables", "cache"})


# A root that looks like a URL (``scheme:/...``; a scheme of two letters or more, so that a
# Windows drive letter is still a path).
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")


class NotAStoreError(ValueError):
    """The root holds no apersist store (a mistyped path or prefix, most likely)."""


def backend_from_root(root: str, *, create: bool = False) -> Backend:
    """``s3://bucket/prefix``, ``az://container/prefix`` or a filesystem path.

    Credentials come from the usual environment variables: the AWS chain for S3;
    ``AZURE_STORAGE_ACCOUNT``, ``AZURE_STORAGE_KEY`` and optionally
    ``AZURE_STORAGE_ENDPOINT`` for Azure. A filesystem directory must exist, unless
    ``create`` (the destination of ``salvage``).
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
    if _URL_RE.match(root):
        # A mistyped scheme (gs://, S3://, s3:/) would otherwise be a local directory, and
        # salvage would write its store there.
        raise ValueError(f"unknown scheme: a root is s3://bucket/prefix, az://container/prefix "
                         f"or a directory: root={root}")
    if create:
        if os.path.exists(root) and not os.path.isdir(root):
            raise ValueError(f"not a directory: root={root}")
        return Backend.filesystem(root)
    if not os.path.isdir(root):
        raise ValueError(f"no store directory at this path: root={root}")
    return Backend.filesystem(root)


class _Output:
    """Where a command's results go: text lines, or one JSON document (``--json``)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.doc: dict[str, Any] = {}

    def line(self, text: str) -> None:
        if not self.as_json:
            sys.stdout.write(text + "\n")

    def warn(self, text: str) -> None:
        _say(text)

    def finish(self) -> None:
        if self.as_json:
            sys.stdout.buffer.write(orjson.dumps(self.doc, option=orjson.OPT_INDENT_2) + b"\n")


@contextlib.asynccontextmanager
async def _open_store(root: str, *, allow_empty: bool = False,
                      counting: str | None = None) -> AsyncIterator[Driver]:
    """The driver of ``root``'s store, closed on leaving; ``NotAStoreError`` if nothing of
    a store is there.

    With ``counting``, the driver moves a progress bar of that name by every object it
    reads, lists, writes or deletes.
    """
    driver: Driver = open_driver(backend_from_root(root))
    try:
        if not allow_empty and not await is_store(driver):
            raise NotAStoreError(f"no apersist store at this root (no epoch, commit or checkpoint "
                                 f"record under writers/{fmt.WRITER}/): root={root}")
        if counting is not None:
            driver = CountingDriver(driver, progress_bar(counting, unit="object"))
        yield driver
    finally:
        await driver.aclose()


# ----------------------------------------------------------------------------- commands


async def _inspect(args: argparse.Namespace, out: _Output) -> int:
    async with _open_store(args.root, allow_empty=args.allow_empty) as driver:
        report = await summarize(driver)
    doc = report.to_json()
    out.doc = doc
    out.line(f"store: {args.root}")
    out.line(f"commits: {report.commits} live, last seq {report.last_seq}; "
             f"writer epoch {report.epoch}; {report.stored_bytes} bytes stored")
    out.line(report.writer_line())
    out.line(f"streams ({len(report.streams)}):")
    for name, info in report.streams.items():
        out.line(f"  {name}: {info['records']} events in {info['segments']} segments, "
                 f"{info['bytes']} bytes, offset {orjson.dumps(info['offset']).decode()}")
    out.line(f"tables ({len(report.tables)}):")
    for name, info in report.tables.items():
        out.line(f"  {name}: {info['snapshot_records']} snapshot records + "
                 f"{info['delta_records']} deltas, {info['bytes']} bytes")
    out.line(f"cache: {report.cache['records']} entries, {report.cache['bytes']} bytes")
    for key, value in doc.items():
        if key not in _INSPECT_KEYS:
            out.line(f"{key}: {orjson.dumps(value).decode()}")
    return EXIT_OK


async def _verify(args: argparse.Namespace, out: _Output) -> int:
    async with _open_store(args.root, counting="verify") as driver:
        problems = await verify(driver)
    damaged = [Damage.of(CorruptDataError(p), "") for p in problems]
    out.doc = {"ok": not problems, "damaged": [d.to_json() for d in damaged]}
    for line in problems:
        out.line(f"damaged: {line}")
    if problems:
        out.warn(f"apersist verify: {len(problems)} damaged object(s)")
        return EXIT_DAMAGE
    out.line("verify ok: every live object checked")
    return EXIT_OK


async def _dump(args: argparse.Namespace, out: _Output) -> int:
    async with _open_store(args.root) as driver:
        opened = await open_readable(driver)
        kind = resolve(opened, args.name, table=args.table)
        items: list[dict[str, Any]] = []
        stdout = sys.stdout.buffer
        # Text: one JSON line per item, written as it is read. JSON: one document, so the
        # items are gathered.
        emit: Callable[[dict[str, Any]], Any] = items.append if out.as_json else (
            lambda item: stdout.write(orjson.dumps(item) + b"\n"))
        dump = dump_table if kind == "table" else dump_stream
        result = await dump(opened, args.name, emit)
        stdout.flush()
    out.doc = {"name": result.name, "kind": result.kind, "count": result.count,
               "items": items, "complete": not result.damage,
               "damage": [d.to_json() for d in result.damage]}
    if result.damage:
        first = result.damage[0]
        noun = "events" if kind == "stream" else "rows"
        printed = (f"the {result.count} {noun} before the damage were printed" if result.cut
                   else f"all {result.count} {noun} were printed: the damage lost none")
        # The log's own damage comes first; without any, the damage is the store's (an
        # epoch record, a commit record), not this log's.
        subject = f"{kind} {args.name}" if len(result.damage) > len(opened.damage) else "the store"
        out.warn(f"apersist dump: {subject} is damaged; {printed}: {first.message}")
        for more in result.damage[1:]:
            out.warn(f"apersist dump: also damaged: {more.message}")
        return EXIT_DAMAGE
    return EXIT_OK


def _inside(dest: Backend, root: Backend) -> bool:
    """Whether the store at ``dest`` would lie inside the one at ``root`` (or be it)."""
    def parts(prefix: str) -> list[str]:
        return [p for p in prefix.split("/") if p]

    if isinstance(dest, FilesystemBackend) and isinstance(root, FilesystemBackend):
        return dest.path.resolve().is_relative_to(root.path.resolve())
    if isinstance(dest, S3Backend) and isinstance(root, S3Backend):
        same = (dest.bucket_settings.bucket_name, dest.bucket_settings.endpoint) == (
            root.bucket_settings.bucket_name, root.bucket_settings.endpoint)
    elif isinstance(dest, AzureBackend) and isinstance(root, AzureBackend):
        same = (dest.account, dest.container, dest.endpoint) == (
            root.account, root.container, root.endpoint)
    else:
        return False
    inner, outer = parts(dest.root_path), parts(root.root_path)
    return same and inner[:len(outer)] == outer


async def _salvage(args: argparse.Namespace, out: _Output) -> int:
    dest_backend = backend_from_root(args.dest, create=True)
    if _inside(dest_backend, backend_from_root(args.root)):
        # The new store would be mixed into the damaged one's tree: removing the damaged
        # store, the next step, would remove it too.
        raise ValueError(f"the destination of a salvage must not be inside the store it "
                         f"salvages: root={args.root} dest={args.dest}")
    async with _open_store(args.root) as source:
        dest: Driver = open_driver(dest_backend)
        try:
            report = await salvage(source, dest)
        finally:
            await dest.aclose()
    out.doc = report.to_json()
    _print_salvage(report, args, out)
    return EXIT_DAMAGE if report.lost else EXIT_OK


def _print_salvage(report: SalvageReport, args: argparse.Namespace, out: _Output) -> None:
    out.line(f"salvaged {args.root} into {args.dest}: the state of commit {report.source_seq} "
             f"(the last whole one); new store at commit {report.dest_seq}")
    for damage in report.log_damage:
        out.line(f"damaged: {damage.message}")
    if report.lost_commits:
        later = report.to_json()["lost_in_later_commits"]
        added = [f"{n} {noun} of {kind} {name}"
                 for group, kind, noun in (("streams", "stream", "events"),
                                           ("tables", "table", "records"),
                                           ("cache", "the", "entries"))
                 for name, n in later[group].items()]
        unknown = (f"; what the {later['unreadable_commits']} missing or damaged one(s) added "
                   f"is unknown" if later["unreadable_commits"] else "")
        out.line(f"LOST the {report.lost_commits} commit(s) after commit {report.source_seq}: "
                 f"those whose record reads added {', '.join(added) or 'nothing'}{unknown}")
    for name, log in report.streams.items():
        text = f"stream {name}: kept {log.kept} of {log.written} events{_loss(log)}"
        offset = orjson.dumps(log.extra["offset"]).decode()
        if log.lost:
            committed = orjson.dumps(log.extra["committed_offset"]).decode()
            then = ("the source delivers the lost events again" if log.extra["offset"] is not None
                    else "the source starts again from its beginning")
            text += f"; offset {offset} (committed: {committed}), so {then}"
        else:
            text += f"; offset {offset}"
        out.line(text)
    for name, log in report.tables.items():
        extra = log.extra
        out.line(f"table {name}: {extra['keys']} keys, from {extra['snapshot_kept']} of "
                 f"{extra['snapshot_records']} snapshot records and {extra['deltas_kept']} of "
                 f"{extra['delta_records']} deltas{_loss(log)}")
    cache = report.cache
    out.line(f"cache: kept {cache.kept} of {cache.written} entries{_loss(cache)}")
    if report.lost:
        out.warn(f"apersist salvage: the source is damaged: {len(report.damage)} damaged "
                 f"object(s), and what was lost, listed above")
    else:
        out.line("nothing lost: the source was whole")


def _loss(log: LogReport) -> str:
    """What a log's line adds about its damage: what was lost, and where."""
    if not log.damage:
        return ""
    where = " and ".join(f"key={d.key} offset={d.offset}" for d in log.damage)
    if log.lost:
        return f", LOST {log.lost} from {where}"
    return f", damaged at {where} (no record lost: they all read)"


async def _compact(args: argparse.Namespace, out: _Output) -> int:
    retention = Retention(max_events=args.max_events, max_age_ms=args.max_age_ms)
    # Named, so that the service this fences, and inspect, say it was the command line.
    config = Config(backend_from_root(args.root), retention=retention,
                    writer_label="apersist-compact")
    async with (_open_store(args.root, counting="compact") as driver,
                run(config, driver=driver) as r):
        tables = r._store.table_names()
        await r.compact()  # opens every table of the store to fold it
        segments = sum(len(r._store.segments(kind, name)) for kind in sorted(fmt.KINDS)
                       for name in r._store.log_names(kind))
        checkpoint, last = r._store.checkpoint_seq, r._store.last_seq
    out.doc = {"tables": len(tables), "live_segments": segments, "checkpoint_seq": checkpoint,
               "last_seq": last}
    out.line(f"compacted {len(tables)} table(s); {segments} live segment(s); checkpoint at "
             f"seq {checkpoint}; last seq {last}")
    return EXIT_OK


async def _gc(args: argparse.Namespace, out: _Output) -> int:
    dry_run, grace_s = args.dry_run, args.grace_seconds
    async with _open_store(args.root, counting="gc") as driver:
        # With no commit log, every segment looks like garbage: the data that is left.
        lost = await lost_commit_log(driver, 0)
        if lost is not None:
            raise CorruptDataError(f"gc deletes nothing in a store whose commit log is lost; "
                                   f"salvage what is left first: {lost.message}")
        # gc's own clock dates the garbage (see apersist/_gc.py); writers' clocks never do.
        plan = await collect_garbage(driver, grace_ms=round(grace_s * 1000),
                                     now_ms=time.time_ns() // 1_000_000, dry_run=dry_run)
    out.doc = {"dry_run": dry_run, "grace_seconds": grace_s, "now_ms": plan.now_ms,
               "deleted": list(plan.due), "marked": dict(plan.waiting), "new": list(plan.new),
               "damaged_marker": plan.damaged_marker}
    if plan.damaged_marker is not None:
        out.warn(f"apersist gc: the gc marker is damaged and was {'not ' if dry_run else ''}"
                 f"replaced; every garbage key counts as first seen now: "
                 f"{plan.damaged_marker}")
    would = "would " if dry_run else ""
    for key in plan.due:
        out.line(f"{would}delete {key}")
    new = set(plan.new)
    for key, seen in plan.waiting.items():
        left_s = (seen + plan.grace_ms - plan.now_ms) / 1000
        if key in new:
            out.line(f"{would}mark {key} (deletable in {left_s:.0f} s)")
        else:
            out.line(f"keep {key} (first seen {(plan.now_ms - seen) / 1000:.0f} s ago, "
                     f"deletable in {left_s:.0f} s)")
    if dry_run:
        out.line(f"{len(plan.due)} garbage object(s) would be deleted, "
                 f"{len(plan.waiting)} marked; nothing written (dry run)")
    else:
        out.line(f"{len(plan.due)} garbage object(s) deleted, {len(plan.waiting)} marked "
                 f"(deleted by a later gc once garbage for {grace_s:g} s)")
    return EXIT_OK


def _demo(args: argparse.Namespace, out: _Output) -> int:
    from ._demo import run_demo  # the demo pulls in subprocess handling; load it lazily

    # With --json the demo's narration goes to stderr, and stdout holds the document only.
    target = sys.stderr if out.as_json else sys.stdout
    with contextlib.redirect_stdout(target):
        code = run_demo(events=args.events, store=args.store, seed=args.seed)
    out.doc = {"ok": code == 0}
    return code


# ----------------------------------------------------------------------------- arguments


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


def _count(text: str) -> int:
    """A whole number, 0 or more (``--max-events``, ``--max-age-ms``)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apersist", description="Inspect, check, read, salvage and maintain apersist "
                                     "stores; run the demo.",
        epilog="exit codes: 0 success; 1 damage found; 2 usage error, no store at ROOT, or "
               "another failure; 130 interrupted; 141 stdout closed (| head).")
    parser.add_argument("--version", action="version",
                        version=f"apersist {__version__} (store format "
                                f"{fmt.FORMAT_MAJOR}.{fmt.FORMAT_MINOR})")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="print one JSON document on stdout (see docs/api.md)")
    common.add_argument("--debug", action="store_true",
                        help="on error, print the traceback; log the apersist logger's DEBUG "
                             "lines to stderr")
    # Every command but the demo reads a store at ROOT, its first positional argument.
    rooted = argparse.ArgumentParser(add_help=False, parents=[common])
    rooted.add_argument("root", help="a directory, s3://bucket/prefix or az://container/prefix")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("inspect", parents=[rooted],
                       help="commits, streams, offsets, tables, sizes, writer epoch")
    p.add_argument("--allow-empty", action="store_true",
                   help="report a root that holds no store as an empty store instead of an error")
    p = sub.add_parser("verify", parents=[rooted], help="read and check every live object")
    p = sub.add_parser("dump", parents=[rooted],
                       help="a stream's events or a table's rows, one JSON line each, as far as "
                            "they can be read")
    p.add_argument("name", help="a stream's name, or a table's (a stream first, if both exist)")
    p.add_argument("--table", action="store_true", help="NAME is a table")
    p = sub.add_parser("salvage", parents=[rooted],
                       help="copy everything that can still be read into a new store and say "
                            "what was lost")
    p.add_argument("dest", help="the new store: an empty or absent directory, or an empty "
                                "s3:// or az:// prefix")
    p = sub.add_parser("compact", parents=[rooted],
                       help="all maintenance: fold tables, merge small segments, drop old cache "
                            "versions, checkpoint (takes the writer role: a running writer is "
                            "fenced)")
    p.add_argument("--max-events", type=_count, default=None,
                   help="retention of every stream: keep its last N events (0: offsets only)")
    p.add_argument("--max-age-ms", type=_count, default=None,
                   help="retention of every stream: keep the events this recent, by this "
                        "machine's clock")
    p = sub.add_parser("gc", parents=[rooted],
                       help="mark what no checkpoint or live commit needs (old segments, "
                            "folded commit records, old checkpoints, leftovers); delete what "
                            "was marked at least the grace period ago")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be deleted and marked; write and delete nothing")
    p.add_argument("--grace-seconds", type=_grace_seconds, default=3600.0,
                   help="delete an object only once an earlier gc run saw it as garbage at "
                        "least this long ago, by gc's own clock, so that readers that opened "
                        "before it became garbage keep it (default 3600; 0 deletes at once)")
    p = sub.add_parser("demo", parents=[common],
                       help="word counts persisted on the filesystem, killed with SIGKILL "
                            "part-way, restarted, checked")
    p.add_argument("--events", type=_count, default=200_000, help="events in the input stream")
    p.add_argument("--store", help="store directory (default: a new temporary directory)")
    p.add_argument("--seed", type=int, default=7)
    return parser


_COMMANDS: dict[str, Callable[[argparse.Namespace, _Output], Coroutine[Any, Any, int]]] = {
    "inspect": _inspect, "verify": _verify, "dump": _dump, "salvage": _salvage,
    "compact": _compact, "gc": _gc,
}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``apersist`` console script; returns the exit code.

    A usage error raises ``SystemExit(2)`` from argparse, with its message on stderr.
    """
    args = _parser().parse_args(argv)
    out = _Output(args.json)
    if args.debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger("apersist").addHandler(handler)
        logging.getLogger("apersist").setLevel(logging.DEBUG)
    try:
        command = _COMMANDS.get(args.command)
        code = _demo(args, out) if command is None else asyncio.run(command(args, out))
    except BrokenPipeError:
        return _pipe_closed()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # every failure is one line; --debug adds the traceback
        # Damage found is 1, as verify's; anything else (usage, no store, a backend that
        # fails, a fenced writer) is 2.
        code = EXIT_DAMAGE if isinstance(exc, CorruptDataError) else EXIT_ERROR
        if args.debug:
            _say(traceback.format_exc().rstrip("\n"))
        kind = type(exc).__name__
        if not isinstance(exc, PersistenceError | ValueError | OSError):
            kind = f"unexpected {kind} (run with --debug for the traceback)"
        _say(f"apersist {args.command}: {kind}: {_one_line(exc)}")
        out.doc = {"error": {"type": type(exc).__name__, "message": _one_line(exc)}}
    if args.json:
        out.doc["exit_code"] = code
    try:
        out.finish()
        sys.stdout.flush()
    except BrokenPipeError:
        return _pipe_closed()
    return code


def _say(text: str) -> None:
    """Write one line to stderr, if it can still be written: a closed stderr (``2>&-``, a
    daemon) or one piped into a reader that went away must not turn the exit code into a
    traceback's 1, which means damage found."""
    stderr = sys.stderr
    if stderr is None:  # started with it closed: descriptor 2 may be any file opened since
        return
    try:
        stderr.write(text + "\n")
        stderr.flush()
    except (OSError, ValueError):
        # Its reader went away: point it at devnull, so that the interpreter has nothing
        # left to fail to flush at exit.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stderr.fileno())


def _pipe_closed() -> int:
    """stdout's reader went away (``apersist dump ... | head``): end quietly.

    Python would report the failed flush of stdout at exit; pointing stdout at devnull
    leaves it nothing to flush (the recipe of the ``signal`` module's documentation).
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_PIPE_CLOSED


if __name__ == "__main__":
    raise SystemExit(main())
