"""The CRD is the single source of truth for the API: every example and fixture must pass both
its schema and the sidecar's parser, so the two can never drift; and every field documents
itself for ``kubectl explain``. (CEL rules run in the real API server: tests/cluster.)"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import jsonschema
import pytest
import yaml

from keyhole_common.spec import parse_injections
from tests.support.config import INJECTIONS

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "secretinjection.yaml"
CLUSTER_CRD = ROOT / "crds" / "clustersecretinjection.yaml"
KINDS = {"SecretInjection": CRD, "ClusterSecretInjection": CLUSTER_CRD}


def schema(kind: str = "SecretInjection") -> dict:
    crd = yaml.safe_load(KINDS[kind].read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def as_json_schema(node):
    """Strip the Kubernetes extensions jsonschema does not know."""
    if isinstance(node, dict):
        return {k: as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if isinstance(node, list):
        return [as_json_schema(v) for v in node]
    return node


def fixtures() -> list[tuple[str, dict]]:
    found = [(f"tests.support.config#{d['metadata']['name']}", d) for d in INJECTIONS]
    for path in [*ROOT.glob("examples/**/*.yaml"), ROOT / "tests/operator/testdata/_injections.yaml"]:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc and doc.get("kind") in KINDS:
                found.append((f"{path.relative_to(ROOT)}#{i + 1}", doc))
    return found


@pytest.mark.parametrize(("source", "document"), fixtures(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_example_and_fixture_passes_the_crd_schema_and_the_sidecar_parser(source, document):
    jsonschema.validate(document, as_json_schema(schema(document["kind"])))
    parse_injections([(source, document)])


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_field_has_a_description(kind):
    missing = []

    def walk(node, path):
        for name, child in (node.get("properties") or {}).items():
            if name not in ("apiVersion", "kind", "metadata") and not child.get("description"):
                missing.append(f"{path}.{name}")
            walk(child, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(schema(kind), "")
    assert missing == []


def test_the_cluster_crd_is_generated_from_the_namespaced_one():
    """One schema source: crds/generate.py writes the cluster CRD; a hand edit or a forgotten
    regeneration fails here."""
    generate = runpy.run_path(str(ROOT / "crds" / "generate.py"))
    expected = generate["render"]()
    for target in generate["TARGETS"]:
        assert target.read_text() == expected, f"{target} is stale: run python crds/generate.py"


def test_the_cluster_spec_is_the_namespaced_spec_plus_a_namespace_selector():
    namespaced = schema()["properties"]["spec"]["properties"]
    cluster = schema("ClusterSecretInjection")["properties"]["spec"]["properties"]
    assert set(cluster) == set(namespaced) | {"namespaceSelector"}
    assert cluster["hosts"] == namespaced["hosts"]
    assert cluster["limits"] == namespaced["limits"]
    assert "namespaceSelector" in schema("ClusterSecretInjection")["properties"]["spec"]["required"]
    scope = cluster["llm"]["properties"]["budgets"]["items"]["properties"]["for"]["enum"]
    assert scope == ["pod"]  # a shared count lives in a namespaced injection's status


def test_the_cluster_schema_requires_a_namespace_selector_as_the_parser_does():
    document = {"apiVersion": "keyhole.dev/v1alpha1", "kind": "ClusterSecretInjection",
                "metadata": {"name": "openai"},
                "spec": {"podSelector": {"matchLabels": {"keyhole.dev/openai": "true"}},
                         "hosts": ["api.openai.com"],
                         "headers": [{"name": "Authorization", "format": "Bearer {value}",
                                      "valueFrom": {"secretKeyRef": {"name": "openai",
                                                                     "key": "api-key"}}}]}}
    with pytest.raises(jsonschema.ValidationError, match="namespaceSelector"):
        jsonschema.validate(document, as_json_schema(schema("ClusterSecretInjection")))


def test_the_schema_refuses_what_the_parser_refuses_where_a_schema_can():
    bad = {"apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjection",
           "metadata": {"name": "x"},
           "spec": {"podSelector": {}, "hosts": ["https://api.openai.com/"],
                    "headers": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, as_json_schema(schema()))


def test_the_example_agent_deployment_is_valid_and_tagged_for_what_the_quick_start_applies():
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "agent-deployment.yaml").read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.34.0", strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    quick_start = [d for d in yaml.safe_load_all((ROOT / "examples" / "openai.yaml").read_text())
                   if d and d["kind"] == "SecretInjection"]
    tags = {k: v for k, v in labels.items() if k.startswith("keyhole.dev/")}
    assert tags == {k: v for d in quick_start
                    for k, v in d["spec"]["podSelector"]["matchLabels"].items()}


def test_no_example_invites_a_key_into_a_tracked_file():
    """No example holds a Secret (a user would write the key into a file git tracks); each
    Secret an example uses is created by a kubectl command in its comments, from the shell's
    environment, with every key the injections read. (examples/standalone reads a folder
    outside the checkout: the README's quick start, tested on its own.)"""
    assert not list(ROOT.glob("examples/standalone/secrets/**/*"))
    for path in ROOT.glob("examples/*.yaml"):
        text = path.read_text()
        docs = [d for d in yaml.safe_load_all(text) if d]
        assert not [d for d in docs if d.get("kind") == "Secret"], path
        used = {(ref["name"], ref["key"]) for d in docs for ref in _secret_refs(d)}
        for name, key in used:
            command = re.search(rf"#\s+kubectl create secret generic {re.escape(name)}\b"
                                rf"(.*\n(#\s+--.*\n)*)", text)
            assert command, f"{path.name}: no kubectl command creates Secret {name!r}"
            assert f"--from-literal={key}=" in command.group(0) or \
                f"--from-file={key}=" in command.group(0), f"{path.name}: {name}/{key}"


def _secret_refs(node):
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]
        for value in node.values():
            yield from _secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _secret_refs(value)
