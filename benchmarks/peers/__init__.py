"""Peer baselines run in virtualenvs of their own: Pathway 0.33.0 (``python -m benchmarks --peers``).

Pathway is never a dependency of apersist, nor installed in its environment, nor run in
CI: the first ``--peers`` run makes ``.cache/peers/pathway-0.33.0`` at the repository root
(``APERSIST_PEERS_DIR`` chooses another parent directory) with ``pip install
pathway==0.33.0``, and later runs reuse it. The job itself is ``pathway_job.py``, run by
that virtualenv's python in subprocesses: one that records, one that restores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

from ..common import log

PATHWAY = "pathway==0.33.0"
PATHWAY_VERSION = PATHWAY.partition("==")[2]
JOB = Path(__file__).resolve().with_name("pathway_job.py")
REPO = JOB.parent.parent.parent  # the repository root, whatever the working directory
INSTALL_TIMEOUT_S = 1800
JOB_TIMEOUT_S = 3600


def peers_dir() -> Path:
    override = os.environ.get("APERSIST_PEERS_DIR")
    return Path(override) if override else REPO / ".cache" / "peers"


def venv_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def installed_version(python: Path) -> str | None:
    """Pathway's version in the virtualenv of ``python``, or None if it has none."""
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", "import pathway; print(pathway.__version__)"],
                          capture_output=True, text=True, timeout=300, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_pathway() -> Path:
    """The python of a virtualenv holding ``pathway==0.33.0``, made on first use.

    Raises ``RuntimeError`` (with pip's output) if it cannot be made.
    """
    env = peers_dir() / f"pathway-{PATHWAY_VERSION}"
    python = venv_python(env)
    if installed_version(python) == PATHWAY_VERSION:
        return python
    log(f"peers: making {env} ({PATHWAY}; minutes, once)")
    venv.EnvBuilder(with_pip=True, clear=python.exists()).create(env)
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", PATHWAY],
                          capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    found = installed_version(python)
    if done.returncode != 0 or found != PATHWAY_VERSION:
        raise RuntimeError(f"could not install {PATHWAY} into {env}: exit={done.returncode} "
                           f"found={found} {done.stderr[-2000:]}")
    return python


def run_job(python: Path, mode: str, rows: int, store: Path) -> dict[str, Any]:
    """One ``pathway_job.py`` process; its JSON line, checked."""
    done = subprocess.run([str(python), str(JOB), mode, "--rows", str(rows), "--dir", str(store)],
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pathway {mode} failed: exit={done.returncode} {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    if not result["state_ok"]:
        raise RuntimeError(f"pathway {mode} ended with a wrong state: {result}")
    return result


def run_pathway_job(python: Path, rows: int, store: Path) -> dict[str, dict[str, Any]]:
    """Pathway records ``rows`` rows into ``store``, then restores from it (two processes)."""
    return {"record": run_job(python, "record", rows, store),
            "restore": run_job(python, "restore", rows, store)}
