"""A TCP server on 127.0.0.1 that records every request's raw bytes and
answers with raw bytes per path: for tests of what the download client
sends (no credentials, no cookies, no injected header) and of answers an
HTTP library would not produce (150 header lines)."""

from __future__ import annotations

import socket
import threading


def answer(body: bytes = b"ok", status: str = "200 OK", headers: tuple[str, ...] = ()) -> bytes:
    head = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class RawServer:
    """``answers``: request path (bytes, as sent) -> the raw answer; any
    other path gets a 200 with ``ok``. ``requests``: every request's head
    as received, in order. A context manager."""

    def __init__(self, answers: dict[bytes, bytes] | None = None, host: str = "127.0.0.1"):
        self.answers = dict(answers or {})
        self.requests: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind((host, 0))
        self._sock.listen(64)
        self.host, self.port = self._sock.getsockname()[:2]
        self._stop = threading.Event()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                while b"\r\n\r\n" not in data and len(data) < 1 << 16:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            self.requests.append(data)
            parts = data.split(b" ", 2)
            path = parts[1] if len(parts) > 2 else b""
            try:
                conn.sendall(self.answers.get(path, answer()))
            except OSError:
                pass

    def __enter__(self) -> RawServer:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sock.close()
