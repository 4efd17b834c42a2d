"""The HTTP/2 attacks, each sent by a client that controls every frame (tests/support/h2_raw.py)
to the sidecar's HTTP/2 server (h2c on the proxy port: the same connection code TLS leaves
hand their streams to). Each is bounded per connection; the sidecar stays up, and a bystander
connection opened before the attack is served after it."""

from __future__ import annotations

import contextlib

import pytest

from tests.integration.clients import curl
from tests.support.h2_raw import ENHANCE_YOUR_CALM, RawH2

PROTOCOL_ERROR = 0x1


@pytest.fixture
def bystander(h2_sidecar):
    """An HTTP/2 connection opened before the attack, which must still be served after it."""
    with RawH2(h2_sidecar.proxy_port) as conn:
        yield conn


def assert_unharmed(sidecar, h2_upstream, bystander: RawH2, marker: str) -> None:
    assert sidecar.process.poll() is None, "the sidecar died"
    assert bystander.send(bystander.headers(1, f"/h2/{marker}-bystander"))
    assert bystander.answered(1), "the connection opened before the attack was not served"
    reply = curl(sidecar, "--http2-prior-knowledge", "--noproxy", "*",
                 f"{sidecar.url}/h2/{marker}-after")
    assert reply.status == 200


def test_rapid_reset_is_cut_off(h2_sidecar, h2_upstream, bystander, marker):
    """CVE-2023-44487: open and reset streams as fast as the socket takes them."""
    with RawH2(h2_sidecar.proxy_port) as attacker:
        for batch in range(50):  # 50 batches of 100 streams opened and reset at once
            frames = []
            for i in range(100):
                stream_id = 1 + 2 * (batch * 100 + i)
                frames += [attacker.headers(stream_id, f"/h2/{marker}/hang"),
                           attacker.rst(stream_id)]
            if not attacker.send(*frames) or attacker.goaway(timeout=0.01):
                break
        goaway = attacker.goaway()
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    # Streams reset before their turn never reach the upstream; those that did are bounded.
    assert len(h2_upstream.find(marker)) <= 300
    assert_unharmed(h2_sidecar, h2_upstream, bystander, marker)


def test_frames_after_the_cause_of_a_goaway_are_not_acted_on(h2_sidecar, h2_upstream,
                                                               bystander, marker):
    """Resets past the budget, PINGs and new streams all in one write: the first reset over
    the budget closes the connection; what follows it in the same read is neither answered
    nor served (writing after the GOAWAY once crashed the connection's handler)."""
    with RawH2(h2_sidecar.proxy_port) as attacker:
        frames = []
        for i in range(300):
            stream_id = 1 + 2 * i
            frames += [attacker.headers(stream_id, f"/h2/{marker}/hang"), attacker.rst(stream_id),
                       attacker.ping(i)]
        attacker.send(*frames)
        goaway = attacker.goaway()
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    assert "Traceback" not in h2_sidecar.stderr()
    assert_unharmed(h2_sidecar, h2_upstream, bystander, marker)


def test_continuation_flood_is_refused(h2_sidecar, h2_upstream, bystander, marker):
    """CVE-2024-27316: a header block that never ends, CONTINUATION after CONTINUATION."""
    with RawH2(h2_sidecar.proxy_port) as attacker:
        first = attacker.headers(1, f"/h2/{marker}")
        first.flags.discard("END_HEADERS")
        attacker.send(first)
        for _ in range(2000):
            if not attacker.send(attacker.continuation(1, b"\x00" + b"a" * 1000)):
                break
        goaway = attacker.goaway()
    assert goaway is not None and goaway.error_code != 0
    assert h2_upstream.find(marker) == []
    assert_unharmed(h2_sidecar, h2_upstream, bystander, marker)


