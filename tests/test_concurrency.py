"""``gather_bounded``: the first failure is raised as itself, with its own cause."""

from __future__ import annotations

import anyio
import pytest

from apersist._concurrency import gather_bounded


class Wrapped(Exception):
    pass


async def test_the_first_failure_is_raised_bare_and_keeps_its_cause() -> None:
    """A BackendError's OSError is what tells an operator why storage failed: raising the
    failure out of the task group must not erase it (``raise ... from None`` did)."""
    async def fails() -> None:
        try:
            raise PermissionError(13, "permission denied")
        except OSError as exc:
            raise Wrapped("storage failed") from exc

    async def slow() -> None:
        await anyio.sleep(5)

    with anyio.fail_after(2), pytest.raises(Wrapped) as caught:
        await gather_bounded([fails, slow], 2)
    assert isinstance(caught.value.__cause__, PermissionError)
    assert not isinstance(caught.value.__context__, BaseExceptionGroup)


async def test_results_come_back_in_order_within_the_bound() -> None:
    running = peak = 0

    def call(i: int):  # type: ignore[no-untyped-def]
        async def one() -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await anyio.sleep(0.01 * (5 - i))
            running -= 1
            return i
        return one

    assert await gather_bounded([call(i) for i in range(5)], 2) == list(range(5))
    assert peak == 2
