"""Real protocol servers for the S3 and Azure tests: moto_server and Azurite on 127.0.0.1.

Started once per test session on free loopback ports (or reused when the environment
already names them: ``APERSIST_S3_ENDPOINT``, ``APERSIST_AZURE_ENDPOINT``). A server that
cannot start fails the session with the reason and its log tail: backend tests never skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent  # tests/support: this file, the workers, the wrappers
ROOT = SUPPORT.parent.parent  # the checkout
AZURITE_ACCOUNT = "devstoreaccount1"
# The worker processes of the campaigns abandon a request the server leaves unanswered after
# this long and retry it (the default, 60 s, equals a campaign's whole wait for a worker to
# open a store): a run recovers from a stalled request by retrying, and so must the
# campaigns, whose subject is apersist, not the server's stalls. (Two CI runs saw a zombie
# writer on Azurite get no answer for a minute or more: Azurite's periodic garbage
# collection, which ``azurite_command`` now keeps from running; see azurite_no_gc.js.)
WORKER_ATTEMPT_TIMEOUT_S = 10.0
# Azurite's well-known development key (public, documented by Microsoft).
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
               "K1SZFPTOtr/KBHBeksoGMGw==")
S3_KEY_ID = "testing"
S3_SECRET = "testing"
S3_REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _serve(name: str, argv: Sequence[str], log_path: Path, timeout: float = 60.0) -> Iterator[int]:
    """Run ``argv`` (``{port}`` -> a free port) until the port accepts; yield the port."""
    failures = []
    for _attempt in range(3):
        port = _free_port()
        with log_path.open("ab") as log:
            proc = subprocess.Popen([a.replace("{port}", str(port)) for a in argv],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            failures.append(f"exit={proc.poll()}")
            _stop(proc)
            continue
        try:
            yield port
        finally:
            _stop(proc)
        return
    tail = log_path.read_bytes()[-3000:].decode(errors="replace") if log_path.exists() else ""
    raise RuntimeError(f"{name} did not start ({', '.join(failures)}); log tail:\n{tail}")


@contextmanager
def s3_server(log_dir: Path) -> Iterator[str]:
    """An S3 endpoint URL: $APERSIST_S3_ENDPOINT, or a moto_server started here."""
    if url := os.environ.get("APERSIST_S3_ENDPOINT"):
        yield url
        return
    # moto (the `test` extra) served by moto_atomic.py: moto with atomic create-if-absent.
    if importlib.util.find_spec("moto") is None:
        raise RuntimeError("moto is missing: pip install 'apersist[test]' (moto[server])")
    with _serve("moto_server", [sys.executable, str(Path(__file__).with_name("moto_atomic.py")),
                                "-H", "127.0.0.1", "-p", "{port}"],
                log_dir / "moto.log") as port:
        yield f"http://127.0.0.1:{port}"


def azurite_bin() -> str:
    """The ``azurite-blob`` executable: $AZURITE_BIN, the one .ci/test installs, or $PATH's."""
    exe = os.environ.get("AZURITE_BIN") or str(ROOT / ".cache/infra/node_modules/.bin/azurite-blob")
    if Path(exe).exists():
        return exe
    found = shutil.which("azurite-blob")
    if not found:
        raise RuntimeError("azurite-blob is missing: run `bash .ci/test` (it installs "
                           "azurite@3.37.0 into .cache/infra) or set AZURITE_BIN")
    return found


def azurite_command() -> list[str]:
    """The argv that starts Azurite's blob service without its periodic garbage collection.

    ``azurite_no_gc.js`` says why: the collection's sweep is quadratic in what a suite has
    deleted and stops the server for minutes. ``azurite-blob`` links to (or is) Azurite's
    ``dist/src/blob/main.js``, which the wrapper starts under node.
    """
    main = Path(azurite_bin()).resolve()
    if main.name != "main.js":
        raise RuntimeError(f"{azurite_bin()} does not lead to Azurite's blob main.js (it resolves "
                           f"to {main}): point AZURITE_BIN at node_modules/.bin/azurite-blob")
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is missing: Azurite needs Node.js on $PATH")
    return [node, str(Path(__file__).with_name("azurite_no_gc.js")), str(main)]


@contextmanager
def azure_server(log_dir: Path) -> Iterator[str]:
    """An Azure blob endpoint URL (with the account): $APERSIST_AZURE_ENDPOINT, or Azurite."""
    if url := os.environ.get("APERSIST_AZURE_ENDPOINT"):
        yield url
        return
    argv = [*azurite_command(), "--silent", "--disableTelemetry", "--skipApiVersionCheck",
            "--inMemoryPersistence", "--blobHost", "127.0.0.1", "--blobPort", "{port}"]
    with _serve("azurite", argv, log_dir / "azurite.log") as port:
        yield f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for a support script run as a subprocess (``SUPPORT / "crash_worker.py"``):
    this process's plus ``extra``, with this checkout, then ``tests/support``, first on
    ``PYTHONPATH``, so the script imports this checkout's apersist, whichever one the venv
    installed (a script's own folder only puts ``tests/support`` on its path)."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(SUPPORT), env.get("PYTHONPATH")) if p)
    return env


def backend_spec(backend: object) -> str:
    """A JSON description of a durable test backend, to rebuild it in a subprocess."""
    import orjson

    from apersist._config import AzureBackend, FilesystemBackend, S3Backend

    if isinstance(backend, FilesystemBackend):
        return orjson.dumps({"kind": "filesystem", "path": str(backend.path)}).decode()
    if isinstance(backend, S3Backend):
        s = backend.bucket_settings
        return orjson.dumps({"kind": "s3", "root": backend.root_path, "bucket": s.bucket_name,
                             "endpoint": s.endpoint}).decode()
    if isinstance(backend, AzureBackend):
        return orjson.dumps({"kind": "azure", "root": backend.root_path,
                             "container": backend.container,
                             "endpoint": backend.endpoint}).decode()
    raise TypeError(f"no subprocess spec for {backend!r} (memory stores live in one process)")


def backend_from_spec(text: str) -> object:
    """The inverse of ``backend_spec``."""
    import orjson

    import apersist

    spec = orjson.loads(text)
    if spec["kind"] == "filesystem":
        return apersist.Backend.filesystem(spec["path"])
    if spec["kind"] == "s3":
        settings = apersist.AwsS3Settings(
            spec["bucket"], access_key=S3_KEY_ID, secret_access_key=S3_SECRET,
            with_path_style=True, region=S3_REGION, endpoint=spec["endpoint"])
        return apersist.Backend.s3(spec["root"], settings)
    if spec["kind"] == "azure":
        return apersist.Backend.azure(spec["root"], AZURITE_ACCOUNT, AZURITE_KEY,
                                      spec["container"], endpoint=spec["endpoint"])
    raise ValueError(f"unknown backend spec: {text}")
