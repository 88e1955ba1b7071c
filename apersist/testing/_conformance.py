"""The driver conformance suite: ``DRIVER_CHECKS``, ``check_driver`` and ``DriverConformance``.

Every storage driver must pass these checks, the one shared suite that makes every layer
above the drivers work on every backend unchanged. No pytest import here.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from functools import partial
from types import MappingProxyType
from typing import Any, Final, TypeVar

import anyio

from .._drivers.base import (
    Driver,
    ObjectExistsError,
    ObjectNotFoundError,
    capabilities_of,
    put_then_create,
)
from .._errors import BackendError

__all__ = ["DRIVER_CHECKS", "DriverCheck", "DriverConformance", "check_driver"]

_E = TypeVar("_E", bound=BaseException)

#: One conformance check: given a fresh, empty driver, it returns normally or raises
#: ``AssertionError`` (or whatever the driver raised) naming what went wrong.
DriverCheck = Callable[[Driver], Awaitable[None]]

_CHECKS: dict[str, DriverCheck] = {}

#: Every conformance check by name, in the order they run. Read-only.
DRIVER_CHECKS: Final[Mapping[str, DriverCheck]] = MappingProxyType(_CHECKS)

_MIB: Final = 1 << 20


def _check(fn: DriverCheck) -> DriverCheck:
    """Register ``fn`` as a conformance check under its own name."""
    _CHECKS[getattr(fn, "__name__", repr(fn))] = fn
    return fn


# --------------------------------------------------------------------------- helpers


def _show(data: object) -> str:
    if isinstance(data, bytes | bytearray | memoryview) and len(data) > 32:
        return f"<{len(data)} bytes starting {bytes(data[:16])!r}>"
    return repr(data)


def _expect(condition: bool, message: str) -> None:
    # Not ``assert``: these checks must still check under ``python -O``.
    if not condition:
        raise AssertionError(message)


def _expect_equal(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}: got {_show(actual)}, expected {_show(expected)}")


def _expect_bytes(actual: object, expected: bytes, what: str) -> None:
    _expect(type(actual) is bytes, f"{what}: get returned {type(actual).__name__}, not bytes")
    _expect_equal(actual, expected, what)


async def _expect_raises(exc_type: type[_E], call: Callable[[], Awaitable[object]], what: str) -> _E:
    """Await ``call()`` and return the ``exc_type`` it raised; anything else is a failure."""
    try:
        await call()
    except exc_type as exc:
        return exc
    except Exception as exc:
        raise AssertionError(f"{what}: expected {exc_type.__name__}, "
                             f"got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{what}: expected {exc_type.__name__}, but nothing was raised")


async def _listing(driver: Driver, prefix: str) -> list[tuple[str, int]]:
    return [(info.key, info.size) async for info in driver.list(prefix)]


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# --------------------------------------------------------------------------- put / get


@_check
async def put_get_round_trip(driver: Driver) -> None:
    """``put`` then ``get`` returns exactly the bytes stored: empty, one byte, every byte value."""
    cases = {
        "empty": b"",
        "one-byte": b"\x00",
        "all-byte-values": bytes(range(256)) * 3,
        "json": b'{"a":[1,2,3],"b":"\xc3\xa9"}',
    }
    for name, data in cases.items():
        await driver.put(f"round-trip/{name}", data)
    for name, data in cases.items():
        _expect_bytes(await driver.get(f"round-trip/{name}"), data, f"get after put key=round-trip/{name}")
    _expect_equal(await _listing(driver, "round-trip/"),
                  sorted((f"round-trip/{name}", len(data)) for name, data in cases.items()),
                  "list after put")


@_check
async def put_get_large(driver: Driver) -> None:
    """A several-MiB object round-trips whole and in ranges (multipart-sized objects)."""
    data = _payload(5 * _MIB + 7, seed=1)
    await driver.put("large/object", data)
    _expect_bytes(await driver.get("large/object"), data, "get of a 5 MiB object")
    _expect_bytes(await driver.get("large/object", start=_MIB - 3, end=3 * _MIB + 5),
                  data[_MIB - 3:3 * _MIB + 5], "ranged get across MiB boundaries")
    _expect_bytes(await driver.get("large/object", start=5 * _MIB), data[5 * _MIB:],
                  "ranged get of the tail")
    _expect_equal(await _listing(driver, "large/"), [("large/object", len(data))], "list size")


@_check
async def put_overwrites(driver: Driver) -> None:
    """A plain ``put`` replaces the whole object, shorter or longer than before."""
    versions = [_payload(3000, seed=2), b"short", _payload(10_000, seed=3), b""]
    for i, data in enumerate(versions):
        await driver.put("over/write", data)
        _expect_bytes(await driver.get("over/write"), data, f"get after overwrite number {i}")
        _expect_equal(await _listing(driver, "over/"), [("over/write", len(data))],
                      f"list after overwrite number {i}")


@_check
async def put_if_absent(driver: Driver) -> None:
    """``if_absent`` creates a missing key and refuses an existing one, leaving it unchanged."""
    first, second = b"first payload", b"second, longer payload"
    await driver.put("create/key", first, if_absent=True)
    _expect_bytes(await driver.get("create/key"), first, "get after if_absent create")
    exc = await _expect_raises(ObjectExistsError,
                               lambda: driver.put("create/key", second, if_absent=True),
                               "if_absent put on an existing key")
    _expect(isinstance(exc, BackendError), "ObjectExistsError must derive from BackendError")
    _expect_bytes(await driver.get("create/key"), first, "content after a refused if_absent put")
    _expect_equal(await _listing(driver, "create/"), [("create/key", len(first))],
                  "list after a refused if_absent put")
    # A plain put still overwrites, and if_absent still refuses the overwritten key.
    await driver.put("create/key", second)
    await _expect_raises(ObjectExistsError, lambda: driver.put("create/key", b"x", if_absent=True),
                         "if_absent put on an overwritten key")
    _expect_bytes(await driver.get("create/key"), second, "content after overwrite")
    # Deleted keys can be created again.
    await driver.delete(["create/key"])
    await driver.put("create/key", b"again", if_absent=True)
    _expect_bytes(await driver.get("create/key"), b"again", "if_absent put after delete")
    # An empty object exists too.
    await driver.put("create/empty", b"", if_absent=True)
    await _expect_raises(ObjectExistsError, lambda: driver.put("create/empty", b"x", if_absent=True),
                         "if_absent put on an existing empty object")
    _expect_bytes(await driver.get("create/empty"), b"", "empty object after a refused if_absent put")


@_check
async def put_if_absent_race(driver: Driver) -> None:
    """Of 16 concurrent ``if_absent`` puts of one key exactly one wins; its bytes are stored."""
    racers = 16
    payloads = [f"racer-{i}:".encode() + bytes([i]) * (4096 + 61 * i) for i in range(racers)]
    outcomes: dict[int, BaseException | None] = {}

    async def race(i: int) -> None:
        try:
            await driver.put("race/key", payloads[i], if_absent=True)
        except Exception as exc:
            outcomes[i] = exc
        else:
            outcomes[i] = None

    async with anyio.create_task_group() as tg:
        for i in range(racers):
            tg.start_soon(race, i)
    winners = [i for i, outcome in outcomes.items() if outcome is None]
    _expect(len(winners) == 1, f"exactly one if_absent racer must win: winners={winners}")
    losers = {i: outcome for i, outcome in outcomes.items() if outcome is not None}
    odd = {i: f"{type(e).__name__}: {e}" for i, e in losers.items() if not isinstance(e, ObjectExistsError)}
    _expect(not odd, f"losing if_absent racers must get ObjectExistsError: {odd}")
    _expect_bytes(await driver.get("race/key"), payloads[winners[0]], "stored bytes are the winner's")


@_check
async def put_is_atomic_for_readers(driver: Driver) -> None:
    """Readers racing with overwrites see one whole version, never a torn or empty mix."""
    versions = [bytes([65 + i]) * (256 * 1024 + 1000 * i) for i in range(6)]
    await driver.put("atomic/key", versions[0])
    seen: list[bytes] = []

    async def write(i: int) -> None:
        await driver.put("atomic/key", versions[i])

    async def read() -> None:
        for _ in range(4):
            seen.append(await driver.get("atomic/key"))

    async with anyio.create_task_group() as tg:
        for i in range(1, len(versions)):
            tg.start_soon(write, i)
            tg.start_soon(read)
    torn = [_show(data) for data in seen if data not in versions]
    _expect(not torn, f"a reader saw a version that was never written: {torn[:3]}")
    _expect(await driver.get("atomic/key") in versions, "final content is one of the versions written")


@_check
async def put_then_create_commits(driver: Driver) -> None:
    """``put_then_create`` (the driver's own verb, or the fallback) stores every object, then
    creates the record; on a taken key it raises ``ObjectExistsError``, record unchanged."""
    puts = [(f"commit/segments/{i}", _payload(100 + 1000 * i, seed=10 + i)) for i in range(3)]
    await put_then_create(driver, puts, "commit/commits/1", b"record one", concurrency=2)
    for key, data in puts:
        _expect_bytes(await driver.get(key), data, f"get of a put of put_then_create key={key}")
    _expect_bytes(await driver.get("commit/commits/1"), b"record one", "get of the created record")
    late = [("commit/segments/3", b"orphan")]
    await _expect_raises(ObjectExistsError,
                         lambda: put_then_create(driver, late, "commit/commits/1", b"record two",
                                                 concurrency=2),
                         "put_then_create on a taken record key")
    _expect_bytes(await driver.get("commit/commits/1"), b"record one",
                  "record after a refused put_then_create")
    # No puts: the create alone. Nothing else (no temporary object) is ever listed.
    await put_then_create(driver, [], "commit/commits/2", b"", concurrency=2)
    listed = [key for key, _ in await _listing(driver, "commit/")]
    _expect(set(listed) <= {*(k for k, _ in puts), *(k for k, _ in late), "commit/commits/1",
                            "commit/commits/2"}, f"list after put_then_create: {listed}")
    _expect("commit/commits/2" in listed, f"record created with no puts is listed: {listed}")


@_check
async def sizes_of_keys(driver: Driver) -> None:
    """A driver that declares ``point_lookups`` answers ``sizes(keys)``: the size of each key
    that exists, and nothing for the others. A driver that does not declare it passes."""
    if not capabilities_of(driver).point_lookups:
        return
    await driver.put("sizes/a", b"12345")
    await driver.put("sizes/b", b"")
    found = await driver.sizes(["sizes/a", "sizes/missing", "sizes/b"])  # type: ignore[attr-defined]
    _expect_equal(found, {"sizes/a": 5, "sizes/b": 0}, "sizes of two present keys and an absent one")


# --------------------------------------------------------------------------- get


@_check
async def get_missing(driver: Driver) -> None:
    """``get`` of an absent key raises ``ObjectNotFoundError``, also where only children exist."""
    exc = await _expect_raises(ObjectNotFoundError, lambda: driver.get("missing/key"),
                               "get of a missing key")
    _expect(isinstance(exc, BackendError), "ObjectNotFoundError must derive from BackendError")
    await _expect_raises(ObjectNotFoundError, lambda: driver.get("missing/key", start=0, end=1),
                         "ranged get of a missing key")
    await driver.put("parent/child/leaf", b"data")
    for key in ("parent", "parent/child", "parent/chil"):
        await _expect_raises(ObjectNotFoundError, partial(driver.get, key),
                             f"get of a key that only prefixes others key={key}")
    await driver.delete(["parent/child/leaf"])
    await _expect_raises(ObjectNotFoundError, lambda: driver.get("parent/child/leaf"),
                         "get after delete")


@_check
async def ranged_get(driver: Driver) -> None:
    """``get(start=, end=)`` returns ``data[start:end]``, clamped at the object's size."""
    data = bytes(range(256)) * 4  # 1024 bytes, every position distinguishable by neighbours
    await driver.put("range/key", data)
    await driver.put("range/empty", b"")
    cases: list[tuple[int | None, int | None]] = [
        (None, None), (0, None), (10, None), (None, 10), (None, 0), (10, 20), (0, 1024),
        (1023, 1024), (0, 0), (5, 5), (1024, 1024), (1000, 2000), (1024, None), (2000, None),
        (2000, 3000), (None, 5000),
    ]
    for start, end in cases:
        _expect_bytes(await driver.get("range/key", start=start, end=end),
                      data[start:end], f"ranged get start={start} end={end}")
    for start, end in [(0, None), (0, 10), (5, None), (0, 0), (None, 3)]:
        _expect_bytes(await driver.get("range/empty", start=start, end=end), b"",
                      f"ranged get of an empty object start={start} end={end}")


@_check
async def ranged_get_invalid(driver: Driver) -> None:
    """Negative or reversed ranges raise ``ValueError``, before any I/O (also for absent keys)."""
    await driver.put("range/key", b"0123456789")
    for key in ("range/key", "range/missing"):
        for start, end in [(-1, None), (None, -1), (5, 4), (-5, -1), (1, 0), (20, 10)]:
            await _expect_raises(
                ValueError,
                partial(driver.get, key, start=start, end=end),
                f"ranged get key={key} start={start} end={end}")
    _expect_bytes(await driver.get("range/key"), b"0123456789", "content after invalid ranged gets")


# --------------------------------------------------------------------------- list


@_check
async def list_prefix(driver: Driver) -> None:
    """``list(prefix)`` yields exactly the keys that start with the string ``prefix``, in order."""
    keys = ["a/b/y", "a/b/z/w", "a/ba", "a/bc/x", "a/c", "ab", "b/a", "a/b0/deep/er/still"]
    sizes = {key: 10 + i for i, key in enumerate(keys)}
    for key in keys:
        await driver.put(key, b"x" * sizes[key])

    def expected(prefix: str) -> list[tuple[str, int]]:
        return sorted((k, sizes[k]) for k in keys if k.startswith(prefix))

    for prefix in ["", "a", "a/", "a/b", "a/b/", "a/b/z", "a/b/z/", "a/b/z/w", "a/bc", "a/b0/deep/",
                   "ab", "b", "b/a", "c", "a/b/y/", "zzz/", "a/b/z/w/x"]:
        _expect_equal(await _listing(driver, prefix), expected(prefix), f"list prefix={prefix!r}")


@_check
async def list_stays_inside_the_store(driver: Driver) -> None:
    """Prefixes that point outside the root (``../``, ``/``) list nothing: keys never escape."""
    await driver.put("inside/key", b"x")
    for prefix in ["../", "..", "../inside", "/", "/inside", "./", "./inside", "inside/../", "inside/./"]:
        _expect_equal(await _listing(driver, prefix), [], f"list prefix={prefix!r}")


@_check
async def list_key_order(driver: Driver) -> None:
    """Listing is in key (code point) order across nested names, not directory by directory."""
    # "d/a-b" and "d/a.x" sort before "d/a/b/c" ("-" and "." < "/"), "d/a0" after it.
    keys = ["d/a-b", "d/a.x", "d/a/a/a", "d/a0", "d/A", "d/aa", "d/b", "d/a/b-c", "d/a/b/c"]
    for i, key in enumerate(reversed(keys)):
        await driver.put(key, bytes(i))
    listed = [key for key, _ in await _listing(driver, "d/")]
    _expect_equal(listed, sorted(keys), "list order")


@_check
async def list_empty(driver: Driver) -> None:
    """An empty store lists nothing, under any prefix; so does a prefix with no keys."""
    for prefix in ["", "a", "a/", "writers/0/commits/"]:
        _expect_equal(await _listing(driver, prefix), [], f"list of an empty store prefix={prefix!r}")
    await driver.put("x/y", b"1")
    _expect_equal(await _listing(driver, "x/z"), [], "list of an unused prefix")
    await driver.delete(["x/y"])
    _expect_equal(await _listing(driver, ""), [], "list after deleting everything")


@_check
async def list_and_delete_many(driver: Driver) -> None:
    """Over a thousand keys list completely and in order (paging), and delete in one call."""
    count = 1010
    keys = [f"many/{i:05d}" for i in range(count)]
    limiter = anyio.Semaphore(32)

    async def put(i: int) -> None:
        async with limiter:
            await driver.put(keys[i], bytes(i % 7))

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(put, i)
    _expect_equal(await _listing(driver, "many/"), [(key, i % 7) for i, key in enumerate(keys)],
                  "list of 1010 keys")
    await driver.delete(keys)
    _expect_equal(await _listing(driver, "many/"), [], "list after deleting 1010 keys in one call")


# --------------------------------------------------------------------------- delete


@_check
async def delete_keys(driver: Driver) -> None:
    """``delete`` removes the keys given and ignores the ones that do not exist."""
    for key in ("del/a", "del/b", "del/c", "del/sub/d"):
        await driver.put(key, key.encode())
    await driver.delete(["del/a", "del/missing", "del/c", "del/a", "nowhere/at/all"])
    _expect_equal(await _listing(driver, "del/"), [("del/b", 5), ("del/sub/d", 9)], "list after delete")
    await _expect_raises(ObjectNotFoundError, lambda: driver.get("del/a"), "get after delete")
    _expect_bytes(await driver.get("del/b"), b"del/b", "an untouched key")
    await driver.delete([])
    await driver.delete(["del/a"])
    await driver.delete(["del/b/under-an-object"])
    await driver.delete(["del/sub/d", "del/b"])
    _expect_equal(await _listing(driver, ""), [], "list after deleting everything")


# --------------------------------------------------------------------------- keys

_INVALID_KEYS: Final = (
    "", "/", "/a", "a/", "a//b", ".", "..", "../a", "a/..", "a/../b", "./a", "a/./b",
    ".tmp-1", "a/.tmp-x", ".tmp-", "a\\b",
)


@_check
async def invalid_keys(driver: Driver) -> None:
    """Keys that could escape the root or collide with temporary files raise ``ValueError``."""
    await driver.put("good/key", b"kept")
    for key in _INVALID_KEYS:
        await _expect_raises(ValueError, partial(driver.put, key, b"x"), f"put key={key!r}")
        await _expect_raises(ValueError, partial(driver.put, key, b"x", if_absent=True),
                             f"if_absent put key={key!r}")
        await _expect_raises(ValueError, partial(driver.get, key), f"get key={key!r}")
        await _expect_raises(ValueError, partial(driver.delete, [key]), f"delete key={key!r}")
        # Keys are checked before anything is deleted.
        await _expect_raises(ValueError, partial(driver.delete, ["good/key", key]),
                             f"delete of a valid and an invalid key={key!r}")
    _expect_equal(await _listing(driver, ""), [("good/key", 4)], "store after invalid keys")


@_check
async def unusual_key_characters(driver: Driver) -> None:
    """Keys with spaces, non-ASCII and URL-special characters round-trip and list verbatim."""
    keys = ["chars/with space", "chars/ünïcødé-键", "chars/a=b+c,d;e@f~g!h'i(j)k", "chars/100%",
            "chars/q?x#y&z", "chars/..dots..", "chars/.hidden", "chars/tmp-x.tmp-"]
    for key in keys:
        await driver.put(key, key.encode())
    for key in keys:
        _expect_bytes(await driver.get(key), key.encode(), f"get key={key!r}")
    _expect_equal(await _listing(driver, "chars/"), sorted((k, len(k.encode())) for k in keys),
                  "list of unusual keys")


# --------------------------------------------------------------------------- lifecycle


@_check
async def aclose_twice(driver: Driver) -> None:
    """``aclose()`` may be called more than once."""
    await driver.put("close/key", b"x")
    await driver.aclose()
    await driver.aclose()


@_check
async def use_after_aclose(driver: Driver) -> None:
    """After ``aclose()`` every verb raises ``RuntimeError``, in every driver: using a closed
    driver is the caller's mistake, never an answer or a failure of the store."""
    await driver.put("closed/key", b"x")
    await driver.aclose()
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "put": lambda: driver.put("closed/new", b"y"),
        "if_absent put": lambda: driver.put("closed/new", b"y", if_absent=True),
        "get": lambda: driver.get("closed/key"),
        "ranged get": lambda: driver.get("closed/key", start=0, end=1),
        "list": lambda: _listing(driver, "closed/"),
        "delete": lambda: driver.delete(["closed/key"]),
        "put_then_create": lambda: put_then_create(driver, [("closed/segment", b"s")],
                                                   "closed/record", b"r", concurrency=2),
    }
    for what, call in calls.items():
        exc = await _expect_raises(RuntimeError, call, f"{what} after aclose")
        _expect("closed" in str(exc), f"{what} after aclose: the message must say the driver "
                                      f"is closed: {exc}")


