"""The operator, its webhooks and the CRD against the real kube-apiserver."""

from __future__ import annotations

import json

import pytest
import yaml

from keyhole_operator import layout
from tests.cluster.conftest import OPERATOR_USER, ROOT
from tests.support.config import injection, ref

SECRET_VALUE = "sk-cluster-SECRET-0123456789"


def openai_injection(name: str = "openai", **changes) -> dict:
    spec = dict(hosts=["api.routed.test"],
                headers=[{"name": "Authorization", "valueFrom": ref("openai-credentials", "api-key"),
                          "format": "Bearer {value}"}],
                agentEnv=[{"name": "OPENAI_API_KEY", "placeholder": True}])
    spec.update(changes)
    doc = injection(name, **spec)
    doc["spec"]["podSelector"] = {"matchLabels": {f"keyhole.dev/{name}": "true"}}
    return doc


def apply_injections(kube, namespace: str, *documents: dict) -> None:
    """Apply and wait until the operator has observed them (status at this generation), as a
    user would before labelling pods: the webhook only knows injections it has seen."""
    kube.apply(list(documents), namespace)
    for doc in documents:
        name = doc["metadata"]["name"]

        def observed(name=name) -> bool:
            found = kube.get("si", name, namespace)
            return (found.get("status") or {}).get("observedGeneration") == \
                found["metadata"]["generation"]

        kube.wait_for(observed, what=f"the operator observing {name}")


