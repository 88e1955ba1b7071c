"""The S3 driver against moto_server: the conformance suite, then what is S3's own.

Every test works under its own fresh root prefix of the one session bucket (or, where it
needs a whole bucket, in a bucket of its own), and always passes explicit credentials.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anyio
import pytest
from aiobotocore.session import AioSession
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)
from conftest import s3_settings
from helpers import check_round_trip
from servers import S3_KEY_ID, S3_REGION, S3_SECRET

import apersist
import apersist._drivers.s3 as s3_module
from apersist._drivers import open_driver
from apersist._drivers.base import (
    Driver,
    ObjectExistsError,
    ObjectNotFoundError,
    TransientBackendError,
)
from apersist._drivers.retry import RetryingDriver
from apersist._drivers.s3 import MIN_PART_BYTES, S3Driver, map_errors
from apersist.testing import DRIVER_CHECKS, DriverConformance

MIB = 1 << 20


def _root() -> str:
    return f"t/{uuid.uuid4().hex}"


def _payload(size: int, seed: int = 0) -> bytes:
    # Distinct bytes at every position (a part landing in the wrong place shows).
    block = uuid.UUID(int=seed).bytes + bytes(range(256))
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
async def raw_client(s3_endpoint: str) -> AsyncIterator[Any]:
    """A plain aiobotocore client, to look at the bucket behind the driver's back."""
    async with AioSession().create_client(
            "s3", endpoint_url=s3_endpoint, region_name=S3_REGION,
            aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET) as client:
        yield client


@pytest.fixture
def make_driver(s3_endpoint: str, s3_bucket: str) -> Callable[..., S3Driver]:
    def make(root: str | None = None, *, multipart_bytes: int = MIN_PART_BYTES,
             max_connections: int = 16, **settings: Any) -> S3Driver:
        options: dict[str, Any] = {
            "access_key": S3_KEY_ID, "secret_access_key": S3_SECRET, "with_path_style": True,
            "region": S3_REGION, "endpoint": s3_endpoint, **settings}
        bucket = options.pop("bucket", s3_bucket)
        backend = apersist.Backend.s3(_root() if root is None else root,
                                      apersist.AwsS3Settings(bucket, **options))
        return S3Driver(backend, multipart_bytes=multipart_bytes, max_connections=max_connections)

    return make


@pytest.fixture
async def driver(make_driver: Callable[..., S3Driver]) -> AsyncIterator[S3Driver]:
    driver = make_driver()
    yield driver
    await driver.aclose()


async def _pending_uploads(client: Any, bucket: str, prefix: str) -> list[str]:
    answer = await client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [str(upload["Key"]) for upload in answer.get("Uploads", [])]


async def _keys(driver: Driver, prefix: str = "") -> list[str]:
    return [info.key async for info in driver.list(prefix)]


# --------------------------------------------------------------------------- conformance


class TestS3Driver(DriverConformance):
    """The shared suite on the bare driver (no retry layer): it must conform on its own.

    Parts are the minimum 5 MiB, so the suite's 5 MiB + 7 object goes through multipart.
    """

    @pytest.fixture
    async def driver(self, make_driver: Callable[..., S3Driver]) -> AsyncIterator[Driver]:
        driver = make_driver()
        yield driver
        await driver.aclose()

    async def test_put_is_atomic_for_readers(self, driver: Driver) -> None:
        # moto 5.2.5 closes an overwritten object's buffer while a concurrent GET may still
        # be reading it, and that GET gets a 500 ("I/O operation on closed file" in its
        # log); S3 itself serves the old or the new version. The driver maps the 500 to
        # TransientBackendError, as it should; here the retry layer absorbs it, and the
        # check still fails on any torn or mixed read.
        policy = apersist.RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.1)
        await DRIVER_CHECKS["put_is_atomic_for_readers"](RetryingDriver(driver, policy))


def test_driver_satisfies_the_protocol(make_driver: Callable[..., S3Driver]) -> None:
    assert isinstance(make_driver(), Driver)


def test_open_driver_makes_a_retrying_s3_driver(s3_endpoint: str, s3_bucket: str) -> None:
    backend = apersist.Backend.s3(_root(), s3_settings(s3_endpoint, s3_bucket))
    driver = open_driver(backend, apersist.Config(backend, multipart_bytes=6 * MIB,
                                                  upload_concurrency=3))
    assert isinstance(driver, RetryingDriver)
    assert isinstance(driver.inner, S3Driver)
    assert driver.name == "s3"


