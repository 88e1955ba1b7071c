"""The benchmark runner's choice of where a run writes (benchmarks/run.py)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.run import REPO, parse_args


def test_a_run_written_elsewhere_keeps_its_plots_beside_its_results(tmp_path: Path) -> None:
    """Only a run that publishes (the default --out) replaces docs/img: a run given --out
    left docs/performance.md alone but overwrote the plots it shows."""
    assert parse_args(["--out", str(tmp_path)]).plots == tmp_path
    assert parse_args([]).plots == REPO / "docs/img"
    assert parse_args(["--quick"]).plots == REPO / "benchmarks/results/quick"
    assert parse_args(["--out", str(tmp_path), "--plots", "x"]).plots == Path("x")