def pod(name: str, labels: dict | None = None, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": "agent", "image": "python:3.12-slim"}], **spec}}


def secret(kube, namespace: str, name: str = "openai-credentials", **data) -> None:
    data = data or {"api-key": SECRET_VALUE}
    kube.kubectl("create", "secret", "generic", name, "-n", namespace,
                 *[f"--from-literal={k}={v}" for k, v in data.items()])


def events(kube, namespace: str) -> str:
    """Every Event in the namespace, as JSON text to search."""
    return kube.kubectl("get", "events", "-n", namespace, "-o", "json").stdout


def conditions(kube, namespace: str, name: str) -> dict[str, dict]:
    status = kube.get("secretinjection", name, namespace).get("status") or {}
    return {c["type"]: c for c in status.get("conditions") or []}


# -- the CRD ------------------------------------------------------------------------------------

def test_every_example_applies(kube, operator, namespace):
    """Secrets, SecretInjections, the agent's ServiceAccount and Deployment: all accepted by the
    API server, the CRD's schema and CEL, and keyhole's validating webhook."""
    try:
        for path in sorted(ROOT.glob("examples/**/*.yaml")):
            done = kube.kubectl("apply", "-n", namespace, "-f", str(path))
            assert "Warning" not in done.stderr, done.stderr
        names = {si["metadata"]["name"] for si in kube.get_all("secretinjections", namespace)}
        assert {"openai", "anthropic", "github-api", "github-git", "stripe", "github-app",
                "billing-api", "aws-s3"} <= names
        assert kube.get("clustersecretinjection", "openai", None)["spec"]["namespaceSelector"]
    finally:  # cluster-scoped: the namespace's deletion does not take it
        kube.kubectl("delete", "clustersecretinjection", "openai", "--ignore-not-found")


def test_the_operator_reads_every_pod_of_a_namespace_a_page_at_a_time(kube, operator, namespace,
                                                                      monkeypatch):
    """Reconciliation reads pods in pages (kube.POD_PAGE): none is lost between pages."""
    import kubernetes

    from keyhole_operator import kube as kube_module

    monkeypatch.setattr(kube_module, "POD_PAGE", 2)
    kube.apply([pod(f"paged-{number}") for number in range(5)], namespace)
    cluster = kube_module.Cluster(kubernetes.config.new_client_from_config(str(kube.kubeconfig)))
    assert sorted(p["metadata"]["name"] for p in cluster.list_pods(namespace)) == [
        f"paged-{number}" for number in range(5)]


def test_the_crd_refuses_mistakes_at_apply_time_with_cel(kube, crd, namespace):
    bad = openai_injection()
    bad["spec"]["headers"][0]["format"] = "Bearer\n{value}"
    bad["spec"]["agentEnv"] = [{"name": "X", "placeholder": True, "baseURL": "/v1"}]
    done = kube.apply([bad], namespace, check=False)
    assert done.returncode != 0
    assert "format must not contain CR or LF" in done.stderr
    assert "give exactly one of placeholder or baseURL" in done.stderr


def test_the_crd_refuses_a_burst_without_a_rate_and_an_empty_window(kube, crd, namespace):
    bad = openai_injection()
    bad["spec"]["limits"] = {"burst": 5, "window": {}, "concurrentRequests": 0}
    done = kube.apply([bad], namespace, check=False)
    assert done.returncode != 0
    assert "a burst sizes the requestsPerMinute bucket; give requestsPerMinute too" in done.stderr
    assert "spec.limits.window" in done.stderr and "spec.limits.concurrentRequests" in done.stderr


def test_the_crd_refuses_two_credential_sources_and_a_malformed_app_id(kube, crd, namespace):
    ref = {"secretKeyRef": {"name": "s", "key": "k"}}
    bad = openai_injection()
    del bad["spec"]["headers"]
    bad["spec"]["oauth2"] = {"tokenURL": "https://auth.example.com/t", "clientIDFrom": ref,
                             "clientSecretFrom": ref}
    bad["spec"]["githubApp"] = {"appID": "12 34", "installationID": 5, "privateKeyFrom": ref}
    done = kube.apply([bad], namespace, check=False)
    assert done.returncode != 0
    assert "githubApp, oauth2, awsSigV4 and workloadIdentity are credential sources" in \
        done.stderr
    assert "the App's ID (a number) or its client ID" in done.stderr


def test_what_the_parser_refuses_the_validating_webhook_refuses_with_its_message(kube, operator,
                                                                                 namespace):
    bad = openai_injection(hosts=["10.0.0.1"])
    done = kube.apply([bad], namespace, check=False)
    assert done.returncode != 0
    assert "keyhole-validate-injection" in done.stderr
    assert "is an IP address; keyhole routes by DNS name only" in done.stderr
    # A CEL condition is compiled at admission: a syntax error is refused at kubectl apply,
    # with the field, the line and the column.
    condition = openai_injection()
    condition["spec"]["mcp"] = {"tools": {"when": [
        {"match": ["get_*"], "expression": "arguments.path.startsWith('.github/'"}]}}
    done = kube.apply([condition], namespace, check=False)
    assert done.returncode != 0
    assert "spec.mcp.tools.when[0].expression: is not a CEL expression" in done.stderr
    assert "<input>:1:" in done.stderr, done.stderr


def test_printer_columns_show_hosts_pods_and_readiness(kube, operator, namespace):
    apply_injections(kube, namespace, openai_injection())
    secret(kube, namespace)
    kube.apply([pod("a", {"keyhole.dev/openai": "true"})], namespace)
    kube.wait_for(lambda: (kube.get("si", "openai", namespace).get("status") or {}
                           ).get("matchedPods") == 1, what="matchedPods == 1")
    table = kube.kubectl("get", "si", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "HOSTS", "PODS", "READY", "SPENT", "TODAY", "BUDGET",
                              "LEFT", "AGE"]
    assert row.split()[:4] == ["openai", '["api.routed.test"]', "1", "True"]


# -- the mutating webhook ---------------------------------------------------------------------------

def test_a_labelled_pod_comes_back_with_the_sidecar(kube, operator, namespace):
    apply_injections(kube, namespace, openai_injection())
    kube.apply([pod("agent", {"keyhole.dev/openai": "true"})], namespace)
    created = kube.get("pod", "agent", namespace)
    sidecar = created["spec"]["initContainers"][0]
    assert sidecar["name"] == "keyhole-proxy" and sidecar["restartPolicy"] == "Always"
    env = {e["name"]: e.get("value") for e in created["spec"]["containers"][0]["env"]}
    assert env["HTTPS_PROXY"] == "http://127.0.0.1:15080"
    assert env["OPENAI_API_KEY"] == "keyhole-placeholder-not-a-secret"
    assert json.loads(created["metadata"]["annotations"]["keyhole.dev/status"])["injections"] == [
        "openai"]


def _reviews_injected(operator) -> float:
    """How many pod reviews the operator answered with the sidecar (its own counter)."""
    import httpx

    with httpx.Client() as http:
        text = http.get(f"http://127.0.0.1:{operator.metrics_port}/metrics").text
    sample = 'keyhole_operator_admissions_total{result="injected",webhook="keyhole-inject"}'
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(sample))


