"""One ClusterSecretInjection for two agent namespaces, on the real node: the chart's operator,
the kubelet's projected tokens and default sync settings, real agents (curl through the
injected proxy variables). The Secret exists only in keyhole's namespace; rotation and a
namespace labelled out are followed within the bounds docs/operator.md states (values asked
every 10 s). An operator outage (values kept for clusterInjections.keepValuesSeconds, then
refused) is shown with the real sidecar and operator processes in
tests/cluster/test_cluster_injections.py, where it costs no Deployment rollout.
"""

from __future__ import annotations

import base64
import json
import secrets
import time

from tests.node.conftest import RELEASE_NAMESPACE, agent_deployment
from tests.node.test_shared_budgets import channel_alias

SERVED, OTHER = ("fleet-a", "fleet-b"), "fleet-c"
NAME = "fleet-routed"
VALUE = "sk-node-FLEET-6c1d0e9f4b"
ROTATED = "sk-node-FLEET-ROTATED-2a7e"
POLL_SECONDS = 10  # the sidecar's default --operator-values-seconds


def cluster_injection() -> dict:
    return {
        "apiVersion": "keyhole.dev/v1alpha1", "kind": "ClusterSecretInjection",
        "metadata": {"name": NAME},
        "spec": {
            "namespaceSelector": {"matchLabels": {"keyhole.dev/fleet": "node"}},
            "podSelector": {"matchLabels": {"keyhole.dev/fleet-routed": "true"}},
            "hosts": ["api.routed.test"],
            "headers": [{"name": "Authorization", "format": "Bearer {value}",
                         "valueFrom": {"secretKeyRef": {"name": NAME, "key": "api-key"}}}],
        },
    }


class Fleet:
    def __init__(self, kube, images, upstream):
        self.kube, self.images, self.upstream = kube, images, upstream

    def deploy(self, namespace: str, app: str, tagged: bool) -> None:
        labels = {"keyhole.dev/fleet-routed": "true"} if tagged else {}
        deployment = agent_deployment(app, self.images["agent"].name, labels)
        deployment["spec"]["template"]["spec"]["hostAliases"].append(channel_alias(self.kube))
        self.kube.apply([deployment], namespace)

    def pod(self, namespace: str, app: str = "agent") -> dict:
        (found,) = [p for p in self.kube.get_all("pods", namespace)
                    if p["metadata"].get("labels", {}).get("app") == app
                    and not p["metadata"].get("deletionTimestamp")]
        return found

    def call(self, namespace: str) -> tuple[str, list[str]]:
        """curl from the agent container: its status, and the Authorization the upstream got."""
        marker = secrets.token_hex(4)
        done = self.kube.kubectl(
            "exec", "-n", namespace, self.pod(namespace)["metadata"]["name"], "-c", "agent",
            "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
            f"https://api.routed.test/fleet/{marker}", check=False)
        seen = self.upstream.find(marker)
        return done.stdout.strip(), [v for r in seen for v in r.header("Authorization")]

    def injects(self, namespace: str, value: str) -> bool:
        status, authorization = self.call(namespace)
        return status == "200" and authorization == [f"Bearer {value}"]


def test_one_cluster_injection_serves_two_namespaces_from_one_central_secret(
        release, kube, node, node_upstream):
    fleet = Fleet(kube, node.images, node_upstream)
    for namespace in (*SERVED, OTHER):
        kube.kubectl("create", "namespace", namespace)
    for namespace in SERVED:
        kube.kubectl("label", "namespace", namespace, "keyhole.dev/fleet=node")
    kube.kubectl("create", "secret", "generic", NAME, "-n", RELEASE_NAMESPACE,
                 f"--from-literal=api-key={VALUE}")
    kube.kubectl("label", "secret", NAME, "-n", RELEASE_NAMESPACE,
                 "keyhole.dev/cluster-injection=true")
    kube.apply([cluster_injection()])

    def ready() -> bool:
        status = kube.get("clustersecretinjection", NAME, None).get("status") or {}
        return status.get("matchedNamespaces") == 2 and any(
            c["type"] == "Ready" and c["status"] == "True" for c in status["conditions"])

    kube.wait_for(ready, 60, "the cluster injection Ready in its two namespaces")
    for namespace in SERVED:
        fleet.deploy(namespace, "agent", tagged=True)
    fleet.deploy(SERVED[0], "untagged", tagged=False)
    fleet.deploy(OTHER, "agent", tagged=True)
    for namespace, app in ((SERVED[0], "agent"), (SERVED[1], "agent"),
                           (SERVED[0], "untagged"), (OTHER, "agent")):
        kube.kubectl("rollout", "status", f"deployment/{app}", "-n", namespace,
                     "--timeout=120s")

    # Tagged pods of both selected namespaces get the key; the others have no sidecar.
    for namespace in SERVED:
        assert fleet.injects(namespace, VALUE)
    for namespace, app in ((SERVED[0], "untagged"), (OTHER, "agent")):
        containers = fleet.pod(namespace, app)["spec"].get("initContainers") or []
        assert "keyhole-proxy" not in [c["name"] for c in containers]
    encoded = base64.b64encode(VALUE.encode()).decode()
    holders = {s["metadata"]["namespace"] for s in json.loads(
        kube.kubectl("get", "secret", "-A", "-o", "json").stdout)["items"]
        if encoded in (s.get("data") or {}).values()}
    assert holders == {RELEASE_NAMESPACE}

    # Rotation: both sidecars inject the new value within one values poll.
    started = time.monotonic()
    kube.kubectl("patch", "secret", NAME, "-n", RELEASE_NAMESPACE, "--type=merge", "-p",
                 json.dumps({"data": {"api-key": base64.b64encode(ROTATED.encode()).decode()}}))
    for namespace in SERVED:
        kube.wait_for(lambda ns=namespace: fleet.injects(ns, ROTATED), 2 * POLL_SECONDS,
                      f"the rotated key in {namespace}")
    rotated = time.monotonic() - started
    print(f"\n[node] central Secret rotated: both namespaces inject it {rotated:.1f}s later")

    # A namespace labelled out is revoked live; the other keeps its key.
    started = time.monotonic()
    kube.kubectl("label", "namespace", SERVED[0], "keyhole.dev/fleet-")
    kube.wait_for(lambda: not fleet.injects(SERVED[0], ROTATED), 2 * POLL_SECONDS,
                  "the revocation in the namespace labelled out")
    revoked = time.monotonic() - started
    print(f"[node] namespace labelled out: revoked {revoked:.1f}s later (kubelet defaults)")
    assert fleet.injects(SERVED[1], ROTATED)
    status, authorization = fleet.call(SERVED[0])
    assert ROTATED not in " ".join(authorization), status

    for where in (kube.kubectl("get", "events", "-A", "-o", "json").stdout,
                  json.dumps(kube.get("clustersecretinjection", NAME, None))):
        assert VALUE not in where and ROTATED not in where
    kube.kubectl("delete", "clustersecretinjection", NAME)
