"""Traces reach a real OpenTelemetry Collector (built from the collector's Go modules,
tests/clients/otelcol: the OTLP receiver and the debug exporter), one span per request, with
the GenAI semantic conventions on a model API call and no secret value anywhere."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.conftest import _go_binary
from tests.integration.test_llm_usage import INJECTIONS, SECRETS, openai_client
from tests.support.llm_upstream import OPENAI_USAGE, LlmServer
from tests.support.ports import free_port
from tests.support.sidecar import start_sidecar

CONFIG = """
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{port}
exporters:
  debug:
    verbosity: detailed
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [debug]
"""


class Collector:
    def __init__(self, workdir):
        self.port = free_port()
        config = workdir / "collector.yaml"
        config.write_text(CONFIG.format(port=self.port))
        self.log = workdir / "collector.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen([str(_go_binary("otelcol")), "--config",
                                             f"file:{config}"], stdout=out,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "Everything is ready" not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def spans(self) -> list[dict[str, str]]:
        """Each span the debug exporter printed: its name and attributes, as text."""
        found = []
        for block in self.log.read_text().split("Span #")[1:]:
            span = dict(re.findall(r"^\s*-> ([\w.]+): \w+\((.*)\)$", block, re.M))
            name = re.search(r"^\s*Name\s*: (.*)$", block, re.M)
            span["name"] = name.group(1) if name else ""
            found.append(span)
        return found

    def wait_for(self, check, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = next((s for s in self.spans() if check(s)), None)
            if match:
                return match
            time.sleep(0.1)
        raise AssertionError(f"no such span; the collector printed:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    found = Collector(tmp_path_factory.mktemp("otelcol"))
    yield found
    found.stop()


@pytest.fixture(scope="module")
def traced(tmp_path_factory, llm_upstream, collector):
    proc = start_sidecar(tmp_path_factory.mktemp("traced"), INJECTIONS, SECRETS,
                         resolve=LlmServer.resolve(), upstream_ca=llm_upstream.ca_file,
                         args=["--otlp-endpoint", f"http://127.0.0.1:{collector.port}"])
    yield proc
    proc.stop()


def test_a_model_api_call_is_a_genai_span_in_the_collector(traced, collector):
    model = "gpt-4o-mini-traced"
    with openai_client(traced) as client:
        client.chat.completions.create(model=model, messages=[
            {"role": "user", "content": "Paris?"}])
    span = collector.wait_for(lambda s: s.get("gen_ai.request.model") == model)
    assert span["name"] == f"chat {model}"
    assert span["gen_ai.system"] == "openai" and span["gen_ai.operation.name"] == "chat"
    assert span["gen_ai.usage.input_tokens"] == str(OPENAI_USAGE["prompt_tokens"])
    assert span["gen_ai.usage.output_tokens"] == str(OPENAI_USAGE["completion_tokens"])
    assert span["keyhole.injection"] == "openai" and span["keyhole.decision"] == "injected"
    assert span["http.response.status_code"] == "200"
    assert span["server.address"] == "api.openai.test"
    assert span["keyhole.llm.estimated"] == "false" and float(span["keyhole.llm.cost_usd"]) > 0


def test_a_refused_request_is_a_span_too_and_no_span_holds_a_secret(traced, collector):
    import httpx

    assert httpx.get(f"{traced.url}/no-such-injection/x", timeout=10).status_code == 404
    span = collector.wait_for(lambda s: s.get("keyhole.reason") == "not_found")
    assert span["keyhole.decision"] == "denied" and span["http.response.status_code"] == "404"
    printed = collector.log.read_text()
    assert all(value not in printed for keys in SECRETS.values() for value in keys.values())
