"""Whose identity a federated injection presents (``spec.workloadIdentity``), as pure
functions: one ServiceAccount per injection in keyhole's own namespace, whose tokens only the
operator requests (TokenRequest: short-lived, bound to the injection's audience) and hands to
the sidecars the injection serves over the operator channel.

Why not the agent pod's own ServiceAccount: anyone who may create pods with it could mount a
token with the same audience and exchange it themselves. Nobody in an agent's namespace can
mint a token for an account of keyhole's namespace; docs/security.md, *Workload identity*.

The account's name says whose it is and cannot be claimed by another injection:
``ns.<namespace>.<name>`` for a SecretInjection (a namespace name has no dot, so the first dot
after the prefix ends it) and ``cluster.<name>`` for a ClusterSecretInjection.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from keyhole_common.spec import CLUSTER_KIND, SecretInjection, parse_injection
from keyhole_common.spec.model import WorkloadIdentity
from keyhole_operator.annotations import COMPONENT_LABEL, MANAGED_BY, MANAGED_BY_LABEL
from keyhole_operator.selectors import opted_out, selector_matches
from keyhole_operator.values import why_not_served

COMPONENT = "identity"
IDENTITY_SELECTOR = f"{COMPONENT_LABEL}={COMPONENT},{MANAGED_BY_LABEL}={MANAGED_BY}"
INJECTION_ANNOTATION = "keyhole.dev/identity-of"
TOKEN_SECONDS = 600
"""What each TokenRequest asks for: the shortest the API server grants (10 min)."""
REUSE_FRACTION = 1 / 3
"""A token is handed out again while less than this share of its life is gone, so a sidecar
always receives one with most of its life left."""
MAX_ERROR = 500
REPORT_EVERY = 30.0
"""Seconds between two status writes of one injection's exchanges, unless the outcome changed."""
DISCOVERY_PATH = "/.well-known/openid-configuration"


def account_name(namespace: str | None, injection: str) -> str:
    """The ServiceAccount of an injection (``namespace`` None: a cluster injection);
    ValueError when it would be longer than Kubernetes allows."""
    name = f"cluster.{injection}" if namespace is None else f"ns.{namespace}.{injection}"
    if len(name) > 253:
        raise ValueError(f"the identity's ServiceAccount {name[:40]}… would be longer than 253 "
                         "characters: shorten the injection's name")
    return name


def identity_for(document: dict, pod: Mapping, namespace: str,
                 namespace_labels: Mapping[str, str] | None, injection: str,
                 live: Callable[[str | None, str], SecretInjection | None],
                 ) -> tuple[str | None, WorkloadIdentity]:
    """Whose identity the pod's sidecar may present for ``injection``: (the injection's
    namespace, None for a cluster one; its spec.workloadIdentity as it is now). Both must
    hold: the pod's signed routes carry the injection, and the injection as the API server
    has it now still serves the pod and still federates. PermissionError says which fails.
    ``live(namespace or None, name)``: the injection now, parsed (None: gone)."""
    item = next((i for i in document.get("items") or []
                 if (i.get("metadata") or {}).get("name") == injection), None)
    if item is None:
        raise PermissionError(f"pod {namespace}/{_name(pod)} is not served by injection "
                              f"{injection!r}: it may not present its identity")
    cluster = item.get("kind") == CLUSTER_KIND
    signed, _ = parse_injection(item if cluster else {**item, "metadata": {
        "name": injection, "namespace": namespace}}, "the pod's signed routes", signed=True)
    current = live(None if cluster else namespace, injection)
    if signed is None:
        raise PermissionError(f"the pod's routes for {injection!r} do not parse")
    if cluster:
        why = why_not_served(signed, current, pod, namespace, namespace_labels)
        if why:
            raise PermissionError(why)
    elif current is None:
        raise PermissionError(f"SecretInjection {namespace}/{injection} no longer exists")
    elif opted_out(pod) or not selector_matches(current.pod_selector, (
            pod.get("metadata") or {}).get("labels")):
        raise PermissionError(f"SecretInjection {namespace}/{injection} does not select this "
                              "pod now (its podSelector, or the pod's labels, changed)")
    if not isinstance(current.credential, WorkloadIdentity):
        raise PermissionError(f"injection {injection!r} has no spec.workloadIdentity")
    return (None if cluster else namespace), current.credential


