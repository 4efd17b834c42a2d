"""Just-in-time access (``AccessGrant``, ``kubectl keyhole grant``): the decisions, pure.

A person creates an AccessGrant naming a pod, Deployment or StatefulSet, an injection and a
time. The operator's webhook stamps who granted it and when, and seals it; the operator then
applies the injection's ``podSelector`` labels to the target — the tag a person would have
set by hand — and removes them when the time is up or the grant is deleted. Revocation then
travels as it does for a removed tag (the pod's routes, the operator channel). Labels the
target had already are never removed: a grant does not end access given some other way.
"""

from __future__ import annotations

from keyhole_common.approvals import seal, sealed
from keyhole_operator.annotations import PREFIX
from keyhole_operator.approvals import seconds, timestamp

GRANTED_BY = PREFIX + "granted-by"
GRANTED_AT = PREFIX + "granted-at"
SEAL = PREFIX + "seal"
PLURAL = "accessgrants"
KINDS = {"Pod": ("", "v1", "pods"), "Deployment": ("apps", "v1", "deployments"),
         "StatefulSet": ("apps", "v1", "statefulsets")}


class Refused(Exception):
    """A grant that cannot be made; the message says why and what to do."""


def _sealed_fields(obj: dict, by: str, at: str) -> dict:
    meta = obj.get("metadata") or {}
    return {"namespace": meta.get("namespace"), "name": meta.get("name"),
            "spec": obj.get("spec") or {}, "by": by, "at": at}


def stamp(obj: dict, user: str, now: float, key: bytes) -> dict[str, str]:
    """The annotations the webhook sets on a new grant: who granted it, when, and the seal."""
    at = timestamp(now)
    return {GRANTED_BY: user, GRANTED_AT: at, SEAL: seal(key, _sealed_fields(obj, user, at))}


def honoured(obj: dict, key: bytes) -> bool:
    """Stamped by the operator's webhook at creation, and unchanged since."""
    notes = (obj.get("metadata") or {}).get("annotations") or {}
    by, at = notes.get(GRANTED_BY), notes.get(GRANTED_AT)
    if not isinstance(by, str) or not isinstance(at, str):
        return False
    return sealed(key, _sealed_fields(obj, by, at), notes.get(SEAL))


def expires(obj: dict) -> float | None:
    notes = (obj.get("metadata") or {}).get("annotations") or {}
    granted = seconds(notes.get(GRANTED_AT))
    length = (obj.get("spec") or {}).get("seconds")
    if granted is None or isinstance(length, bool) or not isinstance(length, int):
        return None
    return granted + length


def access_grant(approval: dict, key: bytes, now: float) -> dict:
    """The AccessGrant an approved ask for access becomes: for the asking pod, the injection
    it named, the time the person gave (or the agent asked for), stamped with who approved."""
    meta, spec = approval.get("metadata") or {}, approval.get("spec") or {}
    decision = (approval.get("status") or {}).get("decision") or {}
    reasons = [f"asked by the agent: {spec['reason']}" if spec.get("reason") else "asked by "
               "the agent", f"approved: {decision['reason']}" if decision.get("reason") else ""]
    obj = {"apiVersion": "keyhole.dev/v1alpha1", "kind": "AccessGrant",
           "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"),
                        "labels": {PREFIX + "approval": str(meta.get("name"))[:63]}},
           "spec": {"target": {"kind": "Pod", "name": (spec.get("pod") or {}).get("name")},
                    "injection": spec.get("injection"),
                    "seconds": int(decision.get("grantSeconds") or spec.get("accessSeconds")
                                   or 3600),
                    "reason": "; ".join(filter(None, reasons))[:1000]}}
    obj["metadata"]["annotations"] = stamp(obj, str(decision.get("decidedBy")), now, key)
    return obj


def selector_labels(injection: dict | None, name: str) -> dict[str, str]:
    """The labels that grant ``injection`` (its podSelector's matchLabels), or Refused."""
    if injection is None:
        raise Refused(f"no SecretInjection or ClusterSecretInjection {name!r} serves this "
                      "namespace")
    selector = (injection.get("spec") or {}).get("podSelector") or {}
    labels = selector.get("matchLabels") or {}
    if not labels or selector.get("matchExpressions"):
        raise Refused(f"the podSelector of injection {name!r} is not plain matchLabels: a "
                      "grant applies exactly those labels, so it needs them (and no "
                      "matchExpressions)")
    return dict(labels)


def target_labels(target: dict, kind: str) -> dict[str, str]:
    """The labels that decide which injections the target's pods get."""
    if kind == "Pod":
        meta = target.get("metadata") or {}
    else:
        meta = (((target.get("spec") or {}).get("template") or {}).get("metadata")) or {}
    return dict(meta.get("labels") or {})


def service_account(target: dict, kind: str) -> str:
    spec = target.get("spec") or {}
    if kind != "Pod":
        spec = (spec.get("template") or {}).get("spec") or {}
    return spec.get("serviceAccountName") or "default"


def to_add(wanted: dict[str, str], current: dict[str, str]) -> dict[str, str]:
    """What the grant adds: the wanted labels the target does not carry already."""
    return {k: v for k, v in wanted.items() if current.get(k) != v}


def to_remove(added: dict[str, str], current: dict[str, str]) -> dict[str, None]:
    """What the end of a grant removes: what it added, where still as it set it."""
    return {k: None for k, v in added.items() if current.get(k) == v}


def label_patch(kind: str, labels: dict[str, str | None]) -> dict:
    """A merge patch setting (or, with None, removing) labels where they select pods: the
    pod's own, or a workload's pod template (a rollout follows)."""
    if kind == "Pod":
        return {"metadata": {"labels": labels}}
    return {"spec": {"template": {"metadata": {"labels": labels}}}}


def status(state: str, obj: dict, message: str, labels: dict[str, str] | None = None) -> dict:
    notes = (obj.get("metadata") or {}).get("annotations") or {}
    found = {"state": state, "message": message[:2000], "grantedBy": notes.get(GRANTED_BY),
             "grantedAt": notes.get(GRANTED_AT)}
    ends = expires(obj)
    if ends is not None:
        found["expiresAt"] = timestamp(ends)
    if labels is not None:
        found["labels"] = labels
    return found
