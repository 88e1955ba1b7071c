"""moto_server, with its conditional writes made atomic: ``python moto_atomic.py -H HOST -p PORT``.

moto answers ``If-None-Match: *`` by looking the key up and then storing the object, two
steps that its threaded server lets two requests interleave: both creates of one key can
succeed. Real S3 never does that, and apersist's commits and fencing stand on it (a run
checks it at open and refuses a store that lets both win). This serves moto's own
application with every request carrying ``If-None-Match`` taken under one lock, so such
creates run one at a time; every other request stays concurrent. A request's body is read
in full before it takes the lock: a client frozen in the middle of sending one (the zombie
campaign stops writers with SIGSTOP at random instants) must not hold every other create.
A create whose client went away before sending its whole body is refused, as S3 refuses
it (``IncompleteBody``): passed on, moto stored the part it got, and a writer killed
mid-request left a commit record of 0 bytes that made the store unopenable.
"""

from __future__ import annotations

import argparse
import io
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class AtomicConditionalWrites:
    """WSGI middleware: requests with ``If-None-Match`` run one at a time, to completion."""

    def __init__(self, app: WsgiApp) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if "HTTP_IF_NONE_MATCH" not in environ:
            return self._app(environ, start_response)
        body, complete = _read_body(environ)
        if not complete:
            start_response("400 Bad Request", [("Content-Type", "application/xml")])
            return [b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>IncompleteBody</Code>"
                    b"<Message>You did not provide the number of bytes specified by the "
                    b"Content-Length HTTP header.</Message></Error>"]
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        # werkzeug has already undone a chunked transfer: the body is now a plain one.
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = False
        with self._lock:
            # The whole response is produced under the lock: check and store included.
            return list(self._app(environ, start_response))


def _read_body(environ: dict[str, Any]) -> tuple[bytes, bool]:
    """The request body (``CONTENT_LENGTH`` bytes, or up to the end of a chunked one), and
    whether it came whole: False when the client went away before sending all of it."""
    stream = environ["wsgi.input"]
    if environ.get("wsgi.input_terminated"):
        return bytes(stream.read()), True
    length = int(environ.get("CONTENT_LENGTH") or 0)
    chunks: list[bytes] = []
    while length > 0:
        chunk = stream.read(min(length, 1 << 20))
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        length -= len(chunk)
    return b"".join(chunks), True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(args.host, args.port, AtomicConditionalWrites(app), threaded=True,
               request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
