"""The server name a TLS ClientHello asks for (SNI), read from bytes peeked off a socket.

Transparent capture decides on it exactly as on a CONNECT authority. This is not HTTP (llhttp
parses every HTTP message); it is the TLS record and handshake framing of RFC 8446 §4.1.2 and
the server_name extension of RFC 6066 §3, read with a bounds check on every length. The
handshake may span several records and arrive over many TCP segments: :func:`read_sni` says
how to go on until the whole ClientHello is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

MAX_CLIENT_HELLO = 16384 + 5 * 4  # a ClientHello larger than one full record is refused
_HANDSHAKE, _CLIENT_HELLO, _SERVER_NAME, _HOST_NAME = 22, 1, 0, 0


class Verdict(Enum):
    MORE = "more"            # not enough bytes yet: peek again
    NOT_TLS = "not-tls"      # the first byte is no TLS handshake record
    NO_SNI = "no-sni"        # a complete ClientHello without a usable host name
    MALFORMED = "malformed"  # a TLS record that breaks its own framing, or too large
    NAME = "name"


@dataclass(frozen=True)
class SNI:
    verdict: Verdict
    name: str = ""


class _Short(Exception):
    pass


class _Bad(Exception):
    pass


def _handshake_bytes(data: bytes) -> bytes:
    """The concatenated handshake-record payloads, up to the first complete ClientHello."""
    out = bytearray()
    offset = 0
    while True:
        if len(out) >= 4:
            need = 4 + int.from_bytes(out[1:4], "big")
            if need > MAX_CLIENT_HELLO:
                raise _Bad
            if len(out) >= need:
                return bytes(out[:need])
        if len(data) < offset + 5:
            raise _Short
        if data[offset] != _HANDSHAKE:
            raise _Bad
        length = int.from_bytes(data[offset + 3:offset + 5], "big")
        if length == 0 or length > 16384:
            raise _Bad
        if len(data) < offset + 5 + length:
            raise _Short
        out += data[offset + 5:offset + 5 + length]
        offset += 5 + length


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise _Bad
        part = self.data[self.at:self.at + n]
        self.at += n
        return part

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> _Reader:
        return _Reader(self.take(self.number(length_bytes)))

    @property
    def left(self) -> int:
        return len(self.data) - self.at


def _server_name(hello: bytes) -> str | None:
    reader = _Reader(hello)
    if reader.number(1) != _CLIENT_HELLO:
        raise _Bad
    body = _Reader(reader.take(reader.number(3)))
    body.take(2 + 32)      # legacy_version, random
    body.vector(1)         # legacy_session_id
    body.vector(2)         # cipher_suites
    body.vector(1)         # legacy_compression_methods
    if body.left == 0:
        return None        # no extensions at all
    extensions = body.vector(2)
    while extensions.left:
        kind = extensions.number(2)
        content = extensions.vector(2)
        if kind != _SERVER_NAME:
            continue
        names = content.vector(2)
        while names.left:
            name_type = names.number(1)
            name = names.vector(2)
            raw = name.take(name.left)
            if name_type == _HOST_NAME:
                return _host_name(raw)
        return None
    return None


def _host_name(raw: bytes) -> str | None:
    """An ASCII DNS name, or None: SNI never carries IP literals or other bytes."""
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
    if not name or len(name) > 253 or not set(name) <= allowed:
        return None
    return name


def read_sni(data: bytes) -> SNI:
    """What the bytes peeked so far say about the ClientHello's server name."""
    if not data:
        return SNI(Verdict.MORE)
    if data[0] != _HANDSHAKE:
        return SNI(Verdict.NOT_TLS)
    try:
        hello = _handshake_bytes(data)
        name = _server_name(hello)
    except _Short:
        if len(data) > MAX_CLIENT_HELLO + 5:
            return SNI(Verdict.MALFORMED)
        return SNI(Verdict.MORE)
    except _Bad:
        return SNI(Verdict.MALFORMED)
    return SNI(Verdict.NAME, name) if name else SNI(Verdict.NO_SNI)
