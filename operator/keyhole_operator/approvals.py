"""Approvals: the decisions, pure (docs/approvals.md). The I/O is the channel's (asking, waiting,
withdrawing) and the decision webhook's in ``handlers``.

An ApprovalRequest is written by the operator alone, for the pod whose sidecar asked over the
channel; the operator seals its spec. A person decides by writing ``status.decision`` (the
``status`` subresource, RBAC-guarded) through the operator's webhook, which checks who they
are, stamps who decided and when, and seals the decision. The operator honours an object only
when both seals hold: whoever else may write ApprovalRequests cannot make one it honours.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from keyhole_common.approvals import (
    APPROVED,
    DENIED,
    EXPIRED,
    GROUP,
    KIND,
    MAX_GRANT_SECONDS,
    PENDING,
    PLURAL,
    VERSION,
    Answer,
    Ask,
    seal,
    sealed,
)
from keyhole_operator.annotations import MANAGED_BY, MANAGED_BY_LABEL, PREFIX
from keyhole_operator.privileges import Bypass, access_review, service_account_user

POD_UID_LABEL = PREFIX + "pod-uid"
WORKLOAD_LABEL = PREFIX + "workload"
INJECTION_LABEL = PREFIX + "approval-injection"
SEAL_ANNOTATION = PREFIX + "seal"
MAX_PENDING_PER_POD = 20
"""Approvals one pod may have waiting at once; beyond, its sidecar is refused (429)."""
VERDICTS = {"Approved": APPROVED, "Denied": DENIED}
APPROVE_VERB = "approve"
"""The RBAC verb, on ``approvalrequests``, that lets a person decide (as ``approve`` on
``signers`` lets one approve a CertificateSigningRequest)."""


def timestamp(now: float) -> str:
    return dt.datetime.fromtimestamp(int(now), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def seconds(stamp: object) -> float | None:
    try:
        return dt.datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Pod:
    """The asking pod, as its TokenReview and the API server name it, and its workload (the
    controller that owns it: a ReplicaSet, StatefulSet, Job…; None for a bare pod)."""

    namespace: str
    name: str
    uid: str
    service_account: str
    owner: tuple[str, str] | None = None

    @property
    def workload(self) -> str | None:
        """A label value naming the workload (its kind and name hashed: a name may be
        longer than a label value)."""
        if self.owner is None:
            return None
        return hashlib.sha256("/".join(self.owner).encode()).hexdigest()[:32]


def owner_of(pod: dict | None) -> tuple[str, str] | None:
    """The pod's controller (kind, name), from its ownerReferences."""
    for ref in ((pod or {}).get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") and ref.get("name"):
            return str(ref["kind"]), str(ref["name"])
    return None


def manifest(pod: Pod, ask: Ask, key: bytes, now: float) -> dict:
    """The ApprovalRequest the operator creates for ``ask``, sealed, owned by the pod (deleted
    with it)."""
    what = ask.what
    owner = {} if pod.owner is None else {"owner": {"kind": pod.owner[0],
                                                    "name": pod.owner[1]}}
    spec = {"kind": what["kind"], "injection": ask.injection, "digest": ask.digest,
            "pod": {"name": pod.name, "uid": pod.uid, "serviceAccount": pod.service_account,
                    **owner},
            "host": str(what.get("host", ""))[:253], "method": str(what.get("method", ""))[:32],
            "path": str(what.get("path", ""))[:2048],
            "timeoutSeconds": int(ask.timeout), "requestedAt": timestamp(now),
            "expiresAt": timestamp(now + ask.timeout)}
    for field in ("subject", "arguments"):
        if what.get(field) is not None:
            spec[field] = str(what[field])[:4096]
    if what["kind"] == "access":  # an agent's ask: for how long, and why (its own words)
        spec["accessSeconds"] = int(what["seconds"])
        if what.get("reason"):
            spec["reason"] = str(what["reason"])[:1000]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"generateName": f"{pod.name[:40]}-", "namespace": pod.namespace,
                         "labels": {POD_UID_LABEL: pod.uid, MANAGED_BY_LABEL: MANAGED_BY,
                                    INJECTION_LABEL: ask.injection[:63],
                                    **({WORKLOAD_LABEL: pod.workload} if pod.workload
                                       else {})},
                         "annotations": {SEAL_ANNOTATION: seal(key, spec)},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Pod",
                                              "name": pod.name, "uid": pod.uid}]},
            "spec": spec}


def what(spec: dict) -> str:
    """One line a person reads: what the held request would do (the plugin's WHAT column,
    Events, notifications)."""
    if spec.get("kind") == "access":
        return (f"access to injection {spec.get('injection')} for {spec.get('accessSeconds')}s"
                + (f": {spec['reason']}" if spec.get("reason") else ""))
    where = f"{spec.get('method', '')} {spec.get('host', '')}{spec.get('path', '')}"
    if spec.get("kind") in ("tool", "resource", "prompt"):
        return f"{spec['kind']} {spec.get('subject')} ({where})"
    return where


