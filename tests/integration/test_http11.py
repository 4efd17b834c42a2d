"""HTTP/1.1 through the relay, case by case, with real sockets on both sides: a scripted TLS
upstream on 127.0.0.1 that answers exactly the bytes each case needs, and clients that send
exactly the bytes each case needs (raw sockets through a CONNECT tunnel, or curl)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading

import pytest

from tests.support.config import API_TOKEN, injection, ref
from tests.support.raw import open_tunnel, read_all, status_of
from tests.support.tls_server import BlockingTLSServer

HOST = "script.routed.test"


class ScriptedUpstream(BlockingTLSServer):
    """A blocking TLS server: each request's path picks the bytes it answers with."""

    running: ScriptedUpstream
    def __init__(self, ca):
        super().__init__(ca, HOST)
        ScriptedUpstream.running = self
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection, head, body)
        self.heads: list[bytes] = []  # each request head as it arrives, before its body
        self._arrived = threading.Condition()

    def wait_for_head(self, path: bytes, timeout: float = 30.0) -> None:
        """Wait until a request for ``path`` has reached the upstream (its body may not)."""
        with self._arrived:
            if not self._arrived.wait_for(
                    lambda: any(h.split(b" ", 2)[1] == path for h in self.heads), timeout):
                raise AssertionError(f"no request for {path!r} reached the upstream")

    def accepted(self) -> tuple:
        return (self.connections,)  # counted by the accepting thread, in order

    def serve(self, raw: socket.socket, number: int) -> None:
        try:
            sock = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        sock.settimeout(10)
        buffer, armed = b"", False
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                with self._arrived:
                    self.heads.append(head)
                    self._arrived.notify_all()
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if b"transfer-encoding: chunked" in head.lower():
                    while not buffer.endswith(b"0\r\n\r\n"):
                        buffer += sock.recv(65536)
                    body, buffer = buffer, b""
                else:
                    while len(buffer) < length:
                        buffer += sock.recv(65536)
                    body, buffer = buffer[:length], buffer[length:]
                self.requests.append((number, head, body))
                if armed:
                    return  # the kept-alive connection was closed as it was reused
                method, path = head.split(b" ", 2)[:2]
                answer, keep = self.answer(method, path, body)
                if path.startswith(b"/arm"):
                    armed = True
                sock.sendall(answer)
                if not keep:
                    return
        except (OSError, ssl.SSLError):
            return
        finally:
            sock.close()

    @staticmethod
    def answer(method: bytes, path: bytes, body: bytes) -> tuple[bytes, bool]:
        if path.startswith(b"/n/"):
            text = path[3:]
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(text), text), True
        if path in (b"/echo", b"/stream-echo", b"/left-mid-body"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body), True
        if path == b"/until-close":
            return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"z" * 100_000, False
        if path == b"/head":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n", True
        if path == b"/trailers":
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Upstream-Token"
                    b"\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Upstream-Token: "
                    + API_TOKEN.encode() + b"\r\n\r\n"), True
        if path == b"/big-header":
            return b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n", False
        if path == b"/no-content":
            return b"HTTP/1.1 204 No Content\r\n\r\n", True
        if path == b"/not-modified":
            return b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"v1\"\r\n\r\n", True
        if path == b"/interim":
            return (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"), True
        if path.startswith(b"/arm") or path.startswith(b"/after"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True
        if path == b"/http10":
            return b"HTTP/1.0 200 OK\r\n\r\nold-style body", False
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", True



@pytest.fixture(scope="module")
def scripted(test_ca):
    server = ScriptedUpstream(test_ca[0])
    yield server
    server.close()


@pytest.fixture
def relay(make_sidecar, scripted):
    return make_sidecar(
        [injection("script", hosts=[f"{HOST}:{scripted.port}"],
                   headers=[{"name": "Authorization", "valueFrom": ref("api-credentials", "token")}])],
        args=["--resolve", f"{HOST}:{scripted.port}:127.0.0.1"])


def _tunnel(relay, scripted) -> ssl.SSLSocket:
    return open_tunnel(relay.proxy_port, f"{HOST}:{scripted.port}", str(relay.ca_cert))


def _get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {_authority()}\r\n{extra}\r\n".encode()


def _authority() -> str:
    return f"{HOST}:{ScriptedUpstream.running.port}"


def _read_response(sock: ssl.SSLSocket, head_only: bool = False) -> tuple[bytes, bytes]:
    """One response: its head and its body, read by the framing the head announces."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"closed before a whole head: {data!r}"
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next((int(line.split(b":")[1]) for line in lines
                   if line.startswith(b"content-length:")), None)
    if head_only or status_of(head) in (204, 304) or 100 <= status_of(head) < 200:
        return head, rest
    if b"transfer-encoding: chunked" in lines:
        while not rest.endswith(b"0\r\n\r\n"):
            rest += sock.recv(65536)
        return head, _dechunk(rest)
    assert length is not None, head
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, rest


def _dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2:]


def test_pipelined_requests_are_answered_in_order(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/n/first") + _get("/n/second") + _get("/n/third"))
        bodies = [_read_response(sock)[1] for _ in range(3)]
    assert bodies == [b"first", b"second", b"third"]
    sent = [head.split(b"\r\n")[0] for _, head, _ in scripted.requests[-3:]]
    assert sent == [b"GET /n/first HTTP/1.1", b"GET /n/second HTTP/1.1", b"GET /n/third HTTP/1.1"]


def test_a_body_sent_before_100_continue_reaches_the_upstream_whole(relay, scripted):
    body = b"x" * 3000
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/echo", "POST", f"Expect: 100-continue\r\nContent-Length: {len(body)}"
                                           "\r\n") + body)
        head, answer = _read_response(sock)
        if status_of(head) == 100:  # the interim answer, then the real one
            head, answer = _read_response(sock)
        assert status_of(head) == 200
        assert answer == body
        _, upstream_head, received = scripted.requests[-1]
        assert received == body and b"expect:" not in upstream_head.lower()
        sock.sendall(_get("/n/still-open"))  # the stream stayed in step
        assert _read_response(sock)[1] == b"still-open"


def test_an_upstreams_interim_answers_are_not_passed_on(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/interim"))
        head, body = _read_response(sock)
    assert status_of(head) == 200 and body == b"final"


def test_a_response_without_length_that_ends_at_close_reaches_the_client_whole(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/until-close"))
        head, body = _read_response(sock)  # re-framed: chunked to an HTTP/1.1 client
        assert b"transfer-encoding: chunked" in head.lower()
        assert body == b"z" * 100_000
        sock.sendall(_get("/n/next"))  # the client's connection outlives the upstream's
        assert _read_response(sock)[1] == b"next"


def test_an_http10_client_gets_a_body_that_ends_at_close(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(f"GET /until-close HTTP/1.0\r\nHost: {_authority()}\r\n\r\n".encode())
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower() and b"chunked" not in head.lower()
    assert body == b"z" * 100_000


def test_an_http10_upstream_answer_is_relayed(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/http10"))
        head, body = _read_response(sock)
    assert status_of(head) == 200 and body == b"old-style body"


def test_head_keeps_its_content_length_and_sends_no_body(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/head", "HEAD") + _get("/n/after-head"))
        head, rest = _read_response(sock, head_only=True)
        assert b"content-length: 12345" in head.lower()
        while not rest.endswith(b"after-head"):
            rest += sock.recv(65536)
        assert rest.startswith(b"HTTP/1.1 200"), rest  # no body between the two answers


@pytest.mark.parametrize("path", ["/no-content", "/not-modified"])
def test_204_and_304_carry_no_body(relay, scripted, path):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get(path) + _get("/n/after"))
        head, rest = _read_response(sock)
        assert status_of(head) in (204, 304)
        while not rest.endswith(b"after"):
            rest += sock.recv(65536)
        assert rest.startswith(b"HTTP/1.1 200")


def test_trailers_are_consumed_and_not_passed_on(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/trailers"))
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            data += sock.recv(65536)
        sock.sendall(_get("/n/after-trailers"))
        _, after = _read_response(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert _dechunk(body) == b"hello world"
    assert API_TOKEN.encode() not in data and b"trailer" not in head.lower()
    assert after == b"after-trailers"


def test_a_1_mib_request_header_block_is_refused(relay, scripted):
    before = len(scripted.requests)
    with _tunnel(relay, scripted) as sock:
        big = "".join(f"X-Pad-{i}: {'p' * 8000}\r\n" for i in range(128))
        with contextlib.suppress(ConnectionResetError, BrokenPipeError, ssl.SSLError):
            sock.sendall(_get("/n/big", extra=big))
        answer = read_all(sock)
    assert answer == b"" or status_of(answer) in (400, 431), answer[:200]
    assert len(scripted.requests) == before


def test_a_1_mib_response_header_block_is_a_502(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/big-header"))
        head, body = _read_response(sock)
    assert status_of(head) == 502 and b"malformed response" in body


def test_a_kept_alive_connection_closed_as_it_is_reused_is_retried_once_for_a_get(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/arm-get"))
        assert _read_response(sock)[1] == b"ok"
        opened = scripted.connections
        sock.sendall(_get("/after-get"))  # the pooled connection: the upstream drops it
        head, body = _read_response(sock)
    assert (status_of(head), body) == (200, b"ok")
    assert scripted.connections == opened + 1  # sent again, once, on a new connection


def test_a_post_on_a_connection_closed_as_it_is_reused_is_not_sent_twice(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/arm-post"))
        assert _read_response(sock)[1] == b"ok"
        posts_before = sum(1 for _, head, _ in scripted.requests if head.startswith(b"POST"))
        sock.sendall(_get("/after-post", "POST", "Content-Length: 4\r\n") + b"data")
        head, body = _read_response(sock)
    assert status_of(head) == 502 and b"closed the connection" in body
    posts = sum(1 for _, head, _ in scripted.requests if head.startswith(b"POST"))
    assert posts == posts_before + 1


def test_upstream_connections_are_kept_alive_across_client_connections(relay, scripted):
    for _ in range(2):  # warm: one pooled connection exists afterwards
        subprocess.run(["curl", "-sS", "-o", "/dev/null", f"https://{HOST}:{scripted.port}/n/w"],
                       env=relay.client_env(), check=True, capture_output=True)
    opened = scripted.connections
    for _ in range(5):
        subprocess.run(["curl", "-sS", "-o", "/dev/null", f"https://{HOST}:{scripted.port}/n/k"],
                       env=relay.client_env(), check=True, capture_output=True)
    assert scripted.connections == opened  # five client connections, no new upstream one


def test_a_chunked_request_body_that_streams_is_relayed_chunked(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/stream-echo", "POST", "Transfer-Encoding: chunked\r\n")
                     + b"3\r\nabc\r\n")
        scripted.wait_for_head(b"/stream-echo")  # the head went upstream before the body ended
        sock.sendall(b"4\r\ndefg\r\n0\r\n\r\n")
        head, _body = _read_response(sock)
    assert status_of(head) == 200
    _, upstream_head, received = scripted.requests[-1]
    assert b"transfer-encoding: chunked" in upstream_head.lower()
    assert _dechunk(received) == b"abcdefg"


def test_a_chunked_request_body_that_arrived_whole_is_sent_with_its_length(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/echo", "POST", "Transfer-Encoding: chunked\r\n")
                     + b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        _head, body = _read_response(sock)
    _, upstream_head, received = scripted.requests[-1]
    assert b"content-length: 7" in upstream_head.lower()
    assert received == b"abcdefg" == body


def test_the_injected_header_is_on_every_pipelined_request(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/n/a", extra="Authorization: Bearer agent-guess\r\n") + _get("/n/b"))
        for _ in range(2):
            _read_response(sock)
    for _, head, _ in scripted.requests[-2:]:
        lines = [line for line in head.split(b"\r\n") if line.lower().startswith(b"authorization")]
        assert lines == [b"Authorization: " + API_TOKEN.encode()]


def test_a_client_that_stops_mid_body_frees_the_upstream_connection(relay, scripted):
    with _tunnel(relay, scripted) as sock:
        sock.sendall(_get("/left-mid-body", "POST", "Content-Length: 100000\r\n") + b"x" * 1000)
        scripted.wait_for_head(b"/left-mid-body")  # the relay is streaming the body upstream
    reply = subprocess.run(["curl", "-sS", f"https://{HOST}:{scripted.port}/n/fine"],
                           env=relay.client_env(), capture_output=True, text=True, timeout=30)
    assert reply.stdout == "fine"
