"""HTTP/2 and gRPC through the real sidecar: real clients (curl, httpx, Node's http2, grpcio)
against real HTTP/2 upstreams over TLS on 127.0.0.1 (an ``h2`` echo server, a grpcio server).
The upstream sees the key; the client sees its answer and its trailers, never the key."""

from __future__ import annotations

import json
import ssl
import subprocess
import threading

import grpc
import httpx
import pytest

from tests.integration.clients import CLIENTS, curl
from tests.support.config import GRPC_KEY, H2_KEY

KEYS = (H2_KEY, GRPC_KEY)


def assert_no_key(text: str) -> None:
    for key in KEYS:
        assert key not in text


def _echo(h2_upstream, marker: str):
    seen = h2_upstream.find(marker)
    assert len(seen) == 1, f"the upstream saw {len(seen)} requests for {marker}"
    return seen[0]


# -- plain HTTP/2 ------------------------------------------------------------------------
def test_curl_speaks_h2_through_connect_and_the_key_is_added(h2_sidecar, h2_upstream, marker):
    url = f"https://h2.routed.test:{h2_upstream.port}/{marker}"
    reply = curl(h2_sidecar, url, http2=True)
    assert reply.status == 200
    assert reply.protocol == "HTTP/2"
    assert _echo(h2_upstream, marker).header("authorization") == [f"Bearer {H2_KEY}"]
    assert "[REDACTED]" in reply.body  # the upstream reflected the header in its body
    assert dict(reply.headers)["x-echo-authorization"] == "[REDACTED]"
    assert_no_key(reply.everything())


def test_httpx_with_http2_gets_h2_end_to_end(h2_sidecar, h2_upstream, marker):
    context = ssl.create_default_context(cafile=str(h2_sidecar.bundle))
    with httpx.Client(http2=True, proxy=h2_sidecar.url, verify=context, trust_env=False) as client:
        response = client.post(f"https://h2.routed.test:{h2_upstream.port}/{marker}",
                               content=b"z" * 100_000)
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"
    seen = _echo(h2_upstream, marker)
    assert seen.method == "POST" and seen.body_size == 100_000
    assert seen.header("authorization") == [f"Bearer {H2_KEY}"]
    assert json.loads(response.text)["protocol"] == "h2"
    assert_no_key(response.text + str(response.headers))


def test_node_http2_gets_its_trailers_redacted(h2_sidecar, h2_upstream, marker):
    done = subprocess.run(
        ["node", str(CLIENTS / "h2.mjs"), h2_sidecar.url,
         f"https://h2.routed.test:{h2_upstream.port}/{marker}"],
        env=h2_sidecar.client_env(), capture_output=True, text=True, timeout=60, cwd=CLIENTS)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["status"] == 200 and reply["alpn"] == "h2"
    trailers = dict(reply["trailers"])
    assert trailers["x-trailer"] == "done"  # trailers crossed the proxy
    assert trailers["x-trailer-authorization"] == "[REDACTED]"
    assert _echo(h2_upstream, marker).header("te") == ["trailers"]
    assert_no_key(done.stdout)


@pytest.mark.parametrize(("http2", "upstream_speaks"), [(False, "HTTP/1.1"), (True, "HTTP/2.0")])
def test_an_upstream_speaking_both_is_spoken_to_as_the_client_speaks(fresh_h2_sidecar,
                                                                      dual_upstream, marker,
                                                                      http2, upstream_speaks):
    """An HTTP/2 client's request offers the upstream h2; an HTTP/1.1 client's offers
    http/1.1 alone (llhttp's path is the faster: docs/performance.md)."""
    reply = curl(fresh_h2_sidecar, f"https://dual.routed.test:{dual_upstream}/{marker}",
                 http2=http2)
    assert reply.status == 200
    assert reply.protocol == ("HTTP/2" if http2 else "HTTP/1.1")
    seen = reply.json()
    assert seen["proto"] == upstream_speaks and seen["path"] == f"/{marker}"
    assert seen["authorization"] == "[REDACTED]"  # the key reached it, and was echoed back
    assert_no_key(reply.everything())


