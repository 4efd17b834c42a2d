"""Content codings (RFC 9110 §8.4) undone on a *copy* of a request body, for a policy that must
read it (a model API request's model and output ceiling). The bytes sent upstream are always
the client's own, under the client's ``Content-Encoding``: decoding on the way through is how a
compressed body smuggles a request (issue 30). Pure; bounded, so a small bomb cannot fill memory.
"""

from __future__ import annotations

import zlib

import brotli


class Undecodable(ValueError):
    """The copy cannot be made: an unknown coding, corrupt data, or more than the limit."""


def _zlib(data: bytes, wbits: int, limit: int) -> bytes:
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(data, limit + 1)
    except zlib.error as exc:
        raise Undecodable(f"corrupt data ({exc})") from None
    if len(out) > limit:
        raise Undecodable(f"decodes to more than {limit} bytes")
    if not decoder.eof or decoder.unused_data:
        raise Undecodable("truncated, or followed by bytes of something else")
    return out


def _deflate(data: bytes, limit: int) -> bytes:
    """HTTP's "deflate" is the zlib format; some senders use raw deflate, as browsers accept."""
    zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
    return _zlib(data, zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS, limit)


def _brotli(data: bytes, limit: int) -> bytes:
    decoder = brotli.Decompressor()
    try:
        out = decoder.process(data, output_buffer_limit=limit + 1)
    except brotli.error as exc:
        raise Undecodable(f"corrupt data ({exc})") from None
    if len(out) > limit:
        raise Undecodable(f"decodes to more than {limit} bytes")
    if not decoder.is_finished():
        raise Undecodable("truncated")
    return out


_DECODERS = {
    "gzip": lambda data, limit: _zlib(data, 16 + zlib.MAX_WBITS, limit),
    "x-gzip": lambda data, limit: _zlib(data, 16 + zlib.MAX_WBITS, limit),
    "deflate": _deflate,
    "br": _brotli,
}


def codings(content_encoding: str | None) -> list[str]:
    """The codings a ``Content-Encoding`` value lists, in the order they were applied."""
    return [c.strip().lower() for c in (content_encoding or "").split(",")
            if c.strip() and c.strip().lower() != "identity"]


def decoded_copy(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """``body`` with every coding of ``content_encoding`` undone, last applied first; raises
    :class:`Undecodable` for a coding keyhole cannot undo or a result over ``limit`` bytes."""
    for coding in reversed(codings(content_encoding)):
        decoder = _DECODERS.get(coding)
        if decoder is None:
            raise Undecodable(f"keyhole cannot decode Content-Encoding {coding!r}")
        body = decoder(body, limit)
    return body
