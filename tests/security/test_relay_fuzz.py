"""Fuzzing the relay (hypothesis) in both directions at once: a client sends a valid or
mutated request in random pieces through a CONNECT tunnel, and a TLS upstream on 127.0.0.1
answers a valid or mutated response, also in random pieces, some holding the secret.

Each example checks what a user would: the proxy is still running, its answer is an HTTP
response or a clean close within a bound (no hang), no secret is in it, and no request reached
the upstream whole unless llhttp accepted the client's bytes as a whole request. Bounded in CI;
for a long run:

    KEYHOLE_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/security/test_relay_fuzz.py
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser
from hypothesis import given
from hypothesis import strategies as st

from tests.support.config import ALL_SECRETS, API_TOKEN
from tests.support.fuzzing import fuzz_settings, mutate, pieces, start_fuzz_sidecar
from tests.support.raw import open_tunnel
from tests.support.tls_server import BlockingTLSServer

FUZZ = fuzz_settings(120)
HOST = "fuzz.routed.test"
ANSWER_BOUND = 8.0  # seconds: upstream timeout (2) plus slack; longer is a hang


def judge(data: bytes) -> tuple[str, bool]:
    """What llhttp (aiohttp's C parser, an instance of the test's own) makes of ``data``:
    "refused", "incomplete" or "complete", and whether the first whole request asked to
    close the connection afterwards."""
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16, max_line_size=8190,
                                   max_field_size=8190, max_headers=100)
        messages = []
        for at in range(len(data)):  # byte by byte: what came whole before a refusal counts
            try:
                messages += parser.feed_data(data[at:at + 1])[0]
            except HttpProcessingError:
                break
        else:
            at = len(data)
        whole = [message for message, body in messages if body.is_eof()]
        if whole:
            return "complete", whole[0].should_close
        return ("refused", True) if at < len(data) else ("incomplete", False)
    finally:
        loop.close()


class FuzzUpstream(BlockingTLSServer):
    """Answers each connection's first request head with the current example's pieces."""

    def __init__(self, ca):
        super().__init__(ca, HOST)
        self.pieces: list[bytes] = []
        self.received: list[bytes] = []

    def accepted(self) -> tuple:
        return (list(self.pieces),)  # the example's answer when its connection came

    def serve(self, raw: socket.socket, pieces: list[bytes]) -> None:
        got = b""
        try:
            with self.context.wrap_socket(raw, server_side=True) as sock:
                sock.settimeout(3)
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in got:
                        data = sock.recv(65536)
                        if not data:
                            break
                        got += data
                    sock.settimeout(0.05)  # and whatever body follows soon
                    with contextlib.suppress(TimeoutError):
                        while data := sock.recv(65536):
                            got += data
                    for piece in pieces:
                        sock.sendall(piece)
                        time.sleep(0.002)
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.received.append(got)
            raw.close()


@pytest.fixture(scope="module")
def fuzz_upstream(test_ca):
    server = FuzzUpstream(test_ca[0])
    yield server
    server.close()


@pytest.fixture(scope="module")
def fuzz_sidecar(tmp_path_factory, fuzz_upstream, test_ca):
    sidecar = start_fuzz_sidecar(tmp_path_factory.mktemp("relay-fuzz"), HOST, fuzz_upstream.port,
                                 test_ca[1])
    yield sidecar
    sidecar.stop()


token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789", min_size=1, max_size=10)
value = st.sampled_from(["", "x", API_TOKEN, f"Bearer {API_TOKEN}", "a b\tc"]) | st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=20)


@st.composite
def requests(draw) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS"]))
    path = draw(st.sampled_from(["/", "/a", "/v1/x?q=1", "/%2e%2e/x", "//double"]))
    headers = [f"Host: {HOST}:{{port}}", "Connection: close"]
    headers += [f"{n}: {v}" for n, v in draw(st.lists(st.tuples(token, value), max_size=4))]
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked", "none", "wrong-length"]))
    if framing == "length":
        headers.append(f"Content-Length: {len(body)}")
    elif framing == "wrong-length":
        headers.append(f"Content-Length: {len(body) + draw(st.integers(1, 50))}")
    elif framing == "chunked":
        headers.append("Transfer-Encoding: chunked")
        body = (b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
    else:
        body = b""
    return ("\r\n".join([f"{method} {path} HTTP/1.1", *headers]) + "\r\n\r\n").encode() + body


@st.composite
def responses(draw) -> bytes:
    status = draw(st.sampled_from([200, 201, 204, 301, 304, 400, 404, 500, 100, 103]))
    headers = [f"{n}: {v}" for n, v in draw(st.lists(st.tuples(token, value), max_size=4))]
    body = draw(st.sampled_from([b"", b"ok", API_TOKEN.encode(), b"x" * 5000])) + draw(
        st.binary(max_size=200))
    framing = draw(st.sampled_from(["length", "chunked", "close", "wrong-length"]))
    if framing == "length":
        headers.append(f"Content-Length: {len(body)}")
    elif framing == "wrong-length":
        headers.append(f"Content-Length: {len(body) + 10}")
    elif framing == "chunked":
        headers.append("Transfer-Encoding: chunked")
        trailer = draw(st.sampled_from(["", f"X-Trailer: {API_TOKEN}\r\n"]))
        body = (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + b"0\r\n" + \
            trailer.encode() + b"\r\n"
    head = f"HTTP/1.1 {status} Fuzz\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n"
    if 100 <= status < 200:  # an interim answer, then a final one
        head += "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
        body = b"ok"
    return head.encode() + body


edits = st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(
    [b"\r\n", b"\n", b"\r", b"\x00", b" ", b":", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n",
     b"Content-Length: 5\r\n", b"\xff", b"0\r\n\r\n"]) | st.binary(min_size=1, max_size=4)),
    max_size=3)
splits = st.lists(st.integers(1, 400), min_size=1, max_size=6)


@FUZZ
@given(requests(), edits, splits, responses(), edits, splits)
def test_the_relay_survives_random_traffic_both_ways(fuzz_sidecar, fuzz_upstream, request,
                                                     request_edits, request_splits, response,
                                                     response_edits, response_splits):
    sent = mutate(request.replace(b"{port}", str(fuzz_upstream.port).encode()), request_edits)
    fuzz_upstream.pieces = pieces(mutate(response, response_edits), response_splits)
    before = len(fuzz_upstream.received)
    started = time.monotonic()
    verdict, closes = judge(sent)
    answer, closed = b"", False
    with open_tunnel(fuzz_sidecar.proxy_port, f"{HOST}:{fuzz_upstream.port}",
                     str(fuzz_sidecar.ca_cert)) as tls:
        with contextlib.suppress(OSError):
            for piece in pieces(sent, request_splits):
                tls.sendall(piece)
                time.sleep(0.001)
        # A refused request, or a whole one that asked to close, must end in a close; an
        # incomplete one may wait for the rest (the header timeout ends it), so look briefly.
        must_close = verdict == "refused" or (verdict == "complete" and closes)
        tls.settimeout(ANSWER_BOUND if must_close else 0.5)
        try:
            while data := tls.recv(65536):
                answer += data
            closed = True
        except TimeoutError:
            pass
        except (OSError, ssl.SSLError):
            closed = True
    took = time.monotonic() - started
    if must_close:
        assert closed, f"{verdict} request: no close in {took:.1f}s; answer {answer[:120]!r}"
    assert fuzz_sidecar.process.poll() is None, "the sidecar died"
    assert answer == b"" or answer.startswith(b"HTTP/1."), answer[:120]
    text = answer.decode("latin-1")
    assert not [s for s in ALL_SECRETS if s in text], "a secret reached the client"
    fuzz_upstream.wait_idle(ANSWER_BOUND)  # each connection records what it got as it ends
    reached = fuzz_upstream.received[before:]
    whole = [r for r in reached if judge(r)[0] == "complete"]
    if verdict != "complete":
        assert not whole, f"llhttp refused {sent[:120]!r}, yet the upstream got {whole[0][:120]!r}"
