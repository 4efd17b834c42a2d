"""Traces (``--otlp-endpoint``): one span per request the proxy answered, sent over OTLP/HTTP
by the OpenTelemetry SDK. A model API call's span follows the GenAI semantic conventions
(``gen_ai.*``: the provider, the operation, the models, the tokens); every span carries
keyhole's own decision (``keyhole.*``) and the HTTP basics. Built from the audit record after
the answer ended — the same facts as the audit line, so no header value, query value or body
ever reaches a span. The pod and namespace come from ``OTEL_RESOURCE_ATTRIBUTES``, which the
operator sets from the downward API.
"""

from __future__ import annotations

import time

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from keyhole_sidecar import __version__
from keyhole_sidecar.audit import AuditRecord

PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini"}
EXPORT_DELAY_MS = 1000  # spans leave at most this long after their request ended


def operation(api: str, path: str) -> str:
    """The GenAI operation a request to ``path`` of ``api`` is."""
    if "embedding" in path or ":embedContent" in path or ":batchEmbedContents" in path:
        return "embeddings"
    if api == "gemini":
        return "generate_content"
    return "chat"


def _mcp_span(calls: list[dict], attributes: dict) -> str | None:
    """The MCP conventions (OpenTelemetry GenAI, *MCP*): ``mcp.method.name``, the tool or
    prompt, the resource URI; the span is named ``{method} {tool}``. A batch's span names its
    first message (every message is in the audit line)."""
    first = calls[0]
    method = first.get("method")
    if not method:
        return None
    attributes["mcp.method.name"] = method
    if len(calls) > 1:
        attributes["keyhole.mcp.messages"] = len(calls)
    target = None
    if "tool" in first:
        target = attributes["gen_ai.tool.name"] = first["tool"]
        attributes["gen_ai.operation.name"] = "execute_tool"
    elif "prompt" in first:
        target = attributes["gen_ai.prompt.name"] = first["prompt"]
    elif "resource" in first:
        attributes["mcp.resource.uri"] = first["resource"]
    if "decision" in first:
        attributes["keyhole.mcp.decision"] = first["decision"]
        if first["decision"] != "allowed":
            attributes["error.type"] = "keyhole_" + first.get("reason", "denied")
    return f"{method} {target}" if target else method


class Tracing:
    def __init__(self, endpoint: str):
        resource = Resource.create({"service.name": "keyhole-sidecar",
                                    "service.version": __version__})
        self._provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces", timeout=5)
        self._provider.add_span_processor(BatchSpanProcessor(
            exporter, schedule_delay_millis=EXPORT_DELAY_MS))
        self._tracer = self._provider.get_tracer("keyhole", __version__)

    def request_done(self, record: AuditRecord) -> None:
        """The span of one answered request, from its audit record."""
        ended = time.time_ns()
        started = ended - int((time.monotonic() - record.started) * 1e9)
        host, _, port = record.host.rpartition(":")
        attributes = {
            "http.request.method": record.method, "http.response.status_code": record.status,
            "server.address": host or record.host, "keyhole.mode": record.mode,
            "keyhole.decision": record.decision, "keyhole.reason": record.reason,
            "keyhole.injection": record.injection or "-",
            "keyhole.bytes_in": record.bytes_in, "keyhole.bytes_out": record.bytes_out,
        }
        if port.isdigit():
            attributes["server.port"] = int(port)
        if record.protocol:
            attributes["network.protocol.name"] = "http"
            attributes["keyhole.client_protocol"] = record.protocol
        name = record.method
        llm = record.llm
        if llm is not None:
            op = operation(llm["api"], record.path)
            model = llm["model"] or "unknown"
            name = f"{op} {model}"
            attributes.update({
                "gen_ai.system": PROVIDERS[llm["api"]],
                "gen_ai.provider.name": PROVIDERS[llm["api"]],
                "gen_ai.operation.name": op, "gen_ai.request.model": model,
                "gen_ai.response.model": model,
                "gen_ai.usage.input_tokens": llm["input_tokens"],
                "gen_ai.usage.output_tokens": llm["output_tokens"],
                "keyhole.llm.cached_input_tokens": llm["cached_input_tokens"],
                "keyhole.llm.reasoning_tokens": llm["reasoning_tokens"],
                "keyhole.llm.estimated": llm["estimated"],
                "keyhole.llm.priced": bool(llm.get("priced")),
            })
            if llm.get("cost_usd") is not None:
                attributes["keyhole.llm.cost_usd"] = llm["cost_usd"]
        if record.mcp:
            name = _mcp_span(record.mcp, attributes) or name
        span = self._tracer.start_span(name, kind=SpanKind.CLIENT, start_time=started,
                                       attributes=attributes)
        if record.decision == "error" or record.status >= 500:
            span.set_status(Status(StatusCode.ERROR, record.reason))
        span.end(end_time=ended)

    def shutdown(self) -> None:
        """Send what is queued (bounded by the exporter's timeout) and stop."""
        self._provider.shutdown()
