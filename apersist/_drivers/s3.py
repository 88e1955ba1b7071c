"""The S3 driver, on aiobotocore: one client per driver (that is, per run).

Keys live under ``root_path + "/"`` in the bucket; ``list`` strips that prefix back off.
Create-if-absent is S3's conditional write (``If-None-Match: *``), on ``PutObject`` and, for
large objects, on ``CompleteMultipartUpload``. botocore's own retries are off (one attempt
per call): the retry layer (``retry.py``) retries what this module maps to
``TransientBackendError``, with apersist's backoff and time bounds.

Every botocore, aiohttp and socket error is translated in one place, :func:`map_errors`;
nothing from those libraries leaks out of the driver, and nothing typed ``Any`` either.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import io
import logging
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import anyio
import anyio.to_thread
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import AioSession  # type: ignore[import-untyped]
from botocore import exceptions as boto  # type: ignore[import-untyped]

from .._config import S3Backend
from .._errors import BackendError
from .base import (
    Capabilities,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    TransientBackendError,
    check_key,
    check_range,
    closed_error,
    epoch_ms,
)

__all__ = ["MIN_PART_BYTES", "S3Driver", "map_errors"]

logger = logging.getLogger("apersist")

_MIB: Final = 1 << 20
#: S3's floor for every part but the last, and its ceiling on the number of parts.
MIN_PART_BYTES: Final = 5 * _MIB
_MAX_PARTS: Final = 10_000
#: DeleteObjects takes at most this many keys per request.
_DELETE_BATCH: Final = 1000
#: Bodies at least this big are copied and checksummed in a worker thread: CRC32 and the
#: copy each run at ~2 GB/s here, so 1 MiB is ~1 ms on the loop, about a thread hop's price.
_THREAD_BODY_BYTES: Final = _MIB
#: Connections beyond ``max_connections``: commit records, listings and reads must not
#: queue behind a full set of part uploads.
_POOL_HEADROOM: Final = 8
_CONNECT_TIMEOUT_S: Final = 10.0
#: botocore's read timeout is per socket read, not per request: a stalled server is
#: noticed after this long; the retry layer bounds whole attempts on top of it.
_READ_TIMEOUT_S: Final = 60.0
#: A cleanup abort may not hold up an exception (or a cancellation) for longer than this.
_ABORT_TIMEOUT_S: Final = 10.0

# S3 error codes worth retrying: throttling, server trouble, and the two 409s that mean
# "a concurrent request on this key is in progress, try again".
_TRANSIENT_CODES: Final = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "ServiceUnavailable", "ConditionalRequestConflict", "OperationAborted",
    "PriorRequestNotComplete",
    # The multipart upload vanished under us (say, a lifecycle rule aborted it): the put
    # as a whole can be retried, with a new upload.
    "NoSuchUpload",
})
_TRANSIENT_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
# Codes that mean the *object* is missing ("404"/"NotFound" come from HEAD, which has no
# body). ``NoSuchBucket`` is a 404 too, but a configuration error: permanent.
_NOT_FOUND_CODES: Final = frozenset({"NoSuchKey", "404", "NotFound"})


def _crc32_b64(data: bytes | bytearray | memoryview) -> str:
    """``x-amz-checksum-crc32``: the big-endian CRC32 of ``data``, base64-encoded."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode("ascii")


def _body_with_crc32(data: bytes | bytearray, start: int, end: int) -> tuple[io.BytesIO, str]:
    """``data[start:end]`` as a request body, with its CRC32; meant for a worker thread.

    The body is a ``BytesIO`` that owns its buffer: botocore would wrap plain bytes in a
    ``BytesIO`` sharing them, and aiohttp's first ``getbuffer()`` on that one copies the
    whole body on the event loop (~10 ms for 8 MiB). Here the one copy happens off it.
    """
    view = memoryview(data)[start:end]
    body = io.BytesIO()
    body.write(view)
    body.seek(0)
    return body, _crc32_b64(view)


def _public_endpoint(url: str) -> str:
    """``url`` without any ``user:password@`` part, fit for a message."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit(parts._replace(netloc=netloc))


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _client_error_facts(exc: Any) -> tuple[str, int]:
    """The S3 error code and HTTP status of a botocore ``ClientError``."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code") or "Unknown")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, int(status) if isinstance(status, int) else 0