def honoured(obj: dict, key: bytes) -> bool:
    """The object's spec is as the operator wrote it."""
    meta = obj.get("metadata") or {}
    return sealed(key, obj.get("spec") or {}, (meta.get("annotations") or {}).get(
        SEAL_ANNOTATION))


def _decision_fields(obj: dict, decision: dict) -> dict:
    meta = obj.get("metadata") or {}
    return {"uid": meta.get("uid"), "name": meta.get("name"),
            "digest": (obj.get("spec") or {}).get("digest"),
            **{k: decision.get(k) for k in ("verdict", "grantSeconds", "decidedBy",
                                            "decidedAt", "reason", "scope")}}


def seal_decision(obj: dict, decision: dict, key: bytes) -> str:
    return seal(key, _decision_fields(obj, decision))


def state(obj: dict, key: bytes, now: float) -> Answer:
    """What an honoured object says now: approved (with the grant's seconds left), denied,
    pending, or expired (nobody decided in time; a grant that ran out). A decision without
    the webhook's seal is no decision."""
    spec, name = obj.get("spec") or {}, (obj.get("metadata") or {}).get("name", "")
    decision = (obj.get("status") or {}).get("decision") or {}
    verdict = VERDICTS.get(decision.get("verdict"))
    if verdict is not None and sealed(key, _decision_fields(obj, decision),
                                      decision.get("seal")):
        by, reason = decision.get("decidedBy"), decision.get("reason")
        if verdict == DENIED:
            return Answer(name, DENIED, by, reason)
        grant = float(decision.get("grantSeconds") or 0)
        if grant:
            left = (seconds(decision.get("decidedAt")) or 0) + grant - now
            if left <= 0:
                return Answer(name, EXPIRED, by, reason)
            return Answer(name, APPROVED, by, reason, grant_seconds=left)
        return Answer(name, APPROVED, by, reason)
    expires = seconds(spec.get("expiresAt"))
    if expires is None or expires <= now:
        return Answer(name, EXPIRED)
    return Answer(name, PENDING)


def collectable(obj: dict, now: float, keep: float) -> bool:
    """Whether an ApprovalRequest has been over for ``keep`` seconds: decided (and its grant
    ended), or never decided and past its timeout. Its outcome stays in the Events and the
    sidecar's audit log."""
    spec = obj.get("spec") or {}
    decision = (obj.get("status") or {}).get("decision") or {}
    if decision.get("verdict"):
        decided = seconds(decision.get("decidedAt"))
        grant = decision.get("grantSeconds") or 0
        ended = None if decided is None else decided + (grant if isinstance(grant, int) else 0)
    else:
        ended = seconds(spec.get("expiresAt"))
    if ended is None:  # not an object keyhole wrote: its creation time decides
        ended = seconds((obj.get("metadata") or {}).get("creationTimestamp"))
    return ended is not None and ended + keep <= now


def _workload_grant(obj: dict, owner: tuple[str, str] | None) -> bool:
    """A grant its approver gave the asking pod's whole workload (``approve --workload``)."""
    pod = (obj.get("spec") or {}).get("pod") or {}
    decision = (obj.get("status") or {}).get("decision") or {}
    return owner is not None and decision.get("scope") == "workload" and (
        (pod.get("owner") or {}).get("kind"), (pod.get("owner") or {}).get("name")) == owner


def look(objects: list[dict], pod_uid: str, ask: Ask, key: bytes, now: float,
         owner: tuple[str, str] | None = None) -> tuple[Answer | None, int]:
    """What the pod's approvals say of ``ask``, and how many of them wait.

    Named (a sidecar asking again): that object's state, if it is the pod's, for this request.
    Otherwise a grant alive for this exact request — the pod's own, or one given to its
    workload (``owner``) — else one still waiting for it (asked again: one person's yes
    serves them both); None when there is neither (create one)."""
    honest = [o for o in objects if honoured(o, key)]
    mine = [o for o in honest if ((o["spec"].get("pod") or {}).get("uid")) == pod_uid]
    shared = [o for o in honest if o not in mine and _workload_grant(o, owner)]
    states = [(o, state(o, key, now)) for o in mine]
    waiting = sum(1 for _, s in states if s.state == PENDING)
    same = [(o, s) for o, s in states if o["spec"].get("digest") == ask.digest
            and o["spec"].get("injection") == ask.injection]
    if ask.name is not None:
        named = [s for o, s in same if o["metadata"].get("name") == ask.name]
        return (named[0] if named else None), waiting
    same += [(o, s) for o in shared if o["spec"].get("digest") == ask.digest
             and o["spec"].get("injection") == ask.injection
             for s in [state(o, key, now)]]
    for wanted in (lambda s: s.state == APPROVED and s.grant_seconds > 0,
                   lambda s: s.state == PENDING):
        for obj, found in same:
            if wanted(found) and (found.state == APPROVED or obj in mine):
                return found, waiting
    return None, waiting


# -- the decision webhook ----------------------------------------------------------------------