# --------------------------------------------------------------------------- runners


def _resolve(checks: Iterable[str] | None) -> list[str]:
    names = list(_CHECKS) if checks is None else list(checks)
    unknown = [name for name in names if name not in _CHECKS]
    if unknown:
        raise ValueError(f"unknown driver checks: names={unknown} known={list(_CHECKS)}")
    return names


async def check_driver(make_driver: Callable[[], Awaitable[Driver]], *,
                       checks: Iterable[str] | None = None) -> None:
    """Run the conformance checks, each on a fresh driver from ``make_driver``.

    ``make_driver`` must return a new driver over an *empty* store each time; every driver
    is closed after its check. ``checks`` limits the run to those names of
    :data:`DRIVER_CHECKS`. Every check runs; if any failed, raises an ``ExceptionGroup``
    holding each failure, with a note naming its check.
    """
    names = _resolve(checks)
    failures: list[Exception] = []
    for name in names:
        driver = await make_driver()
        try:
            await _CHECKS[name](driver)
        except Exception as exc:
            exc.add_note(f"driver conformance check failed: check={name} driver={driver.name}")
            failures.append(exc)
        finally:
            await driver.aclose()
    if failures:
        raise ExceptionGroup(f"driver failed {len(failures)} of {len(names)} conformance checks", failures)


class DriverConformance:
    """The conformance suite as pytest tests: one ``test_<check>`` method per check.

    Subclass it in a test module under a name pytest collects, and provide a function-scoped
    ``driver`` fixture that yields a driver over a fresh, empty store and closes it after::

        class TestMyDriver(DriverConformance):
            @pytest.fixture
            async def driver(self, tmp_path):
                driver = MyDriver(tmp_path)
                yield driver
                await driver.aclose()

    The methods are plain async functions (run them with pytest-asyncio or anyio's plugin),
    so this class needs no pytest import.
    """


def _make_test(name: str, check: DriverCheck) -> Callable[[DriverConformance, Driver],
                                                          Coroutine[Any, Any, None]]:
    async def test(self: DriverConformance, driver: Driver) -> None:
        await check(driver)

    test.__name__ = f"test_{name}"
    test.__qualname__ = f"DriverConformance.test_{name}"
    test.__doc__ = check.__doc__
    return test


for _name, _fn in _CHECKS.items():
    setattr(DriverConformance, f"test_{_name}", _make_test(_name, _fn))
del _name, _fn
