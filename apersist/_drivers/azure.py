"""The Azure Blob Storage driver, on ``azure.storage.blob.aio``.

One ``BlobServiceClient`` per driver (that is, per run), made on first use and closed by
``aclose()``. Its HTTP session is ours, so that the connection pool is sized for the
run's upload concurrency; the SDK's own retries are off, because apersist's retry layer
(``retry.py``) retries every verb with its own bounded backoff, and two retry loops
stacked on each other would multiply the attempts and the time to give up.

Keys live under ``root_path + "/"`` in the container. Every error of the SDK passes through
one boundary, :meth:`AzureDriver._errors`, which turns it into ``ObjectExistsError``,
``ObjectNotFoundError``, ``TransientBackendError`` (worth retrying) or a permanent
``BackendError``, with the operation, key, container and endpoint in the message and the
SDK's exception chained. The account key never appears in a message.
"""

from __future__ import annotations

import builtins
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

import aiohttp
import aiohttp.payload
import anyio
import anyio.to_thread
from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    IncompleteReadError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob import BlobBlock, BlockState
from azure.storage.blob.aio import BlobClient, BlobServiceClient, ContainerClient

from .._concurrency import gather_bounded
from .._config import AzureBackend
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

__all__ = ["AzureDriver"]

#: The most sub-requests one Blob batch may carry (a service limit).
_BATCH_LIMIT: Final = 256
#: Time to open a TCP (and TLS) connection. A healthy endpoint answers in milliseconds;
#: one that does not is better retried than waited on.
_CONNECT_TIMEOUT_S: Final = 10
#: Longest silence while reading an answer (aiohttp's ``sock_read``), not the whole
#: transfer: a multi-MiB block keeps the socket busy and never trips it.
_READ_TIMEOUT_S: Final = 60
#: Throttling and request timeouts, besides every 5xx, are worth retrying.
_TRANSIENT_STATUS: Final = frozenset({408, 429})
#: aiohttp's own default pool size; the pool grows beyond it when the run asks for more.
_MIN_POOL: Final = 100


#: Bodies at least this big are copied to ``bytes`` (which the SDK's single Put Blob demands)
#: in a worker thread; below it the copy costs less than the thread hop.
_THREAD_BODY_BYTES: Final = 1 << 20
#: Each write of a large body to the connection is at most this much of it.
_WRITE_CHUNK_BYTES: Final = 256 << 10


class _BufferPayload(aiohttp.payload.Payload):
    """A request body written from a buffer in chunks, each a memoryview of it: no copy.

    aiohttp writes a plain ``bytes`` body in one piece (and warns about it above 1 MiB); a
    ``BytesIO`` it writes in chunks, but its ``getbuffer()`` first copies a ``BytesIO``
    that shares its bytes, on the event loop. Here nothing is copied but what the socket
    does not take at once, a chunk at most, and the loop runs between chunks.
    """

    def __init__(self, value: bytes | bytearray | memoryview) -> None:
        view = memoryview(value).cast("B")
        super().__init__(view, content_type="application/octet-stream")
        self._view = view
        self._size = view.nbytes

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._view).decode(encoding, errors)

    async def write(self, writer: Any) -> None:
        view = self._view
        for start in range(0, len(view), _WRITE_CHUNK_BYTES):
            await writer.write(view[start:start + _WRITE_CHUNK_BYTES])


class _Transport(AioHttpTransport):  # type: ignore[misc]  # azure-core exports it lazily, as Any
    """The SDK's aiohttp transport, sending large bodies in chunks, without a copy.

    The SDK hands aiohttp an upload body as ``bytes`` (``upload_blob`` reads even a stream
    into bytes first: Azure/azure-sdk-for-python#39845), or as the ``memoryview`` that
    ``_put_blocks`` gave ``stage_block``. aiohttp writes such a body in one piece and warns
    about it with a ``ResourceWarning`` above 1 MiB; a ``_BufferPayload`` over it is written
    in chunks, and the event loop runs between them. ``_get_request_data`` is azure-core's
    private seam for the body; if it ever disappears, the warning comes back (and the
    tests, where warnings are errors, say so) but uploads still work.
    """

    def _get_request_data(self, request: Any) -> Any:
        data = super()._get_request_data(request)
        if (isinstance(data, bytes | bytearray | memoryview)
                and len(data) > aiohttp.payload.TOO_LARGE_BYTES_BODY):
            return _BufferPayload(data)
        return data


def _error_code(exc: AzureError) -> str | None:
    """The service's ``x-ms-error-code`` (``BlobNotFound``, ``ServerBusy``, ...), as a plain str."""
    code: object = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)  # StorageErrorCode is a str enum: keep its value
    return code if isinstance(code, str) and code else None


