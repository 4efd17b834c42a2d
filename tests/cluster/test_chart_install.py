"""`helm install` into a real kube-apiserver (its own, fresh one: the chart's webhooks would
otherwise point every tagged pod of the other tests at a Service with no endpoints). There is
no kubelet, so nothing runs: every object must be accepted, the webhooks must point at the
Service, and the operator's ServiceAccount must be able to do what docs/operator.md says and
no more."""

from __future__ import annotations

import json

import pytest

from tests.chart.helm import CHART, helm
from tests.cluster.controlplane import ControlPlane, bin_dir, build
from tests.cluster.kube import Kube, kubectl_binary

NAMESPACE = "keyhole-system"
SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:keyhole-operator"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    plane = ControlPlane(tmp_path_factory.mktemp("chart-control-plane"))
    plane.start(build())
    kube = Kube(plane.kubeconfig, kubectl_binary(bin_dir()))
    done = helm("install", "keyhole", str(CHART), "--namespace", NAMESPACE, "--create-namespace",
                "--kubeconfig", str(plane.kubeconfig), "--set", "monitoring.dashboard.enabled=true")
    yield kube, plane, done
    plane.stop()


def test_every_object_of_the_chart_is_accepted(installed):
    kube, plane, done = installed
    assert "STATUS: deployed" in done.stdout
    manifest = helm("get", "manifest", "keyhole", "-n", NAMESPACE, "--kubeconfig",
                    str(plane.kubeconfig)).stdout
    kinds = {line.split(": ")[1] for line in manifest.splitlines() if line.startswith("kind: ")}
    assert {"CustomResourceDefinition", "Deployment", "Service", "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration", "ClusterRole", "PodDisruptionBudget"} <= kinds
    kube.wait_established("secretinjections.keyhole.dev")
    assert kube.get("deployment", "keyhole-operator", NAMESPACE)["spec"]["replicas"] == 2


def test_the_next_steps_are_printed(installed):
    _, _, done = installed
    assert "kubectl get si" in done.stdout
    assert "keyhole.dev/openai=true" in done.stdout
    assert "kubectl apply -f examples/openai.yaml" in done.stdout


def test_the_webhooks_point_at_the_service(installed):
    kube, _, _ = installed
    service = kube.get("service", "keyhole-webhook", NAMESPACE)
    assert {p["port"] for p in service["spec"]["ports"]} >= {443}
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        for webhook in kube.get(kind, "keyhole", None)["webhooks"]:
            target = webhook["clientConfig"]["service"]
            assert (target["name"], target["namespace"], target["port"]) == (
                "keyhole-webhook", NAMESPACE, 443)
            assert webhook["clientConfig"]["caBundle"]


def test_an_upgrade_keeps_the_webhook_certificate_and_master_key(installed):
    kube, plane, _ = installed
    before = kube.get("secret", "keyhole-webhook-tls", NAMESPACE)["data"]
    key_before = kube.get("secret", "keyhole-master-key", NAMESPACE)["data"]
    helm("upgrade", "keyhole", str(CHART), "--namespace", NAMESPACE, "--kubeconfig",
         str(plane.kubeconfig), "--set", "operator.logLevel=debug")
    assert kube.get("secret", "keyhole-webhook-tls", NAMESPACE)["data"] == before
    assert kube.get("secret", "keyhole-master-key", NAMESPACE)["data"] == key_before
    config = kube.get("mutatingwebhookconfiguration", "keyhole", None)
    assert config["webhooks"][0]["clientConfig"]["caBundle"] == before["ca.crt"]


# What docs/operator.md says the operator may do, and a sample of what it may not.
ALLOWED = [
    ("get", "secretinjections.keyhole.dev"), ("list", "secretinjections.keyhole.dev"),
    ("watch", "secretinjections.keyhole.dev"), ("patch", "secretinjections.keyhole.dev"),
    ("patch", "secretinjections.keyhole.dev/status"), ("get", "pods"), ("list", "pods"),
    ("watch", "pods"), ("patch", "pods"), ("get", "secrets"), ("create", "secrets"),
    ("update", "secrets/keyhole-ca"), ("update", "secrets/keyhole-signing-key"),
    ("get", "configmaps"), ("create", "configmaps"), ("update", "configmaps/keyhole-ca-bundle"),
    ("create", "events"), ("create", "subjectaccessreviews.authorization.k8s.io"),
    ("create", "tokenreviews.authentication.k8s.io"),
    ("create", "clusterkopfpeerings.kopf.dev"), ("patch", "clusterkopfpeerings.kopf.dev"),
    ("list", "clustersecretinjections.keyhole.dev"), ("watch", "clustersecretinjections.keyhole.dev"),
    ("patch", "clustersecretinjections.keyhole.dev/status"), ("list", "namespaces"),
    ("watch", "namespaces"),
]
DENIED = [
    ("list", "secrets"), ("watch", "secrets"), ("delete", "secrets"), ("update", "secrets"),
    ("create", "pods"), ("delete", "pods"), ("create", "pods/exec"), ("update", "configmaps"),
    ("delete", "secretinjections.keyhole.dev"), ("create", "mutatingwebhookconfigurations"),
    ("list", "customresourcedefinitions"), ("create", "clusterroles"),
    ("create", "clustersecretinjections.keyhole.dev"),
    ("delete", "clustersecretinjections.keyhole.dev"), ("update", "namespaces"),
]


@pytest.mark.parametrize(("verb", "resource"), ALLOWED)
def test_the_operator_may_do_what_the_docs_say(installed, verb, resource):
    kube, _, _ = installed
    assert kube.can_i(verb, resource, "agents", SERVICE_ACCOUNT)


@pytest.mark.parametrize(("verb", "resource"), DENIED)
def test_the_operator_may_do_nothing_more(installed, verb, resource):
    kube, _, _ = installed
    assert not kube.can_i(verb, resource, "agents", SERVICE_ACCOUNT)


def test_the_operator_may_write_the_policys_parameter_in_its_own_namespace_only(installed):
    kube, _, _ = installed
    assert kube.can_i("patch", "configmaps/keyhole-protected-secrets", NAMESPACE, SERVICE_ACCOUNT)
    assert not kube.can_i("patch", "configmaps/keyhole-protected-secrets", "agents",
                          SERVICE_ACCOUNT)
    assert not kube.can_i("patch", "configmaps/other", NAMESPACE, SERVICE_ACCOUNT)


def test_uninstall_keeps_the_crd_and_the_master_key(installed):
    kube, plane, _ = installed
    helm("uninstall", "keyhole", "--namespace", NAMESPACE, "--kubeconfig", str(plane.kubeconfig))
    try:
        assert kube.get("crd", "secretinjections.keyhole.dev", None)
        assert kube.get("crd", "clustersecretinjections.keyhole.dev", None)
        assert kube.get("secret", "keyhole-master-key", NAMESPACE)
        remaining = json.loads(kube.kubectl("get", "mutatingwebhookconfigurations", "-o",
                                            "json").stdout)
        assert remaining["items"] == []
    finally:  # the module's other tests share this release, in whatever order they run
        helm("install", "keyhole", str(CHART), "--namespace", NAMESPACE, "--kubeconfig",
             str(plane.kubeconfig), "--set", "monitoring.dashboard.enabled=true")
