import json

import pytest

from keyhole_common.spec import (
    SpecError,
    load_injections,
    parse_injection,
    parse_injections,
)
from tests.support.config import INJECTIONS, injection, ref


def problems(doc) -> list[str]:
    _, found = parse_injection(doc, "doc")
    return [f"{p.field}: {p.message}" for p in found]


def test_the_standard_test_configuration_parses_into_typed_objects():
    parsed = parse_injections(("test", doc) for doc in INJECTIONS)
    api = parsed[0]
    assert api.name == "api"
    assert str(api.hosts[0]) == "api.routed.test"
    assert api.headers[0].format == "Bearer {value}"
    assert api.headers[0].secret.name == "api-credentials"
    rules = parsed[3].rules
    assert rules[0].methods == frozenset({"GET"}) and rules[0].paths == ("/v1/models/*", "/reflect")
    assert parsed[5].basic_auth.password.key == "token"


def test_parsed_objects_are_frozen():
    parsed = parse_injections([("t", INJECTIONS[0])])[0]
    with pytest.raises(AttributeError):
        parsed.name = "other"


def test_a_kubernetes_object_as_kubectl_prints_it_parses():
    doc = injection("openai", hosts=["api.openai.com"],
                    podSelector={"matchLabels": {"keyhole.dev/openai": "true"}},
                    headers=[{"name": "Authorization", "valueFrom": ref("openai", "api-key"),
                              "format": "Bearer {value}"}],
                    agentEnv=[{"name": "OPENAI_API_KEY", "placeholder": True},
                              {"name": "OPENAI_BASE_URL", "baseURL": "/v1"}])
    doc["metadata"].update(namespace="agents", uid="abc", resourceVersion="5", generation=3)
    doc["status"] = {"matchedPods": 2}
    parsed = parse_injections([("k", doc)])[0]
    assert parsed.namespace == "agents"
    assert parsed.agent_env[1].base_url == "/v1"
    assert parsed.pod_selector == {"matchLabels": {"keyhole.dev/openai": "true"}}