def test_a_tagged_pod_is_reviewed_once_under_the_charts_reinvocation_policy(kube, operator,
                                                                          namespace):
    """The chart's pod webhook asks to be called again if another admission plugin changes
    the pod after it (IfNeeded: a container a later webhook adds still gets the proxy
    settings). The API server's own ServiceAccount plugin, run again after keyhole's patch,
    mounted the pod's API token into keyhole's containers — a change, so every tagged pod was
    reviewed twice. keyhole's containers now hold the path it mounts, and it changes nothing."""
    config = kube.get("mutatingwebhookconfiguration", "keyhole.dev", None)
    index = next(i for i, hook in enumerate(config["webhooks"])
                 if hook["name"].startswith("keyhole-inject"))
    policy = f"/webhooks/{index}/reinvocationPolicy"
    kube.kubectl("patch", "mutatingwebhookconfiguration", "keyhole.dev", "--type", "json",
                 "-p", json.dumps([{"op": "add", "path": policy, "value": "IfNeeded"}]))
    try:
        apply_injections(kube, namespace, openai_injection())
        before = _reviews_injected(operator)
        kube.apply([pod("agent", {"keyhole.dev/openai": "true"})], namespace)
        assert _reviews_injected(operator) - before == 1
    finally:
        kube.kubectl("patch", "mutatingwebhookconfiguration", "keyhole.dev", "--type", "json",
                     "-p", json.dumps([{"op": "replace", "path": policy, "value": "Never"}]))
    created = kube.get("pod", "agent", namespace)
    spec = created["spec"]
    token_volume = next(v["name"] for v in spec["volumes"]
                        if v["name"].startswith("kube-api-access-"))
    agent_mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    assert agent_mounts[layout.API_TOKEN_DIR] == token_volume  # the agent's own, untouched
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == "keyhole-proxy"
    assert token_volume not in {m["name"] for m in sidecar["volumeMounts"]}


def test_a_pod_from_a_template_with_generate_name_is_mutated(kube, operator, namespace):
    apply_injections(kube, namespace, openai_injection())
    template = pod("ignored", {"keyhole.dev/openai": "true", "app": "agent"})
    del template["metadata"]["name"]
    template["metadata"]["generateName"] = "agent-"
    done = kube.kubectl("create", "-n", namespace, "-f", "-", "-o", "json",
                        input=yaml.safe_dump(template))
    created = json.loads(done.stdout)
    assert created["metadata"]["name"].startswith("agent-")
    assert created["spec"]["initContainers"][0]["name"] == "keyhole-proxy"
    routes = json.loads(created["metadata"]["annotations"]["keyhole.dev/injections"])
    assert routes["namespace"] == namespace


def test_an_unlabelled_pod_is_untouched(kube, operator, namespace):
    apply_injections(kube, namespace, openai_injection())
    kube.apply([pod("plain")], namespace)
    created = kube.get("pod", "plain", namespace)
    assert "initContainers" not in created["spec"]
    assert not any(k.startswith("keyhole.dev/") for k in created["metadata"].get("annotations", {}))


@pytest.mark.parametrize(("spec", "message"), [
    ({"hostNetwork": True}, "keyhole will not inject a pod with hostNetwork: true"),
    ({"shareProcessNamespace": True}, "keyhole will not inject a pod with shareProcessNamespace"),
])
def test_unsafe_pods_are_refused_with_the_reason(kube, operator, namespace, spec, message):
    apply_injections(kube, namespace, openai_injection())
    done = kube.apply([pod("unsafe", {"keyhole.dev/openai": "true"}, **spec)], namespace, check=False)
    assert done.returncode != 0
    assert message in done.stderr


def test_opting_out_by_annotation_leaves_the_pod_alone(kube, operator, namespace):
    apply_injections(kube, namespace, openai_injection())
    opted = pod("opted", {"keyhole.dev/openai": "true"})
    opted["metadata"]["annotations"] = {"keyhole.dev/inject": "false"}
    kube.apply([opted], namespace)
    assert "initContainers" not in kube.get("pod", "opted", namespace)["spec"]


def test_admission_warnings_reach_the_user(kube, operator, namespace):
    apply_injections(kube, namespace, openai_injection())
    leaky = pod("leaky", {"keyhole.dev/openai": "true"})
    leaky["spec"]["containers"][0]["env"] = [
        {"name": "HTTP_PROXY", "value": "http://corporate:3128"}]
    done = kube.apply([leaky], namespace)
    assert "Warning: container 'agent': HTTP_PROXY was set by the container" in done.stderr


# -- only the operator changes keyhole.dev/ annotations --------------------------------------------

def test_nobody_but_the_operator_may_change_the_routes_annotation(kube, operator, namespace):
    apply_injections(kube, namespace, openai_injection())
    kube.apply([pod("agent", {"keyhole.dev/openai": "true"})], namespace)
    done = kube.kubectl("annotate", "pod", "agent", "-n", namespace, "--overwrite",
                        "keyhole.dev/injections=forged", check=False)
    assert done.returncode != 0
    assert "only the keyhole operator may change keyhole.dev/injections" in done.stderr


