"""The ways around the sidecar, tried against a real kube-apiserver by a user who may create,
patch, debug, exec into and port-forward pods but may not read Secrets.

The API server here has its own etcd and exactly the chart's admission objects: its webhook
configurations (only their clientConfig points at the operator process on 127.0.0.1 instead of
the Service) and its ValidatingAdmissionPolicy. There is no kubelet: a request keyhole allows
goes on to fail for want of a node, which is how an allowed exec or port-forward shows here
(tests/node shows them on a real node)."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest
import yaml

from keyhole_operator.webhook_tls import self_signed
from tests.chart.helm import CHART, helm
from tests.cluster.conftest import ROOT, start_operator
from tests.cluster.controlplane import ControlPlane, bin_dir, build
from tests.cluster.kube import Kube, kubectl_binary
from tests.cluster.test_operator import apply_injections, openai_injection, pod, secret

RELEASE_NAMESPACE = "keyhole-system"
NS = "agents"
TAG = {"keyhole.dev/openai": "true"}
ATTACKER_RULES = [  # everything on pods, nothing on Secrets
    {"apiGroups": [""], "resources": ["pods", "pods/ephemeralcontainers", "pods/exec",
                                      "pods/attach", "pods/portforward", "pods/eviction"],
     "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create", "update",
                                                               "patch", "delete"]},
]


class Cluster:
    """The module's API server, its operator, and kubectl as the admin or as the attacker."""

    def __init__(self, kube: Kube, workdir, cert):
        self.kube, self.workdir, self.cert = kube, workdir, cert
        self.operator = None
        self.attacker_config = kube.service_account_kubeconfig(NS, "mallory",
                                                               workdir / "mallory.kubeconfig")

    def start_operator(self):
        port = self.operator.webhook_port if self.operator else None
        self.operator = start_operator(
            self.kube, self.workdir / "operator", "--protected-secrets-configmap",
            f"{RELEASE_NAMESPACE}/keyhole-protected-secrets", manage=False, cert=self.cert,
            webhook_port=port)
        return self.operator

    def as_attacker(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return self.kube.kubectl("-n", NS, *args, input=input, check=False,
                                 kubeconfig=self.attacker_config)

    def create(self, obj: dict, *, dry_run: bool = False) -> subprocess.CompletedProcess:
        return self.as_attacker("create", "-f", "-", *(["--dry-run=server"] if dry_run else []),
                                input=yaml.safe_dump(obj))

    def wait_until_the_policy_enforces(self) -> None:
        """The API server applies the policy with the parameter its informer has, a moment
        after the ConfigMap changed: wait until it refuses a reader of a managed Secret and
        admits a pod that reads none (server-side dry runs: nothing is created)."""
        spec, expected = UNTAGGED_READERS[0]
        self.kube.wait_for(lambda: expected in self.create(pod("probe", **spec),
                                                           dry_run=True).stderr
                           and self.create(pod("probe"), dry_run=True).returncode == 0,
                           30, "the policy enforcing the published parameter")


def chart_admission(port: int, ca_pem: bytes) -> list[dict]:
    """The chart's webhook configurations and policy, the webhooks pointed at 127.0.0.1."""
    rendered = helm("template", "keyhole", str(CHART), "--namespace", RELEASE_NAMESPACE,
                    "--show-only", "templates/webhook.yaml",
                    "--show-only", "templates/policy.yaml").stdout
    documents = []
    for doc in yaml.safe_load_all(rendered):
        if not doc or doc["kind"] == "Secret":
            continue
        for webhook in doc.get("webhooks") or []:
            path = webhook["clientConfig"]["service"]["path"]
            webhook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}",
                                       "caBundle": base64.b64encode(ca_pem).decode()}
        documents.append(doc)
    return documents


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    workdir = tmp_path_factory.mktemp("around-the-sidecar")
    plane = ControlPlane(workdir / "plane")
    plane.start(build())
    kube = Kube(plane.kubeconfig, kubectl_binary(bin_dir()))
    try:
        for kind in ("secretinjection", "clustersecretinjection"):
            kube.kubectl("apply", "-f", str(ROOT / "crds" / f"{kind}.yaml"))
            kube.wait_established(f"{kind}s.keyhole.dev")
        for namespace in (RELEASE_NAMESPACE, NS):
            kube.kubectl("create", "namespace", namespace)
            kube.kubectl("create", "serviceaccount", "default", "-n", namespace)
        kube.apply(helm("template", "keyhole", str(CHART), "--namespace", RELEASE_NAMESPACE,
                        "--show-only", "templates/rbac.yaml").stdout)
        kube.kubectl("create", "serviceaccount", "mallory", "-n", NS)
        kube.apply([{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                     "metadata": {"name": "pods-not-secrets", "namespace": NS},
                     "rules": ATTACKER_RULES},
                    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                     "metadata": {"name": "mallory", "namespace": NS},
                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                 "name": "pods-not-secrets"},
                     "subjects": [{"kind": "ServiceAccount", "name": "mallory",
                                   "namespace": NS}]}])
        assert not kube.can_i("get", "secrets", NS, f"system:serviceaccount:{NS}:mallory")
        cert = self_signed(workdir / "webhook-tls", ["127.0.0.1"])
        state = Cluster(kube, workdir, cert)
        operator = state.start_operator()
        kube.apply(chart_admission(operator.webhook_port, cert[0].read_bytes()))
        secret(kube, NS)
        apply_injections(kube, NS, openai_injection())
        kube.wait_for(lambda: "openai-credentials" in (kube.get(
            "configmap", "keyhole-protected-secrets", RELEASE_NAMESPACE).get("data") or {}
        ).get(NS, ""), what="the operator publishing the managed Secrets")
        state.wait_until_the_policy_enforces()
        yield state
    finally:
        if "state" in locals() and state.operator is not None:
            state.operator.stop()
        plane.stop()


