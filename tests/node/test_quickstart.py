"""The README's Kubernetes quick start, step by step, on the real node: ``helm install`` (the
``release`` fixture), ``kubectl create secret generic openai-credentials --from-literal=…``,
``kubectl apply -f examples/openai.yaml -f examples/agent-deployment.yaml``, then the checks the
README lists.

Two changes to the example files, both forced by a machine without a registry or the
internet, and nothing else: the agent's image is the local one (``python:3.12-slim`` cannot
be pulled), and its pod gets a hostAlias so ``api.openai.com`` is the HTTPS upstream on the
node, whose CA the sidecars trust through the chart's ``sidecar.upstreamCA``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.cluster.node import NODE_IP

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-proj-quickstart-7e3d9c1f"
NAMESPACE = "quickstart"


def _examples(agent_image: str) -> list[dict]:
    documents = []
    for name in ("openai.yaml", "agent-deployment.yaml"):
        documents += [d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d]
    for doc in documents:
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            spec["containers"][0].update(image=agent_image, imagePullPolicy="Never")
            spec["hostAliases"] = [{"ip": NODE_IP, "hostnames": ["api.openai.com"]}]
    return documents


def test_the_readme_quick_start_works_on_a_real_node(release, kube, node, node_upstream):
    kube.kubectl("create", "namespace", NAMESPACE)
    readme = (ROOT / "README.md").read_text()
    create = 'kubectl create secret generic openai-credentials --from-literal=api-key="$OPENAI_API_KEY"'
    assert create in readme
    kube.kubectl("create", "secret", "generic", "openai-credentials",
                 f"--from-literal=api-key={KEY}", "-n", NAMESPACE)  # as the README's, $OPENAI_API_KEY=KEY
    kube.apply(_examples(node.images["agent"].name), NAMESPACE)
    kube.kubectl("rollout", "status", "deployment/agent", "-n", NAMESPACE, "--timeout=120s")

    def first_request_logged() -> str:
        logs = kube.kubectl("logs", "deploy/agent", "-n", NAMESPACE, check=False).stdout
        return logs if "models" in logs else ""

    agent_logs = kube.wait_for(first_request_logged, 60, "the agent's first answer")
    assert agent_logs.splitlines()[0] == "200 1 models"  # kubectl logs deploy/agent

    def listed() -> list[str]:  # kubectl get si
        return kube.kubectl("get", "si", "-n", NAMESPACE).stdout.splitlines()

    # The pod count is the status the operator writes on each reconcile: the injection was
    # reconciled when applied, before its pod existed, so the count follows at the next
    # resync (operator.resyncSeconds, 3 s in this release; 30 s by default).
    kube.wait_for(lambda: listed()[1].split()[2] == "1", 15, "kubectl get si counting the pod")
    row = listed()[1].split()
    assert row[0] == "openai" and row[2] == "1" and row[3] == "True", listed()

    status = kube.keyhole("status", "-n", NAMESPACE).stdout  # kubectl keyhole status
    row = next(line.split() for line in status.splitlines() if line.startswith("openai"))
    assert row[2:5] == ["True", "1", "1"], status  # ready, selected, with the key
    [agent] = kube.get_all("pods", NAMESPACE)
    explained = kube.keyhole("explain", "pod", agent["metadata"]["name"], "-n",
                             NAMESPACE).stdout  # what a user asks of a pod
    assert "sidecar: ready=True, restarts=0, state=running" in explained, explained
    assert any(line.split()[:3] == ["openai", "has", "key"] for line in explained.splitlines())

    audit = [json.loads(line) for line in kube.kubectl(  # kubectl logs … -c keyhole-proxy
        "logs", "deploy/agent", "-c", "keyhole-proxy", "-n", NAMESPACE).stdout.splitlines()
        if line.startswith("{")]
    assert any(a["host"] == "api.openai.com:443" and a["decision"] == "injected"
               and a["status"] == 200 for a in audit), audit
    assert KEY not in json.dumps(audit)

    seen = [r for r in node_upstream.received if r.path.startswith("/v1/models")
            and r.header("host") == ["api.openai.com"]]
    assert seen and all(r.header("authorization") == [f"Bearer {KEY}"] for r in seen)
