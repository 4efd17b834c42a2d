"""Every rule both the CRD (its schema and CEL) and the sidecar's parser enforce, checked once:
the same invalid SecretInjection is sent to the real API server and to the parser, and both
refuse it saying the same thing (the phrase of each case appears in both messages; for plain
schema rules, whose API server messages are generic, the field both name).

The API server applies the CRD's schema before any validating webhook is called, so what it
answers here is the CRD's own word even when an operator is running."""

from __future__ import annotations

import pytest

from keyhole_common.spec import SpecError, load_injections
from keyhole_operator.routes import Injection
from tests.cluster.test_operator import openai_injection

REF = {"secretKeyRef": {"name": "s", "key": "k"}}
OAUTH2 = {"tokenURL": "https://auth.example.com/t", "clientIDFrom": REF, "clientSecretFrom": REF}
APP = {"appID": 1, "installationID": 2, "privateKeyFrom": REF}


def without_headers(**spec):
    def change(s):
        s.pop("headers")
        s.update(spec)
    return change


CEL_RULES = {  # case → (change to a valid spec, what both messages say)
    "nothing to inject": (without_headers(agentEnv=[]), "nothing to inject: give at least one of"),
    "two credential sources": (without_headers(oauth2=OAUTH2, githubApp=APP),
                               "credential sources; an injection has at most one"),
    "a credential source and basic auth": (
        without_headers(oauth2=OAUTH2, basicAuth={"usernameFrom": REF}),
        "and basicAuth both set Authorization; keep one"),
    "a credential source and an Authorization header": (
        lambda s: s.update(oauth2=OAUTH2), "sets Authorization, which spec.headers also sets"),
    "basic auth and an Authorization header": (
        lambda s: s.update(basicAuth={"usernameFrom": REF}),
        "basicAuth sets Authorization, which spec.headers also sets"),
    "a base URL with only wildcards": (
        lambda s: s.update(hosts=["*.example.com"], agentEnv=[{"name": "B", "baseURL": "/v1"}]),
        "a baseURL needs a host entry without a wildcard to send to"),
    "a header the proxy manages": (lambda s: s["headers"][0].update(name="Transfer-Encoding"),
                                   "is managed by the proxy and cannot be injected"),
    "a Secret key starting with ..": (
        lambda s: s["headers"][0].update(valueFrom={"secretKeyRef": {"name": "s", "key": "..x"}}),
        "a Secret key may not start with '..'"),
    "a format without {value}": (lambda s: s["headers"][0].update(format="Bearer"),
                                 "must contain {value}"),
    "a format with a line break": (lambda s: s["headers"][0].update(format="Bearer\n{value}"),
                                   "must not contain CR"),
    "an App with installation and repository": (
        without_headers(githubApp={**APP, "repository": "o/r"}),
        "give exactly one of installationID or repository (owner/name)"),
    "a malformed App ID": (without_headers(githubApp={**APP, "appID": "12 34"}),
                           "the App's ID (a number) or its client ID"),
    "a malformed installation ID": (without_headers(githubApp={**APP, "installationID": "x1"}),
                                    "an installation ID is a number"),
    "an empty rule": (lambda s: s.update(rules=[{}]),
                      "an empty rule allows everything; give methods, paths or both"),
    "a burst without a rate": (lambda s: s.update(limits={"burst": 3}),
                               "a burst sizes the requestsPerMinute bucket"),
    "a rule's burst without a rate": (
        lambda s: s.update(rules=[{"methods": ["GET"], "limits": {"burst": 3}}]),
        "a burst sizes the requestsPerMinute bucket"),
    "an agentEnv entry with both": (
        lambda s: s.update(agentEnv=[{"name": "X", "placeholder": True, "baseURL": "/v1"}]),
        "give exactly one of placeholder"),
    "a placeholder that is false": (
        lambda s: s.update(agentEnv=[{"name": "X", "placeholder": False}]),
        "must be true (or leave the entry out)"),
    "a budget of both tokens and spend": (
        lambda s: s.update(llm={"api": "openai", "budgets": [
            {"per": "day", "tokens": 5, "spend": 1}]}), "give exactly one of tokens"),
    "a managed header to strip": (lambda s: s.update(stripHeaders=["Host"]),
                                  "is managed by the proxy"),
    "a model API and MCP at once": (lambda s: s.update(llm={"api": "openai"}, mcp={}),
                                    "an injection's hosts speak one protocol"),
    "a spend budget of 0": (
        lambda s: s.update(llm={"api": "openai", "budgets": [{"per": "day", "spend": 0}]}),
        "a spend budget of 0 allows nothing"),
}

