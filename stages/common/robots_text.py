"""A robots.txt's groups read the way RFC 9309 2.2.1 asks, before protego
decides anything (:mod:`stages.common.robots` uses both).

Why not hand the file to protego as it is: protego picks a group by finding
the group's user-agent value *inside* the name it is asked about, at a left
token boundary only, so ``User-agent: pair`` rules a crawler called
``pairforge``, and ``User-agent: gptbot`` rules one called
``gptbot-images``. RFC 9309 2.2.1 matches the product token itself,
case-insensitively. Protego also reads ``User-agent: pairforge/1.0`` as a
name no crawler has (Google's parser, like the RFC's examples, keeps the
product token, the leading run of ``[A-Za-z_-]``; digits are read too,
see :data:`PRODUCT_TOKEN`), and it loses the first
line of a file that starts with a byte order mark.

So every user-agent line is rewritten, before protego parses the file, to
its product token in lower case followed by a dot (``user-agent:
pairforge.``), or to ``*`` for the catch-all group; the dot ends the token,
and a product token never holds one, so protego asked about ``pairforge.``
finds ``pairforge.`` and nothing shorter or longer: its substring test
becomes the RFC's equality. Every other line reaches protego unchanged, and
the allow/disallow decision, longest match, wildcards and percent-encoding
stay protego's.

The same pass records each group's rules with their line numbers, so a
rejected row can name the rule that rejected it (protego does not say:
:class:`DisallowIndex` finds it, for the rejects only), and the set of
groups the file names, so an AI crawler's token counts only where the file
addresses it by name. Group boundaries follow protego's: a
user-agent line after any other group line starts a new group, ``Sitemap``
and ``Host`` belong to no group, and groups for the same token are merged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

#: RFC 9309 2.2.1: a product token is letters, underscores and hyphens; digits
#: are let in too, as crawlers in use have them (``img2dataset``)
PRODUCT_TOKEN = re.compile(r"[A-Za-z0-9_-]+")

# the directive names protego reads (with its tolerated spellings), so that
# group boundaries fall where protego puts them
_USER_AGENT = frozenset({"user-agent", "useragent", "user agent"})
_ALLOW = frozenset({"allow"})
_DISALLOW = frozenset({"disallow", "dissallow", "dissalow", "disalow", "diasllow", "disallaw"})
_SITE_WIDE = frozenset({"sitemap", "sitemaps", "site-map", "host"})
_KNOWN = (
    _USER_AGENT
    | _ALLOW
    | _DISALLOW
    | _SITE_WIDE
    | {"crawl-delay", "crawl delay", "request-rate", "request rate", "visit-time", "visit time"}
)

#: the group name of a user-agent value that holds no product token: no
#: crawler is ever asked about it
NO_TOKEN = "!"


def agent_key(name: str) -> str:
    """What protego is asked about for group ``name`` (a product token or
    ``*``), as the rewritten file spells it."""
    return name if name == "*" else name.lower() + "."


@dataclass(frozen=True)
class Rule:
    """One ``Allow``/``Disallow`` line of a group, as the file wrote it."""

    allow: bool
    path: str
    line: int  # 1-based, in the text as decoded

    @property
    def text(self) -> str:
        return f"{'Allow' if self.allow else 'Disallow'}: {self.path}"


@dataclass(frozen=True)
class Groups:
    """A robots.txt read for protego and for the rejects."""

    #: the file with its user-agent lines rewritten (see the module docstring)
    text: str
    #: group name (lower-case product token, ``*`` or :data:`NO_TOKEN`) ->
    #: its rules in file order, groups for the same name merged
    rules: dict[str, tuple[Rule, ...]]


def group_name(value: str) -> str:
    """The group a user-agent line's value names: ``*``, the lower-case
    product token it starts with, or :data:`NO_TOKEN`."""
    value = value.strip()
    if value == "*" or (value.startswith("*") and value[1:2].isspace()):
        return "*"
    m = PRODUCT_TOKEN.match(value)
    return m.group(0).lower() if m else NO_TOKEN


def read_groups(body: str) -> Groups:
    """Rewrite ``body``'s user-agent lines and collect each group's rules."""
    if body.startswith("\ufeff"):
        body = body[1:]
    out: list[str] = []
    rules: dict[str, list[Rule]] = {}
    current: list[str] = []
    previous: str | None = None
    # str.splitlines, as protego splits: line numbers and lines agree
    for number, line in enumerate(body.splitlines(), 1):
        found = _directive(line.split("#", 1)[0].strip())
        if found is None:
            out.append(line)
            continue
        name, value = found
        if name in _USER_AGENT and previous is not None and previous not in _USER_AGENT:
            current = []
        if name not in _SITE_WIDE:
            previous = name
        if not value:
            out.append(line)
            continue
        if name in _USER_AGENT:
            group = group_name(value)
            if group not in current:
                current.append(group)
                rules.setdefault(group, [])
            out.append(f"user-agent: {agent_key(group)}")
            continue
        if current and (name in _ALLOW or name in _DISALLOW):
            rule = Rule(allow=name in _ALLOW, path=value, line=number)
            for group in current:
                rules[group].append(rule)
        out.append(line)
    return Groups(text="\n".join(out), rules={k: tuple(v) for k, v in rules.items()})


def _directive(line: str) -> tuple[str, str] | None:
    """A comment-free, stripped line as ``(field, value)``, field in lower
    case; ``None`` for a line that is no directive. Reads what protego reads:
    ``Field: value``, and ``Field value`` for a known field."""
    if not line:
        return None
    field = raw = None
    if ":" in line:
        field, _, raw = line.partition(":")
        field = field.strip().lower()
        if field in _KNOWN or not raw or raw[0].isspace():
            return field, raw.strip()
    words = line.split()
    for count in (1, 2):
        candidate = " ".join(words[:count]).lower()
        if candidate in _KNOWN:
            return candidate, " ".join(words[count:])
    return (field, raw.strip()) if field is not None else None


class DisallowIndex:
    """The longest ``Disallow`` of one group that matches a URL, to name in
    a rejected row's detail; protego has already decided. Percent-encoding
    is normalised as protego does (every escape decoded but ``%2F`` and
    ``%25``, then everything but ``/``, ``%``, ``=`` and a pattern's ``*``
    encoded), so the rule found is the one protego matched. Plain prefixes
    are found by lookups of the path's own prefixes, one per distinct rule
    length, so a group of 40,000 rules costs no more than one of 40; rules
    with ``*`` or ``$`` are tried longest first."""

    def __init__(self, rules: tuple[Rule, ...]):
        self._plain: dict[str, Rule] = {}
        patterns: list[tuple[int, re.Pattern, Rule]] = []
        for rule in rules:
            if rule.allow:
                continue
            anchored = rule.path.endswith("$")
            core = _normalise(rule.path[:-1] if anchored else rule.path, star=True)
            if "*" in core or anchored:
                regex = "".join(".*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", core))
                patterns.append((len(core) + anchored, re.compile(regex + ("\\Z" if anchored else ""), re.S), rule))
            else:
                self._plain.setdefault(core, rule)
        self._lengths = sorted({len(k) for k in self._plain}, reverse=True)
        self._patterns = sorted(patterns, key=lambda p: -p[0])

    def longest(self, url: str) -> Rule | None:
        path = _url_path(url)
        best, best_len = None, -1
        for length in self._lengths:
            rule = self._plain.get(path[:length]) if length <= len(path) else None
            if rule is not None:
                best, best_len = rule, length
                break
        for length, regex, rule in self._patterns:
            if length <= best_len:
                break
            if regex.match(path):
                return rule
        return best


def _normalise(text: str, star: bool = False) -> str:
    parts = re.split(r"(%2[Ff]|%25)", text)
    decoded = "".join(p.upper() if i % 2 else unquote(p, errors="replace") for i, p in enumerate(parts))
    return quote(decoded, safe="/%=*" if star else "/%=")


def _url_path(url: str) -> str:
    """What rules match against: the path and the query (a ``?`` kept even
    with nothing after it), normalised."""
    url = url.partition("#")[0]
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if "?" in url else "")
    path = _normalise(path)
    return path if path.startswith("/") else "/" + path