class Refused(Exception):
    """A decision the webhook refuses: the message says why and what to do."""


def decision_of(obj: dict | None) -> dict:
    return dict(((obj or {}).get("status") or {}).get("decision") or {})


def check_decision(old: dict, new: dict, user: str, key: bytes, now: float) -> dict | None:
    """The decision ``user`` writes, checked and stamped (who, when, the seal); None when the
    update writes no new decision. Refused: the object is not keyhole's, already decided,
    past its time, decided by the pod's own ServiceAccount, or malformed."""
    before, after = decision_of(old), decision_of(new)
    if after == before:
        return None
    if not honoured(old, key):
        raise Refused("this ApprovalRequest was not written by keyhole's operator: keyhole "
                      "honours no decision on it")
    if before.get("verdict"):
        raise Refused(f"already {before['verdict'].lower()} by {before.get('decidedBy')}: a "
                      "decision is final (a new request asks again)")
    verdict = after.get("verdict")
    if verdict not in VERDICTS:
        raise Refused("status.decision.verdict must be Approved or Denied (use kubectl "
                      "keyhole approve or deny)")
    spec = old.get("spec") or {}
    expires = seconds(spec.get("expiresAt"))
    if expires is None or expires <= now:
        raise Refused("this request waited past its timeout and was refused; the agent must "
                      "ask again")
    grant = after.get("grantSeconds", 0)
    if isinstance(grant, bool) or not isinstance(grant, int) or not 0 <= grant <= \
            MAX_GRANT_SECONDS or (grant and verdict != "Approved"):
        raise Refused(f"status.decision.grantSeconds must be whole seconds from 0 to "
                      f"{MAX_GRANT_SECONDS} (7 days), and only with Approved")
    scope = after.get("scope", "pod")
    if scope not in ("pod", "workload") or (scope == "workload" and not grant):
        raise Refused("status.decision.scope is pod or workload, and workload goes with a "
                      "grant (--for)")
    if scope == "workload" and not ((spec.get("pod") or {}).get("owner")):
        raise Refused("the pod that asked belongs to no workload (no controller owns it): "
                      "approve it for the pod alone")
    reason = after.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 1000
                               or not reason.isprintable()):
        raise Refused("status.decision.reason must be one printable line of at most 1000 "
                      "characters")
    pod = spec.get("pod") or {}
    agent, _ = service_account_user((old.get("metadata") or {}).get("namespace", ""),
                                    pod.get("serviceAccount"))
    if user == agent:
        raise Refused(f"{user} is the ServiceAccount of the pod that asked: an agent never "
                      "approves its own requests")
    stamped = {"verdict": verdict, "grantSeconds": grant, "decidedBy": user,
               "decidedAt": timestamp(now)}
    if scope == "workload":
        stamped["scope"] = "workload"
    if reason:
        stamped["reason"] = reason
    stamped["seal"] = seal_decision(old, stamped, key)
    return stamped


def may_decide(namespace: str, name: str, user: str, groups: list[str]) -> dict:
    """The SubjectAccessReview asking whether ``user`` holds the ``approve`` verb on this
    ApprovalRequest."""
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": groups, "resourceAttributes": {
                "namespace": namespace, "verb": APPROVE_VERB, "group": GROUP,
                "resource": PLURAL, "name": name}}}


def acting_as(namespace: str, service_account: str, decider: str, decider_groups: list[str]
              ) -> list[tuple[str, dict]]:
    """The ways the asking pod's ServiceAccount could act as ``decider``, each with the
    SubjectAccessReview that asks whether it may: impersonate them (or one of their groups);
    and, when the decider is a ServiceAccount, mint its token, read its namespace's Secrets
    (a legacy token), or run a pod in its namespace (with it)."""
    agent, groups = service_account_user(namespace, service_account)
    found = [(f"impersonate {decider}", _review(agent, groups, "", "impersonate", "users",
                                                "", "", decider))]
    found += [(f"impersonate group {g}", _review(agent, groups, "", "impersonate", "groups",
                                                 "", "", g))
              for g in decider_groups if g not in ("system:authenticated",)]
    parts = decider.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        home, account = parts[2], parts[3]
        found += [
            (f"impersonate ServiceAccount {home}/{account}",
             _review(agent, groups, home, "impersonate", "serviceaccounts", "", "", account)),
            (f"mint tokens of {home}/{account}",
             _review(agent, groups, home, "create", "serviceaccounts", "token", "", account)),
            (f"read Secrets of namespace {home}",
             _review(agent, groups, home, "get", "secrets", "", "", "")),
            (f"create pods in namespace {home}",
             _review(agent, groups, home, "create", "pods", "", "", ""))]
    return found


def _review(user: str, groups: list[str], namespace: str, verb: str, resource: str,
            subresource: str, group: str, name: str) -> dict:
    review = access_review(namespace, user, groups, Bypass(group, verb, resource, subresource,
                                                           "", ""))
    if name:
        review["spec"]["resourceAttributes"]["name"] = name
    return review
