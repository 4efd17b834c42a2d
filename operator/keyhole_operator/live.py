"""Live grant and revoke: what a running pod's routes annotation should say now.

Revocation always applies live (the sidecar drops the route within seconds). A grant applies
live only when the pod already mounts every Secret it needs (a cluster injection's: when its
sidecar talks to the operator channel, which carries the values); otherwise the pod needs a
restart, which the operator says on the pod and counts on the injection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from keyhole_operator.annotations import INJECTIONS, RESTART_REQUIRED, STATUS
from keyhole_operator.routes import Injection, signed_routes
from keyhole_operator.selectors import Shadowed, choose


@dataclass(frozen=True)
class PodPlan:
    annotations: dict[str, str | None]
    """Annotation changes to patch (None deletes); empty when the pod is as it should be."""
    granted: tuple[str, ...]
    restart_for: tuple[str, ...]
    """Injections selecting the pod that it cannot use until it restarts."""
    shadowed: tuple[Shadowed, ...] = ()
    """Cluster injections set aside for the pod because its namespace's own one clashes."""


def injected(pod: dict) -> dict | None:
    """The pod's keyhole status, or None when it has no sidecar."""
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(STATUS)
    try:
        status = json.loads(raw) if raw else None
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def usable(injection: Injection, status: dict | None) -> bool:
    """Whether a pod injected as ``status`` says can serve ``injection`` without a restart."""
    if status is None:
        return False
    if injection.spec.cluster:
        return bool(status.get("channel"))
    mounted = set(status.get("secrets") or [])
    return {r.name for r in injection.spec.secret_refs()} <= mounted


def plan_pod(pod: dict, injections: list[Injection], key: bytes,
             namespace_labels: dict | None = None) -> PodPlan:
    """``injections``: the pod's namespace's and the cluster's; ``namespace_labels``: its
    namespace's labels (None: unknown, and no cluster injection serves it)."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    chosen, shadowed = choose(injections, pod, namespace_labels)
    status = injected(pod)
    granted = [i for i in chosen if usable(i, status)]
    restart_for = tuple(i.name for i in chosen if i not in granted)
    changes: dict[str, str | None] = {}
    if status is not None:
        routes = signed_routes(granted, meta.get("namespace") or "", key)
        if annotations.get(INJECTIONS) != routes:
            changes[INJECTIONS] = routes
    wanted_restart = ",".join(restart_for) or None
    if annotations.get(RESTART_REQUIRED) != wanted_restart:
        changes[RESTART_REQUIRED] = wanted_restart
    return PodPlan(changes, tuple(i.name for i in granted), restart_for, tuple(shadowed))

