"""Live grant and revoke: what a running pod's routes annotation should say now.

Revocation always applies live (the sidecar drops the route within seconds). A grant applies
live only when the pod already mounts every Secret it needs; otherwise the pod needs a restart,
which the operator says on the pod and counts on the SecretInjection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from keyhole_operator.annotations import INJECTIONS, RESTART_REQUIRED, STATUS
from keyhole_operator.routes import Injection, signed_routes
from keyhole_operator.selectors import injections_for_pod


@dataclass(frozen=True)
class PodPlan:
    annotations: dict[str, str | None]
    """Annotation changes to patch (None deletes); empty when the pod is as it should be."""
    granted: tuple[str, ...]
    restart_for: tuple[str, ...]
    """Injections selecting the pod that it cannot use until it restarts."""


def injected(pod: dict) -> dict | None:
    """The pod's keyhole status, or None when it has no sidecar."""
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(STATUS)
    try:
        status = json.loads(raw) if raw else None
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def plan_pod(pod: dict, injections: list[Injection], key: bytes) -> PodPlan:
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    chosen = injections_for_pod(injections, pod)
    status = injected(pod)
    mounted = set((status or {}).get("secrets") or [])
    granted = [i for i in chosen
               if status is not None and {r.name for r in i.spec.secret_refs()} <= mounted]
    restart_for = tuple(i.name for i in chosen if i not in granted)
    changes: dict[str, str | None] = {}
    if status is not None:
        routes = signed_routes(granted, meta.get("namespace") or "", key)
        if annotations.get(INJECTIONS) != routes:
            changes[INJECTIONS] = routes
    wanted_restart = ",".join(restart_for) or None
    if annotations.get(RESTART_REQUIRED) != wanted_restart:
        changes[RESTART_REQUIRED] = wanted_restart
    return PodPlan(changes, tuple(i.name for i in granted), restart_for)

