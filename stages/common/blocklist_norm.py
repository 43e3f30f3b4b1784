"""The normal forms that list entries and row values are compared in.

An entry is compared in a normal form, the same one a row's value is brought
to before the lookup, so that ``HTTP://Example.com:80/a.jpg#x`` on a list
removes ``http://example.com/a.jpg``: scheme and host lower-case, the
default port, user info and fragment dropped, an empty path as ``/``; path
and query are left as they are (they are case-sensitive, and a list names
what the crawl saw). Hosts are compared in their ASCII (IDNA) form.

Each form has a scalar function (the reference, and what one row or one bad
line goes through) and a column function over Arrow arrays: a list of a
million URLs or a batch of rows is normalised by pyarrow's kernels (RE2
regexes, string functions) in C++, and only the values the simple pattern
does not cover (user info, IPv6 hosts, non-ASCII hosts, white space) go
through the scalar function. ``tests/stages/test_blocklist.py`` holds the two to
the same answers.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from urllib.parse import urlsplit

import numpy as np

#: what an entry can name
KINDS = ("url", "prefix", "domain", "sha256", "phash")
DEFAULT_PORTS = {"http": 80, "https": 443}

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HEX16 = re.compile(r"[0-9a-fA-F]{16}")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_EXPLICIT = {f"{k}:": k for k in KINDS}
#: an http(s) URL without user info, IPv6 host, white space or backslash: scheme, host, port,
#: path and query (the fragment dropped); anything else goes through ``urlsplit``
_SIMPLE_URL = re.compile(r"(?i:(https?))://([A-Za-z0-9._-]+)(?::(\d{1,5}))?([/?][^#\s\\]*)?(?:#[^\s]*)?\Z")
# the same for pyarrow's RE2 kernels
_SIMPLE_URL_RE2 = (
    r"^(?P<scheme>[hH][tT][tT][pP][sS]?)://(?P<host>[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?"
    r"(?P<path>/[^?#\s\\]*)?(?:\?(?P<query>[^#\s\\]*))?(?:#\S*)?$"
)
_HOST_RE2 = r"^([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$"
_EXPLICIT_RE2 = r"^(?P<kind>(?i:url|prefix|domain|sha256|phash)):\s*(?P<body>.*)$"


# ------------------------------------------------------------ one value


@functools.lru_cache(maxsize=1 << 16)  # a crawl's URLs share few hosts
def normalize_host(host: str) -> str | None:
    """A host name lower-cased, without its trailing dot, internationalised
    names in their ASCII (IDNA) form; an IP address in its compressed form.
    ``None`` when it is no host name."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if not h:
        return None
    if ":" in h or h[-1].isdigit():
        try:
            return ipaddress.ip_address(h).compressed
        except ValueError:
            if ":" in h:
                return None
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(h) > 253 or not all(_LABEL.fullmatch(label) for label in h.split(".")):
        return None
    return h


def _join(scheme: str, netloc: str, path: str, query: str) -> str:
    return f"{scheme}://{netloc}{path or '/'}?{query}" if query else f"{scheme}://{netloc}{path or '/'}"


def normalize_url(url) -> str | None:
    """A URL in normal form (see the module doc); ``None`` for anything but
    an http(s) URL with a host."""
    if not isinstance(url, str):
        return None
    m = _SIMPLE_URL.match(url)
    if m is not None:  # most URLs: a regex and a cached host instead of urlsplit
        scheme, host, port, rest = m.groups()
        scheme, host = scheme.lower(), normalize_host(host)
        if host is None or (port is not None and int(port) > 65535):
            return None
        if port is not None and int(port) != DEFAULT_PORTS[scheme]:
            host = f"{host}:{int(port)}"
        path, _, query = (rest or "").partition("?")
        return _join(scheme, host, path, query)
    try:
        p = urlsplit(url.strip())
        port = p.port
    except ValueError:  # a bad port, an unbalanced IPv6 bracket
        return None
    scheme = p.scheme.lower()
    if scheme not in DEFAULT_PORTS or not p.hostname:
        return None
    host = normalize_host(p.hostname)
    if host is None:
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    return _join(scheme, netloc, p.path, p.query)


def url_host(normal_url: str) -> str:
    """The host of a URL in :func:`normalize_url`'s form (no port, no brackets)."""
    netloc = normal_url.split("/", 3)[2]
    if netloc.startswith("["):
        return netloc[1 : netloc.index("]")]
    return netloc.rsplit(":", 1)[0] if ":" in netloc else netloc


