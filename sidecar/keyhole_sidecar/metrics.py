"""Prometheus metrics, all in one place. Labels are bounded: injection names come from the
config, every unrouted host shares the label ``-``, methods outside the standard set are
``OTHER``, and no label ever holds a path, a host name of an unrouted request or a value."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily

UNROUTED = "-"
MAX_MODELS = 32  # distinct model labels per injection; more are counted as "other"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT"})
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                    10, 30, 60, 120)


class _ExpiringSource(Protocol):
    injection: str
    kind: str
    mints_tokens: bool

    def expires_in(self, now: float) -> float | None: ...


class _Answered(Protocol):
    """What of a request's audit record its metrics count."""
    method: str
    protocol: str | None
    status: int
    decision: str
    reason: str
    bytes_in: int
    bytes_out: int


def method_label(method: str) -> str:
    return method if method in _METHODS else "OTHER"


class _Computed:
    """A gauge family computed when Prometheus scrapes, from ``rows()``: (labels..., value)."""

    def __init__(self, name: str, documentation: str, labels: list[str],
                 rows: Callable[[], Iterable[tuple]]):
        self._name, self._documentation, self._labels, self._rows = (
            name, documentation, labels, rows)

    def describe(self):
        return []

    def collect(self):
        family = GaugeMetricFamily(self._name, self._documentation, labels=self._labels)
        for *labels, value in self._rows():
            family.add_metric(labels, value)
        yield family


