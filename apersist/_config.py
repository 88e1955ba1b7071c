"""Configuration with the shape of ``pathway.persistence``: backends, modes and ``Config``.

All validation happens here, at construction: an invalid setting raises ``ValueError`` (or
``TypeError`` for a value of the wrong type) from the call that was given it, never later.
"""

from __future__ import annotations

import enum
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar
from urllib.parse import urlsplit

from ._compression import CODECS, DEFAULT_LEVEL, MAX_LEVEL, MIN_LEVEL, ZSTD

__all__ = [
    "AwsS3Settings",
    "AzureBackend",
    "Backend",
    "Config",
    "FilesystemBackend",
    "MemoryBackend",
    "PersistenceMode",
    "Retention",
    "RetryPolicy",
    "S3Backend",
    "SnapshotAccess",
]


_E = TypeVar("_E", bound=enum.Enum)


class PersistenceMode(enum.Enum):
    """What a run persists and how it replays it."""

    #: Sources, tables and the UDF cache are recorded and replayed.
    PERSISTING = "persisting"
    #: Only ``@apersist.cached`` results are persisted; sources and tables pass through.
    UDF_CACHING = "udf_caching"
    #: Like ``PERSISTING``, replaying recorded events as fast as possible.
    SPEEDRUN_REPLAY = "speedrun_replay"
    #: Like ``PERSISTING``, replaying recorded events with the gaps they were recorded with.
    REALTIME_REPLAY = "realtime_replay"


class SnapshotAccess(enum.Enum):
    """Which way a run may use the stored state."""

    #: Replay what is stored, then record.
    FULL = "full"
    #: Start a new history: replay nothing; the first commit supersedes everything stored.
    RECORD = "record"
    #: Replay what is stored and write nothing (a read-only run).
    REPLAY = "replay"
    #: Read and write offsets only: no replay, no tables, no cache.
    OFFSETS_ONLY = "offsets_only"


def _coerce_enum(cls: type[_E], value: object, what: str) -> _E:
    """Accept a member of ``cls`` or its name/value as a string; anything else is a ValueError."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        for member in cls:
            if value.lower() in (member.name.lower(), str(member.value)):
                return member
    choices = ", ".join(m.name for m in cls)
    raise ValueError(f"unknown {what}: value={value!r} choices={choices}")


def _require_text(value: object, what: str, *, secret: bool = False) -> str:
    """``value`` as a non-empty str without surrounding spaces, or an error naming ``what``.

    With ``secret`` the message gives the length instead of the value: a credential must
    never appear in a message (it ends up in logs and tracebacks).
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str: got={type(value).__name__}")
    shown = f"size={len(value)}" if secret else f"value={value!r}"
    if not value or value.strip() != value:
        raise ValueError(f"{what} must be non-empty without surrounding spaces: {shown}")
    try:
        # A lone surrogate cannot be encoded: refused here rather than at the first request.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be valid unicode (no lone surrogates): {shown}") from None
    return value


def _optional_text(value: object, what: str, *, secret: bool = False) -> str | None:
    return None if value is None else _require_text(value, what, secret=secret)


def _require_url(value: object, what: str) -> str | None:
    if value is None:
        return None
    text = _require_text(value, what)
    try:
        parts = urlsplit(text)
        # ``.port`` raises ValueError for a malformed or out-of-range port: refuse it here,
        # not at the first request.
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"{what} must be an http(s) URL: value={text!r}")
    return text.rstrip("/")


def _normalize_root(root_path: object) -> str:
    """Return ``root_path`` as ``a/b/c`` (no leading or trailing slash); refuse ``.``/``..``."""
    if not isinstance(root_path, str):
        raise TypeError(f"root_path must be a str: got={type(root_path).__name__}")
    parts = [p for p in root_path.split("/") if p]
    for part in parts:
        if part in (".", "..") or "\\" in part or any(ord(c) < 32 for c in part):
            raise ValueError(f"root_path must not contain '.', '..' or control parts: "
                             f"root_path={root_path!r}")
    root = "/".join(parts)
    try:
        root.encode("utf-8")  # a key with a lone surrogate could not be sent
    except UnicodeEncodeError:
        raise ValueError(f"root_path must be valid unicode (no lone surrogates): "
                         f"root_path={root_path!r}") from None
    if len(root.encode("utf-8")) > _MAX_ROOT_BYTES:
        raise ValueError(f"root_path is too long: size={len(root.encode('utf-8'))} "
                         f"limit={_MAX_ROOT_BYTES}")
    return root


