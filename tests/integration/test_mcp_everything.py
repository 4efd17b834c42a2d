"""The MCP reference server (``@modelcontextprotocol/server-everything``) behind the real
sidecar, reached by the TypeScript SDK's client (Node 24, through the proxy variables and at
the base URL) and by the Python SDK's: Streamable HTTP and the legacy HTTP+SSE transport. The
agent sees only the tools it may call; a refused call is a tool result with isError and never
reaches the server (its own record of what it received says so)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.clients import CLIENTS, NODE24
from tests.support.config import injection, ref
from tests.support.mcp import McpUpstream
from tests.support.serving import serving_process
from tests.support.sidecar import start_sidecar

TOKEN = "everything-token-0123456789"
POLICY = {"tools": {"allow": ["echo", "get-sum", "get-tiny-image", "trigger-sampling-request"],
                    "deny": ["get-env"],
                    "when": [{"match": ["get-sum"], "expression": "arguments.a + arguments.b < 100",
                              "message": "sums stay under 100"}]}}
CALLS = [["echo", {"message": "hello"}], ["get-env", {}], ["get-sum", {"a": 2, "b": 3}],
         ["get-sum", {"a": 200, "b": 3}]]


@pytest.fixture(scope="module")
def everything(test_ca, tmp_path_factory):
    folder = tmp_path_factory.mktemp("everything")
    record = folder / "received.jsonl"
    record.touch()
    with serving_process([str(NODE24), str(CLIENTS / "mcp_everything.mjs"), str(record)],
                         test_ca[0].issue_cert("everything.test"), folder) as port:
        yield McpUpstream(port, record)


@pytest.fixture(scope="module")
def everything_proxy(tmp_path_factory, test_ca, everything):
    port = everything.port
    proc = start_sidecar(
        tmp_path_factory.mktemp("everything-sidecar"),
        [injection("everything", hosts=[f"everything.test:{port}"], mcp=POLICY,
                   headers=[{"name": "Authorization", "valueFrom": ref("everything", "token"),
                             "format": "Bearer {value}"}])],
        {"everything": {"token": TOKEN}}, upstream_ca=test_ca[1],
        resolve=[f"everything.test:{port}:127.0.0.1"])
    yield proc
    proc.stop()


def typescript_agent(proxy, url: str, transport: str, calls=CALLS, *extra: str) -> dict:
    done = subprocess.run([str(NODE24), str(CLIENTS / "mcp_client.mjs"), url, transport,
                           json.dumps(calls), *extra], env=proxy.client_env(), capture_output=True,
                          text=True, timeout=60, cwd=CLIENTS)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(("transport", "door"), [
    ("streamable", "connect"), ("streamable", "base-url"), ("sse", "connect")])
def test_the_typescript_sdk_sees_only_its_tools_and_a_refusal_as_a_tool_error(
        everything_proxy, everything, transport, door):
    port = everything.port
    path = "/mcp" if transport == "streamable" else "/sse"
    url = (f"{everything_proxy.url}/everything{path}" if door == "base-url"
           else f"https://everything.test:{port}{path}")
    before = len(everything.calls())
    answer = typescript_agent(everything_proxy, url, transport)
    assert answer["tools"] == ["echo", "get-sum", "get-tiny-image"]
    echo, env, small, large = answer["results"]
    assert not echo["isError"] and "hello" in echo["content"][0]["text"]
    assert env["isError"] and "keyhole" in env["content"][0]["text"]
    assert "get-env" in env["content"][0]["text"]
    assert not small["isError"] and "5" in small["content"][0]["text"]
    assert large["isError"] and "sums stay under 100" in large["content"][0]["text"]
    assert everything.calls()[before:] == ["echo", "get-sum"]
    assert {entry["authorization"] for entry in everything.received()} == {f"Bearer {TOKEN}"}


def test_a_servers_own_request_to_the_agent_passes_untouched(everything_proxy, everything):
    """Sampling: the server asks the agent (a request on the answer's event stream), the agent
    answers (a JSON-RPC response in a POST), the tool's result carries what it sampled."""
    port = everything.port
    answer = typescript_agent(everything_proxy, f"https://everything.test:{port}/mcp",
                              "streamable", [["trigger-sampling-request",
                                              {"prompt": "hi", "maxTokens": 5}]], "sampling")
    assert "trigger-sampling-request" in answer["tools"]
    [sampled] = answer["results"]
    assert not sampled["isError"] and "sampled by the agent" in json.dumps(sampled["content"])
    line = everything_proxy.wait_audit(lambda r: r.get("mcp") == [{"method": None}])
    assert line["decision"] == "injected"  # the agent's answer to the server went through