def test_parts_smaller_than_s3_allows_are_refused(make_driver: Callable[..., S3Driver]) -> None:
    with pytest.raises(ValueError, match="multipart_bytes"):
        make_driver(multipart_bytes=MIN_PART_BYTES - 1)
    with pytest.raises(ValueError, match="max_connections"):
        make_driver(max_connections=0)


# --------------------------------------------------------------------------- multipart


async def test_multipart_upload_round_trips(make_driver: Callable[..., S3Driver], raw_client: Any,
                                            s3_bucket: str) -> None:
    root = _root()
    data = _payload(11 * MIB + 123, seed=1)
    driver = make_driver(root, max_connections=2)
    try:
        await driver.put("big/object", data)
        head = await raw_client.head_object(Bucket=s3_bucket, Key=f"{root}/big/object")
        # A multipart ETag ends with the number of parts: 5 MiB + 5 MiB + the rest.
        assert str(head["ETag"]).strip('"').endswith("-3")
        assert await driver.get("big/object") == data
        across = (5 * MIB - 10, 10 * MIB + 10)  # spans all three parts
        assert await driver.get("big/object", start=across[0], end=across[1]) == data[slice(*across)]
        assert [(i.key, i.size) async for i in driver.list("big/")] == [("big/object", len(data))]
        assert await _pending_uploads(raw_client, s3_bucket, root) == []
    finally:
        await driver.aclose()


async def test_multipart_if_absent_refuses_an_existing_key(
        make_driver: Callable[..., S3Driver], raw_client: Any, s3_bucket: str) -> None:
    root = _root()
    driver = make_driver(root)
    try:
        await driver.put("big/object", b"the original", if_absent=True)
        with pytest.raises(ObjectExistsError, match="object already exists") as info:
            await driver.put("big/object", _payload(11 * MIB, seed=2), if_absent=True)
        assert f"key={root}/big/object" in str(info.value)
        assert await driver.get("big/object") == b"the original"
        # The refused upload's parts were aborted, not left behind.
        assert await _pending_uploads(raw_client, s3_bucket, root) == []
        # And an absent key is created through multipart with if_absent.
        data = _payload(6 * MIB, seed=3)
        await driver.put("big/other", data, if_absent=True)
        assert await driver.get("big/other") == data
    finally:
        await driver.aclose()


async def _client_of(driver: S3Driver) -> Any:
    return await driver._get_client("test", "")


