"""A request body goes upstream byte for byte under the framing keyhole announces.

keyhole never decompresses a request on its way through: a body labelled ``Content-Encoding:
gzip`` leaves as the same gzip bytes, with the same label, under a length that counts the bytes
actually sent. The attack this pins (issue 30, item 1): a client announced ``Content-Length: 120``
of gzip and sent it after the head; the relay forwarded the *decompressed* 351 bytes under the
client's length, and the upstream read the other 231 — bytes the agent chose — as a second
request on keyhole's pooled connection, past ``rules``.

Each case sends a body whose decompressed form holds a whole smuggled request, and checks what
the upstream (parsing with llhttp and decoding nothing) received against what the client sent:
every encoding (none, gzip, deflate, br, zstd, an unknown one, a header that lies), every
framing (length with the head, length after it, chunked in odd pieces, HTTP/2 DATA frames with
and without a length), through CONNECT, absolute-form and base-URL, HTTP/1.1 and HTTP/2 on the
client's side and the upstream's. A hypothesis fuzzer then mixes them and fails on any desync.
(Transparent capture hands its connections to the same HTTP/1.1 and HTTP/2 owners after the
SNI peek: tests/capture checks that door.)
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import json
import socket
import ssl
import threading
import zlib
from dataclasses import dataclass, field

import brotli
import httpx
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from tests.support.config import API_TOKEN, SECRETS, injection, ref
from tests.support.fuzzing import fuzz_settings
from tests.support.h2_upstream import H2EchoServer
from tests.support.raw import open_tunnel, read_response_head
from tests.support.serving import ThreadedApp
from tests.support.sidecar import start_sidecar

H1_HOST = "fidelity.routed.test"
H2_HOST = "fidelity-h2.routed.test"


def smuggled(marker: str) -> bytes:
    """A body whose *decoded* form carries whole requests after a little JSON: forwarded
    decoded under the encoded length, the tail is parsed upstream as a request of its own."""
    attack = (f"GET /smuggled-{marker} HTTP/1.1\r\nHost: {H1_HOST}\r\n\r\n"
              f"POST /smuggled-{marker}-2 HTTP/1.1\r\nHost: {H1_HOST}\r\n"
              "Content-Length: 5000\r\n\r\n").encode()
    return b'{"input":"' + b"a" * 40 + b'"}' + attack * 4


# label sent, how the bytes are made from the plain body
ENCODINGS = {
    "identity": (None, lambda b: b),
    "gzip": ("gzip", gzip.compress),
    "deflate": ("deflate", zlib.compress),
    "br": ("br", brotli.compress),
    # No zstd codec is a dependency: a zstd label on bytes keyhole cannot decode is the case
    # that matters (a relay that tried would refuse or mangle it).
    "zstd": ("zstd", lambda b: b"\x28\xb5\x2f\xfd" + b),
    "unknown": ("x-keyhole-test", lambda b: b[::-1]),
    "lying gzip": ("gzip", lambda b: b),
    "stacked": ("deflate, gzip", lambda b: gzip.compress(zlib.compress(b))),
    "upper case": ("GZIP", gzip.compress),
}


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class RecordingUpstream:
    """What an HTTP/1.1 upstream that decodes nothing received, request by request."""

    port: int = 0
    started: list[str] = field(default_factory=list)  # paths whose head arrived
    received: list[Seen] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_started(self, marker: str, timeout: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: any(marker in p for p in self.started),
                                         timeout), f"the upstream never saw {marker}'s head"

    def find(self, marker: str) -> list[Seen]:
        with self.changed:
            return [seen for seen in self.received if marker in seen.path]


def _recording_app(state: RecordingUpstream) -> web.Application:
    async def record(request: web.Request) -> web.Response:
        with state.changed:
            state.started.append(request.raw_path)
            state.changed.notify_all()
        body = await request.read()  # raw: the server runs with auto_decompress=False
        with state.changed:
            state.received.append(Seen(request.raw_path, dict(request.headers), body))
            state.changed.notify_all()
        return web.json_response({"sha256": hashlib.sha256(body).hexdigest(), "size": len(body),
                                  "path": request.raw_path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    return app


@pytest.fixture(scope="module")
def recording_upstream(test_ca):
    state = RecordingUpstream()
    server = ThreadedApp(lambda: _recording_app(state), test_ca[0].issue_cert(H1_HOST),
                         auto_decompress=False)
    state.port = server.start()
    yield state
    server.stop()


@pytest.fixture(scope="module")
def h2_recording_upstream(test_ca):
    server = H2EchoServer(test_ca[0], H2_HOST)
    state = server.start()
    yield state
    server.stop()


@pytest.fixture(scope="module")
def fidelity_sidecar(tmp_path_factory, test_ca, recording_upstream, h2_recording_upstream):
    h1, h2 = recording_upstream.port, h2_recording_upstream.port
    credential = [{"name": "Authorization", "valueFrom": ref("api-credentials", "token"),
                   "format": "Bearer {value}"}]
    sidecar = start_sidecar(
        tmp_path_factory.mktemp("fidelity"),
        [injection("fidelity", hosts=[f"{H1_HOST}:{h1}"], headers=credential,
                   rules=[{"methods": ["POST", "GET"], "paths": ["/ok/*"]}]),
         injection("fidelity-h2", hosts=[f"{H2_HOST}:{h2}"], headers=credential)],
        SECRETS, upstream_ca=test_ca[1],
        resolve=[f"{H1_HOST}:{h1}:127.0.0.1", f"{H2_HOST}:{h2}:127.0.0.1"])
    yield sidecar
    sidecar.stop()


# -- HTTP/1.1 on the client's side -----------------------------------------------------------
def _head(method: str, target: str, host: str, fields: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *(f"{n}: {v}" for n, v in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunked(body: bytes, cuts: list[int]) -> list[bytes]:
    """``body`` in chunks at ``cuts``, then the framing itself split at odd places."""
    pieces, at = [], 0
    for cut in sorted({c % (len(body) + 1) for c in cuts} | {len(body)}):
        if cut > at:
            pieces.append(b"%x\r\n%b\r\n" % (cut - at, body[at:cut]))
            at = cut
    wire = b"".join(pieces) + b"0\r\n\r\n"
    return [wire[i:i + 7] for i in range(0, len(wire), 7)]


def _read_answer(sock: socket.socket) -> tuple[int, dict]:
    head = read_response_head(sock, 10)
    status = int(head.split(b" ", 2)[1])
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    body = b""
    while len(body) < length:
        data = sock.recv(length - len(body))
        assert data, "the proxy closed mid-answer"
        body += data
    return status, json.loads(body) if body.startswith(b"{") else {}


@contextlib.contextmanager
def _client(sidecar, mode: str, port: int):
    """A client connection for ``mode`` and how it names the request target."""
    if mode == "CONNECT":
        with open_tunnel(sidecar.proxy_port, f"{H1_HOST}:{port}", str(sidecar.ca_cert)) as tls:
            yield tls, lambda path: path
        return
    with socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=10) as sock:
        if mode == "absolute-form":
            yield sock, lambda path: f"http://{H1_HOST}:{port}{path}"
        else:  # base-URL: the first segment names the injection
            yield sock, lambda path: f"/fidelity{path}"


def send_h1(sidecar, upstream: RecordingUpstream, mode: str, framing: str, label: str | None,
            wire_body: bytes, marker: str, cuts: list[int] = (3, 50, 51)) -> tuple[int, dict]:
    """One request with ``wire_body`` (already encoded) and a follow-up on the same client
    connection; returns the first answer, after checking the follow-up got its own."""
    path = f"/ok/{marker}"
    fields = [("Content-Encoding", label)] if label else []
    with _client(sidecar, mode, upstream.port) as (sock, target):
        if framing == "chunked":
            fields.append(("Transfer-Encoding", "chunked"))
        else:
            fields.append(("Content-Length", str(len(wire_body))))
        head = _head("POST", target(path), f"{H1_HOST}:{upstream.port}", fields)
        if framing == "length, with the head":
            sock.sendall(head + wire_body)
        else:  # the head first; the body once the upstream is reading it
            sock.sendall(head)
            upstream.wait_started(marker)
            pieces = (_chunked(wire_body, list(cuts)) if framing == "chunked"
                      else [wire_body[:len(wire_body) // 3], wire_body[len(wire_body) // 3:]])
            for piece in pieces:
                sock.sendall(piece)
        answer = _read_answer(sock)
        sock.sendall(_head("GET", target(f"/ok/{marker}-next"), f"{H1_HOST}:{upstream.port}",
                           []))
        status, follow_up = _read_answer(sock)
        assert status == 200 and follow_up["path"].endswith(f"/ok/{marker}-next"), follow_up
    return answer


def assert_received_as_sent(upstream, marker: str, label: str | None, wire_body: bytes):
    seen = upstream.find(f"/ok/{marker}")
    assert [s.path for s in seen if "-next" not in s.path] == [f"/ok/{marker}"], \
        "the upstream did not receive exactly the one request"
    first = next(s for s in seen if "-next" not in s.path)
    assert first.body == wire_body, (
        f"the upstream received {len(first.body)} bytes, not the {len(wire_body)} sent")
    assert first.headers.get("Content-Encoding") == label
    if "Content-Length" in first.headers:  # the length announced counts the bytes sent
        assert int(first.headers["Content-Length"]) == len(wire_body)
    assert first.headers["Authorization"] == f"Bearer {API_TOKEN}"
    assert upstream.find(f"smuggled-{marker}") == [], "a smuggled request reached the upstream"


@pytest.mark.parametrize("mode", ["CONNECT", "absolute-form", "base-URL"])
@pytest.mark.parametrize("framing", ["length, with the head", "length, after the head",
                                     "chunked"])
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_an_http1_body_reaches_the_upstream_byte_for_byte(fidelity_sidecar, recording_upstream,
                                                         marker, mode, framing, encoding):
    label, encode = ENCODINGS[encoding]
    wire_body = encode(smuggled(marker))
    status, answer = send_h1(fidelity_sidecar, recording_upstream, mode, framing, label,
                             wire_body, marker)
    assert status == 200
    assert answer["sha256"] == hashlib.sha256(wire_body).hexdigest()
    assert_received_as_sent(recording_upstream, marker, label, wire_body)


# -- HTTP/2 on the client's side -------------------------------------------------------------
def _h2_client(sidecar) -> httpx.Client:
    return httpx.Client(http1=False, http2=True, proxy=sidecar.url, timeout=10,
                        verify=ssl.create_default_context(cafile=str(sidecar.ca_cert)))


@pytest.mark.parametrize("upstream_protocol", ["http/1.1", "h2"])
@pytest.mark.parametrize("framing", ["DATA frames with a content-length",
                                     "DATA frames, no content-length"])
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_an_http2_body_reaches_the_upstream_byte_for_byte(
        fidelity_sidecar, recording_upstream, h2_recording_upstream, marker, upstream_protocol,
        framing, encoding):
    label, encode = ENCODINGS[encoding]
    wire_body = encode(smuggled(marker))
    if upstream_protocol == "h2":
        url = f"https://{H2_HOST}:{h2_recording_upstream.port}/ok/{marker}"
    else:
        url = f"https://{H1_HOST}:{recording_upstream.port}/ok/{marker}"
    headers = {"Content-Encoding": label} if label else {}
    if framing == "DATA frames with a content-length":
        content = wire_body
    else:
        def content():  # httpx sends an iterator in DATA frames without a length
            yield wire_body[:17]
            yield wire_body[17:]
        content = content()
    with _h2_client(fidelity_sidecar) as client:
        answer = client.post(url, content=content, headers=headers)
        assert answer.http_version == "HTTP/2"
        assert answer.status_code == 200, answer.text
    if upstream_protocol == "h2":
        seen = h2_recording_upstream.find(marker)
        assert len(seen) == 1
        assert seen[0].body_sha256 == hashlib.sha256(wire_body).hexdigest()
        assert seen[0].header("content-encoding") == ([label] if label else [])
        assert seen[0].header("content-length") in ([], [str(len(wire_body))])
    else:
        assert answer.json()["sha256"] == hashlib.sha256(wire_body).hexdigest()
        seen = recording_upstream.find(marker)
        assert len(seen) == 1 and seen[0].body == wire_body
        assert seen[0].headers.get("Content-Encoding") == label
        assert upstream_protocol == "http/1.1"
        assert recording_upstream.find(f"smuggled-{marker}") == []


# -- a policy that reads the body decodes a copy, and judges what goes -------------------
def test_a_compressed_body_outside_the_rules_is_refused_and_never_sent(
        fidelity_sidecar, recording_upstream, marker):
    """``rules`` judge the request line: a body cannot carry a request past them."""
    wire_body = gzip.compress(smuggled(marker))
    with _client(fidelity_sidecar, "CONNECT", recording_upstream.port) as (sock, _):
        sock.sendall(_head("POST", f"/denied/{marker}", f"{H1_HOST}:{recording_upstream.port}",
                           [("Content-Encoding", "gzip"),
                            ("Content-Length", str(len(wire_body)))]) + wire_body)
        status, _ = _read_answer(sock)
    assert status in (403, 405)
    assert recording_upstream.find(marker) == []


# -- the fuzzer -------------------------------------------------------------------------------
_examples = itertools.count()


@fuzz_settings(40)
@given(mode=st.sampled_from(["CONNECT", "absolute-form", "base-URL"]),
       framing=st.sampled_from(["length, with the head", "length, after the head", "chunked"]),
       encoding=st.sampled_from(sorted(ENCODINGS)),
       padding=st.binary(max_size=200),
       cuts=st.lists(st.integers(0, 5000), max_size=6))
def test_no_body_desynchronises_the_upstream(fidelity_sidecar, recording_upstream, mode, framing,
                                             encoding, padding, cuts):
    marker = f"fz{next(_examples)}"
    label, encode = ENCODINGS[encoding]
    wire_body = encode(padding + smuggled(marker))
    status, answer = send_h1(fidelity_sidecar, recording_upstream, mode, framing, label,
                             wire_body, marker, cuts)
    assert status == 200, answer
    assert_received_as_sent(recording_upstream, marker, label, wire_body)
