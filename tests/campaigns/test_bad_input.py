"""Bad input: hypothesis-generated values, names, offsets and configs.

Every input either round-trips exactly or fails at the call that was given it with
``TypeError``/``ValueError`` (names: ``ValueError``, as API.md says), and nothing stored
is harmed: what was recorded before a refused call still replays, and the run still
commits afterwards. Each example is one run on a fresh memory or filesystem store,
reopened to check what it holds.

The strategies build each input together with what it must replay as (its JSON form:
tuples as lists, dataclasses as dicts, datetimes and UUIDs as strings, enums as their
value), or ``BAD`` when the API refuses it. Size: ``APERSIST_BAD_INPUT_EXAMPLES``
(examples per test; default 40).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import decimal
import enum
import math
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import apersist
import apersist._values

EXAMPLES = int(os.environ.get("APERSIST_BAD_INPUT_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Each example runs on one backend: a third on the filesystem (real files, fsyncs), the rest
# in memory, so the campaign covers both within its time budget.
KINDS = st.sampled_from(["memory", "memory", "filesystem"])
QUIET = 3_600_000  # no commit but the ones the test asks for

# The persistent-id rule of API.md, written out here rather than imported: it is the contract.
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# orjson refuses containers nested deeper than this (its recursion limit).
MAX_DEPTH = 254


class _Bad:
    def __repr__(self) -> str:
        return "BAD"


BAD: Any = _Bad()  # the expected outcome of an input the API must refuse


# --------------------------------------------------------------------------- exotic types
@dataclasses.dataclass
class Box:
    a: Any
    b: Any = None


@dataclasses.dataclass(slots=True)
class SlotBox:
    a: Any


class Colour(enum.Enum):
    RED = "red"
    NAN = float("nan")


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2**40


class Tag(enum.StrEnum):
    X = "x-tag"


class MyFloat(float):
    pass


class MyInt(int):
    pass


class MyStr(str):
    pass


class MyDict(dict[str, Any]):
    pass


class MyTuple(tuple[Any, ...]):
    pass


Pair = collections.namedtuple("Pair", "left right")


class Opaque:
    pass


# --------------------------------------------------------------------------- strategies
def _ok(strategy: st.SearchStrategy[Any], to_json: Callable[[Any], Any] = lambda v: v,
        ) -> st.SearchStrategy[tuple[Any, Any]]:
    return strategy.map(lambda v: (v, to_json(v)))


def _bad(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, Any]]:
    return strategy.map(lambda v: (v, BAD))


_clean_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
_surrogate = st.characters(categories=["Cs"])
_dirty_text = st.builds(lambda a, s, b: a + s + b, _clean_text, _surrogate, _clean_text)

ATOMS: st.SearchStrategy[tuple[Any, Any]] = st.one_of(
    _ok(st.none()), _ok(st.booleans()),
    _ok(st.integers(-(2**63), 2**64 - 1)),
    _ok(st.sampled_from([-(2**63), 2**63 - 1, 2**63, 2**64 - 1, 2**53 + 1, 0]), int),
    _bad(st.one_of(st.integers(min_value=2**64), st.integers(max_value=-(2**63) - 1))),
    _ok(st.floats(allow_nan=False, allow_infinity=False)),
    _ok(st.sampled_from([-0.0, 5e-324, 1.7976931348623157e308, 0.1, 1e16, 2.0**63])),
    _bad(st.sampled_from([math.nan, math.inf, -math.inf])),
    _ok(_clean_text),
    _ok(st.sampled_from(["", "null", "\x00", "ünïcødé ✓", "😀" * 3, "\u2028\u2029", "\ufeff"])),
    _bad(_dirty_text),
    _bad(st.binary(max_size=8)), _bad(st.binary(max_size=8).map(bytearray)),
    _bad(st.sets(st.integers(), max_size=3)), _bad(st.frozensets(st.integers(), max_size=3)),
    _bad(st.builds(Opaque)), _bad(st.just(Opaque)), _bad(st.just(print)),
    _bad(st.complex_numbers(allow_nan=False)), _bad(st.decimals(allow_nan=False)),
    _bad(st.floats(allow_nan=False, allow_infinity=False).map(MyFloat)),
    _bad(st.builds(Pair, st.integers(), st.integers())),
    _bad(st.lists(st.integers(), max_size=2).map(MyTuple)),
    _bad(st.sampled_from([Colour.NAN])),
    _ok(st.integers(-(2**63), 2**63 - 1).map(MyInt), int),
    _ok(_clean_text.map(MyStr), str),
    _ok(st.sampled_from([Colour.RED, Level.LOW, Level.HIGH, Tag.X]), lambda v: v.value),
    _ok(st.datetimes(), lambda v: v.isoformat()),
    _ok(st.datetimes(timezones=st.just(datetime.UTC)), lambda v: v.isoformat()),
    _ok(st.dates(), lambda v: v.isoformat()),
    _ok(st.uuids(), str),
)

_weird_key = st.one_of(st.integers(), st.none(), st.booleans(), st.floats(allow_nan=False),
                       st.tuples(st.integers()), _dirty_text)


def _containers(children: st.SearchStrategy[tuple[Any, Any]]) -> st.SearchStrategy[tuple[Any, Any]]:
    def seq(kind: Callable[[list[Any]], Any]) -> Callable[[list[tuple[Any, Any]]], tuple[Any, Any]]:
        def build(items: list[tuple[Any, Any]]) -> tuple[Any, Any]:
            expect = [e for _v, e in items]
            return kind([v for v, _e in items]), BAD if BAD in expect else expect
        return build

    def mapping(items: dict[str, tuple[Any, Any]]) -> tuple[Any, Any]:
        expect = {k: e for k, (_v, e) in items.items()}
        value = {k: v for k, (v, _e) in items.items()}
        return value, BAD if BAD in expect.values() else expect

    def weird_keyed(item: tuple[Any, tuple[Any, Any]]) -> tuple[Any, Any]:
        key, (value, _e) = item
        return {"fine": 1, key: value}, BAD

    def boxed(parts: tuple[tuple[Any, Any], tuple[Any, Any], bool]) -> tuple[Any, Any]:
        (a, ea), (b, eb), slotted = parts
        if slotted:
            return SlotBox(a), BAD if ea is BAD else {"a": ea}
        return Box(a, b), BAD if BAD in (ea, eb) else {"a": ea, "b": eb}

    def with_private(item: tuple[Any, Any]) -> tuple[Any, Any]:
        # orjson leaves out attributes named "_...": what they hold (a NaN, a cycle) is fine.
        a, ea = item
        box = Box(a)
        box._back = box  # type: ignore[attr-defined]
        box._nan = math.nan  # type: ignore[attr-defined]
        return box, BAD if ea is BAD else {"a": ea, "b": None}

    return st.one_of(
        st.lists(children, max_size=4).map(seq(list)),
        st.lists(children, max_size=4).map(seq(tuple)),
        st.dictionaries(_clean_text, children, max_size=4).map(mapping),
        st.dictionaries(_clean_text, children, max_size=2).map(
            lambda d: (MyDict({k: v for k, (v, _e) in d.items()}),
                       BAD if any(e is BAD for _v, e in d.values())
                       else {k: e for k, (_v, e) in d.items()})),
        st.dictionaries(_dirty_text, children, min_size=1, max_size=2).map(
            lambda d: ({k: v for k, (v, _e) in d.items()}, BAD)),
        st.tuples(_weird_key, children).map(weird_keyed),
        st.tuples(children, children, st.booleans()).map(boxed),
        children.map(with_private),
    )


NESTED = st.recursive(ATOMS, _containers, max_leaves=12)


def _deep(depth: int, leaf: Any) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 3 else {"d": value}
    return value


@st.composite
def deep_values(draw: st.DrawFn, budget: int = MAX_DEPTH) -> tuple[Any, Any]:
    """Containers nested around orjson's depth limit: the limit must fail at the call."""
    depth = draw(st.integers(budget - 3, budget + 3))
    leaf, expect = draw(st.one_of(_ok(st.integers(0, 9)), _bad(st.just(math.nan))))
    value = _deep(depth, leaf)
    # The leaf scalar is not a level; `depth` containers wrap it.
    return value, BAD if expect is BAD or depth > budget else _deep(depth, expect)