def _client_error_type(code: str, status: int) -> type[BackendError]:
    if code in _NOT_FOUND_CODES:
        return ObjectNotFoundError
    # apersist sends exactly one kind of precondition: If-None-Match: * on a create.
    if code == "PreconditionFailed" or status == 412:
        return ObjectExistsError
    if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUSES:
        return TransientBackendError
    return BackendError


# Failures of the connection itself, before or during a response: worth retrying. TLS
# certificate failures are configuration errors, hence checked first.
_TRANSIENT_ERRORS: Final = (
    boto.HTTPClientError,           # connection closed/reset, read timeout, body stream broken
    boto.ConnectionError,           # could not connect, connect timeout, proxy trouble
    boto.IncompleteReadError,
    boto.ChecksumError,             # a body damaged in transit
    boto.CredentialRetrievalError,  # an STS/SSO blip while refreshing credentials
    aiohttp.ClientError,            # raised while reading a body, outside botocore's wrapping
    ConnectionError,                # ConnectionResetError and friends, likewise
    TimeoutError,                   # asyncio.TimeoutError is this class on 3.11
)


@contextlib.contextmanager
def map_errors(op: str, *, key: str, bucket: str, endpoint: str,
               secrets: Sequence[str] = ()) -> Iterator[None]:
    """Translate botocore, aiohttp and socket errors raised in the block into apersist's.

    - ``ClientError``: ``NoSuchKey``/404 -> ``ObjectNotFoundError``; ``PreconditionFailed``/412
      -> ``ObjectExistsError``; throttling, 5xx, ``RequestTimeout``,
      ``ConditionalRequestConflict`` -> ``TransientBackendError``; anything else
      (``NoSuchBucket``, ``AccessDenied``, ``InvalidAccessKeyId``, ...) -> ``BackendError``.
    - Connection failures, timeouts, resets, broken bodies -> ``TransientBackendError``.
    - Any other botocore error (no credentials, bad parameters, TLS validation) ->
      ``BackendError``.

    Every message names the operation, the key, the bucket and the endpoint, never a
    secret (``secrets`` are masked in any server text quoted); the cause is chained.
    """
    try:
        yield
    except boto.ClientError as exc:
        code, status = _client_error_facts(exc)
        kind = _client_error_type(code, status)
        if kind is ObjectNotFoundError:
            what = "object not found"
        elif kind is ObjectExistsError:
            what = "object already exists"
        elif kind is TransientBackendError:
            what = "server busy or failing"
        else:
            what = "request refused"
        reason = str(exc.response.get("Error", {}).get("Message") or "")
        raise kind(_scrub(f"s3 {op} failed: {what}: key={key} bucket={bucket} endpoint={endpoint} "
                          f"code={code} status={status} reason={reason[:300]}", secrets)) from exc
    except boto.SSLError as exc:
        raise BackendError(_scrub(f"s3 {op} failed: TLS validation: key={key} bucket={bucket} "
                                  f"endpoint={endpoint} reason={exc}", secrets)) from exc
    except _TRANSIENT_ERRORS as exc:
        raise TransientBackendError(
            _scrub(f"s3 {op} failed: connection trouble: key={key} bucket={bucket} "
                   f"endpoint={endpoint} error={type(exc).__name__} reason={exc}", secrets)) from exc
    except boto.BotoCoreError as exc:
        # NoCredentialsError, ParamValidationError, NoRegionError, ...: retrying won't help.
        raise BackendError(
            _scrub(f"s3 {op} failed: key={key} bucket={bucket} endpoint={endpoint} "
                   f"error={type(exc).__name__} reason={exc}", secrets)) from exc


