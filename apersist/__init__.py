"""apersist: an asyncio-native persistence runtime for Python stream processors.

Record a pipeline's inputs and state to a filesystem, S3 or Azure, and resume after a
restart exactly where it left off. Everything public is importable from here.
"""

from __future__ import annotations

import logging

from ._cache import cached
from ._codec import Codec
from ._config import (
    AwsS3Settings,
    Backend,
    Config,
    PersistenceMode,
    Retention,
    RetryPolicy,
    SnapshotAccess,
)
from ._errors import (
    BackendError,
    CorruptDataError,
    FencedError,
    IncompatibleFormatError,
    PersistenceError,
    SegmentCollectedError,
    WriterActiveError,
)
from ._format import FORMAT_MAJOR, FORMAT_MINOR, WriterInfo
from ._run import Run, run
from ._scheduler import CommitInfo
from ._stream import Batch, Event, Stream
from ._table import Table

__version__ = "0.1.0"

# A library logs; the application decides where the lines go.
logging.getLogger("apersist").addHandler(logging.NullHandler())

__all__ = [
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "AwsS3Settings",
    "Backend",
    "BackendError",
    "Batch",
    "Codec",
    "CommitInfo",
    "Config",
    "CorruptDataError",
    "Event",
    "FencedError",
    "IncompatibleFormatError",
    "PersistenceError",
    "PersistenceMode",
    "Retention",
    "RetryPolicy",
    "Run",
    "SegmentCollectedError",
    "SnapshotAccess",
    "Stream",
    "Table",
    "WriterActiveError",
    "WriterInfo",
    "__version__",
    "cached",
    "run",
]
