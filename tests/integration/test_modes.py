"""The proxy's modes: CONNECT (routed and not), absolute-form http:// and https://, base-URL,
and the streaming they must all do without buffering whole bodies."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time

import aiohttp
import openai

from tests.integration.clients import curl
from tests.support import aio
from tests.support.config import API_TOKEN, MAPS_KEY, STRIPE_KEY, WILD_KEY
from tests.support.raw import exchange, status_of


def test_connect_to_an_unrouted_host_is_a_blind_tunnel(sidecar, upstream, marker):
    reply = curl(sidecar, f"https://unrouted.test/{marker}")
    assert reply.status == 200
    seen = upstream.one(marker)
    assert seen.header("Authorization") == []
    assert seen.header("X-Api-Key") == []
    tunnel = sidecar.wait_audit(lambda r: r["mode"] == "tunnel" and r["host"] == "unrouted.test:443")
    assert tunnel["decision"] == "passthrough"
    assert tunnel["bytes_out"] > 0


def test_connect_to_an_unrouted_host_is_refused_with_unmatched_deny(deny_sidecar, upstream, marker):
    done = subprocess.run(["curl", "-sS", f"https://unrouted.test/{marker}"],
                          env=deny_sidecar.client_env(), capture_output=True, text=True)
    assert done.returncode != 0
    assert "403" in done.stderr
    assert upstream.find(marker) == []


def test_routed_hosts_still_work_with_unmatched_deny(deny_sidecar, upstream, marker):
    assert curl(deny_sidecar, f"https://api.routed.test/{marker}").status == 200
    assert upstream.one(marker).header("Authorization") == [f"Bearer {API_TOKEN}"]


def test_plain_http_to_an_unrouted_host_is_forwarded_as_it_is(sidecar, plain_upstream, marker):
    reply = curl(sidecar, "-H", "Authorization: mine",
                 f"http://plain.unrouted.test:{plain_upstream.port}/{marker}")
    assert reply.status == 200
    seen = plain_upstream.one(marker)
    assert seen.header("Authorization") == ["mine"]  # nothing routed, nothing touched


def test_plain_http_to_an_unrouted_host_is_refused_with_unmatched_deny(deny_sidecar, plain_upstream,
                                                                        marker):
    reply = curl(deny_sidecar, f"http://plain.unrouted.test:{plain_upstream.port}/{marker}")
    assert reply.status == 403
    assert "--unmatched deny" in reply.body
    assert plain_upstream.find(marker) == []


def test_absolute_form_https_request_in_the_clear_is_routed(sidecar, upstream, marker):
    """axios <= 1.7 sends https:// URLs to the proxy without CONNECT."""
    answer = exchange(sidecar.proxy_port, (
        f"GET https://api.routed.test/{marker} HTTP/1.1\r\nHost: api.routed.test\r\n"
        "Connection: close\r\n\r\n").encode())
    assert status_of(answer) == 200
    assert upstream.one(marker).header("Authorization") == [f"Bearer {API_TOKEN}"]


def test_base_url_mode_routes_by_the_first_path_segment(sidecar, upstream, marker):
    reply = curl(sidecar, f"{sidecar.url}/api/v1/{marker}?a=1")
    assert reply.status == 200
    seen = upstream.one(marker)
    assert seen.path == f"/v1/{marker}?a=1"
    assert seen.header("Authorization") == [f"Bearer {API_TOKEN}"]
    assert seen.header("Host") == ["api.routed.test"]


def test_base_url_mode_answers_404_for_an_unknown_injection(sidecar, upstream, marker):
    reply = curl(sidecar, f"{sidecar.url}/nosuch/{marker}")
    assert reply.status == 404
    assert "no injection is named 'nosuch'" in reply.body
    assert upstream.find(marker) == []


def test_base_url_dot_segments_are_resolved_before_routing(sidecar, upstream, marker):
    reply = curl(sidecar, "--path-as-is", f"{sidecar.url}/api/v1/x/%2e%2e/{marker}")
    assert reply.status == 200
    assert upstream.one(marker).path == f"/v1/{marker}"


def test_base_url_cannot_climb_out_of_the_path_into_another_name(sidecar, upstream, marker):
    reply = curl(sidecar, "--path-as-is", f"{sidecar.url}/api/%2e%2e/%2E%2E/etc/{marker}")
    assert reply.status == 404
    assert upstream.find(marker) == []


