"""An MCP call's span follows the OpenTelemetry MCP conventions, from its audit record."""

from __future__ import annotations

from keyhole_sidecar.tracing import _mcp_span


def test_a_tool_call_span_names_the_method_and_the_tool():
    attributes: dict = {}
    name = _mcp_span([{"method": "tools/call", "tool": "delete_repo", "decision": "denied",
                       "reason": "not_allowed"}], attributes)
    assert name == "tools/call delete_repo"
    assert attributes == {"mcp.method.name": "tools/call", "gen_ai.tool.name": "delete_repo",
                          "gen_ai.operation.name": "execute_tool",
                          "keyhole.mcp.decision": "denied",
                          "error.type": "keyhole_not_allowed"}


def test_resources_keep_the_uri_out_of_the_span_name_and_batches_say_how_many():
    attributes: dict = {}
    name = _mcp_span([{"method": "resources/read", "resource": "repo://x",
                       "decision": "allowed", "reason": "allowed"}, {"method": "ping"}],
                     attributes)
    assert name == "resources/read"
    assert attributes["mcp.resource.uri"] == "repo://x"
    assert attributes["keyhole.mcp.messages"] == 2 and "error.type" not in attributes
