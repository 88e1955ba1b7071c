"""The suite's headline job workload (``benchmarks/job.py``) runs at a tiny size.

A smoke test, as for the rest of the suite: the numbers are not judged. Pathway (``--peers``)
is never run here.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from benchmarks import job, peers, stall

ROOT = Path(__file__).resolve().parent.parent


def test_the_job_records_restores_and_batches(tmp_path: Path) -> None:
    rows = 2_500  # more rows than keys: every key is updated
    record = asyncio.run(job.per_event(tmp_path / "a", rows))  # checks the state itself
    restore = asyncio.run(job.per_event(tmp_path / "a", rows))  # replayed, nothing new
    assert record["s"] > 0
    assert restore["s"] > 0
    assert job.store_bytes(tmp_path / "a") > 0
    if job.has_batches():
        asyncio.run(job.batched(tmp_path / "b", rows))
        asyncio.run(job.batched(tmp_path / "b", rows))  # resumes after the last batch
    asyncio.run(job.floor(rows))
    asyncio.run(job.floor_batched(rows))


def test_the_readers_resume_after_an_offset() -> None:
    async def read_all() -> tuple[list[int], list[int]]:
        single = [offset async for _value, offset in job.reader(10)(6)]
        batches = [offset async for _values, offset in job.batch_reader(10, size=3)(2)]
        return single, batches

    assert asyncio.run(read_all()) == ([7, 8, 9], [5, 8, 9])


def test_the_stall_paths_run(tmp_path: Path) -> None:
    values = [{"user": "u1", "n": i, "ok": True} for i in range(500)]
    makers = [stall.record_path(values), stall.record_offset_path(values),
              stall.record_many_path(values), stall.source_table_path(500), stall.source_path(500)]
    if job.has_batches():
        makers.append(stall.source_batches_path(500))
    for i, produce in enumerate(makers):
        _lags, (opened, closed) = asyncio.run(stall.timed_path(tmp_path / f"p{i}", produce))
        assert closed >= opened
    assert isinstance(asyncio.run(stall.replay_lags(tmp_path / "p0", 500)), list)
    # 100,000 rows keep the non-yielding loop busy for several of its 100 ms commit periods
    # (it runs below 400k rows/s), so a periodic commit must land while it runs.
    gap, commits = asyncio.run(stall.commit_gap_ms(tmp_path / "gap", 100_000))
    assert gap > 0
    assert commits >= 1


def test_the_suite_runs_the_job_first(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "benchmarks", "--quick", "--only", "job", "--job-rows", "1500",
            "--repeats", "1", "--no-plots", "--out", str(tmp_path / "out"), "--dir", str(tmp_path)]
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    report = orjson.loads((tmp_path / "out" / "latest.json").read_bytes())
    assert report["errors"] == []
    names = [row["workload"] for row in report["rows"]]
    assert len(names) == 4
    assert all(name.startswith("job: 1,500 rows") for name in names)
    assert report["rows"][0]["apersist"]["value"] > 0  # per event, rows/s
    assert not any(b["role"] == "pathway" for row in report["rows"] for b in row["baselines"])


def test_the_peers_live_under_the_repository_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APERSIST_PEERS_DIR", raising=False)
    assert peers.peers_dir() == ROOT / ".cache" / "peers"
    monkeypatch.setenv("APERSIST_PEERS_DIR", str(ROOT / "elsewhere"))
    assert peers.peers_dir() == ROOT / "elsewhere"
    assert peers.JOB.exists()
