"""An agent trying to get the key back, one trick per test, against the real sidecar. Each
test would fail if the invariant it guards were broken (docs/security.md maps them)."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import sys
import time

import pytest
import trustme

from tests.integration.clients import curl
from tests.support.config import (
    ALL_SECRETS,
    API_TOKEN,
    MAPS_KEY,
    RULES_KEY,
    SECRETS,
    injection,
    ref,
)
from tests.support.raw import exchange, open_tunnel, read_all, status_of
from tests.support.upstream import UpstreamServer


def leaked(text: str | bytes) -> list[str]:
    """Which secrets (raw or base64) appear in ``text``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [s for s in ALL_SECRETS if s in text or base64.b64encode(s.encode()).decode() in text]


# -- client-sent credentials are dropped, never merged -------------------------------------

def test_client_sent_authorization_is_replaced_not_merged(sidecar, upstream, marker):
    curl(sidecar, "-H", "Authorization: Bearer agent-guess", f"https://api.routed.test/{marker}")
    assert upstream.one(marker).header("Authorization") == [f"Bearer {API_TOKEN}"]


def test_a_stripped_header_never_reaches_the_upstream(make_sidecar, upstream, marker):
    """``stripHeaders``: a placeholder an SDK sends beside the injected credential is dropped,
    in every case of its name; other headers pass."""
    proxy = make_sidecar([injection("api", hosts=["api.routed.test"], stripHeaders=[
        "X-Placeholder-Token"], headers=[{"name": "Authorization", "valueFrom": ref(
            "api-credentials", "token"), "format": "Bearer {value}"}])])
    curl(proxy, "-H", "x-placeholder-token: sk-placeholder", "-H", "X-Kept: yes",
         f"https://api.routed.test/{marker}")
    seen = upstream.one(marker)
    assert seen.header("X-Placeholder-Token") == [] and seen.header("X-Kept") == ["yes"]
    assert seen.header("Authorization") == [f"Bearer {API_TOKEN}"]


def test_an_injected_header_sent_twice_by_the_client_arrives_once(sidecar, upstream, marker):
    exchange(sidecar.proxy_port, (
        f"GET http://api.routed.test/{marker} HTTP/1.1\r\nHost: api.routed.test\r\n"
        "Authorization: one\r\nauthorization: two\r\nConnection: close\r\n\r\n").encode())
    assert upstream.one(marker).header("Authorization") == [f"Bearer {API_TOKEN}"]


def test_client_sent_values_of_an_injected_query_parameter_are_dropped(sidecar, upstream, marker):
    curl(sidecar, f"https://query.routed.test/{marker}?key=mine&a=1&%6bey=encoded&key=again")
    assert upstream.one(marker).path == f"/{marker}?a=1&key={MAPS_KEY}"


def test_proxy_headers_are_never_forwarded(sidecar, upstream, marker):
    exchange(sidecar.proxy_port, (
        f"GET http://api.routed.test/{marker} HTTP/1.1\r\nHost: api.routed.test\r\n"
        "Proxy-Authorization: Basic abc\r\nProxy-Connection: keep-alive\r\n"
        "Proxy-Anything: x\r\nConnection: close\r\n\r\n").encode())
    names = {name.lower() for name, _ in upstream.one(marker).headers}
    assert not any(name.startswith("proxy-") for name in names)


def test_proxy_headers_are_not_forwarded_to_unrouted_hosts_either(sidecar, plain_upstream, marker):
    curl(sidecar, "-H", "Proxy-Authorization: Basic abc",
         f"http://plain.unrouted.test:{plain_upstream.port}/{marker}")
    names = {name.lower() for name, _ in plain_upstream.one(marker).headers}
    assert not any(name.startswith("proxy-") for name in names)


# -- the CONNECT authority decides -----------------------------------------------------------

def _tunnel_request(sidecar, authority: str, request: bytes, ca: str | None = None) -> bytes:
    with open_tunnel(sidecar.proxy_port, authority, ca or str(sidecar.ca_cert)) as tls:
        tls.sendall(request)
        return read_all(tls)