def test_an_http11_client_is_served_over_an_h2_upstream_connection(h2_sidecar, h2_upstream,
                                                                    dual_upstream, marker):
    """The exchange knows no protocol: an HTTP/1.1 request rides an HTTP/2 upstream connection
    when one is open to its upstream (an HTTP/2 client opened it)."""
    curl(h2_sidecar, f"https://h2.routed.test:{h2_upstream.port}/opener", http2=True)
    reply = curl(h2_sidecar, f"https://h2.routed.test:{h2_upstream.port}/{marker}")
    assert reply.status == 200 and reply.protocol == "HTTP/1.1"
    assert _echo(h2_upstream, marker).header("authorization") == [f"Bearer {H2_KEY}"]
    assert reply.json()["protocol"] == "h2"
    assert_no_key(reply.everything())


def test_a_stream_the_upstream_resets_mid_answer_is_reset_for_the_client(h2_sidecar,
                                                                          h2_upstream, marker):
    """RST_STREAM from the upstream crosses the proxy: the client's stream is reset, not ended
    as if the answer were whole, and the connection carries on."""
    context = ssl.create_default_context(cafile=str(h2_sidecar.bundle))
    base = f"https://h2.routed.test:{h2_upstream.port}"
    with httpx.Client(http2=True, proxy=h2_sidecar.url, verify=context, trust_env=False) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(f"{base}/{marker}/reset-mid").read()
        after = client.get(f"{base}/{marker}-after")  # the same connection, still serving
    assert after.status_code == 200 and after.http_version == "HTTP/2"
    line = h2_sidecar.wait_audit(lambda r: f"{marker}/reset-mid" in r.get("path", ""))
    assert line["reason"] == "upstream_mid_body"


def test_a_stream_the_upstream_refused_unprocessed_is_sent_again(h2_sidecar, h2_upstream,
                                                                 marker):
    """REFUSED_STREAM means the upstream did nothing with it (RFC 9113 §8.7): the request is
    sent once more (any method whose body is in hand), and the client sees only the answer."""
    reply = curl(h2_sidecar, f"https://h2.routed.test:{h2_upstream.port}/{marker}/refuse-once",
                 http2=True)
    assert reply.status == 200
    first, second = h2_upstream.find(marker)
    assert first.reset and not second.reset
    assert second.header("authorization") == [f"Bearer {H2_KEY}"]


def test_base_url_mode_takes_h2c_with_prior_knowledge(h2_sidecar, h2_upstream, marker):
    reply = curl(h2_sidecar, "--http2-prior-knowledge", "--noproxy", "*",
                 f"{h2_sidecar.url}/h2/{marker}?q=1")
    assert reply.status == 200
    assert reply.protocol == "HTTP/2"
    seen = _echo(h2_upstream, marker)
    assert seen.path == f"/{marker}?q=1"
    assert seen.header("authorization") == [f"Bearer {H2_KEY}"]
    assert_no_key(reply.everything())


def test_a_large_h2_download_streams_through(h2_sidecar, h2_upstream, marker):
    """8 MiB through windows of 64 KiB (128 of them): flow control both ways, nothing held
    whole. (50 MiB took 26 s, and as long without the sidecar: the time was httpx's pure-Python
    HTTP/2 and the stand-in upstream, not the proxy.)"""
    size = 8 * 1024 * 1024
    context = ssl.create_default_context(cafile=str(h2_sidecar.bundle))
    received = 0
    with httpx.Client(http2=True, proxy=h2_sidecar.url, verify=context, trust_env=False,
                      timeout=60) as client, client.stream(
            "GET", f"https://h2.routed.test:{h2_upstream.port}/{marker}/big?n={size}") as resp:
        assert resp.http_version == "HTTP/2"
        for piece in resp.iter_bytes():
            received += len(piece)
    assert received == size


