"""Reading a response's body for the safe HTTP client
(:mod:`stages.common.fetch`): the opt-out header, the byte cap, the content
codings and the deadline, and finishing the responses that are not read.

Why on its own: everything a server sends after its headers is untrusted
input, and every limit on it is here in one place:

* ``X-Robots-Tag`` is read (:func:`robots_disallowed`) before any byte of
  the body;
* the body is streamed and cut at ``max_bytes``: a ``Content-Length`` over
  it is refused unread, and the raw bytes and the decoded bytes are each
  counted against it;
* ``gzip`` and ``deflate`` content codings are inflated here from the raw
  bytes by :class:`~stages.common.inflate.ContentDecoder`, in steps of at
  most 64 KiB, never by urllib3's decoders;
* the attempt's deadline is checked between reads (each read also obeys it,
  :mod:`stages.common.fetch_connection`);
* a response that is not wanted (an error status, a redirect) is drained
  when that is cheap, so its connection is reused, else closed.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from email.utils import parsedate_to_datetime

from pairforge.stages.common.fetch_connection import DeadlineExceeded, _deadline_message
from pairforge.stages.common.fetch_errors import _deadline_hit, _Failure
from pairforge.stages.common.inflate import _CHUNK, ContentDecoder, TooManyCodings

_DRAIN_LIMIT = 1 << 16


#: X-Robots-Tag directives that take a value after a colon (not user agents)
_VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


def robots_disallowed(values: Sequence[str], token: str | None, directives: set[str]) -> bool:
    """Whether ``X-Robots-Tag`` header ``values`` forbid us. Each header is a
    comma-separated directive list, optionally led by ``<agent>:``, which
    makes it apply to that agent only (Google's X-Robots-Tag syntax, the
    convention img2dataset follows). Applies to us: lists with no agent, and
    lists for ``token``. (Our own parser: ``img2dataset.downloader`` would
    import the whole img2dataset package, seconds in every fresh worker.)"""
    for value in values:
        agent, sep, rest = value.partition(":")
        agent = agent.strip().lower()
        if sep and "," not in agent and agent not in _VALUED_DIRECTIVES:
            if agent != token:
                continue
            value = rest
        if {d.strip().lower() for d in value.split(",")} & directives:
            return True
    return False


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from ``now`` that a ``Retry-After`` header asks for: a number
    of seconds or an HTTP date (RFC 9110 10.2.3); ``None`` when absent or
    unreadable, ``0`` for a date in the past."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def tdm_reserved(value: str | None) -> bool:
    """W3C TDMRep: ``tdm-reservation: 1`` reserves text and data mining rights."""
    return bool(value) and value.strip() == "1"


def read_body(
    resp,
    started: float,
    *,
    deadline: float,
    max_bytes: int,
    directives: set[str] | None,
    token: str | None,
    truncate: bool = False,
    tdm: bool = False,
) -> bytes:
    """The body of a 2xx ``resp`` (urllib3, not preloaded), decoded; raises
    :class:`~stages.common.fetch_errors._Failure` for an error status, an
    opt-out (``X-Robots-Tag``; with ``tdm``, ``tdm-reservation: 1``), too
    many bytes (with ``truncate``: the first ``max_bytes`` are returned
    instead), a body that does not decode or the deadline (``deadline``
    seconds from ``started``, a ``time.monotonic()``). An error status's
    ``Retry-After`` is in the failure's detail as ``retry_after`` seconds."""
    status = resp.status
    if not 200 <= status < 300:
        wait = retry_after(resp.headers.get("Retry-After"))
        _discard(resp)
        raise _Failure(f"http_{status}", status, **({"retry_after": wait} if wait is not None else {}))
    if directives and robots_disallowed(resp.headers.getlist("X-Robots-Tag"), token, directives):
        _discard(resp)
        raise _Failure("opted_out", status, x_robots_tag=resp.headers.getlist("X-Robots-Tag"))
    if tdm and tdm_reserved(resp.headers.get("tdm-reservation")):
        _discard(resp)
        raise _Failure("opted_out", status, tdm_reservation=resp.headers.get("tdm-reservation"))
    length = resp.headers.get("Content-Length")
    if not truncate and length and length.strip().isdigit() and int(length) > max_bytes:
        _close(resp)
        raise _Failure("too_many_bytes", status, content_length=int(length), max_bytes=max_bytes)
    encoding = resp.headers.get("Content-Encoding")
    try:
        decoder = ContentDecoder.for_header(encoding)
    except TooManyCodings as e:
        _close(resp)
        raise _Failure("decode_error", status, error=str(e), content_encoding=encoding[:200]) from None
    coded = {"content_encoding": encoding} if decoder else {}
    chunks, total, raw_total = [], 0, 0
    try:
        while True:
            if time.monotonic() - started > deadline:
                raise DeadlineExceeded(_deadline_message(deadline))
            # raw bytes, decoded here: urllib3's decoders are not relied on
            raw = resp.read1(_CHUNK if truncate else min(_CHUNK, max_bytes + 1 - raw_total), decode_content=False)
            raw_total += len(raw)
            if raw_total > max_bytes and not truncate:
                raise _Failure("too_many_bytes", status, bytes_read=raw_total, max_bytes=max_bytes, **coded)
            for piece in decoder.feed(raw, final=not raw) if decoder else (raw,):
                total += len(piece)
                if total > max_bytes and truncate:
                    chunks.append(piece[: len(piece) - (total - max_bytes)])
                    _close(resp)
                    return b"".join(chunks)
                if total > max_bytes:
                    # reported as one past the cap: the size of the last
                    # piece depends on how the bytes arrived
                    raise _Failure("too_many_bytes", status, bytes_read=max_bytes + 1, max_bytes=max_bytes, **coded)
                if piece:
                    chunks.append(piece)
            if not raw:
                break
            if truncate and raw_total > max_bytes:  # the rest is not read: the connection goes
                _close(resp)
                return b"".join(chunks)
    except _Failure:
        _close(resp)
        raise
    except zlib.error as e:
        _close(resp)
        raise _Failure("decode_error", status, error=f"content-encoding {encoding}: {e}", **coded) from None
    except Exception as e:
        _close(resp)
        if _deadline_hit(e):
            raise _Failure("timeout", status, error=_deadline_message(deadline), bytes_read=total) from None
        raise
    resp.release_conn()
    return b"".join(chunks)


def _discard(resp) -> None:
    """Finish a response we do not want; keep the connection when that is
    cheap. Read raw, never decoded (urllib3 before 2.6.3 inflated a
    redirect's body in full to drain it), within the attempt's deadline."""
    length = resp.headers.get("Content-Length")
    if length and length.strip().isdigit() and int(length) <= _DRAIN_LIMIT:
        try:
            for _ in range(int(length) + 1):  # at least one byte a read, or the end
                if not resp.read1(_CHUNK, decode_content=False):
                    break
        except Exception:  # noqa: BLE001 - the connection is dropped instead
            _close(resp)
            return
        resp.release_conn()
    else:
        _close(resp)


def _close(resp) -> None:
    resp.close()
    resp.release_conn()