def normalize_domain(value) -> str | None:
    """A domain entry: a host name or IP address; ``*.example.com`` and
    ``.example.com`` read as ``example.com`` (which covers its subdomains)."""
    if not isinstance(value, str):
        return None
    b = value.strip()
    for lead in ("*.", "."):
        if b.startswith(lead):
            b = b[len(lead) :]
    return normalize_host(b) if b and "/" not in b else None


def normalize_sha256(value) -> str | None:
    if not isinstance(value, str):
        return None
    v = value.strip()
    return v.lower() if _HEX64.fullmatch(v) else None


def normalize_phash(value) -> str | None:
    """A 64-bit perceptual hash: 16 hex digits (imagehash's form), lower-case."""
    if not isinstance(value, str):
        return None
    v = value.strip()
    return v.lower() if _HEX16.fullmatch(v) else None


#: value -> its normal form or None, per kind (a prefix is a URL prefix in URL normal form)
NORMALIZERS = {
    "url": normalize_url,
    "prefix": normalize_url,
    "domain": normalize_domain,
    "sha256": normalize_sha256,
    "phash": normalize_phash,
}
_WHY = {
    "url": "not an http(s) URL with a host",
    "prefix": "not an http(s) URL with a host",
    "domain": "not a host name or IP address",
    "sha256": "a sha256 is 64 hex digits",
    "phash": "a pHash is 16 hex digits",
}


def detect_kind(body: str) -> str | None:
    """The kind of an unprefixed entry: an http(s) URL, 64 hex digits (sha256),
    16 hex digits (pHash), or a host with a dot or an IP address (domain)."""
    if body[:8].lower().startswith(("http://", "https://")):
        return "url"
    if _HEX64.fullmatch(body):
        return "sha256"
    if _HEX16.fullmatch(body):
        return "phash"
    if ("." in body or ":" in body) and "/" not in body:
        return "domain"
    return None


def parse_entry(text: str, default_kind: str = "auto") -> tuple[str, str]:
    """``(kind, normal form)`` of one entry: ``kind:value`` names its kind,
    else ``default_kind`` does (``auto``: :func:`detect_kind`). Raises
    ``ValueError`` saying why it is no entry."""
    body, kind = text.strip(), default_kind
    head = body[: body.find(":") + 1].lower() if ":" in body[:8] else ""
    if head in _EXPLICIT:
        kind, body = _EXPLICIT[head], body[len(head) :].strip()
    if not body:
        raise ValueError("an empty entry")
    if kind == "auto":
        kind = detect_kind(body)
        if kind is None:
            raise ValueError("not a URL, a sha256 (64 hex digits), a pHash (16 hex digits) or a host name")
    norm = NORMALIZERS[kind](body)
    if norm is None:
        raise ValueError(_WHY[kind])
    return kind, norm


# ------------------------------------------------------------ columns


def _strings(values):
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values if pa.types.is_string(values.type) else values.cast(pa.string())
    return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


def _fill(out: list, values, fallback, done: np.ndarray) -> list:
    """``out`` with the scalar ``fallback`` applied where ``done`` is False
    and the value is a string."""
    for i in np.flatnonzero(~done).tolist():
        v = values[i]
        v = v.as_py() if hasattr(v, "as_py") else v
        out[i] = fallback(v) if isinstance(v, str) else None
    return out