# -- gRPC --------------------------------------------------------------------------------
def _channel(sidecar, grpc_upstream) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=sidecar.ca_cert.read_bytes())
    return grpc.secure_channel(f"grpc.routed.test:{grpc_upstream.port}", credentials,
                               options=[("grpc.http_proxy", sidecar.url),
                                        ("grpc.enable_retries", 0)])


@pytest.fixture
def grpc_channel(h2_sidecar, grpc_upstream):
    channel = _channel(h2_sidecar, grpc_upstream)
    yield channel
    channel.close()


def _call(channel, shape: str, method: str):
    return getattr(channel, shape)(f"/echo.Echo/{method}", request_serializer=None,
                                   response_deserializer=None)


def _assert_grpc_injected(grpc_upstream, marker: str, method: str) -> None:
    calls = grpc_upstream.find(marker)
    assert [c.method for c in calls] == [method]
    assert calls[0].metadata["authorization"] == f"Bearer {GRPC_KEY}"


def test_grpc_unary_call_gets_its_key_and_redacted_trailers(grpc_channel, grpc_upstream, marker):
    answer, call = _call(grpc_channel, "unary_unary", "Unary").with_call(
        b"hello", metadata=[("x-marker", marker)], timeout=20)
    assert answer == b"unary:hello"
    assert call.code() == grpc.StatusCode.OK
    _assert_grpc_injected(grpc_upstream, marker, "Unary")
    trailers = dict(call.trailing_metadata())
    assert trailers["x-echo-authorization"] == "[REDACTED]"


def test_grpc_server_streaming(grpc_channel, grpc_upstream, marker):
    call = _call(grpc_channel, "unary_stream", "ServerStream")(
        b"5", metadata=[("x-marker", marker)], timeout=20)
    assert list(call) == [b"part-%d" % i for i in range(5)]
    assert call.code() == grpc.StatusCode.OK
    _assert_grpc_injected(grpc_upstream, marker, "ServerStream")
    assert_no_key(str(call.trailing_metadata()))


def test_grpc_client_streaming(grpc_channel, grpc_upstream, marker):
    answer = _call(grpc_channel, "stream_unary", "ClientStream")(
        iter([b"a", b"b", b"c"]), metadata=[("x-marker", marker)], timeout=20)
    assert answer == b"a+b+c"
    _assert_grpc_injected(grpc_upstream, marker, "ClientStream")


def test_grpc_bidirectional_streaming_interleaves(grpc_channel, grpc_upstream, marker):
    """Each answer arrives before the next message is sent: nothing waits for the end."""
    outgoing: list[bytes] = []
    ready = threading.Semaphore(0)

    def messages():
        for i in range(4):
            outgoing.append(b"m%d" % i)
            yield b"m%d" % i
            assert ready.acquire(timeout=20), "the answer to the last message never came"

    call = _call(grpc_channel, "stream_stream", "Chat")(messages(),
                                                         metadata=[("x-marker", marker)],
                                                         timeout=30)
    answers = []
    for answer in call:
        answers.append(answer)
        ready.release()
    assert answers == [b"echo:m%d" % i for i in range(4)]
    _assert_grpc_injected(grpc_upstream, marker, "Chat")


def test_grpc_error_status_and_message_cross_redacted(grpc_channel, grpc_upstream, marker):
    with pytest.raises(grpc.RpcError) as failure:
        _call(grpc_channel, "unary_unary", "Unary")(b"fail", metadata=[("x-marker", marker)],
                                                    timeout=20)
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.value.details() == "refused; you sent [REDACTED]"
    _assert_grpc_injected(grpc_upstream, marker, "Unary")


def test_a_grpc_method_outside_the_rules_never_reaches_the_upstream(grpc_channel, grpc_upstream,
                                                                    marker):
    with pytest.raises(grpc.RpcError) as failure:
        _call(grpc_channel, "unary_unary", "Secret")(b"x", metadata=[("x-marker", marker)],
                                                     timeout=20)
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "keyhole" in failure.value.details() and "Secret" in failure.value.details()
    assert grpc_upstream.find(marker) == []