def test_an_inner_host_that_differs_from_the_connect_authority_is_refused(sidecar, upstream,
                                                                          marker):
    answer = _tunnel_request(sidecar, "api.routed.test:443", (
        f"GET /{marker} HTTP/1.1\r\nHost: unrouted.test\r\nConnection: close\r\n\r\n").encode())
    assert status_of(answer) == 421
    assert upstream.find(marker) == []


def test_an_inner_absolute_url_for_another_host_is_refused(sidecar, upstream, marker):
    answer = _tunnel_request(sidecar, "api.routed.test:443", (
        f"GET https://unrouted.test/{marker} HTTP/1.1\r\nHost: api.routed.test\r\n"
        "Connection: close\r\n\r\n").encode())
    assert status_of(answer) == 421
    assert upstream.find(marker) == []


def test_sni_naming_another_host_does_not_change_the_route(sidecar, upstream, marker):
    """The leaf is for the CONNECT authority, whatever SNI says: a client asking for another
    name gets a certificate it rejects, and nothing is sent anywhere."""
    with pytest.raises(ssl.SSLCertVerificationError), open_tunnel(
        sidecar.proxy_port, "api.routed.test:443", str(sidecar.ca_cert),
        server_hostname="unrouted.test",
    ) as tls:
        tls.sendall(f"GET /{marker} HTTP/1.1\r\nHost: api.routed.test\r\n\r\n".encode())
    assert upstream.find(marker) == []


# -- redirects are never followed -------------------------------------------------------------

def test_a_redirect_goes_back_to_the_client_and_is_not_followed(sidecar, upstream, marker):
    target = f"https://unrouted.test/{marker}-followed"
    reply = curl(sidecar, f"https://api.routed.test/redirect?to={target}&m={marker}")
    assert reply.status == 302
    assert dict(reply.headers)["Location"] == target
    assert [r for r in upstream.received if r.path.startswith(f"/{marker}-followed")] == []


# -- secrets never come back ------------------------------------------------------------------

@pytest.mark.parametrize("where", ["body", "header", "cookie", "location", "www-auth", "error"])
@pytest.mark.parametrize("form", ["raw", "value", "b64", "b64-offset", "url"])
def test_an_echoed_secret_is_redacted(sidecar, upstream, marker, where, form):
    reply = curl(sidecar, f"https://api.routed.test/reflect?where={where}&form={form}&m={marker}")
    assert upstream.one(marker)  # the upstream did receive (and reflect) the credential
    assert leaked(reply.everything()) == []
    assert "[REDACTED]" in reply.everything()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_secret_echoed_in_a_compressed_body_is_redacted(sidecar, upstream, marker, encoding):
    reply = curl(sidecar, "--compressed",
                 f"https://api.routed.test/reflect?enc={encoding}&m={marker}")
    assert reply.status == 200
    assert "you sent: [REDACTED] (end)" in reply.body
    assert leaked(reply.everything()) == []


@pytest.mark.parametrize("split", [1, 3, 7])
def test_a_secret_split_across_chunks_is_redacted(sidecar, upstream, marker, split):
    reply = curl(sidecar, f"https://api.routed.test/reflect?split={split}&m={marker}")
    assert reply.body == "you sent: [REDACTED] (end)"


def test_a_secret_split_across_compressed_chunks_is_redacted(sidecar, upstream, marker):
    reply = curl(sidecar, "--compressed",
                 f"https://api.routed.test/reflect?split=5&enc=gzip&m={marker}")
    assert reply.body == "you sent: [REDACTED] (end)"


def test_an_encoding_the_proxy_cannot_inspect_is_refused(sidecar, upstream, marker):
    reply = curl(sidecar, f"https://api.routed.test/reflect?enc=zstd-fake&m={marker}")
    assert reply.status == 502
    assert "cannot inspect" in reply.body
    assert leaked(reply.everything()) == []


def test_the_query_parameter_secret_is_redacted_when_echoed(sidecar, upstream, marker):
    reply = curl(sidecar, f"https://query.routed.test/{marker}")
    assert MAPS_KEY not in reply.everything()
    assert upstream.one(marker)


