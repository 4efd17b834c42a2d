"""The SNI reader against real ClientHellos (OpenSSL's, through Python's ssl) and garbage."""

from __future__ import annotations

import contextlib
import ssl

from hypothesis import given, settings
from hypothesis import strategies as st

from keyhole_sidecar.clienthello import MAX_CLIENT_HELLO, Verdict, read_sni


def client_hello(server_name: str | None) -> bytes:
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = client_hello("api.openai.com")


def test_a_real_client_hello_names_its_server():
    assert read_sni(HELLO) == read_sni(HELLO + b"trailing bytes")
    assert read_sni(HELLO).verdict == Verdict.NAME and read_sni(HELLO).name == "api.openai.com"


def test_every_prefix_asks_for_more_and_never_guesses():
    for cut in range(len(HELLO)):
        assert read_sni(HELLO[:cut]).verdict == Verdict.MORE


def test_a_client_hello_split_into_many_records_is_read_whole():
    body = HELLO[5:]
    records = b"".join(b"\x16\x03\x01" + len(body[i:i + 50]).to_bytes(2, "big") + body[i:i + 50]
                       for i in range(0, len(body), 50))
    assert read_sni(records).name == "api.openai.com"


def test_no_server_name_and_not_tls_are_told_apart():
    assert read_sni(client_hello(None)).verdict == Verdict.NO_SNI
    assert read_sni(b"GET / HTTP/1.1\r\n").verdict == Verdict.NOT_TLS


def test_oversized_or_broken_framing_is_malformed():
    assert read_sni(b"\x16\x03\x01\x00\x00").verdict == Verdict.MALFORMED  # empty record
    huge = b"\x16\x03\x01\x40\x00\x01\xff\xff\xff"  # a ClientHello claiming 16 MiB
    assert read_sni(huge + b"\x00" * 16384).verdict == Verdict.MALFORMED
    assert read_sni(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00").verdict == Verdict.MALFORMED


def test_a_server_name_that_is_no_dns_name_is_no_name():
    name = "api.openai.com"
    for bad in ("api.open\x00ai.com", "api openai.com", "api.openäi.com"[:len(name)]):
        encoded = bad.encode("latin-1")
        assert read_sni(HELLO.replace(name.encode(), encoded)).verdict in (Verdict.NO_SNI,
                                                                          Verdict.MALFORMED)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_CLIENT_HELLO + 64))
def test_random_bytes_never_crash_it(data):
    assert read_sni(data).verdict in set(Verdict)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(HELLO) - 1), st.binary(min_size=1, max_size=8))
def test_corrupting_a_real_hello_never_crashes_it(offset, junk):
    corrupted = HELLO[:offset] + junk + HELLO[offset + len(junk):]
    assert read_sni(corrupted).verdict in set(Verdict)
