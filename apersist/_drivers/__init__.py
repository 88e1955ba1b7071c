"""Storage drivers, one module per backend, all speaking the protocol in ``base``."""

from __future__ import annotations

from .._config import AzureBackend, Backend, Config, FilesystemBackend, MemoryBackend, S3Backend
from .._errors import BackendError
from .base import Driver, ObjectExistsError, ObjectInfo, ObjectNotFoundError, TransientBackendError
from .filesystem import FilesystemDriver
from .memory import MemoryDriver

__all__ = [
    "Driver",
    "FilesystemDriver",
    "MemoryDriver",
    "ObjectExistsError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "TransientBackendError",
    "open_driver",
]


def open_driver(backend: Backend, config: Config | None = None) -> Driver:
    """Make the driver for ``backend``. The caller owns it and must ``aclose()`` it.

    ``config`` supplies the tuning of object-store drivers (retries, multipart size,
    upload concurrency); without it the defaults of ``Config`` apply.
    """
    if isinstance(backend, MemoryBackend):
        return MemoryDriver(backend.objects)
    if isinstance(backend, FilesystemBackend):
        return FilesystemDriver(backend.path)
    if isinstance(backend, S3Backend | AzureBackend):
        # The object-store drivers are being built (issue 3); until then say so plainly.
        raise BackendError(f"the {backend.kind} driver is not available in this version of "
                           "apersist: use Backend.filesystem or Backend.memory")
    raise TypeError(f"unknown backend type: {type(backend).__name__}")