# -- injection only over verified TLS ---------------------------------------------------------

@pytest.fixture(scope="module")
def impostor(tmp_path_factory):
    """An HTTPS server for api.routed.test whose certificate comes from an unknown CA."""
    other_ca = trustme.CA()
    path = tmp_path_factory.mktemp("impostor") / "ca.pem"
    other_ca.cert_pem.write_to_path(str(path))
    server = UpstreamServer(other_ca, str(path), port=0, hosts=("api.routed.test",))
    state = server.start()
    yield state
    server.stop()


@pytest.fixture(scope="module")
def expired(test_ca, tmp_path_factory):
    import datetime as dt
    ca, ca_file = test_ca
    cert = ca.issue_cert("api.routed.test", not_after=dt.datetime(2020, 1, 1),
                         not_before=dt.datetime(2019, 1, 1))
    server = UpstreamServer(ca, ca_file, port=0, cert=cert)
    state = server.start()
    yield state
    server.stop()


@pytest.mark.parametrize("server_name", ["impostor", "expired"])
def test_upstream_certificate_errors_are_a_502_and_nothing_is_sent(make_sidecar, request, marker,
                                                                    server_name):
    server = request.getfixturevalue(server_name)
    port = server.port
    proc = make_sidecar([injection("api", hosts=[f"api.routed.test:{port}"],
                                   headers=[{"name": "Authorization",
                                             "valueFrom": ref("api-credentials", "token")}])],
                        args=["--resolve", f"api.routed.test:{port}:127.0.0.1"])
    reply = curl(proc, f"https://api.routed.test:{port}/{marker}")
    assert reply.status == 502
    assert "failed verification" in reply.body
    assert server.find(marker) == []  # no request, and certainly no credential, got through
    assert proc.metric("keyhole_upstream_errors_total", kind="upstream_tls") >= 1


# -- rules ---------------------------------------------------------------------------------------

def test_a_request_outside_the_rules_is_refused_naming_the_injection(sidecar, upstream, marker):
    reply = curl(sidecar, f"https://rules.routed.test/v1/admin/{marker}")
    assert reply.status == 403
    assert "injection 'rules'" in reply.body and "is not allowed" in reply.body
    assert RULES_KEY not in reply.everything()
    assert upstream.find(marker) == []


def test_a_method_outside_the_rules_is_refused(sidecar, upstream, marker):
    reply = curl(sidecar, "-X", "DELETE", f"https://rules.routed.test/v1/models/{marker}")
    assert reply.status == 405
    assert upstream.find(marker) == []


def test_a_request_inside_the_rules_is_forwarded(sidecar, upstream, marker):
    assert curl(sidecar, f"https://rules.routed.test/v1/models/{marker}").status == 200
    assert upstream.one(marker).header("X-Api-Key") == [RULES_KEY]


def test_encoded_dot_segments_cannot_escape_a_rule(sidecar, upstream, marker):
    reply = curl(sidecar, "--path-as-is",
                 f"https://rules.routed.test/v1/models/%2e%2e/admin/{marker}")
    assert reply.status == 403
    assert upstream.find(marker) == []


# -- timeouts --------------------------------------------------------------------------------

def test_a_connection_that_sends_no_request_is_closed_after_the_header_timeout(make_sidecar):
    proc = make_sidecar(args=["--header-timeout", "1"])
    with socket.create_connection(("127.0.0.1", proc.proxy_port)) as sock:
        sock.sendall(b"GET http://api.routed.test/ HTTP/1.1\r\nHost: api")  # and then nothing
        start = time.monotonic()
        sock.settimeout(5)
        assert sock.recv(100) == b""
        assert time.monotonic() - start < 3


