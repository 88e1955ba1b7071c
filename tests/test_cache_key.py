"""``@apersist.cached(key=...)``: what identifies a call, for methods and arguments that are not JSON."""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from typing import Any

import anyio
import pytest

import apersist


class Client:
    """Something no cache key could hold: a connection, a session."""

    def __repr__(self) -> str:
        return "<Client>"


class Geocoder:
    """A service object whose methods are cached; ``self`` is not JSON."""

    def __init__(self, region: str) -> None:
        self.region = region
        self.client = Client()
        self.calls: Counter[str] = Counter()

    @apersist.cached(key=lambda self, address: [self.region, address])
    async def lookup(self, address: str) -> dict[str, Any]:
        self.calls[f"lookup {address}"] += 1
        await anyio.lowlevel.checkpoint()
        return {"region": self.region, "address": address.upper()}

    @apersist.cached(name="geocoder-distance", key=lambda self, a, b: sorted([a, b]))
    def distance(self, a: str, b: str) -> int:
        self.calls[f"distance {a} {b}"] += 1
        return abs(len(a) - len(b))


async def test_a_method_is_cached_by_its_key_and_self_reaches_the_key_function(
        backend: apersist.Backend) -> None:
    eu = Geocoder("eu")
    assert inspect.iscoroutinefunction(Geocoder.lookup)
    assert not inspect.iscoroutinefunction(Geocoder.distance)
    assert Geocoder.lookup.__name__ == "lookup"
    async with apersist.run(apersist.Config(backend)) as run:
        assert await eu.lookup("main st") == {"region": "eu", "address": "MAIN ST"}
        assert await eu.lookup("main st") == {"region": "eu", "address": "MAIN ST"}
        assert eu.distance("ab", "abcd") == 2
        assert eu.distance("abcd", "ab") == 2  # the key sorts them: the same call
        assert eu.calls == {"lookup main st": 1, "distance ab abcd": 1}
        assert run.stats["cache_hits"] == 2
        # Another instance with the same region has the same keys, so it shares the entries.
        other = Geocoder("eu")
        assert await other.lookup("main st") == {"region": "eu", "address": "MAIN ST"}
        assert other.calls == {}
        # self.region is part of the key: another region is another entry.
        us = Geocoder("us")
        assert await us.lookup("main st") == {"region": "us", "address": "MAIN ST"}
        assert us.calls == {"lookup main st": 1}
    later = Geocoder("eu")  # a new process would make a new object: the key still matches
    async with apersist.run(apersist.Config(backend)):
        assert await later.lookup("main st") == {"region": "eu", "address": "MAIN ST"}
        assert later.distance("ab", "abcd") == 2
    assert later.calls == {}


async def test_the_key_function_receives_the_arguments_as_the_call_was_made() -> None:
    backend = apersist.Backend.memory()
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    calls: list[str] = []

    def identify(*args: Any, **kwargs: Any) -> Any:
        seen.append((args, kwargs))
        return kwargs.get("sku", args[1] if len(args) > 1 else None)

    @apersist.cached(key=identify)
    def price(client: Client, sku: str, *, currency: str = "EUR") -> float:
        calls.append(sku)
        return 9.5

    client = Client()
    async with apersist.run(apersist.Config(backend)):
        assert price(client, "a-1") == 9.5
        assert price(Client(), sku="a-1") == 9.5       # another client, the same key
        assert price(client, "a-1", currency="USD") == 9.5  # the key leaves currency out
        assert price(client, "b-2") == 9.5
    assert calls == ["a-1", "b-2"]
    assert seen[0] == ((client, "a-1"), {})
    assert seen[2] == ((client, "a-1"), {"currency": "USD"})


async def test_the_default_key_is_the_arguments_as_a_list(backend: apersist.Backend) -> None:
    calls: list[str] = []

    @apersist.cached(name="shared")
    def plain(x: int, *, y: int = 0) -> int:
        calls.append("plain")
        return x + y

    @apersist.cached(name="shared", key=lambda *args, **kwargs: [args, kwargs])
    def keyed(x: int, *, y: int = 0) -> int:
        calls.append("keyed")
        return x + y

    async with apersist.run(apersist.Config(backend)):
        assert plain(1, y=2) == 3
        assert keyed(1, y=2) == 3
    assert calls == ["plain"]


async def test_name_and_version_still_separate_equal_keys(backend: apersist.Backend) -> None:
    calls: list[str] = []

    def make(name: str, version: int) -> Any:
        @apersist.cached(name=name, version=version, key=lambda item: item["id"])
        def enrich(item: dict[str, Any]) -> str:
            calls.append(f"{name}@{version}")
            return f"{name}@{version}:{item['id']}"

        return enrich

    a1, a2, b1 = make("a", 1), make("a", 2), make("b", 1)
    async with apersist.run(apersist.Config(backend)):
        assert a1({"id": 7, "noise": 1}) == "a@1:7"
        assert a1({"id": 7, "noise": 2}) == "a@1:7"
        assert a2({"id": 7}) == "a@2:7"
        assert b1({"id": 7}) == "b@1:7"
    assert calls == ["a@1", "a@2", "b@1"]


