"""moto_server, with its conditional writes made atomic: ``python moto_atomic.py -H HOST -p PORT``.

moto answers ``If-None-Match: *`` by looking the key up and then storing the object, two
steps that its threaded server lets two requests interleave: both creates of one key can
succeed. Real S3 never does that, and apersist's commits and fencing stand on it (a run
checks it at open and refuses a store that lets both win). This serves moto's own
application with every request carrying ``If-None-Match`` taken under one lock, so such
creates run one at a time; every other request stays concurrent.
"""

from __future__ import annotations

import argparse
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
        with self._lock:
            # The whole response is produced under the lock: check and store included.
            return list(self._app(environ, start_response))


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
