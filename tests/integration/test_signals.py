"""What the real sidecar does with the signals an operator of squid, nginx or Envoy sends:
SIGHUP reloads at once and the proxy lives; SIGUSR1/2 do not end it; SIGTERM drains — a request
in flight is answered, new connections are not accepted, and the process exits 0. And /readyz
tells the truth about a configuration on disk that was rejected."""

from __future__ import annotations

import signal
import socket
import threading

import pytest

from tests.integration.clients import curl
from tests.support.config import INJECTIONS, injection, ref
from tests.support.sidecar import write_injections


def test_sighup_reloads_at_once_and_the_proxy_lives(make_sidecar, upstream, marker):
    sidecar = make_sidecar(injections=INJECTIONS[:1])
    assert curl(sidecar, f"https://basic.routed.test/{marker}-before").status == 200
    assert upstream.one(f"{marker}-before").header("authorization") == []  # not routed yet
    write_injections(sidecar.injections, INJECTIONS)
    sidecar.process.send_signal(signal.SIGHUP)
    sidecar.wait_for_log("SIGHUP: configuration reloaded; --upstream-ca reloaded; CA unchanged")
    assert curl(sidecar, f"https://basic.routed.test/{marker}-after").status == 200
    assert upstream.one(f"{marker}-after").header("authorization")  # routed now
    assert sidecar.process.poll() is None


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2])
def test_other_signals_do_not_end_the_proxy(make_sidecar, upstream, marker, sig):
    sidecar = make_sidecar()
    sidecar.process.send_signal(sig)
    sidecar.wait_for_log(f"{sig.name} ignored")
    assert curl(sidecar, f"https://api.routed.test/{marker}").status == 200
    assert sidecar.process.poll() is None


def test_sigterm_drains_a_request_in_flight_then_exits_0(make_sidecar, upstream, marker):
    """An SSE answer of 2 s is in flight when SIGTERM comes: it is answered whole, a new
    connection is refused, and the process exits 0 once it is done."""
    sidecar = make_sidecar()
    answers = []
    slow = threading.Thread(target=lambda: answers.append(curl(
        sidecar, f"https://api.routed.test/sse?n=5&delay=0.4&m={marker}")))
    slow.start()
    upstream.wait_for(marker)  # the request reached the upstream: it is in flight
    sidecar.process.send_signal(signal.SIGTERM)
    sidecar.wait_for_log("draining: 1 request(s) in flight")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=2).close()
    assert sidecar.process.wait(15) == 0
    slow.join(15)
    [answer] = answers
    assert answer.status == 200 and answer.body.count("data: event") == 5


def test_readyz_says_when_the_configuration_on_disk_was_rejected(make_sidecar, upstream,
                                                                   marker):
    sidecar = make_sidecar()
    assert sidecar.admin("/readyz") == (200, "ready\n")
    write_injections(sidecar.injections, [injection(
        "broken", hosts=["*.com"], headers=[{"name": "X", "valueFrom": ref("api-credentials",
                                                                           "token")}])])
    sidecar.process.send_signal(signal.SIGHUP)
    sidecar.wait_for_log("SIGHUP: configuration rejected")
    status, body = sidecar.admin("/readyz")
    assert status == 503 and "rejected" in body and "*.com" not in body  # details: the log
    sidecar.wait_for_log("'*.com' is too broad")
    assert curl(sidecar, f"https://api.routed.test/{marker}").status == 200  # the last good one
    write_injections(sidecar.injections, INJECTIONS)
    sidecar.process.send_signal(signal.SIGHUP)
    sidecar.wait_for_log("SIGHUP: configuration reloaded")
    assert sidecar.admin("/readyz") == (200, "ready\n")


def test_a_second_sigterm_stops_without_waiting(make_sidecar, upstream, marker):
    sidecar = make_sidecar()
    cut = []

    def long_request():
        try:
            cut.append(curl(sidecar, f"https://api.routed.test/sse?n=100&delay=0.3&m={marker}"))
        except AssertionError as exc:  # curl reports the answer it lost
            cut.append(exc)

    client = threading.Thread(target=long_request)
    client.start()
    upstream.wait_for(marker)
    sidecar.process.send_signal(signal.SIGTERM)
    sidecar.wait_for_log("draining: 1 request(s) in flight")
    sidecar.process.send_signal(signal.SIGTERM)
    assert sidecar.process.wait(10) == 0  # long before the 30 s answer or the drain timeout
    sidecar.wait_for_log("SIGTERM again: not waiting for requests in flight")
    client.join(15)
    assert isinstance(cut[0], AssertionError) or cut[0].body.count("data: event") < 100


def test_sighup_reads_a_rotated_upstream_ca_again(tmp_path, test_ca, marker):
    """A private upstream's CA rotated: its new certificate fails verification (502
    upstream_tls, nothing sent) until the bundle is rewritten and SIGHUP read it — no restart.
    A bundle that does not load keeps the last good one."""
    import trustme

    from tests.support.sidecar import start_sidecar
    from tests.support.upstream import UpstreamServer

    rotated = trustme.CA()
    server = UpstreamServer(rotated, "", port=0, hosts=("private.routed.test",))
    state = server.start()
    bundle = tmp_path / "upstream-ca.pem"
    bundle.write_bytes(test_ca[0].cert_pem.bytes())  # the old CA only
    sidecar = start_sidecar(tmp_path / "sidecar", [injection(
        "private", hosts=[f"private.routed.test:{state.port}"], headers=[
            {"name": "Authorization", "valueFrom": ref("api-credentials", "token")}])],
        {"api-credentials": {"token": "sk-private-0123456789"}},
        resolve=[f"private.routed.test:{state.port}:127.0.0.1"], upstream_ca=str(bundle))
    try:
        url = f"https://private.routed.test:{state.port}/{marker}"
        refused = curl(sidecar, url)
        assert refused.status == 502 and dict(refused.headers)["X-Keyhole-Error"] == "upstream_tls"
        bundle.write_text("not a certificate")
        sidecar.process.send_signal(signal.SIGHUP)
        sidecar.wait_for_log("--upstream-ca rejected (still the last good bundle)")
        assert curl(sidecar, url).status == 502
        bundle.write_bytes(test_ca[0].cert_pem.bytes() + rotated.cert_pem.bytes())
        sidecar.process.send_signal(signal.SIGHUP)
        sidecar.wait_for_log("--upstream-ca reloaded")
        assert curl(sidecar, url).status == 200
        assert [r.header("Authorization") for r in state.find(marker)] == [
            ["sk-private-0123456789"]]
    finally:
        sidecar.stop()
        server.stop()
