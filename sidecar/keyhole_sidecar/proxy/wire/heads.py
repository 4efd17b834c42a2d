"""Writing HTTP/1.1 heads from validated parts: the only bytes of a head the proxy composes.

Every message the proxy reads is parsed by llhttp; what it writes is a request or status line
and header fields assembled here, each part checked first: a method and a header name are
tokens, a reason phrase and a header value hold no CR, LF, NUL or other control byte (tab
aside: RFC 9110 §5.5), a request target holds no whitespace or control byte. One failed check
refuses the whole head (:class:`UnsafeHead`), so nothing a client, an upstream or a secret file
holds can split a message or start another.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable

from keyhole_sidecar.proxy.exchange import UnsafeHead

# RFC 9110 §5.6.2: a token; header names and methods are tokens.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What a field value may not hold: CR, LF and NUL (which end it or the line) and every other
# control byte but tab, which strict parsers refuse.
_NOT_FIELD_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A request target is one run of visible characters (RFC 9112 §3.2).
_TARGET_UNSAFE = re.compile(r"[\x00-\x20\x7f]")
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"  # llhttp's bytes come back byte for byte


Fields = Iterable[tuple[str, str]]


_checked_names: set[str] = set()  # names already proven tokens (the same few, request after request)


def _fields(headers: Fields) -> str:
    headers = list(headers)
    for name, _ in headers:
        if name not in _checked_names:
            if not _TOKEN.fullmatch(name):
                raise UnsafeHead(f"header name {name[:40]!r} is not a token")
            if len(_checked_names) < 4096:
                _checked_names.add(name)
    # One search over every value joined (no name can hold the bytes searched for).
    if _NOT_FIELD_TEXT.search("".join([value for _, value in headers])):
        bad = next(name for name, value in headers if _NOT_FIELD_TEXT.search(value))
        raise UnsafeHead(f"the value of header {bad!r} holds a control character (CR, LF, NUL "
                         "or another)")
    return "".join([f"{name}: {value}\r\n" for name, value in headers])


def request_head(method: str, target: str, headers: Fields) -> bytes:
    """``METHOD target HTTP/1.1`` and ``headers``, ready to write to an upstream."""
    if not _TOKEN.fullmatch(method):
        raise UnsafeHead(f"method {method[:20]!r} is not a token")
    if not target or _TARGET_UNSAFE.search(target):
        raise UnsafeHead("the request target holds whitespace or a control character")
    return f"{method} {target} HTTP/1.1\r\n{_fields(headers)}\r\n".encode(_ENCODING, _ERRORS)


def response_head(status: int, reason: str, headers: Fields) -> bytes:
    """``HTTP/1.1 status reason`` and ``headers``, ready to write to a client."""
    if not 100 <= status <= 999:
        raise UnsafeHead(f"status {status} is not three digits")
    if _NOT_FIELD_TEXT.search(reason):
        raise UnsafeHead("the reason phrase holds a control character")
    return f"HTTP/1.1 {status} {reason}\r\n{_fields(headers)}\r\n".encode(_ENCODING, _ERRORS)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: the empty chunk ends the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


# -- HTTP/2 ------------------------------------------------------------------------------
# RFC 9113 §8.2: field names are lowercase; §8.2.2: these describe one connection and never
# appear in an HTTP/2 message (TE only as "trailers").
_LOWER_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_H2_FORBIDDEN = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                           "upgrade"})
_PSEUDO = {"request": (":method", ":scheme", ":authority", ":path"), "response": (":status",)}


def header_block(kind: str, pseudo: Fields, headers: Fields,
                 sensitive: frozenset[str] = frozenset()) -> list[tuple[bytes, bytes]]:
    """An HTTP/2 header block (``kind``: request, response or trailers) for ``h2`` to encode:
    the pseudo-headers ``kind`` allows, first; then fields whose names are lowercase tokens and
    whose values hold no control byte. Anything else refuses the whole block. Fields named in
    ``sensitive`` (a secret's carriers) are never indexed (RFC 7541 §7.1.3): no later block
    on the connection — the agent shapes those — is compressed against them."""
    allowed = _PSEUDO.get(kind, ())
    block: list[tuple[bytes, bytes]] = []
    for name, value in pseudo:
        if name not in allowed:
            raise UnsafeHead(f"pseudo-header {name!r} has no place in a {kind} block")
        if not value or _TARGET_UNSAFE.search(value):
            raise UnsafeHead(f"pseudo-header {name!r} is empty or holds whitespace or a "
                             "control character")
        block.append((name.encode(), value.encode(_ENCODING, _ERRORS)))
    for name, value in headers:
        if not _LOWER_TOKEN.fullmatch(name):
            raise UnsafeHead(f"header name {name[:40]!r} is not a lowercase token")
        if name in _H2_FORBIDDEN or (name == "te" and value != "trailers"):
            raise UnsafeHead(f"header {name!r} is connection-specific; HTTP/2 carries none")
        if _NOT_FIELD_TEXT.search(value):
            raise UnsafeHead(f"the value of header {name!r} holds a control character (CR, LF, "
                             "NUL or another)")
        # Whitespace around a value is not part of it (RFC 9110 5.5) and HTTP/2 forbids it
        # (RFC 9113 8.2.1): the block holds the value as it goes on the wire.
        block.append((name.encode(), value.strip(" \t").encode(_ENCODING, _ERRORS)))
    if sensitive:
        from ngh2 import NeverIndexedHeader  # HTTP/2 only: loaded with its stack

        block = [NeverIndexedHeader(*field) if field[0].decode() in sensitive else field
                 for field in block]
    return block


def h2_fields(headers: Fields) -> list[tuple[str, str]]:
    """Fields as HTTP/2 carries them: names lowercased, connection-specific ones left behind
    (they described the hop they came on; TE survives only as ``trailers``)."""
    out = []
    for name, value in headers:
        lower = name.lower()
        if lower in _H2_FORBIDDEN or (lower == "te" and value.strip().lower() != "trailers"):
            continue
        out.append((lower, "trailers" if lower == "te" else value))
    return out


async def within_length(body: AsyncIterator[bytes], length: int | None) -> AsyncIterator[bytes]:
    """A streamed body sent under an announced ``length``: not one byte more goes out (the
    rest would be read upstream as a message of its own) and a body that ends short fails
    rather than leaving the upstream waiting. The parsers that read the client's body hold it
    to its own framing already; this keeps what we announce true whatever feeds the body."""
    if length is None:
        async for data in body:
            yield data
        return
    sent = 0
    async for data in body:
        sent += len(data)
        if sent > length:
            raise ValueError(f"the body outgrew the Content-Length announced ({length})")
        yield data
    if sent != length:
        raise ValueError(f"the body ended after {sent} of the {length} bytes announced")
