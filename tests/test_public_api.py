"""The public surface: ``apersist.__all__`` is sorted and complete, and everything is documented."""

from __future__ import annotations

import ast
import inspect
import re
import types
from pathlib import Path

import pytest

import apersist
import apersist.testing

PACKAGE = Path(apersist.__file__).parent

# The names API.md binds; the package may add to them, never drop one.
API_NAMES = {
    "AwsS3Settings", "Backend", "BackendError", "CommitInfo", "Config", "CorruptDataError", "Event",
    "FencedError", "IncompatibleFormatError", "PersistenceError", "PersistenceMode", "Run",
    "SnapshotAccess", "Stream", "Table", "cached", "run",
}


def _isort_key(name: str) -> tuple[int, list[tuple[int, int]]]:
    """The order of ruff's RUF022: CONSTANTS, then Classes, then the rest; natural order within."""
    if len(name) > 1 and name.isupper():
        category = 0
    elif name[:1].isupper():
        category = 1
    else:
        category = 2
    # Natural order: a run of digits compares as its number (and, as a character would,
    # before the letters and "_" that identifiers hold); other characters by code point.
    natural = [(0, int(part)) if part.isdigit() else (1, ord(part))
               for part in re.findall(r"\d+|\D", name)]
    return category, natural


def test_isort_key_matches_ruff() -> None:
    names = ["run", "Config", "FORMAT_MAJOR", "__version__", "A", "cached", "Item10", "Item9", "X_2"]
    assert sorted(names, key=_isort_key) == [
        "FORMAT_MAJOR", "X_2", "A", "Config", "Item9", "Item10", "__version__", "cached", "run"]


