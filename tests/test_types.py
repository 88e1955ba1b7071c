"""Values of the user's types: ``type=`` and ``codec=`` live and replayed, and typed for mypy.

This file is also checked by ``mypy --strict`` (pyproject's ``files``): ``assert_type``
states what mypy must infer for user code, and each ``# type: ignore[...]`` marks a call
mypy must refuse (strict mode fails on an ignore that is not needed).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import math
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, NewType, TypeVar, assert_type

import msgspec
import pydantic
import pytest

import apersist
from apersist import Batch, Event, Stream, Table

UTC = dt.UTC
Cents = NewType("Cents", decimal.Decimal)


class Side(enum.Enum):
    BUY = "buy"
    SELL = "sell"


@dataclasses.dataclass(frozen=True)
class Leg:
    venue: str
    fee: decimal.Decimal


@dataclasses.dataclass(frozen=True)
class Order:
    id: uuid.UUID
    qty: int
    price: decimal.Decimal
    at: dt.datetime
    side: Side = Side.BUY
    day: dt.date | None = None
    cutoff: dt.time | None = None
    note: bytes = b""
    legs: list[Leg] = dataclasses.field(default_factory=list)
    fees: dict[str, decimal.Decimal] = dataclasses.field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    pair: tuple[int, decimal.Decimal] = (0, decimal.Decimal(0))


def order(i: int) -> Order:
    return Order(id=uuid.UUID(int=i), qty=i, price=decimal.Decimal(f"{i}.10"),
                 at=dt.datetime(2026, 1, 1, 12, i % 60, 0, 123_456, tzinfo=UTC),
                 side=Side.SELL if i % 2 else Side.BUY, day=dt.date(2026, 2, 1 + i % 28),
                 cutoff=dt.time(9, 30), note=bytes([i % 256, 0, 255]),
                 legs=[Leg("xnys", decimal.Decimal("0.001"))],
                 fees={"broker": decimal.Decimal("1E-8")}, tags=frozenset({"a", "b"}),
                 pair=(i, decimal.Decimal("-0.5")))


def reader_of(orders: list[Order]) -> Any:
    async def read(offset: int | None) -> AsyncIterator[tuple[Order, int]]:
        start = 0 if offset is None else offset + 1
        for index in range(start, len(orders)):
            yield orders[index], index
    return read


def memory_config(**kwargs: Any) -> tuple[apersist.Backend, apersist.Config]:
    backend = apersist.Backend.memory()
    return backend, apersist.Config(backend, **kwargs)


T = TypeVar("T")


async def recorded_then_replayed(value: T, stream: str, cls: type[T]) -> apersist.Event[T]:
    """``value`` recorded on a stream typed ``cls`` by one run, replayed by the next: the
    stream's one event."""
    _, config = memory_config()
    async with apersist.run(config) as run:
        await run.stream(stream, type=cls).record(value)
    async with apersist.run(config) as run:
        [event] = [e async for e in run.stream(stream, type=cls).replay()]
    return event


# ----------------------------------------------------------------------------- sources


async def test_a_dataclass_feed_replays_as_the_same_type_after_a_restart(
        backend: apersist.Backend) -> None:
    orders = [order(i) for i in range(5)]
    config = apersist.Config(backend)
    async with apersist.run(config) as run:
        live: list[Event[Order]] = []
        async for event in run.source("orders", reader_of(orders[:3]), type=Order):
            assert_type(event, Event[Order])
            live.append(event)
    # The value the reader yielded, handed over as is.
    assert [e.value for e in live] == orders[:3]
    assert all(e.value is o for e, o in zip(live, orders, strict=False))
    async with apersist.run(config) as run:
        events = [e async for e in run.source("orders", reader_of(orders), type=Order)]
    assert [e.replayed for e in events] == [True] * 3 + [False] * 2
    assert [e.value for e in events] == orders
    assert all(type(e.value) is Order for e in events)
    assert [e.offset for e in events] == [0, 1, 2, 3, 4]
    first = events[0].value
    assert first.price == decimal.Decimal("0.10")
    assert str(first.price) == "0.10"
    assert first.at.tzinfo is not None
    assert first.at.microsecond == 123_456
    assert type(first.legs[0]) is Leg
    assert type(first.fees["broker"]) is decimal.Decimal


