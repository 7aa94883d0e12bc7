"""A network namespace of the test's own, for real traffic to Kubernetes endpoints.

A real API server refuses EndpointSlices that point at loopback ("may not be in the loopback
range"), so tests that send traffic put their backends on TEST-NET addresses (192.0.2.0/24, RFC
5737, routed nowhere) on the `lo` of a namespace they create, and run Envoy and the control plane
there too. The namespace has no name in /var/run/netns: a file descriptor of this process holds
it, so nothing outlives the test run, even a killed one. It needs root (CAP_SYS_ADMIN).

Linux keeps the network namespace per thread, and a socket stays in the namespace it was made
in. So `inside()` moves the calling thread in for a block: sockets bound and processes started
there live in the namespace afterwards, whichever thread uses them. `reach_host(port)` and
`reach_inside(port)` forward a TCP port across (the API server on the host's 127.0.0.1 for the
control plane inside; Envoy's admin port inside for the test outside).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
TEST_NET = "192.0.2.0/24"

_libc = ctypes.CDLL(None, use_errno=True)


def unavailable() -> str | None:
    """Why a network namespace cannot be made here (a reason to skip), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (tests sending traffic to EndpointSlice addresses)"
    try:
        NetworkNamespace().close()
    except OSError as error:
        return f"cannot create a network namespace: {error}"
    return None


class NetworkNamespace:
    """A new network namespace with `lo` up and every TEST-NET address (192.0.2.0/24) local on it."""

    def __init__(self):
        self._host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._forwards: list[_Forward] = []
        if _libc.unshare(CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            os.close(self._host)
            raise OSError(error, f"unshare(CLONE_NEWNET): {os.strerror(error)}")
        try:
            self._fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            for command in (["ip", "link", "set", "lo", "up"], ["ip", "route", "add", "local", TEST_NET, "dev", "lo"]):
                subprocess.run(command, check=True, capture_output=True, timeout=10)
        finally:
            _setns(self._host)

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """The calling thread is in the namespace for the block (no awaits in it: the event loop's
        thread must not run other tasks in the wrong namespace)."""
        _setns(self._fd)
        try:
            yield
        finally:
            _setns(self._host)

    def popen(self, args: list[str], **options) -> subprocess.Popen:
        """A process in the namespace (started from the calling thread, which Envoy's parent-death
        signal is tied to)."""
        with self.inside():
            return subprocess.Popen(args, **options)

    def reach_host(self, port: int) -> None:
        """Inside, 127.0.0.1:`port` reaches the host's 127.0.0.1:`port` (an API server, say)."""
        with self.inside():
            listener = _listener(port)
        self._forwards.append(_Forward(listener, port, connect_ns=self._host, host_ns=self._host))

    def reach_inside(self, port: int, *, address: str = "127.0.0.1") -> None:
        """On the host, 127.0.0.1:`port` reaches `address`:`port` inside (Envoy's admin, say)."""
        self._forwards.append(_Forward(_listener(port), port, connect_ns=self._fd, host_ns=self._host,
                                       address=address))

    def close(self) -> None:
        for forward in self._forwards:
            forward.close()
        os.close(self._fd)
        os.close(self._host)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


def _listener(port: int) -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    return listener


class _Forward:
    """Accepts on `listener`; each connection is relayed to `address`:`port` in `connect_ns`."""

    def __init__(self, listener: socket.socket, port: int, *, connect_ns: int, host_ns: int,
                 address: str = "127.0.0.1"):
        self._listener, self._target, self._connect_ns, self._host_ns = listener, (address, port), connect_ns, host_ns
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=f"forward-{port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                _setns(self._connect_ns)
                try:
                    upstream = socket.create_connection(self._target, timeout=5)
                finally:
                    _setns(self._host_ns)
            except OSError:
                client.close()  # the target is down: the client sees its connection closed
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):  # either side gone: both connections end
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._open.discard(source)
        source.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        with self._lock:
            for connection in list(self._open):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
