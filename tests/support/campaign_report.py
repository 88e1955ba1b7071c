"""Render the campaigns' JSON-lines report as the Markdown tables of docs/reliability.md.

``python tests/support/campaign_report.py REPORT.jsonl``: one table per campaign, one row per
backend. The report is written by the campaign tests when ``APERSIST_*_REPORT`` names it
(see ``.ci/campaigns``).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

Row = dict[str, Any]
# Per campaign: (title, [(column, how to get it from a row)]).
COLUMNS: dict[str, tuple[str, list[tuple[str, Callable[[Row], Any]]]]] = {
    "crash": ("kill -9 (tests/campaigns/test_crash.py)", [
        ("kills", lambda r: r["kills"]),
        ("at random instants", lambda r: r["by_kind"].get("random", 0)),
        ("at named crash points", lambda r: sum(n for k, n in r["by_kind"].items() if k != "random")),
        ("killed mid-commit", lambda r: r.get("killed_mid_commit", "")),
        ("stores", lambda r: r.get("stores", "")),
        ("events verified", lambda r: r.get("events_verified", "")),
        ("acknowledged events lost", lambda r: r.get("events_lost", 0)),
        ("time (s)", lambda r: r.get("elapsed_s", "")),
    ]),
    "faults": ("injected storage faults (tests/campaigns/test_fault_campaign.py)", [
        ("runs", lambda r: r["runs"]),
        ("runs ended by a permanent fault", lambda r: r["failed_runs"]),
        ("commits acknowledged", lambda r: r["commits"]),
        ("faults injected", lambda r: r["faults_injected"]),
        ("events verified", lambda r: r["events_checked"]),
        ("acknowledged events lost", lambda r: r["events_lost"]),
        ("time (s)", lambda r: r["elapsed_s"]),
    ]),
    "corruption": ("corruption (tests/campaigns/test_corruption.py)", [
        ("scope", lambda r: r["scope"]),
        ("damaged objects", lambda r: r["cases"]),
        ("detected (CorruptDataError, key and offset)", lambda r: r["detected"]),
        ("ignored: unreferenced or superseded", lambda r: r["ignored_unreferenced"]),
        ("undetectable: newest commit deleted", lambda r: r["undetectable_newest_commit_deleted"]),
        ("wrong values replayed", lambda r: r["wrong"]),
    ]),
    "zombie": ("zombie writers (tests/campaigns/test_zombie.py)", [
        ("rounds (takeovers)", lambda r: r["rounds"]),
        ("older writer fenced", lambda r: r["fenced"]),
        ("commits acknowledged", lambda r: r["commits_acked"]),
        ("events verified", lambda r: r["events_verified"]),
        ("result", lambda r: r["result"]),
        ("time (s)", lambda r: r.get("elapsed_s", "")),
    ]),
    "cancellation": ("cancellation (tests/campaigns/test_cancellation.py)", [
        ("coroutines", lambda r: r["coroutines"]),
        ("await points", lambda r: r["await_points"]),
        ("sites cancelled at", lambda r: r["sites_covered"]),
        ("trials", lambda r: r["trials"]),
        ("cancellations", lambda r: r["cancellations"]),
        ("events verified", lambda r: r["events_verified"]),
        ("failed trials", lambda r: r["failures"]),
        ("time (s)", lambda r: r["elapsed_s"]),
    ]),
}


def render(rows: list[Row]) -> str:
    by_campaign: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_campaign[row.get("campaign", "crash")].append(row)
    out: list[str] = []
    for campaign, (title, columns) in COLUMNS.items():
        if not by_campaign[campaign]:
            continue
        out += [f"**{title}**", "", "| backend | " + " | ".join(c for c, _ in columns) + " |",
                "| --- |" + " ---: |" * len(columns)]
        for row in by_campaign[campaign]:
            cells = " | ".join(str(get(row)) for _, get in columns)
            out.append(f"| {row['backend']} | {cells} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit(f"usage: {Path(__file__).name} REPORT.jsonl")
    lines = Path(argv[0]).read_bytes().splitlines()
    print(render([orjson.loads(line) for line in lines if line.strip()]))


if __name__ == "__main__":
    main(sys.argv[1:])