async def test_a_naive_datetime_and_an_aware_one_keep_their_kind() -> None:
    @dataclasses.dataclass
    class Tick:
        naive: dt.datetime
        aware: dt.datetime

    tick = Tick(dt.datetime(2026, 3, 1, 8), dt.datetime(2026, 3, 1, 8, tzinfo=dt.timezone(
        dt.timedelta(hours=5, minutes=30))))
    event = await recorded_then_replayed(tick, "ticks", Tick)
    assert event.value == tick
    assert event.value.naive.tzinfo is None
    assert event.value.aware.utcoffset() == dt.timedelta(hours=5, minutes=30)


async def test_record_record_many_and_batches_store_typed_values() -> None:
    _, config = memory_config()
    orders = [order(i) for i in range(600)]
    async with apersist.run(config) as run:
        stream = run.stream("orders", type=Order)
        assert_type(stream, Stream[Order])
        await stream.record(orders[0])
        await stream.record(orders[1], offset=1)
        await stream.record_many(orders[2:300], offsets=range(2, 300))

        async def pages(offset: int | None) -> AsyncIterator[tuple[list[Order], int]]:
            yield orders[300:], 599

        async for batch in run.source_batches("orders", pages, type=Order):
            assert_type(batch, Batch[Order])
            assert batch.values == orders[300:]
            assert not batch.replayed
    async with apersist.run(config) as run:
        replayed = [e.value async for e in run.stream("orders", type=Order).replay()]
        batches = [b async for b in run.source_batches("orders", pages, type=Order)]
    assert replayed == orders
    assert all(type(v) is Order for v in replayed)
    assert [v for b in batches if b.replayed for v in b.values] == orders


async def test_a_typed_source_in_realtime_replay_and_without_recording() -> None:
    backend, config = memory_config()
    orders = [order(i) for i in range(3)]
    async with apersist.run(config) as run:
        [e async for e in run.source("orders", reader_of(orders), type=Order)]
    realtime = apersist.Config(backend, persistence_mode=apersist.PersistenceMode.REALTIME_REPLAY,
                               continue_after_replay=False)
    async with apersist.run(realtime) as run:
        assert [e.value async for e in run.source("orders", reader_of(orders), type=Order)] == orders
    caching = apersist.Config(apersist.Backend.memory(),
                              persistence_mode=apersist.PersistenceMode.UDF_CACHING)
    async with apersist.run(caching) as run:
        events = [e async for e in run.source("orders", reader_of(orders), type=Order)]
    assert [e.value for e in events] == orders
    assert not any(e.replayed for e in events)


# ----------------------------------------------------------------------------- tables


async def test_a_typed_table_reopens_with_values_of_its_type(backend: apersist.Backend) -> None:
    config = apersist.Config(backend)
    async with apersist.run(config) as run:
        table = await run.table("open-orders", type=Order)
        assert_type(table, Table[Order])
        for i in range(4):
            table[str(i)] = order(i)
        del table["3"]
        got = table.get("0")
        assert_type(got, Order | None)
    async with apersist.run(config) as run:
        table = await run.table("open-orders", type=Order)
        assert dict(table) == {str(i): order(i) for i in range(3)}
        assert all(type(v) is Order for v in table.values())
        await run.compact()  # a snapshot written from the typed records
    async with apersist.run(config) as run:
        assert dict(await run.table("open-orders", type=Order)) == {
            str(i): order(i) for i in range(3)}


async def test_a_table_opened_by_compact_takes_its_type_later() -> None:
    _, config = memory_config()
    async with apersist.run(config) as run:
        (await run.table("t", type=Order))["a"] = order(1)
    async with apersist.run(config) as run:
        await run.compact()  # opens every stored table, without a type
        table = await run.table("t", type=Order)
        assert table["a"] == order(1)
        table["b"] = order(2)
    async with apersist.run(config) as run:
        assert dict(await run.table("t", type=Order)) == {"a": order(1), "b": order(2)}


