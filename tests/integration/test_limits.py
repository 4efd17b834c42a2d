"""spec.limits with the real sidecar and real clients: exact counts at and over each limit,
driven by a clock the test sets (``KEYHOLE_TEST_CLOCK``, docs/limits.md), so nothing here
depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import threading
import time

import aiohttp
import openai
import pytest

from tests.integration.clients import curl
from tests.support import aio
from tests.support.config import API_TOKEN, injection, ref
from tests.support.sidecar import write_injections

HOST = "api.routed.test"
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z: a fixed "now" the tests move by hand


def limited(limits: dict | None = None, rules: list | None = None) -> list[dict]:
    spec = {"hosts": [HOST], "headers": [{"name": "Authorization", "format": "Bearer {value}",
                                           "valueFrom": ref("api-credentials", "token")}]}
    if limits is not None:
        spec["limits"] = limits
    if rules is not None:
        spec["rules"] = rules
    return [injection("api", **spec)]


@pytest.fixture
def clock(tmp_path, monkeypatch):
    """The sidecar's "now": a file of seconds since the epoch; ``clock.set(t)`` moves it."""
    path = tmp_path / "clock"

    class Clock:
        def set(self, seconds: float) -> None:
            path.write_text(repr(seconds))

    c = Clock()
    c.set(T0)
    monkeypatch.setenv("KEYHOLE_TEST_CLOCK", str(path))
    return c


def _read(path) -> str:
    return path.read_text() if path.exists() else ""


def retry_after(reply) -> str | None:
    return next((v for k, v in reply.headers if k.lower() == "retry-after"), None)


def get(sidecar, marker: str, *extra: str, path: str = "/v1/models"):
    return curl(sidecar, *extra, f"https://{HOST}{path}?m={marker}")


def test_a_burst_is_let_through_and_the_next_request_is_a_429_with_a_computed_retry_after(
        make_sidecar, upstream, clock, marker):
    sidecar = make_sidecar(limited({"requestsPerMinute": 6, "burst": 3}))
    assert [get(sidecar, marker).status for _ in range(3)] == [200, 200, 200]
    refused = get(sidecar, marker)
    assert refused.status == 429
    assert retry_after(refused) == "10"  # one token every 10 s at 6 a minute
    body = json.loads(refused.body)
    assert (body["error"], body["injection"], body["limit"]) == ("rate_limited", "api",
                                                                  "requestsPerMinute")
    assert body["retryAfterSeconds"] == 10 and body["resetsAt"] == "2027-01-15T08:00:10Z"
    assert len(upstream.find(marker)) == 3  # nothing of the fourth went upstream
    clock.set(T0 + 9.9)
    assert get(sidecar, marker).status == 429
    clock.set(T0 + 10)
    assert get(sidecar, marker).status == 200
    assert get(sidecar, marker).status == 429
    assert sidecar.metric("keyhole_limit_rejections_total", injection="api",
                          limit="requestsPerMinute") == 3
    record = sidecar.wait_audit(lambda r: r["status"] == 429)
    assert (record["decision"], record["reason"]) == ("denied", "rate_limited")
    assert API_TOKEN not in refused.body


def test_without_a_burst_the_bucket_holds_a_minute_of_requests(make_sidecar, clock, marker):
    sidecar = make_sidecar(limited({"requestsPerMinute": 4}))
    assert [get(sidecar, marker).status for _ in range(5)] == [200, 200, 200, 200, 429]


def test_concurrent_requests_count_streams_until_they_end(make_sidecar, upstream, clock, marker):
    sidecar = make_sidecar(limited({"concurrentRequests": 2}))
    results = []

    def stream():
        results.append(curl(sidecar, f"https://{HOST}/sse?n=6&delay=0.3&m={marker}").status)

    streams = [threading.Thread(target=stream) for _ in range(2)]
    for thread in streams:
        thread.start()
    upstream.wait_for(marker, count=2)  # both streams are under way
    refused = get(sidecar, f"{marker}-third")
    assert refused.status == 429 and json.loads(refused.body)["limit"] == "concurrentRequests"
    assert retry_after(refused) == "1"
    assert upstream.find(f"{marker}-third") == []
    for thread in streams:
        thread.join(30)
    assert results == [200, 200]
    assert get(sidecar, f"{marker}-after").status == 200  # the streams ended: slots are free


def test_an_open_websocket_holds_its_slot_until_it_closes(make_sidecar, clock, marker):
    sidecar = make_sidecar(limited({"concurrentRequests": 1}))

    async def talk():
        context = ssl.create_default_context(cafile=str(sidecar.ca_cert))
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"wss://{HOST}/ws?m={marker}", proxy=sidecar.url, ssl=context) as ws:
            await ws.receive_str(timeout=5)
            during = await asyncio.to_thread(get, sidecar, f"{marker}-during")
        return during.status

    assert aio.run(talk()) == 429
    deadline = time.monotonic() + 5  # the proxy sees the close, then frees the slot
    while get(sidecar, f"{marker}-after").status != 200:
        assert time.monotonic() < deadline, "the slot was not freed after the WebSocket closed"
        time.sleep(0.1)


