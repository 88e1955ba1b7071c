"""Progress of long commands on stderr, drawn by tqdm, only when stderr is a terminal.

A command that may take more than a second (``verify``, ``gc``, ``compact``, ``dump``,
``salvage``) shows a tqdm bar once it has run for ``DELAY_S``. Piped or redirected stderr
(a cron job, a CI log) gets nothing, so logs hold only the command's messages.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from tqdm import tqdm

from ._drivers import Driver, ObjectInfo

__all__ = ["DELAY_S", "CountingDriver", "progress_bar"]

#: A bar appears only once its command has run this long (seconds): a quick command draws
#: nothing. Tests set 0 to see a bar at once.
DELAY_S = 1.0


def progress_bar(desc: str, *, total: int | None = None, unit: str = "object") -> tqdm[Any]:
    """A tqdm bar on stderr, disabled (drawing nothing) unless stderr is a terminal."""
    stderr = sys.stderr  # None when the process was started with it closed (2>&-)
    try:
        terminal = stderr is not None and stderr.isatty()
    except (OSError, ValueError):
        terminal = False
    return tqdm(desc=desc, total=total, unit=f" {unit}", file=stderr, delay=DELAY_S,
                disable=not terminal, leave=False, dynamic_ncols=True)


class CountingDriver:
    """A driver that moves a progress bar by one for each object it reads, lists, writes or
    deletes, for commands whose work is their requests (``verify``, ``gc``, ``compact``).

    Everything else (``capabilities``, ``sizes``, the filesystem's temporary files, ...) is
    the wrapped driver's own, so the wrapped commands behave exactly as without the bar.
    """

    def __init__(self, inner: Driver, bar: tqdm[Any]) -> None:
        self.inner = inner
        self.name = inner.name
        self._bar = bar

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        await self.inner.put(key, data, if_absent=if_absent)
        self._bar.update(1)

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        data = await self.inner.get(key, start=start, end=end)
        self._bar.update(1)
        return data

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        async for info in self.inner.list(prefix):
            self._bar.update(1)
            yield info

    async def delete(self, keys: Sequence[str]) -> None:
        await self.inner.delete(keys)
        self._bar.update(len(keys))

    async def aclose(self) -> None:
        """Close the bar (a bar left on the terminal is erased), then the wrapped driver."""
        self._bar.close()
        await self.inner.aclose()
