"""MCP tool policy (``spec.mcp``) with the official Python SDK on both ends: its client talks
through the real sidecar (CONNECT and base-URL) to its server (Streamable HTTP, answering in
JSON or in server-sent events) and the legacy HTTP+SSE transport, whose answers (refusals
among them) come on the session's event stream. The agent's listings hold only what it may use; a refused
call comes back as MCP says a failure does, and never reaches the server (its own record of
every request it received says so)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.support.mcp import MODES, TOKEN


@contextlib.asynccontextmanager
async def _client(mcp_proxy, mcp_upstreams, mode: str, door: str) -> AsyncIterator[Client]:
    """The SDK's client, through CONNECT (the proxy variables' way) or to the base URL; over
    Streamable HTTP, or the legacy HTTP+SSE transport for the ``legacy`` server."""
    path = "/sse" if mode == "legacy" else "/mcp"
    if door == "base-url":
        url = f"{mcp_proxy.url}/mcp-{mode}{path}"
        options = {}
    else:  # "connect", or "connect-h2": HTTP/2 to the proxy inside the tunnel
        url = f"https://mcp-{mode}.test:{mcp_upstreams[mode].port}{path}"
        options = {"proxy": mcp_proxy.url, "http2": door == "connect-h2",
                   "verify": ssl.create_default_context(cafile=str(mcp_proxy.bundle))}

    def http(**more) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(**{"timeout": 30, **more, **options})

    if mode == "legacy":
        transport = sse_client(url, httpx_client_factory=http)
        async with Client(transport, mode="legacy") as client:
            yield client
        return
    async with http() as client_http, Client(streamable_http_client(
            url, http_client=client_http), mode="legacy") as client:
        yield client


DOORS = [(mode, door) for mode in MODES for door in ("connect", "base-url")] + [
    ("sse", "connect-h2"), ("legacy", "connect-h2")]


@pytest.mark.parametrize(("mode", "door"), DOORS)
def test_the_agent_lists_and_calls_only_what_it_may(mcp_proxy, mcp_upstreams, mode, door):
    server = mcp_upstreams[mode]

    async def session():
        async with _client(mcp_proxy, mcp_upstreams, mode, door) as client:
            tools = sorted(t.name for t in (await client.list_tools()).tools)
            allowed = await client.call_tool("get_issue", {"number": 7})
            echoed = await client.call_tool("get_whoami", {})
            refused = await client.call_tool("delete_repository", {"name": "prod"})
            resources = sorted(str(r.uri) for r in (await client.list_resources()).resources)
            prompts = sorted(p.name for p in (await client.list_prompts()).prompts)
            return tools, allowed, echoed, refused, resources, prompts

    tools, allowed, echoed, refused, resources, prompts = asyncio.run(session())
    assert tools == ["get_file_contents", "get_issue", "get_whoami", "list_issues"]
    assert not allowed.is_error and "issue 7" in allowed.content[0].text
    assert echoed.content[0].text == "you sent [REDACTED]"  # redaction works on MCP too
    assert refused.is_error
    assert "keyhole" in refused.content[0].text and "delete_repository" in \
        refused.content[0].text
    assert resources == ["repo://readme"]
    assert prompts == ["summarise"]
    assert "delete_repository" not in server.calls()
    assert {e["authorization"] for e in server.received()} == {f"Bearer {TOKEN}"}
    if door == "connect-h2":
        assert mcp_proxy.wait_audit(lambda r: r["path"].startswith("/")
                                    and r["protocol"] == "h2" and r.get("mcp"))


def test_a_condition_on_the_arguments_decides_the_call(mcp_proxy, mcp_upstreams):
    server = mcp_upstreams["json"]

    async def session():
        async with _client(mcp_proxy, mcp_upstreams, "json", "base-url") as client:
            fine = await client.call_tool("get_file_contents", {"path": "src/main.py"})
            workflow = await client.call_tool("get_file_contents",
                                              {"path": ".github/workflows/release.yml"})
            missing = await client.call_tool("get_file_contents", {})
            return fine, workflow, missing

    before = len(server.calls())
    fine, workflow, missing = asyncio.run(session())
    assert not fine.is_error and "src/main.py" in fine.content[0].text
    assert workflow.is_error and "workflow files are off limits" in workflow.content[0].text
    assert missing.is_error and "could not be evaluated" in missing.content[0].text
    assert server.calls()[before:] == ["get_file_contents"]  # only the allowed one went


@pytest.mark.parametrize("mode", MODES)
def test_a_refused_resource_or_prompt_is_a_json_rpc_error(mcp_proxy, mcp_upstreams, mode):
    server = mcp_upstreams[mode]

    async def session():
        async with _client(mcp_proxy, mcp_upstreams, mode, "connect") as client:
            readme = await client.read_resource("repo://readme")
            with pytest.raises(MCPError) as vault:
                await client.read_resource("vault://keys")
            with pytest.raises(MCPError) as prompt:
                await client.get_prompt("jailbreak")
            return readme, vault.value, prompt.value

    readme, vault, prompt = asyncio.run(session())
    assert readme.contents[0].text == "# the readme"
    assert "keyhole" in str(vault) and "vault://keys" in str(vault)
    assert "keyhole" in str(prompt) and "jailbreak" in str(prompt)
    bodies = "\n".join(e["body"] for e in server.received())
    assert "vault://keys" not in bodies and "jailbreak" not in bodies


def test_each_decision_is_audited_and_counted(mcp_proxy, mcp_upstreams):
    async def session():
        async with _client(mcp_proxy, mcp_upstreams, "json", "base-url") as client:
            await client.call_tool("merge_pull_request", {"number": 1})

    asyncio.run(session())
    line = mcp_proxy.wait_audit(lambda r: any(c.get("tool") == "merge_pull_request"
                                          for c in r.get("mcp") or []))
    assert line["decision"] == "denied" and line["reason"] == "mcp_not_allowed"
    assert line["mcp"] == [{"method": "tools/call", "tool": "merge_pull_request",
                            "decision": "denied", "reason": "not_allowed"}]
    assert mcp_proxy.metric("keyhole_mcp_calls_total", injection="mcp-json", kind="tools",
                        tool="merge_pull_request", decision="denied") >= 1


ACCEPT = {"Accept": "application/json, text/event-stream"}


def _rpc(client, url: str, ident, method: str, params=None, **headers):
    """One JSON-RPC message POSTed by hand (``ident`` None: a notification)."""
    body = {"jsonrpc": "2.0", "method": method, "params": params or {}}
    if ident is not None:
        body["id"] = ident
    return client.post(url, json=body, headers={**ACCEPT, **headers})


def _answer(reply) -> dict:
    """The JSON-RPC answer of a POST, whether it came as JSON or as events."""
    data = [line[5:].strip() for line in reply.text.splitlines() if line.startswith("data:")]
    return json.loads(data[-1] if data else reply.text)


def _open_session(client, url: str, version: str) -> dict:
    """Initialize as a client of ``version`` does; the headers every later request carries
    (``MCP-Protocol-Version`` came with 2025-06-18)."""
    hello = _rpc(client, url, 1, "initialize", {
        "protocolVersion": version, "capabilities": {},
        "clientInfo": {"name": "by-hand", "version": "1"}})
    session = {"Mcp-Session-Id": hello.headers["mcp-session-id"]}
    if version != "2025-03-26":
        session["MCP-Protocol-Version"] = _answer(hello)["result"]["protocolVersion"]
    assert _rpc(client, url, None, "notifications/initialized", **session).status_code == 202
    return session


@pytest.mark.parametrize("version", ["2025-03-26", "2025-06-18", "2025-11-25"])
def test_each_protocol_version_keeps_its_session_stream_and_delete(mcp_proxy, mcp_upstreams,
                                                                   version):
    """A session driven by hand, as each revision's client does: initialize, the session id
    and protocol version on every request after, the GET stream, a filtered listing, a refused
    call, the DELETE that ends it. Only bodies are read; the rest passes as it is."""
    url = f"{mcp_proxy.url}/mcp-sse/mcp"
    with httpx.Client(timeout=30) as client:
        session = _open_session(client, url, version)
        with client.stream("GET", url, headers={"Accept": "text/event-stream",
                                                **session}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
        tools = [t["name"] for t in _answer(_rpc(client, url, 2, "tools/list", **session))[
            "result"]["tools"]]
        refused = _answer(_rpc(client, url, 3, "tools/call", {
            "name": "delete_repository", "arguments": {"name": "x"}}, **session))
        ended = client.delete(url, headers=session)
    assert sorted(tools) == ["get_file_contents", "get_issue", "get_whoami", "list_issues"]
    assert refused["id"] == 3 and refused["result"]["isError"]
    assert ended.status_code in (200, 204)
    assert "delete_repository" not in mcp_upstreams["sse"].calls()


def test_a_resumed_stream_is_filtered_as_the_first_was(mcp_proxy, mcp_upstreams):
    """Resumption (Last-Event-ID): the server replays a listing on the GET stream; the
    replayed events reach the agent filtered too (every stream is, whichever carries what)."""
    url = f"{mcp_proxy.url}/mcp-sse/mcp"
    with httpx.Client(timeout=30) as client:
        session = _open_session(client, url, "2025-11-25")
        listed = _rpc(client, url, 2, "tools/list", **session)
        ids = [line[3:].strip() for line in listed.text.splitlines() if line.startswith("id:")]
        assert len(ids) >= 2, listed.text  # a priming event, then the answer
        replayed = []
        with client.stream("GET", url, headers={"Accept": "text/event-stream",
                                                "Last-Event-ID": ids[0], **session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:") and '"tools"' in line:
                    replayed.append(json.loads(line[5:]))
                    break
        client.delete(url, headers=session)
    names = sorted(t["name"] for t in replayed[0]["result"]["tools"])
    assert replayed[0]["id"] == 2
    assert names == ["get_file_contents", "get_issue", "get_whoami", "list_issues"]
