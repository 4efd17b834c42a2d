"""The operator's pure decisions: selectors, live grant/revoke, status conditions."""

from __future__ import annotations

import json

import pytest
import yaml

from keyhole_operator.live import plan_pod
from keyhole_operator.mutation import mutate
from keyhole_operator.routes import Injection, namespace_key
from keyhole_operator.selectors import choose, selector_matches
from keyhole_operator.settings import Settings
from keyhole_operator.status import injection_status
from tests.operator.test_mutation_golden import TESTDATA

KEY = b"decisions-test-key-0000000000000"


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({}, {}, True),
    (None, {"a": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": ""}, False),
    ({"matchExpressions": [{"key": "a", "operator": "Bogus"}]}, {"a": "1"}, False),
    ({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]},
     {"a": "1"}, False),
])
def test_label_selectors_follow_kubernetes_semantics(selector, labels, expected):
    assert selector_matches(selector, labels) is expected


def test_different_namespaces_get_different_signing_keys():
    assert namespace_key(b"m" * 32, "a") != namespace_key(b"m" * 32, "b")
    assert namespace_key(b"m" * 32, "a") == namespace_key(b"m" * 32, "a")


@pytest.fixture
def injections() -> list[Injection]:
    return [Injection.from_object(d)
            for d in yaml.safe_load_all((TESTDATA / "_injections.yaml").read_text()) if d]


def injected_pod(injections, labels) -> dict:
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "p", "namespace": "agents", "labels": labels},
           "spec": {"containers": [{"name": "agent", "image": "x"}]}}
    chosen = [i for i in injections if selector_matches(i.spec.pod_selector, labels)]
    return mutate(pod, chosen, Settings(), KEY).pod


def routes(plan) -> list[str]:
    return [i["metadata"]["name"] for i in json.loads(plan.annotations["keyhole.dev/injections"])["items"]]


def test_a_pod_as_injected_needs_no_change(injections):
    pod = injected_pod(injections, {"keyhole.dev/github": "true", "keyhole.dev/stripe": "x"})
    assert plan_pod(pod, injections, KEY).annotations == {}


def test_removing_a_label_revokes_at_once(injections):
    pod = injected_pod(injections, {"keyhole.dev/github": "true", "keyhole.dev/stripe": "x"})
    del pod["metadata"]["labels"]["keyhole.dev/stripe"]
    plan = plan_pod(pod, injections, KEY)
    assert routes(plan) == ["github"]


def test_a_grant_of_a_mounted_secret_applies_live(injections):
    pod = injected_pod(injections, {"keyhole.dev/github": "true"})
    pod["metadata"]["labels"]["keyhole.dev/stripe"] = "x"  # stripe shares github's Secret
    assert routes(plan_pod(pod, injections, KEY)) == ["github", "stripe"]


def test_a_grant_of_an_unmounted_secret_asks_for_a_restart(injections):
    pod = injected_pod(injections, {"keyhole.dev/github": "true"})
    pod["metadata"]["labels"]["keyhole.dev/openai"] = "true"
    plan = plan_pod(pod, injections, KEY)
    assert plan.restart_for == ("openai",)
    assert plan.annotations["keyhole.dev/restart-required"] == "openai"
    assert "keyhole.dev/injections" not in plan.annotations  # github stays as it was


def test_a_pod_without_the_sidecar_that_gains_a_match_asks_for_a_restart(injections):
    pod = {"metadata": {"name": "p", "namespace": "agents",
                        "labels": {"keyhole.dev/openai": "true"}}, "spec": {}}
    plan = plan_pod(pod, injections, KEY)
    assert plan.annotations == {"keyhole.dev/restart-required": "openai"}


def test_opting_out_revokes_everything(injections):
    pod = injected_pod(injections, {"keyhole.dev/github": "true"})
    pod["metadata"]["annotations"]["keyhole.dev/inject"] = "false"
    assert routes(plan_pod(pod, injections, KEY)) == []


def test_status_names_problems_and_keeps_transition_times():
    first = injection_status(generation=3, matched=2, restart_required=0,
                             secret_problems=["Secret 'x' not found"], over_privileged=[],
                             previous=None)
    by_type = {c["type"]: c for c in first["conditions"]}
    assert by_type["SecretResolved"]["status"] == "False"
    assert by_type["SecretResolved"]["message"] == "Secret 'x' not found"
    assert by_type["Ready"]["status"] == "False"
    assert first["matchedPods"] == 2 and first["observedGeneration"] == 3
    again = injection_status(generation=3, matched=2, restart_required=0,
                             secret_problems=["Secret 'x' not found"], over_privileged=[],
                             previous=first["conditions"])
    assert again["conditions"] == first["conditions"]


def test_status_reports_over_privileged_accounts_with_their_ways_around():
    held = [{"serviceAccount": "agent", "pods": ["agent-1", "agent-2"],
             "permissions": ["read Secrets (the key itself)", "exec into pods (run commands)"]}]
    status = injection_status(generation=1, matched=2, restart_required=0, secret_problems=[],
                              over_privileged=held, previous=None)
    flagged = {c["type"]: c for c in status["conditions"]}["AgentsOverPrivileged"]
    assert flagged["status"] == "True"
    assert ("ServiceAccount agent (pods agent-1, agent-2): read Secrets (the key itself), exec "
            "into pods (run commands)" in flagged["message"])
    assert status["canBypass"] == held  # the same, for tools (kubectl keyhole)


