"""The retry layer: a driver wrapper that retries transient failures, within a bound.

Only ``TransientBackendError`` is retried (throttling, 5xx answers, timeouts, dropped
connections, as each driver maps them); an attempt that outlives
``RetryPolicy.attempt_timeout_s`` is cancelled and counts as transient too. Every other
error (a permanent ``BackendError``, ``ObjectExistsError``, ``ObjectNotFoundError``, a
``ValueError`` for a bad argument) passes straight through on the first attempt.

Waits between attempts use exponential backoff with full jitter: after the ``n``-th failed
attempt (counting from 0) the wait is ``uniform(0, min(max_backoff_s, initial_backoff_s *
2**n))``. Retrying stops after ``max_attempts`` attempts, or when the next attempt could
not start before ``total_timeout_s`` is up; then the call fails with a plain
``BackendError`` that says how many attempts over how long, the last error chained.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar, cast

import anyio

from .._config import RetryPolicy
from .._errors import BackendError
from .base import (
    Capabilities,
    Driver,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    TransientBackendError,
    capabilities_of,
)

__all__ = ["RetryingDriver"]

_T = TypeVar("_T")

logger = logging.getLogger("apersist")


class RetryingDriver:
    """Wraps any driver: retries its transient failures with backoff; the rest pass through.

    ``rng``, ``sleep`` and ``clock`` (seconds, monotonic) are injectable so that tests of
    backoff and time bounds are deterministic; by default they are a fresh
    ``random.Random``, ``anyio.sleep`` and ``time.monotonic``. The per-attempt timeout is
    always enforced on the event loop's real clock.

    Two verbs need more than a loop around the call:

    - **Ambiguous create.** An ``if_absent`` put whose attempt failed transiently may have
      landed all the same (a lost response, a timeout after the write). If a later attempt
      then meets ``ObjectExistsError``, the object is read back: the same bytes mean our
      own earlier attempt landed, and the put succeeds; other bytes (or none) re-raise
      ``ObjectExistsError``. Callers that must tell their write from an identical one by
      somebody else write unique bytes (apersist's commit and epoch records carry a
      random token). This is the one place that settles an ambiguous create: only the
      layer that retried knows that an earlier attempt may have landed, and the store
      above takes an ``ObjectExistsError`` as the answer (another writer has the key).
    - **Listing.** A retried ``list`` *resumes*: it lists the prefix again and skips every
      key up to the last one already yielded. The protocol lists in key order, so this
      yields no duplicate and loses no key that a single, uninterrupted paged listing would
      have yielded; and it stays streaming (memory bounded by a page, not by the listing),
      which collecting each attempt's whole listing would not. Each step of a listing (the
      wait for its next object) is one attempt for the timeout.

    Its ``capabilities`` are the wrapped driver's ``verify_conditional_writes`` and
    ``accepts_buffers`` only: it retries each verb, so it does not offer ``put_then_create``
    (a retry of the whole call after its create landed would put again segments that a
    durable commit names). Every attempt of a put hands the wrapped driver the same
    ``data``, which a driver that accepts buffers never changes: a retry sends the same bytes.
    """

    def __init__(self, inner: Driver, policy: RetryPolicy | None = None, *,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.inner = inner
        self.name: str = inner.name
        self.policy = policy or RetryPolicy()
        inner_capabilities = capabilities_of(inner)
        self.capabilities = Capabilities(
            accepts_buffers=inner_capabilities.accepts_buffers,
            verify_conditional_writes=inner_capabilities.verify_conditional_writes)
        self._rng = rng or random.Random()
        self._sleep = sleep or anyio.sleep
        self._clock = clock or time.monotonic
        # Told of each retry (its verb) before its backoff: the run's metrics set it while
        # the run lasts (``_metrics``), so that a retry layer a caller made counts too.
        self.on_retry: Callable[[str], None] | None = None

    def __repr__(self) -> str:
        return f"RetryingDriver({self.inner!r})"

    # ---------------------------------------------------------------- the retry loop
    def backoff(self, failures: int) -> float:
        """The wait after ``failures`` failed attempts (>= 1): full jitter, capped."""
        policy = self.policy
        ceiling = min(policy.max_backoff_s, policy.initial_backoff_s * 2 ** (failures - 1))
        return self._rng.uniform(0, ceiling)

    async def _attempt(self, call: Callable[[], Awaitable[_T]], op: str, key: str,
                       deadline: float) -> _T:
        """One attempt, bounded by the attempt timeout (and by what is left of the total)."""
        limit = min(self.policy.attempt_timeout_s, deadline - self._clock())
        with anyio.move_on_after(limit):
            return await call()
        # Only our own scope's timeout lands here; a cancellation from outside propagates.
        raise TransientBackendError(f"attempt timed out: op={op} key={key} driver={self.name} "
                                    f"timeout_s={limit:g}")

    async def _retry(self, op: str, key: str, call: Callable[[], Awaitable[_T]], *,
                     on_transient: Callable[[], None] | None = None) -> _T:
        """Call ``call`` until it succeeds, fails permanently, or the retry bound is reached."""
        started = self._clock()
        deadline = started + self.policy.total_timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(call, op, key, deadline)
            except TransientBackendError as exc:
                if on_transient is not None:
                    on_transient()
                await self._wait_before_retry(op, key, attempt, started, deadline, exc)

    def _give_up(self, op: str, key: str, attempts: int, started: float,
                 error: TransientBackendError) -> BackendError:
        elapsed = self._clock() - started
        return BackendError(
            f"storage request failed after {attempts} attempt{'s' * (attempts != 1)} "
            f"over {elapsed:.2f}s: "
            f"op={op} key={key} driver={self.name} max_attempts={self.policy.max_attempts} "
            f"total_timeout_s={self.policy.total_timeout_s:g} last_error={error}")

    async def _wait_before_retry(self, op: str, key: str, attempt: int, started: float,
                                 deadline: float, error: TransientBackendError) -> None:
        """Sleep the backoff before attempt ``attempt + 1``, or give up with ``BackendError``.

        Gives up when the attempts are used up, or when the next one could not start before
        the total timeout (sleeping past the bound would only delay the failure).
        """
        if attempt >= self.policy.max_attempts:
            raise self._give_up(op, key, attempt, started, error) from error
        delay = self.backoff(attempt)
        if self._clock() + delay >= deadline:
            raise self._give_up(op, key, attempt, started, error) from error
        # One blip is routine; a second failure in a row is worth a warning.
        logger.log(logging.DEBUG if attempt == 1 else logging.WARNING,
                   "retrying storage request: op=%s key=%s driver=%s attempt=%d delay_s=%.3f "
                   "error=%s", op, key, self.name, attempt, delay, error)
        if self.on_retry is not None:
            self.on_retry(op)
        await self._sleep(delay)
        if self._clock() >= deadline:  # the sleep overran the bound
            raise self._give_up(op, key, attempt, started, error) from error

    # ---------------------------------------------------------------- verbs
    async def put(self, key: str, data: bytes | bytearray, *, if_absent: bool = False) -> None:
        """Store ``data`` under ``key``, retrying transient failures (see the class doc).

        ``data`` is a ``bytearray`` only if the wrapped driver ``accepts_buffers``.
        """
        if not if_absent:
            # The cast: the protocol types put's data as bytes, for drivers that take only
            # bytes; a bytearray comes only for one that declared it takes it as it is.
            await self._retry("put", key, lambda: self.inner.put(key, cast(bytes, data)))
            return
        ambiguous = False  # some attempt failed transiently: it may have landed

        def note_ambiguous() -> None:
            nonlocal ambiguous
            ambiguous = True

        try:
            await self._retry("put", key,
                              lambda: self.inner.put(key, cast(bytes, data), if_absent=True),
                              on_transient=note_ambiguous)
        except ObjectExistsError as exists:
            if not ambiguous:
                raise
            try:
                existing = await self.get(key)
            except ObjectNotFoundError:
                # It existed a moment ago and is gone: whoever created it, the answer to
                # this create stays "it existed".
                raise exists from None
            if existing != data:
                raise
            # The same bytes: our own earlier attempt landed before its answer was lost.
            logger.debug("ambiguous create settled: an earlier attempt had landed: key=%s "
                         "driver=%s", key, self.name)

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes (or a range), retrying transient failures."""
        return await self._retry("get", key, lambda: self.inner.get(key, start=start, end=end))

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object under ``prefix`` in key order; a retry resumes after the last key yielded.

        The retry budget (attempts and total time) counts from the last key that arrived,
        not from the start: a long listing that keeps making progress never times out, and
        the caller's own time between keys is not charged to it.
        """
        started = self._clock()
        deadline = started + self.policy.total_timeout_s
        last: str | None = None
        attempt = 0
        while True:
            attempt += 1
            failure: TransientBackendError | None = None
            listing = self.inner.list(prefix)
            try:
                while True:
                    try:
                        info = await self._attempt(listing.__anext__, "list", prefix, deadline)
                    except StopAsyncIteration:
                        return
                    except TransientBackendError as exc:
                        failure = exc
                        break
                    if last is not None and info.key <= last:
                        continue  # yielded by an earlier attempt
                    last = info.key
                    yield info
                    # Progress: the budget starts again for what is left of the listing.
                    started = self._clock()
                    deadline = started + self.policy.total_timeout_s
                    attempt = 1
            finally:
                # Closed before any backoff: a broken listing holds no connection while we wait.
                aclose = getattr(listing, "aclose", None)
                if aclose is not None:
                    await aclose()
            await self._wait_before_retry("list", prefix, attempt, started, deadline, failure)

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` (idempotent, so simply retried)."""
        shown = ",".join(keys[:3]) + (",..." if len(keys) > 3 else "")
        await self._retry("delete", shown, lambda: self.inner.delete(keys))

    async def aclose(self) -> None:
        """Close the wrapped driver (not retried)."""
        await self.inner.aclose()
