"""Host patterns: the one place that decides whether a request's host belongs to an injection.

Kept pure and tiny because every routing decision (CONNECT, absolute-form, base-URL) goes
through :func:`HostPattern.matches`, and the security of the product rests on it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

DEFAULT_PORT = 443
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalise_hostname(host: str) -> str:
    """Lower-case a host name and drop one trailing dot (``API.Example.com.`` → ``api.example.com``)."""
    host = host.strip().lower()
    if host.endswith("."):
        host = host[:-1]
    return host


def is_ip_literal(host: str) -> bool:
    """True for IPv4/IPv6 literals (bracketed or not); these never match a name."""
    candidate = host.strip("[]")
    if ":" not in candidate and not candidate.replace(".", "").isdigit():
        return False  # a name: skip ipaddress's parser, which costs microseconds per request
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def split_authority(authority: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` (IPv6 in brackets); raise ValueError on anything malformed."""
    authority = authority.strip()
    if not authority:
        raise ValueError("empty host")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"unterminated IPv6 literal in {authority!r}")
        host, rest = authority[1 : end], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected text after IPv6 literal in {authority!r}")
        port_text = rest[1:] if rest else None
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
    elif ":" in authority:
        raise ValueError(f"{authority!r} has several ':'; put IPv6 addresses in brackets")
    else:
        host, port_text = authority, None
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r} in {authority!r} is not a number from 1 to 65535")
    return host, int(port_text)


@functools.cache
def _public_suffix_list():
    # Loaded on first use (a few MB), not at import: most specs have no wildcard.
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def is_public_suffix(name: str) -> bool:
    """Whether anyone may register names directly under ``name`` (the Public Suffix List,
    ICANN and private sections: ``co.uk``, ``github.io``, ``s3.amazonaws.com``)."""
    return bool(_public_suffix_list().is_public(name))


CLUSTER_SUFFIXES = (".svc", ".cluster.local", ".local")
METADATA_NAMES = ("metadata.google.internal", "metadata", "instance-data",
                  "instance-data.ec2.internal", "metadata.azure.internal")


def host_risk(pattern: HostPattern) -> str | None:
    """A warning for a host entry that parses but is probably a mistake, or None."""
    name = pattern.name
    if name in METADATA_NAMES:
        return (f"{pattern} is a cloud metadata service: it hands out the node's own "
                "credentials, and a key sent there is sent to whoever answers on the node's "
                "link-local address; a key for it is almost certainly a mistake")
    if name.endswith(CLUSTER_SUFFIXES) or name.endswith(".internal"):
        return (f"{pattern} is a cluster-internal name: whoever can run a Service or pod under "
                "that name receives the key, and clients skip the proxy for it (NO_PROXY holds "
                ".svc and .cluster.local); prefer the API's public name, or base-URL mode")
    return None


@dataclass(frozen=True, slots=True)
class HostPattern:
    """One entry of ``spec.hosts``: an exact name or ``*.suffix``, with an optional port.

    ``*.example.com`` matches exactly one more label, like a TLS wildcard certificate.
    Without a port the entry matches port 443 (CONNECT, ``https://``) and port 80
    (``http://`` absolute-form); the upstream is always ``https://name:443``.
    """

    name: str  # normalised; for a wildcard, the part after "*."
    wildcard: bool = False
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("must be a non-empty string such as 'api.openai.com'")
        if "/" in text or "@" in text or "://" in text:
            raise ValueError(f"{text!r} must be a bare host name, without scheme, path or user")
        host, port = split_authority(text)
        host = normalise_hostname(host)
        wildcard = host.startswith("*.")
        name = host[2:] if wildcard else host
        if is_ip_literal(name):
            raise ValueError(f"{text!r} is an IP address; keyhole routes by DNS name only")
        labels = name.split(".")
        if "*" in name:
            raise ValueError(f"{text!r}: '*' is allowed only as the whole first label ('*.example.com')")
        if not all(_LABEL.match(label) for label in labels):
            raise ValueError(
                f"{text!r} is not a valid DNS name (letters, digits and '-' in dot-separated labels;"
                " use punycode 'xn--' for international names)"
            )
        if wildcard and len(labels) < 2:
            raise ValueError(f"{text!r} is too broad: a wildcard needs at least two labels after '*.'")
        if wildcard and is_public_suffix(name):
            raise ValueError(
                f"{text!r} is too broad: {name!r} is a public suffix (anyone can register a name "
                "under it), so the key would go to every site there; name the domain you mean, "
                f"e.g. '*.example.{name}'"
            )
        if labels[-1].isdigit():
            raise ValueError(f"{text!r} ends in a numeric label and cannot be a host name")
        return cls(name=name, wildcard=wildcard, port=port)

    def __str__(self) -> str:
        text = f"*.{self.name}" if self.wildcard else self.name
        return f"{text}:{self.port}" if self.port is not None else text

    @property
    def upstream_port(self) -> int:
        return self.port if self.port is not None else DEFAULT_PORT

    def matches_name(self, host: str) -> bool:
        """Does this entry cover ``host`` (already normalised), ignoring ports?"""
        if self.wildcard:
            head, dot, rest = host.partition(".")
            return bool(dot) and bool(head) and rest == self.name
        return host == self.name

    def matches(self, host: str, port: int, *, plain_http: bool = False) -> bool:
        """Does a request for ``host:port`` belong to this entry?

        ``plain_http`` is set for absolute-form ``http://`` requests, whose default port 80
        maps to the same https upstream as port 443.
        """
        if is_ip_literal(host):
            return False
        if not self.matches_name(normalise_hostname(host)):
            return False
        if self.port is not None:
            return port == self.port
        return port == DEFAULT_PORT or (plain_http and port == 80)

    def overlaps(self, other: HostPattern) -> bool:
        """Could one request match both entries? Used to find two injections fighting over a header."""
        if self.upstream_port != other.upstream_port:
            return False
        if self.wildcard == other.wildcard:
            return self.name == other.name
        wild, exact = (self, other) if self.wildcard else (other, self)
        return wild.matches_name(exact.name)
