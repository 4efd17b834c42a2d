"""Upstreams and networks that fail, files that change under the proxy, and clients that hold
connections open: each gets a clear error or a clean close, the proxy does not crash, and
everyone else keeps being served."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import ssl
import subprocess
import threading
import time

import pytest

from tests.integration.clients import curl
from tests.support.config import API_TOKEN, injection, ref
from tests.support.sidecar import write_injections


class FaultyUpstream:
    """A TLS server on 127.0.0.1 that misbehaves on purpose, by path."""

    def __init__(self, ca):
        self.cert = ca.issue_cert("faulty.routed.test")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        self.writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1]
        if path.startswith(b"/reset-mid-body"):  # longer than the proxy reads whole: streamed
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            await writer.drain()
            writer.transport.abort()
        elif path.startswith(b"/reset-small-body"):  # short enough to be read whole first
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"x" * 1000)
            await writer.drain()
            writer.transport.abort()
        elif path.startswith(b"/stall"):
            await asyncio.sleep(30)
        elif path.startswith(b"/garbage"):
            writer.write(b"THIS IS NOT HTTP\r\n\r\n")
            await writer.drain()
            writer.close()
        else:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
            writer.close()

    def start(self) -> int:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        self.thread.start()

        async def serve():
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context)
            return self.server.sockets[0].getsockname()[1]

        self.port = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        return self.port

    def stop(self):
        async def shut():
            self.server.close()
            for writer in self.writers:
                writer.transport.abort()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await asyncio.sleep(0.1)

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def faulty(test_ca):
    server = FaultyUpstream(test_ca[0])
    server.start()
    yield server
    server.stop()


@pytest.fixture
def faulty_sidecar(make_sidecar, faulty):
    port = faulty.port
    return make_sidecar(
        [injection("faulty", hosts=[f"faulty.routed.test:{port}"],
                   headers=[{"name": "Authorization", "valueFrom": ref("api-credentials", "token")}]),
         injection("nowhere", hosts=["nxdomain.routed.invalid"],
                   headers=[{"name": "Authorization", "valueFrom": ref("api-credentials", "token")}])],
        args=["--resolve", f"faulty.routed.test:{port}:127.0.0.1", "--upstream-timeout", "1"])


def url(faulty, path: str) -> str:
    return f"https://faulty.routed.test:{faulty.port}{path}"


def test_an_upstream_reset_mid_body_ends_the_response_and_nothing_else(faulty_sidecar, faulty):
    done = subprocess.run(["curl", "-sS", "-o", "/dev/null", url(faulty, "/reset-mid-body")],
                          env=faulty_sidecar.client_env(), capture_output=True, text=True)
    assert done.returncode != 0  # the client sees a truncated body, as it would without a proxy
    assert faulty_sidecar.metric("keyhole_upstream_errors_total", kind="mid_body") == 1
    record = faulty_sidecar.wait_audit(lambda r: r["path"] == "/reset-mid-body")
    assert record["reason"] == "upstream_mid_body"  # a short code, as metrics and docs promise
    assert curl(faulty_sidecar, url(faulty, "/ok")).status == 204


def test_an_upstream_reset_inside_a_small_body_is_a_clean_502(faulty_sidecar, faulty):
    """Small bodies are read whole before the answer starts, so the client gets a 502 naming
    the failure rather than a truncated 200."""
    reply = curl(faulty_sidecar, url(faulty, "/reset-small-body"))
    assert reply.status == 502
    assert "before sending the whole response" in reply.body
    record = faulty_sidecar.wait_audit(lambda r: r["path"] == "/reset-small-body")
    assert (record["reason"], record["status"]) == ("upstream_mid_body", 502)


def test_an_upstream_that_never_answers_is_a_504(faulty_sidecar, faulty):
    started = time.monotonic()
    reply = curl(faulty_sidecar, url(faulty, "/stall"))
    assert reply.status == 504
    assert "did not answer in time" in reply.body
    assert time.monotonic() - started < 10


def test_an_upstream_that_answers_garbage_is_a_502(faulty_sidecar, faulty):
    reply = curl(faulty_sidecar, url(faulty, "/garbage"))
    assert reply.status == 502
    assert API_TOKEN not in reply.everything()


def test_a_name_that_does_not_resolve_is_a_502_naming_it(faulty_sidecar):
    reply = curl(faulty_sidecar, "http://nxdomain.routed.invalid/x")
    assert reply.status == 502
    assert "cannot resolve nxdomain.routed.invalid" in reply.body


# -- files that change under the proxy ---------------------------------------------------------

def test_an_emptied_secret_is_refused_and_the_last_good_value_serves(make_sidecar, upstream, marker):
    proc = make_sidecar()
    (proc.secrets_dir / "api-credentials" / "token").write_text("")
    proc.wait_for_log("the value is empty; write the key into this file")
    curl(proc, f"https://api.routed.test/{marker}")
    assert upstream.one(marker).header("Authorization") == [f"Bearer {API_TOKEN}"]


def test_a_secret_turned_into_a_folder_is_refused(make_sidecar, upstream, marker):
    proc = make_sidecar()
    token = proc.secrets_dir / "api-credentials" / "token"
    token.unlink()
    token.mkdir()
    proc.wait_for_log("is a folder, expected a file")
    curl(proc, f"https://api.routed.test/{marker}")
    assert upstream.one(marker).header("Authorization") == [f"Bearer {API_TOKEN}"]


def test_a_secret_swapped_mid_request_serves_old_then_new(make_sidecar, upstream, marker):
    proc = make_sidecar()
    with subprocess.Popen(["curl", "-sSN", f"https://api.routed.test/sse?n=6&delay=0.4&m={marker}"],
                          env=proc.client_env(), stdout=subprocess.PIPE) as streaming:
        upstream.wait_for(f"m={marker}")  # the stream is under way with the old value
        (proc.secrets_dir / "api-credentials" / "token").write_text("sk-swapped-NEW-VALUE-9999\n")
        proc.wait_for_log("reloaded configuration")
        events = streaming.stdout.read().count(b"data:")
    assert streaming.returncode == 0 and events == 6  # the request in flight finished untouched
    assert upstream.one(f"m={marker}").header("Authorization") == [f"Bearer {API_TOKEN}"]
    curl(proc, f"https://api.routed.test/{marker}-after")
    assert upstream.one(f"{marker}-after").header("Authorization") == ["Bearer sk-swapped-NEW-VALUE-9999"]


def test_a_corrupt_ca_at_reload_is_refused_and_signing_continues(make_sidecar, marker, upstream):
    proc = make_sidecar()
    assert proc.bundle.exists()  # the client trusts the CA as it was
    (proc.workdir / "ca" / "tls.crt").write_text("garbage")
    proc.wait_for_log("cannot be used")
    assert curl(proc, f"https://api.routed.test/{marker}").status == 200  # old CA still signs


def test_a_valid_file_naming_a_missing_secret_is_refused_naming_it(make_sidecar, upstream, marker):
    """The file now says to use another Secret, which is not there yet: the old one is not
    what the user asked for any more, so the host is refused (503) until it appears."""
    proc = make_sidecar()
    write_injections(proc.injections, [injection(
        "api", hosts=["api.routed.test"],
        headers=[{"name": "Authorization", "valueFrom": ref("brand-new", "token")}])])
    proc.wait_for_log("Secret 'brand-new' not found")
    reply = curl(proc, f"https://api.routed.test/{marker}")
    assert reply.status == 503
    assert reply.header("X-Keyhole-Error") == "secret_unavailable"
    assert "injection 'api' is unavailable: Secret 'brand-new' is missing" in reply.body
    assert upstream.find(marker) == []
    (proc.secrets_dir / "brand-new").mkdir()
    (proc.secrets_dir / "brand-new" / "token").write_text("sk-brand-NEW-0000111\n")
    proc.wait_for_log("reloaded configuration: 1 injection(s): api\n")
    curl(proc, f"https://api.routed.test/{marker}-new")
    assert upstream.one(f"{marker}-new").header("Authorization") == ["sk-brand-NEW-0000111"]


# -- clients that hold connections ----------------------------------------------------------------

def test_ten_thousand_idle_connections_and_slowloris_do_not_stop_service(make_sidecar, upstream,
                                                                        marker):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    proc = make_sidecar(args=["--header-timeout", "3"])
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    try:
        for _ in range(10_000):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", proc.proxy_port))
            idle.append(sock)
        for _ in range(100):  # slowloris: a request head, one byte at a time
            sock = socket.create_connection(("127.0.0.1", proc.proxy_port))
            sock.sendall(b"GET http://api.routed.test/ HTTP/1.1\r\nX-Slow: ")
            slow.append(sock)
        started = time.monotonic()
        reply = curl(proc, f"https://api.routed.test/{marker}")
        assert reply.status == 200
        assert time.monotonic() - started < 5
        assert upstream.one(marker).header("Authorization") == [f"Bearer {API_TOKEN}"]
        for sock in slow[:10]:  # the header timeout (3 s) closes the slow senders
            sock.settimeout(30)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        assert proc.process.poll() is None
        assert curl(proc, f"https://api.routed.test/{marker}-later").status == 200
    finally:
        for sock in idle + slow:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