SCHEMA_RULES = {  # case → (change, the field both messages name)
    "a host with a space": (lambda s: s.update(hosts=["api example.com"]), "spec.hosts[0]"),
    "a header name that is no token": (lambda s: s["headers"][0].update(name="X Key"),
                                       "spec.headers[0].name"),
    "a rate of zero": (lambda s: s.update(limits={"requestsPerMinute": 0}),
                       "spec.limits.requestsPerMinute"),
    "an unknown capture mode": (lambda s: s.update(capture="sometimes"), "spec.capture"),
    "no hosts": (lambda s: s.pop("hosts"), "spec.hosts"),
    "an unknown model API": (lambda s: s.update(llm={"api": "cohere"}), "spec.llm.api"),
    "a budget per week": (lambda s: s.update(llm={"api": "openai", "budgets": [
        {"per": "week", "tokens": 5}]}), "spec.llm.budgets[0].per"),
    "a budget for a namespace": (lambda s: s.update(llm={"api": "openai", "budgets": [
        {"per": "day", "tokens": 5, "for": "namespace"}]}), "spec.llm.budgets[0].for"),
    "a tool glob with a space": (lambda s: s.update(mcp={"tools": {"allow": ["get issue"]}}),
                                 "spec.mcp.tools.allow[0]"),
    "a condition without an expression": (
        lambda s: s.update(mcp={"tools": {"when": [{"match": ["x"]}]}}),
        "spec.mcp.tools.when[0].expression"),
    "a price below zero": (lambda s: s.update(llm={"api": "openai", "prices": [
        {"model": "x", "input": -1, "output": 1}]}), "spec.llm.prices[0].input"),
}


def refusals(kube, namespace: str, change) -> tuple[str, str]:
    """What the API server and what the parser answer for the changed injection."""
    document = openai_injection()
    change(document["spec"])
    done = kube.apply([document], namespace, check=False)
    assert done.returncode != 0, f"the API server admitted it: {done.stdout}"
    document["metadata"]["namespace"] = namespace
    with pytest.raises(ValueError) as parsed:
        Injection.from_object(document)
    return done.stderr, str(parsed.value)


@pytest.mark.parametrize("case", [*CEL_RULES, *SCHEMA_RULES])
def test_the_crd_and_the_parser_refuse_alike(kube, crd, namespace, case):
    change, both_say = CEL_RULES.get(case) or SCHEMA_RULES[case]
    server, parser = refusals(kube, namespace, change)
    assert both_say in server, server
    assert both_say in parser, parser


DUPLICATED = """\
apiVersion: keyhole.dev/v1alpha1
kind: SecretInjection
metadata: {name: duplicated}
spec:
  podSelector: {matchLabels: {keyhole.dev/duplicated: "true"}}
  hosts: ["api.openai.com"]
  headers:
    - name: Authorization
      valueFrom: {secretKeyRef: {name: openai, key: api-key}}
  hosts: ["api.stripe.com"]
"""


def test_a_field_given_twice_kubectl_keeps_the_last_so_the_sidecars_reader_refuses_it(
        kube, crd, namespace, tmp_path):
    """What happens to a duplicated field on the way to the API server (docs/operator.md):
    kubectl reads the file itself — client-side and server-side apply alike — and keeps the
    last value, silently; nothing after kubectl, keyhole's webhook included, can see there were
    two. A body that reaches the API server with its duplicate (a raw request) is refused under
    strict field validation. So the check is the file's: the sidecar's reader and
    ``keyhole-sidecar check`` refuse it, naming the key and both lines."""
    for how in ([], ["--server-side"]):
        done = kube.kubectl("apply", *how, "-f", "-", "-n", namespace, input=DUPLICATED)
        assert "duplicated" in done.stdout and not done.stderr
        assert kube.get("si", "duplicated", namespace)["spec"]["hosts"] == ["api.stripe.com"]
        kube.kubectl("delete", "si", "duplicated", "-n", namespace)
    (tmp_path / "raw.json").write_text(
        '{"apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjection", "metadata": '
        '{"name": "raw"}, "spec": {"podSelector": {}, "hosts": ["api.openai.com"], "headers": '
        '[{"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "o", "key": "k"}}}], '
        '"hosts": ["api.stripe.com"]}}')
    raw = kube.kubectl("create", "--raw", f"/apis/keyhole.dev/v1alpha1/namespaces/{namespace}"
                       "/secretinjections?fieldValidation=Strict", "-f", str(tmp_path / "raw.json"),
                       check=False)
    assert raw.returncode != 0 and 'duplicate field "spec.hosts"' in raw.stderr, raw.stderr
    (tmp_path / "inj.yaml").write_text(DUPLICATED)
    with pytest.raises(SpecError, match="key 'hosts' is given twice"):
        load_injections(tmp_path / "inj.yaml")
