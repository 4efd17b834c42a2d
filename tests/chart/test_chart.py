"""The Helm chart, offline: lint, every documented option combination rendered and validated
against the Kubernetes OpenAPI schemas, snapshots, and the CRD kept equal to crds/."""

from __future__ import annotations

import base64
import os
import re

import kubernetes_validate
import pytest
import yaml

from tests.chart.helm import CHART, ROOT, helm, render

# Each documented combination of options; the snapshot of each is under snapshots/.
COMBINATIONS = {
    "defaults": {},
    "cert-manager": {"webhook.certManager.enabled": "true"},
    "cert-manager-cluster-issuer": {"webhook.certManager.enabled": "true",
                                    "webhook.certManager.issuerRef.name": "corp-ca",
                                    "webhook.certManager.issuerRef.kind": "ClusterIssuer"},
    "monitoring": {"monitoring.serviceMonitor.enabled": "true",
                   "monitoring.podMonitor.enabled": "true", "monitoring.dashboard.enabled": "true",
                   "monitoring.prometheusRule.enabled": "true",
                   "sidecar.otlpEndpoint": "http://otel-collector.monitoring:4318"},
    "network-policy": {"networkPolicy.enabled": "true"},
    "no-crds": {"crds.enabled": "false"},
    "deny-unmatched-classic-sidecar": {"sidecar.unmatched": "deny", "sidecar.nativeSidecar": "false",
                                       "sidecar.noProxy[0]": "10.0.0.0/8"},
    "one-replica-debug": {"operator.replicas": "1", "operator.logLevel": "debug"},
    "cluster-injections": {"clusterInjections.secretNamespace": "platform-secrets",
                           "clusterInjections.viewerGroups[0]": "system:authenticated"},
}
# Kinds from other projects' CRDs: kubernetes-validate has no schema for them.
FOREIGN = {"cert-manager.io/v1", "monitoring.coreos.com/v1"}
SECRET_FIELDS = re.compile(r"^(\s*(?:ca\.crt|tls\.crt|tls\.key|key|caBundle|checksum/webhook-tls):) (\S+)$",
                           re.M)


def test_helm_lint_strict_passes():
    done = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_every_rendered_manifest_is_valid_kubernetes(name):
    for document in render(COMBINATIONS[name]):
        if document["apiVersion"] in FOREIGN:
            assert document["metadata"]["name"] and document["spec"]
            continue
        kubernetes_validate.validate(document, "1.34.0", strict=True)


def masked(text: str) -> str:
    """Generated keys and certificates differ on every render: mask them for snapshots."""
    return SECRET_FIELDS.sub(lambda m: f"{m.group(1)} <generated>", text)


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_the_rendered_chart_matches_its_snapshot(name):
    rendered = masked(yaml.safe_dump_all(render(COMBINATIONS[name]), sort_keys=True))
    snapshot = ROOT / "tests" / "chart" / "snapshots" / f"{name}.yaml"
    if os.environ.get("REFRESH_GOLDEN") == "1":
        snapshot.write_text(rendered)
    assert snapshot.exists(), f"no snapshot for {name}: run with REFRESH_GOLDEN=1"
    assert snapshot.read_text() == rendered


def test_every_snapshot_has_its_combination():
    stale = [p.stem for p in (ROOT / "tests" / "chart" / "snapshots").glob("*.yaml")
             if p.stem not in COMBINATIONS]
    assert stale == []


@pytest.mark.parametrize("kind", ["secretinjection", "clustersecretinjection",
                                  "approvalrequest", "accessgrant"])
def test_the_charts_crds_equal_crds(kind):
    source = yaml.safe_load((ROOT / "crds" / f"{kind}.yaml").read_text())
    copy = yaml.safe_load((CHART / "files" / "crds" / f"{kind}.yaml").read_text())
    assert copy == source, "charts/keyhole/files/crds/ differs from crds/: copy it over"
    rendered = next(d for d in render() if d["kind"] == "CustomResourceDefinition"
                    and d["metadata"]["name"] == f"{kind}s.keyhole.dev")
    assert rendered["spec"] == source["spec"]
    assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_crds_can_be_left_out_or_not_kept():
    assert not any(d["kind"] == "CustomResourceDefinition" for d in render({"crds.enabled": "false"}))
    crds = [d for d in render({"crds.keep": "false"}) if d["kind"] == "CustomResourceDefinition"
            and d["spec"]["group"] == "keyhole.dev"]
    assert len(crds) == 4
    assert not any("annotations" in crd["metadata"] for crd in crds)


