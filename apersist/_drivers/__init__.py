"""Storage drivers, one module per backend, all speaking the protocol in ``base``."""

from __future__ import annotations

from .._config import AzureBackend, Backend, FilesystemBackend, MemoryBackend, S3Backend
from .._errors import BackendError
from .base import Driver, ObjectExistsError, ObjectInfo, ObjectNotFoundError
from .filesystem import FilesystemDriver
from .memory import MemoryDriver

__all__ = [
    "Driver",
    "FilesystemDriver",
    "MemoryDriver",
    "ObjectExistsError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "open_driver",
]


def open_driver(backend: Backend) -> Driver:
    """Make the driver for ``backend``. The caller owns it and must ``aclose()`` it."""
    if isinstance(backend, MemoryBackend):
        return MemoryDriver(backend.objects)
    if isinstance(backend, FilesystemBackend):
        return FilesystemDriver(backend.path)
    if isinstance(backend, S3Backend | AzureBackend):
        # The object-store drivers land with issue 3; until then say so plainly.
        raise BackendError(f"the {backend.kind} driver is not available in this version of "
                           "apersist: use Backend.filesystem or Backend.memory")
    raise TypeError(f"unknown backend type: {type(backend).__name__}")