def _name(pod: Mapping) -> str:
    return str((pod.get("metadata") or {}).get("name"))


def subject(home: str, account: str) -> str:
    """The ``sub`` claim of the account's tokens: what a provider's trust rule names."""
    return f"system:serviceaccount:{home}:{account}"


def account_manifest(home: str, account: str, namespace: str | None, injection: str) -> dict:
    """The ServiceAccount: no Secret, no token mounted anywhere, labelled as keyhole's."""
    owner = injection if namespace is None else f"{namespace}/{injection}"
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": account, "namespace": home,
                         "labels": {MANAGED_BY_LABEL: MANAGED_BY, COMPONENT_LABEL: COMPONENT},
                         "annotations": {INJECTION_ANNOTATION: owner}},
            "automountServiceAccountToken": False}


def owner_of(account: dict) -> tuple[str | None, str] | None:
    """(namespace or None, injection) an identity account belongs to; None if not keyhole's."""
    meta = account.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(COMPONENT_LABEL) != COMPONENT or labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
        return None
    owner = (meta.get("annotations") or {}).get(INJECTION_ANNOTATION) or ""
    namespace, _, name = owner.rpartition("/")
    return (namespace or None, name) if name else None


def published(discovery: dict | None, home: str, account: str, audience: str) -> dict:
    """``status.workloadIdentity``: what a provider's trust rule needs (issuer, where its keys
    are, the subject and audience keyhole presents). A merge patch: the last exchange the
    channel wrote stays as it is."""
    found = {"serviceAccount": f"{home}/{account}", "subject": subject(home, account),
             "audience": audience}
    if discovery:
        found["issuer"] = str(discovery.get("issuer") or "")
        found["jwksURI"] = str(discovery.get("jwks_uri") or "")
    return found


@dataclass(frozen=True, slots=True)
class Exchange:
    """A sidecar's word on its last exchange: when its credential expires, or the error."""

    injection: str
    expires_at: float | None
    error: str | None

    @classmethod
    def from_json(cls, body: object) -> Exchange:
        """ValueError naming what is wrong."""
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        injection, expires, error = body.get("injection"), body.get("expiresAt"), \
            body.get("error")
        if not isinstance(injection, str) or not injection:
            raise ValueError("'injection' must name the injection")
        if expires is not None and (isinstance(expires, bool) or not isinstance(
                expires, int | float) or not math.isfinite(expires)):
            raise ValueError("'expiresAt' must be epoch seconds, or null")
        if error is not None and not isinstance(error, str):
            raise ValueError("'error' must be a string, or null")
        if (expires is None) == (error is None):
            raise ValueError("give exactly one of 'expiresAt' (it worked) and 'error'")
        text = None if error is None else "".join(
            ch if ch.isprintable() else " " for ch in error)[:MAX_ERROR]
        return cls(injection, None if expires is None else float(expires), text)

    def record(self, pod: str, now: float) -> dict:
        """``status.workloadIdentity.lastExchange``: never a token, only when and what."""
        entry = {"pod": pod, "at": _stamp(now), "ok": self.error is None}
        if self.expires_at is not None:
            entry["expiresAt"] = _stamp(self.expires_at)
        if self.error is not None:
            entry["error"] = self.error
        return entry


def worth_writing(previous: dict | None, new: dict, now: float, written_at: float | None) -> bool:
    """Write a report when the outcome changed, or the last write is old enough."""
    if previous is None or previous.get("ok") != new.get("ok") or \
            previous.get("error") != new.get("error"):
        return True
    return written_at is None or now - written_at >= REPORT_EVERY


def _stamp(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
