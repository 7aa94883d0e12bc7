"""A sample HTTP backend on 127.0.0.1 for the demo and the tests: it answers with its own name,
after `?delay=SECONDS` if asked (a slow request holds a circuit-breaker slot).

It also accepts WebSocket upgrades and echoes each message prefixed with its name, so the demo
and the tests show WebSockets through Envoy on their own cluster; it counts the WebSockets it holds
(the most at once, too: what a pod carried in a surge), and can be set `failing` (503s). A thread per server and per
connection (the standard library's ThreadingHTTPServer), so it runs beside an asyncio control
plane without touching its loop; no WebSocket library, so the demo needs none.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
_TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class SampleBackend:
    def __init__(self, name: str, *, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None):
        """`tls`: serve HTTPS with this server context (a backend behind upstream TLS)."""
        self.name = name
        self.hits = 0
        self.failing = False  # answer 503 to every plain request: a broken pod, for outlier ejection
        self.websockets_open = 0
        self.most_websockets_open = 0  # the most WebSockets it held at once: a pod's load in a surge
        self._counting = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

            def do_GET(self):  # noqa: N802 (http.server's naming)
                backend.hits += 1
                if (self.headers.get("upgrade") or "").lower() == "websocket":
                    backend._websocket_opened(+1)
                    try:
                        self._echo_websocket()
                    finally:
                        backend._websocket_opened(-1)
                    return
                if backend.failing:
                    self.send_response(503)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                delay = parse_qs(urlsplit(self.path).query).get("delay")
                if delay:  # a slow request, to hold a circuit-breaker slot (at most 10 s)
                    time.sleep(min(float(delay[0]), 10.0))
                body = f"{backend.name}\n".encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _echo_websocket(self):
                key = (self.headers.get("sec-websocket-key") or "").encode()
                self.send_response(101)
                self.send_header("upgrade", "websocket")
                self.send_header("connection", "Upgrade")
                self.send_header("sec-websocket-accept",
                                 base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest()).decode())
                self.end_headers()
                self.wfile.flush()
                self.close_connection = True
                prefix = f"{backend.name}: ".encode()
                while (frame := _read_frame(self.rfile)) is not None:
                    opcode, payload = frame
                    if opcode == _CLOSE:
                        _write_frame(self.wfile, _CLOSE, payload[:2])
                        return
                    if opcode == _PING:
                        _write_frame(self.wfile, _PONG, payload)
                    elif opcode in (_TEXT, _BINARY):
                        _write_frame(self.wfile, opcode, prefix + payload)

            def log_message(self, *args):
                pass

        self._server = _QuietServer((host, port), Handler)
        self._server.daemon_threads = True
        if tls is not None:  # a failed handshake is an OSError in accept(): that client is dropped, no one else
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name=f"backend-{name}", daemon=True).start()

    def _websocket_opened(self, change: int) -> None:
        with self._counting:
            self.websockets_open += change
            self.most_websockets_open = max(self.most_websockets_open, self.websockets_open)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuietServer(ThreadingHTTPServer):
    request_queue_size = 1024  # the standard library's 5 drops SYNs in a burst (Envoy then times out: 503s)

    def handle_error(self, request, client_address):
        """A client that went away mid-answer (a test that stopped waiting) is not an error here."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _read_frame(stream: BinaryIO) -> tuple[int, bytes] | None:
    """One client frame (opcode, unmasked payload); None when the connection ended. Clients send
    small unfragmented messages here, so continuation frames are not reassembled."""
    header = stream.read(2)
    if len(header) < 2:
        return None
    opcode, length = header[0] & 0x0F, header[1] & 0x7F
    if length >= 126:
        size = 2 if length == 126 else 8
        length = int.from_bytes(stream.read(size), "big")
    mask = stream.read(4) if header[1] & 0x80 else b"\0\0\0\0"
    payload = stream.read(length)
    return opcode, _masked(payload, mask)


def _write_frame(stream: BinaryIO, opcode: int, payload: bytes, *, mask: bytes | None = None) -> None:
    """A final frame: unmasked from a server, masked (with 4 random bytes) from a client."""
    length, masked = len(payload), 0x80 if mask is not None else 0
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, masked | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, masked | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, masked | 127, length)
    if mask is not None:
        header += mask
        payload = _masked(payload, mask)
    stream.write(header + payload)
    stream.flush()


def _masked(payload: bytes, mask: bytes) -> bytes:
    """RFC 6455 masking, its own inverse: each byte XORed with the 4-byte mask, in turn."""
    return bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def websocket_round_trip(host: str, port: int, path: str, text: str, *, timeout: float = 5.0) -> str:
    """Open a WebSocket to host:port (through Envoy, say), send `text`, return the answer, close.
    For the demo's check, with no WebSocket library; raises ConnectionError when refused."""
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((host, port), timeout=timeout) as connection, connection.makefile("rwb") as stream:
        stream.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        stream.flush()
        status = stream.readline().decode(errors="replace").strip()
        if status.split(" ")[1:2] != ["101"]:
            raise ConnectionError(f"WebSocket upgrade to {path} refused: {status or 'connection closed'}")
        while stream.readline() not in (b"\r\n", b""):
            pass
        _write_frame(stream, _TEXT, text.encode(), mask=os.urandom(4))
        frame = _read_frame(stream)
        _write_frame(stream, _CLOSE, b"\x03\xe8", mask=os.urandom(4))  # 1000: normal closure
    if frame is None:
        raise ConnectionError(f"WebSocket to {path} closed before answering")
    return frame[1].decode(errors="replace")
