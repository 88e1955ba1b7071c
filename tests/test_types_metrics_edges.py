"""Hostile review of values of the user's types (``type=``, ``codec=``) and of metrics.

Each test states a promise of docs/api.md ("Values of your types") or docs/operations.md
("Metrics") that a hostile user can break: a typed value either round-trips exactly or is
refused at the call, never accepted and then lost, altered, or left to fail every later
replay; events are counted once for what a replay hands on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pydantic
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import apersist


async def _round_trip(tp: Any, values: list[Any]) -> list[Any]:
    """Record ``values`` on a stream of ``type=tp``, then replay them in a new run."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("s", type=tp)
        for value in values:
            await stream.record(value)
    async with apersist.run(apersist.Config(backend)) as run:
        return [event.value async for event in run.stream("s", type=tp).replay()]


async def _refused_or_round_trips(tp: Any, value: Any) -> None:
    """The issue's rule: refused at the call (TypeError), or given back equal."""
    try:
        replayed = await _round_trip(tp, [value])
    except TypeError:
        return
    assert replayed == [value]


# ------------------------------------------------------------------ dates and times


@dataclasses.dataclass(frozen=True)
class Trade:
    day: dt.date  # a datetime is a date: mypy takes one here


async def test_a_datetime_in_a_date_field_round_trips() -> None:
    """A ``datetime`` is a ``date`` (mypy --strict accepts it in a ``date`` field). It was
    stored as datetime text, and every replay failed: ``date.fromisoformat`` refuses it."""
    value = Trade(dt.datetime(2026, 1, 5, 9, 30, tzinfo=dt.UTC))
    await _refused_or_round_trips(Trade, value)


@dataclasses.dataclass(frozen=True)
class Stamp:
    at: dt.datetime


@pytest.mark.xfail(strict=True, reason="a documented limit (docs/api.md, Values of your "
                   "types): UTC offsets are stored to the minute, as RFC 3339 writes them")
async def test_an_offset_with_seconds_keeps_its_instant() -> None:
    """orjson writes a UTC offset in whole minutes (+05:45:30 as +05:46): the replayed
    datetime was 30 seconds off, silently. Offsets with seconds are real: every zone's
    local mean time before its standard time (Europe/Amsterdam until 1937: +00:19:32)."""
    tz = dt.timezone(dt.timedelta(hours=5, minutes=45, seconds=30))
    value = Stamp(dt.datetime(2026, 1, 1, 12, 0, tzinfo=tz))
    try:
        replayed = await _round_trip(Stamp, [value])
    except TypeError:
        return
    assert replayed[0].at == value.at, (replayed[0].at - value.at)


# ------------------------------------------------------------------ dataclass shapes


@dataclasses.dataclass
class WithDerived:
    qty: int

    def __post_init__(self) -> None:
        self.doubled = self.qty * 2  # an attribute that is not a field


async def test_an_attribute_set_in_post_init_does_not_break_replay() -> None:
    """orjson writes every attribute in ``__dict__``, not the fields: ``doubled`` was
    stored, and replay called ``WithDerived(qty=1, doubled=2)``: a poison event."""
    await _refused_or_round_trips(WithDerived, WithDerived(1))


@dataclasses.dataclass(frozen=True)
class Private:
    _secret: int
    shown: int


@dataclasses.dataclass(frozen=True)
class PrivateWithDefault:
    shown: int
    _rate: int = 5


async def test_a_field_named_with_an_underscore_is_kept_or_refused() -> None:
    """orjson leaves out attributes whose names start with "_": the field was dropped,
    replay then failed (no default) or, worse, gave back the default silently."""
    await _refused_or_round_trips(Private, Private(3, 4))
    await _refused_or_round_trips(PrivateWithDefault, PrivateWithDefault(1, 9))


@dataclasses.dataclass
class Scaled:
    qty: int
    scale: dataclasses.InitVar[int]

    def __post_init__(self, scale: int) -> None:
        self.qty *= scale


async def test_a_required_init_var_is_refused_at_the_call() -> None:
    """An InitVar is not stored (it is not a field), so a class with a required one can
    never be rebuilt: recorded fine, every replay failed."""
    await _refused_or_round_trips(Scaled, Scaled(2, 3))


@dataclasses.dataclass(frozen=True)
class Base:
    qty: int