# S3 keys and Azure blob names are at most 1024 bytes. The keys under a root take 64 now;
# this leaves room for longer writer ids and key kinds without a format break.
_MAX_ROOT_BYTES = 512

# AWS naming rules (the strictest common denominator of S3-compatible servers).
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
# Azure container naming rules.
_CONTAINER_RE = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
_ACCOUNT_RE = re.compile(r"[a-z0-9]{3,24}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AwsS3Settings:
    """Where and how to reach an S3 bucket (AWS or any S3-compatible endpoint).

    With ``access_key`` and ``secret_access_key`` absent, credentials come from the standard
    AWS chain (environment variables, shared profile).
    """

    bucket_name: str
    access_key: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    with_path_style: bool = False
    region: str | None = None
    endpoint: str | None = None
    session_token: str | None = field(default=None, repr=False)

    def __init__(
        self,
        bucket_name: str,
        *,
        access_key: str | None = None,
        secret_access_key: str | None = None,
        with_path_style: bool = False,
        region: str | None = None,
        endpoint: str | None = None,
        session_token: str | None = None,
    ) -> None:
        bucket = _require_text(bucket_name, "bucket_name")
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise ValueError(f"bucket_name is not a valid S3 bucket name: bucket_name={bucket!r}")
        access = _optional_text(access_key, "access_key")
        secret = _optional_text(secret_access_key, "secret_access_key", secret=True)
        if (access is None) != (secret is None):
            raise ValueError("access_key and secret_access_key must be given together")
        token = _optional_text(session_token, "session_token", secret=True)
        if token is not None and access is None:
            raise ValueError("session_token needs access_key and secret_access_key")
        if not isinstance(with_path_style, bool):
            raise TypeError(f"with_path_style must be a bool: got={type(with_path_style).__name__}")
        setter = object.__setattr__
        setter(self, "bucket_name", bucket)
        setter(self, "access_key", access)
        setter(self, "secret_access_key", secret)
        setter(self, "with_path_style", with_path_style)
        setter(self, "region", _optional_text(region, "region"))
        setter(self, "endpoint", _require_url(endpoint, "endpoint"))
        setter(self, "session_token", token)


class Backend:
    """Where a run's store lives. Build one with the ``Backend.*`` constructors."""

    __slots__ = ()
    kind: ClassVar[str]

    @staticmethod
    def filesystem(path: str | os.PathLike[str]) -> FilesystemBackend:
        """A directory on a local filesystem (created on first use)."""
        return FilesystemBackend(path)

    @staticmethod
    def s3(root_path: str, bucket_settings: AwsS3Settings) -> S3Backend:
        """A prefix ``root_path`` inside an S3 bucket."""
        return S3Backend(root_path, bucket_settings)

    @staticmethod
    def azure(
        root_path: str, account: str, password: str, container: str, *, endpoint: str | None = None
    ) -> AzureBackend:
        """A prefix ``root_path`` inside an Azure Blob Storage container.

        ``endpoint=None`` means ``https://{account}.blob.core.windows.net``; pass a URL such as
        ``http://127.0.0.1:10000/devstoreaccount1`` for Azurite or a sovereign cloud.
        """
        return AzureBackend(root_path, account, password, container, endpoint=endpoint)

    @staticmethod
    def memory() -> MemoryBackend:
        """An in-process store, shared by every run that is given this same object."""
        return MemoryBackend()


@dataclass(frozen=True, slots=True, init=False)
class FilesystemBackend(Backend):
    """A store in a local directory."""

    kind: ClassVar[str] = "filesystem"
    path: Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a str or os.PathLike: got={type(path).__name__}")
        text = os.fspath(path)
        if not isinstance(text, str) or not text or "\0" in text:
            raise ValueError(f"path must be a non-empty filesystem path: path={path!r}")
        # Resolved now, so a later chdir cannot move the store.
        object.__setattr__(self, "path", Path(text).expanduser().absolute())


@dataclass(frozen=True, slots=True, init=False)
class S3Backend(Backend):
    """A store under a prefix of an S3 bucket."""

    kind: ClassVar[str] = "s3"
    root_path: str
    bucket_settings: AwsS3Settings

    def __init__(self, root_path: str, bucket_settings: AwsS3Settings) -> None:
        if not isinstance(bucket_settings, AwsS3Settings):
            raise TypeError("bucket_settings must be an apersist.AwsS3Settings: "
                            f"got={type(bucket_settings).__name__}")
        object.__setattr__(self, "root_path", _normalize_root(root_path))
        object.__setattr__(self, "bucket_settings", bucket_settings)


@dataclass(frozen=True, slots=True, init=False)
class AzureBackend(Backend):
    """A store under a prefix of an Azure Blob Storage container."""

    kind: ClassVar[str] = "azure"
    root_path: str
    account: str
    password: str = field(repr=False)
    container: str
    endpoint: str

    def __init__(
        self, root_path: str, account: str, password: str, container: str,
        *, endpoint: str | None = None,
    ) -> None:
        account = _require_text(account, "account")
        if not _ACCOUNT_RE.fullmatch(account):
            raise ValueError(f"account is not a valid Azure storage account name: account={account!r}")
        container = _require_text(container, "container")
        if not _CONTAINER_RE.fullmatch(container):
            raise ValueError(f"container is not a valid Azure container name: container={container!r}")
        setter = object.__setattr__
        setter(self, "root_path", _normalize_root(root_path))
        setter(self, "account", account)
        setter(self, "password", _require_text(password, "password", secret=True))
        setter(self, "container", container)
        url = _require_url(endpoint, "endpoint")
        setter(self, "endpoint", url or f"https://{account}.blob.core.windows.net")


@dataclass(frozen=True, slots=True, eq=False)
class MemoryBackend(Backend):
    """An in-process store. Runs given the same object share its objects; equality is identity."""

    kind: ClassVar[str] = "memory"
    objects: dict[str, bytes] = field(default_factory=dict, repr=False)


def describe_backend(backend: Backend) -> str:
    """Where ``backend``'s store is, as ``key=value`` facts for a message (never a secret)."""
    if isinstance(backend, FilesystemBackend):
        return f"backend=filesystem path={backend.path}"
    if isinstance(backend, S3Backend):
        endpoint = backend.bucket_settings.endpoint
        return (f"backend=s3 bucket={backend.bucket_settings.bucket_name} "
                f"root_path={backend.root_path} "
                f"endpoint={_without_userinfo(endpoint) if endpoint else 'aws-default'}")
    if isinstance(backend, AzureBackend):
        return (f"backend=azure container={backend.container} root_path={backend.root_path} "
                f"endpoint={_without_userinfo(backend.endpoint)}")
    return f"backend={backend.kind}"


def _without_userinfo(url: str) -> str:
    """``url`` without a ``user:password@`` part (a secret must never reach a message)."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


_DEFAULT_MAX_PENDING_BYTES = 64 << 20
_DEFAULT_MAX_SEGMENT_BYTES = 8 << 20
_DEFAULT_MULTIPART_BYTES = 16 << 20


@dataclass(frozen=True, slots=True, init=False)
class RetryPolicy:
    """How object-store requests are retried after transient failures.

    Throttling (S3 ``SlowDown``, Azure 503), other 5xx answers, timeouts and connection
    resets are retried with exponential backoff and full jitter: attempt ``n`` waits a
    random time in ``[0, min(max_backoff_s, initial_backoff_s * 2**n))``. Retrying stops
    after ``max_attempts`` attempts or ``total_timeout_s`` seconds, whichever comes first;
    then the request fails with ``BackendError`` (the last error chained). Each attempt
    is also bounded by ``attempt_timeout_s``.
    """

    max_attempts: int
    initial_backoff_s: float
    max_backoff_s: float
    total_timeout_s: float
    attempt_timeout_s: float

    def __init__(self, *, max_attempts: int = 8, initial_backoff_s: float = 0.05,
                 max_backoff_s: float = 5.0, total_timeout_s: float = 120.0,
                 attempt_timeout_s: float = 60.0) -> None:
        setter = object.__setattr__
        setter(self, "max_attempts", _non_negative_int(max_attempts, "max_attempts", minimum=1))
        for name, value in (("initial_backoff_s", initial_backoff_s),
                            ("max_backoff_s", max_backoff_s),
                            ("total_timeout_s", total_timeout_s),
                            ("attempt_timeout_s", attempt_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number: got={type(value).__name__}")
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0: {name}={value}")
            setter(self, name, float(value))
        if self.attempt_timeout_s == 0 or self.total_timeout_s == 0:
            raise ValueError("attempt_timeout_s and total_timeout_s must be > 0")


@dataclass(frozen=True, slots=True, init=False)
class Retention:
    """Which events of a stream are kept: the last ``max_events``, and those whose
    ``time_ms`` is within ``max_age_ms`` of the run's clock; an event is kept only if every
    bound keeps it. ``None`` means no bound, so ``Retention()`` keeps every event.

    ``max_events=0`` keeps offsets only. Offsets, tables and ``stream.offset`` are never
    affected. Events are dropped by maintenance (``run.compact()``, and the writer's own
    in the background), from the start of the stream: replay may yield more than the
    bounds allow until the next maintenance, and exactly the kept events right after
    ``await run.compact()``. An event older than ``max_age_ms`` that follows a younger one
    (a clock set back) is dropped by ``run.compact()``, which reads every segment of such
    a stream; the background drops only up to the first event young enough.
    """

    max_events: int | None
    max_age_ms: int | None

    def __init__(self, *, max_events: int | None = None, max_age_ms: int | None = None) -> None:
        setter = object.__setattr__
        for name, value in (("max_events", max_events), ("max_age_ms", max_age_ms)):
            setter(self, name, None if value is None else _non_negative_int(
                value, name, minimum=0))

    @property
    def keeps_everything(self) -> bool:
        """Whether no bound is set (``Retention()``): maintenance drops nothing."""
        return self.max_events is None and self.max_age_ms is None


@dataclass(frozen=True, slots=True, init=False)
class Config:
    """Everything a run needs to know: where to persist and how.

    The arguments are exposed as read-only attributes of the same names. Besides the
    ``pathway.persistence`` arguments there are tuning knobs: ``max_pending_bytes``
    (uncommitted bytes past which ``record()`` waits for a commit), ``max_segment_bytes``
    (the size at which a stream's batch is cut into a new segment),
    ``upload_concurrency`` (segments uploaded at once by one commit), ``retry`` (how
    object-store requests are retried) and ``multipart_bytes`` (objects at least this big
    are uploaded in parts: S3 multipart, Azure staged blocks). ``realtime_speed`` and
    ``realtime_max_gap_ms`` pace ``REALTIME_REPLAY``: each recorded gap between two events
    is replayed divided by the speed, and then at most ``realtime_max_gap_ms`` long (no
    bound with ``None``); other modes ignore them.

    Who writes: ``writer_label`` (a name of this writer, recorded with its host and process
    id when it takes the writer role, and shown by ``FencedError`` and ``apersist
    inspect``) and ``takeover_idle_ms`` (refuse to open for writing, with
    ``WriterActiveError``, while the store's writer committed within this many ms; None,
    the default: the newest writer always takes over).

    How segments are stored: ``compression`` (``"zstd"``, the default, or ``None`` to store
    segment bodies raw) at ``compression_level`` (zstd's levels 1 to 22; 3 by default, which
    compresses at hundreds of MB/s). Either way the store is readable by this version
    whatever it was written with: each segment says how it is stored.
    """

    backend: Backend
    snapshot_interval_ms: int
    snapshot_access: SnapshotAccess
    persistence_mode: PersistenceMode
    continue_after_replay: bool
    max_pending_bytes: int
    max_segment_bytes: int
    upload_concurrency: int
    retry: RetryPolicy
    multipart_bytes: int
    retention: Retention
    realtime_speed: float
    realtime_max_gap_ms: int | None
    writer_label: str | None
    takeover_idle_ms: int | None
    compression: str | None
    compression_level: int

    def __init__(
        self,
        backend: Backend,
        *,
        snapshot_interval_ms: int = 0,
        snapshot_access: SnapshotAccess | str = SnapshotAccess.FULL,
        persistence_mode: PersistenceMode | str = PersistenceMode.PERSISTING,
        continue_after_replay: bool = True,
        max_pending_bytes: int = _DEFAULT_MAX_PENDING_BYTES,
        max_segment_bytes: int = _DEFAULT_MAX_SEGMENT_BYTES,
        upload_concurrency: int = 16,
        retry: RetryPolicy | None = None,
        multipart_bytes: int = _DEFAULT_MULTIPART_BYTES,
        retention: Retention | None = None,
        realtime_speed: float = 1.0,
        realtime_max_gap_ms: int | None = None,
        writer_label: str | None = None,
        takeover_idle_ms: int | None = None,
        compression: str | None = ZSTD,
        compression_level: int = DEFAULT_LEVEL,
    ) -> None:
        if not isinstance(backend, Backend) or type(backend) is Backend:
            raise TypeError("backend must be built with apersist.Backend.filesystem/s3/azure/memory: "
                            f"got={type(backend).__name__}")
        if not isinstance(continue_after_replay, bool):
            raise TypeError("continue_after_replay must be a bool: "
                            f"got={type(continue_after_replay).__name__}")
        setter = object.__setattr__
        setter(self, "backend", backend)
        setter(self, "snapshot_interval_ms",
               _non_negative_int(snapshot_interval_ms, "snapshot_interval_ms", minimum=0))
        setter(self, "snapshot_access",
               _coerce_enum(SnapshotAccess, snapshot_access, "snapshot_access"))
        setter(self, "persistence_mode",
               _coerce_enum(PersistenceMode, persistence_mode, "persistence_mode"))
        setter(self, "continue_after_replay", continue_after_replay)
        setter(self, "max_pending_bytes",
               _non_negative_int(max_pending_bytes, "max_pending_bytes", minimum=1 << 10))
        setter(self, "max_segment_bytes",
               _non_negative_int(max_segment_bytes, "max_segment_bytes", minimum=1 << 10))
        setter(self, "upload_concurrency",
               _non_negative_int(upload_concurrency, "upload_concurrency", minimum=1))
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be an apersist.RetryPolicy: got={type(retry).__name__}")
        setter(self, "retry", retry or RetryPolicy())
        # S3 parts must be at least 5 MiB (except the last one).
        setter(self, "multipart_bytes",
               _non_negative_int(multipart_bytes, "multipart_bytes", minimum=5 << 20))
        if retention is not None and not isinstance(retention, Retention):
            raise TypeError(f"retention must be an apersist.Retention: "
                            f"got={type(retention).__name__}")
        setter(self, "retention", retention or Retention())
        if isinstance(realtime_speed, bool) or not isinstance(realtime_speed, int | float):
            raise TypeError(f"realtime_speed must be a number: got={type(realtime_speed).__name__}")
        if not 0 < realtime_speed < float("inf"):  # NaN fails this too
            raise ValueError(f"realtime_speed must be a finite number > 0: "
                             f"realtime_speed={realtime_speed}")
        setter(self, "realtime_speed", float(realtime_speed))
        setter(self, "realtime_max_gap_ms", None if realtime_max_gap_ms is None else
               _non_negative_int(realtime_max_gap_ms, "realtime_max_gap_ms", minimum=0))
        setter(self, "writer_label", None if writer_label is None else _label(writer_label))
        setter(self, "takeover_idle_ms", None if takeover_idle_ms is None else
               _non_negative_int(takeover_idle_ms, "takeover_idle_ms", minimum=1))
        setter(self, "compression", _compression(compression))
        setter(self, "compression_level", _compression_level(compression_level))

    @classmethod
    def simple_config(
        cls,
        backend: Backend,
        snapshot_interval_ms: int = 0,
        snapshot_access: SnapshotAccess | str = SnapshotAccess.FULL,
        persistence_mode: PersistenceMode | str = PersistenceMode.PERSISTING,
        continue_after_replay: bool = True,
    ) -> Config:
        """Deprecated: the same as ``Config(...)``, kept for ``pathway.persistence`` users."""
        warnings.warn(
            "Config.simple_config is deprecated; call apersist.Config(backend, ...) instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return cls(
            backend,
            snapshot_interval_ms=snapshot_interval_ms,
            snapshot_access=snapshot_access,
            persistence_mode=persistence_mode,
            continue_after_replay=continue_after_replay,
        )


# A label is shown in messages among key=value facts: no spaces, no control characters.
_LABEL_RE = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]{1,128}")  # C0, DEL and C1 controls


def _label(value: object) -> str:
    """``writer_label``: 1 to 128 characters, none of them whitespace or control."""
    if not isinstance(value, str):
        raise TypeError(f"writer_label must be a str: got={type(value).__name__}")
    try:
        value.encode("utf-8")  # a lone surrogate could not be stored
        valid = _LABEL_RE.fullmatch(value) is not None
    except UnicodeEncodeError:
        valid = False
    if not valid:
        raise ValueError(f"writer_label must be 1 to 128 characters without spaces or control "
                         f"characters: writer_label={value!r}")
    return value


def _compression(value: object) -> str | None:
    """``compression``: a codec segments can be stored with, or None for raw bodies."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"compression must be a str or None: got={type(value).__name__}")
    if value not in CODECS:
        raise ValueError(f"compression must be one of {sorted(CODECS)} or None: "
                         f"compression={value!r}")
    return value


def _compression_level(value: object) -> int:
    """``compression_level``: one of zstd's levels (checked even when compression is off,
    so that turning it on later cannot fail)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"compression_level must be an int: got={type(value).__name__}")
    if not MIN_LEVEL <= value <= MAX_LEVEL:
        raise ValueError(f"compression_level must be from {MIN_LEVEL} to {MAX_LEVEL}: "
                         f"compression_level={value}")
    return value


def _non_negative_int(value: object, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int: got={type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}: {what}={value}")
    return value