@pytest.fixture
def agent(cluster) -> str:
    """A fresh injected pod, created by the attacker (who may create pods)."""
    name = f"agent-{len(cluster.kube.get_all('pods', NS))}"
    done = cluster.create({**pod(name, TAG), "metadata": {"name": name, "labels": TAG}})
    assert done.returncode == 0, done.stderr
    created = cluster.kube.get("pod", name, NS)
    assert any(c["name"] == "keyhole-proxy" for c in created["spec"]["initContainers"])
    return name


def refused(done: subprocess.CompletedProcess, *phrases: str) -> None:
    assert done.returncode != 0, f"admitted: {done.stdout}"
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


# -- the sidecar of a running pod -------------------------------------------------------------

def test_the_sidecars_image_cannot_be_swapped(cluster, agent):
    done = cluster.as_attacker("set", "image", f"pod/{agent}", "keyhole-proxy=evil/steal-keys")
    refused(done, "keyhole-proxy container of an injected pod cannot be changed",
            "you changed image")
    image = next(c["image"] for c in cluster.kube.get("pod", agent, NS)["spec"]["initContainers"]
                 if c["name"] == "keyhole-proxy")
    assert image == "keyhole-sidecar:test"


def test_an_agents_image_may_change(cluster, agent):
    done = cluster.as_attacker("set", "image", f"pod/{agent}", "agent=python:3.13-slim")
    assert done.returncode == 0, done.stderr


def test_kubectl_debug_cannot_target_the_sidecar(cluster, agent):
    done = cluster.as_attacker("debug", agent, "--image=busybox", "--target=keyhole-proxy",
                               "--", "cat", "/proc/1/root/var/run/keyhole/secrets")
    refused(done, "a debug container may not target keyhole-proxy",
            "kubectl debug --target=<agent>")
    assert not cluster.kube.get("pod", agent, NS)["spec"].get("ephemeralContainers")


@pytest.mark.parametrize(("container", "expected"), [
    # The policy or the webhook, whichever the API server asks first: both name the signing key.
    ({"volumeMounts": [{"name": "keyhole-signing", "mountPath": "/s"}]}, "keyhole-signing"),
    ({"securityContext": {"runAsUser": 65532}}, "runs as UID 65532"),
])
def test_a_debug_container_cannot_mount_or_impersonate_the_sidecar(cluster, agent, container,
                                                                    expected):
    patch = {"spec": {"ephemeralContainers": [
        {"name": "sneak", "image": "busybox", "targetContainerName": "agent", **container}]}}
    done = cluster.as_attacker("patch", "pod", agent, "--subresource=ephemeralcontainers",
                               "--type=strategic", "-p", json.dumps(patch))
    refused(done, expected)


def test_kubectl_debug_of_the_agent_is_allowed(cluster, agent):
    done = cluster.as_attacker("debug", agent, "--image=busybox", "--target=agent")
    assert done.returncode == 0, done.stderr
    debuggers = cluster.kube.get("pod", agent, NS)["spec"]["ephemeralContainers"]
    assert [d["targetContainerName"] for d in debuggers] == ["agent"]


def test_exec_and_attach_into_the_sidecar_are_refused(cluster, agent):
    done = cluster.as_attacker("exec", agent, "-c", "keyhole-proxy", "--", "cat",
                               "/var/run/keyhole/secrets/openai-credentials/api-key")
    refused(done, "kubectl exec into keyhole-proxy is refused", "kubectl logs -c keyhole-proxy")
    done = cluster.as_attacker("attach", agent, "-c", "keyhole-proxy")
    refused(done, "kubectl attach into keyhole-proxy is refused")