class S3Driver:
    """Objects under ``backend.root_path`` in an S3 bucket (AWS or any S3-compatible server).

    The aiobotocore client is made on first use and lives until :meth:`aclose`. Objects of
    at least ``multipart_bytes`` are uploaded in parts of that size, at most
    ``max_connections`` parts at once across the driver. Each upload carries a CRC32
    checksum, computed off the event loop for large bodies, so S3 refuses a body damaged
    in transit instead of storing it.
    """

    name = "s3"
    # Some servers that speak this API ignore If-None-Match (or the Azure equivalent) and let
    # every creator win: a run that writes checks the store once (probe.py). put takes a
    # bytearray as it is (see put): a segment built in place is not copied on the loop.
    capabilities = Capabilities(accepts_buffers=True, verify_conditional_writes=True)

    def __init__(self, backend: S3Backend, *, multipart_bytes: int = 16 * _MIB,
                 max_connections: int = 16) -> None:
        if multipart_bytes < MIN_PART_BYTES:
            raise ValueError(f"multipart_bytes must be >= {MIN_PART_BYTES} (S3's minimum part "
                             f"size): multipart_bytes={multipart_bytes}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1: max_connections={max_connections}")
        settings = backend.bucket_settings
        self._settings = settings
        self._bucket = settings.bucket_name
        self._prefix = f"{backend.root_path}/" if backend.root_path else ""
        self._multipart_bytes = multipart_bytes
        self._max_connections = max_connections
        self._secrets = tuple(s for s in (settings.secret_access_key, settings.session_token) if s)
        # Until the client exists (and knows its resolved URL), name what was configured.
        self._endpoint = _public_endpoint(settings.endpoint) if settings.endpoint else (
            f"aws-default(region={settings.region or 'default'})")
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._client_lock = anyio.Lock()
        self._part_slots = anyio.Semaphore(max_connections)
        self._closed = False

    def __repr__(self) -> str:
        return f"S3Driver(bucket={self._bucket!r}, prefix={self._prefix!r}, endpoint={self._endpoint!r})"

    # ---------------------------------------------------------------- plumbing
    def _errors(self, op: str, key: str) -> contextlib.AbstractContextManager[None]:
        return map_errors(op, key=key, bucket=self._bucket, endpoint=self._endpoint,
                          secrets=self._secrets)

    def _config(self) -> Any:
        settings = self._settings
        return AioConfig(
            region_name=settings.region,
            # "auto" (botocore's default) picks virtual-hosted style where the bucket name
            # allows it; path style is what most S3-compatible servers need.
            s3={"addressing_style": "path" if settings.with_path_style else "auto"},
            # One attempt per call: retry.py retries with apersist's bounds, and retries
            # stacked at two layers would multiply (8 x 5 attempts against a throttling S3).
            # (``max_attempts`` would count retries *after* the first attempt.)
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=_CONNECT_TIMEOUT_S,
            read_timeout=_READ_TIMEOUT_S,
            max_pool_connections=self._max_connections + _POOL_HEADROOM,
            # Every object apersist stores carries its own checksums, verified on every
            # read; the SDK's CRC32 of whole downloads would be a second pass on the loop.
            response_checksum_validation="when_required",
            # The first client of a session parses ~300 ms of botocore's JSON models: in a
            # worker thread, not on the event loop.
            warm_up_loader_caches=True,
        )

    async def _get_client(self, op: str, key: str) -> Any:
        """The driver's client, made on first use; concurrent first calls make one."""
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._closed:
                raise closed_error(self.name, f"bucket={self._bucket} endpoint={self._endpoint}")
            if self._client is None:
                stack = contextlib.AsyncExitStack()
                try:
                    with self._errors(op, key):
                        self._client = await stack.enter_async_context(await self._create_client())
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await stack.aclose()
                    raise
                self._stack = stack
                self._endpoint = _public_endpoint(str(self._client.meta.endpoint_url))
        return self._client

    async def _create_client(self) -> Any:
        """aiobotocore's client context for these settings (entered by the caller)."""
        settings = self._settings
        # A botocore session registers ~60 ms of handlers, pure Python: in a worker thread,
        # where the GIL's switch interval lets the event loop keep running meanwhile.
        session = await anyio.to_thread.run_sync(AioSession)
        # Absent keys (None) let botocore's standard chain find them: env, profile, ...
        return session.create_client(
            "s3",
            endpoint_url=settings.endpoint,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_access_key,
            aws_session_token=settings.session_token,
            config=self._config(),
        )

    def _full_key(self, key: str) -> str:
        return self._prefix + check_key(key)

    # ---------------------------------------------------------------- put
    async def put(self, key: str, data: bytes | bytearray, *, if_absent: bool = False) -> None:
        """Store ``data`` under ``key``: one PutObject, or a multipart upload if large.

        Either way the object appears whole or not at all. With ``if_absent`` the write
        carries ``If-None-Match: *``: S3's 412 becomes ``ObjectExistsError``; its 409 (a
        concurrent conditional write in progress) becomes ``TransientBackendError``.
        ``data`` may be a ``bytearray`` (``accepts_buffers``): it is read, never changed,
        and each call makes its request bodies afresh from it, so a retry sends the same
        bytes. botocore takes a small one as it is; a big body or part is copied into a
        ``BytesIO`` of its own in a worker thread (``_body_with_crc32``), as for bytes.
        """
        full = self._full_key(key)
        client = await self._get_client("put", full)
        if len(data) >= self._multipart_bytes:
            await self._put_multipart(client, full, data, if_absent=if_absent)
            return
        body: bytes | bytearray | io.BytesIO = data
        if len(data) >= _THREAD_BODY_BYTES:
            body, checksum = await anyio.to_thread.run_sync(_body_with_crc32, data, 0, len(data))
        else:
            checksum = _crc32_b64(data)
        conditions = {"IfNoneMatch": "*"} if if_absent else {}
        with self._errors("put", full):
            await client.put_object(Bucket=self._bucket, Key=full, Body=body,
                                    ChecksumCRC32=checksum, **conditions)

    async def _put_multipart(self, client: Any, full: str, data: bytes | bytearray, *,
                             if_absent: bool) -> None:
        # Parts grow past multipart_bytes only if the object would need over 10,000 of them.
        part_bytes = max(self._multipart_bytes, -(-len(data) // _MAX_PARTS))
        with self._errors("put", full):
            created = await client.create_multipart_upload(Bucket=self._bucket, Key=full,
                                                           ChecksumAlgorithm="CRC32")
        upload_id = str(created["UploadId"])
        try:
            parts = await self._upload_parts(client, full, upload_id, data, part_bytes)
            conditions = {"IfNoneMatch": "*"} if if_absent else {}
            with self._errors("put", full):
                await client.complete_multipart_upload(
                    Bucket=self._bucket, Key=full, UploadId=upload_id,
                    MultipartUpload={"Parts": parts}, **conditions)
        except BaseException:
            # Uploaded parts are stored (and billed) until aborted, also after a refused
            # conditional complete. Shielded: a cancelled put must still clean up.
            await self._abort_multipart(client, full, upload_id)
            raise

    async def _upload_parts(self, client: Any, full: str, upload_id: str, data: bytes | bytearray,
                            part_bytes: int) -> builtins.list[dict[str, Any]]:
        """Upload every part concurrently; return them in order, or raise the first failure."""
        bounds = [(start, min(start + part_bytes, len(data))) for start in range(0, len(data), part_bytes)]
        done: dict[int, dict[str, Any]] = {}
        failures: list[BaseException] = []

        async def upload(number: int, start: int, end: int) -> None:
            try:
                async with self._part_slots:
                    body, checksum = await anyio.to_thread.run_sync(_body_with_crc32, data, start, end)
                    with self._errors("put", full):
                        answer = await client.upload_part(
                            Bucket=self._bucket, Key=full, UploadId=upload_id, PartNumber=number,
                            Body=body, ChecksumCRC32=checksum)
                done[number] = {"PartNumber": number, "ETag": str(answer["ETag"]),
                                "ChecksumCRC32": checksum}
            except Exception as exc:
                # The first failure stops the other parts; it is raised as itself, not
                # wrapped in an ExceptionGroup, so the retry layer can classify it.
                if not failures:
                    failures.append(exc)
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for number, (start, end) in enumerate(bounds, start=1):
                tg.start_soon(upload, number, start, end)
        if failures:
            raise failures[0]
        return [done[number] for number in range(1, len(bounds) + 1)]

    async def _abort_multipart(self, client: Any, full: str, upload_id: str) -> None:
        """Abort an upload that failed; log, never raise: the put's own error is the one."""
        with anyio.move_on_after(_ABORT_TIMEOUT_S, shield=True) as scope:
            try:
                await client.abort_multipart_upload(Bucket=self._bucket, Key=full,
                                                    UploadId=upload_id)
                return
            except Exception as exc:
                reason = _scrub(f"{type(exc).__name__}: {exc}", self._secrets)
        if scope.cancelled_caught:
            reason = f"no answer within {_ABORT_TIMEOUT_S:g}s"
        logger.warning("could not abort a failed multipart upload; its parts stay until a "
                       "lifecycle rule removes them: key=%s bucket=%s endpoint=%s upload_id=%s "
                       "reason=%s", full, self._bucket, self._endpoint, upload_id, reason)

    # ---------------------------------------------------------------- get
    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes, or ``[start, end)`` of them (clamped at its size).

        ``ObjectNotFoundError`` if the key is absent, also for an empty range.
        """
        full = self._full_key(key)
        check_range(start, end)
        client = await self._get_client("get", full)
        if end is not None and end <= (start or 0):
            # HTTP cannot ask for zero bytes; the answer is b"" if the object exists.
            with self._errors("get", full):
                await client.head_object(Bucket=self._bucket, Key=full)
            return b""
        ranged = bool(start) or end is not None
        params: dict[str, Any] = {"Bucket": self._bucket, "Key": full}
        if ranged:
            params["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
        with self._errors("get", full):
            try:
                answer = await client.get_object(**params)
            except boto.ClientError as exc:
                # 416: the range starts at or past the end (every range of an empty
                # object does). The protocol's answer is the empty slice.
                if ranged and _client_error_facts(exc)[1] == 416:
                    return b""
                raise
            async with answer["Body"] as body:
                return bytes(await body.read())

    # ---------------------------------------------------------------- list
    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order, page by page."""
        full_prefix = self._prefix + prefix
        client = await self._get_client("list", full_prefix)
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=full_prefix).__aiter__()
        strip = len(self._prefix)
        while True:
            # The page is fetched inside the error boundary; yielding happens outside it,
            # so the consumer's own exceptions are never mistaken for S3's.
            with self._errors("list", full_prefix):
                try:
                    page = await pages.__anext__()
                except StopAsyncIteration:
                    return
            # S3 lists in UTF-8 byte order, which is code point order: the protocol's.
            for item in page.get("Contents", ()):
                yield ObjectInfo(str(item["Key"])[strip:], int(item["Size"]),
                                 epoch_ms(item.get("LastModified")))

    # ---------------------------------------------------------------- delete
    async def delete(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` with DeleteObjects, 1000 per request; absent keys are ignored."""
        # Every key is checked before any is deleted: a bad argument has no partial effect.
        full_keys = list(dict.fromkeys(self._full_key(key) for key in keys))
        if not full_keys:
            return
        client = await self._get_client("delete", full_keys[0])
        for at in range(0, len(full_keys), _DELETE_BATCH):
            batch = full_keys[at:at + _DELETE_BATCH]
            with self._errors("delete", batch[0]):
                answer = await client.delete_objects(
                    Bucket=self._bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True})
            # DeleteObjects answers 200 even when some keys failed: they are listed here.
            errors = [e for e in answer.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                code = str(first.get("Code") or "Unknown")
                retryable = all(str(e.get("Code")) in _TRANSIENT_CODES for e in errors)
                kind = TransientBackendError if retryable else BackendError
                raise kind(_scrub(
                    f"s3 delete failed: key={first.get('Key')} bucket={self._bucket} "
                    f"endpoint={self._endpoint} code={code} failed_keys={len(errors)} "
                    f"reason={str(first.get('Message') or '')[:300]}", self._secrets))

    # ---------------------------------------------------------------- lifecycle
    async def aclose(self) -> None:
        """Close the client and its connection pool. Safe to call twice.

        Shielded from cancellation, and the driver counts as closed even if closing
        fails: the pool is released as far as it can be, then the error is raised.
        """
        with anyio.CancelScope(shield=True):
            async with self._client_lock:
                self._closed = True
                stack, client = self._stack, self._client
                self._stack = self._client = None
                if stack is None:
                    return
                try:
                    with self._errors("close", ""):
                        await stack.aclose()
                except BaseException:
                    # The orderly exit failed part-way: close the pool directly.
                    with contextlib.suppress(Exception):
                        await client.close()
                    raise
