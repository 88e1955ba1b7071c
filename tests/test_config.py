"""Configuration: every constructor and every validation rule, all at construction time."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

import apersist
from apersist import AwsS3Settings, Backend, Config, PersistenceMode, SnapshotAccess
from apersist._config import AzureBackend, FilesystemBackend, MemoryBackend, S3Backend

# --------------------------------------------------------------------------- filesystem


def test_filesystem_backend_from_str_and_pathlike(tmp_path: Path) -> None:
    from_str = Backend.filesystem(str(tmp_path / "store"))
    from_path = Backend.filesystem(tmp_path / "store")
    assert isinstance(from_str, FilesystemBackend)
    assert isinstance(from_str, Backend)
    assert from_str.kind == "filesystem"
    assert from_str.path == tmp_path / "store"
    assert from_str == from_path
    assert hash(from_str) == hash(from_path)
    assert not (tmp_path / "store").exists()  # created on first use, not at construction


def test_filesystem_backend_resolves_relative_and_home_paths(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    relative = Backend.filesystem("rel/store")
    assert relative.path.is_absolute()
    assert relative.path == tmp_path / "rel" / "store"
    monkeypatch.chdir("/")
    assert relative.path == tmp_path / "rel" / "store"  # a later chdir does not move the store
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Backend.filesystem("~/store").path == tmp_path / "home" / "store"


class _PathLike(os.PathLike[str]):
    def __fspath__(self) -> str:
        return "/srv/data"


def test_filesystem_backend_accepts_any_pathlike() -> None:
    assert Backend.filesystem(_PathLike()).path == Path("/srv/data")
    assert Backend.filesystem(PurePosixPath("/srv/data")).path == Path("/srv/data")


@pytest.mark.parametrize("path", ["", "a\0b"])
def test_filesystem_backend_refuses_bad_paths(path: str) -> None:
    with pytest.raises(ValueError, match="path"):
        Backend.filesystem(path)


@pytest.mark.parametrize("path", [None, 3, b"/tmp/x"])
def test_filesystem_backend_refuses_non_paths(path: Any) -> None:
    with pytest.raises(TypeError, match="path"):
        Backend.filesystem(path)


def test_backends_are_frozen(tmp_path: Path) -> None:
    backend = Backend.filesystem(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        backend.path = tmp_path / "elsewhere"  # type: ignore[misc]
    s3 = Backend.s3("root", AwsS3Settings("bucket"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s3.root_path = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- memory


def test_memory_backends_are_shared_by_identity() -> None:
    first, second = Backend.memory(), Backend.memory()
    assert isinstance(first, MemoryBackend)
    assert first.kind == "memory"
    assert first == Config(first).backend  # equality is identity, so reflexive
    assert first != second
    assert first.objects is not second.objects
    first.objects["k"] = b"v"
    assert second.objects == {}
    config_a, config_b = Config(first), Config(first)
    assert config_a.backend is config_b.backend is first
    assert config_a == config_b
    assert Config(first) != Config(second)


async def test_runs_given_one_memory_backend_share_its_objects() -> None:
    backend = Backend.memory()
    async with apersist.run(Config(backend)) as run:
        await run.stream("s").record(1)
    assert backend.objects  # the run wrote into the backend object it was given
    async with apersist.run(Config(backend)) as run:
        assert [event.value async for event in run.stream("s").replay()] == [1]
    async with apersist.run(Config(Backend.memory())) as run:
        assert [event.value async for event in run.stream("s").replay()] == []


# --------------------------------------------------------------------------- S3


def test_s3_settings_defaults() -> None:
    settings = AwsS3Settings("my-bucket")
    assert settings.bucket_name == "my-bucket"
    assert settings.access_key is None
    assert settings.secret_access_key is None
    assert settings.with_path_style is False
    assert settings.region is None
    assert settings.endpoint is None
    assert settings.session_token is None


def test_s3_settings_all_fields() -> None:
    settings = AwsS3Settings("my.bucket-1", access_key="AKIA", secret_access_key="s3cr3t",
                             with_path_style=True, region="eu-west-1",
                             endpoint="http://127.0.0.1:9000/", session_token="tok")
    assert settings.bucket_name == "my.bucket-1"
    assert (settings.access_key, settings.secret_access_key) == ("AKIA", "s3cr3t")
    assert settings.with_path_style is True
    assert settings.region == "eu-west-1"
    assert settings.endpoint == "http://127.0.0.1:9000"  # trailing slash dropped
    assert settings.session_token == "tok"
    # Secrets stay out of reprs (they end up in logs and tracebacks).
    assert "s3cr3t" not in repr(settings)
    assert "tok" not in repr(settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.bucket_name = "other"  # type: ignore[misc]


def test_s3_settings_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        AwsS3Settings("bucket", "AKIA")  # type: ignore[call-arg]


@pytest.mark.parametrize("bucket", ["", "ab", "a" * 64, "Upper", "under_score", "-dash", "dash-",
                                    "dot.", "two..dots", " bucket", "bucket "])
def test_s3_settings_refuse_bad_bucket_names(bucket: str) -> None:
    with pytest.raises(ValueError, match="bucket_name"):
        AwsS3Settings(bucket)


def test_s3_settings_accept_bucket_name_bounds() -> None:
    assert AwsS3Settings("abc").bucket_name == "abc"
    assert AwsS3Settings("a" * 63).bucket_name == "a" * 63


def test_s3_settings_refuse_non_str_bucket() -> None:
    with pytest.raises(TypeError, match="bucket_name"):
        AwsS3Settings(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("creds", [{"access_key": "AKIA"}, {"secret_access_key": "s3cr3t"}])
def test_s3_settings_refuse_half_credentials(creds: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="together"):
        AwsS3Settings("bucket", **creds)


def test_s3_settings_session_token_needs_credentials() -> None:
    with pytest.raises(ValueError, match="session_token"):
        AwsS3Settings("bucket", session_token="tok")


@pytest.mark.parametrize("field", ["access_key", "secret_access_key", "region", "session_token"])
def test_s3_settings_refuse_empty_text(field: str) -> None:
    kwargs: dict[str, Any] = {"access_key": "AKIA", "secret_access_key": "s3cr3t", field: ""}
    with pytest.raises(ValueError, match=field):
        AwsS3Settings("bucket", **kwargs)


@pytest.mark.parametrize("endpoint", ["", "localhost:9000", "ftp://host", "http://", "http://:9000",
                                      "host/path", "http://h:notaport", "http://h:99999",
                                      "http://[::1", "http://h:0"])
def test_s3_settings_refuse_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        AwsS3Settings("bucket", endpoint=endpoint)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "https://s3.example.com",
                                      "http://[::1]:9000", "https://minio.local/base"])
def test_s3_settings_accept_good_endpoints(endpoint: str) -> None:
    assert AwsS3Settings("bucket", endpoint=endpoint).endpoint == endpoint


def test_s3_settings_with_path_style_must_be_bool() -> None:
    with pytest.raises(TypeError, match="with_path_style"):
        AwsS3Settings("bucket", with_path_style="yes")  # type: ignore[arg-type]


def test_s3_backend() -> None:
    settings = AwsS3Settings("bucket")
    backend = Backend.s3("/data/run-1/", settings)
    assert isinstance(backend, S3Backend)
    assert backend.kind == "s3"
    assert backend.root_path == "data/run-1"  # normalized: no leading, trailing or double slashes
    assert backend.bucket_settings is settings
    assert Backend.s3("a//b", settings).root_path == "a/b"
    assert Backend.s3("", settings).root_path == ""
    assert Backend.s3("a/b", settings) == Backend.s3("/a/b/", settings)


def test_s3_backend_needs_settings() -> None:
    with pytest.raises(TypeError, match="bucket_settings"):
        Backend.s3("root", "bucket")  # type: ignore[arg-type]


@pytest.mark.parametrize("root", ["..", "../x", "a/../b", "a/..", "./a", "a/./b", "a\\b", "a/\x01b"])
def test_root_path_refuses_dot_parts(root: str) -> None:
    with pytest.raises(ValueError, match="root_path"):
        Backend.s3(root, AwsS3Settings("bucket"))
    with pytest.raises(ValueError, match="root_path"):
        Backend.azure(root, "account", "pw", "container")


def test_root_path_allows_dots_inside_names() -> None:
    assert Backend.s3("a..b/.c/d.", AwsS3Settings("bucket")).root_path == "a..b/.c/d."


def test_root_path_must_be_str() -> None:
    with pytest.raises(TypeError, match="root_path"):
        Backend.s3(Path("a"), AwsS3Settings("bucket"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- Azure


def test_azure_backend_default_endpoint() -> None:
    backend = Backend.azure("/root/", "myaccount", "pa55", "my-container")
    assert isinstance(backend, AzureBackend)
    assert backend.kind == "azure"
    assert backend.root_path == "root"
    assert backend.account == "myaccount"
    assert backend.password == "pa55"
    assert backend.container == "my-container"
    assert backend.endpoint == "https://myaccount.blob.core.windows.net"
    assert "pa55" not in repr(backend)


def test_azure_backend_custom_endpoint() -> None:
    backend = Backend.azure("root", "devstoreaccount1", "key", "container",
                            endpoint="http://127.0.0.1:10000/devstoreaccount1/")
    assert backend.endpoint == "http://127.0.0.1:10000/devstoreaccount1"


def test_azure_endpoint_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        Backend.azure("root", "account", "pw", "container", "http://x")  # type: ignore[call-arg]


@pytest.mark.parametrize("endpoint", ["", "127.0.0.1:10000", "ftp://x", "http://", "http://h:bad"])
def test_azure_backend_refuses_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        Backend.azure("root", "account", "pw", "container", endpoint=endpoint)


@pytest.mark.parametrize("container", ["", "ab", "Upper", "under_score", "-lead", "trail-",
                                       "double--dash", "a" * 64, "spa ce"])
def test_azure_backend_refuses_bad_containers(container: str) -> None:
    with pytest.raises(ValueError, match="container"):
        Backend.azure("root", "account", "pw", container)


def test_azure_backend_container_name_bounds() -> None:
    assert Backend.azure("r", "account", "pw", "abc").container == "abc"
    assert Backend.azure("r", "account", "pw", "a-b" + "c" * 60).container == "a-b" + "c" * 60


@pytest.mark.parametrize("account", ["", "ab", "Upper", "with-dash", "a" * 25])
def test_azure_backend_refuses_bad_accounts(account: str) -> None:
    with pytest.raises(ValueError, match="account"):
        Backend.azure("root", account, "pw", "container")


def test_azure_backend_refuses_empty_password() -> None:
    with pytest.raises(ValueError, match="password"):
        Backend.azure("root", "account", "", "container")
    with pytest.raises(TypeError, match="password"):
        Backend.azure("root", "account", None, "container")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- Config


def test_config_defaults(tmp_path: Path) -> None:
    backend = Backend.filesystem(tmp_path)
    config = Config(backend)
    assert config.backend is backend
    assert config.snapshot_interval_ms == 0
    assert config.snapshot_access is SnapshotAccess.FULL
    assert config.persistence_mode is PersistenceMode.PERSISTING
    assert config.continue_after_replay is True
    assert config.max_pending_bytes > 0
    assert config.max_segment_bytes > 0
    assert config.upload_concurrency >= 1
    assert config.writer_label is None
    assert config.takeover_idle_ms is None  # the newest writer takes over, as it always did


def test_config_keeps_every_argument(tmp_path: Path) -> None:
    backend = Backend.filesystem(tmp_path)
    config = Config(backend, snapshot_interval_ms=250, snapshot_access=SnapshotAccess.REPLAY,
                    persistence_mode=PersistenceMode.UDF_CACHING, continue_after_replay=False,
                    max_pending_bytes=1 << 20, max_segment_bytes=1 << 16, upload_concurrency=3,
                    writer_label="replica-a@eu-1", takeover_idle_ms=30_000)
    assert config.snapshot_interval_ms == 250
    assert config.snapshot_access is SnapshotAccess.REPLAY
    assert config.persistence_mode is PersistenceMode.UDF_CACHING
    assert config.continue_after_replay is False
    assert (config.max_pending_bytes, config.max_segment_bytes, config.upload_concurrency) == (
        1 << 20, 1 << 16, 3)
    assert (config.writer_label, config.takeover_idle_ms) == ("replica-a@eu-1", 30_000)


@pytest.mark.parametrize("name", ["backend", "snapshot_interval_ms", "snapshot_access",
                                  "persistence_mode", "continue_after_replay", "max_pending_bytes",
                                  "max_segment_bytes", "upload_concurrency", "writer_label",
                                  "takeover_idle_ms"])
def test_config_attributes_are_read_only(name: str) -> None:
    config = Config(Backend.memory())
    before = getattr(config, name)
    with pytest.raises(AttributeError):
        setattr(config, name, before)
    with pytest.raises(AttributeError):
        delattr(config, name)
    assert getattr(config, name) is before


def test_config_refuses_new_attributes() -> None:
    with pytest.raises((AttributeError, TypeError)):
        Config(Backend.memory()).surprise = 1  # type: ignore[attr-defined]


def test_config_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Config(Backend.memory(), 100)  # type: ignore[call-arg]


@pytest.mark.parametrize(("field", "value"), [
    ("snapshot_interval_ms", -1), ("max_pending_bytes", 1023), ("max_segment_bytes", 0),
    ("upload_concurrency", 0), ("upload_concurrency", -3), ("takeover_idle_ms", 0),
    ("takeover_idle_ms", -1),
])
def test_config_refuses_out_of_range_numbers(field: str, value: int) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        Config(Backend.memory(), **kwargs)


@pytest.mark.parametrize(("field", "value"), [
    ("snapshot_interval_ms", 1.5), ("snapshot_interval_ms", "10"), ("snapshot_interval_ms", True),
    ("snapshot_interval_ms", None), ("upload_concurrency", 2.0), ("max_pending_bytes", False),
    ("continue_after_replay", 1), ("continue_after_replay", "yes"), ("continue_after_replay", None),
    ("writer_label", 5), ("writer_label", b"a"), ("takeover_idle_ms", 1.5),
    ("takeover_idle_ms", True), ("takeover_idle_ms", "1000"),
])
def test_config_refuses_wrong_types(field: str, value: object) -> None:
    with pytest.raises(TypeError, match=field):
        Config(Backend.memory(), **{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("label", ["", " a", "a b", "tab\there", "new\nline", "x" * 129,
                                   "nul\x00", "del\x7f", "lone\ud800"])
def test_config_refuses_labels_that_would_garble_a_message(label: str) -> None:
    with pytest.raises(ValueError, match="writer_label must be 1 to 128 characters without "
                                         "spaces or control characters"):
        Config(Backend.memory(), writer_label=label)


def test_config_accepts_labels_of_any_script() -> None:
    for label in ("a", "x" * 128, "réplica-β/2", "svc:orders@host-7"):
        assert Config(Backend.memory(), writer_label=label).writer_label == label


def test_config_accepts_number_bounds() -> None:
    config = Config(Backend.memory(), snapshot_interval_ms=0, max_pending_bytes=1024,
                    max_segment_bytes=1024, upload_concurrency=1)
    assert (config.max_pending_bytes, config.upload_concurrency) == (1024, 1)


@pytest.mark.parametrize("backend", [None, "memory", object(), Backend])
def test_config_refuses_non_backends(backend: Any) -> None:
    with pytest.raises(TypeError, match="backend"):
        Config(backend)


def test_config_refuses_a_bare_backend() -> None:
    with pytest.raises(TypeError, match="backend"):
        Config(Backend())


@pytest.mark.parametrize("member", list(SnapshotAccess))
def test_snapshot_access_names_and_values_as_strings(member: SnapshotAccess) -> None:
    for text in (member.name, member.name.lower(), member.value, member.name.title()):
        assert Config(Backend.memory(), snapshot_access=text).snapshot_access is member


@pytest.mark.parametrize("member", list(PersistenceMode))
def test_persistence_mode_names_and_values_as_strings(member: PersistenceMode) -> None:
    for text in (member.name, member.name.lower(), member.value):
        assert Config(Backend.memory(), persistence_mode=text).persistence_mode is member


def test_enum_members() -> None:
    assert {m.name for m in SnapshotAccess} == {"FULL", "RECORD", "REPLAY", "OFFSETS_ONLY"}
    assert {m.name for m in PersistenceMode} == {"PERSISTING", "UDF_CACHING", "SPEEDRUN_REPLAY",
                                                 "REALTIME_REPLAY"}


@pytest.mark.parametrize(("field", "value"), [
    ("snapshot_access", "everything"), ("snapshot_access", ""), ("snapshot_access", " full"),
    ("snapshot_access", 1), ("snapshot_access", None), ("snapshot_access", PersistenceMode.PERSISTING),
    ("persistence_mode", "persist"), ("persistence_mode", "FULL"), ("persistence_mode", 0),
    ("persistence_mode", SnapshotAccess.FULL),
])
def test_config_refuses_unknown_enum_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as info:
        Config(Backend.memory(), **{field: value})  # type: ignore[arg-type]
    assert "choices=" in str(info.value)


def test_config_equality(tmp_path: Path) -> None:
    assert Config(Backend.filesystem(tmp_path)) == Config(Backend.filesystem(tmp_path))
    assert Config(Backend.filesystem(tmp_path)) != Config(Backend.filesystem(tmp_path / "x"))
    assert Config(Backend.filesystem(tmp_path), snapshot_access="replay") == Config(
        Backend.filesystem(tmp_path), snapshot_access=SnapshotAccess.REPLAY)
    assert hash(Config(Backend.filesystem(tmp_path))) == hash(Config(Backend.filesystem(tmp_path)))


# --------------------------------------------------------------------------- simple_config


def test_simple_config_is_deprecated_and_equal(tmp_path: Path) -> None:
    backend = Backend.filesystem(tmp_path)
    with pytest.warns(DeprecationWarning, match="simple_config") as record:
        config = Config.simple_config(backend, 100, SnapshotAccess.RECORD,
                                      PersistenceMode.SPEEDRUN_REPLAY, False)
    assert len(record) == 1
    assert record[0].filename == __file__  # the warning points at the caller
    assert config == Config(backend, snapshot_interval_ms=100, snapshot_access=SnapshotAccess.RECORD,
                            persistence_mode=PersistenceMode.SPEEDRUN_REPLAY,
                            continue_after_replay=False)


def test_simple_config_defaults_and_validation() -> None:
    backend = Backend.memory()
    with pytest.warns(DeprecationWarning, match="simple_config"):
        config = Config.simple_config(backend)
    assert config == Config(backend)
    with pytest.warns(DeprecationWarning, match="simple_config"), pytest.raises(
            ValueError, match="snapshot_interval_ms"):
        Config.simple_config(backend, snapshot_interval_ms=-5)
    with pytest.warns(DeprecationWarning, match="simple_config"), pytest.raises(
            ValueError, match="snapshot_access"):
        Config.simple_config(backend, snapshot_access="nope")
    with pytest.warns(DeprecationWarning, match="simple_config"):
        mode = Config.simple_config(backend, persistence_mode="udf_caching").persistence_mode
    assert mode is PersistenceMode.UDF_CACHING