@dataclasses.dataclass(frozen=True)
class Derived(Base):
    note: str = ""


async def test_a_subclass_value_does_not_poison_the_stream() -> None:
    """``Stream[Base].record(Derived(...))`` type-checks and passed the call's isinstance
    test; its extra field was stored and replay called ``Base(qty=1, note='x')``."""
    try:
        replayed = await _round_trip(Base, [Derived(1, "x")])
    except TypeError:
        return
    assert [item.qty for item in replayed] == [1]


class Pair(enum.Enum):
    LOW = (0, 10)
    HIGH = (10, 100)


@dataclasses.dataclass(frozen=True)
class Band:
    pair: Pair


async def test_an_enum_whose_value_json_cannot_give_back_is_refused_or_round_trips() -> None:
    """orjson writes an enum as its value: a tuple came back a list, and
    ``Pair([0, 10])`` failed every replay."""
    await _refused_or_round_trips(Band, Band(Pair.LOW))


# ------------------------------------------------------------------ NaN anywhere in it


@dataclasses.dataclass(frozen=True)
class Readings:
    values: frozenset[float]


class Quote(pydantic.BaseModel):
    price: float


class Tick(msgspec.Struct):
    price: float


@dataclasses.dataclass(frozen=True)
class Holder:
    quote: Quote | None = None
    tick: Tick | None = None


async def test_nan_in_a_set_field_is_refused() -> None:
    """docs/api.md: NaN and infinities "anywhere in it" are refused at the call. In a set
    field they were written as null and replayed as None, silently."""
    with pytest.raises(TypeError, match="NaN"):
        await _round_trip(Readings, [Readings(frozenset([1.0, float("nan")]))])


async def test_nan_in_a_nested_model_is_refused() -> None:
    """A pydantic or msgspec model inside a dataclass: NaN was stored as null, and every
    replay failed (the model refuses None for a float)."""
    with pytest.raises(TypeError, match="NaN"):
        await _round_trip(Holder, [Holder(quote=Quote(price=float("inf")))])
    with pytest.raises(TypeError, match="NaN"):
        await _round_trip(Holder, [Holder(tick=Tick(price=float("nan")))])


# ------------------------------------------------------------------ types that are not classes


async def test_a_value_of_another_type_is_refused_for_a_union_or_generic_type() -> None:
    """docs/api.md: a value of another type raises TypeError at the call. For ``type=``
    an ``X | None`` or a ``list[X]``, nothing was checked: a dict was stored, and every
    replay of the stream failed."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        optional = run.stream("optional", type=Base | None)  # type: ignore[call-overload]
        with pytest.raises(TypeError, match="stream 'optional'"):
            await optional.record({"qty": 1})
        await optional.record(None)
        await optional.record(Base(2))
        several = run.stream("several", type=list[Base])  # type: ignore[call-overload]
        with pytest.raises(TypeError, match="stream 'several'"):
            await several.record({"qty": 1})
        await several.record([Base(3)])
    async with apersist.run(apersist.Config(backend)) as run:
        assert [e.value async for e in run.stream("optional", type=Base | None).replay()] == [  # type: ignore[call-overload]
            None, Base(2)]
        assert [e.value async for e in run.stream("several", type=list[Base]).replay()] == [  # type: ignore[call-overload]
            [Base(3)]]


# ------------------------------------------------------------------ metrics


def _points(reader: InMemoryMetricReader) -> dict[tuple[str, frozenset[tuple[str, Any]]], Any]:
    found: dict[tuple[str, frozenset[tuple[str, Any]]], Any] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = (point.count, point.sum) if hasattr(point, "count") else point.value
                    found[metric.name, frozenset(point.attributes.items())] = value
    return found


class _ReaderFailed(Exception):
    pass


async def test_a_reconnecting_source_counts_its_replay_once() -> None:
    """docs/api.md: a service catches its reader's error and calls ``source()`` again; the
    later calls replay nothing already yielded. ``apersist.events.replayed`` counts what
    a replay handed on, yet each reconnect counted the whole replay again (3 calls of a
    1000-event replay: 3000)."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream("s").record_many([{"i": i} for i in range(1000)])

    async def flaky(offset: Any) -> AsyncIterator[Any]:
        yield {"i": -1}
        raise _ReaderFailed

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    handed_on = 0
    async with apersist.run(apersist.Config(backend), meter_provider=provider) as run:
        for _ in range(3):
            try:
                async for event in run.source("s", flaky):
                    handed_on += event.replayed
            except _ReaderFailed:
                pass
    attrs = frozenset({"apersist.backend": "memory", "apersist.stream": "s"}.items())
    assert handed_on == 1000
    assert _points(reader)["apersist.events.replayed", attrs] == handed_on
    assert _points(reader)["apersist.replay.remaining", attrs] == 0


