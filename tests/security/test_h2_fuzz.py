"""Fuzzing the HTTP/2 relay (hypothesis) in both directions at once: a client sends valid or
mutated frames (h2c, base-URL mode) in random pieces, and an HTTP/2 upstream over TLS on
127.0.0.1 answers each stream with valid or mutated frames, also in random pieces, some
holding the secret in a header, the body or a trailer.

Each example checks what a user would: the proxy is still running; what it sent the client is
HTTP/2 that ``h2`` (an instance of the test's own) accepts, ending or answering within a bound
(no hang); no secret is in any header, body or trailer the client could decode; and no request
reached the upstream that ``h2`` did not accept from the client's bytes. Bounded in CI; for a
long run:

    KEYHOLE_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/security/test_h2_fuzz.py
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given
from hypothesis import strategies as st

from tests.support.config import API_TOKEN
from tests.support.fuzzing import fuzz_settings, mutate, pieces, start_fuzz_sidecar
from tests.support.h2_raw import PREFACE
from tests.support.tls_server import BlockingTLSServer

FUZZ = fuzz_settings(80)
HOST = "h2fuzz.routed.test"
ANSWER_BOUND = 8.0  # seconds: upstream timeout (2) plus slack; longer is a hang
QUIET = 0.5  # seconds without a byte after which a connection that need not close is done


def accepted_requests(data: bytes) -> list[str]:
    """The paths of the requests ``h2`` (the test's own server-side instance) accepts from the
    client's bytes up to the first protocol error, fed one byte at a time: every request a
    frame completed before the error counts, however the proxy's reads happened to cut them."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                header_encoding=None))
    conn.initiate_connection()
    paths = []
    for at in range(len(data)):
        try:
            events = conn.receive_data(data[at:at + 1])
        except h2.exceptions.ProtocolError:
            break
        paths += [dict(e.headers).get(b":path", b"").decode("latin-1") for e in events
                  if isinstance(e, h2.events.RequestReceived)]
    return paths


def decode_answer(data: bytes) -> tuple[list[str], bool]:
    """Everything a client could decode from the proxy's bytes — header and trailer values
    (HPACK-decoded, so a Huffman-coded secret is found too) and bodies — and whether they were
    all well-formed frames and header blocks."""
    decoder = hpack.Decoder()
    found, bodies, block, at = [], {}, b"", 0
    try:
        while len(data) - at >= 9:
            frame, length = Frame.parse_frame_header(memoryview(data[at:at + 9]))
            if len(data) - at - 9 < length:
                break  # cut short by the connection's end
            frame.parse_body(memoryview(data[at + 9:at + 9 + length]))
            at += 9 + length
            if isinstance(frame, HeadersFrame | ContinuationFrame):
                block += frame.data
                if "END_HEADERS" in frame.flags:
                    found += [v.decode("latin-1") if isinstance(v, bytes) else v
                              for _, v in decoder.decode(block, raw=True)]
                    block = b""
            elif isinstance(frame, DataFrame):
                bodies[frame.stream_id] = bodies.get(frame.stream_id, b"") + frame.data
    except (hpack.HPACKError, ValueError) as exc:
        return [repr(exc)], False
    return found + [b.decode("latin-1") for b in bodies.values()], True


class FuzzH2Upstream(BlockingTLSServer):
    """Speaks HTTP/2 (``h2``); answers each stream with the current example's frames."""

    def __init__(self, ca):
        super().__init__(ca, HOST)
        self.context.set_alpn_protocols(["h2"])
        self.answer: tuple = ()
        self.received: list[str] = []
        self._lock = threading.Lock()

    def accepted(self) -> tuple:
        return (self.answer,)

    def serve(self, raw: socket.socket, answer: tuple) -> None:
        status, headers, body, trailers, edits, sizes = answer
        try:
            with self.context.wrap_socket(raw, server_side=True) as sock:
                sock.settimeout(3)
                conn = h2.connection.H2Connection(h2.config.H2Configuration(
                    client_side=False, header_encoding=None))  # any bytes the proxy passes on
                conn.initiate_connection()
                sock.sendall(conn.data_to_send())
                answered = False
                with contextlib.suppress(OSError):
                    while data := sock.recv(65536):
                        if answered:
                            continue  # read to the end: a close with bytes unread resets
                        try:
                            events = conn.receive_data(data)
                        except h2.exceptions.ProtocolError:
                            answered = True
                            continue
                        for event in events:
                            if not isinstance(event, h2.events.RequestReceived) or answered:
                                continue
                            with self._lock:
                                self.received.append(dict(event.headers).get(
                                    b":path", b"").decode("latin-1"))
                            sid = event.stream_id
                            conn.send_headers(sid, [(":status", str(status)), *headers])
                            if body:
                                conn.send_data(sid, body[:conn.local_flow_control_window(sid)])
                            if trailers:
                                conn.send_headers(sid, trailers, end_stream=True)
                            else:
                                conn.end_stream(sid)
                            # One answer per connection, so each example's end is its own.
                            conn.close_connection(last_stream_id=sid)
                            answered = True
                            for piece in pieces(mutate(conn.data_to_send(), edits), sizes):
                                sock.sendall(piece)
                        if not answered:
                            sock.sendall(conn.data_to_send())
        except (OSError, ssl.SSLError):
            pass
        finally:
            raw.close()


@pytest.fixture(scope="module")
def fuzz_upstream(test_ca):
    server = FuzzH2Upstream(test_ca[0])
    yield server
    server.close()


@pytest.fixture(scope="module")
def fuzz_sidecar(tmp_path_factory, fuzz_upstream, test_ca):
    sidecar = start_fuzz_sidecar(tmp_path_factory.mktemp("h2-fuzz"), HOST, fuzz_upstream.port,
                                 test_ca[1], "--idle-timeout", "2")
    yield sidecar
    sidecar.stop()


name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=10)
value = st.sampled_from(["", "x", API_TOKEN, f"Bearer {API_TOKEN}", "a b\tc"]) | st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=20)