def test_exec_into_the_agent_passes_keyhole(cluster, agent):
    done = cluster.as_attacker("exec", agent, "-c", "agent", "--", "true")
    assert done.returncode != 0  # no node here: the API server cannot reach a kubelet
    assert "keyhole" not in done.stderr, done.stderr


def _port_forward(cluster, agent: str, query: str) -> subprocess.CompletedProcess:
    """A port-forward request without its stream upgrade: kubectl's names no ports (they go
    inside the stream); a WebSocket client may name them with ?ports=."""
    return cluster.as_attacker("create", "--raw",
                               f"/api/v1/namespaces/{NS}/pods/{agent}/portforward{query}",
                               "-f", "-", input="{}")


@pytest.mark.parametrize(("query", "expected"), [
    ("?ports=15080", "port-forward to port 15080 of an injected pod is refused"),
    ("?ports=8080&ports=15081", "port-forward to port 15081"),
    ("", "names its ports only after admission"),  # what kubectl sends
])
def test_port_forward_to_the_proxy_is_refused(cluster, agent, query, expected):
    refused(_port_forward(cluster, agent, query), expected)


def test_port_forward_to_the_admin_port_passes_keyhole(cluster, agent):
    done = _port_forward(cluster, agent, "?ports=15090")
    assert done.returncode != 0  # no upgrade, no node: refused further on, not by keyhole
    assert "keyhole" not in done.stderr, done.stderr


# -- what a pod may be created with ----------------------------------------------------------

