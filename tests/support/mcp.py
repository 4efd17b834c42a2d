"""The MCP tests' parts: real MCP servers (tests/support/mcp_server.py, the official SDK),
one answering in JSON and one in events, and a sidecar whose injections govern both."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.support.config import injection, ref
from tests.support.serving import serving_process
from tests.support.sidecar import start_sidecar

TOKEN = "ghp_MCP0123456789abcdefTOKEN"
POLICY = {
    "tools": {"allow": ["get_*", "list_*"], "deny": ["*delete*"],
              "when": [{"match": ["get_file_contents"],
                        "expression": "!arguments.path.startsWith('.github/')",
                        "message": "workflow files are off limits"}]},
    "resources": {"allow": ["repo://*"]},
    "prompts": {"deny": ["jailbreak"]},
}
MODES = ("json", "sse", "legacy")


class McpUpstream:
    def __init__(self, port: int, record: Path):
        self.port, self.record = port, record

    def received(self) -> list[dict]:
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def calls(self) -> list[str]:
        """The tool names of every tools/call the server received."""
        names = []
        for entry in self.received():
            try:
                body = json.loads(entry["body"])
            except ValueError:
                continue
            for message in body if isinstance(body, list) else [body]:
                if isinstance(message, dict) and message.get("method") == "tools/call":
                    names.append(message.get("params", {}).get("name"))
        return names


@pytest.fixture(scope="session")
def mcp_upstreams(test_ca, tmp_path_factory):
    ca, _ = test_ca
    cert = ca.issue_cert(*(f"mcp-{mode}.test" for mode in MODES))
    servers, stack = {}, []
    for mode in MODES:
        folder = tmp_path_factory.mktemp(f"mcp-{mode}")
        record = folder / "received.jsonl"
        record.touch()
        serving = serving_process([sys.executable, "-m", "tests.support.mcp_server", mode,
                                   str(record)], cert, folder)
        port = serving.__enter__()
        stack.append(serving)
        servers[mode] = McpUpstream(port, record)
    yield servers
    for serving in stack:
        serving.__exit__(None, None, None)


@pytest.fixture(scope="session")
def mcp_proxy(tmp_path_factory, test_ca, mcp_upstreams):
    """A sidecar with one injection per server, each governed by POLICY."""
    injections = [
        injection(f"mcp-{mode}", hosts=[f"mcp-{mode}.test:{server.port}"], mcp=POLICY,
                  headers=[{"name": "Authorization", "valueFrom": ref("github", "token"),
                            "format": "Bearer {value}"}])
        for mode, server in mcp_upstreams.items()]
    proc = start_sidecar(tmp_path_factory.mktemp("mcp-sidecar"), injections,
                         {"github": {"token": TOKEN}}, upstream_ca=test_ca[1],
                         resolve=[f"mcp-{mode}.test:{server.port}:127.0.0.1"
                                  for mode, server in mcp_upstreams.items()])
    yield proc
    proc.stop()
