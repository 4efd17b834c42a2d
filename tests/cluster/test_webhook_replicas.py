"""Several operator replicas serve the same webhook certificate (from a Secret in a cluster;
files here), and each answers real AdmissionReview v1 requests over HTTPS: the JSON Patch it
returns, applied to the pod, yields a pod valid against the Kubernetes schema."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
import urllib.request
import uuid

import jsonpatch
import kubernetes_validate

from keyhole_operator.webhook_tls import self_signed
from tests.cluster.conftest import start_operator
from tests.cluster.test_operator import apply_injections, openai_injection, pod


def admission_review(namespace: str, obj: dict) -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE",
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": obj, "oldObject": None, "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def post(port: int, ca: str, path: str, body: dict) -> tuple[dict, bytes]:
    context = ssl.create_default_context(cafile=ca)
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        answer = json.loads(response.read())
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        certificate = tls.getpeercert(binary_form=True)
    return answer, certificate


def test_replicas_share_one_certificate_and_each_answers_admission_reviews(kube, operator,
                                                                           namespace, tmp_path):
    apply_injections(kube, namespace, openai_injection())
    ca, cert, key = self_signed(tmp_path / "webhook-tls", ["127.0.0.1"])
    replicas = [start_operator(kube, tmp_path / f"replica-{i}", manage=False, cert=(ca, cert, key))
                for i in range(2)]
    try:
        labelled = pod("agent", {"keyhole.dev/openai": "true"})
        labelled["metadata"]["namespace"] = namespace
        fingerprints = set()
        for replica in replicas:
            review = admission_review(namespace, labelled)
            answer, certificate = post(replica.webhook_port, str(ca), "/keyhole-inject", review)
            fingerprints.add(hashlib.sha256(certificate).hexdigest())
            response = answer["response"]
            assert response["uid"] == review["request"]["uid"]
            assert response["allowed"] is True
            assert response["patchType"] == "JSONPatch"
            patch = json.loads(base64.b64decode(response["patch"]))
            patched = jsonpatch.apply_patch(labelled, patch)
            assert patched["spec"]["initContainers"][0]["name"] == "keyhole-proxy"
            kubernetes_validate.validate(patched, "1.34.0", strict=True)
        assert len(fingerprints) == 1, "every replica must serve the same certificate"
    finally:
        for replica in replicas:
            replica.stop()


def test_a_refused_pod_gets_a_denied_review_with_the_message(kube, operator, namespace, tmp_path):
    apply_injections(kube, namespace, openai_injection())
    ca, cert, key = self_signed(tmp_path / "webhook-tls", ["127.0.0.1"])
    replica = start_operator(kube, tmp_path / "replica", manage=False, cert=(ca, cert, key))
    try:
        unsafe = pod("unsafe", {"keyhole.dev/openai": "true"}, hostNetwork=True)
        unsafe["metadata"]["namespace"] = namespace
        answer, _ = post(replica.webhook_port, str(ca), "/keyhole-inject",
                         admission_review(namespace, unsafe))
        response = answer["response"]
        assert response["allowed"] is False
        assert response["status"]["code"] == 403
        assert "hostNetwork: true" in response["status"]["message"]
    finally:
        replica.stop()
