"""The in-memory driver: a dict shared by every run given the same ``Backend.memory()``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from .base import (
    Capabilities,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    check_key,
    check_range,
    closed_error,
    slice_range,
)

__all__ = ["MemoryDriver"]


class MemoryDriver:
    """Objects in a plain dict. Every verb is atomic: none of them awaits mid-way."""

    name = "memory"
    capabilities = Capabilities(point_lookups=True)

    def __init__(self, objects: dict[str, bytes]) -> None:
        self._objects = objects
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise closed_error(self.name)

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        check_key(key)
        self._check_open()
        if if_absent and key in self._objects:
            raise ObjectExistsError(f"object already exists: key={key}")
        self._objects[key] = bytes(data)

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        check_key(key)
        check_range(start, end)  # arguments first: a bad range is a ValueError even for a missing key
        self._check_open()
        try:
            data = self._objects[key]
        except KeyError:
            raise ObjectNotFoundError(f"object not found: key={key}") from None
        return slice_range(data, start, end)

    async def sizes(self, keys: Sequence[str]) -> dict[str, int]:
        """The size of each of ``keys`` that exists."""
        self._check_open()
        objects = self._objects
        return {key: len(objects[key]) for key in keys if key in objects}

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        self._check_open()
        # A snapshot of the matching keys: later puts do not disturb a listing in progress.
        keys = sorted(k for k in self._objects if k.startswith(prefix))
        for key in keys:
            data = self._objects.get(key)
            if data is not None:
                yield ObjectInfo(key, len(data))

    async def delete(self, keys: Sequence[str]) -> None:
        # Every key is checked before any is deleted: a bad argument has no partial effect.
        checked = [check_key(k) for k in keys]
        self._check_open()
        for key in checked:
            self._objects.pop(key, None)

    async def aclose(self) -> None:
        # The objects stay: they are the backend's, shared by every driver made for it.
        self._closed = True


