"""``spec.llm.budgets`` in one pod's sidecar: the agent's real SDK is stopped at the stated
figure within one request's overshoot, sees the refusal as its API's quota error, and nothing
more reaches the upstream; spend is priced from ``spec.llm.prices`` or the shipped table."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tests.integration.test_llm_usage import SECRETS, anthropic_client, openai_client
from tests.support.config import injection, ref
from tests.support.llm_upstream import ANTHROPIC_USAGE, OPENAI_USAGE, LlmServer
from tests.support.sidecar import start_sidecar

PER_ANSWER = OPENAI_USAGE["prompt_tokens"] + OPENAI_USAGE["completion_tokens"]  # 53


@pytest.fixture(scope="module")
def llm(llm_upstream):
    return llm_upstream


@pytest.fixture
def budgeted(tmp_path, llm):
    """A sidecar whose injections carry the test's budgets and prices."""
    started = []

    def start(openai_llm: dict, anthropic_llm: dict | None = None):
        injections = [injection("openai", hosts=["api.openai.test"],
                                llm={"api": "openai", **openai_llm},
                                headers=[{"name": "Authorization",
                                          "valueFrom": ref("openai", "key"),
                                          "format": "Bearer {value}"}]),
                      injection("anthropic", hosts=["api.anthropic.test"],
                                llm={"api": "anthropic", **(anthropic_llm or {})},
                                headers=[{"name": "x-api-key",
                                          "valueFrom": ref("anthropic", "key")}])]
        proc = start_sidecar(tmp_path / f"sidecar{len(started)}", injections, SECRETS,
                             resolve=LlmServer.resolve(), upstream_ca=llm.ca_file,
                             args=["--state-dir", str(tmp_path / "state")])
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def ask(client, model: str, **extra):
    return client.chat.completions.create(model=model, messages=[
        {"role": "user", "content": "Paris?"}], **extra)


def test_a_token_budget_stops_the_agent_within_one_answer_and_the_sdk_sees_a_quota_error(
        budgeted, llm):
    import openai

    proxy = budgeted({"budgets": [{"per": "day", "tokens": 100}]})
    sent_before = len(llm.seen)
    with openai_client(proxy) as client:
        ask(client, "gpt-4o-mini")  # 0 used: room
        ask(client, "gpt-4o-mini")  # 53 used: room
        with pytest.raises(openai.RateLimitError) as refused:  # 106 used: none
            ask(client, "gpt-4o-mini")
    assert len(llm.seen) == sent_before + 2  # the third never left the pod
    error = refused.value
    assert error.status_code == 429 and error.code == "insufficient_quota"
    assert "used its 100 tokens per UTC day (tokens/day) in this pod" in error.message
    now = dt.datetime.now(dt.UTC)
    tomorrow = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    retry_after = int(error.response.headers["Retry-After"])
    assert abs(retry_after - (tomorrow - now).total_seconds()) < 5
    assert error.response.headers["x-should-retry"] == "false"
    used = 2 * PER_ANSWER
    assert used - 100 <= PER_ANSWER  # the overshoot: at most one answer
    assert proxy.metric("keyhole_llm_budget_remaining", injection="openai",
                        budget="tokens/day") == 0
    assert proxy.metric("keyhole_llm_budget_limit", injection="openai",
                        budget="tokens/day") == 100
    assert proxy.metric("keyhole_llm_budget_used", injection="openai",
                        budget="tokens/day") == used  # the overshoot shows: 106 of 100
    assert proxy.metric("keyhole_llm_budget_refusals_total", injection="openai",
                        budget="tokens/day") == 1
    line = proxy.wait_audit(lambda r: r["status"] == 429)
    assert (line["injection"], line["decision"], line["reason"]) == (
        "openai", "denied", "budget_exhausted")