async def test_concurrent_calls_with_the_same_key_call_once(backend: apersist.Backend) -> None:
    calls = 0
    release = anyio.Event()

    class Service:
        def __init__(self) -> None:
            self.session = Client()

        @apersist.cached(key=lambda self, user, *, trace=None: user)
        async def profile(self, user: str, *, trace: Client | None = None) -> dict[str, str]:
            nonlocal calls
            calls += 1
            await release.wait()
            return {"user": user}

    results: list[dict[str, str]] = []

    async def call(service: Service) -> None:
        results.append(await service.profile("ada", trace=Client()))

    async with apersist.run(apersist.Config(backend)):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(call, Service())  # other instances and arguments, one key
            await anyio.wait_all_tasks_blocked()
            assert calls == 1
            release.set()
        assert results == [{"user": "ada"}] * 5
    assert calls == 1


async def test_a_key_function_that_raises_gives_a_type_error_naming_it() -> None:
    backend = apersist.Backend.memory()
    calls: list[str] = []

    def by_id(item: dict[str, Any]) -> Any:
        return item["id"]

    @apersist.cached(name="enrich", key=by_id)
    def enrich(item: dict[str, Any]) -> int:
        calls.append("sync")
        return 1

    @apersist.cached(name="enrich-async", key=by_id)
    async def enrich_async(item: dict[str, Any]) -> int:
        calls.append("async")
        return 1

    async with apersist.run(apersist.Config(backend)):
        with pytest.raises(TypeError, match="key function of a cached function raised") as info:
            enrich({"name": "no id"})
        assert "function=enrich key=" in str(info.value)
        assert "by_id" in str(info.value)
        assert "KeyError('id')" in str(info.value)
        assert isinstance(info.value.__cause__, KeyError)
        with pytest.raises(TypeError, match=r"function=enrich-async key=.*by_id"):
            await enrich_async({})
    assert calls == []


@pytest.mark.parametrize("bad", [object(), {1, 2}, float("nan"), {"a": float("inf")},
                                 Client()])
async def test_a_key_that_is_not_json_gives_a_type_error_naming_the_key_function(
        bad: Any) -> None:
    backend = apersist.Backend.memory()
    calls: list[int] = []

    @apersist.cached(name="bad-key", key=lambda x: bad)
    def fn(x: int) -> int:
        calls.append(x)
        return x

    @apersist.cached(name="bad-key-async", key=lambda x: bad)
    async def afn(x: int) -> int:
        calls.append(x)
        return x

    async with apersist.run(apersist.Config(backend)):
        with pytest.raises(TypeError, match=r"the key of a call of bad-key: .*key=.*<lambda>"):
            fn(1)
        with pytest.raises(TypeError, match=r"the key of a call of bad-key-async: "):
            await afn(1)
    assert calls == []


async def test_a_key_function_that_returns_an_awaitable_is_refused() -> None:
    backend = apersist.Backend.memory()
    async def later() -> int:
        return 1

    @apersist.cached(name="awaited-key", key=lambda x: later())
    def fn(x: int) -> int:
        return x

    async with apersist.run(apersist.Config(backend)):
        # The coroutine is closed, not left to warn "never awaited" (warnings are errors here).
        with pytest.raises(TypeError, match="not an awaitable: function=awaited-key"):
            fn(1)


def test_bad_key_arguments_are_refused_at_decoration() -> None:
    with pytest.raises(TypeError, match="key must be a function"):
        apersist.cached(key="id")  # type: ignore[arg-type]

    async def async_key(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"not an async one: key=.*async_key"):
        apersist.cached(key=async_key)


def test_outside_a_run_the_key_function_is_not_called() -> None:
    keyed: list[Any] = []

    def key(x: Any) -> Any:
        keyed.append(x)
        raise AssertionError("not called outside a run")

    @apersist.cached(key=key)
    def fn(x: Any) -> Any:
        return x

    token = Client()
    assert fn(token) is token
    assert asyncio.run(_call_async(key, token)) is token
    assert keyed == []


async def _call_async(key: Any, value: Any) -> Any:
    @apersist.cached(key=key)
    async def fn(x: Any) -> Any:
        return x

    return await fn(value)


async def test_static_and_class_methods_can_be_cached_from_either_side(
        backend: apersist.Backend) -> None:
    calls: Counter[str] = Counter()

    class Rates:
        factor = 3

        @apersist.cached
        @staticmethod
        def outer_static(x: int) -> int:
            calls["outer_static"] += 1
            return x + 1

        @staticmethod
        @apersist.cached
        def inner_static(x: int) -> int:
            calls["inner_static"] += 1
            return x + 2

        @apersist.cached(key=lambda cls, x: [cls.factor, x])
        @classmethod
        async def scaled(cls, x: int) -> int:
            calls["scaled"] += 1
            return x * cls.factor

    async with apersist.run(apersist.Config(backend)):
        for _ in range(2):
            assert Rates.outer_static(1) == 2
            assert Rates().outer_static(1) == 2
            assert Rates.inner_static(1) == 3
            assert await Rates.scaled(2) == 6
            assert await Rates().scaled(2) == 6
    assert calls == {"outer_static": 1, "inner_static": 1, "scaled": 1}
    assert isinstance(Rates.__dict__["outer_static"], staticmethod)
    assert isinstance(Rates.__dict__["scaled"], classmethod)


async def test_a_method_without_key_says_how_to_choose_one() -> None:
    backend = apersist.Backend.memory()
    class Plain:
        @apersist.cached
        def method(self, x: int) -> int:
            return x

    async with apersist.run(apersist.Config(backend)):
        with pytest.raises(TypeError, match=r"arguments of a call of .*Plain\.method .*key="):
            Plain().method(1)