# ------------------------------------------------------------------ tables


async def test_a_table_that_fails_to_take_its_type_is_left_as_it_was() -> None:
    """A table opened untyped (by ``run.compact()``, or an earlier call) takes its type at
    a later ``run.table(name, type=...)``, which decodes its values. One value that does
    not fit raised ValueError, but the values before it were decoded already: the table
    held a mix, and once the bad key was fixed, every later call failed on the decoded
    ones ("expected a JSON object for Base: got=Base")."""
    async with apersist.run(apersist.Config(apersist.Backend.memory())) as run:
        table = await run.table("t")
        table["a"] = {"qty": 1}
        table["b"] = 5  # does not fit Base
        with pytest.raises(ValueError, match="key 'b'"):
            await run.table("t", type=Base)
        assert table["a"] == {"qty": 1}  # untouched: the table is still untyped
        del table["b"]
        typed = await run.table("t", type=Base)
        assert dict(typed) == {"a": Base(1)}


async def test_type_any_takes_any_json_value() -> None:
    """``type=Any`` (and ``Any | None``) is a JSON value taken as stored, as an ``Any``
    field is. On Python 3.11 ``typing.Any`` is a class, so the call's check ran
    ``isinstance(value, Any)``, which raises: every record() of the stream failed with
    "cannot serialize value ...: typing.Any cannot be used with isinstance()"."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream("any", type=Any).record({"a": 1})
        await run.stream("maybe", type=Any | None).record([1, "x"])  # type: ignore[call-overload]
    async with apersist.run(apersist.Config(backend)) as run:
        assert [e.value async for e in run.stream("any", type=Any).replay()] == [{"a": 1}]


# ------------------------------------------------------------------ pydantic models


class CamelOrder(pydantic.BaseModel):
    order_id: int = pydantic.Field(alias="orderId")  # a camelCase API's model


class StrictOrder(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    qty: int

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def doubled(self) -> int:
        return self.qty * 2


@dataclasses.dataclass(frozen=True)
class Envelope:
    order: CamelOrder


async def test_a_pydantic_model_with_aliases_round_trips() -> None:
    """Stored as ``model_dump(mode="json")`` (by field name), decoded by ``model_validate``
    (by alias): every replay of a model with an alias failed ("orderId: Field required"),
    also inside a dataclass."""
    assert await _round_trip(CamelOrder, [CamelOrder(orderId=5)]) == [CamelOrder(orderId=5)]
    value = Envelope(CamelOrder(orderId=6))
    assert await _round_trip(Envelope, [value]) == [value]


async def test_a_pydantic_model_with_a_computed_field_round_trips() -> None:
    """``model_dump`` writes computed fields; a model that forbids extra input then refused
    its own stored form on every replay."""
    assert await _round_trip(StrictOrder, [StrictOrder(qty=2)]) == [StrictOrder(qty=2)]


# ------------------------------------------------------------------ replay's error


@dataclasses.dataclass(frozen=True)
class Fill:
    at: dt.datetime
    qty: int
    side: str  # a field added without a default, after "qty" was stored without it


async def test_a_value_that_does_not_fit_is_named_by_its_own_position_and_offset() -> None:
    """docs/api.md: the replay's ValueError names the event's position and offset. The
    decoder converts a chunk's dicts in place; looking for the culprit, it decoded those
    again (``fromisoformat`` of a datetime), and named the chunk's first event, with an
    error that was not the event's."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("fills")  # written untyped: by an older version, say
        for i in range(5):
            await stream.record({"at": "2026-01-01T00:00:00", "qty": i, "side": "b"}, offset=i)
        await stream.record({"at": "2026-01-01T00:00:00", "qty": 5}, offset=55)
    async with apersist.run(apersist.Config(backend)) as run:
        with pytest.raises(ValueError, match=r"position=5 offset=55 .*side") as caught:
            await _drain(run.stream("fills", type=Fill).replay())
        assert "fromisoformat" not in str(caught.value)