async def test_a_table_refuses_a_value_of_another_type() -> None:
    _, config = memory_config()
    async with apersist.run(config) as run:
        table = await run.table("t", type=Order)
        with pytest.raises(TypeError, match=r"table 't'.*expected a value of type Order: got=dict"):
            table["x"] = {"qty": 1}  # type: ignore[assignment]
        assert "x" not in table
        with pytest.raises(TypeError, match=r"table 't' already has a type.*has=Order asked=Leg"):
            await run.table("t", type=Leg)


async def test_a_stored_table_value_that_does_not_fit_names_the_key() -> None:
    _, config = memory_config()
    async with apersist.run(config) as run:
        (await run.table("t"))["k"] = {"venue": "x"}
    async with apersist.run(config) as run:
        with pytest.raises(ValueError, match=r"cannot decode a stored value of table 't' \(key 'k'\) "
                                             r"as Leg: error=.*fee"):
            await run.table("t", type=Leg)


# ----------------------------------------------------------------------------- errors


async def test_a_stream_has_one_type_per_run() -> None:
    _, config = memory_config()
    async with apersist.run(config) as run:
        stream = run.stream("s", type=Order)
        assert run.stream("s", type=Order) is stream
        assert run.stream("s") is stream  # no type: whatever it has
        with pytest.raises(TypeError, match=r"stream 's' already has a type in this run: "
                                            r"has=Order asked=Leg"):
            run.stream("s", type=Leg)
        with pytest.raises(TypeError, match=r"has=Order asked=Leg"):
            run.source("s", reader_of([]), type=Leg)
        # A stream opened without a type takes the first one given.
        untyped = run.stream("u")
        await untyped.record({"venue": "v", "fee": "1"})
        assert run.stream("u", type=Leg) is untyped
        await untyped.record(Leg("w", decimal.Decimal(2)))
    async with apersist.run(config) as run:
        assert [e.value async for e in run.stream("u", type=Leg).replay()] == [
            Leg("v", decimal.Decimal(1)), Leg("w", decimal.Decimal(2))]


async def test_a_value_of_another_type_is_refused_at_the_call() -> None:
    _, config = memory_config()
    async with apersist.run(config) as run:
        stream = run.stream("s", type=Leg)
        with pytest.raises(TypeError, match=r"stream 's'.*expected a value of type Leg: got=dict"):
            await stream.record({"venue": "v"})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"for stream 's': expected a value of type Leg: got=dict"):
            await stream.record({"venue": "v"}, offset=3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"stream 's' \(batch index 1\): expected a value of "
                                            r"type Leg: got=str"):
            await stream.record_many([Leg("a", decimal.Decimal(1)), "x"])  # type: ignore[list-item]
        assert [e async for e in stream.replay()] == []
        with pytest.raises(TypeError, match=r"stream 's'.*expected a value of type Leg: got=int"):
            [e async for e in run.source("s", reader_of([7]), type=Leg)]  # type: ignore[list-item]
    async with apersist.run(config) as run:
        assert [e async for e in run.stream("s", type=Leg).replay()] == []


@pytest.mark.parametrize(("value", "advice"), [
    (decimal.Decimal("1.10"), r"decimal\.Decimal: store str\(value\), or give type= a dataclass"),
    (b"\x00", r"bytes: store base64 text, or give type= a dataclass whose field is bytes"),
    ({"a": {1, 2}}, r"set: store a sorted list"),
])
async def test_untyped_values_json_has_no_form_for_say_how_to_store_them(
        value: Any, advice: str) -> None:
    _, config = memory_config()
    async with apersist.run(config) as run:
        with pytest.raises(TypeError, match=r"cannot serialize value for stream 's': .*" + advice):
            await run.stream("s").record(value)
        with pytest.raises(TypeError, match=r"cannot serialize value for table 't': .*" + advice):
            (await run.table("t"))["k"] = value


async def test_a_stored_value_that_does_not_fit_names_stream_position_and_offset() -> None:
    _, config = memory_config()
    async with apersist.run(config) as run:
        stream = run.stream("s")
        for i in range(300):
            await stream.record({"venue": "v", "fee": str(i)}, offset=i)
        await stream.record({"venue": "v", "fee": "not a number"}, offset=300)
    async with apersist.run(config) as run:
        with pytest.raises(ValueError, match=r"cannot decode a stored value of stream 's' as Leg: "
                                             r"position=300 offset=300 error="):
            [e async for e in run.stream("s", type=Leg).replay()]