def test_openai_sdk_streams_chat_completions_in_base_url_mode(sidecar, upstream):
    client = openai.OpenAI(base_url=f"{sidecar.url}/api/v1", api_key="placeholder-not-a-key",
                           max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    client.close()
    assert text == "Hello from upstream"
    seen = [r for r in upstream.received if r.path == "/v1/chat/completions"][-1]
    assert seen.header("Authorization") == [f"Bearer {API_TOKEN}"]


def test_basic_auth_is_injected(sidecar, upstream, marker):
    curl(sidecar, f"https://basic.routed.test/{marker}")
    import base64
    expected = "Basic " + base64.b64encode(f"{STRIPE_KEY}:".encode()).decode()
    assert upstream.one(marker).header("Authorization") == [expected]


def test_query_parameter_is_injected(sidecar, upstream, marker):
    curl(sidecar, f"https://query.routed.test/{marker}?q=coffee")
    assert upstream.one(marker).path == f"/{marker}?q=coffee&key={MAPS_KEY}"


def test_wildcard_matches_exactly_one_more_label(sidecar, upstream, marker):
    curl(sidecar, f"https://a.wild.test/{marker}")
    assert upstream.one(marker).header("X-Api-Key") == [WILD_KEY]


def test_host_names_match_case_insensitively_and_without_the_trailing_dot(sidecar, upstream,
                                                                         marker):
    reply = curl(sidecar, "--resolve", "x:1:127.0.0.1", f"https://API.Routed.TEST./{marker}")
    assert reply.status == 200
    assert upstream.one(marker).header("Authorization") == [f"Bearer {API_TOKEN}"]


def test_server_sent_events_reach_the_client_as_they_are_sent(sidecar, upstream, marker):
    """Five events 0.4 s apart: a buffering proxy would deliver them all at the end."""
    arrivals = []
    start = time.monotonic()
    with subprocess.Popen(["curl", "-sSN", f"https://api.routed.test/sse?n=5&delay=0.4&m={marker}"],
                          env=sidecar.client_env(), stdout=subprocess.PIPE) as proc:
        for line in proc.stdout:
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 5
    assert arrivals[-1] - arrivals[0] > 1.2  # spread out as sent, not bunched at the end
    assert arrivals[0] < arrivals[-1] - 1.2


def test_large_download_streams_with_flat_memory(sidecar, upstream, marker):
    size = 256 * 1024 * 1024
    before = sidecar.rss_peak_kib()
    done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}",
                           f"https://api.routed.test/download?bytes={size}&m={marker}"],
                          env=sidecar.client_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == size
    grown_mib = (sidecar.rss_peak_kib() - before) / 1024
    assert grown_mib < 64, f"the proxy's peak memory grew {grown_mib:.0f} MiB for a 256 MiB body"


def test_large_upload_streams_with_flat_memory(sidecar, upstream, marker, tmp_path):
    size = 256 * 1024 * 1024
    blob = tmp_path / "blob"
    with open(blob, "wb") as fh:
        fh.truncate(size)
    before = sidecar.rss_peak_kib()
    done = subprocess.run(["curl", "-sS", "-T", str(blob), "-X", "POST",
                           f"https://api.routed.test/upload?m={marker}"],
                          env=sidecar.client_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["size"] == size
    assert result["sha256"] == hashlib.sha256(b"\0" * size).hexdigest()
    grown_mib = (sidecar.rss_peak_kib() - before) / 1024
    assert grown_mib < 64, f"the proxy's peak memory grew {grown_mib:.0f} MiB for a 256 MiB body"


def test_chunked_upload_reaches_the_upstream_whole(sidecar, upstream, marker):
    done = subprocess.run(["curl", "-sS", "-H", "Transfer-Encoding: chunked", "--data-binary",
                           "@-", f"https://api.routed.test/upload?m={marker}"],
                          input=b"x" * 100_000, env=sidecar.client_env(), capture_output=True,
                          timeout=60)
    assert json.loads(done.stdout)["size"] == 100_000


def test_websocket_upgrade_gets_the_header_injected_and_messages_redacted(sidecar, upstream,
                                                                          marker):
    async def talk():
        async with aiohttp.ClientSession() as session:
            import ssl
            context = ssl.create_default_context(cafile=str(sidecar.ca_cert))
            async with session.ws_connect(f"wss://api.routed.test/ws?m={marker}",
                                          proxy=sidecar.url, ssl=context,
                                          protocols=("chat",)) as ws:
                hello = await ws.receive_str(timeout=5)
                await ws.send_str("ping")
                echo = await ws.receive_str(timeout=5)
                return hello, echo, ws.protocol

    hello, echo, protocol = aio.run(talk())
    assert protocol == "chat"
    assert upstream.one(marker).header("Authorization") == [f"Bearer {API_TOKEN}"]
    assert API_TOKEN not in hello and "[REDACTED]" in hello
    assert echo.startswith("echo: ping") and API_TOKEN not in echo
