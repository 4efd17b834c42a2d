"""Hostile AdmissionReviews against the running operator's webhook: odd pods get a clear
denial or a correct patch, malformed bodies a clear error, and the operator never crashes nor
admits a pod that matches an injection without its sidecar."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request

import jsonpatch
import pytest

from tests.cluster.test_operator import apply_injections, openai_injection, pod
from tests.cluster.test_webhook_replicas import admission_review


@pytest.fixture
def webhook(kube, operator, tmp_path):
    """POST to the operator's /keyhole-inject, trusting the caBundle it registered."""
    config = kube.get("mutatingwebhookconfiguration", "keyhole.dev", None)
    ca = tmp_path / "webhook-ca.pem"
    ca.write_bytes(base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"]))
    context = ssl.create_default_context(cafile=str(ca))

    def post(body: bytes, path: str = "/keyhole-inject") -> tuple[int, dict | str]:
        request = urllib.request.Request(f"https://127.0.0.1:{operator.webhook_port}{path}",
                                         data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    return post


def review(namespace: str, obj: dict) -> bytes:
    obj.setdefault("metadata", {})["namespace"] = namespace
    return json.dumps(admission_review(namespace, obj)).encode()


def verdict(webhook, namespace: str, obj: dict) -> tuple[dict, dict | None]:
    status, answer = webhook(review(namespace, obj))
    assert status == 200, answer
    response = answer["response"]
    patched = None
    if response["allowed"] and "patch" in response:
        patched = jsonpatch.apply_patch(obj, json.loads(base64.b64decode(response["patch"])))
    return response, patched


def has_sidecar(patched: dict | None) -> bool:
    return bool(patched) and any(c["name"] == "keyhole-proxy"
                                 for c in patched["spec"].get("initContainers", []))


TAG = {"keyhole.dev/openai": "true"}


def test_a_huge_pod_gets_a_correct_patch(webhook, kube, namespace):
    apply_injections(kube, namespace, openai_injection())
    huge = pod("huge", TAG)
    huge["spec"]["containers"] = [{"name": f"c{i}", "image": "x",
                                   "env": [{"name": f"V{j}", "value": "v" * 50} for j in range(50)]}
                                  for i in range(60)]
    response, patched = verdict(webhook, namespace, huge)
    assert response["allowed"] and has_sidecar(patched)
    assert all(any(e["name"] == "HTTPS_PROXY" for e in c["env"]) for c in patched["spec"]["containers"])


def test_a_pod_without_containers_is_answered(webhook, kube, namespace):
    apply_injections(kube, namespace, openai_injection())
    response, patched = verdict(webhook, namespace, {"apiVersion": "v1", "kind": "Pod",
                                                     "metadata": {"name": "empty", "labels": TAG},
                                                     "spec": {}})
    assert response["allowed"] and has_sidecar(patched)


def test_a_fake_sidecar_is_replaced_by_the_real_one(webhook, kube, namespace):
    apply_injections(kube, namespace, openai_injection())
    fake = pod("fake", TAG)
    fake["spec"]["containers"].append({"name": "keyhole-proxy", "image": "evil/steal-keys",
                                       "volumeMounts": []})
    response, patched = verdict(webhook, namespace, fake)
    assert response["allowed"]
    sidecars = [c for c in patched["spec"]["containers"] + patched["spec"]["initContainers"]
                if c["name"] == "keyhole-proxy"]
    assert len(sidecars) == 1 and sidecars[0]["image"] == "keyhole-sidecar:test"


@pytest.mark.parametrize(("spec", "message"), [
    ({"hostNetwork": True}, "hostNetwork"),
    ({"shareProcessNamespace": True}, "shareProcessNamespace"),
    ({"volumes": [{"name": "keyhole-routes", "emptyDir": {}}]}, "a name keyhole uses"),
    ({"initContainers": [{"name": "grab", "image": "x",
                          "volumeMounts": [{"name": "k", "mountPath": "/k"}]}],
      "volumes": [{"name": "k", "secret": {"secretName": "keyhole-ca"}}]}, "keyhole's own Secret"),
])
def test_dangerous_pods_are_denied_with_the_reason(webhook, kube, namespace, spec, message):
    apply_injections(kube, namespace, openai_injection())
    dangerous = pod("dangerous", TAG)
    dangerous["spec"].update(spec)
    response, _ = verdict(webhook, namespace, dangerous)
    assert response["allowed"] is False
    assert message in response["status"]["message"]


def test_ephemeral_containers_are_left_alone(webhook, kube, namespace):
    apply_injections(kube, namespace, openai_injection())
    debugged = pod("debugged", TAG)
    debugged["spec"]["ephemeralContainers"] = [{"name": "debug", "image": "busybox"}]
    _, patched = verdict(webhook, namespace, debugged)
    assert patched["spec"]["ephemeralContainers"] == [{"name": "debug", "image": "busybox"}]
    assert has_sidecar(patched)


@pytest.mark.parametrize("body", [b"not json", b"{}", b'{"request": {}}', b"[]",
                                  b'{"request": {"uid": "x", "object": "nope"}}'])
def test_malformed_reviews_get_a_clear_error_and_the_operator_lives_on(webhook, operator, kube,
                                                                      namespace, body):
    status, _ = webhook(body)
    assert status in (400, 404, 409, 422)
    assert operator.process.poll() is None
    apply_injections(kube, namespace, openai_injection())
    _, patched = verdict(webhook, namespace, pod("after", TAG))
    assert has_sidecar(patched)
