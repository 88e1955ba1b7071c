"""The programs in ``examples/`` run as a user would run them, and do what they say."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from servers import ROOT, worker_env

EXAMPLES = ROOT / "examples"


def _run(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], env=worker_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def test_every_example_is_tested() -> None:
    tested = {"queue_service.py", "enrichment_cache.py", "backtest_replay.py", "typed_orders.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_queue_service_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    store = str(tmp_path / "state")
    first = _run("queue_service.py", "--store", store, "--stop-after", "300")
    assert "stopped cleanly after 300 orders; last offset 299" in first
    second = _run("queue_service.py", "--store", store, "--stop-after", "200")
    assert "stopped cleanly after 200 orders; last offset 499" in second
    totals = ast.literal_eval(second.split("totals (cents): ", 1)[1].strip())
    assert sum(totals.values()) == sum(100 + seq % 50 for seq in range(500))


def test_enrichment_calls_the_service_once_per_address(tmp_path: Path) -> None:
    out = _run("enrichment_cache.py", "--store", str(tmp_path / "state"))
    assert out.splitlines()[-1] == "first run: 3 calls; second run: 0 calls"


def test_backtests_see_the_same_events_at_any_pace(tmp_path: Path) -> None:
    out = _run("backtest_replay.py", "--store", str(tmp_path / "state"))
    speedrun, realtime = out.splitlines()
    assert speedrun.startswith("speedrun: profit ")
    assert speedrun.split()[2] == realtime.split("profit ")[1].split()[0]


def test_typed_orders_replay_as_orders_after_a_restart(tmp_path: Path) -> None:
    store = str(tmp_path / "state")
    first = _run("typed_orders.py", "--store", store).splitlines()
    assert first[0] == "live     #0 10 ACME @ 101.25 at 09:30 (Order)"
    assert first[-1] == "position: 33 ACME, cost 3350.00 (Position)"
    second = _run("typed_orders.py", "--store", store).splitlines()
    assert second[:3] == [line.replace("live    ", "replayed") for line in first[:3]]
    assert second[3] == "live     #3 13 ACME @ 102.00 at 09:33 (Order)"
    assert second[-1] == "position: 75 ACME, cost 7645.00 (Position)"
