"""Shared fixtures: every backend a test can run on, made fresh per test.

``backend`` is parametrized over the backends of this version (memory and filesystem);
tests that take it run once per backend, the same test code each time. A test that needs
a second run on the same store simply reuses the same ``Backend`` object.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import apersist

BACKEND_KINDS = ["memory", "filesystem"]


def make_backend(kind: str, tmp_path: Path) -> apersist.Backend:
    if kind == "memory":
        return apersist.Backend.memory()
    if kind == "filesystem":
        return apersist.Backend.filesystem(tmp_path / "store")
    raise AssertionError(f"unknown backend kind {kind}")


@pytest.fixture(params=BACKEND_KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(backend_kind: str, tmp_path: Path) -> apersist.Backend:
    """A fresh, empty store on each backend kind."""
    return make_backend(backend_kind, tmp_path)


@pytest.fixture
def backend_factory(backend_kind: str, tmp_path: Path) -> Callable[[str], apersist.Backend]:
    """Make further independent stores of the same kind: ``backend_factory("other")``."""

    def make(name: str) -> apersist.Backend:
        return make_backend(backend_kind, tmp_path / name)

    return make