def test_an_idle_keep_alive_connection_is_closed(make_sidecar, upstream, marker):
    proc = make_sidecar(args=["--idle-timeout", "1"])
    with socket.create_connection(("127.0.0.1", proc.proxy_port)) as sock:
        sock.sendall(f"GET http://api.routed.test/{marker} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        sock.settimeout(5)
        data = b""
        start = time.monotonic()
        while chunk := sock.recv(65536):
            data += chunk
        assert status_of(data) == 200
        assert time.monotonic() - start < 4


# -- nothing secret in logs, metrics or errors -----------------------------------------------

def test_no_secret_value_reaches_the_audit_log_the_diagnostics_or_the_metrics(sidecar):
    """Runs after the tests above in this module have pushed every kind of request through."""
    curl(sidecar, f"https://query.routed.test/x?key={MAPS_KEY}")  # even a client that sends one
    _, metrics = sidecar.admin("/metrics")
    for name, text in [("audit", (sidecar.workdir / "stdout.log").read_text()),
                       ("stderr", sidecar.stderr()), ("metrics", metrics)]:
        assert leaked(text) == [], f"a secret reached the {name}"
    secrets_in_files = [v for keys in SECRETS.values() for v in keys.values()]
    assert all(v not in metrics for v in secrets_in_files)


def test_the_proxy_port_refuses_a_non_loopback_listen_address(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "keyhole_sidecar", "--injections", "x", "--secrets-dir", "y",
         "--listen", "0.0.0.0:15080"],
        capture_output=True, text=True)
    assert done.returncode == 2
    assert "loopback" in done.stderr


# -- more tricks ------------------------------------------------------------------------------

def test_a_secret_split_across_two_sse_events_is_redacted(sidecar, upstream, marker):
    """The upstream sends the first half of the value in one event, the rest in the next."""
    reply = curl(sidecar, "-N", f"https://api.routed.test/reflect?split=14&m={marker}")
    assert "[REDACTED]" in reply.body and API_TOKEN not in reply.body


@pytest.mark.parametrize("location", ["http://api.routed.test/x", "https://api.routed.test:8443/x",
                                      "https://unrouted.test/x", "//unrouted.test/x"])
def test_redirects_to_other_schemes_ports_and_hosts_are_not_followed(sidecar, upstream, marker,
                                                                     location):
    reply = curl(sidecar, f"https://api.routed.test/redirect?to={location}&m={marker}")
    assert reply.status == 302
    assert dict(reply.headers)["Location"] == location
    assert len(upstream.find(marker)) == 1


def test_a_redirect_the_client_follows_is_judged_on_its_own(sidecar, upstream, marker):
    curl(sidecar, "-L", f"https://api.routed.test/redirect?to=https://unrouted.test/{marker}-next"
                        f"&m={marker}")
    followed = [r for r in upstream.received if r.path.startswith(f"/{marker}-next")]
    assert len(followed) == 1
    assert followed[0].header("Authorization") == []


def test_userinfo_naming_a_routed_host_does_not_route(sidecar, plain_upstream, marker):
    """http://api.routed.test@plain.unrouted.test/ goes to plain.unrouted.test, untouched."""
    answer = exchange(sidecar.proxy_port, (
        f"GET http://api.routed.test@plain.unrouted.test:{plain_upstream.port}/{marker} HTTP/1.1\r\n"
        "Host: x\r\nConnection: close\r\n\r\n").encode())
    assert status_of(answer) == 400  # credentials in a request URL are refused outright
    assert plain_upstream.find(marker) == []


def test_userinfo_on_a_routed_host_is_refused(sidecar, upstream, marker):
    answer = exchange(sidecar.proxy_port, (f"GET http://agent@api.routed.test/{marker} HTTP/1.1\r\n"
                                           "Host: x\r\nConnection: close\r\n\r\n").encode())
    assert status_of(answer) == 400
    assert upstream.find(marker) == []


@pytest.mark.parametrize("host", ["\u0430pi.routed.test", "xn--pi-routed-7ld.test",
                                  "api.routed.test.evil.test", "api-routed.test"])
def test_look_alike_hosts_are_not_routed(sidecar, upstream, host):
    """A Cyrillic a (U+0430), its punycode, a suffix and a near miss: none gets the key (not
    routed, and with nothing to resolve them the tunnel fails)."""
    answer = exchange(sidecar.proxy_port, f"CONNECT {host}:443 HTTP/1.1\r\nHost: x\r\n\r\n"
                      .encode())
    assert status_of(answer) in (400, 502)