# -- the namespace's CA, status, Events, secrecy --------------------------------------------------

def test_the_namespace_gets_its_ca_bundle_and_signing_key(kube, operator, namespace):
    apply_injections(kube, namespace, openai_injection())
    kube.wait_for(lambda: kube.kubectl("get", "configmap", "keyhole-ca-bundle", "-n", namespace,
                                       check=False).returncode == 0, what="the CA bundle")
    ca = kube.get("secret", "keyhole-ca", namespace)
    assert ca["type"] == "kubernetes.io/tls"
    bundle = kube.get("configmap", "keyhole-ca-bundle", namespace)
    # With the operator channel on, its CA rides along for the sidecars: public material.
    assert set(bundle["data"]) == {"ca.crt", "ca-bundle.crt", "wgetrc", "operator-ca.crt"}
    assert bundle["data"]["operator-ca.crt"].startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" not in json.dumps(bundle)
    assert set(bundle["binaryData"]) == {"truststore.p12"}
    import base64
    assert bundle["data"]["ca.crt"] == base64.b64decode(ca["data"]["tls.crt"]).decode()
    assert kube.get("secret", "keyhole-signing-key", namespace)["data"]["key"]


def test_status_names_a_missing_secret_and_turns_ready_when_it_appears(kube, operator, namespace):
    apply_injections(kube, namespace, openai_injection())
    missing = kube.wait_for(lambda: conditions(kube, namespace, "openai").get("SecretResolved"),
                            what="SecretResolved")
    assert missing["status"] == "False"
    assert missing["message"] == "Secret 'openai-credentials' not found"
    assert "Secret 'openai-credentials' not found" in events(kube, namespace)
    secret(kube, namespace)
    kube.wait_for(lambda: conditions(kube, namespace, "openai")["Ready"]["status"] == "True",
                  what="Ready")
    status = kube.get("si", "openai", namespace)["status"]
    assert status["observedGeneration"] == kube.get("si", "openai", namespace)["metadata"]["generation"]


def test_an_agent_that_could_go_around_keyhole_is_reported(kube, operator, namespace):
    kube.kubectl("create", "serviceaccount", "agent", "-n", namespace)
    kube.kubectl("create", "role", "too-much", "-n", namespace, "--verb=get,list,create,update",
                 "--resource=secrets,deployments.apps,pods/ephemeralcontainers")
    kube.kubectl("create", "rolebinding", "too-much", "-n", namespace, "--role=too-much",
                 f"--serviceaccount={namespace}:agent")
    apply_injections(kube, namespace, openai_injection())
    kube.apply([pod("risky", {"keyhole.dev/openai": "true"}, serviceAccountName="agent")],
               namespace)
    flagged = kube.wait_for(
        lambda: (conditions(kube, namespace, "openai").get("AgentsOverPrivileged") or {}
                 ).get("status") == "True" and conditions(kube, namespace, "openai"),
        what="AgentsOverPrivileged")
    message = flagged["AgentsOverPrivileged"]["message"]
    assert "ServiceAccount agent (pods risky): read Secrets (the key itself" in message
    assert "list Secrets (every key of the namespace at once)" in message
    assert "create Deployments (its pods run with whatever mounts" in message
    assert "add debug containers (run a container inside another agent's pod)" in message
    assert "exec into pods" not in message  # not granted, not reported
    assert "CanBypassKeyhole" in events(kube, namespace)


def test_no_secret_value_appears_in_any_object_the_operator_wrote(kube, operator, namespace):
    secret(kube, namespace)
    apply_injections(kube, namespace, openai_injection())
    kube.apply([pod("agent", {"keyhole.dev/openai": "true"})], namespace)
    kube.wait_for(lambda: conditions(kube, namespace, "openai").get("Ready"), what="status")
    dump = kube.kubectl("get", "pods,secretinjections,events,configmaps", "-n", namespace,
                        "-o", "json").stdout
    assert SECRET_VALUE not in dump
    import base64
    assert base64.b64encode(SECRET_VALUE.encode()).decode() not in dump
    assert SECRET_VALUE not in operator.logs()


# -- live grant and revoke ---------------------------------------------------------------------------

def routes_of(kube, namespace: str, name: str) -> list[str]:
    annotations = kube.get("pod", name, namespace)["metadata"].get("annotations") or {}
    document = json.loads(annotations.get("keyhole.dev/injections") or '{"items": []}')
    return [item["metadata"]["name"] for item in document["items"]]


