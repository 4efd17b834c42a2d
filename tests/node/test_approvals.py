"""A person's yes and just-in-time access on the real node, through the chart's webhooks and
RBAC: an agent pod's POST that needs approval waits in its sidecar, the chart's notification
webhook tells a receiver, ``kubectl keyhole approve`` lets exactly that request through with
the key; ``kubectl keyhole grant`` gives the pod another injection and takes it back on time.
"""

from __future__ import annotations

import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from tests.node.conftest import SECRET_VALUE, agent_deployment
from tests.node.test_shared_budgets import channel_alias

NAMESPACE = "approvals"
GRANT_SECONDS = 8


def injection(name: str, host: str, **spec) -> dict:
    return {"apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjection",
            "metadata": {"name": name},
            "spec": {"podSelector": {"matchLabels": {f"keyhole.dev/{name}": "true"}},
                     "hosts": [host],
                     "headers": [{"name": "Authorization", "format": "Bearer {value}",
                                  "valueFrom": {"secretKeyRef": {"name": "openai-credentials",
                                                                 "key": "api-key"}}}],
                     **spec}}


def test_a_post_waits_for_a_person_and_a_grant_ends_on_time(agents, release, node_upstream,
                                                            node_notifications):
    kube = agents.kube
    kube.kubectl("create", "namespace", NAMESPACE)
    kube.kubectl("create", "secret", "generic", "openai-credentials", "-n", NAMESPACE,
                 f"--from-literal=api-key={SECRET_VALUE}")
    kube.apply([injection("refunds", "other.routed.test", rules=[
                    {"methods": ["POST"], "paths": ["/refunds/*"], "approval": {"timeout": "60s"}},
                    {"methods": ["GET"]}]),
                injection("second", "basic.routed.test")], NAMESPACE)
    kube.wait_for(lambda: all("conditions" in (kube.get("si", n, NAMESPACE).get("status") or {})
                              for n in ("refunds", "second")), 60, "the injections observed")
    deployment = agent_deployment("agent", agents.images["agent"].name,
                                  {"keyhole.dev/refunds": "true"})
    deployment["spec"]["template"]["spec"]["hostAliases"].append(channel_alias(kube))
    kube.apply([deployment], NAMESPACE)
    kube.kubectl("rollout", "status", "deployment/agent", "-n", NAMESPACE, "--timeout=120s")
    (pod,) = [p for p in kube.get_all("pods", NAMESPACE)
              if not p["metadata"].get("deletionTimestamp")]
    name = pod["metadata"]["name"]

    def curl(*args: str) -> str:
        return kube.kubectl("exec", "-n", NAMESPACE, name, "-c", "agent", "--", "curl", "-s",
                            "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "90",
                            *args, check=False).stdout.strip()

    marker = secrets.token_hex(4)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(curl, "-X", "POST", "-d", '{"amount": 100}',
                           f"https://other.routed.test/refunds/{marker}")

        def waiting() -> list[dict]:
            return json.loads(kube.keyhole("approvals", "-n", NAMESPACE, "-o", "json").stdout)

        (row,) = kube.wait_for(waiting, 60, "the ApprovalRequest of the held POST")
        assert row["what"] == f"POST other.routed.test/refunds/{marker}"
        assert node_upstream.find(marker) == []  # held: nothing left the pod
        told = kube.wait_for(lambda: node_notifications.about(row["name"]), 30,
                             "the chart's notification webhook told")
        assert told[0]["approve"] == f"kubectl keyhole approve {row['name']} -n {NAMESPACE}"
        started = time.monotonic()
        assert kube.keyhole("approve", row["name"], "-n", NAMESPACE).returncode == 0
        assert held.result(timeout=60) == "200"
        took = time.monotonic() - started
    (sent,) = node_upstream.find(marker)
    assert sent.header("Authorization") == [f"Bearer {SECRET_VALUE}"]
    print(f"\n[node] approve to the held request's answer in the agent: {took:.2f}s")

    # Just-in-time: the pod may use "second" for GRANT_SECONDS, then not.
    def injected(host: str) -> bool:
        mark = secrets.token_hex(4)
        curl(f"https://{host}/jit/{mark}")
        return [v for r in node_upstream.find(mark) for v in r.header("Authorization")] == [
            f"Bearer {SECRET_VALUE}"]

    assert not injected("basic.routed.test")
    granted_at = time.monotonic()
    kube.keyhole("grant", f"pod/{name}", "--injection", "second", "--for",
                 f"{GRANT_SECONDS}s", "-n", NAMESPACE)
    kube.wait_for(lambda: injected("basic.routed.test"), GRANT_SECONDS,
                  "the granted injection in use")
    kube.wait_for(lambda: not injected("basic.routed.test"), GRANT_SECONDS + 30,
                  "the grant revoked")
    ended = time.monotonic() - granted_at
    assert ended >= GRANT_SECONDS - 1
    print(f"[node] a {GRANT_SECONDS}s grant: revoked in the agent {ended:.1f}s after "
          "kubectl keyhole grant")
    assert injected("other.routed.test")  # what the pod had before stays
