"""Every refusal reaches an HTTP/2 client whose request has a body (issue 30, item 7).

keyhole refuses as soon as the head is judged, often before the body has arrived. It sends the
whole answer, reads and drops the rest of the body (up to 4 MiB, for up to 2 s) so the client
finishes sending and reads its answer, and only a client still sending after that gets
RST_STREAM NO_ERROR (RFC 9113 §8.1). Before, the reset went out right behind the answer and
curl, in 2 runs of 3, reported "stream 1 closed" with no status at all.

Each refusal kind — rules, requestBodyBytes, a rate limit, a budget, an unavailable Secret —
with a small body and a large one, from curl, httpx and Node's http2 client, each many times
over one or many connections: a race shows as a missing status. Past the allowance, curl and
Node still read their answer (httpx reads none until its whole body is sent: docs/sidecar.md).
"""

from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import pytest

from tests.support.config import SECRETS, injection, ref, resolve_all
from tests.support.raw import open_tunnel
from tests.support.sidecar import start_sidecar

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
ROUNDS = 8
SIZES = {"small body": 100, "512 KiB body": 512 << 10}  # under 1 MiB: a budget reads it
PAST_THE_ALLOWANCE = 5 << 20

# kind → (url, the status every request must get)
REFUSALS = {
    "rules": ("https://rules.routed.test/nope", 405),
    "requestBodyBytes": ("https://other.routed.test/v1/x", 413),
    "rate limit": ("https://basic.routed.test/v1/x", 429),
    "budget": ("https://a.wild.test/v1/chat/completions", 429),
    "unavailable Secret": ("https://query.routed.test/v1/x", 503),
}


@pytest.fixture(scope="module")
def refusing(tmp_path_factory, upstream):
    header = [{"name": "Authorization", "valueFrom": ref("api-credentials", "token")}]
    injections = [
        injection("rules", hosts=["rules.routed.test"], headers=header,
                  rules=[{"methods": ["GET"], "paths": ["/v1/models"]}]),
        injection("body", hosts=["other.routed.test"], headers=header,
                  limits={"requestBodyBytes": 8}),
        injection("rate", hosts=["basic.routed.test"], headers=header,  # spent at start
                  limits={"requestsPerMinute": 1, "burst": 1}),
        injection("budget", hosts=["a.wild.test"], headers=header,  # no price: no spend
                  llm={"api": "openai", "budgets": [{"per": "day", "spend": 1}]}),
        injection("gone", hosts=["query.routed.test"],
                  headers=[{"name": "Authorization", "valueFrom": ref("missing", "key")}]),
    ]
    sidecar = start_sidecar(tmp_path_factory.mktemp("h2-refusals"), injections, SECRETS,
                            resolve=resolve_all(upstream.port), upstream_ca=upstream.ca_file)
    with httpx.Client(proxy=sidecar.url, verify=ssl.create_default_context(
            cafile=str(sidecar.ca_cert))) as client:  # the rate limit's one request
        assert client.get("https://basic.routed.test/v1/spend").status_code == 200
    yield sidecar
    sidecar.stop()


def _body(size: int) -> bytes:
    return b'{"model":"unpriced-model","x":"' + b"x" * size + b'"}'


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("kind", REFUSALS)
def test_curl_gets_every_refusal_over_http2(refusing, kind, size, tmp_path):
    url, status = REFUSALS[kind]
    (tmp_path / "body").write_bytes(_body(size))
    got = []
    for _ in range(ROUNDS):
        done = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--http2",
             "-H", "content-type: application/json", "--data-binary", f"@{tmp_path / 'body'}",
             url], env=refusing.client_env(), capture_output=True, text=True, timeout=30)
        got.append(done.stdout)
    assert got == [f"{status} 2"] * ROUNDS


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("kind", REFUSALS)
def test_httpx_gets_every_refusal_over_one_http2_connection(refusing, kind, size):
    url, status = REFUSALS[kind]
    with httpx.Client(http1=False, http2=True, proxy=refusing.url, timeout=10,
                      verify=ssl.create_default_context(cafile=str(refusing.ca_cert))) as client:
        answers = [client.post(url, content=_body(size)) for _ in range(ROUNDS)]
    assert [(a.status_code, a.http_version) for a in answers] == [(status, "HTTP/2")] * ROUNDS
    assert all(a.headers["x-keyhole-error"] for a in answers)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("kind", REFUSALS)