def test_labels_grant_and_revoke_live(kube, operator, namespace):
    secret(kube, namespace)
    second = openai_injection("second")
    apply_injections(kube, namespace, openai_injection(), second)
    kube.apply([pod("agent", {"keyhole.dev/openai": "true"})], namespace)
    assert routes_of(kube, namespace, "agent") == ["openai"]
    kube.kubectl("label", "pod", "agent", "-n", namespace, "keyhole.dev/second=true")
    kube.wait_for(lambda: routes_of(kube, namespace, "agent") == ["openai", "second"],
                  what="live grant of a mounted Secret")
    kube.kubectl("label", "pod", "agent", "-n", namespace, "keyhole.dev/openai-")
    kube.wait_for(lambda: routes_of(kube, namespace, "agent") == ["second"], what="revocation")


def test_a_grant_needing_an_unmounted_secret_asks_for_a_restart(kube, operator, namespace):
    secret(kube, namespace)
    secret(kube, namespace, "github", token="ghp-0123456789abcdef")
    github = openai_injection("github", headers=[{"name": "Authorization",
                                                  "valueFrom": ref("github", "token")}])
    apply_injections(kube, namespace, openai_injection(), github)
    kube.apply([pod("agent", {"keyhole.dev/openai": "true"})], namespace)
    kube.kubectl("label", "pod", "agent", "-n", namespace, "keyhole.dev/github=true")
    annotations = kube.wait_for(
        lambda: kube.get("pod", "agent", namespace)["metadata"]["annotations"].get(
            "keyhole.dev/restart-required") and kube.get("pod", "agent", namespace)["metadata"][
            "annotations"], what="restart-required")
    assert annotations["keyhole.dev/restart-required"] == "github"
    assert routes_of(kube, namespace, "agent") == ["openai"]
    kube.wait_for(lambda: (kube.get("si", "github", namespace).get("status") or {}
                           ).get("restartRequired") == 1, what="restartRequired == 1")
    assert "RestartRequired" in events(kube, namespace)


def test_editing_and_deleting_the_injection_follow_into_running_pods(kube, operator, namespace):
    secret(kube, namespace)
    apply_injections(kube, namespace, openai_injection())
    kube.apply([pod("agent", {"keyhole.dev/openai": "true"})], namespace)

    def hosts() -> list[str]:
        doc = json.loads(kube.get("pod", "agent", namespace)["metadata"]["annotations"][
            "keyhole.dev/injections"])
        return [h for item in doc["items"] for h in item["spec"]["hosts"]]

    assert hosts() == ["api.routed.test"]
    kube.apply([openai_injection(hosts=["api.routed.test", "other.routed.test"])], namespace)
    kube.wait_for(lambda: hosts() == ["api.routed.test", "other.routed.test"], what="edit")
    kube.kubectl("delete", "si", "openai", "-n", namespace)
    kube.wait_for(lambda: routes_of(kube, namespace, "agent") == [], what="delete revokes")


# -- least privilege -----------------------------------------------------------------------------

@pytest.mark.parametrize(("verb", "resource", "allowed"), [
    ("get", "secrets", True), ("create", "secrets", True), ("list", "secrets", False),
    ("watch", "secrets", False), ("delete", "secrets", False), ("update", "secrets", False),
    ("patch", "pods", True), ("create", "pods", False), ("delete", "pods", False),
    ("create", "pods/exec", False), ("create", "subjectaccessreviews.authorization.k8s.io", True),
    # approvals: it records and withdraws them, never decides (the status is approvers')
    ("create", "approvalrequests.keyhole.dev", True), ("delete", "approvalrequests.keyhole.dev", True),
    ("patch", "approvalrequests.keyhole.dev", False),
    # grants: labels on a workload's template, nothing else of it
    ("patch", "deployments.apps", True), ("create", "deployments.apps", False),
    ("delete", "deployments.apps", False), ("delete", "accessgrants.keyhole.dev", False),
])
def test_the_operator_has_only_the_permissions_it_documents(kube, operator, verb, resource,
                                                            allowed):
    assert kube.can_i(verb, resource, "default", OPERATOR_USER) is allowed


def test_the_operator_may_update_only_its_own_secrets(kube, operator):
    assert kube.can_i("update", "secrets/keyhole-ca", "default", OPERATOR_USER)
    assert not kube.can_i("update", "secrets/someone-elses", "default", OPERATOR_USER)


def test_a_pod_update_by_the_kubelet_path_is_not_blocked(kube, operator, namespace):
    """Unrelated edits (labels by users, status by the kubelet) pass the annotation guard."""
    kube.apply([pod("plain")], namespace)
    done = kube.kubectl("label", "pod", "plain", "-n", namespace, "team=a")
    assert done.returncode == 0

