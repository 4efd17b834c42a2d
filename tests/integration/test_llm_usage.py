"""Token usage read from model API answers (``spec.llm``), as the real SDKs use the APIs.

The OpenAI and Anthropic Python SDKs (and httpx for Gemini) talk through the real sidecar to
a stand-in of the three APIs (tests/support/llm_upstream.py) that answers in their wire
formats, JSON and streamed. What the proxy counts must equal the usage the API reported; an
answer without usage is estimated and says so, in the audit line and the metrics.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest

from tests.support import llm_upstream
from tests.support.config import injection, ref
from tests.support.llm_upstream import (
    ANTHROPIC_USAGE,
    EMBEDDINGS_USAGE,
    GEMINI_USAGE,
    OPENAI_USAGE,
    RESPONSES_USAGE,
    TEXT,
    LlmServer,
)
from tests.support.sidecar import start_sidecar

OPENAI_KEY = "sk-proj-LLM-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-api03-LLM-0123456789"
GEMINI_KEY = "AIzaGEMINI-0123456789abcd"
SECRETS = {"openai": {"key": OPENAI_KEY}, "anthropic": {"key": ANTHROPIC_KEY},
           "gemini": {"key": GEMINI_KEY}}
INJECTIONS = [
    injection("openai", hosts=["api.openai.test"], llm={"api": "openai"},
              headers=[{"name": "Authorization", "valueFrom": ref("openai", "key"),
                        "format": "Bearer {value}"}]),
    injection("anthropic", hosts=["api.anthropic.test"], llm={"api": "anthropic"},
              headers=[{"name": "x-api-key", "valueFrom": ref("anthropic", "key")}]),
    injection("gemini", hosts=["gemini.googleapis.test"], llm={"api": "gemini"},
              headers=[{"name": "x-goog-api-key", "valueFrom": ref("gemini", "key")}]),
]


@pytest.fixture(scope="module")
def llm(llm_upstream):
    return llm_upstream


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, llm):
    proc = start_sidecar(tmp_path_factory.mktemp("llm-sidecar"), INJECTIONS, SECRETS,
                         resolve=LlmServer.resolve(), upstream_ca=llm.ca_file)
    yield proc
    proc.stop()


def audit_llm(proxy, path: str, model: str) -> dict:
    """The ``llm`` field of the audit line of the last request to ``path`` for ``model``,
    without its cost (tests/integration/test_llm_budgets.py checks those)."""
    line = proxy.wait_audit(lambda r: r["path"].startswith(path) and r["llm"] is not None
                            and r["llm"]["model"] == model)
    return {k: v for k, v in line["llm"].items() if k not in ("cost_usd", "priced")}


def openai_client(proxy):
    import openai

    return openai.OpenAI(base_url=f"{proxy.url}/openai/v1", api_key="placeholder",
                         max_retries=0)


def expected(api: str, model: str, input: int, output: int, cached: int = 0,
             reasoning: int = 0, estimated: bool = False) -> dict:
    return {"api": api, "model": model, "input_tokens": input, "output_tokens": output,
            "cached_input_tokens": cached, "cache_write_tokens": 0,
            "reasoning_tokens": reasoning,
            "estimated": estimated}


# -- OpenAI -----------------------------------------------------------------------------------

def test_openai_chat_json_is_counted_as_reported(proxy, llm):
    with openai_client(proxy) as client:
        answer = client.chat.completions.create(
            model="gpt-4o-mini-2024-07-18", messages=[{"role": "user", "content": "Paris?"}])
    assert answer.choices[0].message.content == TEXT
    assert llm.seen[-1].authorization == [f"Bearer {OPENAI_KEY}"]
    assert audit_llm(proxy, "/openai/v1/chat/completions", "gpt-4o-mini-2024-07-18") == \
        expected("openai", "gpt-4o-mini-2024-07-18", OPENAI_USAGE["prompt_tokens"],
                 OPENAI_USAGE["completion_tokens"], cached=8)


def test_openai_chat_stream_with_usage_is_counted_as_reported(proxy):
    model = "gpt-4o-2024-08-06"
    with openai_client(proxy) as client:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Paris?"}], stream=True,
            stream_options={"include_usage": True})
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == TEXT
    assert audit_llm(proxy, "/openai/v1/chat/completions", model) == expected(
        "openai", model, OPENAI_USAGE["prompt_tokens"], OPENAI_USAGE["completion_tokens"],
        cached=8)


def test_openai_chat_stream_without_usage_is_estimated_and_says_so(proxy):
    model = "gpt-4.1-nano"
    with openai_client(proxy) as client:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Paris?"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == TEXT
    counted = audit_llm(proxy, "/openai/v1/chat/completions", model)
    assert counted["estimated"] is True
    assert counted["output_tokens"] == math.ceil(len(TEXT) / 4)
    assert counted["input_tokens"] > 0  # from the request's size
    assert proxy.metric("keyhole_llm_answers_total", injection="openai", model=model,
                        estimated="true") == 1
    assert proxy.metric("keyhole_llm_tokens_total", injection="openai", model=model,
                        kind="output", estimated="true") == counted["output_tokens"]


def test_openai_responses_stream_reports_reasoning(proxy):
    model = "o4-mini-2025-04-16"
    with openai_client(proxy) as client, client.responses.stream(model=model,
                                                                 input="Paris?") as stream:
        final = stream.get_final_response()
    assert final.output_text == TEXT
    assert audit_llm(proxy, "/openai/v1/responses", model) == expected(
        "openai", model, RESPONSES_USAGE["input_tokens"], RESPONSES_USAGE["output_tokens"],
        reasoning=64)


def test_openai_embeddings_count_their_input(proxy):
    model = "text-embedding-3-small"
    with openai_client(proxy) as client:
        client.embeddings.create(model=model, input="Paris")
    assert audit_llm(proxy, "/openai/v1/embeddings", model) == expected(
        "openai", model, EMBEDDINGS_USAGE["prompt_tokens"], 0)


def test_a_stream_cut_halfway_is_still_counted_as_an_estimate(proxy):
    import openai

    model = "gpt-4o-mini-cut"
    with openai_client(proxy) as client, pytest.raises(openai.APIError):
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Paris?"}], stream=True,
            stream_options={"include_usage": True})
        for _ in stream:
            pass
    counted = audit_llm(proxy, "/openai/v1/chat/completions", model)
    assert counted["estimated"] is True
    assert 0 < counted["output_tokens"] < math.ceil(len(TEXT) / 4)


def test_a_json_answer_cut_short_is_still_counted_as_an_estimate(proxy):
    """A whole (Content-Length) answer cut at 60%: the client gets 502 upstream_mid_body, and
    what went upstream and was billed is counted, estimated, in the audit line and metrics."""
    import openai

    model = "gpt-4o-mini-json-cut"
    with openai_client(proxy) as client, pytest.raises(openai.APIError):
        client.chat.completions.create(model=model, messages=[
            {"role": "user", "content": "Paris?"}])
    counted = audit_llm(proxy, "/openai/v1/chat/completions", model)
    assert counted["estimated"] is True and counted["input_tokens"] > 0
    assert proxy.metric("keyhole_llm_tokens_total", injection="openai", model=model,
                        kind="input", estimated="true") == counted["input_tokens"]


def test_metrics_count_tokens_by_injection_model_and_kind(proxy):
    model = "gpt-4o-mini-metrics"
    with openai_client(proxy) as client:
        for _ in range(2):
            client.chat.completions.create(model=model, messages=[
                {"role": "user", "content": "Paris?"}])
    audit_llm(proxy, "/openai/v1/chat/completions", model)
    for kind, per_answer in (("input", 24), ("output", 29), ("cached_input", 8)):
        assert proxy.metric("keyhole_llm_tokens_total", injection="openai", model=model,
                            kind=kind, estimated="false") == 2 * per_answer


@pytest.mark.parametrize("how", ["json", "stream"])
def test_the_openai_node_sdk_is_counted_alike(proxy, how):
    import subprocess
    from pathlib import Path

    clients = Path(__file__).parents[1] / "clients"
    model = f"gpt-4o-mini-node-{how}"
    done = subprocess.run(["node", "openai.mjs", f"{proxy.url}/openai/v1", model, how],
                          cwd=clients, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"text": TEXT}
    assert audit_llm(proxy, "/openai/v1/chat/completions", model) == expected(
        "openai", model, OPENAI_USAGE["prompt_tokens"], OPENAI_USAGE["completion_tokens"],
        cached=8)


# -- Anthropic ----------------------------------------------------------------------------------

def anthropic_client(proxy):
    import anthropic

    return anthropic.Anthropic(base_url=f"{proxy.url}/anthropic", api_key="placeholder",
                               max_retries=0)


ANTHROPIC_INPUT = (ANTHROPIC_USAGE["input_tokens"] + ANTHROPIC_USAGE["cache_read_input_tokens"]
                   + ANTHROPIC_USAGE["cache_creation_input_tokens"])


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "stream"])
def test_anthropic_messages_are_counted_with_the_cache(proxy, llm, streamed):
    model = f"claude-sonnet-4-5-{'stream' if streamed else 'json'}"
    with anthropic_client(proxy) as client:
        if streamed:
            with client.messages.stream(model=model, max_tokens=256, messages=[
                    {"role": "user", "content": "Paris?"}]) as stream:
                text = "".join(stream.text_stream)
        else:
            text = client.messages.create(model=model, max_tokens=256, messages=[
                {"role": "user", "content": "Paris?"}]).content[0].text
    assert text == TEXT
    assert llm.seen[-1].api_key == [ANTHROPIC_KEY]
    assert audit_llm(proxy, "/anthropic/v1/messages", model) == expected(
        "anthropic", model, ANTHROPIC_INPUT, ANTHROPIC_USAGE["output_tokens"], cached=1024)


def test_an_anthropic_error_mid_stream_is_counted_as_an_estimate(proxy):
    import anthropic

    model = "claude-haiku-4-5-overloaded"
    question = [{"role": "user", "content": "Paris?"}]
    with (anthropic_client(proxy) as client, pytest.raises(anthropic.APIStatusError),
          client.messages.stream(model=model, max_tokens=256, messages=question) as stream):
        for _ in stream.text_stream:
            pass
    counted = audit_llm(proxy, "/anthropic/v1/messages", model)
    assert counted["estimated"] is True and counted["input_tokens"] == ANTHROPIC_INPUT
    assert 0 < counted["output_tokens"] < ANTHROPIC_USAGE["output_tokens"]


# -- Gemini -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["generateContent", "streamGenerateContent?alt=sse",
                                    "streamGenerateContent"])
def test_gemini_is_counted_from_json_sse_and_streamed_arrays(proxy, llm, method):
    model = f"gemini-2.5-flash-{method.split('?')[0].lower()}-{'sse' in method}"
    body = {"contents": [{"parts": [{"text": "Paris?"}]}]}
    with httpx.Client(base_url=f"{proxy.url}/gemini") as client:
        answer = client.post(f"/v1beta/models/{model}:{method}", json=body, timeout=30)
    assert answer.status_code == 200
    assert llm.seen[-1].api_key == [GEMINI_KEY]
    if "alt=sse" in method:
        texts = [json.loads(line[6:])["candidates"][0]["content"]["parts"][0]["text"]
                 for line in answer.text.splitlines() if line.startswith("data: ")]
        assert "".join(texts) == TEXT
    assert audit_llm(proxy, "/gemini/v1beta/models/", model) == expected(
        "gemini", model, GEMINI_USAGE["promptTokenCount"],
        GEMINI_USAGE["candidatesTokenCount"] + GEMINI_USAGE["thoughtsTokenCount"],
        reasoning=GEMINI_USAGE["thoughtsTokenCount"])


def test_usage_never_holds_a_secret_and_unrouted_answers_have_none(proxy, llm):
    with openai_client(proxy) as client:
        client.chat.completions.create(model="gpt-4o-mini-plain", messages=[
            {"role": "user", "content": "Paris?"}])
    log = (proxy.workdir / "stdout.log").read_text()
    assert all(key not in log for key in (OPENAI_KEY, ANTHROPIC_KEY, GEMINI_KEY))
    assert llm_upstream.ADDRESS  # the stand-in, never the real APIs


# -- a placeholder never rides beside the key ------------------------------------------------
@pytest.mark.parametrize("given", [{"api_key": "placeholder"}, {"auth_token": "placeholder"}],
                         ids=["api_key", "auth_token"])  # the SDK takes one at a time
def test_the_anthropic_sdks_every_way_of_passing_a_key_leaves_only_the_real_one(proxy, llm,
                                                                               given):
    """The injection sets x-api-key; the SDK given an auth token sends it as Authorization:
    with ``spec.llm`` stating the API, every credential header it takes is dropped."""
    import anthropic

    before = len(llm.seen)
    with anthropic.Anthropic(base_url=f"{proxy.url}/anthropic", max_retries=0,
                             **given) as client:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=20,
                               messages=[{"role": "user", "content": "Paris?"}])
    [seen] = llm.seen[before:]
    assert seen.api_key == [ANTHROPIC_KEY]
    assert seen.authorization == []


@pytest.mark.parametrize("extra", [{}, {"default_headers": {"api-key": "placeholder"}}],
                         ids=["api_key", "azure-style api-key header too"])
def test_the_openai_sdk_sends_only_the_real_key(proxy, llm, extra):
    before = len(llm.seen)
    with openai_client(proxy).with_options(**extra) as client:
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "Paris?"}])
    [seen] = llm.seen[before:]
    assert seen.authorization == [f"Bearer {OPENAI_KEY}"]
    assert seen.api_key == []
