"""Content codings (``gzip``, ``deflate``, nested chains) undone in bounded
steps, for the safe HTTP client (:mod:`stages.common.fetch`).

Why our own: the byte cap must hold whatever the installed urllib3 does, and
urllib3 releases before 2.6 inflated a nested ``gzip, gzip`` body in one call.
Here zlib is never asked for more than ``_CHUNK`` bytes at a time, so a small
body that inflates to gigabytes costs one piece per layer.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

#: largest piece inflated (and read from the socket) at a time
_CHUNK = 1 << 16
#: content codings inflated here (``identity`` is dropped); any other coding
#: leaves the body as sent, as urllib3 does with codings it does not know
_INFLATED = frozenset({"gzip", "x-gzip", "deflate"})
#: more codings than this in one ``Content-Encoding`` is refused (each costs a
#: zlib state; urllib3 2.6 chose the same limit)
MAX_CONTENT_CODINGS = 5


class TooManyCodings(ValueError):
    """A ``Content-Encoding`` with more than :data:`MAX_CONTENT_CODINGS` codings."""


class _Inflater:
    """One ``gzip`` or ``deflate`` coding, inflated in pieces of at most
    ``_CHUNK`` bytes: ``zlib`` is asked for no more than that per call and
    keeps the rest of the input in ``unconsumed_tail``, so a small body that
    inflates to gigabytes costs one piece at a time. ``gzip`` may hold
    several members; bytes after the last are ignored, as urllib3 does.
    ``deflate`` is zlib-wrapped (RFC 1950) or, as some servers send it, raw."""

    def __init__(self, coding: str):
        self.gzip = coding != "deflate"
        self._obj = None
        self._head = b""  # bytes before a stream starts, to tell what it is
        self._streams = 0
        self._ended = False

    def _open(self, head: bytes) -> bool:
        if self._streams and not (self.gzip and head[:2] == b"\x1f\x8b"):
            return False
        if self.gzip:
            wbits = 16 + zlib.MAX_WBITS
        else:
            wrapped = len(head) >= 2 and head[0] & 0x0F == 8 and ((head[0] << 8) | head[1]) % 31 == 0
            wbits = zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS
        self._obj = zlib.decompressobj(wbits)
        return True

    def feed(self, data: bytes, final: bool = False) -> Iterator[bytes]:
        while not self._ended:
            if self._obj is None:
                self._head += data
                if len(self._head) < 2 and not final:
                    return
                data, self._head = self._head, b""
                if not self._open(data):
                    self._ended = True
                    return
            obj = self._obj
            out = obj.decompress(data, _CHUNK)
            data = obj.unconsumed_tail
            if out:
                yield out
            if obj.eof:
                self._streams += 1
                self._obj, data = None, obj.unused_data + data
                if not data and not final:
                    return
            elif not data and len(out) < _CHUNK:
                # all input used and zlib had room to spare: nothing pending
                return


class ContentDecoder:
    """A ``Content-Encoding`` chain (``gzip, gzip`` was gzipped twice),
    undone last coding first; each piece goes through every layer before
    the next is inflated, so memory holds one piece per layer."""

    def __init__(self, codings: list[str]):
        self.layers = [_Inflater(c) for c in reversed(codings)]

    @classmethod
    def for_header(cls, header: str | None) -> ContentDecoder | None:
        """``None`` when the body is used as sent: no coding, only
        ``identity``, or a coding not inflated here (``br``, ``zstd``...)."""
        codings = [c.strip().lower() for c in (header or "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if len(codings) > MAX_CONTENT_CODINGS:
            raise TooManyCodings(f"{len(codings)} content codings, more than {MAX_CONTENT_CODINGS}")
        if not codings or any(c not in _INFLATED for c in codings):
            return None
        return cls(codings)

    def feed(self, data: bytes, final: bool = False) -> Iterator[bytes]:
        return self._through(0, data, final)

    def _through(self, i: int, data: bytes, final: bool) -> Iterator[bytes]:
        if i == len(self.layers):
            if data:
                yield data
            return
        for piece in self.layers[i].feed(data, final):
            yield from self._through(i + 1, piece, False)
        if final:
            yield from self._through(i + 1, b"", True)