@pytest.mark.parametrize(("change", "expected"), [
    ({"spec": {"hosts": ["a.test"]}}, "spec: nothing to inject"),
    ({"apiVersion": "v1"}, "apiVersion: must be 'keyhole.dev/v1alpha1'"),
    ({"kind": "Secret"}, "kind: must be 'SecretInjection'"),
    ({"spec": {"hosts": [], "headers": []}}, "spec.hosts: must not be empty"),
    ({"spec": {"hosts": "a.test", "queryParams": []}}, "spec.hosts: must be a list"),
    ({"spec": {"hosts": ["a.test"], "headers": [{"name": "Host", "valueFrom": ref("s", "k")}]}},
     "spec.headers[0].name: 'Host' is managed by the proxy"),
    ({"spec": {"hosts": ["a.test"], "headers": [{"name": "Proxy-Authorization",
                                                 "valueFrom": ref("s", "k")}]}},
     "is managed by the proxy"),
    ({"spec": {"hosts": ["a.test"], "headers": [{"name": "X", "valueFrom": ref("s", "k"),
                                                 "format": "a{value}\r\nb"}]}},
     "must not contain CR, LF"),
    ({"spec": {"hosts": ["a.test"], "headers": [{"name": "X", "valueFrom": ref("s", "k"),
                                                 "format": "{value}{value}"}]}},
     "exactly once"),
    ({"spec": {"hosts": ["a.test"], "headers": [{"name": "X", "valueFrom": ref("s", "k")},
                                                {"name": "x", "valueFrom": ref("s", "k")}]}},
     "header 'x' is set twice"),
    ({"spec": {"hosts": ["a.test"], "headers": [{"name": "X", "valueFrom": ref("S_", "k")}]}},
     "secretKeyRef.name: 'S_' is not valid"),
    ({"spec": {"hosts": ["a.test"], "headers": [{"name": "X", "valueFrom": ref("s", "../etc")}]}},
     "secretKeyRef.key: '../etc' is not valid"),
    ({"spec": {"hosts": ["a.test"], "headers": [{"name": "X", "valueFrom": ref("s", "..data")}]}},
     "may not start with '..'"),
    ({"spec": {"hosts": ["a.test"], "headers": [{"name": "X", "valueFrom": {"configMapKeyRef": {}}}]}},
     "valueFrom.configMapKeyRef: unknown field"),
    ({"spec": {"hosts": ["a.test"], "basicAuth": {"usernameFrom": ref("s", "u")},
               "headers": [{"name": "Authorization", "valueFrom": ref("s", "k")}]}},
     "basicAuth sets Authorization"),
    ({"spec": {"hosts": ["a.test"], "queryParams": [{"name": "a&b", "valueFrom": ref("s", "k")}]}},
     "queryParams[0].name"),
    ({"spec": {"hosts": ["a.test"], "queryParams": [{"name": "k", "valueFrom": ref("s", "k")}],
               "rules": [{}]}}, "an empty rule allows everything"),
    ({"spec": {"hosts": ["a.test"], "queryParams": [{"name": "k", "valueFrom": ref("s", "k")}],
               "rules": [{"paths": ["v1/x"]}]}}, "must start with '/'"),
    ({"spec": {"hosts": ["a.test"], "queryParams": [{"name": "k", "valueFrom": ref("s", "k")}],
               "rules": [{"methods": ["GET "]}]}}, "an HTTP method"),
    ({"spec": {"hosts": ["a.test"], "queryParams": [{"name": "k", "valueFrom": ref("s", "k")}],
               "agentEnv": [{"name": "X", "placeholder": True, "baseURL": "/v1"}]}},
     "exactly one of placeholder"),
    ({"spec": {"hosts": ["*.a.test"], "queryParams": [{"name": "k", "valueFrom": ref("s", "k")}],
               "agentEnv": [{"name": "X", "baseURL": "/v1"}]}},
     "a baseURL needs a host entry without a wildcard"),
    ({"spec": {"hosts": ["a.test"], "queryParams": [{"name": "k", "valueFrom": ref("s", "k")}],
               "stripHeaders": ["Host"]}}, "stripHeaders[0]: 'Host' is managed by the proxy"),
    ({"spec": {"hosts": ["a.test"], "queryParams": [{"name": "k", "valueFrom": ref("s", "k")}],
               "stripHeaders": ["X-Key", "x-key"]}}, "stripHeaders[1]: 'x-key' is listed twice"),
    ({"spec": {"hosts": ["a.test"], "queryParams": [{"name": "k", "valueFrom": ref("s", "k")}],
               "stripHeaders": ["X Key"]}}, "stripHeaders[0]"),
    ({"metadata": {"name": "Bad_Name"}}, "metadata.name: 'Bad_Name' is not valid"),
])
def test_every_mistake_gets_a_message_naming_the_field(change, expected):
    doc = injection("x", hosts=["a.test"],
                    headers=[{"name": "X", "valueFrom": ref("s", "k")}])
    for key, value in change.items():
        doc[key] = value
    found = problems(doc)
    assert any(expected in p for p in found), found


def test_all_problems_of_a_document_are_reported_together():
    doc = injection("x", hosts=["https://a"], headers=[{"name": "Host", "format": "x"}], foo=1)
    assert len(problems(doc)) >= 4