def test_every_way_around_keyhole_is_asked_with_its_reason():
    from keyhole_operator.privileges import BYPASSES, access_review

    asked = {(b.group, b.verb, b.resource, b.subresource) for b in BYPASSES}
    assert {("", "get", "secrets", ""), ("", "update", "pods", "ephemeralcontainers"),
            ("", "create", "pods", "attach"), ("", "create", "pods", "portforward"),
            ("", "create", "serviceaccounts", "token"), ("apps", "create", "deployments", ""),
            ("batch", "create", "cronjobs", ""),
            ("rbac.authorization.k8s.io", "create", "rolebindings", "")} <= asked
    assert all(b.why and b.what for b in BYPASSES)
    review = access_review("agents", "system:serviceaccount:agents:a", ["g"], BYPASSES[7])
    assert review["spec"]["resourceAttributes"] == {
        "namespace": "agents", "verb": "update", "resource": "pods", "group": "",
        "subresource": "ephemeralcontainers"}


# -- transparent capture ----------------------------------------------------------------------------

def _transparent(injections) -> list:
    from dataclasses import replace

    return [Injection(replace(i.spec, capture="transparent"), i.document) for i in injections]


def _pod() -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "agents", "labels": {"keyhole.dev/openai": "true"}},
            "spec": {"containers": [{"name": "agent", "image": "x"}]}}


@pytest.mark.parametrize("level", ["baseline", "restricted"])
def test_transparent_capture_is_refused_where_pod_security_forbids_its_capabilities(
        injections, level):
    from keyhole_operator.mutation import Refused

    chosen = _transparent(injections[:1])
    with pytest.raises(Refused) as refused:
        mutate(_pod(), chosen, Settings(), KEY, pod_security=level)
    assert "pod-security.kubernetes.io/enforce=privileged" in str(refused.value)
    assert f"enforces Pod Security {level!r}" in str(refused.value)
    assert "capture: proxy" in str(refused.value)


def test_transparent_capture_where_pod_security_allows_it(injections):
    for level in (None, "privileged"):
        pod = mutate(_pod(), _transparent(injections[:1]), Settings(), KEY,
                     pod_security=level).pod
        first = pod["spec"]["initContainers"][0]
        assert first["name"] == "keyhole-init"
        assert first["securityContext"]["capabilities"] == {"drop": ["ALL"],
                                                            "add": ["NET_ADMIN", "NET_RAW"]}


def test_proxy_capture_ignores_pod_security(injections):
    pod = mutate(_pod(), injections[:1], Settings(), KEY, pod_security="restricted").pod
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["keyhole-proxy"]


AGENTS = {"keyhole.dev/agents": "true"}  # the labels fleet-anthropic's namespaceSelector wants


def test_a_namespace_labelled_in_grants_a_cluster_injection_live_to_a_sidecar_with_the_channel(
        injections):
    fresh = {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "p", "namespace": "agents",
                          "labels": {"keyhole.dev/github": "true",
                                     "keyhole.dev/anthropic": "true"}},
             "spec": {"containers": [{"name": "agent", "image": "x"}]}}
    github = [i for i in injections if i.name == "github"]  # injected while not selected
    with_channel = Settings(channel_url="https://keyhole-webhook.keyhole-system.svc:9445")
    pod = mutate(fresh, github, with_channel, KEY).pod
    assert plan_pod(pod, injections, KEY, {}).annotations == {}  # not selected: as it was
    plan = plan_pod(pod, injections, KEY, AGENTS)
    assert routes(plan) == ["fleet-anthropic", "github"]
    assert plan.restart_for == ()
    without = mutate(fresh, github, Settings(), KEY).pod  # injected without the channel
    assert plan_pod(without, injections, KEY, AGENTS).restart_for == ("fleet-anthropic",)


def test_a_namespaces_own_injection_wins_a_clash_with_a_cluster_one(injections):
    clashing = Injection.from_object({
        "apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjection",
        "metadata": {"name": "anthropic-own", "namespace": "agents"},
        "spec": {"podSelector": {"matchLabels": {"keyhole.dev/anthropic": "true"}},
                 "hosts": ["api.anthropic.com"],
                 "headers": [{"name": "x-api-key",
                              "valueFrom": {"secretKeyRef": {"name": "mine", "key": "k"}}}]}})
    pod = {"metadata": {"name": "p", "namespace": "agents",
                        "labels": {"keyhole.dev/anthropic": "true"}}}
    chosen, shadowed = choose([*injections, clashing], pod, AGENTS)
    assert [i.name for i in chosen] == ["anthropic-own"]
    assert [(s.cluster, s.namespaced) for s in shadowed] == [("fleet-anthropic",
                                                             "anthropic-own")]
    assert "x-api-key" in shadowed[0].why
