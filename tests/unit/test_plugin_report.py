"""kubectl keyhole's answers as pure functions of what it read (tests/cluster/test_plugin.py
runs the plugin against the real API server)."""

from __future__ import annotations

from keyhole_kubectl.cli import render_status
from keyhole_kubectl.report import status
from keyhole_kubectl.snapshot import Namespace


def injection(name: str, usage: dict | None = None) -> dict:
    return {"apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjection",
            "metadata": {"name": name, "namespace": "agents"},
            "spec": {"podSelector": {"matchLabels": {f"keyhole.dev/{name}": "true"}},
                     "hosts": ["api.openai.com"], "llm": {"api": "openai"},
                     "headers": [{"name": "Authorization",
                                  "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
            "status": {"usage": usage} if usage else {}}


def test_status_shows_what_the_pods_spent_today_and_the_budget_left():
    spent = injection("openai", {"day": "2026-12-06", "spentToday": "1325 tokens, $0.0011",
                                 "budgetLeft": "0 tokens (injection:tokens/day)"})
    answer = status([Namespace("agents", injections=[spent, injection("quiet")])])
    by_name = {i["name"]: i for i in answer["injections"]}
    assert by_name["openai"]["spentToday"] == "1325 tokens, $0.0011"
    assert by_name["openai"]["budgetLeft"] == "0 tokens (injection:tokens/day)"
    assert by_name["quiet"]["spentToday"] is None
    wide = render_status(answer, wide=True, all_namespaces=False).splitlines()
    assert wide[0].split()[-3:] == ["SPENT-TODAY", "BUDGET-LEFT", "MESSAGE"]
    assert "1325 tokens, $0.0011" in wide[1] and "0 tokens (injection:tokens/day)" in wide[1]
    assert "SPENT-TODAY" not in render_status(answer, wide=False, all_namespaces=False)


def test_status_shows_the_cluster_injections_that_serve_the_namespace_beside_its_own():
    fleet = {"apiVersion": "keyhole.dev/v1alpha1", "kind": "ClusterSecretInjection",
             "metadata": {"name": "fleet-openai"},
             "spec": {"namespaceSelector": {"matchLabels": {"keyhole.dev/agents": "true"}},
                      "podSelector": {"matchLabels": {"keyhole.dev/fleet": "true"}},
                      "hosts": ["api.openai.com"],
                      "headers": [{"name": "Authorization",
                                   "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
             "status": {"namespaces": ["agents"], "conditions": [
                 {"type": "Ready", "status": "True", "message": "serving 1 pod(s)"}]}}
    routes = '{"items": [{"metadata": {"name": "fleet-openai"}}]}'
    pods = [{"metadata": {"name": "a", "labels": {"keyhole.dev/fleet": "true"},
                          "annotations": {"keyhole.dev/injections": routes}}},
            {"metadata": {"name": "b", "labels": {"keyhole.dev/fleet": "true"},
                          "annotations": {"keyhole.dev/restart-required": "fleet-openai"}}},
            {"metadata": {"name": "c", "labels": {}}}]
    answer = status([Namespace("agents", injections=[injection("openai")], pods=pods,
                               cluster_injections=[fleet])])
    rows = {(i["kind"], i["name"]): i for i in answer["injections"]}
    row = rows[("ClusterSecretInjection", "fleet-openai")]
    assert (row["selectedPods"], row["withKey"], row["restartRequired"]) == (2, 1, 1)
    assert ("SecretInjection", "openai") in rows
    shown = render_status(answer, wide=False, all_namespaces=False)
    assert "clustersecretinjection/fleet-openai" in shown


def test_explain_pod_names_the_cluster_injections_that_serve_its_namespace():
    from keyhole_kubectl.cli import render_explain
    from keyhole_kubectl.report import explain_pod

    fleet = {"apiVersion": "keyhole.dev/v1alpha1", "kind": "ClusterSecretInjection",
             "metadata": {"name": "fleet-openai"},
             "spec": {"namespaceSelector": {},
                      "podSelector": {"matchLabels": {"keyhole.dev/fleet": "true"}},
                      "hosts": ["api.openai.com"],
                      "headers": [{"name": "Authorization",
                                   "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
             "status": {"namespaces": ["agents"]}}
    pod = {"metadata": {"name": "a", "labels": {}}}
    answer = explain_pod(Namespace("agents", pods=[pod], cluster_injections=[fleet]), "a")
    (row,) = answer["injections"]
    assert row["kind"] == "ClusterSecretInjection" and row["verdict"] == "not selected"
    assert "keyhole.dev/fleet" in row["why"]
    assert "clustersecretinjection/fleet-openai" in render_explain(answer, wide=False)


def test_explain_pod_shows_the_mcp_policy_of_an_injection_the_pod_has():
    from keyhole_kubectl.report import explain_pod

    github = {"apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjection",
              "metadata": {"name": "github-mcp"},
              "spec": {"podSelector": {"matchLabels": {"keyhole.dev/github-mcp": "true"}},
                       "hosts": ["api.githubcopilot.com"],
                       "headers": [{"name": "Authorization",
                                    "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
                       "mcp": {"tools": {"allow": ["get_*"], "deny": ["*merge*"]}}}}
    pod = {"metadata": {"name": "a", "labels": {"keyhole.dev/github-mcp": "true"},
                        "annotations": {"keyhole.dev/routes": "github-mcp"}},
           "spec": {"containers": [{"name": "keyhole-proxy"}]}}
    answer = explain_pod(Namespace("agents", pods=[pod], injections=[github]), "a")
    (row,) = answer["injections"]
    assert row["mcp"] == ["tools: only get_*; never *merge*", "resources: all", "prompts: all"]