def test_load_reads_a_folder_of_yaml_and_json_and_expands_lists(tmp_path):
    import yaml
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all(INJECTIONS[:2]))
    (tmp_path / "b.json").write_text(json.dumps({"kind": "SecretInjectionList",
                                                 "items": INJECTIONS[2:4]}))
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.yaml").write_text("ignored: [")
    names = [i.name for i in load_injections(tmp_path)]
    assert names == ["api", "basic", "query", "rules"]


def test_load_reports_invalid_yaml_with_the_file(tmp_path):
    (tmp_path / "x.yaml").write_text("a: [")
    with pytest.raises(SpecError, match=r"x.yaml: not valid YAML or JSON"):
        load_injections(tmp_path / "x.yaml")


DUPLICATED_HOSTS = """\
apiVersion: keyhole.dev/v1alpha1
kind: SecretInjection
metadata: {name: openai}
spec:
  hosts: ["api.openai.com"]
  headers:
    - name: Authorization
      valueFrom: {secretKeyRef: {name: openai, key: api-key}}
  hosts: ["api.stripe.com"]
"""


def test_a_key_given_twice_is_refused_naming_the_key_and_both_lines(tmp_path):
    (tmp_path / "inj.yaml").write_text(DUPLICATED_HOSTS)
    with pytest.raises(SpecError) as refused:
        load_injections(tmp_path / "inj.yaml")
    message = str(refused.value)
    assert "key 'hosts' is given twice (lines 5 and 9); keep one" in message
    assert f'in "{tmp_path / "inj.yaml"}", line 9' in message


def test_a_key_given_twice_in_json_is_refused_too(tmp_path):
    (tmp_path / "inj.json").write_text('{"apiVersion": "keyhole.dev/v1alpha1", '
                                       '"kind": "SecretInjection", "kind": "Other"}')
    with pytest.raises(SpecError, match="key 'kind' is given twice"):
        load_injections(tmp_path / "inj.json")


def test_a_merge_key_may_override_what_it_merges():
    from keyhole_common.spec.parse import load_yaml_documents

    assert load_yaml_documents("a: &d {x: 1, y: 2}\nb: {<<: *d, x: 3}\n", "m.yaml") == [
        {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}]


def test_a_tab_is_named_with_the_file_and_what_to_do(tmp_path):
    (tmp_path / "tab.yaml").write_text("kind: SecretInjection\nmetadata:\n\tname: x\n")
    with pytest.raises(SpecError) as refused:
        load_injections(tmp_path / "tab.yaml")
    message = str(refused.value)
    assert f'in "{tmp_path / "tab.yaml"}", line 3' in message and "<unicode string>" not in message
    assert "a tab cannot indent it" in message


def test_duplicate_names_are_refused():
    with pytest.raises(SpecError, match="two injections have this name"):
        parse_injections([("a", INJECTIONS[0]), ("b", INJECTIONS[0])])


def test_capture_is_proxy_transparent_or_left_to_the_operator():
    base = dict(hosts=["api.openai.com"],
                headers=[{"name": "Authorization", "valueFrom": ref("openai", "api-key")}])
    for mode in ("proxy", "transparent"):
        parsed, found = parse_injection(injection("openai", capture=mode, **base), "doc")
        assert found == [] and parsed.capture == mode
    assert parse_injection(injection("openai", **base), "doc")[0].capture is None
    assert any("capture is proxy (clients use the proxy variables) or transparent" in p
               for p in problems(injection("openai", capture="iptables", **base)))


def _cluster(**spec) -> dict:
    base = {"podSelector": {"matchLabels": {"keyhole.dev/openai": "true"}},
            "hosts": ["api.openai.com"],
            "headers": [{"name": "Authorization", "format": "Bearer {value}",
                         "valueFrom": {"secretKeyRef": {"name": "openai", "key": "api-key"}}}]}
    return {"apiVersion": "keyhole.dev/v1alpha1", "kind": "ClusterSecretInjection",
            "metadata": {"name": "openai"}, "spec": {**base, **spec}}


def test_a_cluster_injection_parses_with_its_namespace_selector():
    injection, problems = parse_injection(
        _cluster(namespaceSelector={"matchLabels": {"team": "agents"}}), "cluster.yaml")
    assert problems == []
    assert injection.cluster and injection.kind == "ClusterSecretInjection"
    assert injection.namespace_selector == {"matchLabels": {"team": "agents"}}
    assert [str(r) for r in injection.secret_refs()] == ["openai/api-key"]


@pytest.mark.parametrize(("document", "field", "words"), [
    (_cluster(), "spec.namespaceSelector", "needs one"),
    ({**_cluster(namespaceSelector={}), "kind": "SecretInjection"}, "spec.namespaceSelector",
     "only a ClusterSecretInjection selects namespaces"),
    (_cluster(namespaceSelector={}, llm={"api": "openai", "budgets": [
        {"per": "day", "tokens": 1000, "for": "injection"}]}), "spec.llm.budgets",
     "budgets are per pod"),
    ({**_cluster(namespaceSelector={}), "kind": "SecretInjections"}, "kind",
     "'ClusterSecretInjection'"),
])
def test_what_a_cluster_injection_may_not_say_is_refused_by_name(document, field, words):
    injection, problems = parse_injection(document, "cluster.yaml")
    assert injection is None
    assert any(p.field == field and words in p.message for p in problems), problems


def test_a_cluster_injection_without_selectors_is_refused_standalone_as_by_the_crd():
    """The CRD requires namespaceSelector; so does the sidecar's reader — except for an item
    of the operator's signed routes, which carries no selectors at all."""
    bare = _cluster()
    bare["spec"].pop("podSelector")
    _, problems = parse_injection(bare, "cluster.yaml")
    assert [p.field for p in problems] == ["spec.namespaceSelector"]
    injection, problems = parse_injection(bare, "routes", signed=True)
    assert problems == [] and injection.cluster


def test_a_budgets_spend_is_asked_for_as_dollars_per_window_not_as_a_price():
    _, problems = parse_injection(injection("x", hosts=["a.test"], headers=[
        {"name": "X", "valueFrom": ref("s", "k")}], llm={"api": "openai", "budgets": [
            {"per": "day", "spend": "5$"}]}), "f")
    assert [str(p) for p in problems] == [
        "f (x): spec.llm.budgets[0].spend: '5$': give the dollars this budget allows per UTC "
        "day (5 for $5), a number from 0 (no currency sign)"]


def test_what_never_goes_upstream_is_the_injected_the_stripped_and_the_apis_credentials():
    [parsed], _ = parse_injections([("a", injection(
        "a", hosts=["a.test"], headers=[{"name": "x-api-key", "valueFrom": ref("s", "k")}],
        stripHeaders=["X-Placeholder"], llm={"api": "anthropic"}))]), []
    assert parsed.strip_headers == ("x-placeholder",)
    assert parsed.dropped_header_names() == {"x-api-key", "x-placeholder", "authorization"}


def _mcp(mcp, **spec) -> dict:
    return injection("mcp", hosts=["mcp.example.com"], mcp=mcp,
                     headers=[{"name": "Authorization", "valueFrom": ref("gh", "token")}],
                     **spec)


def test_an_mcp_policy_parses_with_its_globs_and_conditions():
    [parsed] = parse_injections([("test", _mcp({
        "tools": {"allow": ["get_*"], "deny": ["*delete*"], "when": [
            {"match": ["get_file*"], "expression": "arguments.path != ''", "message": "no"}]},
        "prompts": {"deny": ["*"]}}))])
    assert parsed.mcp.tools.allow == ("get_*",) and parsed.mcp.tools.deny == ("*delete*",)
    assert parsed.mcp.tools.when[0].expression == "arguments.path != ''"
    assert parsed.mcp.resources.allow is None  # absent: every resource
    assert parsed.mcp.prompts.deny == ("*",)


@pytest.mark.parametrize(("mcp", "field", "words"), [
    ({"tools": {"when": [{"match": ["x"], "expression": "arguments.path.startsWith("}]}},
     "spec.mcp.tools.when[0].expression", "<input>:1:"),  # the position, for kubectl apply
    ({"tools": {"when": [{"match": ["x"]}]}}, "spec.mcp.tools.when[0].expression",
     "non-empty string"),
    ({"tools": {"allow": ["get issue"]}}, "spec.mcp.tools.allow[0]", "tool name"),
    ({"resources": {"deny": ["vault:// keys"]}}, "spec.mcp.resources.deny[0]", "no spaces"),
    ({"tools": {"when": [{"match": [], "expression": "true"}]}},
     "spec.mcp.tools.when[0].match", "must not be empty"),
    ({"tools": {"allowed": ["x"]}}, "spec.mcp.tools.allowed", "unknown field"),
    ({"servers": {}}, "spec.mcp.servers", "unknown field"),
])
def test_a_wrong_mcp_policy_is_refused_naming_the_field(mcp, field, words):
    found = problems(_mcp(mcp))
    assert any(p.startswith(f"{field}:") and words in p for p in found), found


def test_an_injection_speaks_a_model_api_or_mcp_not_both():
    found = problems(_mcp({}, llm={"api": "openai"}))
    assert any(p.startswith("spec.mcp:") and "one protocol" in p for p in found), found