def test_a_body_over_request_body_bytes_is_a_413_before_any_byte_goes_upstream(
        make_sidecar, upstream, clock, marker):
    sidecar = make_sidecar(limited({"requestBodyBytes": 1000}))
    ok = curl(sidecar, "-X", "POST", "--data-binary", "x" * 1000, f"https://{HOST}/up?m={marker}")
    assert ok.status == 200
    refused = curl(sidecar, "-X", "POST", "--data-binary", "x" * 1001,
                   f"https://{HOST}/up?m={marker}-big")
    assert refused.status == 413 and json.loads(refused.body)["limit"] == "requestBodyBytes"
    chunked = curl(sidecar, "-X", "POST", "-H", "Transfer-Encoding: chunked", "--data-binary",
                   "y" * 5000, f"https://{HOST}/up?m={marker}-chunked")
    assert chunked.status == 413  # no length announced: read up to the limit first
    assert upstream.find(f"{marker}-big") == [] and upstream.find(f"{marker}-chunked") == []
    assert sidecar.metric("keyhole_limit_rejections_total", injection="api",
                          limit="requestBodyBytes") == 2


def test_a_window_survives_kill_9_and_resets_at_the_utc_boundary(make_sidecar, upstream, clock,
                                                                 tmp_path, marker):
    state = tmp_path / "state"
    config = limited({"window": {"perHour": 3}})
    sidecar = make_sidecar(config, args=["--state-dir", str(state)])
    clock.set(T0 + 1800)  # 08:30 UTC
    assert [get(sidecar, marker).status for _ in range(2)] == [200, 200]
    assert sidecar.metric("keyhole_limit_window_remaining", injection="api", window="perHour") == 1
    deadline = time.monotonic() + 5  # counts reach the disk within a second (docs/limits.md)
    saved = '"api|spec|perHour": [1800000000.0, 2]'  # the 08:00 UTC hour, two requests
    while saved not in _read(state / "limits.json") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert saved in _read(state / "limits.json")
    sidecar.process.send_signal(signal.SIGKILL)
    sidecar.process.wait(10)
    again = make_sidecar(config, args=["--state-dir", str(state)])
    assert get(again, marker).status == 200  # the third of the hour
    refused = get(again, marker)
    assert refused.status == 429
    assert retry_after(refused) == "1800"  # until 09:00 UTC
    body = json.loads(refused.body)
    assert (body["limit"], body["resetsAt"]) == ("window.perHour", "2027-01-15T09:00:00Z")
    clock.set(T0 + 3600)
    assert get(again, marker).status == 200
    assert len(upstream.find(marker)) == 4


def test_a_reload_that_lowers_a_limit_keeps_the_count(make_sidecar, clock, marker):
    sidecar = make_sidecar(limited({"window": {"perDay": 10}}))
    assert [get(sidecar, marker).status for _ in range(3)] == [200, 200, 200]
    write_injections(sidecar.injections, limited({"window": {"perDay": 4}}))
    sidecar.wait_for_log("reloaded configuration")
    assert [get(sidecar, marker).status for _ in range(2)] == [200, 429]


def test_a_rules_own_limits_replace_the_injections(make_sidecar, clock, marker):
    sidecar = make_sidecar(limited(
        {"requestsPerMinute": 60, "burst": 100},
        rules=[{"methods": ["POST"], "paths": ["/v1/chat/completions"],
                "limits": {"requestsPerMinute": 2}},
               {"methods": ["GET"]}]))
    posts = [curl(sidecar, "-X", "POST", "-H", "Content-Type: application/json", "--data",
                  '{"model":"m","messages":[]}', f"https://{HOST}/v1/chat/completions").status
             for _ in range(3)]
    assert posts == [200, 200, 429]
    assert [get(sidecar, marker).status for _ in range(20)] == [200] * 20  # GET: the spec's


def test_the_openai_sdk_backs_off_on_the_429_and_succeeds(make_sidecar, upstream, marker,
                                                          monkeypatch):
    """Real time here (the SDK sleeps for real): at 60 a minute with a burst of one, the second
    call is refused with Retry-After 1 and the SDK's retry a second later goes through."""
    monkeypatch.delenv("KEYHOLE_TEST_CLOCK", raising=False)
    sidecar = make_sidecar(limited({"requestsPerMinute": 60, "burst": 1}))
    client = openai.OpenAI(base_url=f"{sidecar.url}/api/v1", api_key="placeholder-not-a-key",
                           max_retries=2)
    started = time.monotonic()
    assert client.models.list().data[0].id == "test-model"
    assert client.models.list().data[0].id == "test-model"  # after one 429 and a wait
    client.close()
    assert time.monotonic() - started >= 0.9
    assert sidecar.metric("keyhole_limit_rejections_total", injection="api",
                          limit="requestsPerMinute") >= 1
    assert len([r for r in upstream.received if r.path == "/v1/models"]) >= 2