def _exported_names(module_file: Path, *, imports: bool = True) -> set[str]:
    """Names bound at the top level of ``module_file``, except plain ``import x`` modules.

    With ``imports=False``, only the names the module defines itself.
    """
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    bound: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__" and imports:
            bound.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Assign):
            bound.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            bound.add(node.target.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
    return bound


def test_all_is_sorted_like_ruff() -> None:
    assert apersist.__all__ == sorted(apersist.__all__, key=_isort_key)
    assert len(set(apersist.__all__)) == len(apersist.__all__)


def test_all_is_complete() -> None:
    bound = _exported_names(PACKAGE / "__init__.py")
    public = {name for name in bound if not name.startswith("_")}
    assert public - set(apersist.__all__) == set(), "public names missing from __all__"
    # And at run time: every non-module public attribute is listed (submodules such as
    # apersist.testing become attributes once imported; they are not names of the API).
    runtime = {name for name, value in vars(apersist).items()
               if not name.startswith("_") and not isinstance(value, types.ModuleType)
               and type(value).__module__ != "__future__"}  # "annotations" from the future import
    assert runtime - set(apersist.__all__) == set()


def test_all_names_exist() -> None:
    missing = [name for name in apersist.__all__ if not hasattr(apersist, name)]
    assert missing == []
    namespace: dict[str, object] = {}
    exec("from apersist import *", namespace)
    assert set(apersist.__all__) <= namespace.keys()


def test_api_names_are_exported() -> None:
    assert set(apersist.__all__) >= API_NAMES


def test_version() -> None:
    assert "__version__" in apersist.__all__
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", apersist.__version__)
    assert isinstance(apersist.FORMAT_MAJOR, int)
    assert isinstance(apersist.FORMAT_MINOR, int)


def _documented(obj: object) -> bool:
    return bool((inspect.getdoc(obj) or "").strip())


@pytest.mark.parametrize("name", [n for n in apersist.__all__ if not n.startswith("__")])
def test_public_name_has_a_docstring(name: str) -> None:
    obj = getattr(apersist, name)
    if isinstance(obj, int | str):
        # Constants cannot carry docstrings; they are documented where they are defined.
        source = (PACKAGE / "__init__.py").read_text(encoding="utf-8")
        assert name in source
        return
    assert _documented(obj), f"apersist.{name} has no docstring"
    # inspect.getdoc inherits docstrings; the object must say something of its own.
    assert getattr(obj, "__doc__", None), f"apersist.{name} has no docstring of its own"


def _public_members(cls: type) -> list[str]:
    names = []
    for name, value in vars(cls).items():
        if name.startswith("_") or not (inspect.isfunction(value) or isinstance(
                value, property | classmethod | staticmethod)):
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("name", [n for n in apersist.__all__
                                  if inspect.isclass(getattr(apersist, n))
                                  and not issubclass(getattr(apersist, n), BaseException)])
def test_public_methods_have_docstrings(name: str) -> None:
    cls = getattr(apersist, name)
    undocumented = [member for member in _public_members(cls)
                    if not _documented(getattr(cls, member))]
    assert undocumented == [], f"apersist.{name} members without docstrings: {undocumented}"


def test_exceptions_form_one_tree() -> None:
    for name in ("BackendError", "CorruptDataError", "FencedError", "IncompatibleFormatError"):
        assert issubclass(getattr(apersist, name), apersist.PersistenceError)
    assert issubclass(apersist.PersistenceError, Exception)


def test_py_typed_marker_exists() -> None:
    marker = PACKAGE / "py.typed"
    assert marker.is_file()


TESTING = Path(apersist.testing.__file__).parent
DRIVER_PROTOCOL = {"Capabilities", "Driver", "ObjectExistsError", "ObjectInfo", "ObjectNotFoundError",
                   "TransientBackendError"}


def test_testing_is_a_package_of_private_modules() -> None:
    modules = sorted(path.name for path in TESTING.glob("*.py"))
    assert modules == ["__init__.py", "_clock.py", "_conformance.py", "_faults.py"]


def test_testing_kit_is_documented_and_complete() -> None:
    testing = apersist.testing
    assert _documented(testing)
    assert testing.__all__ == sorted(testing.__all__, key=_isort_key)
    defined: set[str] = set()
    for module in TESTING.glob("_*.py"):
        defined |= _exported_names(module, imports=False)
    # The checks are reached through DRIVER_CHECKS, not as names of their own; the driver
    # protocol and its signals are re-exported from apersist._drivers.base, for driver authors.
    public = {name for name in defined if not name.startswith("_")} - set(testing.DRIVER_CHECKS)
    assert public | DRIVER_PROTOCOL == set(testing.__all__)
    for name in testing.__all__:
        assert hasattr(testing, name)
        obj = getattr(testing, name)
        if callable(obj) and not isinstance(obj, types.GenericAlias):
            assert _documented(obj), f"apersist.testing.{name} has no docstring"
    for check_name, check in testing.DRIVER_CHECKS.items():
        assert _documented(check), f"driver check {check_name} has no docstring"


def test_a_driver_author_imports_nothing_private() -> None:
    from apersist._drivers import base

    for name in DRIVER_PROTOCOL:
        assert getattr(apersist.testing, name) is getattr(base, name)


def test_testing_kit_does_not_import_pytest() -> None:
    for module in TESTING.glob("*.py"):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        assert "pytest" not in imported, module.name


# --------------------------------------------------------------------------- the testing kit's clock


def test_fake_clock_moves_only_when_advanced() -> None:
    clock = apersist.testing.FakeClock(1_000)
    assert clock() == clock.now_ms == 1_000
    assert clock() == 1_000
    assert clock.advance(250) == 1_250
    assert clock() == 1_250
    assert clock.advance(0) == 1_250
    assert repr(clock) == "FakeClock(now_ms=1250)"
    assert apersist.testing.FakeClock()() > 1_600_000_000_000  # a plausible wall-clock default


def test_fake_clock_can_be_set_back() -> None:
    clock = apersist.testing.FakeClock(1_000)
    assert clock.set(400) == 400
    assert clock() == clock.now_ms == 400
    assert clock.set(5_000) == 5_000
    assert clock() == 5_000
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="now_ms="):
            clock.set(bad)  # type: ignore[arg-type]
    assert clock() == 5_000


@pytest.mark.parametrize("bad", [-1, 1.5, True, None, "5"])
def test_fake_clock_refuses_bad_steps(bad: object) -> None:
    clock = apersist.testing.FakeClock(10)
    with pytest.raises(ValueError, match="ms="):
        clock.advance(bad)  # type: ignore[arg-type]
    assert clock() == 10
    with pytest.raises(ValueError, match="start_ms"):
        apersist.testing.FakeClock(bad)  # type: ignore[arg-type]


async def test_fake_clock_stamps_recorded_events() -> None:
    clock = apersist.testing.FakeClock(1_700_000_000_000)
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend), clock_ms=clock) as run:
        stream = run.stream("s")
        await stream.record("a")
        clock.advance(1_500)
        await stream.record("b")
    async with apersist.run(apersist.Config(backend), clock_ms=clock) as run:
        stamps = [(event.value, event.time_ms) async for event in run.stream("s").replay()]
    assert stamps == [("a", 1_700_000_000_000), ("b", 1_700_000_001_500)]
