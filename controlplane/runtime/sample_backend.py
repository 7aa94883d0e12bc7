"""A sample HTTP backend on 127.0.0.1 for the demo and the tests: it answers with its own name.

A thread per server and per connection (the standard library's ThreadingHTTPServer), so it runs
beside an asyncio control plane without touching its loop.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SampleBackend:
    def __init__(self, name: str, *, host: str = "127.0.0.1", port: int = 0):
        self.name = name
        self.hits = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's naming)
                backend.hits += 1
                body = f"{backend.name}\n".encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name=f"backend-{name}", daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
