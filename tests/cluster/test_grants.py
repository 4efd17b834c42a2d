"""Just-in-time access on the real API server with the real operator: ``kubectl keyhole grant``
gives a pod (or a Deployment's pods) an injection for a bounded time; the operator applies the
injection's labels, the pod's signed routes follow, and both are gone when the time is up or
the grant is deleted. The agent cannot grant itself access."""

from __future__ import annotations

import json

from tests.cluster.test_operator import (
    apply_injections,
    events,
    openai_injection,
    pod,
    routes_of,
    secret,
)


def granted(kube, namespace: str, *args: str, check: bool = True):
    return kube.keyhole("grant", *args, "-n", namespace, check=check)


def test_a_grant_gives_a_pod_an_injection_for_its_time_then_takes_back_only_what_it_added(
        kube, operator, namespace):
    secret(kube, namespace)
    apply_injections(kube, namespace, openai_injection(), openai_injection("second"))
    kube.apply([pod("agent", {"keyhole.dev/openai": "true"})], namespace)
    assert routes_of(kube, namespace, "agent") == ["openai"]

    made = granted(kube, namespace, "pod/agent", "--injection", "second", "--for", "4s",
                   "--reason", "incident 77")
    assert "may use injection second for 4s (granted by " in made.stdout, made.stdout
    kube.wait_for(lambda: routes_of(kube, namespace, "agent") == ["openai", "second"],
                  what="the grant applied")
    labels = kube.get("pod", "agent", namespace)["metadata"]["labels"]
    assert labels["keyhole.dev/second"] == "true"
    shown = json.loads(kube.keyhole("status", "-n", namespace, "-o", "json").stdout)["grants"]
    assert [(g["target"], g["injection"], g["reason"]) for g in shown] == [
        ("pod/agent", "second", "incident 77")]
    assert shown[0]["grantedBy"] and 0 < shown[0]["secondsLeft"] <= 4
    kube.wait_for(lambda: routes_of(kube, namespace, "agent") == ["openai"], timeout=20,
                  what="the grant revoked when its time is up")
    assert "keyhole.dev/second" not in kube.get("pod", "agent", namespace)["metadata"]["labels"]
    (grant,) = kube.get_all("accessgrants", namespace)
    assert grant["status"]["state"] == "Expired"
    assert "AccessGranted" in events(kube, namespace) and "AccessExpired" in events(
        kube, namespace)

    # A grant of what the pod has already takes nothing away when it ends (or is deleted).
    granted(kube, namespace, "pod/agent", "--injection", "openai", "--for", "1h")
    kube.wait_for(lambda: any((g.get("status") or {}).get("state") == "Active"
                              for g in kube.get_all("accessgrants", namespace)),
                  what="the second grant active")
    kube.kubectl("delete", "accessgrants", "--all", "-n", namespace)
    assert routes_of(kube, namespace, "agent") == ["openai"]
    assert kube.get("pod", "agent", namespace)["metadata"]["labels"]["keyhole.dev/openai"] == \
        "true"


def test_deleting_a_grant_revokes_at_once_and_the_agent_cannot_grant_itself(
        kube, operator, namespace, tmp_path):
    secret(kube, namespace)
    apply_injections(kube, namespace, openai_injection(), openai_injection("second"))
    kube.apply([pod("agent", {"keyhole.dev/openai": "true"})], namespace)
    granted(kube, namespace, "pod/agent", "--injection", "second", "--for", "2h")
    kube.wait_for(lambda: routes_of(kube, namespace, "agent") == ["openai", "second"],
                  what="the grant applied")
    kube.kubectl("delete", "accessgrants", "--all", "-n", namespace)
    kube.wait_for(lambda: routes_of(kube, namespace, "agent") == ["openai"],
                  what="deleting the grant revokes it")

    agent = kube.service_account_kubeconfig(namespace, "default", tmp_path / "agent.yaml")
    refused = granted(kube, namespace, "pod/agent", "--injection", "second", "--for", "1h",
                      "--kubeconfig", str(agent), check=False)
    assert refused.returncode == 1 and "refused" in refused.stderr  # no RBAC to create one
    kube.bind_role(namespace, "grant", [{"apiGroups": ["keyhole.dev"],
                                         "resources": ["accessgrants"], "verbs": ["create"]}])
    refused = granted(kube, namespace, "pod/agent", "--injection", "second", "--for", "1h",
                      "--kubeconfig", str(agent), check=False)
    assert "an agent never grants itself access" in refused.stderr, refused.stderr


def test_an_agent_asks_for_access_it_lacks_and_gets_it_only_once_a_person_approves(
        kube, operator, namespace, llm_upstream, tmp_path):
    import httpx

    from tests.cluster.test_shared_budgets import Agents
    from tests.support.config import injection, ref

    def named(name: str, host: str) -> dict:
        doc = injection(name, hosts=[host], headers=[{
            "name": "Authorization", "valueFrom": ref("openai", "key"),
            "format": "Bearer {value}"}])
        doc["spec"]["podSelector"] = {"matchLabels": {f"keyhole.dev/{name}": "true"}}
        return doc

    agents = Agents(kube, operator, namespace, llm_upstream, tmp_path)
    try:
        apply_injections(kube, namespace, named("openai", "api.openai.test"),
                         named("second", "api.second.test"))
        found = agents.pod("agent")
        sidecar = agents.sidecar(found, report_seconds=60)
        with httpx.Client(timeout=20) as http:
            asked = http.post(f"{sidecar.url}/.keyhole/access", json={
                "injection": "second", "for": "1m", "reason": "the refunds job"})
            unknown = http.post(f"{sidecar.url}/.keyhole/access", json={"injection": "nosuch"})
        assert asked.status_code == 202, asked.text
        name = asked.json()["approval"]
        assert f"kubectl keyhole approve {name} -n {namespace}" in asked.json()["message"]
        assert unknown.status_code == 404 and "no SecretInjection 'nosuch'" in unknown.text
        (row,) = json.loads(kube.keyhole("approvals", "-n", namespace, "-o", "json").stdout)
        assert row["what"] == "access to injection second for 60s: the refunds job"
        assert routes_of(kube, namespace, "agent") == ["openai"]  # nothing granted yet

        assert kube.keyhole("approve", name, "-n", namespace).returncode == 0
        kube.wait_for(lambda: routes_of(kube, namespace, "agent") == ["openai", "second"],
                      what="the approved ask granted")
        grant = kube.get("accessgrant", name, namespace)
        assert grant["spec"]["seconds"] == 60 and grant["spec"]["target"] == {
            "kind": "Pod", "name": "agent"}
        assert grant["status"]["grantedBy"] == grant["metadata"]["annotations"][
            "keyhole.dev/granted-by"] != "system:serviceaccount:keyhole-system:keyhole-operator"
        assert "the refunds job" in grant["spec"]["reason"]
        line = sidecar.wait_audit(lambda r: r.get("reason") == "access_asked")
        assert line["injection"] == "second" and line["status"] == 202
    finally:
        kube.kubectl("delete", "accessgrants", "--all", "-n", namespace, check=False)
        agents.close()