def test_an_hpack_bomb_is_refused(h2_sidecar, h2_upstream, bystander, marker):
    """A 4 KB header sent once into the dynamic table and named 99 more times by index: 3 KB
    on the wire, 400 KB decoded, over SETTINGS_MAX_HEADER_LIST_SIZE (64 KiB)."""
    with RawH2(h2_sidecar.proxy_port) as attacker:
        frame = attacker.headers(1, f"/h2/{marker}-bomb", extra=[("x-bomb", "b" * 4000)] * 100)
        assert len(frame.data) < 4000  # small on the wire
        attacker.send(frame)
        goaway = attacker.goaway()
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    assert h2_upstream.find(marker) == []
    assert_unharmed(h2_sidecar, h2_upstream, bystander, marker)


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_a_control_frame_flood_is_cut_off(h2_sidecar, h2_upstream, bystander, marker, kind):
    """Each PING and SETTINGS makes the server write an ACK; a flood of them is refused."""
    with RawH2(h2_sidecar.proxy_port) as attacker:
        for n in range(20):
            frames = [attacker.ping(n * 100 + i) if kind == "ping" else attacker.settings()
                      for i in range(100)]
            if not attacker.send(*frames) or attacker.goaway(timeout=0.01):
                break
        goaway = attacker.goaway()
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    assert_unharmed(h2_sidecar, h2_upstream, bystander, marker)


def test_more_streams_than_advertised_closes_the_connection(h2_sidecar, h2_upstream, bystander,
                                                            marker):
    """SETTINGS_MAX_CONCURRENT_STREAMS is 100: the 101st open stream is a protocol error."""
    with RawH2(h2_sidecar.proxy_port) as attacker:
        frames = [attacker.headers(1 + 2 * i, f"/h2/{marker}/hang") for i in range(150)]
        attacker.send(*frames)
        goaway = attacker.goaway()
    assert goaway is not None and goaway.error_code == PROTOCOL_ERROR
    assert len(h2_upstream.find(marker)) <= 100
    assert_unharmed(h2_sidecar, h2_upstream, bystander, marker)


def test_a_stream_that_never_reads_stalls_only_itself(h2_sidecar, h2_upstream, bystander,
                                                      marker):
    """A client that opens a 200 MB download and never gives a window back: flow control
    stops the upstream after a few windows' worth; the proxy holds no more than that."""
    with RawH2(h2_sidecar.proxy_port, initial_window=0) as attacker:
        attacker.send(attacker.headers(1, f"/h2/{marker}/big?n={200 * 1024 * 1024}"))
        sent = h2_upstream.wait_stalled(marker)
        assert sent <= 1024 * 1024, f"the upstream sent {sent} bytes the client never asked for"
        assert_unharmed(h2_sidecar, h2_upstream, bystander, marker)
        with contextlib.suppress(OSError):
            attacker.send(attacker.rst(1))


def test_an_oversized_header_list_is_audited_and_named_not_blamed_on_the_ca(fresh_h2_sidecar,
                                                                           h2_upstream):
    """A 70 KB header list over HTTP/2 inside an intercepted tunnel: the connection is closed
    with one audit line (malformed) and a log line that names the header list — not "the
    client rejected the keyhole CA" (the log said so six times)."""
    import h2.config
    import h2.connection

    from tests.support.raw import open_tunnel

    authority = f"h2.routed.test:{h2_upstream.port}"
    with open_tunnel(fresh_h2_sidecar.proxy_port, authority,
                     str(fresh_h2_sidecar.ca_cert), alpn=["h2"]) as tls:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":scheme", "https"),
                              (":authority", "h2.routed.test"), (":path", "/"),
                              *((f"x-big-{i}", "v" * 1000) for i in range(70))],
                          end_stream=True)
        tls.sendall(conn.data_to_send())
        tls.settimeout(10)
        with contextlib.suppress(OSError):
            while tls.recv(65536):
                pass
    line = fresh_h2_sidecar.wait_audit(lambda r: r["reason"] == "malformed")
    assert (line["mode"], line["host"], line["decision"], line["protocol"]) == (
        "intercept", authority, "denied", "h2")
    fresh_h2_sidecar.stop()
    log = fresh_h2_sidecar.stderr()
    assert "its header list was over 65536 bytes" in log, log
    assert "rejected the keyhole CA" not in log