HUGE = st.one_of(
    _ok(st.integers(1 << 14, 1 << 19).map(lambda n: "x" * n)),
    _ok(st.integers(1 << 12, 1 << 16).map(lambda n: "é😀\u2028" * n)),
    _ok(st.integers(1 << 12, 1 << 15).map(lambda n: list(range(n))), list),
    _bad(st.integers(1 << 14, 1 << 17).map(lambda n: "x" * n + "\ud800")),
)

VALUES = st.one_of(ATOMS, NESTED, deep_values(), HUGE)
OFFSETS = st.one_of(st.just((None, None)), ATOMS, NESTED, deep_values())

NAMES = st.one_of(
    st.from_regex(NAME_RULE, fullmatch=True),
    st.text(st.sampled_from("aZ09._-/\\ :é\x00\n\t\ud800"), max_size=6),
    st.integers(1, 200).map(lambda n: "n" * n),
    st.sampled_from(["", ".", "..", "-a", "_a", "a/b", "../x", "a b", "ä", "a\n", "A" * 128,
                     "A" * 129]),
    st.sampled_from([None, 5, 5.0, b"orders", True, MyStr("orders"), MyStr("bad name")]),
)


def name_is_valid(name: Any) -> bool:
    return isinstance(name, str) and NAME_RULE.fullmatch(name) is not None