def normalize_urls(values) -> list[str | None]:
    """:func:`normalize_url` of every value (an Arrow array or a sequence)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = _strings(values)
    if not len(arr):
        return []
    ex = pc.extract_regex(arr, _SIMPLE_URL_RE2)
    scheme = pc.utf8_lower(ex.field("scheme"))
    host = pc.utf8_rtrim(pc.utf8_lower(ex.field("host")), characters=".")
    port_s = ex.field("port")
    has_port = pc.not_equal(port_s, "")
    port = pc.cast(pc.if_else(has_port, port_s, "0"), pa.int64())
    default = pc.if_else(pc.equal(scheme, "https"), 443, 80)
    keep_port = pc.and_(has_port, pc.not_equal(port, default))
    netloc = pc.if_else(keep_port, pc.binary_join_element_wise(host, pc.cast(port, pa.string()), ":"), host)
    path = pc.if_else(pc.equal(ex.field("path"), ""), "/", ex.field("path"))
    query = ex.field("query")
    tail = pc.if_else(pc.equal(query, ""), "", pc.binary_join_element_wise("?", query, ""))
    joined = pc.binary_join_element_wise(scheme, "://", netloc, path, tail, "")
    host_ok = pc.and_(pc.match_substring_regex(host, _HOST_RE2), pc.less_equal(pc.utf8_length(host), 253))
    simple = pc.fill_null(pc.is_valid(ex), False).to_numpy(zero_copy_only=False)
    good = pc.fill_null(pc.and_(host_ok, pc.less_equal(port, 65535)), False).to_numpy(zero_copy_only=False)
    out = pc.if_else(pa.array(simple & good), joined, pa.scalar(None, pa.string())).to_pylist()
    done = simple | ~pc.is_valid(arr).to_numpy(zero_copy_only=False)  # a simple URL with a bad host is no URL
    return _fill(out, arr, normalize_url, done)


def normalize_domains(values) -> list[str | None]:
    """:func:`normalize_domain` of every value."""
    import pyarrow.compute as pc

    arr = _strings(values)
    if not len(arr):
        return []
    b = pc.replace_substring_regex(pc.utf8_lower(pc.utf8_trim_whitespace(arr)), r"^(\*\.)?\.?", "")
    b = pc.utf8_rtrim(b, characters=".")
    ok = pc.and_(pc.match_substring_regex(b, _HOST_RE2), pc.less_equal(pc.utf8_length(b), 253))
    done = pc.fill_null(ok, False).to_numpy(zero_copy_only=False)
    out = b.to_pylist()
    out = [v if d else None for v, d in zip(out, done)]
    return _fill(out, arr, normalize_domain, done)


def _hexes(values, digits: int) -> list[str | None]:
    import pyarrow.compute as pc

    arr = pc.utf8_lower(pc.utf8_trim_whitespace(_strings(values)))
    ok = pc.fill_null(pc.match_substring_regex(arr, f"^[0-9a-f]{{{digits}}}$"), False).to_numpy(zero_copy_only=False)
    return [v if k else None for v, k in zip(arr.to_pylist(), ok)]


def classify(texts, default_kind: str = "auto") -> tuple[np.ndarray, list[str | None]]:
    """Per entry text (trimmed, not empty): its kind (an index into
    :data:`KINDS`, -1 where none is found) and its normal form (``None``
    where it is no entry of that kind): :func:`parse_entry` over a column."""
    import pyarrow.compute as pc

    arr = _strings(texts)
    n = len(arr)
    ex = pc.extract_regex(arr, _EXPLICIT_RE2)
    explicit = pc.fill_null(pc.is_valid(ex), False)
    body = pc.utf8_trim_whitespace(pc.if_else(explicit, ex.field("body"), arr))
    named = pc.utf8_lower(ex.field("kind")).to_pylist()
    exp = explicit.to_numpy(zero_copy_only=False)
    kinds = np.full(n, -1, dtype=np.int8)
    if default_kind != "auto":
        kinds[:] = KINDS.index(default_kind)
    else:
        tests = (
            ("url", r"^[hH][tT][tT][pP][sS]?://"),
            ("sha256", r"^[0-9a-fA-F]{64}$"),
            ("phash", r"^[0-9a-fA-F]{16}$"),
            ("domain", r"^[^/]*[.:][^/]*$"),
        )
        for kind, pattern in reversed(tests):  # the first test that holds wins
            hit = pc.fill_null(pc.match_substring_regex(body, pattern), False).to_numpy(zero_copy_only=False)
            kinds[hit] = KINDS.index(kind)
    for i in np.flatnonzero(exp).tolist():
        kinds[i] = KINDS.index(named[i])
    norms: list[str | None] = [None] * n
    columns = {"url": normalize_urls, "prefix": normalize_urls, "domain": normalize_domains,
               "sha256": lambda v: _hexes(v, 64), "phash": lambda v: _hexes(v, 16)}  # fmt: skip
    for k, kind in enumerate(KINDS):
        idx = np.flatnonzero(kinds == k)
        if len(idx):
            for i, v in zip(idx.tolist(), columns[kind](body.take(idx))):
                norms[i] = v
    return kinds, norms