def test_a_cancelled_grpc_call_is_cancelled_upstream(grpc_channel, grpc_upstream, marker):
    """RST_STREAM from the client crosses the proxy: the upstream's handler sees its call end."""
    call = _call(grpc_channel, "unary_stream", "Hang")(b"", metadata=[("x-marker", marker)],
                                                       timeout=30)
    assert next(call) == b"started"
    call.cancel()
    [upstream_call] = grpc_upstream.find(marker)
    assert upstream_call.cancelled.wait(20), "the upstream call was not cancelled"


def test_a_grpc_deadline_ends_the_call_on_both_sides(grpc_channel, grpc_upstream, marker):
    call = _call(grpc_channel, "unary_stream", "Hang")(b"", metadata=[("x-marker", marker)],
                                                       timeout=2)
    with pytest.raises(grpc.RpcError) as failure:
        list(call)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    [upstream_call] = grpc_upstream.find(marker)
    assert upstream_call.cancelled.wait(20), "the upstream call outlived its deadline"


def test_grpc_calls_are_audited_and_counted_as_h2(h2_sidecar, grpc_channel, marker):
    before = h2_sidecar.metric("keyhole_requests_total", injection="grpc", protocol="h2")
    _call(grpc_channel, "unary_unary", "Unary")(b"hi", metadata=[("x-marker", marker)],
                                                timeout=20)
    line = h2_sidecar.wait_audit(lambda r: r.get("path") == "/echo.Echo/Unary")
    assert (line["injection"], line["method"], line["status"], line["protocol"]) == (
        "grpc", "POST", 200, "h2")
    assert h2_sidecar.metric("keyhole_requests_total", injection="grpc",
                             protocol="h2") == before + 1


def test_go_grpc_client_makes_every_kind_of_call(h2_sidecar, grpc_upstream, grpc_go_client,
                                                 marker):
    """grpc-go, configured by HTTPS_PROXY and SSL_CERT_FILE alone."""
    done = subprocess.run([str(grpc_go_client), f"grpc.routed.test:{grpc_upstream.port}", marker],
                          env=h2_sidecar.client_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["unary"] == "unary:hello"
    assert result["unary_trailer"]["x-echo-authorization"] == "[REDACTED]"
    assert result["server"] == ["part-0", "part-1", "part-2"]
    assert result["client"] == "a+b+c"
    assert result["bidi"] == ["echo:x", "echo:y"]
    assert (result["fail_code"], result["fail_message"]) == ("FailedPrecondition",
                                                             "refused; you sent [REDACTED]")
    calls = grpc_upstream.find(marker)
    assert sorted(c.method for c in calls) == ["Chat", "ClientStream", "ServerStream", "Unary",
                                               "Unary"]
    assert {c.metadata["authorization"] for c in calls} == {f"Bearer {GRPC_KEY}"}
    assert_no_key(done.stdout)


def test_a_long_grpc_stream_holds_its_concurrency_slot(limited_h2_sidecar, grpc_upstream,
                                                        marker):
    """One stream is one request: a server-streaming call that is still open holds the only
    slot of concurrentRequests: 1, so a second call is refused (gRPC RESOURCE_EXHAUSTED, with
    keyhole's reason) until the first ends."""
    with _channel(limited_h2_sidecar, grpc_upstream) as channel:
        hanging = _call(channel, "unary_stream", "Hang")(b"", metadata=[("x-marker", marker)],
                                                         timeout=30)
        assert next(hanging) == b"started"
        with pytest.raises(grpc.RpcError) as refused:
            _call(channel, "unary_unary", "Unary")(b"x", metadata=[("x-marker", marker + "b")],
                                                   timeout=20)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "concurrentRequests" in refused.value.details()
        assert grpc_upstream.find(marker + "b") == []
        hanging.cancel()
        limited_h2_sidecar.wait_audit(lambda r: r.get("path") == "/echo.Echo/Hang")
        answer = _call(channel, "unary_unary", "Unary")(b"y", metadata=[("x-marker", marker)],
                                                        timeout=20)
    assert answer == b"unary:y"