class Plain:
    def __init__(self, x: int) -> None:
        self.x = x


def test_types_apersist_cannot_store_are_refused_at_the_call() -> None:
    @dataclasses.dataclass
    class HasPlain:
        inner: Plain

    @dataclasses.dataclass
    class IntKeys:
        counts: dict[int, int]

    from apersist._codec import value_codec

    with pytest.raises(TypeError, match=r"cannot store Plain: type=Plain is not a dataclass.*codec="):
        value_codec(Plain, None)
    with pytest.raises(TypeError, match=r"cannot store field .*HasPlain\.inner: type=Plain"):
        value_codec(HasPlain, None)
    with pytest.raises(TypeError, match=r"JSON object keys are strings"):
        value_codec(IntKeys, None)
    with pytest.raises(TypeError, match=r"give type= or codec=, not both"):
        value_codec(Leg, apersist.Codec(encode=str, decode=str))
    with pytest.raises(TypeError, match=r"codec must be an apersist\.Codec: got=tuple"):
        value_codec(None, (str, str))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Codec\.decode must be callable: got=int"):
        apersist.Codec(encode=str, decode=3)  # type: ignore[arg-type]


async def test_refused_types_fail_at_run_stream_source_and_table() -> None:
    _, config = memory_config()
    async with apersist.run(config) as run:
        with pytest.raises(TypeError, match="cannot store Plain"):
            run.stream("s", type=Plain)
        with pytest.raises(TypeError, match="cannot store Plain"):
            run.source("s", reader_of([]), type=Plain)
        with pytest.raises(TypeError, match="cannot store Plain"):
            await run.table("t", type=Plain)
        assert "t" not in run._tables


async def test_nan_in_a_typed_value_is_refused() -> None:
    @dataclasses.dataclass
    class Reading:
        value: float

    _, config = memory_config()
    async with apersist.run(config) as run:
        with pytest.raises(TypeError, match=r"stream 's'.*NaN and infinity"):
            await run.stream("s", type=Reading).record(Reading(math.nan))
        with pytest.raises(TypeError, match=r"table 't'.*NaN and infinity"):
            (await run.table("t", type=Reading))["k"] = Reading(math.inf)
        with pytest.raises(TypeError, match=r"stream 'q'.*NaN and infinity"):
            await run.stream("q", type=Quote).record(Quote(
                symbol="X", bid=decimal.Decimal(1), at=dt.datetime(2026, 1, 1), ref=uuid.UUID(int=0),
                weight=math.nan))


async def test_a_type_that_refers_to_itself() -> None:
    @dataclasses.dataclass
    class Node:
        name: str
        weight: decimal.Decimal
        children: list[Node] = dataclasses.field(default_factory=list)

    tree = Node("root", decimal.Decimal("1.5"), [Node("leaf", decimal.Decimal("0.25"))])
    event = await recorded_then_replayed(tree, "s", Node)
    assert event.value == tree
    assert type(event.value.children[0]) is Node


# ----------------------------------------------------------------------------- other types


class Quote(pydantic.BaseModel):
    symbol: str
    bid: decimal.Decimal
    at: dt.datetime
    ref: uuid.UUID
    weight: float = 1.0


async def test_pydantic_models() -> None:
    quotes = [Quote(symbol="X", bid=decimal.Decimal(f"1.{i}"), at=dt.datetime(2026, 1, 1, tzinfo=UTC),
                    ref=uuid.UUID(int=i)) for i in range(3)]

    async def read(offset: int | None) -> AsyncIterator[Quote]:
        for quote in quotes:
            yield quote

    _, config = memory_config()
    async with apersist.run(config) as run:
        live = [e async for e in run.source("quotes", read, type=Quote)]
        (await run.table("last", type=Quote))["X"] = quotes[-1]
    assert [e.value for e in live] == quotes
    async with apersist.run(config, ) as run:
        replayed = [e async for e in run.stream("quotes", type=Quote).replay()]
        last = (await run.table("last", type=Quote))["X"]
    assert [e.value for e in replayed] == quotes
    assert type(replayed[0].value) is Quote
    assert last == quotes[-1]