async def test_failed_multipart_upload_is_aborted(make_driver: Callable[..., S3Driver],
                                                  raw_client: Any, s3_bucket: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = _root()
    driver = make_driver(root, max_connections=1)  # parts in order: the 2nd fails, the 3rd never starts
    try:
        client = await _client_of(driver)
        real_upload_part = client.upload_part
        numbers: list[int] = []

        async def upload_part(**kwargs: Any) -> Any:
            numbers.append(kwargs["PartNumber"])
            if kwargs["PartNumber"] == 2:
                raise ConnectionResetError("connection reset by peer (injected)")
            return await real_upload_part(**kwargs)

        monkeypatch.setattr(client, "upload_part", upload_part)
        with pytest.raises(TransientBackendError, match="ConnectionResetError") as info:
            await driver.put("big/object", _payload(11 * MIB, seed=4))
        assert isinstance(info.value.__cause__, ConnectionResetError)
        assert 2 in numbers
        assert await _pending_uploads(raw_client, s3_bucket, root) == []
        with pytest.raises(ObjectNotFoundError):
            await driver.get("big/object")
    finally:
        await driver.aclose()


async def test_a_failing_abort_keeps_the_puts_own_error(make_driver: Callable[..., S3Driver],
                                                         raw_client: Any, s3_bucket: str,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    root = _root()
    driver = make_driver(root)
    try:
        client = await _client_of(driver)

        async def upload_part(**kwargs: Any) -> Any:
            raise _client_error("SlowDown", 503)

        async def abort_multipart_upload(**kwargs: Any) -> Any:
            raise ConnectionResetError("abort lost too")

        monkeypatch.setattr(client, "upload_part", upload_part)
        monkeypatch.setattr(client, "abort_multipart_upload", abort_multipart_upload)
        with pytest.raises(TransientBackendError, match="code=SlowDown status=503"):
            await driver.put("big/object", _payload(6 * MIB, seed=7))
        assert "could not abort a failed multipart upload" in caplog.text
        assert "abort lost too" in caplog.text
        # Left behind, as the warning says: clean up so the bucket stays tidy.
        answer = await raw_client.list_multipart_uploads(Bucket=s3_bucket, Prefix=root)
        for upload in answer.get("Uploads", []):
            await raw_client.abort_multipart_upload(Bucket=s3_bucket, Key=upload["Key"],
                                                    UploadId=upload["UploadId"])
    finally:
        await driver.aclose()


async def test_cancelled_multipart_upload_is_aborted(make_driver: Callable[..., S3Driver],
                                                     raw_client: Any, s3_bucket: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root = _root()
    driver = make_driver(root)
    try:
        client = await _client_of(driver)
        real_upload_part = client.upload_part
        started = anyio.Event()

        async def upload_part(**kwargs: Any) -> Any:
            if kwargs["PartNumber"] == 2:
                started.set()
                await anyio.sleep_forever()
            return await real_upload_part(**kwargs)

        monkeypatch.setattr(client, "upload_part", upload_part)
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.put, "big/object", _payload(11 * MIB, seed=5))
            await started.wait()
            tg.cancel_scope.cancel()
        assert await _pending_uploads(raw_client, s3_bucket, root) == []
        assert await _keys(driver) == []
    finally:
        await driver.aclose()


# --------------------------------------------------------------------------- errors


async def test_missing_bucket_is_a_permanent_error_naming_bucket_and_endpoint(
        make_driver: Callable[..., S3Driver], s3_endpoint: str) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    driver = make_driver(bucket=bucket, secret_access_key=secret)
    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("put", lambda: driver.put("k", b"v")),
        ("put", lambda: driver.put("k", b"v", if_absent=True)),
        ("get", lambda: driver.get("k")),
        ("get", lambda: driver.get("k", start=1, end=5)),
        ("list", lambda: _keys(driver)),
        ("delete", lambda: driver.delete(["k"])),
    ]
    try:
        for op, call in calls:
            with pytest.raises(apersist.BackendError) as info:
                await call()
            error = info.value
            # Permanent: neither retryable nor one of the protocol's answers.
            assert type(error) is apersist.BackendError, (op, error)
            message = str(error)
            assert message.startswith(f"s3 {op} failed:"), message
            for fact in (f"bucket={bucket}", f"endpoint={s3_endpoint}", "code=NoSuchBucket",
                         "status=404"):
                assert fact in message, (fact, message)
            assert secret not in message
            assert isinstance(error.__cause__, ClientError)
    finally:
        await driver.aclose()


async def test_unreachable_endpoint_is_transient(make_driver: Callable[..., S3Driver]) -> None:
    # A port nobody listens on (bound, then released): the connection is refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with anyio.fail_after(30):
        driver = make_driver(endpoint=endpoint)
        try:
            with pytest.raises(TransientBackendError, match=f"endpoint={endpoint}") as info:
                await driver.get("k")
            assert isinstance(info.value.__cause__, EndpointConnectionError)
        finally:
            await driver.aclose()


def _client_error(code: str, status: int, message: str = "m") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize(("error", "expected"), [
    (_client_error("NoSuchKey", 404), ObjectNotFoundError),
    (_client_error("404", 404), ObjectNotFoundError),
    (_client_error("PreconditionFailed", 412), ObjectExistsError),
    (_client_error("ConditionalRequestConflict", 409), TransientBackendError),
    (_client_error("OperationAborted", 409), TransientBackendError),
    (_client_error("SlowDown", 503), TransientBackendError),
    (_client_error("Throttling", 400), TransientBackendError),
    (_client_error("RequestTimeout", 400), TransientBackendError),
    (_client_error("InternalError", 500), TransientBackendError),
    (_client_error("ServiceUnavailable", 503), TransientBackendError),
    (_client_error("BadGateway", 502), TransientBackendError),
    (_client_error("GatewayTimeout", 504), TransientBackendError),
    (_client_error("NoSuchBucket", 404), apersist.BackendError),
    (_client_error("AccessDenied", 403), apersist.BackendError),
    (_client_error("InvalidAccessKeyId", 403), apersist.BackendError),
    (_client_error("SignatureDoesNotMatch", 403), apersist.BackendError),
    (_client_error("BucketAlreadyExists", 409), apersist.BackendError),
    (EndpointConnectionError(endpoint_url="http://x"), TransientBackendError),
    (ConnectionClosedError(endpoint_url="http://x"), TransientBackendError),
    (ReadTimeoutError(endpoint_url="http://x"), TransientBackendError),
    (ConnectionResetError("reset"), TransientBackendError),
    (TimeoutError(), TransientBackendError),  # asyncio.TimeoutError is this class on 3.11
    (aiohttp.ClientPayloadError("body cut short"), TransientBackendError),
    (NoCredentialsError(), apersist.BackendError),
    (ParamValidationError(report="bad"), apersist.BackendError),
])
def test_map_errors_classifies(error: Exception, expected: type[Exception]) -> None:
    with pytest.raises(apersist.BackendError) as info, \
            map_errors("put", key="root/k", bucket="b", endpoint="http://e"):
        raise error
    assert type(info.value) is expected
    assert info.value.__cause__ is error
    assert str(info.value).startswith("s3 put failed:")
    assert "key=root/k bucket=b endpoint=http://e" in str(info.value)


def test_map_errors_names_code_and_status_and_masks_secrets() -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    error = _client_error("SlowDown", 503, f"please slow down {secret}")
    with pytest.raises(TransientBackendError) as info, \
            map_errors("put", key="k", bucket="b", endpoint="http://e", secrets=[secret]):
        raise error
    assert "code=SlowDown status=503" in str(info.value)
    assert secret not in str(info.value)


def test_map_errors_passes_other_errors_through() -> None:
    with pytest.raises(KeyError), map_errors("get", key="k", bucket="b", endpoint="e"):
        raise KeyError("not a backend error")
    already = ObjectExistsError("mapped already")
    with pytest.raises(ObjectExistsError) as info, \
            map_errors("put", key="k", bucket="b", endpoint="e"):
        raise already
    assert info.value is already


async def test_delete_reports_per_key_errors(driver: S3Driver,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    client = await _client_of(driver)
    answers = [
        {"Errors": [{"Key": "x", "Code": "NoSuchKey", "Message": "gone"}]},  # ignored
        {"Errors": [{"Key": "x", "Code": "InternalError", "Message": "retry"}]},
        {"Errors": [{"Key": "x", "Code": "AccessDenied", "Message": "no"},
                    {"Key": "y", "Code": "SlowDown", "Message": "retry"}]},
    ]

    async def delete_objects(**kwargs: Any) -> Any:
        return answers.pop(0)

    monkeypatch.setattr(client, "delete_objects", delete_objects)
    await driver.delete(["a"])
    with pytest.raises(TransientBackendError, match="code=InternalError"):
        await driver.delete(["a"])
    with pytest.raises(apersist.BackendError, match="code=AccessDenied failed_keys=2") as info:
        await driver.delete(["a"])
    assert type(info.value) is apersist.BackendError


async def test_delete_batches_of_a_thousand(driver: S3Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    client = await _client_of(driver)
    batches: list[list[str]] = []
    real = client.delete_objects

    async def delete_objects(**kwargs: Any) -> Any:
        batches.append([o["Key"] for o in kwargs["Delete"]["Objects"]])
        assert kwargs["Delete"]["Quiet"] is True
        return await real(**kwargs)

    monkeypatch.setattr(client, "delete_objects", delete_objects)
    await driver.delete([f"k/{i:05d}" for i in range(2500)] + ["k/00000"])
    assert [len(batch) for batch in batches] == [1000, 1000, 500]


async def test_empty_range_of_a_missing_key_is_not_found(driver: S3Driver) -> None:
    for start, end in [(0, 0), (5, 5), (None, 0)]:
        with pytest.raises(ObjectNotFoundError):
            await driver.get("missing", start=start, end=end)
    await driver.put("present", b"abc")
    assert await driver.get("present", start=2, end=2) == b""


# --------------------------------------------------------------------------- prefixes


async def test_roots_are_isolated(make_driver: Callable[..., S3Driver]) -> None:
    one, two = make_driver(), make_driver()
    try:
        await one.put("shared/key", b"one")
        await two.put("shared/key", b"two")
        await one.put("only/one", b"1")
        assert await one.get("shared/key") == b"one"
        assert await two.get("shared/key") == b"two"
        assert await _keys(one) == ["only/one", "shared/key"]
        assert await _keys(two) == ["shared/key"]
        with pytest.raises(ObjectNotFoundError):
            await two.get("only/one")
        await two.put("only/one", b"2", if_absent=True)  # absent under two's root
        await one.delete(["shared/key"])
        assert await two.get("shared/key") == b"two"
        await one.delete(["only/one"])
        await two.delete(["shared/key", "only/one"])
        assert await _keys(one) == await _keys(two) == []
    finally:
        await one.aclose()
        await two.aclose()


async def test_list_strips_the_root(make_driver: Callable[..., S3Driver], raw_client: Any,
                                    s3_bucket: str) -> None:
    root = f"{_root()}/deeper/still"
    driver = make_driver(f"/{root}/")  # slashes around the root are normalized away
    try:
        await driver.put("a/b", b"12")
        await driver.put("a/c", b"345")
        answer = await raw_client.list_objects_v2(Bucket=s3_bucket, Prefix=root)
        assert [o["Key"] for o in answer["Contents"]] == [f"{root}/a/b", f"{root}/a/c"]
        assert [(i.key, i.size) async for i in driver.list("a/")] == [("a/b", 2), ("a/c", 3)]
        assert await _keys(driver, "a/c") == ["a/c"]
        # A sibling root that extends this one's name is not inside it.
        sibling = make_driver(f"{root}x")
        try:
            await sibling.put("a/b", b"no")
            assert await _keys(driver) == ["a/b", "a/c"]
        finally:
            await sibling.aclose()
    finally:
        await driver.aclose()


async def test_empty_root_uses_the_whole_bucket(make_driver: Callable[..., S3Driver],
                                                raw_client: Any) -> None:
    bucket = f"t-{uuid.uuid4().hex[:20]}"
    await raw_client.create_bucket(Bucket=bucket)
    driver = make_driver("", bucket=bucket)
    try:
        await driver.put("top/key", b"x")
        answer = await raw_client.list_objects_v2(Bucket=bucket)
        assert [o["Key"] for o in answer["Contents"]] == ["top/key"]
        assert await _keys(driver) == ["top/key"]
        await driver.delete(["top/key"])
    finally:
        await driver.aclose()
        await raw_client.delete_bucket(Bucket=bucket)


# --------------------------------------------------------------------------- client lifecycle


async def test_one_client_made_lazily_and_closed(make_driver: Callable[..., S3Driver],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []
    real_create = AioSession.create_client

    def create_client(self: Any, *args: Any, **kwargs: Any) -> Any:
        made.append(kwargs)
        return real_create(self, *args, **kwargs)

    monkeypatch.setattr(AioSession, "create_client", create_client)
    driver = make_driver()
    assert made == []  # nothing happens until the first request
    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(driver.put, f"k{i}", b"v")
    assert len(made) == 1
    await driver.aclose()
    await driver.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await driver.get("k0")
    assert len(made) == 1


async def test_aclose_before_use_makes_no_client(make_driver: Callable[..., S3Driver]) -> None:
    driver = make_driver()
    await driver.aclose()
    await driver.aclose()
    assert driver._client is None


async def test_client_honours_every_setting(make_driver: Callable[..., S3Driver],
                                            s3_endpoint: str, s3_bucket: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[dict[str, Any]] = []
    real_create = AioSession.create_client

    def create_client(self: Any, *args: Any, **kwargs: Any) -> Any:
        made.append(kwargs)
        return real_create(self, *args, **kwargs)

    monkeypatch.setattr(AioSession, "create_client", create_client)
    driver = make_driver(max_connections=5, region="eu-west-3", session_token="token-123")
    try:
        await driver.put("k", b"v")  # moto accepts any key and token
        client = await _client_of(driver)
    finally:
        await driver.aclose()
    (kwargs,) = made
    assert kwargs["endpoint_url"] == s3_endpoint
    assert kwargs["aws_access_key_id"] == S3_KEY_ID
    assert kwargs["aws_secret_access_key"] == S3_SECRET
    assert kwargs["aws_session_token"] == "token-123"
    config = client.meta.config
    assert config.region_name == "eu-west-3"
    assert config.s3["addressing_style"] == "path"
    assert config.retries["total_max_attempts"] == 1
    assert config.max_pool_connections >= 5
    assert 0 < config.connect_timeout <= 60
    assert 0 < config.read_timeout <= 120


async def test_credentials_from_the_environment(make_driver: Callable[..., S3Driver],
                                                monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Any) -> None:
    # Explicit credentials all the same, but through botocore's chain (its first link,
    # the environment); empty profile files keep the developer's own out of it.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
    driver = make_driver(access_key=None, secret_access_key=None)
    try:
        await driver.put("k", b"v")
        assert await driver.get("k") == b"v"
        credentials = (await _client_of(driver))._get_credentials()
        assert (await credentials.get_frozen_credentials()).access_key == "from-env"
    finally:
        await driver.aclose()


def test_crc32_matches_botocore() -> None:
    from botocore.httpchecksum import Crc32Checksum

    for data in (b"", b"abc", _payload(3 * MIB + 5, seed=6)):
        reference = Crc32Checksum()
        reference.update(data)
        assert s3_module._crc32_b64(data) == reference.b64digest()


# --------------------------------------------------------------------------- end to end


async def test_run_round_trip_on_s3(s3_endpoint: str, s3_bucket: str) -> None:
    backend = apersist.Backend.s3(_root(), s3_settings(s3_endpoint, s3_bucket))
    await check_round_trip(backend, snapshot_interval_ms=60_000)
