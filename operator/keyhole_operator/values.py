"""What the operator channel tells a sidecar of its pod's cluster injections: the values of
their Secrets, read from the central namespace, for the injections that serve the pod now.

A value goes out only when both hold: the pod's signed routes carry the cluster injection
(the annotation stays the source of truth; the channel never grants what it does not), and
the injection as the API server has it now still serves the pod (it exists, its
namespaceSelector selects the pod's namespace, which is not excluded, its podSelector the
pod's labels) and still reads that Secret key. Everything else is named in ``refused``, so
the sidecar drops those values at once: a revoke takes effect at the next call, whatever the
kubelet does with the routes file. Pure: the Kubernetes reads are the caller's.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping

from keyhole_common.spec import CLUSTER_KIND, SecretInjection, SecretKeyRef, parse_injection
from keyhole_operator.annotations import CLUSTER_SECRET_LABEL
from keyhole_operator.selectors import namespace_served, opted_out, selector_matches

Labelled = tuple[Mapping[str, str], Mapping[str, bytes]]  # a Secret's labels and data


def signed_cluster_items(document: dict) -> dict[str, SecretInjection]:
    """The cluster injections a verified routes document carries, by name."""
    found = {}
    for item in document.get("items") or []:
        if item.get("kind") != CLUSTER_KIND:
            continue
        spec, _ = parse_injection(item, "the pod's signed routes", signed=True)
        if spec is not None:
            found[spec.name] = spec
    return found


def why_not_served(signed: SecretInjection, live: SecretInjection | None, pod: Mapping,
                   namespace: str, namespace_labels: Mapping[str, str] | None) -> str | None:
    """Why the live cluster injection no longer serves the pod; None when it does."""
    if live is None:
        return f"ClusterSecretInjection {signed.name!r} no longer exists"
    if not namespace_served(live, namespace_labels):
        return (f"ClusterSecretInjection {signed.name!r} does not serve namespace {namespace} "
                "now (its namespaceSelector, or the namespace's labels, changed)")
    labels = (pod.get("metadata") or {}).get("labels")
    if opted_out(pod) or not selector_matches(live.pod_selector, labels):
        return (f"ClusterSecretInjection {signed.name!r} does not select this pod now (its "
                "podSelector, or the pod's labels, changed)")
    return None


def answer(document: dict, pod: Mapping, namespace: str,
           namespace_labels: Mapping[str, str] | None,
           live: Callable[[str], SecretInjection | None],
           read: Callable[[SecretKeyRef], Labelled | None],
           central: str) -> dict:
    """The ``/v1/values`` answer: for each cluster injection that serves the pod, its Secret
    keys' values (base64 of the bytes, cleaned by the sidecar as it cleans a mounted file) or
    why one is missing; for each that does not, why. Only Secrets labelled for cluster
    injections (``secret_problem``) are ever read out."""
    served: dict[str, dict] = {}
    refused: dict[str, str] = {}
    secrets: dict[str, Labelled | None] = {}
    for name, signed in sorted(signed_cluster_items(document).items()):
        current = live(name)
        why = why_not_served(signed, current, pod, namespace, namespace_labels)
        if why:
            refused[name] = why
            continue
        still_read = set(current.secret_refs())
        values, missing = {}, {}
        for ref in signed.secret_refs():
            if ref not in still_read:
                missing[str(ref)] = (f"ClusterSecretInjection {name!r} no longer reads Secret "
                                     f"{ref.name!r} key {ref.key!r}")
                continue
            if ref.name not in secrets:
                secrets[ref.name] = read(ref)
            problem = secret_problem(secrets[ref.name], ref, central)
            if problem:
                missing[str(ref)] = problem
            else:
                values[str(ref)] = base64.b64encode(secrets[ref.name][1][ref.key]).decode()
        served[name] = {"values": values, "missing": missing}
    return {"injections": served, "refused": refused}


def secret_problem(found: Labelled | None, ref: SecretKeyRef, central: str) -> str | None:
    """Why a cluster injection cannot use this key of the central namespace; None if it can."""
    if found is None:
        return f"Secret {central}/{ref.name} not found"
    labels, data = found
    if labels.get(CLUSTER_SECRET_LABEL) != "true":
        return (f"Secret {central}/{ref.name} is not labelled {CLUSTER_SECRET_LABEL}=true: "
                "label it to let cluster injections send it to the pods they serve")
    if ref.key not in data:
        return f"Secret {central}/{ref.name} has no key {ref.key!r}"
    return None


def live_injection(obj: dict | None, namespace: str, name: str) -> SecretInjection | None:
    """A SecretInjection object as the API server has it, parsed; None when it is gone or
    does not parse."""
    if obj is None:
        return None
    clean = {k: obj.get(k) for k in ("apiVersion", "kind", "spec")}
    found, _ = parse_injection(clean | {"metadata": {"name": name, "namespace": namespace}},
                               f"SecretInjection {namespace}/{name}")
    return found


def live_cluster_injection(obj: dict | None) -> SecretInjection | None:
    """A ClusterSecretInjection object as the API server has it, parsed; None when it is gone
    or does not parse (then it serves nobody: fail closed)."""
    if obj is None:
        return None
    clean = {k: obj.get(k) for k in ("apiVersion", "kind", "spec")}
    clean["metadata"] = {"name": (obj.get("metadata") or {}).get("name")}
    spec, _ = parse_injection(json.loads(json.dumps(clean)), "ClusterSecretInjection")
    return spec