@st.composite
def client_frames(draw) -> bytes:
    """The preface, then up to three streams' worth of frames and some control frames."""
    encoder = hpack.Encoder()
    out = [PREFACE, SettingsFrame(0).serialize()]
    for index in range(draw(st.integers(1, 3))):
        sid = 1 + 2 * index
        method = draw(st.sampled_from(["GET", "POST"] * 4 + ["HEAD", "CONNECT", "TRACE"]))
        path = draw(st.sampled_from(["/fuzz/", "/fuzz/a?q=1", "/fuzz/b", "/fuzz/c/d"] * 3
                                    + ["/fuzz/%2e%2e/x", "/nope/x", "", "*"]))
        headers = [(":method", method), (":scheme", "http"), (":authority", "127.0.0.1"),
                   (":path", path)]
        headers = draw(st.sampled_from([headers] * 8 + [
            headers[1:], [*headers, (":status", "200")], [*headers, ("connection", "close")],
            [*headers, ("te", "trailers")]]))
        headers += draw(st.lists(st.tuples(name, value), max_size=3))
        block = encoder.encode(headers)
        body = draw(st.binary(max_size=200))
        split = draw(st.booleans()) and len(block) > 2
        first = HeadersFrame(sid, block[:len(block) // 2] if split else block)
        if not split:
            first.flags.add("END_HEADERS")
        if not body:
            first.flags.add("END_STREAM")
        out.append(first.serialize())
        if split:
            rest = ContinuationFrame(sid, block[len(block) // 2:])
            rest.flags.add("END_HEADERS")
            out.append(rest.serialize())
        if body:
            data = DataFrame(sid, body)
            data.flags.add("END_STREAM")
            out.append(data.serialize())
        extra = draw(st.sampled_from([None] * 5 + ["rst", "ping", "window", "bad-window",
                                                   "junk"]))
        if extra == "rst":
            out.append(RstStreamFrame(sid, error_code=8).serialize())
        elif extra == "ping":
            out.append(PingFrame(0, opaque_data=b"12345678").serialize())
        elif extra == "window":
            out.append(WindowUpdateFrame(0, window_increment=1000).serialize())
        elif extra == "bad-window":
            out.append(WindowUpdateFrame(sid, window_increment=2**31 - 1).serialize())
        elif extra == "junk":
            out.append(draw(st.binary(min_size=1, max_size=20)))
    return b"".join(out)


@st.composite
def upstream_answers(draw) -> tuple:
    status = draw(st.sampled_from([200, 204, 404, 500]))
    headers = draw(st.lists(st.tuples(name, value), max_size=3))
    headers += draw(st.sampled_from([[], [("x-leak", API_TOKEN)], [("content-type",
                                                                   "application/grpc")]]))
    body = draw(st.sampled_from([b"", b"ok", API_TOKEN.encode(),
                                 b"\x00\x00\x00\x00\x19" + API_TOKEN.encode()])) + draw(
        st.binary(max_size=100))
    trailers = draw(st.sampled_from([[], [("grpc-status", "0")], [("x-t", API_TOKEN)]]))
    return status, headers, body, trailers, draw(edits), draw(splits)


# Half the examples are left whole, so that streams get through and the answers are judged.
edits = st.just([]) | st.lists(st.tuples(st.integers(0, 10_000),
                                         st.binary(min_size=1, max_size=4)), min_size=1,
                               max_size=2)
splits = st.lists(st.integers(1, 300), min_size=1, max_size=5)


@FUZZ
@given(client_frames(), edits, splits, upstream_answers())
def test_the_h2_relay_survives_random_frames_both_ways(fuzz_sidecar, fuzz_upstream, frames,
                                                       frame_edits, frame_splits, answer):
    sent = PREFACE + mutate(frames[len(PREFACE):], frame_edits)  # the frames, not the preface
    fuzz_upstream.answer = answer
    before = len(fuzz_upstream.received)
    accepted = accepted_requests(sent)
    got = b""
    with socket.create_connection(("127.0.0.1", fuzz_sidecar.proxy_port), timeout=5) as sock:
        with contextlib.suppress(OSError):
            for piece in pieces(sent, frame_splits):
                sock.sendall(piece)
                time.sleep(0.001)
        deadline = time.monotonic() + ANSWER_BOUND
        sock.settimeout(QUIET)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break  # quiet: every stream was answered or is waiting for more from us
            except OSError:
                break
            if not data:
                break
            got += data
        else:
            pytest.fail(f"the proxy kept talking for {ANSWER_BOUND}s")
    assert fuzz_sidecar.process.poll() is None, "the sidecar died"
    decoded, valid = decode_answer(got)
    assert valid, f"the proxy's bytes are not HTTP/2 h2 accepts: {got[:200]!r}"
    assert not [v for v in decoded if API_TOKEN in v], "the secret reached the client"
    fuzz_upstream.wait_idle(ANSWER_BOUND)
    reached = fuzz_upstream.received[before:]
    routed = [p.removeprefix("/fuzz") for p in accepted if p.startswith("/fuzz/")]
    assert len(reached) <= len(routed) and set(reached) <= set(routed), (
        f"h2 accepted {accepted} from the client, yet the upstream got {reached}")
