"""A small threaded HTTP server on 127.0.0.1 for tests, the demo and benchmarks.

It serves a table of paths -> :class:`Route`; a route can misbehave on
purpose (wrong status, slow start, slow drip, redirect, cut-off transfer,
opt-out headers, a status line and headers trickled a byte at a time, an
endless header, a request never answered, a connection reset, a chunked
body), so a download
run can be tested against every failure a real URL list holds without
reaching the internet::

    routes = {"/cat.jpg": Route(jpeg_bytes, "image/jpeg"),
              "/gone": Route(status=404),
              "/slow": Route(jpeg_bytes, delay=5.0),
              "/moved": Route(redirect="/cat.jpg")}
    with LocalHTTPServer(routes) as server:
        url = server.url("/cat.jpg")
        ...
        server.hits["/slow"]          # how many requests reached a path
        server.in_flight()            # {client (host, port): path} being answered now

Unknown paths answer 404. The server speaks HTTP/1.1 with keep-alive, so a
client that pools connections can reuse them, and it has a deep listen
backlog, so hundreds of clients connecting at once are not dropped.

:class:`SilentServer` accepts connections and never reads or answers (a
host that takes the connection and then says nothing).

A dripping or hanging answer ends when the client hangs up, when the
server stops, or after ``Route.drip_limit`` seconds, whichever comes first.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Headers = Mapping[str, str] | Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Route:
    """What one path answers."""

    body: bytes = b""
    content_type: str = "application/octet-stream"
    #: 200 by default; 302 when ``redirect`` is set and status is left at 200
    status: int = 200
    #: extra headers, a mapping or (name, value) pairs (pairs may repeat a name,
    #: e.g. two ``X-Robots-Tag`` lines)
    headers: Headers = ()
    #: seconds to wait before the status line (a client with a shorter timeout
    #: times out)
    delay: float = 0.0
    #: path on this server or absolute URL for the ``Location`` header
    redirect: str | None = None
    #: declare the full ``Content-Length`` but send only this many bytes of the
    #: body, then close the connection (a transfer cut short)
    truncate_after: int | None = None
    #: seconds to sleep between ``chunk_size`` pieces of the body (slow drip)
    drip: float = 0.0
    chunk_size: int = 65536
    #: ``False``: send no ``Content-Length``; the body ends when the
    #: connection closes (the client cannot know the size up front)
    content_length: bool = True
    #: send the body with ``Transfer-Encoding: chunked`` in ``chunk_size``
    #: pieces (no ``Content-Length``; keep-alive is kept)
    chunked: bool = False
    #: seconds between single bytes of the status line and the headers (a
    #: server that trickles its head; each byte comes inside a read timeout)
    head_drip: float = 0.0
    #: after the status line, one header line that never ends, a byte every
    #: ``head_drip`` seconds (1 s when that is 0)
    endless_header: bool = False
    #: read the request and never answer
    hang: bool = False
    #: read the request, then reset the connection (a TCP RST, no answer)
    reset: bool = False
    #: the longest a dripping or hanging answer goes on before the server
    #: closes the connection
    drip_limit: float = 60.0


class LocalHTTPServer:
    """Serve ``routes`` on 127.0.0.1 from a background thread; a context
    manager. ``routes`` may be changed while it runs (``server.routes[p] = r``)."""

    def __init__(self, routes: Mapping[str, Route] | None = None, host: str = "127.0.0.1", port: int = 0):
        self.routes: dict[str, Route] = dict(routes or {})
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, int], str] = {}
        self._stopping = threading.Event()
        self._httpd = _Server((host, port), _handler_for(self))
        self.host, self.port = self._httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    def url(self, path: str) -> str:
        if not path.startswith("/"):
            path = "/" + path
        return f"http://{self.host}:{self.port}{path}"

    def start(self) -> LocalHTTPServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="pairforge-httpserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # ends dripping and hanging answers
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def serve_forever(self) -> None:
        """Serve in the calling thread (for a server in its own process)."""
        self._httpd.serve_forever()

    def __enter__(self) -> LocalHTTPServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def in_flight(self) -> dict[tuple[str, int], str]:
        """The requests being answered now: client address -> path (a test
        maps the client's port to the process holding that socket)."""
        with self._lock:
            return dict(self._in_flight)

    def _record(self, path: str) -> Route | None:
        with self._lock:
            self.hits[path] += 1
        return self.routes.get(path)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # the default backlog of 5 drops connections when many clients connect at
    # once (each drop costs the client a one-second SYN retransmit)
    request_queue_size = 1024
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        # clients that hang up (timeouts, byte caps) are expected here
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class _Abandon(Exception):
    """A dripping answer gives up: the server stops or the time is up."""


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never reads from or writes
    to them; they are held until :meth:`stop`. A context manager, like
    :class:`LocalHTTPServer`; ``accepted`` counts the connections."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._sock = socket.create_server((host, port), backlog=128)
        self._sock.settimeout(0.1)
        self.host, self.port = self._sock.getsockname()[:2]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/") -> str:
        if not path.startswith("/"):
            path = "/" + path
        return f"http://{self.host}:{self.port}{path}"

    def start(self) -> SilentServer:
        self._thread = threading.Thread(target=self._accept, name="pairforge-silentserver", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self._held.append(conn)
            self.accepted += 1

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self._sock.close()

    def __enter__(self) -> SilentServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler_for(server: LocalHTTPServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out in separate writes; with Nagle on, a
        # keep-alive client waits ~40 ms (delayed ACK) for every body
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            path = self.path.split("#", 1)[0]
            with server._lock:
                server._in_flight[self.client_address] = path
            try:
                self._get(path)
            finally:
                with server._lock:
                    server._in_flight.pop(self.client_address, None)

        def _get(self, path: str) -> None:
            route = server._record(path)
            if route is None and "?" in path:
                route = server._record(path.split("?", 1)[0])
            if route is None:
                route = Route(b"not found", "text/plain", status=404)
            self._give_up_at = time.monotonic() + route.drip_limit
            try:
                self._answer(route)
            except (BrokenPipeError, ConnectionResetError):
                # the client gave up (timed out, or stopped at its byte cap)
                self.close_connection = True
            except _Abandon:
                self.close_connection = True

        def _wait(self, seconds: float) -> None:
            """Sleep, unless the server stops or the drip limit is reached."""
            left = self._give_up_at - time.monotonic()
            if server._stopping.wait(max(0.0, min(seconds, left))) or seconds >= left:
                raise _Abandon

        def _trickle(self, data: bytes, every: float) -> None:
            for i in range(len(data)):
                self._wait(every)
                self.wfile.write(data[i : i + 1])

        def _answer(self, route: Route) -> None:
            if route.hang:
                self._wait(route.drip_limit)
            if route.reset:
                # linger 0: close() sends a RST, not a FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return
            if route.delay:
                time.sleep(route.delay)
            if route.head_drip or route.endless_header:
                self._answer_trickled(route)
                return
            status = route.status
            if route.redirect is not None and status == 200:
                status = 302
            self.send_response(status)
            self.send_header("Content-Type", route.content_type)
            pairs = route.headers.items() if isinstance(route.headers, Mapping) else route.headers
            for name, value in pairs:
                self.send_header(name, value)
            if route.redirect is not None:
                self.send_header("Location", route.redirect)
            body = route.body
            if route.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            elif route.content_length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            if route.truncate_after is not None:
                body = body[: route.truncate_after]
                self.close_connection = True
            self.end_headers()
            self._send_body(body, route)
            if route.truncate_after is not None:
                # a hard close, so the client sees the body end early
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)

        def _send_body(self, body: bytes, route: Route) -> None:
            if route.chunked:
                step = max(1, route.chunk_size)
                for i in range(0, len(body), step):
                    piece = body[i : i + step]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    if route.drip:
                        self.wfile.flush()
                        self._wait(route.drip)
                self.wfile.write(b"0\r\n\r\n")
                return
            if not route.drip:
                self.wfile.write(body)
                return
            step = max(1, route.chunk_size)
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                self.wfile.flush()
                self._wait(route.drip)

        def _answer_trickled(self, route: Route) -> None:
            """The status line and headers a byte at a time; then either an
            endless header or the body (dripped as ``drip`` says)."""
            every = route.head_drip or 1.0
            self.close_connection = True
            self._trickle(f"HTTP/1.1 {route.status} {self.responses.get(route.status, ('',))[0]}\r\n".encode(), every)
            if route.endless_header:
                self._trickle(b"X-Endless: ", every)
                while True:
                    self._trickle(b"a", every)
            head = f"Content-Type: {route.content_type}\r\nContent-Length: {len(route.body)}\r\n"
            self._trickle(head.encode("latin-1") + b"Connection: close\r\n\r\n", every)
            self._send_body(route.body, route)

        def log_message(self, format, *args) -> None:
            pass

    return Handler