# --------------------------------------------------------------------------- oracle checks
def same(got: Any, want: Any) -> bool:
    """Equal and of the same types all the way down (``1 == 1.0 == True`` is not enough)."""
    if type(got) is not type(want):
        return False
    if isinstance(want, float):
        return got == want and math.copysign(1, got) == math.copysign(1, want)
    if isinstance(want, list):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, dict):
        return list(got) == list(want) and all(same(got[k], want[k]) for k in want)
    return bool(got == want)


def assert_same(got: Any, want: Any, what: str) -> None:
    assert same(got, want), f"{what}: got={got!r:.300} want={want!r:.300}"


def attempt(build: Callable[[], Any]) -> tuple[Any, Exception | None]:
    """``build()``, or the ``TypeError``/``ValueError`` it raised (nothing else is allowed)."""
    try:
        return build(), None
    except (TypeError, ValueError) as exc:
        return None, exc


def make_backend(kind: str, tmp: str) -> apersist.Backend:
    if kind == "memory":
        return apersist.Backend.memory()
    return apersist.Backend.filesystem(Path(tmp) / "store")


def run_scenario(kind: str, scenario: Callable[[apersist.Backend], Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="apersist-bad-") as tmp:
        asyncio.run(scenario(make_backend(kind, tmp)))


async def read_back(backend: apersist.Backend, stream: str) -> list[apersist.Event]:
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(cfg) as run:
        return [e async for e in run.stream(stream).replay()]


# --------------------------------------------------------------------------- streams
@SETTINGS
@given(kind=KINDS, inputs=st.lists(st.tuples(VALUES, OFFSETS), min_size=1, max_size=4))
@example(kind="filesystem", inputs=[(("é😀", "é😀"), ({"o": 1}, {"o": 1})),
                                    ((math.nan, BAD), (1, 1)), ((1, 1), (b"x", BAD))])
def test_recorded_values_and_offsets_round_trip_or_fail_at_the_call(
        kind: str, inputs: list[tuple[tuple[Any, Any], tuple[Any, Any]]]) -> None:
    async def scenario(backend: apersist.Backend) -> None:
        want: list[tuple[Any, Any]] = [("before", 0)]
        last_offset: Any = 0
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
            stream = run.stream("s")
            await stream.record("before", offset=0)
            await run.commit()
            for (value, value_json), (offset, offset_json) in inputs:
                if value_json is BAD or offset_json is BAD:
                    with pytest.raises((TypeError, ValueError), match="stream 's'"):
                        await stream.record(value, offset=offset)
                else:
                    await stream.record(value, offset=offset)
                    want.append((value_json, offset_json))
                    if offset is not None:
                        last_offset = offset_json
            # A refused call poisons nothing: the run still records and commits.
            await stream.record("after")
            want.append(("after", None))
            await run.commit()
            assert_same(stream.offset, last_offset, "offset after the commit")
        cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
        async with apersist.run(cfg) as run:
            events = [e async for e in run.stream("s").replay()]
            assert_same(run.stream("s").offset, last_offset, "offset after reopening")
        assert len(events) == len(want)
        for i, (event, (value_json, offset_json)) in enumerate(zip(events, want, strict=True)):
            assert_same(event.value, value_json, f"value of event {i}")
            assert_same(event.offset, offset_json, f"offset of event {i}")

    run_scenario(kind, scenario)


# --------------------------------------------------------------------------- tables
TABLE_KEYS = st.one_of(
    _ok(_clean_text), _ok(st.sampled_from(["", "k", "ключ", "a/b", "x" * 1000])),
    _ok(_clean_text.map(MyStr), str), _bad(_dirty_text),
    _bad(st.one_of(st.integers(), st.none(), st.tuples(st.integers()), st.binary(max_size=3),
                   st.floats(allow_nan=False))),
)


@SETTINGS
@given(kind=KINDS, ops=st.lists(st.tuples(TABLE_KEYS, st.one_of(ATOMS, NESTED, deep_values(MAX_DEPTH - 1))),
                    min_size=1, max_size=5),
       compact=st.booleans())
@example(kind="filesystem", ops=[(("k", "k"), ({"v": [1]}, {"v": [1]})), ((1, BAD), (2, 2)),
                                 (("j", "j"), ({1, 2}, BAD))], compact=True)
def test_table_items_round_trip_or_fail_at_the_call(
        kind: str, ops: list[tuple[tuple[Any, Any], tuple[Any, Any]]], compact: bool) -> None:
    async def scenario(backend: apersist.Backend) -> None:
        want: dict[str, Any] = {"before": 1}
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
            table = await run.table("t")
            table["before"] = 1
            await run.commit()
            for (key, key_json), (value, value_json) in ops:
                if key_json is BAD or value_json is BAD:
                    with pytest.raises((TypeError, ValueError), match="table 't'"):
                        table[key] = value
                else:
                    table[key] = value
                    want[key_json] = value_json
                # The table's live state never holds a refused item.
                assert sorted(table) == sorted(want)
            table["after"] = 2
            want["after"] = 2
            if compact:
                await run.compact()
            await run.commit()
        cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
        async with apersist.run(cfg) as run:
            state = dict(await run.table("t"))
        assert sorted(state) == sorted(want)
        for key, value_json in want.items():
            assert_same(state[key], value_json, f"table value of key {key!r:.50}")
            assert type(next(k for k in state if k == key)) is str

    run_scenario(kind, scenario)


async def test_a_value_mutated_in_place_into_garbage_does_not_break_compaction() -> None:
    """Compaction writes what was recorded: a later in-place change must neither fail the
    commit (losing the other logs' data it has cut) nor be persisted."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        table = await run.table("t")
        table["k"] = [1.5]
        await run.stream("s").record("kept")
        table["k"].append({1, 2})
        table["k"].append(math.nan)
        await run.compact()
    assert [e.value for e in await read_back(backend, "s")] == ["kept"]
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(cfg) as run:
        assert dict(await run.table("t")) == {"k": [1.5]}


async def test_a_value_too_large_to_frame_raises_value_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Record lengths are u32: a value over 4 GiB must be refused at the call, not crash the
    # commit. The limit is lowered here so the test does not need 4 GiB of memory.
    monkeypatch.setattr(apersist._values, "MAX_JSON_BYTES", 1000)
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("s")
        with pytest.raises(ValueError, match=r"too large.*stream 's'"):
            await stream.record("x" * 1000)
        with pytest.raises(ValueError, match="too large"):
            await stream.record(1, offset="y" * 1000)
        table = await run.table("t")
        with pytest.raises(ValueError, match=r"too large.*table 't'"):
            table["k"] = "z" * 1000
        await stream.record("x" * 900)
    assert [len(e.value) for e in await read_back(backend, "s")] == [900]


# --------------------------------------------------------------------------- the UDF cache
@SETTINGS
@given(kind=KINDS, results=st.lists(st.one_of(ATOMS, NESTED), min_size=1, max_size=4))
@example(kind="filesystem", results=[((1, 2), [1, 2]), (Opaque(), BAD)])
def test_cached_results_round_trip_or_fail_at_the_call(
        kind: str, results: list[tuple[Any, Any]]) -> None:
    calls: list[int] = []

    def compute(i: int) -> Any:
        calls.append(i)
        return "before" if i < 0 else results[i][0]

    cached = apersist.cached(name="bad-input.compute")(compute)

    async def scenario(backend: apersist.Backend) -> None:
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
            assert cached(-1) == "before"
            await run.commit()
            for i, (value, value_json) in enumerate(results):
                if value_json is BAD:
                    with pytest.raises((TypeError, ValueError), match=r"bad-input\.compute"):
                        cached(i)
                else:
                    assert cached(i) is value
        calls.clear()
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
            assert cached(-1) == "before"
            for i, (_value, value_json) in enumerate(results):
                if value_json is not BAD:
                    assert_same(cached(i), value_json, f"cached result {i}")
        # Stored results are not computed again; refused ones were never stored.
        assert calls == []

    run_scenario(kind, scenario)


@pytest.mark.parametrize(("twin", "bad"), [(None, math.nan), (None, math.inf),
                                           ({"k": [1.0, None]}, {"k": [1.0, -math.inf]})])
async def test_a_cached_call_with_a_non_finite_argument_is_refused(twin: Any, bad: Any) -> None:
    # Otherwise f(nan) would get the stored result of f(None), a different call.
    @apersist.cached(name="bad-input.describe")
    def describe(x: Any) -> str:
        return repr(x)

    async with apersist.run(apersist.Config(apersist.Backend.memory())) as run:
        assert describe(twin) == repr(twin)
        with pytest.raises(TypeError, match=r"bad-input\.describe"):
            describe(bad)
        await run.commit()


# --------------------------------------------------------------------------- names
@SETTINGS
@given(kind=KINDS, names=st.lists(NAMES, min_size=1, max_size=5))
@example(kind="filesystem", names=["ok.name-1", "", "a/b", 5, "A" * 128])
def test_stream_and_table_names_are_valid_or_refused_with_value_error(
        kind: str, names: list[Any]) -> None:
    async def scenario(backend: apersist.Backend) -> None:
        accepted: list[str] = []
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
            await run.stream("keep").record("before")
            await run.commit()
            for name in names:
                if name_is_valid(name):
                    await run.stream(name).record(f"v-{name}")
                    (await run.table(name))["k"] = name
                    accepted.append(str(name))
                else:
                    with pytest.raises(ValueError, match="name"):
                        run.stream(name)
                    with pytest.raises(ValueError, match="name"):
                        await run.table(name)
            await run.stream("keep").record("after")
        assert [e.value for e in await read_back(backend, "keep")] == ["before", "after"]
        for name in set(accepted):
            events = await read_back(backend, name)
            assert [e.value for e in events] == [f"v-{name}"] * accepted.count(name)
        cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
        async with apersist.run(cfg) as run:
            for name in set(accepted):
                assert dict(await run.table(name)) == {"k": name}

    run_scenario(kind, scenario)


@pytest.mark.parametrize("name", [["a"], {"a": 1}, {"a"}])
async def test_an_unhashable_name_raises_value_error(name: Any) -> None:
    async with apersist.run(apersist.Config(apersist.Backend.memory())) as run:
        with pytest.raises(ValueError, match="name"):
            run.stream(name)
        with pytest.raises(ValueError, match="name"):
            await run.table(name)


# --------------------------------------------------------------------------- configs
ANY_ARG = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), _clean_text, _dirty_text,
    st.binary(max_size=4), st.lists(st.integers(), max_size=2), st.builds(Opaque),
    st.sampled_from(list(apersist.SnapshotAccess) + list(apersist.PersistenceMode)),
    st.sampled_from(["full", "FULL", "Record", "replay", "offsets_only", "persisting",
                     "UDF_CACHING", "speedrun_replay", "Realtime_Replay", "", " full", "ful"]),
)
INT_ARG = st.one_of(st.integers(-5, 2**40), st.sampled_from([1023, 1024, 5 << 20, (5 << 20) - 1]),
                    ANY_ARG)


def _enum_ok(cls: type[enum.Enum], given_value: Any, got: Any) -> bool:
    if isinstance(given_value, cls):
        return got is given_value
    return (isinstance(given_value, str) and isinstance(got, cls)
            and given_value.lower() in (got.name.lower(), str(got.value)))


@SETTINGS
@given(args=st.fixed_dictionaries({}, optional={
    "snapshot_interval_ms": INT_ARG, "snapshot_access": ANY_ARG, "persistence_mode": ANY_ARG,
    "continue_after_replay": ANY_ARG, "max_pending_bytes": INT_ARG, "max_segment_bytes": INT_ARG,
    "upload_concurrency": INT_ARG, "multipart_bytes": INT_ARG,
    "retry": st.one_of(st.none(), st.just(apersist.RetryPolicy()), ANY_ARG)}),
    backend=st.one_of(st.just("memory"), ANY_ARG))
def test_config_keeps_what_it_is_given_or_refuses_it_at_construction(
        args: dict[str, Any], backend: Any) -> None:
    real_backend = apersist.Backend.memory() if backend == "memory" else backend
    config, exc = attempt(lambda: apersist.Config(real_backend, **args))
    if exc is not None:
        # Refused: then some argument really breaks a documented rule.
        assert str(exc)
        assert backend != "memory" or any(not _config_arg_ok(k, v) for k, v in args.items()), exc
        return
    assert backend == "memory"
    assert config.backend is real_backend
    for name, value in args.items():
        assert _config_arg_ok(name, value), (name, value)
        got = getattr(config, name)
        if name == "snapshot_access":
            assert _enum_ok(apersist.SnapshotAccess, value, got)
        elif name == "persistence_mode":
            assert _enum_ok(apersist.PersistenceMode, value, got)
        elif name == "retry":
            assert got is value or (value is None and got == apersist.RetryPolicy())
        else:
            assert got == value
            assert type(got) is type(value)
    # Accepted means usable: a run opens, records and commits with it.
    if config.snapshot_access is not apersist.SnapshotAccess.REPLAY:
        asyncio.run(_smoke(config))


_MINIMUM = {"snapshot_interval_ms": 0, "max_pending_bytes": 1024, "max_segment_bytes": 1024,
            "upload_concurrency": 1, "multipart_bytes": 5 << 20}


def _config_arg_ok(name: str, value: Any) -> bool:
    """The documented rules of docs/api.md, written out independently of the code."""
    if name in _MINIMUM:
        return type(value) is int and value >= _MINIMUM[name]
    if name == "continue_after_replay":
        return type(value) is bool
    if name == "retry":
        return value is None or isinstance(value, apersist.RetryPolicy)
    cls = apersist.SnapshotAccess if name == "snapshot_access" else apersist.PersistenceMode
    if isinstance(value, cls):
        return True
    return isinstance(value, str) and any(
        value.lower() in (m.name.lower(), m.value) for m in cls)


async def _smoke(config: apersist.Config) -> None:
    async with apersist.run(config) as run:
        await run.stream("s").record(1, offset=1)
        await run.commit()


TEXT_ARG = st.one_of(_clean_text, _dirty_text, st.sampled_from(["", " x", "x ", "a\tb"]),
                     st.none(), st.integers(), st.binary(max_size=3))
# Credentials, some refused for a reason that an error message must not spell out.
SECRET_ARG = st.one_of(TEXT_ARG, st.sampled_from([" secret-pw", "secret-pw\n", "pw\ud800secret",
                                                  "Zm9vYmFyYmF6"]))
ROOT_ARG = st.one_of(
    st.text(st.sampled_from("ab/.\\é \x01\x7f"), max_size=12), _dirty_text,
    st.integers(0, 700).map(lambda n: "r" * n), st.none(), st.integers(), st.binary(max_size=3),
)


def leaks(secret: Any, message: str, others: tuple[Any, ...]) -> bool:
    """Whether ``message`` shows ``secret`` (judged only when no other argument holds it)."""
    if not isinstance(secret, str) or len(secret.strip()) < 4:
        return False
    if any(secret.strip() in (arg if isinstance(arg, str) else repr(arg)) for arg in others):
        return False
    return secret in message or repr(secret) in message or secret.strip() in message


def _check_root(given_root: Any, got: str) -> None:
    assert isinstance(given_root, str)
    assert got == "/".join(p for p in given_root.split("/") if p)
    assert not got.startswith("/")
    assert not got.endswith("/")
    assert "//" not in got
    assert all(part not in (".", "..") for part in got.split("/"))
    assert "\\" not in got
    assert all(ord(c) >= 32 for c in got)
    got.encode("utf-8")  # a key made from it can be sent
    assert len(got.encode("utf-8")) + len("/writers/0/segments/") + 45 <= 1024


@SETTINGS
@given(root=ROOT_ARG, bucket=st.one_of(TEXT_ARG, st.from_regex(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]",
                                                               fullmatch=True)),
       keys=st.one_of(st.tuples(st.none(), st.none()), st.tuples(TEXT_ARG, SECRET_ARG)),
       endpoint=st.one_of(st.none(), TEXT_ARG,
                          st.sampled_from(["http://h:9000", "https://h/", "ftp://h", "http://",
                                           "http://h:0", "http://h:99999", "http://[::1]:9/"])),
       path_style=ANY_ARG)
@example(root="r", bucket="bucket", keys=("key-id", " secret-pw"), endpoint=None, path_style=False)
@example(root="r", bucket="bucket", keys=("key-id", "pw\ud800secret"), endpoint=None,
         path_style=False)
def test_s3_settings_and_backend_are_valid_or_refused_at_construction(
        root: Any, bucket: Any, keys: tuple[Any, Any], endpoint: Any, path_style: Any) -> None:
    settings_, exc = attempt(lambda: apersist.AwsS3Settings(
        bucket, access_key=keys[0], secret_access_key=keys[1], endpoint=endpoint,
        with_path_style=path_style))
    if exc is None:
        backend, exc = attempt(lambda: apersist.Backend.s3(root, settings_))
    if exc is not None:
        assert str(exc)
        assert not leaks(keys[1], str(exc), (root, bucket, keys[0], endpoint))
        return
    assert settings_.bucket_name == bucket
    assert ".." not in bucket
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket)
    assert (settings_.access_key, settings_.secret_access_key) == keys
    assert settings_.with_path_style is path_style
    assert settings_.endpoint is None or settings_.endpoint == str(endpoint).rstrip("/")
    _check_root(root, backend.root_path)
    hash(backend)
    assert "secret" not in repr(settings_) or keys[1] is None or keys[1] not in repr(settings_)


@SETTINGS
@given(root=ROOT_ARG,
       account=st.one_of(TEXT_ARG, st.from_regex(r"[a-z0-9]{3,24}", fullmatch=True)),
       password=SECRET_ARG,
       container=st.one_of(TEXT_ARG, st.from_regex(r"[a-z0-9](-?[a-z0-9]){2,30}", fullmatch=True)),
       endpoint=st.one_of(st.none(), TEXT_ARG, st.just("http://127.0.0.1:10000/acct/")))
@example(root="r", account="acct", password="secret-pw\n", container="cont", endpoint=None)
@example(root="r", account="acct", password="pw\ud800secret", container="cont", endpoint=None)
def test_azure_backend_is_valid_or_refused_at_construction(
        root: Any, account: Any, password: Any, container: Any, endpoint: Any) -> None:
    backend, exc = attempt(
        lambda: apersist.Backend.azure(root, account, password, container, endpoint=endpoint))
    if exc is not None:
        assert str(exc)
        assert not leaks(password, str(exc), (root, account, container, endpoint))
        return
    assert re.fullmatch(r"[a-z0-9]{3,24}", backend.account)
    assert re.fullmatch(r"[a-z0-9](-?[a-z0-9])+", backend.container)
    assert 3 <= len(backend.container) <= 63
    assert backend.password == password
    assert password.strip() == password
    password.encode("utf-8")
    assert password not in repr(backend)
    assert backend.endpoint == (f"https://{account}.blob.core.windows.net" if endpoint is None
                                else endpoint.rstrip("/"))
    _check_root(root, backend.root_path)


_PATH_PART = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/\0"),
                     min_size=1, max_size=12).filter(lambda p: p not in (".", ".."))


@settings(SETTINGS, max_examples=max(5, EXAMPLES // 4))  # each example is a filesystem run
@given(parts=st.lists(_PATH_PART, min_size=1, max_size=3))
def test_a_filesystem_backend_with_unicode_parts_opens_and_round_trips(parts: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="apersist-bad-") as tmp:
        backend = apersist.Backend.filesystem(os.path.join(tmp, "s", *parts))
        assert backend.path.is_absolute()

        async def scenario() -> None:
            async with apersist.run(apersist.Config(backend)) as run:
                await run.stream("s").record(parts, offset=len(parts))
            events = await read_back(backend, "s")
            assert [(e.value, e.offset) for e in events] == [(parts, len(parts))]

        asyncio.run(scenario())


def test_datetime_and_decimal_atoms_are_what_the_strategies_say() -> None:
    # Guards the oracle: the expectations above rest on these orjson behaviours.
    import orjson

    assert orjson.loads(orjson.dumps(datetime.datetime(1, 1, 1, 0, 0, 0, 5))) == \
        datetime.datetime(1, 1, 1, 0, 0, 0, 5).isoformat()
    with pytest.raises(TypeError):
        orjson.dumps(decimal.Decimal(1))
    assert orjson.dumps(uuid.UUID(int=5)) == b'"%s"' % str(uuid.UUID(int=5)).encode()
    assert orjson.dumps(_deep(MAX_DEPTH, 0))
    with pytest.raises(TypeError):
        orjson.dumps(_deep(MAX_DEPTH + 1, 0))
