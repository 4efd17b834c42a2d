"""spec.mcp's decisions: globs (deny wins), CEL conditions on arguments (an error refuses),
and listings cut to what may be used."""

from __future__ import annotations

import json

import pytest

from keyhole_common.spec.model import Mcp, McpAccess, McpCondition
from keyhole_sidecar.mcp.jsonrpc import read
from keyhole_sidecar.mcp.policy import filter_result, judge

SPEC = Mcp(
    tools=McpAccess(allow=("get_*", "list_*"), deny=("*delete*", "get_secret"), when=(
        McpCondition(("get_file*",), "!arguments.path.startsWith('.github/')", "no workflows"),
        McpCondition(("list_*",), "arguments.limit <= 50"),
    )),
    resources=McpAccess(allow=("repo://*",)),
    prompts=McpAccess(deny=("jailbreak",)),
)


def verdict(method: str, params: dict):
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    [message], _ = read(json.dumps(body).encode())
    return judge(SPEC, message)


@pytest.mark.parametrize(("name", "arguments", "allowed", "reason"), [
    ("get_issue", {}, True, "allowed"),
    ("get_delete_log", {}, False, "denied"),  # deny wins over allow
    ("get_secret", {}, False, "denied"),
    ("merge_pull_request", {}, False, "not_allowed"),
    ("get_file_contents", {"path": "src/a.py"}, True, "allowed"),
    ("get_file_contents", {"path": ".github/ci.yml"}, False, "condition"),
    ("get_file_contents", {}, False, "condition_error"),  # a missing field refuses
    ("get_file_contents", {"path": 7}, False, "condition_error"),  # so does a wrong type
    ("list_issues", {"limit": 10}, True, "allowed"),
    ("list_issues", {"limit": 500}, False, "condition"),
    ("list_issues", {"limit": "10"}, False, "condition_error"),
])
def test_a_tool_call_is_judged_by_name_then_conditions(name, arguments, allowed, reason):
    result = verdict("tools/call", {"name": name, "arguments": arguments})
    assert (result.allowed, result.reason, result.subject) == (allowed, reason, name)


def test_the_condition_message_is_what_the_agent_reads():
    result = verdict("tools/call", {"name": "get_file_contents",
                                    "arguments": {"path": ".github/x"}})
    assert "no workflows" in result.detail


def test_resources_prompts_and_completions_are_judged_too():
    assert verdict("resources/read", {"uri": "repo://readme"}).allowed
    assert not verdict("resources/read", {"uri": "vault://keys"}).allowed
    assert not verdict("resources/subscribe", {"uri": "vault://keys"}).allowed
    assert verdict("prompts/get", {"name": "summarise"}).allowed
    assert not verdict("prompts/get", {"name": "jailbreak"}).allowed
    assert not verdict("completion/complete", {"ref": {"type": "ref/prompt",
                                                       "name": "jailbreak"}}).allowed
    assert verdict("tools/list", {}).allowed


def test_listings_hold_only_what_may_be_used():
    answer = {"jsonrpc": "2.0", "id": 3, "result": {"nextCursor": "c2", "tools": [
        {"name": "get_issue"}, {"name": "delete_repo"}, {"name": "merge"}, {"title": "x"}]}}
    assert filter_result(SPEC, answer) == {"jsonrpc": "2.0", "id": 3, "result": {
        "nextCursor": "c2", "tools": [{"name": "get_issue"}]}}  # pagination kept
    templates = {"jsonrpc": "2.0", "id": 4, "result": {"resourceTemplates": [
        {"uriTemplate": "repo://{name}"}, {"uriTemplate": "vault://{key}"}]}}
    assert filter_result(SPEC, templates)["result"]["resourceTemplates"] == [
        {"uriTemplate": "repo://{name}"}]
    untouched = {"jsonrpc": "2.0", "id": 5, "result": {"tools": [{"name": "list_issues"}]}}
    assert filter_result(SPEC, untouched) is None
    assert filter_result(SPEC, {"jsonrpc": "2.0", "method": "notifications/tools/"
                                                            "list_changed"}) is None
