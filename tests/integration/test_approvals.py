"""Approvals fail closed where nobody can approve: a standalone sidecar (no operator channel)
or one whose operator does not answer refuses a request that needs a person's yes, in the
protocol's own shape, and never sends it; what needs none passes. The flow with a person
deciding runs on the real API server (tests/cluster/test_approvals.py)."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.test_mcp import ACCEPT, _answer, _open_session, _rpc
from tests.support.config import injection, ref
from tests.support.mcp import TOKEN
from tests.support.sidecar import start_sidecar

HELD = injection("held", hosts=["api.routed.test"],
                 headers=[{"name": "Authorization", "valueFrom": ref("api-credentials", "token"),
                           "format": "Bearer {value}"}],
                 rules=[{"methods": ["POST"], "paths": ["/v1/refunds"],
                         "approval": {"timeout": "5s"}}, {"methods": ["GET"]}])


def test_a_standalone_sidecar_refuses_what_needs_approval_and_sends_nothing(
        make_sidecar, upstream, marker):
    proxy = make_sidecar([HELD])
    with httpx.Client(timeout=20) as client:
        refused = client.post(f"{proxy.url}/held/v1/refunds?m={marker}", json={"charge": 1})
        passed = client.get(f"{proxy.url}/held/v1/charges?m={marker}")
    assert refused.status_code == 503
    assert refused.headers["X-Keyhole-Error"] == "approval_unavailable"
    body = refused.json()
    assert body["error"] == "approval_unavailable" and body["injection"] == "held"
    assert "POST https://api.routed.test/v1/refunds" in body["message"]
    assert "without the operator channel" in body["message"]
    assert passed.status_code == 200
    assert [r.method for r in upstream.find(marker)] == ["GET"]
    line = proxy.wait_audit(lambda r: r.get("reason") == "approval_unavailable")
    assert line["approval"] == {"decision": "unavailable", "waited": 0.0}
    assert proxy.metric("keyhole_approvals_total", injection="held",
                        decision="unavailable") == 1


def test_an_operator_that_does_not_answer_fails_closed(tmp_path, upstream, test_ca, marker):
    token, ca = tmp_path / "token", tmp_path / "operator-ca.crt"
    token.write_text("not-a-token")
    ca.write_text(test_ca[0].cert_pem.bytes().decode())
    from tests.support.config import SECRETS, resolve_all
    from tests.support.ports import free_port

    proxy = start_sidecar(tmp_path / "sidecar", [HELD], SECRETS,
                          resolve=resolve_all(upstream.port), upstream_ca=upstream.ca_file,
                          args=["--operator-url", f"https://127.0.0.1:{free_port()}",
                                "--operator-ca", str(ca), "--operator-token", str(token)])
    try:
        with httpx.Client(timeout=20) as client:
            refused = client.post(f"{proxy.url}/held/v1/refunds?m={marker}", json={})
        assert refused.status_code == 503
        assert refused.headers["X-Keyhole-Error"] == "approval_unavailable"
        assert "did not answer" in refused.json()["message"]
        assert upstream.find(marker) == []
    finally:
        proxy.stop()


@pytest.fixture
def held_mcp(tmp_path, test_ca, mcp_upstreams):
    server = mcp_upstreams["json"]
    proc = start_sidecar(
        tmp_path / "sidecar",
        [injection("mcp-json", hosts=[f"mcp-json.test:{server.port}"],
                   mcp={"tools": {"approval": [{"match": ["merge_*"], "timeout": "5s"}]}},
                   headers=[{"name": "Authorization", "valueFrom": ref("github", "token"),
                             "format": "Bearer {value}"}])],
        {"github": {"token": TOKEN}}, upstream_ca=test_ca[1],
        resolve=[f"mcp-json.test:{server.port}:127.0.0.1"])
    yield proc, server
    proc.stop()


def test_an_mcp_use_that_needs_approval_is_a_tool_error_the_model_reads(held_mcp):
    proxy, server = held_mcp
    url = f"{proxy.url}/mcp-json/mcp"
    with httpx.Client(timeout=20) as client:
        session = _open_session(client, url, "2025-11-25")
        held = _rpc(client, url, 7, "tools/call", {"name": "merge_pull_request",
                                                   "arguments": {"number": 1}}, **session)
        free = _answer(_rpc(client, url, 8, "tools/call", {"name": "get_issue",
                                                           "arguments": {"number": 2}},
                            **session))
        batch = client.post(url, json=[
            {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
             "params": {"name": "merge_pull_request", "arguments": {"number": 3}}},
            {"jsonrpc": "2.0", "id": 10, "method": "tools/call",
             "params": {"name": "get_issue", "arguments": {"number": 4}}}],
            headers={**ACCEPT, **session})
    assert held.headers["X-Keyhole-Error"] == "approval_unavailable"
    answer = _answer(held)
    assert answer["id"] == 7 and answer["result"]["isError"] is True
    assert "the tool 'merge_pull_request'" in answer["result"]["content"][0]["text"]
    assert "issue 2" in free["result"]["content"][0]["text"]
    assert batch.headers["X-Keyhole-Error"] == "approval_batch"
    assert all("sent alone" in a["result"]["content"][0]["text"] for a in batch.json())
    assert "merge_pull_request" not in server.calls()
