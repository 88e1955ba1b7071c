"""The storage driver protocol: the handful of verbs every backend implements.

Keys are ``/``-separated paths relative to the store's root. Every driver maps its
library's errors to these in one place: ``ObjectExistsError`` and ``ObjectNotFoundError``
are answers, anything else that fails is a ``BackendError`` with the cause chained. A verb
called after ``aclose()`` raises the ``RuntimeError`` of ``closed_error``, in every driver.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, cast, runtime_checkable

from .._concurrency import gather_bounded
from .._errors import BackendError

__all__ = [
    "NO_CAPABILITIES",
    "Capabilities",
    "Driver",
    "ObjectExistsError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "TransientBackendError",
    "capabilities_of",
    "check_driver_object",
    "check_key",
    "check_range",
    "closed_error",
    "epoch_ms",
    "put_then_create",
    "slice_range",
]


class TransientBackendError(BackendError):
    """A failure worth retrying: throttling, a 5xx answer, a timeout, a dropped connection.

    Drivers raise it; the retry layer retries it and, when retries run out, raises a plain
    ``BackendError`` with it chained. Every other ``BackendError`` is permanent.
    """


class ObjectExistsError(BackendError):
    """``put(..., if_absent=True)`` found the key already present; nothing was written."""


class ObjectNotFoundError(BackendError):
    """``get`` asked for a key that does not exist."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object.

    ``modified_ms`` is when the object was last written, by the *storage's* clock (S3's
    and Azure's ``Last-Modified``, a file's mtime), in ms since the Unix epoch; None from a
    driver that does not know (the memory driver). Two readings of one store's clock can
    be compared even when the writers' own clocks disagree.
    """

    key: str
    size: int
    modified_ms: int | None = None


@runtime_checkable
class Driver(Protocol):
    """An object store reduced to the verbs apersist needs.

    ``put`` is atomic: a reader sees the whole object or nothing. With ``if_absent=True`` it
    is a create-if-absent that raises ``ObjectExistsError`` when the key exists, and exactly
    one of several racing creators wins; this is what makes commits atomic and fencing work.
    "Exists" must mean that the key was taken before this call: a driver that retries a
    create inside the call settles its own ambiguous create, as the retry layer does (the
    store takes "exists" as another writer's, and a lost reply misread so would end a run
    with a spurious ``FencedError``, though nothing is lost).

    What a driver offers beyond these verbs it declares in a ``capabilities`` attribute
    (``Capabilities``); a driver without one offers nothing more (``capabilities_of``).
    """

    name: str

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Store ``data`` under ``key`` durably; returns once it would survive a crash."""
        ...

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        """Return the object's bytes, or ``[start, end)`` of them; ``ObjectNotFoundError`` if absent."""
        ...

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix``, in key order."""
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete ``keys``; keys that do not exist are ignored."""
        ...

    async def aclose(self) -> None:
        """Release the driver's resources. Safe to call twice; afterwards every verb raises
        ``RuntimeError`` (see ``closed_error``)."""
        ...


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a driver offers beyond the protocol's verbs, declared as ``driver.capabilities``.

    apersist reads these and never probes a driver for optional members. A wrapper (retry,
    fault injection) declares its own, usually some of the wrapped driver's: one that adds
    work to each verb (a retry, a fault) must not claim ``put_then_create``, which would
    skip its steps.

    - ``put_then_create``: the driver has the verb ``put_then_create(puts, key, data)``, a
      whole commit in one call with the contract of the function ``put_then_create`` below
      (the filesystem makes it one worker-thread call). Without it that function uses the
      plain verbs.
    - ``accepts_buffers``: its ``put`` (and its ``put_then_create``, if it has one) takes a
      segment's data as a ``bytearray``, as it is, and never changes it; so the store hands
      it segments built in place, without a copy of the whole segment on the event loop
      (``Store.accepts_buffers``). A retry sends the same buffer again. The filesystem,
      S3 and Azure drivers declare it, and the retry layer passes on its inner driver's.
    - ``verify_conditional_writes``: the storage behind it may not honour create-if-absent
      (some S3-compatible servers ignore ``If-None-Match``), so a run that writes checks it
      once when it opens the store (``probe.py``). The S3 and Azure drivers declare it.
    - ``point_lookups``: the driver has the verb ``sizes(keys)``, which returns the size of
      each of ``keys`` that exists (a dict; absent keys are left out), at a cost that
      follows the number of keys asked, not the objects under their prefix. Opening a store
      then finds its commits and checks its live segments with it instead of listing (on
      the filesystem, a listing costs a walk of the whole directory). The filesystem and
      memory drivers declare it.
    - ``temporary_files``: the driver writes each object through a temporary file that a
      crash can leave behind and that ``list`` skips, and has the verbs
      ``list_temporary()``, which returns those left now (an ``ObjectInfo`` each, named
      by its path under the root like a key, e.g. ``writers/0/segments/.tmp-<32 hex>``),
      and ``delete_temporary(paths)``, which deletes such paths (absent ones are ignored;
      anything else is refused). ``apersist gc`` collects them with these. The filesystem
      driver declares it; object stores publish whole objects and leave none.
    """

    put_then_create: bool = False
    accepts_buffers: bool = False
    verify_conditional_writes: bool = False
    point_lookups: bool = False
    temporary_files: bool = False


#: What a driver that declares nothing offers: the protocol's verbs and nothing more.
NO_CAPABILITIES: Final = Capabilities()


def capabilities_of(driver: object) -> Capabilities:
    """``driver.capabilities``, or ``NO_CAPABILITIES`` for a driver that declares none."""
    declared = getattr(driver, "capabilities", NO_CAPABILITIES)
    if not isinstance(declared, Capabilities):
        raise TypeError(f"driver.capabilities must be apersist.testing.Capabilities: "
                        f"got={type(declared).__name__}")
    return declared


async def put_then_create(driver: Driver, puts: Sequence[tuple[str, bytes | bytearray]], key: str,
                          data: bytes, *, concurrency: int) -> None:
    """Put every ``(key, data)`` of ``puts``, then create ``key`` with ``data``: a commit.

    Returns once all of them are durable. ``key`` never becomes visible, nor durable,
    before every object of ``puts`` is durable: a commit never names a segment a crash
    could lose. Raises ``ObjectExistsError`` if ``key`` exists (some of ``puts`` may have
    landed then, as orphans), else what ``put`` raises. A crash before it returns may leave
    one of ``puts`` torn under its key (never ``key``), so ``puts`` must be objects that
    nothing names yet, as a commit's segments are.

    A driver that can do better offers this as its own verb (``Capabilities``; the
    filesystem does all of it in one worker-thread call). Otherwise, and for wrappers that
    retry or inject faults step by step (they do not offer it: retrying the whole call after
    its create landed would put again segments that a durable commit names), the steps are
    the plain verbs: the puts concurrently, at most ``concurrency`` at once, then
    ``put(key, data, if_absent=True)``.
    """
    if capabilities_of(driver).put_then_create:
        await driver.put_then_create(puts, key, data)  # type: ignore[attr-defined]
        return
    # A bytearray reaches only drivers that take one (Store.accepts_buffers), and goes to
    # them as it is: a copy here would be the whole segment's, on the event loop. bytes()
    # is for any other driver, so that its put() gets the bytes it is typed for.
    buffers = capabilities_of(driver).accepts_buffers
    await gather_bounded([functools.partial(
        driver.put, k, cast(bytes, d) if buffers or isinstance(d, bytes) else bytes(d))
        for k, d in puts], concurrency)
    await driver.put(key, data, if_absent=True)


def epoch_ms(moment: object) -> int | None:
    """A listing's modification time (an aware ``datetime``, by the storage's clock) in ms
    since the Unix epoch, for ``ObjectInfo.modified_ms``; None for anything else."""
    if isinstance(moment, datetime.datetime) and moment.tzinfo is not None:
        return round(moment.timestamp() * 1000)
    return None


def closed_error(name: str, facts: str = "") -> RuntimeError:
    """The error of a verb called after ``aclose()``, the same in every driver.

    A ``RuntimeError``, as for a run used after its block: the caller's mistake, not a
    failure of the store (a ``BackendError`` would read as one, and a transient one would
    be retried). ``facts`` (``key=value`` pairs) say which store the driver was for.
    """
    return RuntimeError(f"the {name} driver is closed" + (f": {facts}" if facts else ""))


#: What an object needs to be used as a driver: the protocol's members.
_DRIVER_VERBS = ("put", "get", "list", "delete", "aclose")


def check_driver_object(driver: object) -> Driver:
    """Refuse, with ``TypeError``, an object given as a driver that lacks the protocol's
    members: a ``str`` ``name`` and callable ``put``, ``get``, ``list``, ``delete`` and
    ``aclose``, and ``capabilities``, if present, a ``Capabilities``. Checks names, not
    signatures (as ``isinstance`` on the protocol would)."""
    missing = [verb for verb in _DRIVER_VERBS if not callable(getattr(driver, verb, None))]
    if not isinstance(getattr(driver, "name", None), str):
        missing.insert(0, "name")
    if missing:
        raise TypeError(f"driver must follow the driver protocol: missing={','.join(missing)} "
                        f"got={type(driver).__name__}")
    capabilities_of(driver)  # a wrong declaration fails here, not at the first commit
    return cast(Driver, driver)


def check_key(key: str) -> str:
    """Refuse keys that could escape the root or collide with a driver's temporary files."""
    if (not key or key.startswith("/") or key.endswith("/") or "\\" in key
            or any(part in ("", ".", "..") or part.startswith(".tmp-") for part in key.split("/"))):
        raise ValueError(f"invalid object key: key={key!r}")
    return key


def check_range(start: int | None, end: int | None) -> None:
    """Refuse byte ranges the protocol does not define (negative or reversed)."""
    if (start is not None and start < 0) or (end is not None and end < (start or 0)):
        raise ValueError(f"invalid byte range: start={start} end={end}")


def slice_range(data: bytes, start: int | None, end: int | None) -> bytes:
    """``data[start:end]`` with the driver protocol's range rules."""
    check_range(start, end)
    if start is None and end is None:
        return data
    return data[start or 0:end]
