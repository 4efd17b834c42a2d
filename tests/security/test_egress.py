"""Egress and SSRF: the proxy refuses to connect to loopback (the pod's own ports: the admin
port, other sidecars), link-local (cloud metadata) and other dangerous addresses, however they
are spelled, in passthrough and deny modes. A real listener on 127.0.0.1 records whether the
proxy connected at all."""

from __future__ import annotations

import socket
import threading

import pytest

from keyhole_sidecar.egress import Egress, EgressPolicy, TargetRefused
from tests.support.config import SECRETS, injection, ref
from tests.support.raw import exchange, status_of


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that counts the connections it accepts."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def run():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(conn)
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


# Spellings of 127.0.0.1 that a naive string check would miss.
LOOPBACK_SPELLINGS = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1",
                      "[::ffff:127.0.0.1]", "[::1]", "localhost"]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_connect_to_the_pods_loopback_is_refused_however_it_is_spelled(sidecar, listener, host):
    port, accepted = listener
    answer = exchange(sidecar.proxy_port, f"CONNECT {host}:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status_of(answer) == 403, answer
    assert b"loopback address" in answer
    assert accepted == []


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "[::ffff:127.0.0.1]"])
def test_plain_http_to_loopback_is_refused(sidecar, listener, host):
    port, accepted = listener
    answer = exchange(sidecar.proxy_port, (f"GET http://{host}:{port}/metrics HTTP/1.1\r\n"
                                           "Host: x\r\nConnection: close\r\n\r\n").encode())
    assert status_of(answer) in (400, 403)  # refused as loopback, or as no valid host at all
    assert accepted == []


def test_the_admin_port_is_not_reachable_through_the_proxy(sidecar):
    answer = exchange(sidecar.proxy_port, (f"GET http://127.0.0.1:{sidecar.admin_port}/metrics "
                                           "HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode())
    assert status_of(answer) == 403
    assert b"keyhole_requests_total" not in answer


@pytest.mark.parametrize("target", ["169.254.169.254:80", "[fe80::1]:80",
                                    "[::ffff:169.254.169.254]:80", "2852039166:80"])
def test_cloud_metadata_and_link_local_are_refused(sidecar, target):
    """Refused before any packet leaves: these addresses are never connected to."""
    answer = exchange(sidecar.proxy_port, f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status_of(answer) == 403
    assert b"link-local address" in answer


def test_with_unmatched_deny_unrouted_targets_are_refused_first(deny_sidecar, listener):
    port, accepted = listener
    answer = exchange(deny_sidecar.proxy_port,
                      f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status_of(answer) == 403
    assert accepted == []


def test_a_routed_host_that_resolves_to_loopback_never_gets_the_secret(make_sidecar, listener):
    """A routed name whose DNS answer is the pod's loopback (DNS rebinding, a bad entry):
    the secret is not sent there."""
    port, accepted = listener
    proc = make_sidecar([injection("local", hosts=[f"localhost:{port}"],
                                   headers=[{"name": "X-Key", "valueFrom": ref("rules", "key")}])],
                        SECRETS)
    answer = exchange(proc.proxy_port, (f"GET http://localhost:{port}/ HTTP/1.1\r\nHost: x\r\n"
                                        "Connection: close\r\n\r\n").encode())
    assert status_of(answer) == 403
    assert accepted == []


def test_egress_any_connects_where_told(make_sidecar, listener):
    """The switch is what refuses: with --egress any the same request does connect."""
    port, accepted = listener
    proc = make_sidecar(args=["--egress", "any"])
    exchange(proc.proxy_port, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
             timeout=1)
    assert len(accepted) == 1


def test_resolve_pins_are_trusted(sidecar, upstream, marker):
    """--resolve is the operator's own choice: api.routed.test → 127.0.0.1 works (every other
    test depends on it)."""
    from tests.integration.clients import curl

    assert curl(sidecar, f"https://api.routed.test/{marker}").status == 200


@pytest.mark.parametrize(("mode", "address", "allowed"), [
    (Egress.PRIVATE, "10.1.2.3", True), (Egress.PUBLIC, "10.1.2.3", False),
    (Egress.PUBLIC, "100.64.0.1", False), (Egress.PRIVATE, "8.8.8.8", True),
    (Egress.PRIVATE, "169.254.169.254", False), (Egress.PRIVATE, "::ffff:169.254.169.254", False),
    (Egress.PRIVATE, "fd00::1", True), (Egress.PUBLIC, "fd00::1", False),
    (Egress.PRIVATE, "0.0.0.0", False), (Egress.PRIVATE, "224.0.0.1", False),
    (Egress.PRIVATE, "240.0.0.1", False), (Egress.ANY, "127.0.0.1", True),
])
def test_the_egress_policy_by_mode(mode, address, allowed):
    """Addresses judged without connecting anywhere (no traffic leaves this machine)."""
    policy = EgressPolicy(mode)
    if allowed:
        policy.check("h", address)
    else:
        with pytest.raises(TargetRefused):
            policy.check("h", address)