def test_the_openai_node_sdk_sees_the_refusal_as_a_rate_limit_error(budgeted):
    import subprocess
    from pathlib import Path

    proxy = budgeted({"budgets": [{"per": "hour", "tokens": 1}]})
    clients = Path(__file__).parents[1] / "clients"

    def run() -> dict:
        done = subprocess.run(["node", "openai.mjs", f"{proxy.url}/openai/v1", "gpt-4o",
                               "json"], cwd=clients, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert "text" in run()
    assert run() == {"error": {"name": "RateLimitError", "status": 429,
                               "code": "insufficient_quota"}}


def test_spend_is_priced_and_a_spend_budget_refuses_what_is_over_it(budgeted):
    import openai

    proxy = budgeted({"budgets": [{"per": "month", "spend": 0.0004}],
                      "prices": [{"model": "house-model", "input": 1, "output": 2}]})
    with openai_client(proxy) as client:
        ask(client, "gpt-4o-2024-08-06")
        # the shipped table: 16 fresh input at $2.50, 8 cached at $1.25, 29 output at $10 per 1M
        expected = (16 * 2.50 + 8 * 1.25 + 29 * 10.00) / 1e6
        line = proxy.wait_audit(lambda r: (r["llm"] or {}).get("model") == "gpt-4o-2024-08-06")
        assert line["llm"]["cost_usd"] == pytest.approx(expected)
        assert line["llm"]["priced"] is True
        ask(client, "house-model")  # the injection's own price
        house = proxy.wait_audit(lambda r: (r["llm"] or {}).get("model") == "house-model")
        assert house["llm"]["cost_usd"] == pytest.approx((24 * 1 + 29 * 2) / 1e6)
        with pytest.raises(openai.RateLimitError):
            ask(client, "gpt-4o-2024-08-06")  # 0.00034 + 0.000082 spent of 0.0004: none left
    assert proxy.metric("keyhole_llm_cost_total", injection="openai",
                        model="gpt-4o-2024-08-06", estimated="false") == pytest.approx(expected)


def test_a_model_without_a_price_is_refused_by_a_spend_budget_and_flagged_otherwise(budgeted):
    import openai

    proxy = budgeted({"budgets": [{"per": "day", "spend": 1, "models": ["gpt-*"]}]})
    with openai_client(proxy) as client:
        with pytest.raises(openai.RateLimitError) as refused:
            ask(client, "gpt-unknown-model")
        assert "model 'gpt-unknown-model' has no price: add it to spec.llm.prices" in (
            refused.value.message)
        ask(client, "mystery-model")  # no budget applies: served, counted, flagged
    line = proxy.wait_audit(lambda r: (r["llm"] or {}).get("model") == "mystery-model")
    assert line["llm"]["cost_usd"] is None and line["llm"]["priced"] is False
    assert proxy.metric("keyhole_llm_unpriced_answers_total", injection="openai",
                        model="mystery-model") == 1


def test_a_budget_on_some_models_leaves_the_others_alone(budgeted):
    import openai

    proxy = budgeted({"budgets": [{"per": "hour", "tokens": 1, "models": ["gpt-4*"]}]})
    with openai_client(proxy) as client:
        ask(client, "gpt-4o")
        with pytest.raises(openai.RateLimitError):
            ask(client, "gpt-4.1")
        ask(client, "o4-mini")  # not gpt-4*: its own way
        ask(client, "o4-mini")


def test_anthropic_sees_its_own_rate_limit_error(budgeted):
    import anthropic

    proxy = budgeted({}, {"budgets": [{"per": "day", "tokens": 10}]})
    question = [{"role": "user", "content": "Paris?"}]
    with anthropic_client(proxy) as client:
        client.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=question)
        with pytest.raises(anthropic.RateLimitError) as refused:
            client.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=question)
    body = refused.value.body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    line = proxy.wait_audit(lambda r: (r["llm"] or {}).get("model") == "claude-haiku-4-5")
    total_input = (ANTHROPIC_USAGE["input_tokens"] + ANTHROPIC_USAGE["cache_read_input_tokens"])
    # haiku 4: $1 input, $0.10 cache reads, $5 output per 1M
    assert line["llm"]["cost_usd"] == pytest.approx(
        (19 * 1.00 + 1024 * 0.10 + 30 * 5.00) / 1e6)
    assert line["llm"]["input_tokens"] == total_input