def _is_transient(exc: AzureError, status: int | None) -> bool:
    """Whether ``exc`` is a failure a later attempt may not meet."""
    if isinstance(exc, ClientAuthenticationError):
        # Includes AzureSigningError (status None): a malformed key never starts working.
        return False
    if isinstance(exc, ServiceRequestError | ServiceResponseError | IncompleteReadError):
        return True  # connection refused or reset, DNS, timeouts, a body cut short
    # The downloader re-wraps a body cut short in a bare HttpResponseError (status None).
    if isinstance(exc.inner_exception, ServiceRequestError | ServiceResponseError | IncompleteReadError):
        return True
    return status is not None and (status >= 500 or status in _TRANSIENT_STATUS)


class AzureDriver:
    """Objects as block blobs named ``root_path/key`` in one Azure Blob Storage container.

    ``put`` is atomic for readers: a blob becomes visible only when its single upload (or its
    block list) is committed. With ``if_absent`` the create is conditional on the service
    (``If-None-Match: *``), so exactly one of several racing creators wins.
    """

    name = "azure"
    # Some servers that speak this API ignore If-None-Match (or the Azure equivalent) and let
    # every creator win: a run that writes checks the store once (probe.py).
    # put takes a bytearray as it is (see put): a segment built in place is not copied.
    capabilities = Capabilities(accepts_buffers=True, verify_conditional_writes=True)

    def __init__(self, backend: AzureBackend, *, multipart_bytes: int = 16 << 20,
                 max_connections: int = 16) -> None:
        if multipart_bytes < 1 or max_connections < 1:
            raise ValueError(f"multipart_bytes and max_connections must be >= 1: "
                             f"multipart_bytes={multipart_bytes} max_connections={max_connections}")
        self._backend = backend
        self._prefix = f"{backend.root_path}/" if backend.root_path else ""
        self._multipart_bytes = multipart_bytes
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._service: BlobServiceClient | None = None
        self._container: ContainerClient | None = None
        self._closed = False

    def __repr__(self) -> str:
        # Never the key: only where the store is.
        return (f"AzureDriver(endpoint={self._backend.endpoint!r}, container={self._backend.container!r}, "
                f"root_path={self._backend.root_path!r})")

    # ---------------------------------------------------------------- client
    async def _client(self) -> ContainerClient:
        """The container client, made on first use (an aiohttp session must be made inside a
        running event loop, and ``open_driver`` is not async).

        Making it awaits nothing on success, so on one event loop concurrent first calls
        cannot interleave between the check and the assignment: exactly one client is made,
        and a lock would guard nothing.
        """
        if self._container is not None:
            return self._container
        if self._closed:
            raise closed_error(self.name, f"container={self._backend.container} "
                                          f"endpoint={self._backend.endpoint}")
        # Our own session, so that the pool is sized for the run: a commit uploads up to
        # max_connections segments at once while reads and listings go on beside it (blocks
        # of several large uploads beyond that wait for a free connection). The other
        # settings are those the SDK gives the session it makes itself.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(_MIN_POOL, 2 * self._max_connections)),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=True,
        )
        try:
            transport = _Transport(session=session, session_owner=False,
                                    connection_timeout=_CONNECT_TIMEOUT_S,
                                    read_timeout=_READ_TIMEOUT_S)
            service = BlobServiceClient(
                self._backend.endpoint,
                credential={"account_name": self._backend.account,
                            "account_key": self._backend.password},
                transport=transport,
                # apersist's retry layer retries; the SDK must give up after one attempt.
                retry_total=0,
                # Objects below multipart_bytes go as one Put Blob, never split by the SDK:
                # the staged path below is the only multi-request upload.
                max_single_put_size=self._multipart_bytes,
                max_block_size=self._multipart_bytes,
            )
        except BaseException:
            # An unclosed session is a ResourceWarning; nothing was assigned, so nobody else
            # can be using it.
            await session.close()
            raise
        self._session = session
        self._service = service
        self._container = service.get_container_client(self._backend.container)
        return self._container

    async def _blob(self, key: str) -> BlobClient:
        # Blob clients share the container client's pipeline and transport: nothing to close.
        return (await self._client()).get_blob_client(self._prefix + key)

    # ---------------------------------------------------------------- errors
    @contextmanager
    def _errors(self, op: str, key: str, *, creating: bool = False) -> Iterator[None]:
        """The driver's one exception boundary: SDK errors in, apersist errors out."""
        try:
            yield
        except AzureError as exc:
            raise self._translate(op, key, exc, creating=creating) from exc
        except (aiohttp.ClientError, OSError) as exc:
            # The SDK wraps transport errors itself; these are the ones that slip through
            # (a socket error while a body is being consumed, say). All of them are transient.
            raise TransientBackendError(f"azure {op} failed: {self._facts(key)} "
                                        f"error={type(exc).__name__} reason={self._reason(exc)}") from exc

    def _translate(self, op: str, key: str, exc: AzureError, *, creating: bool) -> BackendError:
        status = exc.status_code if isinstance(exc, HttpResponseError) else None
        code = _error_code(exc)
        if creating and (code == "BlobAlreadyExists" or (status == 412 and code == "ConditionNotMet")):
            # If-None-Match: * failed: Azure says 409 BlobAlreadyExists; plain HTTP says 412.
            return ObjectExistsError(f"object already exists: key={key} container={self._backend.container}")
        if status == 404 and code == "ContainerNotFound":
            # Permanent: retrying cannot make the container appear, and it is not the key
            # that is missing. apersist never creates containers: that is the operator's call.
            return BackendError(f"azure container not found: container={self._backend.container} "
                                f"endpoint={self._backend.endpoint} op={op} key={key}")
        if op == "get" and status == 404:
            return ObjectNotFoundError(f"object not found: key={key} container={self._backend.container}")
        message = (f"azure {op} failed: {self._facts(key)} status={status} code={code} "
                   f"reason={self._reason(exc)}")
        if op == "put" and code == "InvalidBlockList":
            # Committing a blob (by block list or by a single upload) discards every other
            # uncommitted block of that blob, so a concurrent put of the same key can take
            # our staged blocks away. A new attempt stages them again under a new token.
            return TransientBackendError(message)
        if op == "get" and status == 412:
            # A download of several chunks pins the blob's etag after the first one; a 412
            # means the blob was overwritten in between. Reading again reads one version.
            return TransientBackendError(message)
        if _is_transient(exc, status):
            return TransientBackendError(message)
        return BackendError(message)

    def _facts(self, key: str) -> str:
        return f"key={key} container={self._backend.container} endpoint={self._backend.endpoint}"

    def _reason(self, exc: BaseException) -> str:
        """The first line of the error's message, with the account key scrubbed out if there.

        The SDK's messages carry the service's text and request id, never the key; the scrub
        makes sure of it, because messages end up in logs.
        """
        text = str(getattr(exc, "message", None) or exc).strip().splitlines()
        line = text[0] if text else type(exc).__name__
        return line.replace(self._backend.password, "<account key>")

    # ---------------------------------------------------------------- verbs
    async def put(self, key: str, data: bytes | bytearray, *, if_absent: bool = False) -> None:
        """Store ``data`` under ``key``: one Put Blob, or staged blocks and their list if large.

        ``data`` may be a ``bytearray`` (``accepts_buffers``); it is never changed, so a
        retry sends the same bytes. Staged blocks are memoryviews of it. A single Put Blob
        needs ``bytes`` (the SDK reads its body into bytes and checks the type; a bytearray
        it would stream as an iterable of ints), so a big bytearray is copied in a worker
        thread.
        """
        check_key(key)
        with self._errors("put", key, creating=if_absent):
            blob = await self._blob(key)
            if len(data) >= self._multipart_bytes:
                await self._put_blocks(blob, data, if_absent=if_absent)
                return
            if isinstance(data, bytearray):
                if len(data) >= _THREAD_BODY_BYTES:
                    data = await anyio.to_thread.run_sync(bytes, data)
                else:
                    data = bytes(data)
            # overwrite=False is sent as If-None-Match: * and checked by the service.
            await blob.upload_blob(data, length=len(data), overwrite=not if_absent)

    async def _put_blocks(self, blob: BlobClient, data: bytes | bytearray, *,
                          if_absent: bool) -> None:
        """Upload ``data`` as staged blocks, then commit the block list: the blob appears whole
        at the commit, and with ``if_absent`` only if it does not exist by then.

        Blocks that are staged but never committed (a failed or refused upload) are not ours
        to delete: Azure garbage-collects uncommitted blocks on its own (after a week, or
        when the blob's next block list is committed).
        """
        size = self._multipart_bytes
        # The SDK base64-encodes each id; ids must have one length per blob, so the index is
        # zero-padded. The random token makes ids unique per upload: two racing uploads of
        # one key stage blocks under one blob, and neither may commit the other's blocks.
        token = secrets.token_hex(12)
        block_ids = [f"{token}-{index:06d}" for index in range((len(data) + size - 1) // size)]

        def stage(index: int) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                # A memoryview's slice copies nothing (a bytes or bytearray slice would
                # copy the block, on the event loop); the SDK passes it on to the transport
                # as it is, which writes it in chunks (_Transport).
                chunk = memoryview(data)[index * size:(index + 1) * size]
                # The SDK is typed for bytes, iterables of bytes and files; a memoryview it
                # takes as a body of its own (an iterable), unread, like a file.
                await blob.stage_block(block_ids[index], chunk,  # type: ignore[arg-type]
                                       length=len(chunk))
            return call

        await gather_bounded([stage(index) for index in range(len(block_ids))], self._max_connections)
        # Only blocks this upload staged: never a committed block of an older version.
        blocks = [BlobBlock(block_id, BlockState.UNCOMMITTED) for block_id in block_ids]
        if if_absent:
            # IfMissing alone is If-None-Match: *; an etag next to it breaks the SDK's request.
            await blob.commit_block_list(blocks, match_condition=MatchConditions.IfMissing)
        else:
            await blob.commit_block_list(blocks)

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        check_key(key)
        check_range(start, end)  # arguments first: a bad range is a ValueError even for a missing key
        with self._errors("get", key):
            blob = await self._blob(key)
            if end is not None and end <= (start or 0):
                # Azure cannot express an empty range; the protocol still wants
                # ObjectNotFoundError for a missing key, so ask whether it exists.
                await blob.get_blob_properties()
                return b""
            if end is None:
                # Without an offset the SDK reads an empty blob with a plain GET (a range
                # request on an empty blob is a 416).
                offset, length = start or None, None
            else:
                offset, length = start or 0, end - (start or 0)
            try:
                downloader = await blob.download_blob(offset=offset, length=length)
                return await downloader.readall()
            except HttpResponseError as exc:
                if exc.status_code == 416:
                    # The range starts at or after the end of the blob (or the blob is empty):
                    # the blob exists (a missing one is 404), so this is the empty slice.
                    return b""
                raise

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        # Only the prefix string is prepended; "../" stays a literal part of a blob name,
        # which no valid key has, so listings never reach outside the root.
        strip = len(self._prefix)
        with self._errors("list", prefix):
            container = await self._client()
            pages = container.list_blobs(name_starts_with=self._prefix + prefix or None).by_page()
        while True:
            # Errors are mapped while a page is fetched, never around the ``yield``: an
            # exception thrown into this generator by its consumer is not ours to translate.
            with self._errors("list", prefix):
                try:
                    page = await anext(pages)
                except StopAsyncIteration:
                    return
                infos = [ObjectInfo(blob.name[strip:], blob.size, epoch_ms(blob.last_modified))
                         async for blob in page]
            for info in infos:
                yield info

    async def delete(self, keys: Sequence[str]) -> None:
        # Every key is checked before any is deleted: a bad argument has no partial effect.
        # Duplicates are dropped: one batch must not name a blob twice.
        names = builtins.list(dict.fromkeys(self._prefix + check_key(key) for key in keys))
        if not names:
            return
        batches = [names[i:i + _BATCH_LIMIT] for i in range(0, len(names), _BATCH_LIMIT)]
        await gather_bounded([self._delete_batch_call(batch) for batch in batches],
                             self._max_connections)

    def _delete_batch_call(self, names: builtins.list[str]) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            first = names[0][len(self._prefix):]
            with self._errors("delete", first):
                container = await self._client()
                parts = [part async for part in
                         await container.delete_blobs(*names, raise_on_any_failure=False)]
            # Sub-responses come back in request order; a 404 is an already absent blob.
            outcomes = [(name, part.status_code, part.headers.get("x-ms-error-code"))
                        for name, part in zip(names, parts, strict=False)]
            for name, status, code in outcomes:
                if 200 <= status < 300 or (status == 404 and code != "ContainerNotFound"):
                    continue
                key = name[len(self._prefix):]
                if code == "ContainerNotFound":
                    raise BackendError(f"azure container not found: container={self._backend.container} "
                                       f"endpoint={self._backend.endpoint} op=delete key={key}")
                message = (f"azure delete failed: {self._facts(key)} status={status} code={code} "
                           f"batch={len(names)}")
                if status >= 500 or status in _TRANSIENT_STATUS:
                    raise TransientBackendError(message)  # deleting again is harmless
                raise BackendError(message)
        return call

    async def aclose(self) -> None:
        """Close the client and its HTTP session. Safe to call twice; the session is closed
        even when closing the client fails."""
        self._closed = True
        service, session = self._service, self._session
        self._service = self._container = self._session = None
        try:
            if service is not None:
                # Closes the pipeline; the transport does not own the session, so it stays open.
                await service.close()
        finally:
            if session is not None:
                await session.close()

