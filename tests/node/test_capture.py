"""Transparent capture on the real node: keyhole-init (from the sidecar image, with the
capabilities the webhook gives it and nothing else) installs its rules in a real pod's network
namespace, and an agent's Node 20 fetch told of no proxy gets its key; the same pod untagged
does not; a namespace whose Pod Security forbids the capabilities gets a clear refusal."""

from __future__ import annotations

import uuid

from tests.node.conftest import SECRET_VALUE, statuses

NO_PROXY_VARIABLES = ["env", "-u", "HTTPS_PROXY", "-u", "https_proxy", "-u", "HTTP_PROXY",
                      "-u", "http_proxy", "-u", "NODE_USE_ENV_PROXY"]
NODE_FETCH = "fetch(process.argv[1]).then(r => console.log(r.status))"


def transparent_injection(name: str = "transparent") -> dict:
    return {
        "apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjection",
        "metadata": {"name": name},
        "spec": {
            "podSelector": {"matchLabels": {f"keyhole.dev/{name}": "true"}},
            "hosts": ["other.routed.test"], "capture": "transparent",
            "headers": [{"name": "Authorization", "format": "Bearer {value}",
                         "valueFrom": {"secretKeyRef": {"name": "openai-credentials",
                                                        "key": "api-key"}}}],
        },
    }


def test_a_transparently_captured_agent_gets_its_key_with_no_proxy_variable(agents,
                                                                           node_upstream):
    kube = agents.kube
    kube.apply([transparent_injection()], agents.namespace)
    kube.wait_for(lambda: agents.injection_ready("transparent"), 60, "SecretInjection Ready")
    pod = agents.deploy("agent-transparent", {"keyhole.dev/transparent": "true"})
    init = pod["spec"]["initContainers"]
    assert [c["name"] for c in init[:2]] == ["keyhole-init", "keyhole-proxy"]
    assert init[0]["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    done = statuses(pod)["keyhole-init"]["state"]["terminated"]
    assert done["exitCode"] == 0
    rules = kube.kubectl("logs", pod["metadata"]["name"], "-n", agents.namespace,
                         "-c", "keyhole-init").stdout
    assert "REDIRECT --to-ports 15081" in rules and "--uid-owner 65532 -j RETURN" in rules

    assert agents.exec(pod, "node", "-p", "process.versions.node").stdout.startswith("20.")
    marker = uuid.uuid4().hex[:12]
    status = agents.exec(pod, *NO_PROXY_VARIABLES, "node", "-e", NODE_FETCH,
                         f"https://other.routed.test/v1/{marker}").stdout.strip()
    assert status == "200"
    assert node_upstream.one(marker).header("authorization") == [f"Bearer {SECRET_VALUE}"]

    # The same agent untagged: no sidecar, no rules; it reaches the upstream itself (accepting
    # its certificate) and sends no key, because it has none.
    untagged = agents.deploy("agent-untagged", {})
    assert "initContainers" not in untagged["spec"]
    marker = uuid.uuid4().hex[:12]
    status = agents.exec(untagged, "env", "NODE_TLS_REJECT_UNAUTHORIZED=0", "node", "-e",
                         NODE_FETCH, f"https://other.routed.test/v1/{marker}").stdout.strip()
    assert status == "200"
    assert node_upstream.one(marker).header("authorization") == []
    for name in ("agent-transparent", "agent-untagged"):
        kube.kubectl("delete", "deployment", name, "-n", agents.namespace, "--wait=false")


def test_transparent_capture_is_refused_where_pod_security_forbids_it(agents):
    kube = agents.kube
    namespace = "restricted-agents"
    kube.kubectl("create", "namespace", namespace)
    kube.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    kube.kubectl("create", "secret", "generic", "openai-credentials", "-n", namespace,
                 f"--from-literal=api-key={SECRET_VALUE}")
    kube.apply([transparent_injection()], namespace)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "agent", "labels": {"keyhole.dev/transparent": "true"}},
           "spec": {"containers": [{"name": "agent", "image": agents.images["agent"].name,
                                    "imagePullPolicy": "Never", "command": ["sleep", "60"]}]}}
    refused = kube.wait_for(lambda: _refused(kube, pod, namespace), 30,
                            "the webhook's refusal (once the injection is known)")
    assert "enforces Pod Security 'restricted'" in refused
    assert "pod-security.kubernetes.io/enforce=privileged" in refused
    assert "capture: proxy" in refused


def _refused(kube, pod: dict, namespace: str) -> str:
    done = kube.apply([pod], namespace, check=False)
    if done.returncode == 0:  # admitted: the webhook did not know the injection yet
        kube.kubectl("delete", "pod", "agent", "-n", namespace, "--wait=false")
        return ""
    return done.stderr if "transparent capture needs" in done.stderr else ""