def test_every_value_is_documented():
    """Each leaf in values.yaml has a `# --` comment in the lines just above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w-]*):\s*(\S.*)?$", line)
        if not match or not match.group(3):  # a mapping header, not a leaf
            continue
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        if j < 0 or not lines[j].strip().startswith("# --"):
            undocumented.append(match.group(2))
    assert undocumented == []


def test_the_values_schema_refuses_bad_values():
    done = helm("template", "k", str(CHART), "--set", "sidecar.unmatched=maybe", check=False)
    assert done.returncode != 0
    assert "sidecar/unmatched" in done.stderr
    done = helm("template", "k", str(CHART), "--set", "typo=1", check=False)
    assert done.returncode != 0


def test_the_pod_webhook_fails_closed_only_for_tagged_pods():
    webhook = next(d for d in render() if d["kind"] == "MutatingWebhookConfiguration")["webhooks"][0]
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["sideEffects"] == "None"
    assert webhook["timeoutSeconds"] <= 5
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                                 "resources": ["pods"], "scope": "Namespaced"}]
    assert "keyhole.dev/" in webhook["matchConditions"][0]["expression"]
    skipped = webhook["namespaceSelector"]["matchExpressions"]
    assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
            "values": ["kube-system", "keyhole-system"]} in skipped
    assert {"key": "keyhole.dev/injection", "operator": "NotIn", "values": ["disabled"]} in skipped
    assert "objectSelector" not in webhook  # no label may exempt a pod (issue 20)


def test_the_webhook_certificate_matches_its_ca_and_service():
    from cryptography import x509

    documents = render()
    secret = next(d for d in documents if d["kind"] == "Secret" and d["type"] == "kubernetes.io/tls")
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "keyhole-webhook.keyhole-system.svc" in names.get_values_for_type(x509.DNSName)
    for config in (d for d in documents if d["kind"].endswith("WebhookConfiguration")):
        for webhook in config["webhooks"]:
            assert webhook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
            assert webhook["clientConfig"]["service"]["name"] == "keyhole-webhook"


def test_no_rbac_rule_lists_or_watches_secrets():
    role = next(d for d in render() if d["kind"] == "ClusterRole")
    for rule in role["rules"]:
        if "secrets" in rule["resources"]:
            assert not {"list", "watch", "delete", "*"} & set(rule["verbs"])


def test_the_alerts_and_the_dashboard_ask_for_metrics_keyhole_exports():
    """A renamed metric must not leave a silent panel or an alert that never fires."""
    import json

    from keyhole_sidecar.limits import Limiter
    from keyhole_sidecar.metrics import Metrics
    from keyhole_sidecar.usage.budgets import Budgets

    metrics = Metrics()
    metrics.watch_windows(Limiter().windows_left)
    budgets = Budgets()
    metrics.watch_budgets(budgets.remaining, budgets.limits, budgets.used)
    families = {m.name for m in metrics.registry.collect()}
    exported = {f"{name}{suffix}" for name in families
                for suffix in ("", "_total", "_bucket", "_count", "_sum", "_info")}
    rendered = render(COMBINATIONS["monitoring"])
    rules = next(d for d in rendered if d["kind"] == "PrometheusRule")
    dashboard = json.loads(next(d for d in rendered if d["kind"] == "ConfigMap"
                                and "keyhole.json" in (d.get("data") or {}))["data"]["keyhole.json"])
    expressions = [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    expressions += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    asked = {name for expr in expressions for name in re.findall(r"\bkeyhole_[a-z0-9_]+", expr)}
    sidecar_asked = {name for name in asked if not name.startswith("keyhole_operator_")}
    assert sidecar_asked - exported == set()
    assert {"keyhole_llm_budget_remaining", "keyhole_llm_cost_total"} <= asked


def test_cluster_injections_read_their_secrets_from_the_named_namespace_and_bind_viewers():
    docs = render(COMBINATIONS["cluster-injections"])
    operator = next(d for d in docs if d["kind"] == "Deployment")
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--cluster-secrets-namespace=platform-secrets" in args
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding"
                   and d["metadata"]["name"].endswith("-cluster-injections-viewer"))
    assert binding["subjects"] == [{"kind": "Group", "apiGroup": "rbac.authorization.k8s.io",
                                    "name": "system:authenticated"}]
    viewer = next(d for d in docs if d["kind"] == "ClusterRole"
                  and d["metadata"]["name"] == binding["roleRef"]["name"])
    assert {v for rule in viewer["rules"] for v in rule["verbs"]} == {"get", "list", "watch"}
    defaults = render()
    assert not any(d["kind"] == "ClusterRoleBinding" and "viewer" in d["metadata"]["name"]
                   for d in defaults)
    args = next(d for d in defaults if d["kind"] == "Deployment")[
        "spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--cluster-secrets-namespace=keyhole-system" in args  # the release namespace
