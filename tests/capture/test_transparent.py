"""Transparent capture with real rules, real sockets and real clients that are told about no
proxy at all: every client gets its key; unrouted traffic passes untouched; hostile tricks hold.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from tests.capture.conftest import (
    GRPC_SECRET,
    HOST_IP,
    HOST_IP6,
    MCP_SECRET,
    NS,
    OWN_SERVER_IP,
    SECRET,
    in_namespace,
    world_readable_copy,
)
from tests.integration.clients import CLIENTS, NODE24

BEARER = f"Bearer {SECRET}"


def _marker() -> str:
    return uuid.uuid4().hex[:12]


def _python() -> str:
    import sys

    return sys.executable


# Each client as an agent would run it: the URL only, no proxy, the CA from the environment.
def _clients(go_binary) -> dict[str, callable]:
    py = _python()
    return {
        "curl": lambda url: ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url],
        "node fetch": lambda url: ["node", "-e",
                                   "fetch(process.argv[1]).then(r => console.log(r.status))", url],
        "node 24 fetch": lambda url: [str(NODE24), "-e",
                                      "fetch(process.argv[1]).then(r => console.log(r.status))",
                                      url],
        "node https.get": lambda url: ["node", "-e", (
            "require('https').get(process.argv[1], r => { console.log(r.statusCode); "
            "r.resume(); })"), url],
        "node-fetch": lambda url: ["node", "--input-type=module", "-e", (
            "import fetch from 'node-fetch'; const r = await fetch(process.argv[1]); "
            "console.log(r.status)"), url],
        "python requests": lambda url: [py, "-c", "import requests, sys; "
                                        "print(requests.get(sys.argv[1]).status_code)", url],
        "python httpx": lambda url: [py, "-c", "import httpx, sys; "
                                     "print(httpx.get(sys.argv[1]).status_code)", url],
        "python aiohttp": lambda url: [py, "-c", (
            "import asyncio, aiohttp, sys\n"
            "async def main():\n"
            "    async with aiohttp.ClientSession() as session:\n"
            "        async with session.get(sys.argv[1]) as response:\n"
            "            print(response.status)\n"
            "asyncio.run(main())"), url],
        "go net/http": lambda url: [str(go_binary), "GET", url],
        "java HttpClient": lambda url: ["java", str(CLIENTS / "Fetch.java"), "GET", url],
    }


def _status(client: str, output: str) -> int:
    line = output.strip().splitlines()[-1]
    return json.loads(line)["status"] if line.startswith("{") else int(line)


@pytest.fixture(scope="module")
def go_binary(capture, go_client):
    return world_readable_copy(go_client, capture.shared)


@pytest.fixture(scope="module")
def clients(go_binary):
    return _clients(go_binary)


@pytest.mark.parametrize("client", ["curl", "node fetch", "node 24 fetch", "node https.get",
                                    "node-fetch",
                                    "python requests", "python httpx", "python aiohttp",
                                    "go net/http", "java HttpClient"])
def test_every_client_gets_its_key_with_no_proxy_variable(capture, clients, client):
    marker = _marker()
    done = capture.agent(*clients[client](f"https://api.routed.test/v1/{marker}"), cwd=CLIENTS)
    assert done.returncode == 0, done.stderr
    assert _status(client, done.stdout) == 200
    assert capture.upstream.one(marker).header("authorization") == [BEARER]
    assert SECRET not in done.stdout + done.stderr
    line = capture.wait_audit(lambda a: marker in a["path"])
    assert line["mode"] == "transparent" and line["decision"] == "injected"


def test_a_grpc_client_gets_its_key_with_no_proxy_variable(capture, grpc_go_client):
    """grpc-go, told nothing of a proxy: the ClientHello's name routes it, ALPN gives it h2,
    and all four kinds of call carry the key."""
    binary = world_readable_copy(grpc_go_client, capture.shared)
    marker = _marker()
    done = capture.agent(str(binary), "grpc.routed.test:443", marker)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["unary"] == "unary:hello" and result["bidi"] == ["echo:x", "echo:y"]
    assert result["unary_trailer"]["x-echo-authorization"] == "[REDACTED]"
    calls = capture.grpc.find(marker)
    assert len(calls) == 5
    assert {c.metadata["authorization"] for c in calls} == {f"Bearer {GRPC_SECRET}"}
    assert GRPC_SECRET not in done.stdout + done.stderr
    line = capture.wait_audit(lambda a: a["path"] == "/echo.Echo/Chat")
    assert (line["mode"], line["protocol"], line["injection"]) == ("transparent", "h2", "grpc")


def test_git_gets_its_key(capture):
    marker = _marker()
    done = capture.agent("git", "ls-remote", f"https://api.routed.test/{marker}/repo.git")
    seen = capture.upstream.find(marker)  # git fails on the echo's answer; its requests count
    assert seen and all(r.header("authorization") == [BEARER] for r in seen)
    assert all(r.header("user-agent")[0].startswith("git/") for r in seen)
    assert SECRET not in done.stdout + done.stderr


def s_client(capture, marker: str, host_header: str = "api.routed.test", *, sni: bool = True,
             connect: str = "api.routed.test:443", ca: str | None = None):
    """A raw request through ``openssl s_client`` (the agent's own TLS, its own bytes)."""
    request = f"GET /{marker} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n"
    name = ["-servername", "api.routed.test"] if sni else ["-noservername"]
    return capture.agent("openssl", "s_client", "-quiet", "-connect", connect, *name, "-CAfile",
                         ca or capture.env["SSL_CERT_FILE"], input=request)


def test_openssl_s_client_gets_its_key(capture):
    marker = _marker()
    done = s_client(capture, marker)
    assert "HTTP/1.1 200" in done.stdout, done.stderr
    assert capture.upstream.one(marker).header("authorization") == [BEARER]


def test_plain_http_to_a_routed_host_is_sent_over_https_with_the_key(capture):
    marker = _marker()
    done = capture.agent("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                         f"http://api.routed.test/{marker}")
    assert done.stdout == "200", done.stderr
    seen = capture.upstream.one(marker)  # the HTTPS upstream, not the plain one
    assert seen.header("authorization") == [BEARER]
    assert capture.upstream.plain.find(marker) == []


def test_an_unrouted_host_is_passed_through_with_its_own_certificate(capture):
    marker = _marker()
    # Trusting only the upstream's own CA: a keyhole leaf would fail this handshake.
    done = capture.agent("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
                         capture.upstream.ca_file, f"https://unrouted.test/{marker}")
    assert done.stdout == "200", done.stderr
    assert capture.upstream.one(marker).header("authorization") == []
    line = capture.wait_audit(lambda a: a["host"] == "unrouted.test:443"
                              and a["decision"] == "passthrough")
    assert line["mode"] == "transparent"
    plain = _marker()
    done = capture.agent("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                         f"http://unrouted.test/{plain}")
    assert done.stdout == "200"
    assert capture.upstream.plain.one(plain).header("authorization") == []


# -- hostile -------------------------------------------------------------------------------------

def test_a_routed_name_sent_to_the_agents_own_server_never_reaches_it(capture):
    """The agent dials its own address with the routed SNI: the sidecar dials the *name*."""
    marker = _marker()
    before = len(capture.own_server.connections)
    done = capture.agent("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--resolve",
                         f"api.routed.test:443:{OWN_SERVER_IP}",
                         f"https://api.routed.test/{marker}")
    assert done.stdout == "200", done.stderr
    assert len(capture.own_server.connections) == before  # nothing reached the agent's server
    assert capture.upstream.one(marker).header("authorization") == [BEARER]


def test_an_inner_host_that_differs_from_the_sni_is_refused(capture):
    marker = _marker()
    done = s_client(capture, marker, host_header="other.routed.test")
    assert "HTTP/1.1 421" in done.stdout
    assert capture.upstream.find(marker) == []


def test_a_client_hello_without_sni_is_passed_through_untouched(capture):
    marker = _marker()
    done = s_client(capture, marker, sni=False, connect=f"{HOST_IP}:443",
                    ca=capture.upstream.ca_file)
    assert "HTTP/1.1 200" in done.stdout, done.stderr  # the upstream's own certificate
    assert capture.upstream.one(marker).header("authorization") == []


_SPLIT_HELLO = r"""
import socket, ssl, sys, time
context = ssl.create_default_context(cafile=sys.argv[1])
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = context.wrap_bio(incoming, outgoing, server_hostname="api.routed.test")
sock = socket.create_connection(("api.routed.test", 443))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
first = True
while True:
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        data = outgoing.read()
        if first:  # the ClientHello, 7 bytes per TCP segment
            for i in range(0, len(data), 7):
                sock.send(data[i:i + 7]); time.sleep(0.002)
            first = False
        else:
            sock.sendall(data)
        incoming.write(sock.recv(65536))
sock.sendall(outgoing.read())
tls.write(f"GET /{sys.argv[2]} HTTP/1.1\r\nHost: api.routed.test\r\nConnection: close\r\n\r\n".encode())
sock.sendall(outgoing.read())
answer = b""
while b"\r\n" not in answer:
    incoming.write(sock.recv(65536))
    try:
        answer += tls.read()
    except ssl.SSLWantReadError:
        pass
print(answer.split(b"\r\n")[0].decode())
"""


def test_a_client_hello_split_over_many_segments(capture):
    marker = _marker()
    done = capture.agent(_python(), "-c", _SPLIT_HELLO, capture.env["SSL_CERT_FILE"], marker)
    assert done.stdout.strip() == "HTTP/1.1 200 OK", done.stderr
    assert capture.upstream.one(marker).header("authorization") == [BEARER]


def test_the_sidecars_own_uid_is_not_captured(capture):
    """UID 0 runs the sidecar here: its traffic goes straight out, so the sidecar never
    loops into itself — and a root client gets no key (the port is what grants it)."""
    marker = _marker()
    done = subprocess.run(in_namespace("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                       "--cacert", capture.upstream.ca_file,
                                       f"https://api.routed.test/{marker}"),
                          capture_output=True, text=True, timeout=30)
    assert done.stdout == "200", done.stderr
    assert capture.upstream.one(marker).header("authorization") == []
    assert not [a for a in capture.audit() if marker in a.get("path", "")]


def _rules() -> str:
    return subprocess.run(in_namespace("iptables-save", "-t", "nat"), capture_output=True,
                          text=True, check=True).stdout


def test_keyhole_init_run_twice_installs_each_rule_once(capture):
    first = _rules()
    again = subprocess.run(in_namespace(str(_keyhole_init()), "--uid-owner-exempt", "0"),
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    second = _rules()
    assert second.count("-A OUTPUT -p tcp -j KEYHOLE_CAPTURE") == 1
    assert [r for r in second.splitlines() if r.startswith("-A KEYHOLE")] == \
        [r for r in first.splitlines() if r.startswith("-A KEYHOLE")]
    assert "REDIRECT --to-ports 15081" in again.stdout  # it prints what it installed


def _keyhole_init():
    import sys
    from pathlib import Path

    return Path(sys.executable).with_name("keyhole-init")


def _ipv6_resets() -> int:
    counters = subprocess.run(in_namespace("ip6tables", "-L", "KEYHOLE_CAPTURE", "-v", "-n",
                                           "-x"), capture_output=True, text=True).stdout
    return int(next(line for line in counters.splitlines() if "REJECT" in line).split()[0])


def test_ipv6_is_reset_rather_than_going_around_the_sidecar(capture):
    before = _ipv6_resets()
    done = capture.agent("curl", "-sS", "-6", "--max-time", "5", f"https://[{HOST_IP6}]:443/")
    assert done.returncode == 7, done.stderr  # refused at once: no timeout, no bypass
    assert _ipv6_resets() == before + 1  # by keyhole's rule (root, the sidecar, is exempt)
    assert "IPv6 is not captured" in capture.init_output


def test_unrouted_traffic_is_reset_under_deny(capture):
    capture.start_sidecar("--unmatched", "deny")
    try:
        marker = _marker()
        done = capture.agent("curl", "-sS", "--cacert", capture.upstream.ca_file,
                             f"https://unrouted.test/{marker}")
        assert done.returncode != 0
        assert capture.upstream.find(marker) == []
        routed = _marker()
        ok = capture.agent("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                           f"https://api.routed.test/{routed}")
        assert ok.stdout == "200"
    finally:
        capture.start_sidecar()


def test_the_namespace_is_the_tests_own(capture):
    """Nothing here has a route off the machine: only the veth's own subnet."""
    routes = subprocess.run(["ip", "-n", NS, "route"], capture_output=True, text=True).stdout
    assert "default" not in routes


_TWO_PLAIN_REQUESTS = r"""
import socket, sys
sock = socket.create_connection(("api.routed.test", 80))
marker = sys.argv[1]
for host in ("api.routed.test", "other.routed.test"):
    sock.sendall(f"GET /{marker} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    lines = head.split(b"\r\n")
    length = int(next(x.split(b":")[1] for x in lines if x.lower().startswith(b"content-length")))
    body = head.split(b"\r\n\r\n", 1)[1]
    while len(body) < length:
        body += sock.recv(65536)
    print(head.split(b"\r\n")[0].decode())
"""


def test_a_plain_connection_keeps_the_host_its_first_request_named(capture):
    """On one captured plain-HTTP connection the first Host decided the route, as a CONNECT
    authority: a later request for another host is refused, not sent with the first's key."""
    marker = _marker()
    done = capture.agent(_python(), "-c", _TWO_PLAIN_REQUESTS, marker)
    assert done.stdout.splitlines() == ["HTTP/1.1 200 OK", "HTTP/1.1 421 Misdirected Request"], \
        done.stderr
    assert [r.header("host") for r in capture.upstream.find(marker)] == [["api.routed.test"]]


@pytest.mark.parametrize("http2", [False, True], ids=["http/1.1", "h2"])
def test_a_compressed_body_is_forwarded_as_it_came(capture, http2):
    """Transparent capture hands its connections to the same owners as CONNECT: a gzip body
    arriving in pieces after its head reaches the upstream as the client's bytes, under the
    client's label (the upstream decodes it to what the client compressed), and no request its
    decoded form holds is ever read upstream (tests/security/test_body_fidelity.py has every
    encoding and framing through the proxy port)."""
    import gzip
    import hashlib
    import os

    marker = _marker()
    plain = (b'{"x":"' + os.urandom(100_000).hex().encode() + b'"}' +
             f"GET /smuggled-{marker} HTTP/1.1\r\nHost: api.routed.test\r\n\r\n".encode() * 4)
    body = capture.shared / f"{marker}.gz"
    body.write_bytes(gzip.compress(plain))
    body.chmod(0o644)
    done = capture.agent("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                         "--http2" if http2 else "--http1.1", "-H", "Content-Encoding: gzip",
                         "--data-binary", f"@{body}", f"https://api.routed.test/{marker}")
    assert done.stdout == "200", done.stderr
    seen = capture.upstream.one(marker)
    assert seen.header("content-encoding") == ["gzip"]
    assert seen.body_sha256 == hashlib.sha256(plain).hexdigest()  # decoded by the upstream
    assert capture.upstream.find(f"smuggled-{marker}") == []


def test_an_mcp_agent_with_no_proxy_variable_is_governed_per_tool(capture):
    """The official Python SDK in the namespace, knowing nothing of keyhole: its tools/list
    holds only what spec.mcp allows, a refused call is a tool error and never reaches the
    server, and the allowed call carries the key."""
    agent = capture.shared / "mcp_agent.py"
    agent.write_text((CLIENTS / "mcp_agent.py").read_text())
    agent.chmod(0o644)
    done = capture.agent(_python(), str(agent), "https://mcp.routed.test/mcp", json.dumps(
        [["get_issue", {"number": 3}], ["delete_repository", {"name": "prod"}]]))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["tools"] == ["get_file_contents", "get_issue", "get_whoami", "list_issues"]
    allowed, refused = answer["results"]
    assert not allowed["isError"] and "issue 3" in allowed["text"]
    assert refused["isError"] and "keyhole" in refused["text"]
    received = [json.loads(line) for line in capture.mcp_record.read_text().splitlines()]
    assert "delete_repository" not in "".join(entry["body"] for entry in received)
    assert {entry["authorization"] for entry in received} == {f"Bearer {MCP_SECRET}"}
    assert capture.wait_audit(lambda r: r["mode"] == "transparent"
                              and any(c.get("tool") == "delete_repository"
                                      for c in r.get("mcp") or []))["decision"] == "denied"


@pytest.mark.parametrize("provider", ["claude", "aws", "gcp", "entra", "tokenExchange"])
def test_a_federated_provider_is_reached_with_no_key_and_no_proxy_variable(capture, provider):
    """Workload identity under transparent capture: the agent dials the API's name; the
    sidecar exchanges the identity token at the provider's stand-in (which verifies it
    against the issuer's JWKS) and injects what it answered, over HTTP/1.1 and HTTP/2."""
    from tests.support import federation

    _, url = federation.injection_for(provider, lambda host: host)
    before = capture.federation.count(provider)
    for version in ("--http1.1", "--http2"):
        done = capture.agent("curl", "-sS", version, "--max-time", "20", url)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert "[REDACTED]" in answer["you_sent"], answer  # accepted, and masked coming back
    assert capture.federation.count(provider) - before == 1  # one exchange served both
    assert capture.federation.exchanges, "the stand-in saw the identity"
    output = capture.output()
    for token in capture.federation.issued:
        assert token.value not in output
