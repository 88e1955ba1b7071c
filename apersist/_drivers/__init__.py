"""Storage drivers: one module per backend (``memory``, ``filesystem``, ``s3``, ``azure``),
all speaking the protocol in ``base``; the retry wrapper of the object stores (``retry``)
and their create-if-absent self-check (``probe``). ``open_driver`` makes a backend's driver."""

from __future__ import annotations

from .._config import AzureBackend, Backend, Config, FilesystemBackend, MemoryBackend, S3Backend
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
    config = config or Config(backend)
    # Imported here: the object-store clients are heavy, and only their users pay for them.
    if isinstance(backend, S3Backend):
        from .retry import RetryingDriver
        from .s3 import S3Driver

        return RetryingDriver(S3Driver(backend, multipart_bytes=config.multipart_bytes,
                                       max_connections=config.upload_concurrency),
                              config.retry)
    if isinstance(backend, AzureBackend):
        from .azure import AzureDriver
        from .retry import RetryingDriver

        return RetryingDriver(AzureDriver(backend, multipart_bytes=config.multipart_bytes,
                                          max_connections=config.upload_concurrency),
                              config.retry)
    raise TypeError(f"unknown backend type: {type(backend).__name__}")
