"""robots.txt per RFC 9309, for the download stage: what one origin's
robots.txt says (:class:`RobotsFile`, fetched by :func:`fetch_robots`),
what it means for a URL (:class:`RobotsPolicy`), and one fetch per origin
per process (:class:`~stages.common.robots_cache.RobotsCache`).

Why protego: it is Scrapy's parser, written to RFC 9309 (longest match wins,
``Allow`` wins a tie, ``*`` and ``$``, percent-encoding normalised on both
sides); the stdlib ``urllib.robotparser`` predates the RFC (first match
wins, no wildcards). Where protego departs from the RFC in choosing a group,
:mod:`stages.common.robots_text` rewrites the file first; the decision on a
URL is always protego's.

What a fetch means (RFC 9309 2.3.1):

* a 2xx answer: its rules (``rules``); the first :data:`MAX_ROBOTS_BYTES` are
  parsed (2.5: at least 500 KiB must be), cut at the last whole line;
* 4xx, the file is unavailable: everything is allowed (``allow_all``,
  2.3.1.3), except 429, which asks us to slow down and is read as a server
  error (as Google does);
* 5xx, 429, a timeout, a refused or reset connection, a blocked address, a
  body that does not decode, any other answer: the file is unreachable and
  everything is disallowed (``disallow_all``, 2.3.1.4);
* more than the fetcher's redirects (5, 2.3.1.2 asks at least five): read as
  unavailable (``allow_all``), as the RFC allows and Google does.

The AI tokens: a site that disallows a URL to a well-known AI-training
crawler (:data:`AI_TOKENS`) by name, and says nothing to our own product
token by name, has opted out of AI training for that URL; with ``ai_tokens``
set, :meth:`RobotsPolicy.check` rejects it as ``opted_out``. A group for our
own token is the site speaking to us, and it alone decides.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from protego import Protego

from pairforge.stages.base import require
from pairforge.stages.common.robots_text import PRODUCT_TOKEN, DisallowIndex, Rule, agent_key, read_groups

#: product tokens of crawlers that gather AI training data, as their operators
#: publish them; a disallow addressed to one of them is an opt-out of AI training
AI_TOKENS = (
    "CCBot",
    "GPTBot",
    "Google-Extended",
    "anthropic-ai",
    "ClaudeBot",
    "Bytespider",
    "PerplexityBot",
    "cohere-ai",
    "meta-externalagent",
    "Applebot-Extended",
    "omgili",
    "Diffbot",
    "img2dataset",
)
DEFAULT_TOKEN = "pairforge"
#: how much of a robots.txt is parsed (RFC 9309 2.5 asks at least 500 KiB)
MAX_ROBOTS_BYTES = 500 * 1024
#: the cap of the second read when the fetcher refused a longer file rather
#: than cut it (see :func:`fetch_robots`)
OVERSIZE_BYTES = 10 * 1024 * 1024
OUTCOMES = ("rules", "allow_all", "disallow_all")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_FORMAT = 1


def origin_of(url: Any) -> str | None:
    """``scheme://host:port`` of an http(s) URL, host in lower case (an
    internationalised name as its ASCII form), port always written;
    ``None`` for anything else (another scheme, no host, a bad port, not a
    string)."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url.strip())
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def robots_url(origin: str) -> str:
    """The robots.txt URL of ``origin`` (the default port left out)."""
    scheme, _, rest = origin.partition("://")
    host, _, port = rest.rpartition(":")
    if int(port) == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}/robots.txt"
    return f"{origin}/robots.txt"