def test_the_counts_survive_a_restart_of_the_sidecar(budgeted):
    import openai

    budget = {"budgets": [{"per": "day", "tokens": 60}]}
    first = budgeted(budget)
    with openai_client(first) as client:
        ask(client, "gpt-4o-mini")  # 53 of 60
    first.stop()  # SIGTERM: the counts are on disk (--state-dir)
    second = budgeted(budget)
    with openai_client(second) as client:
        ask(client, "gpt-4o-mini")  # 53 < 60: room, and now 106
        with pytest.raises(openai.RateLimitError):
            ask(client, "gpt-4o-mini")
    saved = json.loads((second.workdir.parent / "state" / "budgets.json").read_text())
    assert saved["windows"]["openai|tokens/day"][1] == 2 * PER_ANSWER


def test_a_compressed_request_is_read_from_a_decoded_copy_and_sent_as_it_came(budgeted, llm):
    """The budget reads the model from a decoded copy; the upstream gets the gzip bytes (it
    decodes them itself), and a coding keyhole cannot read is refused before anything is sent."""
    import gzip
    import ssl

    import httpx

    proxy = budgeted({"budgets": [{"per": "day", "tokens": 1000}]})
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 20,
                       "messages": [{"role": "user", "content": "Paris?"}]}).encode()
    sent_before = len(llm.seen)
    with httpx.Client(proxy=proxy.url, timeout=10,
                      verify=ssl.create_default_context(cafile=str(proxy.ca_cert))) as client:
        url = "https://api.openai.test/v1/chat/completions"
        answer = client.post(url, content=gzip.compress(body),
                             headers={"Content-Encoding": "gzip",
                                      "Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        refused = client.post(url, content=b"\x00" + body,
                              headers={"Content-Encoding": "x-unknown",
                                       "Content-Type": "application/json"})
    assert llm.seen[sent_before].body["model"] == "gpt-4o-mini"  # the upstream decoded it
    assert len(llm.seen) == sent_before + 1  # the unreadable one never left
    assert refused.status_code == 415
    assert refused.headers["X-Keyhole-Error"] == "unreadable_body"
    assert "cannot decode Content-Encoding 'x-unknown'" in refused.text
    line = proxy.wait_audit(lambda line: (line.get("llm") or {}).get("model") == "gpt-4o-mini")
    assert line["llm"]["estimated"] is False


def test_a_budget_the_pods_share_is_refused_standalone_rather_than_refusing_every_request(
        tmp_path, llm):
    """for: injection needs the operator's count: with no channel the sidecar does not start
    (nor does check pass) instead of looking ready and answering every request 503."""
    from tests.support.sidecar import check_config

    shared = [injection("openai", hosts=["api.openai.test"], llm={"api": "openai", "budgets": [
        {"per": "day", "tokens": 1000, "for": "injection"}]}, headers=[
            {"name": "Authorization", "valueFrom": ref("openai", "key")}])]
    done = start_sidecar(tmp_path / "serve", shared, SECRETS, resolve=LlmServer.resolve(),
                         upstream_ca=llm.ca_file, expect_failure=True)
    assert done.returncode != 0
    assert "spec.llm.budgets[0].for: for: injection is a count the operator keeps" in done.stderr
    assert "use for: pod" in done.stderr
    checked = check_config(tmp_path / "check", shared, SECRETS)
    assert checked.returncode == 1 and "use for: pod" in checked.stdout + checked.stderr


def test_check_verbose_shows_the_api_budgets_and_prices(tmp_path):
    from tests.support.sidecar import check_config

    done = check_config(tmp_path, [injection(
        "openai", hosts=["api.openai.test"], headers=[
            {"name": "Authorization", "valueFrom": ref("openai", "key")}],
        llm={"api": "openai", "budgets": [{"per": "day", "tokens": 2000000},
                                          {"per": "month", "spend": 50, "models": ["gpt-4o*"]}],
             "prices": [{"model": "my-model", "input": 1.5, "output": 6}]})], SECRETS, "-v")
    assert done.returncode == 0, done.stderr
    assert "    llm: openai (usage metered" in done.stdout
    assert "    budget tokens/day: 2000000 tokens per UTC day, for each pod" in done.stdout
    assert "    budget spend/month[gpt-4o*]: $50 of gpt-4o* per UTC month, for each pod" in \
        done.stdout
    assert "    price my-model: $1.5 in, $6 out per million tokens" in done.stdout