async def test_msgspec_structs() -> None:
    class Fill(msgspec.Struct):
        qty: int
        price: decimal.Decimal
        at: dt.datetime

    fills = [Fill(i, decimal.Decimal(f"{i}.5"), dt.datetime(2026, 1, 1, i, tzinfo=UTC))
             for i in range(3)]
    _, config = memory_config()
    async with apersist.run(config) as run:
        await run.stream("fills", type=Fill).record_many(fills)
        (await run.table("t", type=Fill))["a"] = fills[0]
    async with apersist.run(config) as run:
        assert [e.value async for e in run.stream("fills", type=Fill).replay()] == fills
        assert (await run.table("t", type=Fill))["a"] == fills[0]


class Money:
    """A type of the user's own, not a dataclass: stored through a Codec."""

    def __init__(self, cents: int, currency: str) -> None:
        self.cents, self.currency = cents, currency

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (self.cents, self.currency) == (other.cents, other.currency)

    def __hash__(self) -> int:
        return hash((self.cents, self.currency))


MONEY = apersist.Codec[Money](encode=lambda m: [m.cents, m.currency],
                              decode=lambda j: Money(j[0], j[1]))


async def test_a_codec_for_any_other_type() -> None:
    _, config = memory_config()
    async with apersist.run(config) as run:
        stream = run.stream("pay", codec=MONEY)
        assert_type(stream, Stream[Money])
        await stream.record(Money(150, "EUR"))
        assert run.stream("pay", codec=MONEY) is stream
        table = await run.table("balance", codec=MONEY)
        assert_type(table, Table[Money])
        table["alice"] = Money(1, "USD")
    async with apersist.run(config) as run:
        assert [e.value async for e in run.stream("pay", codec=MONEY).replay()] == [Money(150, "EUR")]
        assert (await run.table("balance", codec=MONEY))["alice"] == Money(1, "USD")


async def test_scalar_and_container_types() -> None:
    _, config = memory_config()
    async with apersist.run(config) as run:
        await run.stream("d", type=decimal.Decimal).record(decimal.Decimal("2.50"))
        await run.stream("b", type=bytes).record(b"\xff\x00")
        await run.stream("u", type=uuid.UUID).record(uuid.UUID(int=5))
        await run.stream("t", type=dt.datetime).record(dt.datetime(2026, 1, 1, tzinfo=UTC))
    async with apersist.run(config) as run:
        assert [e.value async for e in run.stream("d", type=decimal.Decimal).replay()] == [
            decimal.Decimal("2.50")]
        assert [e.value async for e in run.stream("b", type=bytes).replay()] == [b"\xff\x00"]
        assert [e.value async for e in run.stream("u", type=uuid.UUID).replay()] == [uuid.UUID(int=5)]
        assert [e.value async for e in run.stream("t", type=dt.datetime).replay()] == [
            dt.datetime(2026, 1, 1, tzinfo=UTC)]


async def test_untyped_streams_are_typed_any() -> None:
    _, config = memory_config()
    async with apersist.run(config) as run:
        stream = run.stream("plain")
        assert_type(stream, Stream[Any])
        assert_type(await run.table("plain"), Table[Any])
        await stream.record({"anything": [1, "json"]})


def test_annotated_fields_and_new_types_decode_by_what_they_wrap() -> None:
    from apersist._codec import value_codec

    @dataclasses.dataclass
    class Priced:
        amount: Annotated[decimal.Decimal, {"unit": "usd"}]
        fee: Cents
        when: Annotated[dt.date | None, "optional"] = None

    codec = value_codec(Priced, None)
    assert codec is not None
    assert codec.decode is not None
    stored = codec.dumps(Priced(decimal.Decimal("1.50"), Cents(decimal.Decimal("0.01")), dt.date(2026, 1, 2)))
    assert stored == b'{"amount":"1.50","fee":"0.01","when":"2026-01-02"}'
    assert codec.decode({"amount": "1.50", "fee": "0.01", "when": "2026-01-02"}) == Priced(
        decimal.Decimal("1.50"), Cents(decimal.Decimal("0.01")), dt.date(2026, 1, 2))
