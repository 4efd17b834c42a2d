"""The usage meter on the three APIs' answers, however the bytes are cut."""

from __future__ import annotations

import json
import math

import pytest

from keyhole_sidecar.usage.meter import WHOLE_JSON, Meter, Usage, is_metered, read_request
from keyhole_sidecar.usage.sse import MAX_EVENT, EventSplitter
from tests.support import llm_upstream as api

SSE = "text/event-stream; charset=utf-8"


def metered(answer: list[bytes] | dict | list, api_name: str, cuts: int | None = None,
            content_type: str | None = None) -> Usage:
    if isinstance(answer, list) and answer and isinstance(answer[0], bytes):
        body, kind = b"".join(answer), content_type or SSE
    else:
        body, kind = json.dumps(answer).encode(), content_type or "application/json"
    meter = Meter(api_name, kind, request_bytes=400)
    step = cuts or len(body)
    for start in range(0, len(body), step):
        meter.feed(body[start:start + step])
    return meter.finish()


STREAMS = {
    "openai-chat": (lambda: api.openai_chat("gpt-4o", True, True), "openai",
                    Usage("openai", "gpt-4o", 24, 29, 8, 0)),
    "openai-responses": (lambda: api.openai_responses("o4-mini", True), "openai",
                         Usage("openai", "o4-mini", 31, 93, 0, 64)),
    "anthropic": (lambda: api.anthropic_messages("claude-x", True), "anthropic",
                  Usage("anthropic", "claude-x", 1043, 30, 1024, 0)),
    "gemini-sse": (lambda: [api.sse(a) for a in api.gemini("gemini-x", True)], "gemini",
                   Usage("gemini", "gemini-x", 11, 42, 0, 14)),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("cut", [1, 7, 64, None])
def test_streams_give_the_reported_usage_however_they_are_cut(name, cut):
    make, api_name, want = STREAMS[name]
    assert metered(make(), api_name, cut) == want


def test_whole_answers_and_a_streamed_gemini_array():
    assert metered(api.openai_chat("gpt-4o", False, False), "openai") == Usage(
        "openai", "gpt-4o", 24, 29, 8, 0)
    assert metered(api.anthropic_messages("claude-x", False), "anthropic") == Usage(
        "anthropic", "claude-x", 1043, 30, 1024, 0)
    assert metered(api.gemini("gemini-x", True), "gemini") == Usage(
        "gemini", "gemini-x", 11, 42, 0, 14)


def test_a_json_answer_too_large_to_hold_is_read_at_its_head_and_tail():
    whole = api.openai_chat("gpt-4o", False, False)
    whole["choices"][0]["message"]["content"] = "x" * (WHOLE_JSON * 2)
    assert metered(whole, "openai", cuts=65536) == Usage("openai", "gpt-4o", 24, 29, 8, 0)


def test_a_stream_without_usage_is_estimated_from_its_text_and_the_request():
    usage = metered(api.openai_chat("gpt-4o", True, False), "openai")
    assert usage == Usage("openai", "gpt-4o", 100, math.ceil(len(api.TEXT) / 4), 0, 0,
                          estimated=True)


def test_a_stream_that_never_reached_its_end_is_estimated_not_taken_at_its_word():
    """message_start reports 1 output token; the cut answer had more."""
    events = api.anthropic_messages("claude-x", True)[:12]
    usage = metered(events, "anthropic")
    assert usage.estimated and usage.input == 1043 and usage.output > 1


def test_an_oversized_event_is_not_held_but_its_ends_are_kept():
    splitter = EventSplitter()
    assert list(splitter.feed(b"data: {\"a\":" + b"x" * (MAX_EVENT + 10))) == []
    [(name, oversized)] = list(splitter.feed(b"end}\n\ndata: {}\n\n"))[:1]
    assert name == "message" and oversized.head.startswith('{"a":xxx')
    assert oversized.tail.endswith("xxxend}") and len(oversized.tail) <= 256 << 10
    assert list(splitter.feed(b"data: {}\n\n")) == [("message", "{}")]
    assert splitter.dropped == 1


@pytest.mark.parametrize("cut", [1000, 65536, None])
def test_an_image_generation_whose_completed_event_is_over_a_mib_still_counts(cut):
    """The image and the usage in one response.completed event, over MAX_EVENT: the usage is
    read at its end (before, the event was dropped and an estimate of 23/18 recorded for
    2,200/1,400 billed tokens)."""
    events = api.openai_responses("gpt-image-1", True)
    completed = json.loads(events[-1].split(b"data: ", 1)[1])
    completed["response"]["output"] = [{"type": "image_generation_call",
                                        "result": "A" * (MAX_EVENT + 4096)}]
    completed["response"]["usage"] = {"input_tokens": 2200, "output_tokens": 1400,
                                      "input_tokens_details": {"cached_tokens": 0},
                                      "output_tokens_details": {"reasoning_tokens": 0}}
    events[-1] = api.sse(completed, "response.completed")
    assert metered(events, "openai", cut) == Usage("openai", "gpt-image-1", 2200, 1400, 0, 0)


def test_a_legacy_completions_stream_without_usage_is_estimated_from_its_text():
    chunks = [api.sse({"id": "cmpl-1", "object": "text_completion", "model": "gpt-3.5-turbo"
                       "-instruct", "choices": [{"text": word, "index": 0}]})
              for word in ("Paris ", "is ", "the ", "capital ", "of ", "France.")]
    usage = metered([*chunks, b"data: [DONE]\n\n"], "openai")
    assert usage.estimated and usage.output == math.ceil(len("Paris is the capital of France.")
                                                         / 4)


def test_the_model_and_the_output_ceiling_a_request_states():
    assert read_request("openai", "/v1/chat/completions",
                        b'{"model":"gpt-4o","max_completion_tokens":300}') == ("gpt-4o", 300)
    assert read_request("openai", "/v1/responses",
                        b'{"model":"o3","max_output_tokens":50}') == ("o3", 50)
    assert read_request("anthropic", "/v1/messages",
                        b'{"model":"claude-x","max_tokens":1024}') == ("claude-x", 1024)
    assert read_request("gemini", "/v1beta/models/gemini-2.5-pro:generateContent",
                        b'{"generationConfig":{"maxOutputTokens":64}}') == ("gemini-2.5-pro", 64)
    assert read_request("anthropic", "/v1/messages", b"not json") == (None, None)
    assert read_request("openai", "/v1/chat/completions",
                        b'{"model":"gpt-4o","max_tokens":true}') == ("gpt-4o", None)


def test_only_the_endpoints_that_bill_tokens_are_metered():
    assert is_metered("openai", "/v1/chat/completions")
    assert is_metered("openai", "/v1/responses?stream=true")
    assert not is_metered("openai", "/v1/models")
    assert not is_metered("openai", "/v1/responses/resp_123")
    assert is_metered("anthropic", "/v1/messages") and not is_metered("anthropic", "/v1/models")
    assert is_metered("gemini", "/v1beta/models/gemini-2.5-pro:streamGenerateContent")
    assert not is_metered("gemini", "/v1beta/models/gemini-2.5-pro")