@pytest.mark.parametrize(("spec", "expected"), [
    ({"hostPID": True}, "keyhole will not inject a pod with hostPID: true"),
    ({"hostIPC": True}, "keyhole will not inject a pod with hostIPC: true"),
    ({"securityContext": {"runAsUser": 65532}}, "runs as UID 65532, the keyhole sidecar's UID"),
    ({"containers": [{"name": "agent", "image": "x", "securityContext": {"privileged": True}}]},
     "is privileged"),
    ({"containers": [{"name": "agent", "image": "x",
                      "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}}}]},
     "adds SYS_PTRACE"),
    ({"containers": [{"name": "agent", "image": "x",
                      "volumeMounts": [{"name": "pods", "mountPath": "/p", "readOnly": True}]}],
      "volumes": [{"name": "pods", "hostPath": {"path": "/var/lib/kubelet/pods"}}]},
     "mounts the node's /var/lib/kubelet/pods"),
    ({"containers": [{"name": "agent", "image": "x",
                      "volumeMounts": [{"name": "key", "mountPath": "/key"}]}],
      "volumes": [{"name": "key", "projected": {"sources": [
          {"secret": {"name": "openai-credentials"}}]}}]},
     "mounts Secret 'openai-credentials', which keyhole injects"),
    ({"containers": [{"name": "agent", "image": "x", "env": [
        {"name": "K", "valueFrom": {"secretKeyRef": {"name": "openai-credentials",
                                                     "key": "api-key"}}}]}]},
     "reads Secret 'openai-credentials' into K"),
    ({"containers": [{"name": "agent", "image": "x",
                      "volumeMounts": [{"name": "keyhole-state", "mountPath": "/state"}]}]},
     "mounts keyhole's volume 'keyhole-state'"),
])
def test_a_tagged_pod_above_the_ceiling_is_refused(cluster, spec, expected):
    unsafe = pod("unsafe", TAG, **spec)
    refused(cluster.create(unsafe), expected)


def test_a_label_named_like_keyholes_own_components_does_not_skip_injection(cluster):
    sneaky = pod("component", {**TAG, "keyhole.dev/component": "operator"})
    assert cluster.create(sneaky).returncode == 0
    created = cluster.kube.get("pod", "component", NS)
    assert any(c["name"] == "keyhole-proxy" for c in created["spec"]["initContainers"])


def test_a_tagged_pod_no_injection_selects_may_not_bring_keyhole_parts(cluster):
    forged = pod("forged", {"keyhole.dev/nothing": "true"})
    forged["spec"]["containers"].append({"name": "keyhole-proxy", "image": "evil/steal-keys"})
    refused(cluster.create(forged), "container name 'keyhole-proxy' is keyhole's")


# -- pods keyhole never sees: the policy, evaluated by the API server itself ------------------

UNTAGGED_READERS = [
    ({"containers": [{"name": "agent", "image": "x",
                      "volumeMounts": [{"name": "key", "mountPath": "/key"}]}],
      "volumes": [{"name": "key", "secret": {"secretName": "openai-credentials"}}]},
     "container agent reads a Secret that keyhole manages in namespace agents"),
    ({"initContainers": [{"name": "copy", "image": "x",
                          "envFrom": [{"secretRef": {"name": "openai-credentials"}}]}]},
     "init container copy reads a Secret that keyhole manages"),
    ({"containers": [{"name": "keyhole-proxy", "image": "evil/steal-keys",
                      "volumeMounts": [{"name": "key", "mountPath": "/key"}]}],
      "volumes": [{"name": "key", "secret": {"secretName": "keyhole-signing-key"}}]},
     "container keyhole-proxy reads a Secret that keyhole manages"),
]


@pytest.mark.parametrize(("spec", "expected"), UNTAGGED_READERS)
def test_an_untagged_pod_may_not_read_a_secret_keyhole_manages(cluster, spec, expected):
    refused(cluster.create(pod("untagged", **spec)), expected)


def test_an_untagged_pod_may_not_carry_keyholes_annotations(cluster):
    copied = pod("copied")
    copied["metadata"]["annotations"] = {"keyhole.dev/injections": "{}", "keyhole.dev/status": "{}"}
    refused(cluster.create(copied), "are written by keyhole alone")


def test_the_policies_hold_with_the_operator_stopped_and_other_pods_start(cluster, agent):
    cluster.operator.stop()
    try:
        spec, expected = UNTAGGED_READERS[0]
        refused(cluster.create(pod("while-down", **spec)), expected)
        refused(cluster.as_attacker("exec", agent, "-c", "keyhole-proxy", "--", "true"),
                "kubectl exec into keyhole-proxy is refused")
        # Removing a tag (how users revoke) is a label-only update: it never waits on keyhole.
        cluster.kube.kubectl("label", "pod", agent, "-n", NS, "keyhole.dev/openai-")
        assert cluster.create(pod("unrelated-while-down")).returncode == 0
        refused(cluster.create(pod("tagged-while-down", TAG)), "failed calling webhook")
    finally:
        cluster.start_operator()


def test_the_operator_restores_the_policys_parameter_for_every_namespace_at_once(cluster):
    """Whichever namespace's reconcile brings the deleted ConfigMap back writes every
    namespace's Secrets: none stays unprotected until its own turn comes."""
    kube, other = cluster.kube, f"{NS}-other"
    kube.kubectl("create", "namespace", other)
    kube.kubectl("create", "serviceaccount", "default", "-n", other)
    secret(kube, other)
    apply_injections(kube, other, openai_injection())

    def published() -> dict:
        return kube.get("configmap", "keyhole-protected-secrets", RELEASE_NAMESPACE).get(
            "data") or {}

    try:
        kube.wait_for(lambda: published().get(other), what="the second namespace's key")
        kube.kubectl("delete", "configmap", "keyhole-protected-secrets", "-n", RELEASE_NAMESPACE)
        first = kube.wait_for(lambda: kube.kubectl(
            "get", "configmap", "keyhole-protected-secrets", "-n", RELEASE_NAMESPACE, "-o",
            "json", check=False).returncode == 0 and published(), 30,
            "the operator restoring the policy's parameter")
        assert "openai-credentials" in first.get(NS, "") and "openai-credentials" in first.get(
            other, "")
    finally:
        kube.kubectl("delete", "si", "--all", "-n", other, check=False)
    cluster.wait_until_the_policy_enforces()  # the tests after this one rely on it


# -- hosts too broad to be safe, and conflicts found at admission -----------------------------

def test_a_wildcard_over_a_public_suffix_is_refused(cluster):
    broad = openai_injection("broad", hosts=["*.co.uk"])
    done = cluster.kube.apply([broad], NS, check=False)
    refused(done, "'*.co.uk' is too broad: 'co.uk' is a public suffix")


def test_cluster_internal_and_metadata_hosts_are_accepted_with_a_warning(cluster):
    risky = openai_injection("risky", hosts=["metadata.google.internal",
                                             "llm.models.svc.cluster.local"])
    done = cluster.kube.apply([risky], NS)
    assert "Warning: metadata.google.internal is a cloud metadata service" in done.stderr
    assert "Warning: llm.models.svc.cluster.local is a cluster-internal name" in done.stderr
    cluster.kube.kubectl("delete", "si", "risky", "-n", NS)


def test_a_pod_selected_by_two_injections_setting_one_header_is_refused(cluster):
    apply_injections(cluster.kube, NS, openai_injection("backup"))  # the same host and header
    try:
        both = pod("both", {**TAG, "keyhole.dev/backup": "true"})
        refused(cluster.create(both), "the injections that select this pod conflict",
                "only one injection may set a header or parameter for a host")
    finally:
        cluster.kube.kubectl("delete", "si", "backup", "-n", NS)