class Metrics:
    """The sidecar's metrics, on a registry of their own (so tests can make several)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("keyhole_requests", "Requests answered, by injection, method, "
                                "status class and the client's protocol (http/1.1 or h2).",
                                ["injection", "method", "status_class", "protocol"], registry=r)
        self.decisions = Counter("keyhole_decisions", "Routing decisions: injected, passthrough "
                                 "or denied, with the reason.", ["decision", "reason"], registry=r)
        self.duration = Histogram("keyhole_request_duration_seconds", "Time from request to the "
                                  "end of the response.", ["injection"],
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram("keyhole_upstream_duration_seconds", "Time from "
                                           "sending upstream to the response headers.",
                                           ["injection"], buckets=_LATENCY_BUCKETS, registry=r)
        self.open_connections = Gauge("keyhole_open_connections", "Client connections open.",
                                      registry=r)
        self.open_tunnels = Gauge("keyhole_open_tunnels", "CONNECT tunnels open, intercepted or "
                                  "blind.", ["kind"], registry=r)
        self.bytes = Counter("keyhole_bytes", "Body bytes relayed, upstream (sent) or downstream "
                             "(received).", ["injection", "direction"], registry=r)
        self.leaves_minted = Counter("keyhole_leaf_certificates_minted", "Leaf certificates "
                                     "minted for intercepted hosts.", registry=r)
        self.reloads = Counter("keyhole_config_reloads", "Configuration (re)loads by result.",
                               ["result"], registry=r)
        self.upstream_errors = Counter("keyhole_upstream_errors", "Failures talking to upstreams "
                                       "by kind.", ["kind"], registry=r)
        self.routes = Gauge("keyhole_injections", "Injections in the configuration being served.",
                            registry=r)
        self.config_timestamp = Gauge("keyhole_config_last_reload_success_timestamp_seconds",
                                      "When the configuration being served was loaded.",
                                      registry=r)
        self.credential_mints = Counter("keyhole_credential_mints", "Tokens minted by credential "
                                        "sources (githubApp, oauth2), by injection, source and "
                                        "result: minted, or why minting failed.",
                                        ["injection", "source", "result"], registry=r)
        self.credential_expiry = Gauge("keyhole_credential_expiry_seconds", "Seconds until the "
                                       "token a credential source serves expires (negative: "
                                       "expired; 0 before the first mint).",
                                       ["injection", "source"], registry=r)
        self.limit_rejections = Counter("keyhole_limit_rejections", "Requests refused by an "
                                        "injection's spec.limits (nothing was sent upstream), "
                                        "by injection and limit.", ["injection", "limit"],
                                        registry=r)
        self.llm_tokens = Counter("keyhole_llm_tokens", "Tokens of model API answers "
                                  "(spec.llm), by injection, model and kind: input and output "
                                  "(all of them), cached_input and reasoning (of which); "
                                  "estimated=true where the answer reported no usage.",
                                  ["injection", "model", "kind", "estimated"], registry=r)
        self.llm_answers = Counter("keyhole_llm_answers", "Model API answers counted, by "
                                   "injection, model and whether their usage was estimated.",
                                   ["injection", "model", "estimated"], registry=r)
        self.llm_cost = Counter("keyhole_llm_cost", "USD spent on model APIs by injection "
                                "and model, at spec.llm.prices or the shipped table.",
                                ["injection", "model", "estimated"], registry=r)
        self.llm_unpriced = Counter("keyhole_llm_unpriced_answers", "Answers of a model no "
                                    "price is known for: counted in tokens, not in USD.",
                                    ["injection", "model"], registry=r)
        self.budget_refusals = Counter("keyhole_llm_budget_refusals", "Requests refused by a "
                                       "spec.llm budget (nothing was sent upstream).",
                                       ["injection", "budget"], registry=r)
        self.channel_up = Gauge("keyhole_channel_up", "1 when the operator channel "
                                "answered the sidecar's last call of this kind (leases: shared "
                                "budgets; routes), 0 when it did not or refused.", ["call"],
                                registry=r)
        self._models: dict[str, set[str]] = {}
        self.mcp_calls = Counter("keyhole_mcp_calls", "MCP calls judged by spec.mcp, by "
                                 "injection, kind (tools, prompts, resources), tool or prompt "
                                 "name (resources: -) and decision (allowed, denied).",
                                 ["injection", "kind", "tool", "decision"], registry=r)
        self._mcp_names: dict[str, set[str]] = {}
        self.approvals = Counter("keyhole_approvals", "Requests held for a person's approval, by "
                                 "injection and how the wait ended: approved, granted (a grant "
                                 "made with --for was alive), denied, timeout, withdrawn (the "
                                 "client left), unavailable (no operator to ask), backlog, "
                                 "gone (the object deleted).", ["injection", "decision"],
                                 registry=r)
        self.approval_wait = Histogram("keyhole_approval_wait_seconds", "How long a request "
                                       "was held for approval, until it was decided, timed out "
                                       "or withdrawn.", ["injection"], registry=r,
                                       buckets=(1, 5, 15, 30, 60, 90, 180, 300, 600, 1800,
                                                3600))
        self.approvals_held = Gauge("keyhole_approvals_held", "Requests held for approval "
                                    "now.", registry=r)
        self.approval_oldest = Gauge("keyhole_approval_oldest_wait_seconds", "Seconds the "
                                     "longest-held request has waited for approval (0: none); "
                                     "the chart's KeyholeApprovalWaiting alert reads it.",
                                     registry=r)
        self.available = Gauge("keyhole_injection_available", "1 while an injection injects; "
                               "0 while its Secret or key is missing or its value unusable "
                               "(requests to its hosts are refused).", ["injection"],
                               registry=r)
        self.build = Info("keyhole_build", "The running sidecar: version, Python, event loop.",
                          registry=r)
        self._expiry_labels: set[tuple[str, str]] = set()
        self._available_labels: set[str] = set()
        for decision in ("injected", "passthrough", "denied"):
            self.decisions.labels(decision, "-")
        for result in ("success", "error"):
            self.reloads.labels(result)
        for kind in ("intercepted", "blind"):
            self.open_tunnels.labels(kind)
        self._per_injection: dict[str, tuple] = {}
        self._per_outcome: dict[tuple[str, ...], tuple] = {}

    def _injection_children(self, injection: str) -> tuple:
        children = self._per_injection.get(injection)
        if children is None:
            children = self._per_injection[injection] = (
                self.duration.labels(injection), self.bytes.labels(injection, "upstream"),
                self.bytes.labels(injection, "downstream"),
                self.upstream_duration.labels(injection))
        return children

    def limit_refused(self, injection: str, limit: str) -> None:
        self.limit_rejections.labels(injection, limit).inc()

    def budget_refused(self, injection: str, budget: str) -> None:
        self.budget_refusals.labels(injection, budget).inc()

    def watch_budgets(self, remaining: Callable[[], Iterable[tuple[str, str, float]]],
                      limits: Callable[[], Iterable[tuple[str, str, float]]],
                      used: Callable[[], Iterable[tuple[str, str, float]]]) -> None:
        """``keyhole_llm_budget_remaining``, ``_limit`` and ``_used``, computed at each
        scrape."""
        self.registry.register(_Computed(
            "keyhole_llm_budget_used", "What this pod used of a per-pod spec.llm budget in its "
            "current UTC window (tokens, or USD for spend budgets); past the limit by what the "
            "answers in flight when it ran out overshot it.", ["injection", "budget"], used))
        self.registry.register(_Computed(
            "keyhole_llm_budget_remaining", "What is left of a spec.llm budget in its current "
            "UTC window, in this pod: tokens, or USD for spend budgets.",
            ["injection", "budget"], remaining))
        self.registry.register(_Computed(
            "keyhole_llm_budget_limit", "A spec.llm budget's figure per window: tokens, or USD "
            "for spend budgets.", ["injection", "budget"], limits))

    def watch_windows(self, windows_left: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """``keyhole_limit_window_remaining``, computed at each scrape from the limiter."""
        self.registry.register(_Computed(
            "keyhole_limit_window_remaining", "Requests left in the current window of an "
            "injection's spec.limits.window (or a rule's).", ["injection", "window"],
            windows_left))

    def upstream_answered(self, injection: str, seconds: float) -> None:
        self._injection_children(injection)[3].observe(seconds)

    def credential_minted(self, injection: str, source: str, _token: object) -> None:
        self.credential_mints.labels(injection, source, "minted").inc()

    def credential_failed(self, injection: str, source: str, error) -> None:
        self.credential_mints.labels(injection, source, error.reason).inc()

    def follow_credentials(self, sources: Iterable[_ExpiringSource]) -> None:
        """Expose each live source's time to expiry; forget sources no longer configured."""
        labels = set()
        for source in sources:
            if not source.mints_tokens:
                continue  # AWS signs with long-lived keys: nothing expires
            key = (source.injection, source.kind)
            labels.add(key)
            self.credential_expiry.labels(*key).set_function(
                lambda s=source: s.expires_in(time.time()) or 0.0)
        for stale in self._expiry_labels - labels:
            self.credential_expiry.remove(*stale)
        self._expiry_labels = labels

    def model_label(self, injection: str, model: str | None) -> str:
        """The model as a label: at most MAX_MODELS per injection (an upstream names them),
        the rest ``other``; ``unknown`` when the answer named none."""
        if not model:
            return "unknown"
        seen = self._models.setdefault(injection, set())
        if model in seen:
            return model
        if len(seen) >= MAX_MODELS:
            return "other"
        seen.add(model)
        return model

    def mcp_call(self, injection: str, name: str, kind: str, decision: str) -> None:
        """Count one judged MCP call. The agent picks the names: at most MAX_MODELS distinct
        per injection get a label of their own, the rest ``other``."""
        label = "-"
        if kind != "resources":
            seen = self._mcp_names.setdefault(injection, set())
            if name in seen or len(seen) < MAX_MODELS:
                seen.add(name)
                label = name
            else:
                label = "other"
        self.mcp_calls.labels(injection, kind, label, decision).inc()

    def llm_used(self, injection: str, usage, spent: float | None) -> None:
        """Count one answer's usage (a keyhole_sidecar.usage.meter.Usage) and its cost."""
        model = self.model_label(injection, usage.model)
        estimated = "true" if usage.estimated else "false"
        self.llm_answers.labels(injection, model, estimated).inc()
        if spent is None:
            self.llm_unpriced.labels(injection, model).inc()
        elif spent:
            self.llm_cost.labels(injection, model, estimated).inc(spent)
        for kind, count in (("input", usage.input), ("output", usage.output),
                            ("cached_input", usage.cached_input),
                            ("reasoning", usage.reasoning)):
            if count:
                self.llm_tokens.labels(injection, model, kind, estimated).inc(count)

    def follow_injections(self, table) -> None:
        """``keyhole_injection_available`` for each injection of ``table`` (a RouteTable)."""
        names = set()
        for route in table.routes:
            names.add(route.name)
            self.available.labels(route.name).set(0 if route.unavailable else 1)
        for stale in self._available_labels - names:
            self.available.remove(stale)
        self._available_labels = names

    def request_done(self, injection: str, answered: _Answered, seconds: float) -> None:
        """Account for one answered request. Label lookups are memoised (the label sets are
        bounded, see the module docstring): prometheus-client's ``labels()`` locks and
        validates on every call, which showed in the request path's profile."""
        children = self._injection_children(injection)
        decision, reason = answered.decision, answered.reason
        outcome = (injection, method_label(answered.method), f"{answered.status // 100}xx",
                   answered.protocol or "http/1.1", decision, reason)
        counters = self._per_outcome.get(outcome)
        if counters is None:
            counters = self._per_outcome[outcome] = (
                self.requests.labels(*outcome[:4]), self.decisions.labels(decision, reason))
        counters[0].inc()
        counters[1].inc()
        children[0].observe(seconds)
        children[1].inc(answered.bytes_in)
        children[2].inc(answered.bytes_out)