@dataclass(frozen=True)
class RobotsFile:
    """What one origin's robots.txt said. Stored as JSON (never pickle: the
    work dir is not trusted as code) so a resume and every node reuse it."""

    origin: str
    outcome: str  # one of OUTCOMES
    status: int  # the HTTP status, 0 when there was no answer
    body: str  # the text parsed (``rules`` only), at most MAX_ROBOTS_BYTES of it
    error: str = ""  # why it is not ``rules``: the fetch's reason and error
    fetched_at: float = 0.0  # time.time() of the fetch
    truncated: bool = False  # the file was longer than what was parsed
    detail: dict = field(default_factory=dict)  # the failed fetch's detail (its refused addresses ...)

    def __post_init__(self):
        require(self.outcome in OUTCOMES, "outcome", self.outcome, f"one of {OUTCOMES}")

    def to_json(self) -> bytes:
        return json.dumps({"format": _FORMAT, **asdict(self)}, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> RobotsFile:
        """Read what :meth:`to_json` wrote; ``ValueError`` for anything else."""
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"robots file: not JSON ({e})") from None
        types = {"origin": str, "outcome": str, "status": int, "body": str, "error": str}
        types.update({"fetched_at": (int, float), "truncated": bool, "detail": dict})
        obj.setdefault("detail", {}) if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
            raise ValueError(f"robots file: expected a format {_FORMAT} object")
        for key, kind in types.items():
            if not isinstance(obj.get(key), kind) or (kind is int and isinstance(obj[key], bool)):
                raise ValueError(f"robots file: {key}: expected {kind}, got {obj.get(key)!r:.80}")
        return cls(**{k: obj[k] for k in types})


class Get(Protocol):
    """The fetch :func:`fetch_robots` uses: the project's safe client
    (``SafeFetcher.fetch``: address policy, deadline, redirects) with a byte
    cap for this call; it returns a ``stages.common.fetch.Fetched``."""

    def __call__(self, url: str, *, max_bytes: int) -> Any: ...


def fetch_robots(get: Get, origin: str, max_bytes: int = MAX_ROBOTS_BYTES) -> RobotsFile:
    """Fetch and classify ``origin`` (an :func:`origin_of` string)'s
    robots.txt; never raises for anything the site or the fetcher does.

    ``get`` should cut a longer body at ``max_bytes`` and return its start
    as a success. A fetcher that refuses it instead (``too_many_bytes``) gets
    a second request under :data:`OVERSIZE_BYTES`, and the first
    ``max_bytes`` of that body are parsed; a file over that is unreachable.
    The fetcher must not refuse the file for an ``X-Robots-Tag`` header
    (sites send ``noindex`` on their robots.txt to keep it out of search
    results): such a refusal is reported as ``disallow_all`` with its
    reason."""
    require(isinstance(max_bytes, int) and max_bytes > 0, "max_bytes", max_bytes, "a positive int")
    require(isinstance(origin, str) and origin_of(origin) == origin, "origin", origin, "an origin_of() string")
    url, started = robots_url(origin), time.time()
    try:
        got = get(url, max_bytes=max_bytes)
        if got.reason == "too_many_bytes":
            got = get(url, max_bytes=max(OVERSIZE_BYTES, max_bytes))
    except Exception as e:  # noqa: BLE001 - a fetcher's bug is this origin's failure, not the job's
        return RobotsFile(
            origin, "disallow_all", 0, "", error=f"fetch raised {type(e).__name__}: {e}"[:500], fetched_at=started
        )
    return classify(origin, got, max_bytes, started)


def classify(origin: str, got: Any, max_bytes: int = MAX_ROBOTS_BYTES, fetched_at: float = 0.0) -> RobotsFile:
    """The :class:`RobotsFile` a ``Fetched`` of ``origin``'s robots.txt means."""
    status, reason = int(got.http_status or 0), got.reason
    if not reason:
        raw = got.body or b""
        truncated = len(raw) >= max_bytes
        if truncated:  # the last line may be cut short, which changes its rule: dropped whole
            raw = raw[:max_bytes]
            raw = raw[: raw.rfind(b"\n") + 1]
        return RobotsFile(origin, "rules", status, raw.decode("utf-8", "replace"), "", fetched_at, truncated)
    error = reason + (f": {got.detail['error']}" if got.detail.get("error") else "")
    if reason == "opted_out":
        error += " (the fetcher refused robots.txt for its X-Robots-Tag; fetch robots.txt without header directives)"
    unavailable = reason.startswith("http_4") and status != 429 or reason == "too_many_redirects"
    detail = {k: v for k, v in got.detail.items() if k not in ("url", "error") and _jsonable(v)}
    outcome = "allow_all" if unavailable else "disallow_all"
    return RobotsFile(origin, outcome, status, "", error[:500], fetched_at, detail=detail)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Verdict:
    """Whether a URL may be fetched; when not, ``reason`` is
    ``robots_disallowed`` or ``opted_out`` and ``detail`` says which file,
    group and rule (``robots_url``, ``robots_group``, ``robots_rule``,
    ``robots_line``; ``robots_token`` for an opt-out; ``robots_outcome``,
    ``robots_status``, ``robots_error`` when the file could not be read).
    ``detail`` is shared between verdicts: read it, copy it to change it."""

    allowed: bool
    reason: str = ""
    detail: dict = field(default_factory=dict)


