"""Fixtures of the data tests: a local HTTP server over a folder (python's http.server, 127.0.0.1, in a thread)."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass  # one line per request on stderr would bury a failing test's output


@pytest.fixture
def serve_dir():
    """serve_dir(folder) -> "http://127.0.0.1:PORT", the folder's files served until the test ends."""
    servers = []

    def serve(folder) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                 functools.partial(_QuietHandler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
