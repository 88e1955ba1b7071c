"""``@cached`` sync functions called from worker threads."""

from __future__ import annotations

import anyio.to_thread

import apersist


async def test_sync_cached_function_in_a_worker_thread_is_persisted() -> None:
    calls: list[int] = []

    @apersist.cached(name="square-in-thread")
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)):
        assert await anyio.to_thread.run_sync(square, 7) == 49
    async with apersist.run(apersist.Config(backend)):
        assert await anyio.to_thread.run_sync(square, 7) == 49
    assert calls == [7]