ALLOWED = Verdict(True)


def check_token(token: str, key: str = "token") -> str:
    require(
        isinstance(token, str) and PRODUCT_TOKEN.fullmatch(token) is not None,
        key,
        token,
        "a product token ([A-Za-z0-9_-]+)",
    )
    return token


class RobotsPolicy:
    """One origin's robots.txt applied to its URLs for crawler ``token``.
    Thread-safe for :meth:`check` (protego's memo is a plain dict).

    ``crawl_delay`` is what the file asks of our group (``*`` when it has
    none of ours); ``bounded_crawl_delay`` is that, at most
    ``max_crawl_delay`` seconds, for the per-host rate limiter."""

    def __init__(
        self,
        file: RobotsFile,
        token: str = DEFAULT_TOKEN,
        ai_tokens: tuple[str, ...] = (),
        max_crawl_delay: float = 10.0,
    ):
        check_token(token)
        for t in ai_tokens:
            check_token(t, "ai_tokens")
        require(max_crawl_delay >= 0, "max_crawl_delay", max_crawl_delay, ">= 0")
        self.file, self.token = file, token
        self.robots_url = robots_url(file.origin)
        self.crawl_delay: float | None = None
        self._groups: dict[str, tuple[Rule, ...]] = {}
        self._parser: Protego | None = None
        self._ours = "*"
        self._ai: list[tuple[str, str]] = []  # (token as given, its group name)
        self._indexes: dict[str, DisallowIndex] = {}  # per group, made on its first rejection
        if file.outcome == "rules":
            groups = read_groups(file.body)
            self._groups = groups.rules
            self._parser = Protego.parse(groups.text)
            self.crawl_delay = self._parser.crawl_delay(agent_key(token))
            if token.lower() in self._groups:
                self._ours = token.lower()
            else:  # a group for our own token is the site speaking to us: no inference from others'
                self._ai = [(t, t.lower()) for t in dict.fromkeys(ai_tokens) if t.lower() in self._groups]
        self.bounded_crawl_delay = None if self.crawl_delay is None else min(self.crawl_delay, max_crawl_delay)

    def check(self, url: str) -> Verdict:
        """Whether crawler ``token`` may fetch ``url`` (of this origin)."""
        require(origin_of(url) == self.file.origin, "url", url, f"a URL of {self.file.origin}")
        return self.decide(url)

    def decide(self, url: str) -> Verdict:
        """:meth:`check` without the origin check (the cache routes by origin)."""
        if self.file.outcome == "allow_all":
            return ALLOWED
        if self._parser is None:
            detail = {"robots_url": self.robots_url, "robots_outcome": self.file.outcome}
            detail.update({"robots_status": self.file.status, "robots_error": self.file.error})
            return Verdict(False, "robots_disallowed", detail)
        if not self._parser.can_fetch(url, agent_key(self.token)):
            return Verdict(False, "robots_disallowed", self._why(url, self._ours))
        for token, group in self._ai:
            if not self._parser.can_fetch(url, agent_key(group)):
                return Verdict(False, "opted_out", {**self._why(url, group), "robots_token": token})
        return ALLOWED

    def _why(self, url: str, group: str) -> dict:
        rule = self._rule(url, group)
        return {
            "robots_url": self.robots_url,
            "robots_group": group,
            "robots_rule": rule.text if rule else "",
            "robots_line": rule.line if rule else 0,
        }

    def _rule(self, url: str, group: str) -> Rule | None:
        index = self._indexes.get(group)
        if index is None:
            index = self._indexes[group] = DisallowIndex(self._groups.get(group, ()))
        return index.longest(url)
