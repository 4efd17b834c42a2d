"""Parser and smuggling attacks: each answered 400 (or the connection closed) with nothing
forwarded upstream, on the proxy port and inside an intercepted tunnel. llhttp (through
aiohttp) parses every request; these tests pin that it stays strict."""

from __future__ import annotations

import pytest

from tests.support.raw import exchange, open_tunnel, read_all, status_of

H = "Host: api.routed.test\r\n"
ATTACKS = {
    "CL.TE": f"POST /{{m}} HTTP/1.1\r\n{H}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
             "0\r\n\r\nG",
    "TE.CL": f"POST /{{m}} HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
             "8\r\nSMUGGLED\r\n0\r\n\r\n",
    "TE.TE with a space before the colon": f"POST /{{m}} HTTP/1.1\r\n{H}Transfer-Encoding : chunked\r\n"
                                           "\r\n0\r\n\r\n",
    "TE.TE obfuscated value": f"POST /{{m}} HTTP/1.1\r\n{H}Transfer-Encoding: xchunked\r\n"
                              "Content-Length: 4\r\n\r\nabcd",
    "TE.TE chunked then identity": f"POST /{{m}} HTTP/1.1\r\n{H}Transfer-Encoding: chunked, identity\r\n"
                                   "\r\n0\r\n\r\n",
    "TE.TE two headers": f"POST /{{m}} HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n"
                         "Transfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "duplicate Content-Length": f"POST /{{m}} HTTP/1.1\r\n{H}Content-Length: 4\r\nContent-Length: 5\r\n"
                                "\r\nabcde",
    "negative Content-Length": f"POST /{{m}} HTTP/1.1\r\n{H}Content-Length: -1\r\n\r\n",
    "Content-Length with a sign": f"POST /{{m}} HTTP/1.1\r\n{H}Content-Length: +4\r\n\r\nabcd",
    "chunk-size overflow": f"POST /{{m}} HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n"
                           "FFFFFFFFFFFFFFFFF1\r\nabc\r\n0\r\n\r\n",
    "obs-fold": f"GET /{{m}} HTTP/1.1\r\n{H}X-Folded: a\r\n b\r\n\r\n",
    "bare LF in a header line": f"GET /{{m}} HTTP/1.1\r\n{H}X-A: a\nX-B: b\r\n\r\n",
    "bare CR in a header value": f"GET /{{m}} HTTP/1.1\r\n{H}X-A: a\rX-B: b\r\n\r\n",
    "NUL in a header value": f"GET /{{m}} HTTP/1.1\r\n{H}X-A: a\0b\r\n\r\n",
    "control character in a header name": f"GET /{{m}} HTTP/1.1\r\n{H}X-\x01A: a\r\n\r\n",
    "space in a header name": f"GET /{{m}} HTTP/1.1\r\n{H}X A: a\r\n\r\n",
    "over-long request line": f"GET /{{m}}?{'q' * 9000} HTTP/1.1\r\n{H}\r\n",
    "oversized header": f"GET /{{m}} HTTP/1.1\r\n{H}X-Big: {'a' * 9000}\r\n\r\n",
    "too many headers": f"GET /{{m}} HTTP/1.1\r\n{H}"
                        + "".join(f"X-H{i}: v\r\n" for i in range(150)) + "\r\n",
    "HTTP/0.9 style request": "GET /{m}\r\n\r\n",
    "garbage version": f"GET /{{m}} HTTP/7.3\r\n{H}\r\n",
}


def absolute(attack: str) -> str:
    """The same attack as an absolute-form request to the proxy port."""
    return attack.replace("/{m}", "http://api.routed.test/{m}", 1)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_on_the_proxy_port_nothing_is_forwarded(sidecar, upstream, marker, name):
    answer = exchange(sidecar.proxy_port, absolute(ATTACKS[name]).format(m=marker).encode("latin-1"))
    assert status_of(answer) in (0, 400, 413, 431), answer[:200]
    assert upstream.find(marker) == []


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_inside_a_tunnel_nothing_is_forwarded(sidecar, upstream, marker, name):
    with open_tunnel(sidecar.proxy_port, "api.routed.test:443", str(sidecar.ca_cert)) as tls:
        tls.sendall(ATTACKS[name].format(m=marker).encode("latin-1"))
        answer = read_all(tls)
    assert status_of(answer) in (0, 400, 413, 431), answer[:200]
    assert upstream.find(marker) == []


def test_a_malformed_connect_gets_400(sidecar):
    answer = exchange(sidecar.proxy_port, b"CONNECT api.routed.test:443 HTTP/1.1\r\n"
                                          b"Host: a\r\nX: a\r\n b\r\n\r\n")
    assert status_of(answer) == 400


def test_a_connect_without_a_port_gets_400(sidecar):
    answer = exchange(sidecar.proxy_port, b"CONNECT api.routed.test HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(answer) == 400
    assert b"has no port" in answer


def test_the_proxy_keeps_serving_after_every_attack(sidecar, upstream, marker):
    from tests.integration.clients import curl

    assert curl(sidecar, f"https://api.routed.test/{marker}").status == 200
    assert sidecar.process.poll() is None


def test_attacks_cannot_flood_the_log(sidecar):
    """Each malformed request is one line at most, without a traceback, rate-limited."""
    before = len(sidecar.stderr().splitlines())
    for _ in range(200):
        exchange(sidecar.proxy_port, b"GET http://api.routed.test/ HTTP/1.1\r\nX: a\0b\r\n\r\n",
                 timeout=2)
    log = sidecar.stderr()
    assert "Traceback" not in log
    assert len(log.splitlines()) - before < 40
    assert "refused a malformed or broken request" in log
    assert sidecar.metric("keyhole_decisions_total", decision="denied", reason="malformed") >= 200


def test_a_malformed_request_gets_one_audit_line_and_one_log_line(make_sidecar, marker):
    """docs/sidecar.md lists `malformed` as an audit reason: every refusal is audited once, and
    the log says what was wrong once (it printed its prefix twice and counted it twice)."""
    proxy = make_sidecar()
    with open_tunnel(proxy.proxy_port, "api.routed.test:443", str(proxy.ca_cert)) as tls:
        tls.sendall(ATTACKS["oversized header"].format(m=marker).encode("latin-1"))
        assert status_of(read_all(tls)) == 400
    line = proxy.wait_audit(lambda r: r["reason"] == "malformed")
    assert (line["mode"], line["host"], line["decision"], line["status"], line["protocol"]) == (
        "intercept", "api.routed.test:443", "denied", 400, "http/1.1")
    exchange(proxy.proxy_port, ATTACKS["NUL in a header value"].format(m=marker).encode("latin-1"))
    plain = proxy.wait_audit(lambda r: r["reason"] == "malformed" and r["mode"] == "plain")
    assert plain["status"] == 400
    proxy.stop()
    log = proxy.stderr()
    assert log.count("refused a malformed or broken request") == 2, log
    assert "refused a malformed or broken request: refused" not in log
    audit = [r for r in proxy.audit() if r["reason"] == "malformed"]
    assert len(audit) == 2
