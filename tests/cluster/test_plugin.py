"""``kubectl keyhole`` against the real API server, found by the real kubectl as a plugin
(``kubectl-keyhole`` on PATH): a namespace with several injections, tagged and untagged pods,
one pod needing a restart, one whose injection's Secret is missing and one agent whose
ServiceAccount could go around keyhole."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.cluster.test_operator import apply_injections, openai_injection, pod, secret
from tests.support.config import ref


@pytest.fixture
def scene(kube, operator, namespace):
    secret(kube, namespace)
    secret(kube, namespace, "github", token="ghp-0123456789abcdef")
    kube.kubectl("create", "serviceaccount", "risky", "-n", namespace)
    kube.kubectl("create", "role", "reads-secrets", "-n", namespace, "--verb=get",
                 "--resource=secrets")
    kube.kubectl("create", "rolebinding", "reads-secrets", "-n", namespace,
                 "--role=reads-secrets", f"--serviceaccount={namespace}:risky")
    github = openai_injection("github", hosts=["api.github.test"], headers=[
        {"name": "Authorization", "valueFrom": ref("github", "token")}],
        rules=[{"methods": ["GET"], "paths": ["/repos/**"]}])
    stripe = openai_injection("stripe", hosts=["api.stripe.test"], headers=[
        {"name": "Authorization", "valueFrom": ref("stripe", "key")}])
    apply_injections(kube, namespace, openai_injection(), github, stripe)
    kube.apply([pod("agent", {"keyhole.dev/openai": "true"}),
                pod("plain"),
                pod("restarter", {"keyhole.dev/openai": "true"}),
                pod("payer", {"keyhole.dev/stripe": "true"}),
                pod("risky-agent", {"keyhole.dev/openai": "true"}, serviceAccountName="risky")],
               namespace)
    kube.kubectl("label", "pod", "restarter", "-n", namespace, "keyhole.dev/github=true")
    kube.wait_for(lambda: kube.get("pod", "restarter", namespace)["metadata"]["annotations"].get(
        "keyhole.dev/restart-required") == "github", what="restart-required")
    kube.wait_for(lambda: (kube.get("si", "openai", namespace).get("status") or {}).get(
        "canBypass"), what="status.canBypass")
    return namespace


def plugin(kube, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return kube.keyhole(*args, check=check)


def test_status_lists_injections_readiness_and_pods(kube, scene):
    out = plugin(kube, "status", "-n", scene).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:4]}
    assert out.splitlines()[0].split() == ["NAME", "HOSTS", "READY", "SELECTED", "WITH-KEY",
                                           "RESTART", "CAN-BYPASS"]
    assert rows["openai"][1:] == ["api.routed.test", "True", "3", "3", "0", "1"]
    assert rows["github"][1:] == ["api.github.test", "True", "1", "0", "1", "0"]
    assert rows["stripe"][2] == "False"
    namespace_row = next(line.split() for line in out.splitlines() if line.startswith(scene))
    assert namespace_row[1:3] == ["5", "4"]  # pods, pods with the sidecar
    answer = json.loads(plugin(kube, "status", "-n", scene, "-o", "json").stdout)
    [space] = answer["namespaces"]
    assert space["pods"] == 5 and space["podsWithSidecar"] == 4
    assert space["ca"]["ageDays"] < 1
    everywhere = plugin(kube, "status", "-A").stdout
    assert everywhere.splitlines()[0].startswith("NAMESPACE")
    assert any(line.startswith(scene) for line in everywhere.splitlines())


def test_who_can_use_a_secret_names_pods_accounts_and_who_could_go_around(kube, scene):
    out = plugin(kube, "who-can-use", "openai-credentials", "-n", scene).stdout
    assert out.splitlines()[0] == f"Secret openai-credentials in namespace {scene}:"
    pods = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()
            and not line.startswith(("could", "  "))}
    assert set(pods) == {"agent", "restarter", "risky-agent"}
    assert pods["agent"][1:] == ["default", "openai", "has", "key"]
    assert pods["risky-agent"][1] == "risky"
    assert "plain" not in out
    assert "ServiceAccount risky (pods risky-agent): read Secrets" in out
    github = json.loads(plugin(kube, "who-can-use", "si/github", "-n", scene, "-o",
                               "json").stdout)
    assert [(p["pod"], p["access"]) for p in github["pods"]] == [("restarter", "needs restart")]
    assert github["canBypass"] == []


def test_explain_pod_says_why_each_key_is_or_is_not_there(kube, scene):
    plain = plugin(kube, "explain", "pod", "plain", "-n", scene).stdout
    assert "sidecar: none (the webhook did not inject this pod)" in plain
    assert "the pod lacks the label(s) keyhole.dev/openai=true" in plain
    restarter = yaml.safe_load(plugin(kube, "explain", "pod", "restarter", "-n", scene, "-o",
                                      "yaml").stdout)
    verdicts = {i["injection"]: i for i in restarter["injections"]}
    assert verdicts["openai"]["verdict"] == "has key"
    assert verdicts["github"]["verdict"] == "needs restart"
    assert "kubectl rollout restart" in verdicts["github"]["why"]
    assert verdicts["stripe"]["verdict"] == "not selected"
    assert restarter["mountedSecrets"] == ["openai-credentials"]
    payer = yaml.safe_load(plugin(kube, "explain", "pod", "payer", "-n", scene, "-o",
                                  "yaml").stdout)
    stripe = next(i for i in payer["injections"] if i["injection"] == "stripe")
    assert stripe["verdict"] == "refused" and "503 secret_unavailable" in stripe["why"]
    wide = plugin(kube, "explain", "pod", "agent", "-n", scene, "-o", "wide").stdout
    assert "HOSTS" in wide and "api.routed.test" in wide


def test_mistakes_get_a_clear_error(kube, scene):
    missing = plugin(kube, "explain", "pod", "nope", "-n", scene, check=False)
    assert missing.returncode == 1
    assert f"error: pod 'nope' not found in namespace '{scene}'" in missing.stderr
    unknown = plugin(kube, "who-can-use", "nothing-here", "-n", scene, check=False)
    assert "neither a SecretInjection nor a Secret used by one is named 'nothing-here'" in (
        unknown.stderr)


def test_a_user_the_api_server_forbids_gets_one_line_naming_the_rights(kube, scene, tmp_path):
    kube.kubectl("create", "serviceaccount", "nobody", "-n", scene)
    config = kube.service_account_kubeconfig(scene, "nobody", tmp_path / "nobody.kubeconfig")
    done = plugin(kube, "status", "-n", scene, "--kubeconfig", str(config), check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: the API server refused to list secretinjections (403): you need get/list on "
        "secretinjections.keyhole.dev, pods and configmaps"]
