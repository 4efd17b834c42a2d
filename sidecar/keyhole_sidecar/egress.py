"""Which addresses the proxy may connect to: the SSRF guard.

Checked after name resolution, on the address actually connected to (resolve once, connect
to what was checked), so decimal, octal, hex and IPv4-mapped IPv6 spellings, and DNS answers
that change between a check and a connect, are all judged as the address they really are.
Addresses pinned with ``--resolve`` are the operator's own choice and always allowed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum


class TargetRefused(OSError):
    """The proxy will not connect there; ``reason`` is a short, bounded code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Egress(StrEnum):
    """What ``--egress`` allows besides public addresses."""

    PUBLIC = "public"      # no loopback, link-local, private, shared, multicast, reserved
    PRIVATE = "private"    # the default: public and private ranges (internal APIs), still no
                           # loopback, link-local (cloud metadata), multicast or reserved
    ANY = "any"            # no checks at all (not recommended)


def _category(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The dangerous category of an address, or None for an ordinary one."""
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if address.is_private or (address.version == 4 and address in _SHARED):
        return "private"
    return None


_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT


@dataclass(frozen=True)
class EgressPolicy:
    mode: Egress = Egress.PRIVATE

    def check(self, host: str, address: str) -> None:
        """Raise :class:`TargetRefused` unless connecting to ``address`` (for ``host``) is allowed."""
        if self.mode is Egress.ANY:
            return
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        category = _category(ip)
        if category is None or (category == "private" and self.mode is Egress.PRIVATE):
            return
        raise TargetRefused(
            f"egress_{category.replace('-', '_')}",
            f"{host} resolves to {ip}, a {category} address; the proxy does not connect there "
            f"(--egress {self.mode.value}). Pin an internal upstream with --resolve, or widen "
            "--egress if you really mean it",
        )