def test_explicit_default_ports_are_the_same_route(sidecar, upstream, marker):
    curl(sidecar, f"https://api.routed.test:443/{marker}-a")
    assert upstream.one(f"{marker}-a").header("Authorization") == [f"Bearer {API_TOKEN}"]
    exchange(sidecar.proxy_port, (f"GET http://api.routed.test:80/{marker}-b HTTP/1.1\r\nHost: x"
                                  "\r\nConnection: close\r\n\r\n").encode())
    assert upstream.one(f"{marker}-b").header("Authorization") == [f"Bearer {API_TOKEN}"]


@pytest.mark.parametrize("path", ["//api/x", "/%2Fapi/x", "/./../api%2f..%2f..%2fnosuch/x"])
def test_base_url_paths_that_hide_the_name_find_no_injection(sidecar, upstream, marker, path):
    reply = curl(sidecar, "--path-as-is", f"{sidecar.url}{path}?m={marker}")
    assert reply.status == 404
    assert upstream.find(marker) == []


@pytest.mark.parametrize("method", ["TRACE", "TRACK"])
def test_trace_to_a_routed_host_is_refused(sidecar, upstream, marker, method):
    reply = curl(sidecar, "-X", method, f"https://api.routed.test/{marker}")
    assert reply.status in (400, 405)  # TRACK is not even a method llhttp accepts
    assert upstream.find(marker) == []


def test_expect_continue_is_answered_only_after_the_rules_allow(sidecar, upstream, marker):
    denied = curl(sidecar, "-H", "Expect: 100-continue", "--data-binary", "x" * 2000,
                  f"https://rules.routed.test/v1/admin/{marker}-denied")
    assert denied.status in (403, 405)
    assert upstream.find(f"{marker}-denied") == []
    allowed = curl(sidecar, "-H", "Expect: 100-continue", "--data-binary", "x" * 2000,
                   f"https://api.routed.test/upload?m={marker}-allowed")
    assert allowed.status == 200
    assert upstream.one(f"{marker}-allowed").body_size == 2000


def test_http_1_0_inside_a_tunnel_is_injected_and_closed(sidecar, upstream, marker):
    answer = _tunnel_request(sidecar, "api.routed.test:443",
                             f"GET /{marker} HTTP/1.0\r\nHost: api.routed.test\r\n\r\n".encode())
    assert status_of(answer) == 200
    assert upstream.one(marker).header("Authorization") == [f"Bearer {API_TOKEN}"]
    assert API_TOKEN.encode() not in answer


def test_pipelined_requests_in_a_tunnel_each_get_their_own_answer(sidecar, upstream, marker):
    requests = b"".join(f"GET /{marker}-{i} HTTP/1.1\r\nHost: api.routed.test\r\n"
                        f"Authorization: mine-{i}\r\n\r\n".encode() for i in range(3))
    answer = _tunnel_request(sidecar, "api.routed.test:443",
                             requests + b"GET /last HTTP/1.1\r\nHost: api.routed.test\r\n"
                                        b"Connection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200") == 4
    for i in range(3):
        assert upstream.one(f"{marker}-{i}").header("Authorization") == [f"Bearer {API_TOKEN}"]
    assert API_TOKEN.encode() not in answer


def test_connection_close_mid_stream_leaves_the_proxy_serving(sidecar, upstream, marker):
    import socket as sock_module

    with open_tunnel(sidecar.proxy_port, "api.routed.test:443", str(sidecar.ca_cert)) as tls:
        tls.sendall(f"GET /sse?n=20&delay=0.05&m={marker} HTTP/1.1\r\nHost: api.routed.test\r\n\r\n"
                    .encode())
        tls.recv(100)
        tls.shutdown(sock_module.SHUT_RDWR)
    assert curl(sidecar, f"https://api.routed.test/{marker}-after").status == 200
