"""The decoded copy a policy reads: every coding keyhole knows, bounded, and a clear refusal
for the rest."""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest

from keyhole_sidecar.codings import Undecodable, decoded_copy

PLAIN = b'{"model":"gpt-4o-mini","messages":[]}' * 20


@pytest.mark.parametrize(("label", "encoded"), [
    (None, PLAIN), ("identity", PLAIN), ("gzip", gzip.compress(PLAIN)),
    ("x-gzip", gzip.compress(PLAIN)), ("deflate", zlib.compress(PLAIN)),
    ("deflate", zlib.compress(PLAIN)[2:-4]),  # raw deflate, as some senders write it
    ("br", brotli.compress(PLAIN)), ("GZIP", gzip.compress(PLAIN)),
    ("deflate, gzip", gzip.compress(zlib.compress(PLAIN))),
])
def test_every_coding_keyhole_knows_is_undone(label, encoded):
    assert decoded_copy(encoded, label, 1 << 20) == PLAIN


@pytest.mark.parametrize(("label", "encoded", "says"), [
    ("zstd", b"\x28\xb5\x2f\xfd" + PLAIN, "cannot decode Content-Encoding 'zstd'"),
    ("gzip", PLAIN, "corrupt data"),
    ("gzip", gzip.compress(PLAIN)[:-10], "truncated"),
    ("gzip", gzip.compress(PLAIN) + b"GET / HTTP/1.1\r\n\r\n", "followed by bytes"),
    ("br", b"\xff" * 10, "corrupt data"),
])
def test_what_cannot_be_undone_is_named(label, encoded, says):
    with pytest.raises(Undecodable, match=says):
        decoded_copy(encoded, label, 1 << 20)


@pytest.mark.parametrize(("label", "encode"), [("gzip", gzip.compress), ("br", brotli.compress),
                                               ("deflate", zlib.compress)])
def test_a_bomb_stops_at_the_limit(label, encode):
    bomb = encode(b"\0" * (64 << 20))  # 64 MiB of zeros in a few KiB
    with pytest.raises(Undecodable, match="more than 1024 bytes"):
        decoded_copy(bomb, label, 1024)
