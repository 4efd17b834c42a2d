"""The operator's Prometheus metrics, bounded labels only (no pod or namespace names)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, start_http_server

registry = CollectorRegistry(auto_describe=True)
reconciles = Counter("keyhole_operator_reconciles", "SecretInjection reconciliations by result.",
                     ["result"], registry=registry)
admissions = Counter("keyhole_operator_admissions", "Admission decisions by webhook and result "
                     "(injected, skipped, refused, allowed, denied).", ["webhook", "result"],
                     registry=registry)
route_updates = Counter("keyhole_operator_route_updates", "Routes annotations rewritten on "
                        "running pods (live grant or revoke).", registry=registry)
restarts_required = Counter("keyhole_operator_restart_required", "Pods marked as needing a "
                            "restart to use an injection.", registry=registry)
channel_calls = Counter("keyhole_operator_channel_calls", "Operator channel calls (sidecars "
                        "leasing shared budgets) by HTTP status: 200 answered, 401/403 refused "
                        "tokens, 409-retries exhausted or API server away 503.", ["code"],
                        registry=registry)
ledger_conflicts = Counter("keyhole_operator_ledger_conflicts", "Ledger writes refused because "
                           "another writer changed the injection first (read again and redone).",
                           registry=registry)
approvals_asked = Counter("keyhole_operator_approvals_requested", "ApprovalRequests created for "
                          "requests sidecars hold.", registry=registry)
approval_decisions = Counter("keyhole_operator_approval_decisions", "Decisions on "
                             "ApprovalRequests through the webhook, by result (approved, denied, "
                             "refused: the webhook said no).", ["result"], registry=registry)
for _result in ("ok", "error"):
    reconciles.labels(_result)
for _result in ("approved", "denied", "refused"):
    approval_decisions.labels(_result)
for _code in ("200", "400", "401", "403", "404", "429", "503"):
    channel_calls.labels(_code)


def serve(host: str, port: int) -> None:
    start_http_server(port, addr=host, registry=registry)
