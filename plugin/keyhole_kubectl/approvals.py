"""``kubectl keyhole approvals``, ``approve`` and ``deny``: what waits for a person, and their
decision. Pure: the rows from the objects :mod:`keyhole_kubectl.cluster` read, and the
decision it writes (docs/approvals.md)."""

from __future__ import annotations

from keyhole_common.approvals import MAX_GRANT_SECONDS
from keyhole_common.spec.parse import parse_duration
from keyhole_operator.approvals import seconds, what


class BadDecision(ValueError):
    """A flag that does not make a decision; the message says what would."""


def state(item: dict, now: float) -> str:
    """Pending, Approved, Denied, or Expired (nobody decided in time; a grant ran out), as a
    person reads the object. The operator honours only what its seals vouch for."""
    decision = (item.get("status") or {}).get("decision") or {}
    verdict = decision.get("verdict")
    if verdict == "Approved" and decision.get("grantSeconds"):
        ends = (seconds(decision.get("decidedAt")) or 0) + decision["grantSeconds"]
        return "Approved" if ends > now else "Expired"
    if verdict:
        return verdict
    expires = seconds((item.get("spec") or {}).get("expiresAt"))
    return "Pending" if expires is not None and expires > now else "Expired"


def _duration(seconds_: float) -> str:
    seconds_ = int(max(seconds_, 0))
    if seconds_ >= 3600:
        return f"{seconds_ // 3600}h{seconds_ % 3600 // 60}m"
    if seconds_ >= 60:
        return f"{seconds_ // 60}m{seconds_ % 60}s"
    return f"{seconds_}s"


def listing(items: list[dict], now: float, every: bool = False) -> list[dict]:
    """What waits (every one, decided and expired too, with ``every``), oldest first."""
    rows = []
    for item in items:
        meta, spec = item.get("metadata") or {}, item.get("spec") or {}
        found = state(item, now)
        if found != "Pending" and not every:
            continue
        decision = (item.get("status") or {}).get("decision") or {}
        created = seconds(meta.get("creationTimestamp")) or now
        expires = seconds(spec.get("expiresAt")) or now
        rows.append({
            "namespace": meta.get("namespace"), "name": meta.get("name"), "state": found,
            "age": _duration(now - created), "pod": (spec.get("pod") or {}).get("name"),
            "injection": spec.get("injection"), "what": what(spec),
            "arguments": spec.get("arguments"),
            "expiresIn": _duration(expires - now) if found == "Pending" else None,
            "decidedBy": decision.get("decidedBy"), "reason": decision.get("reason"),
            "approve": f"kubectl keyhole approve {meta.get('name')} -n {meta.get('namespace')}"})
    return sorted(rows, key=lambda r: (r["namespace"] or "", r["age"]))


TARGET_KINDS = {"pod": "Pod", "po": "Pod", "pods": "Pod", "deployment": "Deployment",
                "deploy": "Deployment", "deployments": "Deployment",
                "statefulset": "StatefulSet", "sts": "StatefulSet",
                "statefulsets": "StatefulSet"}


def access_grant(target: str, injection: str, length: str, reason: str | None,
                 suffix: str) -> dict:
    """The AccessGrant ``kubectl keyhole grant`` creates; the webhook stamps who and when."""
    kind, _, name = target.partition("/")
    if kind.lower() not in TARGET_KINDS or not name:
        raise BadDecision(f"{target!r}: name the target as pod/NAME, deployment/NAME or "
                          "statefulset/NAME")
    found = parse_duration(length)
    if found is None or not 0 < found <= MAX_GRANT_SECONDS:
        raise BadDecision(f"--for {length!r}: give a duration up to 168h, such as 30m or 2h")
    if reason is not None and (len(reason) > 1000 or not reason.isprintable()):
        raise BadDecision("--reason: one printable line of at most 1000 characters")
    spec = {"target": {"kind": TARGET_KINDS[kind.lower()], "name": name},
            "injection": injection, "seconds": int(found)}
    if reason:
        spec["reason"] = reason
    stem = f"{name[:40]}-{injection[:20]}".lower().strip("-.")
    return {"apiVersion": "keyhole.dev/v1alpha1", "kind": "AccessGrant",
            "metadata": {"name": f"{stem}-{suffix}"}, "spec": spec}


def decision(verdict: str, grant: str | None, reason: str | None,
             workload: bool = False) -> dict:
    """The ``status.decision`` a person writes; the operator's webhook checks who they are
    and stamps who decided and when."""
    found: dict = {"verdict": verdict}
    if grant is not None:
        if verdict != "Approved":
            raise BadDecision("--for makes a grant: it goes with approve, not deny")
        length = parse_duration(grant)
        if length is None or not 0 < length <= MAX_GRANT_SECONDS:
            raise BadDecision(f"--for {grant!r}: give a duration up to 168h, such as 30m or 2h")
        found["grantSeconds"] = int(length)
    if workload:
        if grant is None:
            raise BadDecision("--workload widens a grant: give --for too")
        found["scope"] = "workload"
    if reason:
        if len(reason) > 1000 or not reason.isprintable():
            raise BadDecision("--reason: one printable line of at most 1000 characters")
        found["reason"] = reason
    return {"status": {"decision": found}}
