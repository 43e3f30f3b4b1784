"""Before the run: do the URL lists point at addresses ``download`` will refuse?

Why this exists: ``download`` refuses loopback, private, link-local and
metadata addresses unless the job's ``allow_networks`` names them (the rule
is :class:`stages.common.fetch_address.AddressPolicy`). A user serving
their own images on ``127.0.0.1`` met that as a run of 30 rows that all
ended ``blocked_address``, found only in the manifest. Here the first rows
of the input shards are looked at on the driver, before Ray starts, and a
warning says how many would be refused and which setting allows them
(the download stage's ``input_warnings``; ``pipeline.checks_urls`` hands it
those rows).

Only what needs no network is judged: literal IP addresses (``10.0.0.5``,
``[::1]``) and ``localhost`` (and ``*.localhost``, which RFC 6761 keeps on
loopback). Other host names are not looked up: DNS answers can differ on
the workers, and this check makes no request of any kind.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from urllib.parse import urlsplit

from pairforge.stages.common.fetch_address import AddressPolicy

LOCALHOST = ipaddress.ip_address("127.0.0.1")


def literal_address(url) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a URL names without a DNS lookup: a literal IP, or
    loopback for ``localhost``; ``None`` for other names and non-URLs."""
    if not isinstance(url, str):
        return None
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    if not host:
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return LOCALHOST
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def refused_urls(urls, allow_networks) -> tuple[Counter, dict[str, str], int]:
    """Over ``urls``: refusals by kind (``loopback``, ``private``...), an
    example URL of each kind, and how many URLs were judged."""
    policy = AddressPolicy(allow_networks)
    kinds: Counter = Counter()
    example: dict[str, str] = {}
    judged = 0
    for url in urls:
        ip = literal_address(url)
        if ip is None:
            continue
        judged += 1
        why = policy.refusal(ip)
        if why:
            kinds[why] += 1
            example.setdefault(why, str(url))
    return kinds, example, judged


def url_warning(urls, allow_networks, where: str) -> str | None:
    """One warning line when some of ``urls`` name addresses the download
    stage at ``where`` will refuse, else ``None``."""
    urls = list(urls)
    kinds, example, _ = refused_urls(urls, allow_networks)
    if not kinds:
        return None
    refused = sum(kinds.values())
    parts = ", ".join(f"{kind} {n} (e.g. {example[kind]})" for kind, n in kinds.most_common())
    nets = sorted({_network(example[k]) for k in kinds} - {None})
    allow = f"{where}.allow_networks: {nets}" if nets else f"{where}.allow_networks"
    return (
        f"{refused} of the first {len(urls)} URLs point at addresses download refuses: {parts}; "
        f"they will be rejected as blocked_address. For a server of your own, allow its network: {allow}"
    )


def _network(url: str) -> str | None:
    """The network to allow for an example URL: loopback's /8, else the host."""
    ip = literal_address(url)
    if ip is None:
        return None
    if ip.is_loopback:
        return "127.0.0.0/8" if ip.version == 4 else "::1/128"
    return f"{ip}/{ip.max_prefixlen}"
