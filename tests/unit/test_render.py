"""The one renderer: every refusal, for every kind of client."""

from __future__ import annotations

import json

from keyhole_sidecar.limits import Refusal
from keyhole_sidecar.proxy.errors import (
    ApprovalRefused,
    BadRequest,
    Denied,
    LimitExceeded,
    McpRefused,
    grpc_message,
    render,
)


def test_a_refusal_is_plain_text_with_its_reason_and_a_400_closes_the_connection():
    answer = render(Denied("rule", "injection 'x' refuses this request"))
    assert (answer.status, answer.close) == (403, False)
    assert ("X-Keyhole-Error", "rule") in answer.headers
    assert answer.body == b"keyhole: injection 'x' refuses this request\n"
    assert render(BadRequest("bad_path", "no")).close


def test_a_limit_keeps_its_json_body_and_retry_after():
    refusal = Refusal("openai", "requestsPerMinute", 429, 2.0, None, "over 60/min")
    answer = render(LimitExceeded(refusal))
    assert answer.status == 429 and ("Retry-After", "2") in answer.headers
    assert json.loads(answer.body)["limit"] == "requestsPerMinute"


def test_a_grpc_call_gets_a_trailers_only_status_with_the_reason():
    refusal = Refusal("api", "concurrentRequests", 429, 1.0, None, "2 in flight, ünïcode 100%")
    answer = render(LimitExceeded(refusal), grpc=True)
    assert answer.status == 200 and answer.body == b""
    fields = dict(answer.headers)
    assert fields["grpc-status"] == "8"  # RESOURCE_EXHAUSTED
    assert fields["grpc-message"] == grpc_message("keyhole: 2 in flight, ünïcode 100%")
    assert "%C3%BC" in fields["grpc-message"] and "100%25" in fields["grpc-message"]
    assert render(Denied("rule", "no"), grpc=True).headers[2] == ("grpc-status", "7")


def test_an_mcp_refusal_is_a_tool_result_for_a_call_and_an_error_for_the_rest():
    refused = McpRefused("gh", [(1, "tools/call", "denied", "the tool 'x' is denied"),
                                (2, "resources/read", "batch", "not sent")], batch=True)
    answer = render(refused)
    assert answer.status == 200
    call, read = json.loads(answer.body)
    assert call["result"]["isError"] and "keyhole" in call["result"]["content"][0]["text"]
    assert read["error"]["code"] == -32001 and read["error"]["data"]["keyhole"] == "batch"
    batched = McpRefused("gh", [(1, "tools/call", "batch", "not sent"),
                                (2, "tools/call", "not_allowed", "the tool 'x' is not")], True)
    assert batched.reason == "mcp_not_allowed"  # the refusal that decided, not its company
    notification = McpRefused("gh", [(None, "tools/call", "denied", "no")], batch=False)
    assert render(notification).status == 202 and render(notification).body == b""


def test_an_approval_refusal_names_its_object_and_is_permission_denied_for_grpc():
    denied = ApprovalRefused("approval_denied", "POST https://a.test/x was denied by alice",
                             "stripe", {"name": "agent-x2k4q", "decidedBy": "alice"})
    answer = render(denied)
    assert answer.status == 403 and ("X-Keyhole-Error", "approval_denied") in answer.headers
    assert json.loads(answer.body)["approval"] == {"name": "agent-x2k4q", "decidedBy": "alice"}
    for reason, status in (("approval_timeout", "7"), ("approval_denied", "7"),
                           ("approval_unavailable", "14"), ("approval_backlog", "8")):
        grpc = dict(render(ApprovalRefused(reason, "no", "stripe", {}), grpc=True).headers)
        assert grpc["grpc-status"] == status, reason
        assert grpc["X-Keyhole-Error"] == reason
    held = McpRefused("gh", [(7, "tools/call", "approval_timeout", "nobody approved it")], False)
    assert held.reason == "approval_timeout"  # one word for every protocol
    assert json.loads(render(held).body)["result"]["isError"] is True