def test_node_http2_gets_every_refusal(refusing, kind, size):
    url, status = REFUSALS[kind]
    done = subprocess.run(["node", str(CLIENTS / "h2_posts.mjs"), refusing.url, url,
                           str(ROUNDS), str(size)], env=refusing.client_env(),
                          capture_output=True, text=True, timeout=60, cwd=CLIENTS)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [status] * ROUNDS


@pytest.mark.parametrize("client", ["curl", "node"])
def test_a_body_past_the_allowance_still_gets_its_answer(refusing, client, tmp_path):
    url, status = REFUSALS["requestBodyBytes"]
    if client == "curl":
        (tmp_path / "body").write_bytes(_body(PAST_THE_ALLOWANCE))
        done = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--http2",
                               "--data-binary", f"@{tmp_path / 'body'}", url],
                              env=refusing.client_env(), capture_output=True, text=True,
                              timeout=30)
        assert done.stdout == str(status)
    else:
        # One request a session: Node itself refuses a second stream (ENHANCE_YOUR_CALM)
        # while 5 MiB of the first wait in its buffers (its maxSessionMemory, 10 MB).
        done = subprocess.run(["node", str(CLIENTS / "h2_posts.mjs"), refusing.url, url, "1",
                               str(PAST_THE_ALLOWANCE)], env=refusing.client_env(),
                              capture_output=True, text=True, timeout=60, cwd=CLIENTS)
        assert json.loads(done.stdout) == [status]


def test_a_client_still_sending_is_reset_with_no_error_after_its_whole_answer(refusing):
    """Frame by frame (the ``h2`` library as the client): the answer ends its stream, then
    RST_STREAM NO_ERROR stops the sender once it passes the allowance; the connection goes on
    serving."""
    _, status = REFUSALS["rules"]
    events = []
    with open_tunnel(refusing.proxy_port, "rules.routed.test:443", str(refusing.ca_cert),
                     alpn=["h2"]) as tls:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":scheme", "https"),
                              (":authority", "rules.routed.test"), (":path", "/nope")])
        tls.sendall(conn.data_to_send())
        tls.settimeout(10)
        sent = 0
        while not any(isinstance(e, h2.events.StreamReset) for e in events):
            window = min(conn.local_flow_control_window(1), conn.max_outbound_frame_size)
            if window and sent < PAST_THE_ALLOWANCE:
                conn.send_data(1, b"x" * window)
                sent += window
                tls.sendall(conn.data_to_send())
                continue
            events += conn.receive_data(tls.recv(65536))
            tls.sendall(conn.data_to_send())
        kinds = [type(e).__name__ for e in events if getattr(e, "stream_id", None) == 1
                 and not isinstance(e, h2.events.WindowUpdated)]  # the allowance's windows
        assert kinds[0] == "ResponseReceived" and kinds[-2:] == ["StreamEnded", "StreamReset"]
        answer = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
        assert dict(answer.headers)[b":status"] == str(status).encode()
        assert events[-1].error_code == h2.errors.ErrorCodes.NO_ERROR
        assert sent > 1 << 20  # it was let send on (to 4 MiB or for 2 s) before the reset
        conn.send_headers(3, [(":method", "GET"), (":scheme", "https"),
                              (":authority", "rules.routed.test"), (":path", "/v1/models")],
                          end_stream=True)
        tls.sendall(conn.data_to_send())
        while not any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 3 for e in events):
            events += conn.receive_data(tls.recv(65536))
        answer = next(e for e in events if isinstance(e, h2.events.ResponseReceived)
                      and e.stream_id == 3)
        assert dict(answer.headers)[b":status"] == b"200"
