"""apersist's benchmark suite: one command, every workload, apersist next to its baselines.

    python -m benchmarks                      # full size (1M events; S3 and Azure included)
    python -m benchmarks --quick              # smoke run, seconds (CI)
    python -m benchmarks --only job --peers   # the headline job, Pathway 0.33.0 beside it
    python -m benchmarks --only record,commit --events 200000 --backends filesystem

Writes ``benchmarks/results/latest.json`` (every sample, the machine, load and GC state),
``benchmarks/results/latest.md`` (one table: apersist, each baseline, ratios, targets) and
PNG plots into ``docs/img/`` (``--quick`` writes all of it under
``benchmarks/results/quick/`` instead, so a smoke run never replaces published figures).
Progress goes to stderr; the table is also printed on stdout. Targets are judged in the
table, never asserted: the exit status says only whether the suite ran.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ("job", "record", "replay", "compression", "commit", "stall", "memory", "table",
             "cached", "state", "history", "backends", "latency")
BACKENDS = ("filesystem", "s3", "azure")
FULL = {"events": 1_000_000, "repeats": 3, "batch": 1024, "streams": 16, "commit_samples": 200,
        "producers": "1,8,64", "memory_events": "1000000,10000000",
        "table_sizes": "1000,10000,100000,1000000", "state_keys": "100000,1000000",
        "cache_calls": 20_000, "backend_events": 200_000, "history_commits": "1000,5000,20000",
        "job_rows": 1_000_000, "latency_history": 5000}
QUICK = {"events": 20_000, "repeats": 2, "batch": 1024, "streams": 16, "commit_samples": 10,
         "producers": "1,8,64", "memory_events": "10000,100000", "table_sizes": "100,1000,3000",
         "state_keys": "2000,20000", "cache_calls": 2_000, "backend_events": 2_000,
         "history_commits": "100,400", "job_rows": 20_000, "latency_history": 100}


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected numbers of at least 0: {text!r}")
    return values


def name_list(choices: Sequence[str]) -> object:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        unknown = set(names) - set(choices)
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}: {text!r}")
        return names
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke-run sizes (seconds): checks the suite works, not the numbers")
    parser.add_argument("--only", type=name_list(WORKLOADS), default=WORKLOADS,
                        help=f"comma-separated workloads (default all): {','.join(WORKLOADS)}; "
                             "record and replay are one section")
    parser.add_argument("--backends", type=name_list(BACKENDS), default=None,
                        help="comma-separated: filesystem,s3,azure (default all; filesystem with "
                             "--quick); s3 and azure start moto_server / Azurite on 127.0.0.1")
    parser.add_argument("--peers", action="store_true",
                        help="also run the job workload in Pathway 0.33.0, in a virtualenv made "
                             "on first use under .cache/peers/ (pip install pathway==0.33.0)")
    knobs = parser.add_argument_group("size knobs (defaults: full size; smaller with --quick)")
    knobs.add_argument("--job-rows", type=int, help=f"rows of the job workload "
                                                    f"({FULL['job_rows']:,}; {QUICK['job_rows']:,})")
    knobs.add_argument("--events", type=int, help=f"events for record, replay and stall "
                                                  f"({FULL['events']:,}; {QUICK['events']:,})")
    knobs.add_argument("--repeats", type=int, help="repeats per contender, median reported (3; 2)")
    knobs.add_argument("--batch", type=int, help="events per batch: record_many and every "
                                                 "baseline's durable write (1024)")
    knobs.add_argument("--streams", type=int, help="streams of the multi-stream record (16)")
    knobs.add_argument("--commit-samples", type=int,
                       help="commit-latency samples per contender and producer count (200; 10)")
    knobs.add_argument("--producers", type=int_list, help="concurrent producers (1,8,64)")
    knobs.add_argument("--memory-events", type=int_list,
                       help="sizes for peak memory, one subprocess each (1000000,10000000; 10000,100000)")
    knobs.add_argument("--table-sizes", type=int_list,
                       help="table state sizes in keys (1000,...,1000000; 100,1000,3000)")
    knobs.add_argument("--state-keys", type=int_list,
                       help="table and cache sizes for memory, open time and stall, "
                            "subprocesses (100000,1000000; 2000,20000)")
    knobs.add_argument("--history-commits", type=int_list,
                       help="one-event commits of the long-history stores: open and replay time "
                            "against history (1000,5000,20000; 100,400)")
    knobs.add_argument("--cache-calls", type=int, help="@cached calls per sample (20,000; 2,000)")
    knobs.add_argument("--latency-ms", type=float_list, default=(0.0, 20.0),
                       help="delays per HTTP request of the latency workloads on S3 and Azure, "
                            "through tests/support/latency_proxy.py (0,20)")
    knobs.add_argument("--latency-history", type=int,
                       help="commits of the long store the latency workloads open (5,000; 100)")
    knobs.add_argument("--backend-events", type=int,
                       help="small events recorded/replayed on S3 and Azure (200,000; 2,000)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, help="directory for latest.json and latest.md "
                                              "(benchmarks/results; benchmarks/results/quick)")
    out.add_argument("--plots", type=Path, help="directory for the PNG plots "
                                                "(docs/img; the --out directory with --quick "
                                                "or --out)")
    out.add_argument("--no-plots", action="store_true", help="skip the plots")
    out.add_argument("--no-docs", action="store_true",
                     help="leave docs/performance.md alone (by default a run that is not --quick "
                          "and writes to the default places replaces its results section)")
    out.add_argument("--compare", type=Path, metavar="JSON",
                     help="a previous latest.json: add a table of each ratio then and now")
    out.add_argument("--from-json", type=Path, metavar="JSON",
                     help="measure nothing: re-render latest.md, the plots and the docs section "
                          "from a saved latest.json")
    out.add_argument("--dir", type=Path, help="where to make the temporary stores (system temp dir)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key, default in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, int_list(default) if isinstance(default, str) else default)
    for key in ("events", "repeats", "batch", "streams", "commit_samples", "cache_calls",
                "backend_events", "job_rows"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.events < 5:
        parser.error("--events must be at least 5")
    if args.backends is None:  # object stores start servers: not part of the smoke run
        args.backends = ("filesystem",) if args.quick else BACKENDS
    if args.out is None:
        args.out = REPO / "benchmarks/results" / ("quick" if args.quick else "")
    if args.plots is None:
        # docs/img goes with the published results only: a run written elsewhere (--out)
        # left docs/performance.md alone but replaced its plots.
        published = not args.quick and args.out == REPO / "benchmarks/results"
        args.plots = REPO / "docs/img" if published else args.out
    return args


def exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C does, so servers and temporary stores are cleaned up."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    from benchmarks.suite import judge_load, run_suite

    if args.from_json is not None:
        from benchmarks.common import Report

        report = Report.from_json(args.from_json.read_bytes())
        judge_load(report)  # by today's rule, from the load averages the run recorded
        args.quick = bool(report.settings.get("quick"))
    else:
        started = time.perf_counter()
        started_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with tempfile.TemporaryDirectory(prefix="apersist-bench-", dir=args.dir) as tmp:
            report = run_suite(args, Path(tmp))
        report.runtime_s = time.perf_counter() - started
        report.settings["started_utc"] = started_utc
        report.settings["command"] = " ".join(["python -m benchmarks", *(argv or sys.argv[1:])])
    from benchmarks.report import render_markdown, update_docs, write_plots

    args.out.mkdir(parents=True, exist_ok=True)
    plots = [] if args.no_plots else write_plots(report, args.plots)
    report.notes["plots"] = [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)
                             for p in plots]
    markdown = render_markdown(report)
    if args.compare is not None:
        import orjson

        from benchmarks.report import render_comparison

        markdown += "\n" + render_comparison(report, orjson.loads(args.compare.read_bytes()),
                                             str(args.compare))
    (args.out / "latest.md").write_text(markdown, encoding="utf-8")
    (args.out / "latest.json").write_bytes(report.to_json() + b"\n")
    defaults = args.out == REPO / "benchmarks/results" and args.plots == REPO / "docs/img"
    if not (args.quick or args.no_docs or args.no_plots) and defaults:
        update_docs(report, plots, REPO / "docs/performance.md")
    print(markdown)
    print(f"[bench] wrote {args.out / 'latest.json'} and {args.out / 'latest.md'} "
          f"in {report.runtime_s:.0f} s", file=sys.stderr)
    if report.errors:
        print(f"[bench] {len(report.errors)} workload(s) failed: see the top of latest.md",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
