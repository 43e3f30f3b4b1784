"""Which IP addresses the safe HTTP client (:mod:`stages.common.fetch`) may
connect to.

Why on its own: this is the rule that keeps a URL list, or a server it
names, from reaching loopback, the private network or a cloud metadata
service. It is pure address arithmetic (no sockets, no urllib3), so it can
be read and tested by itself; :mod:`stages.common.fetch_connection` applies
it to every address a host resolves to and to every connected peer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Cloud metadata services, named for clear reasons: AWS (IMDS, ECS task
#: credentials, IMDS over IPv6), Alibaba, and Azure's WireServer
#: (``168.63.129.16``: a public address that only answers from inside Azure,
#: where it serves the VM agent's configuration; the only one here that
#: Python calls global, so without this entry it would pass).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressPolicy:
    """Which IP addresses may be connected to: global unicast only, unless an
    ``allow_networks`` CIDR (e.g. ``"127.0.0.1/32"``) names them.

    An allowed IPv4 network also admits that host written as IPv6 where the
    packets do reach it: IPv4-mapped (``::ffff:a.b.c.d``, the same socket)
    and NAT64 (``64:ff9b::/96``, translated to it). It does not admit the
    6to4 (``2002::/16``) or Teredo (``2001::/32``) addresses that embed it:
    those packets go to a relay and on to some IPv6 host, not to the allowed
    one, so they pass only where the IPv6 address itself is allowed."""

    def __init__(self, allow_networks: Iterable[str] = ()):
        self.allow = tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)

    def _allows(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.allow if net.version == ip.version)

    def refusal(self, ip: IPAddress) -> str:
        """``""`` when ``ip`` may be connected to, else why not."""
        if self._allows(ip):
            return ""
        same_host = _same_host_ipv4(ip)
        if same_host is not None and self._allows(same_host):
            return ""
        for candidate in _embedded(ip):
            why = _why_not_global(candidate)
            if why:
                return why
        return ""


def _same_host_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 host an IPv6 address reaches as itself (mapped, NAT64)."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _embedded(ip: IPAddress) -> list[IPAddress]:
    """``ip`` and any IPv4 address it carries (mapped, 6to4, Teredo, NAT64):
    each must be global, since the packets go there (to the host, or to the
    relay in front of it)."""
    out: list[IPAddress] = [ip]
    if ip.version == 6:
        inner = _same_host_ipv4(ip) or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None:
            out.insert(0, inner)
    return out


def _why_not_global(ip: IPAddress) -> str:
    if ip in METADATA_ADDRESSES:
        return "metadata"
    for name in ("loopback", "link_local", "multicast", "private", "reserved", "unspecified"):
        if getattr(ip, f"is_{name}"):
            return name
    # fec0::/10, deprecated site-local (RFC 3879): Python calls it global, but
    # it was a site's own space and some networks still route it inside
    if ip.version == 6 and ip.is_site_local:
        return "site_local"
    if not ip.is_global:
        return "not_global"
    return ""


class BlockedAddress(Exception):
    """Every address of a host is refused by the policy. Deliberately not an
    ``OSError``: urllib3 lets it through unwrapped and never retries it."""

    def __init__(self, host: str, refused: list[tuple[str, str]]):
        super().__init__(f"{host}: no allowed address ({', '.join(f'{a} {w}' for a, w in refused)})")
        self.host = host
        self.refused = refused
