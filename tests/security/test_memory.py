"""A closed connection is freed when it closes, by reference counting — never left in a cycle.

Issue 30 measured RSS climbing under load (80 → 118 MB in 10 minutes of HTTP/1.1 through
CONNECT; the HTTP/2 and mixed soaks likewise). The cause: every intercepted connection closed
into a reference cycle (the protocol and its llhttp parser; the connection's life and its TLS
transport; h2's table of frame handlers; a tunnel's self-scheduling idle check) holding its TLS
buffers, and the cycle collector frees long-lived garbage only now and then. Here the real
sidecar runs with the collector off (tests/support/gc_probe.py), serves every kind of
connection — HTTP/1.1 and HTTP/2 through CONNECT, base-URL, h2c, an HTTP/2 upstream, a blind
tunnel, a WebSocket, refusals, malformed requests — and, once every connection has closed,
the garbage a collection finds must hold nothing of them. (Growth over time is bench's:
``python -m bench.soak``.)
"""

from __future__ import annotations

import json
import ssl
import time

import httpx
import pytest

from tests.integration.clients import curl, websocket
from tests.support.config import INJECTIONS, SECRETS, injection, ref, resolve_all
from tests.support.raw import exchange
from tests.support.sidecar import start_sidecar

# What a connection is made of: none may be found in the garbage.
CONNECTION_PARTS = {
    "ClientConnection", "H2ClientConnection", "Life", "FrontDoor", "Pending", "BlindTunnel",
    "UpstreamConnection", "H2Upstream", "H2Connection", "H2Stream", "HttpRequestParser",
    "HttpResponseParser", "SSLProtocol", "_SSLProtocolTransport", "SSLObject", "MemoryBIO",
    "TCPTransport", "Reply", "H2Reply", "H2Body", "StreamReader",
}


@pytest.fixture(scope="module")
def probed(tmp_path_factory, upstream, plain_upstream, h2_upstream):
    injections = [*INJECTIONS, injection(
        "h2", hosts=[f"h2.routed.test:{h2_upstream.port}"],
        headers=[{"name": "Authorization", "valueFrom": ref("api-credentials", "token")}])]
    sidecar = start_sidecar(
        tmp_path_factory.mktemp("gc-probe"), injections, SECRETS,
        resolve=[*resolve_all(upstream.port), f"plain.unrouted.test:{plain_upstream.port}:127.0.0.1",
                 f"h2.routed.test:{h2_upstream.port}:127.0.0.1"],
        upstream_ca=upstream.ca_file, module="tests.support.gc_probe")
    yield sidecar
    sidecar.stop()


def garbage(sidecar) -> dict[str, int]:
    """Collect once in the sidecar; what the collection found, by type."""
    answer = sidecar.workdir / "gc.json"
    answer.unlink(missing_ok=True)
    (sidecar.workdir / "gc.ask").touch()
    deadline = time.monotonic() + 30
    while not answer.exists():
        assert time.monotonic() < deadline, "the probe did not answer"
        time.sleep(0.05)
    return json.loads(answer.read_text())


def wait_all_closed(sidecar) -> None:
    deadline = time.monotonic() + 20
    while sidecar.metric("keyhole_open_connections") != 0:
        assert time.monotonic() < deadline, "connections still open"
        time.sleep(0.05)


def test_every_kind_of_connection_is_freed_when_it_closes(probed, plain_upstream, h2_upstream,
                                                          marker):
    garbage(probed)  # what start-up left (imports, argparse) is not the point
    verify = ssl.create_default_context(cafile=str(probed.ca_cert))
    for _ in range(3):
        curl(probed, f"https://api.routed.test/reflect?m={marker}")  # HTTP/1.1, CONNECT
        curl(probed, f"https://api.routed.test/sse?m={marker}&n=2&delay=0", http2=True)
        curl(probed, f"{probed.url}/api/v1/models?m={marker}")  # base-URL
        curl(probed, "--http2-prior-knowledge", f"{probed.url}/api/v1/models?m={marker}")
        curl(probed, "-p", "-x", probed.url,  # a blind tunnel to an unrouted host
             f"http://plain.unrouted.test:{plain_upstream.port}/{marker}")
        curl(probed, "-X", "DELETE", f"https://rules.routed.test/v1/models/x?m={marker}")
        with httpx.Client(http2=True, proxy=probed.url, verify=verify, trust_env=False) as c:
            assert c.post(f"https://h2.routed.test:{h2_upstream.port}/{marker}",
                          content=b"x" * 70_000).status_code == 200  # an HTTP/2 upstream
        websocket(probed, f"wss://api.routed.test/ws?m={marker}")
        exchange(probed.proxy_port, b"GET http://api.routed.test/ HTTP/1.1\r\nX: a\0b\r\n\r\n")
    wait_all_closed(probed)
    found = garbage(probed)
    left = {name: count for name, count in found.items() if name in CONNECTION_PARTS}
    assert not left, f"closed connections left in cycles: {left} (all garbage: {found})"