async def _drain(events: AsyncIterator[Any]) -> None:
    async for _event in events:
        pass


async def test_a_table_taking_its_type_leaves_the_values_it_was_given_alone() -> None:
    """The decoder converts a dict in place: taking a type decoded the very dicts the
    table was given (the caller's own objects), and after a refusal the table, untyped,
    held half-converted dicts that the next try could no longer decode."""
    given = {"at": "2026-01-01T00:00:00", "qty": 1, "side": "b"}
    async with apersist.run(apersist.Config(apersist.Backend.memory())) as run:
        table = await run.table("t")
        table["a"] = given
        table["b"] = {"at": "2026-01-01T00:00:00", "qty": 2}  # no "side": does not fit
        with pytest.raises(ValueError, match="key 'b'"):
            await run.table("t", type=Fill)
        assert given == {"at": "2026-01-01T00:00:00", "qty": 1, "side": "b"}
        assert table["a"] == given
        del table["b"]
        typed = await run.table("t", type=Fill)
        assert dict(typed) == {"a": Fill(dt.datetime(2026, 1, 1), 1, "b")}
        assert given["at"] == "2026-01-01T00:00:00"


class Blob(pydantic.BaseModel):
    data: bytes


async def test_a_pydantic_model_pydantic_cannot_dump_is_refused_naming_the_stream() -> None:
    """pydantic writes ``bytes`` as UTF-8 text by default: binary data made
    ``model_dump`` raise a bare UnicodeDecodeError out of record(), naming neither the
    stream nor what to do, where docs/api.md promises a TypeError naming the stream."""
    async with apersist.run(apersist.Config(apersist.Backend.memory())) as run:
        with pytest.raises(TypeError, match="stream 'blobs'"):
            await run.stream("blobs", type=Blob).record(Blob(data=b"\xff\x00"))
        with pytest.raises(TypeError, match="stream 'blobs'"):
            await run.stream("blobs", type=Blob).record_many([Blob(data=b"\xff")])


async def test_the_replay_backlog_is_empty_once_the_run_has_ended() -> None:
    """``apersist.replay.remaining`` is the backlog of the replays *in progress*. A replay
    iterator still referenced when its run ended (kept on an object, or by a task that
    outlives the block) kept its backlog in the series for as long as it lived: a
    long-lived service's dashboard showed a backlog that nothing would ever drain."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream("s").record_many(list(range(1000)))
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    async with apersist.run(apersist.Config(backend), meter_provider=provider) as run:
        kept = run.stream("s").replay()
        assert (await kept.__anext__()).value == 0
    attrs = frozenset({"apersist.backend": "memory", "apersist.stream": "s"}.items())
    assert _points(reader)["apersist.replay.remaining", attrs] == 0
    assert _points(reader)["apersist.events.replayed", attrs] == 256  # the chunk handed on
    with pytest.raises(RuntimeError, match="the run has ended"):
        await _drain(kept)  # (the rest of the slice in hand, then the refusal)
    assert _points(reader)["apersist.replay.remaining", attrs] == 0
    assert _points(reader)["apersist.events.replayed", attrs] == 256


# ------------------------------------------------------------------ beside the brief


@pytest.mark.parametrize("how", ["replay", "source"])
async def test_a_replay_part_way_through_refuses_at_once_when_the_block_has_ended(how: str) -> None:
    """docs/api.md ("Run"): iterating ``replay()`` or ``source()`` after the block raises
    RuntimeError, "also an iterator that was part-way through when the block ended". Both
    handed on the rest of the slice in hand first (up to 255 more events), checked only
    per chunk."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream("s").record_many(list(range(1000)))

    async def nothing(offset: Any) -> AsyncIterator[Any]:
        for item in ():
            yield item

    async with apersist.run(apersist.Config(backend)) as run:
        kept = run.stream("s").replay() if how == "replay" else run.source("s", nothing)
        assert (await kept.__anext__()).value == 0
    with pytest.raises(RuntimeError, match=f"the run has ended: use {how}\\(\\)"):
        await kept.__anext__()
