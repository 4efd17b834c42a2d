"""Injecting the sidecar into one pod: the stages are named, and each is pure.

should refuse? → sidecar container → sidecar volumes → agent containers' env and trust mount
→ annotations (signed routes, status) → warnings.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass

from keyhole_common.spec import normalise_hostname
from keyhole_common.spec.parse import find_conflicts
from keyhole_operator import layout
from keyhole_operator.annotations import (
    CAPTURE_CONTAINER,
    INJECTIONS,
    POD_SECURITY_LABEL,
    SIDECAR_CONTAINER,
    STATUS,
)
from keyhole_operator.guard import Protected, agent_containers, pod_refusal
from keyhole_operator.live import injected
from keyhole_operator.mutation.env import PLACEHOLDER_VALUE, plan_env
from keyhole_operator.mutation.sidecar_container import (
    capture_container,
    secret_keys,
    sidecar_container,
    sidecar_volumes,
    trust_volume,
    wants_transparent,
)
from keyhole_operator.routes import Injection, signed_routes
from keyhole_operator.settings import Settings


class Refused(Exception):
    """The pod must not be admitted as it is; the message says what to change."""


@dataclass(frozen=True)
class Mutation:
    pod: dict
    warnings: tuple[str, ...] = ()


def _fix(injections: list[Injection]) -> str:
    names = ", ".join(i.name for i in injections)
    return f"or remove the labels that select it for keyhole injection ({names})"


def _agent_env(injections: list[Injection], settings: Settings
               ) -> tuple[list[tuple[str, str, str]], list[str]]:
    entries: list[tuple[str, str, str]] = []
    warnings: list[str] = []
    seen: dict[str, str] = {}
    for injection in injections:
        for item in injection.spec.agent_env:
            if item.placeholder:
                value = PLACEHOLDER_VALUE
            else:
                value = f"http://127.0.0.1:{settings.proxy_port}/{injection.name}{item.base_url}"
            if item.name in seen:
                warnings.append(f"{item.name} is set by injections {seen[item.name]!r} and "
                                f"{injection.name!r}; {seen[item.name]!r} wins (sorted by name)")
                continue
            seen[item.name] = injection.name
            entries.append((item.name, value, injection.name))
    return entries, warnings


def _put_volumes(spec: dict, volumes: list[dict]) -> None:
    existing = spec.setdefault("volumes", [])
    by_name = {v.get("name"): i for i, v in enumerate(existing)}
    for volume in volumes:
        if volume["name"] in by_name:
            existing[by_name[volume["name"]]] = volume
        else:
            existing.append(volume)


def _volume_collisions(pod: dict, wanted: list[dict]) -> str | None:
    """A volume with one of our names that we did not put there (i.e. not in our status)."""
    previous = (injected(pod) or {}).get("volumes", [])
    names = {v["name"] for v in wanted}
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        if volume.get("name") in names and volume.get("name") not in previous:
            return (f"the pod already has a volume named {volume.get('name')!r}, a name keyhole "
                    f"uses; rename that volume (names starting with {layout.VOLUME_PREFIX!r} are "
                    "reserved) so the sidecar can be injected.")
    return None




def _no_proxy_warnings(injections: list[Injection]) -> list[str]:
    warnings = []
    for injection in injections:
        for host in injection.spec.hosts:
            name = normalise_hostname(host.name)
            if name.endswith((".svc", ".cluster.local")):
                warnings.append(f"injection {injection.name!r} routes {host}, but NO_PROXY always "
                                "holds .svc and .cluster.local so clients go to it directly; use "
                                f"base-URL mode (http://127.0.0.1:15080/{injection.name}/...)")
    return warnings


def mutate(pod: dict, injections: list[Injection], settings: Settings, key: bytes,
           pod_security: str | None = None, managed_secrets: Iterable[str] = ()) -> Mutation:
    """The pod with the keyhole sidecar and agent configuration for ``injections``.

    ``injections`` are those whose podSelector matches the pod; ``key`` is the namespace's
    routes signing key; ``pod_security`` the Pod Security level its namespace enforces (only
    read for transparent capture); ``managed_secrets`` the Secrets every injection of the
    namespace uses (no agent may read those either). Raises :class:`Refused` for pods that
    must not run with the sidecar. Pure and idempotent: ``mutate(mutate(p).pod) == mutate(p)``.
    """
    if not injections:
        return Mutation(pod)
    injections = sorted(injections, key=lambda i: i.name)
    transparent = wants_transparent(injections, settings)
    # The sidecar's own rule for injections that would fight over a header (one source).
    conflicts = find_conflicts([i.spec for i in injections])
    problem = None
    if conflicts:
        problem = (f"the injections that select this pod conflict: {conflicts[0].message} "
                   "(the sidecar would refuse these routes). Change one injection's hosts or "
                   f"podSelector, {_fix(injections)}.")
    elif transparent and pod_security in ("baseline", "restricted"):
        namespace = (pod.get("metadata") or {}).get("namespace") or ""
        asking = [i.name for i in injections if (i.spec.capture or settings.capture) == "transparent"]
        problem = (f"transparent capture needs NET_ADMIN and NET_RAW in keyhole's init "
                   f"container, and namespace {namespace} enforces Pod Security "
                   f"{pod_security!r}, which forbids them (the pod would be refused). Label the "
                   f"namespace {POD_SECURITY_LABEL}=privileged, or set capture: proxy on "
                   f"{', '.join(asking)}.")
    volumes = [*sidecar_volumes(injections, settings), trust_volume()]
    problem = problem or _volume_collisions(pod, volumes)
    if problem:
        raise Refused(problem)

    pod = copy.deepcopy(pod)
    spec = pod.setdefault("spec", {})
    warnings = _no_proxy_warnings(injections)

    # The sidecar: first init container when native (so later init containers can use it).
    sidecar = sidecar_container(injections, settings)
    for field in ("initContainers", "containers"):
        spec[field] = [c for c in spec.get(field) or []
                       if c.get("name") not in (SIDECAR_CONTAINER, CAPTURE_CONTAINER)]
    if settings.native_sidecar:
        spec["initContainers"].insert(0, sidecar)
    else:
        spec["containers"].append(sidecar)
    if transparent:  # first of all: the rules are in place before anything else runs
        spec["initContainers"].insert(0, capture_container(settings))
    if not spec["initContainers"]:
        del spec["initContainers"]
    _put_volumes(spec, volumes)

    # Every other container (init included, ephemeral left alone): env and the trust bundle.
    agent_env, env_warnings = _agent_env(injections, settings)
    warnings += env_warnings
    trust_mount = {"name": layout.TRUST_VOLUME, "mountPath": layout.TRUST_DIR, "readOnly": True}
    for container in agent_containers(spec):
        plan = plan_env(container, settings, agent_env)
        container["env"] = plan.env
        warnings += plan.warnings
        mounts = container.setdefault("volumeMounts", [])
        if not any(m.get("name") == layout.TRUST_VOLUME for m in mounts):
            mounts.append(dict(trust_mount))
    # Judged on the pod as it will run: keyhole's volumes are there now (an agent that names
    # one in a mount is caught in this one call), and variables the agentEnv replaced are gone.
    protected = Protected.of([*secret_keys(injections), *managed_secrets],
                             [v["name"] for v in volumes])
    problem = pod_refusal(spec, protected, settings, _fix(injections))
    if problem:
        raise Refused(problem)

    namespace = (pod.get("metadata") or {}).get("namespace") or ""
    annotations = pod.setdefault("metadata", {}).setdefault("annotations", {})
    annotations[INJECTIONS] = signed_routes(injections, namespace, key)
    annotations[STATUS] = json.dumps({
        "version": 1,
        "injections": [i.name for i in injections],
        "secrets": sorted(secret_keys(injections)),
        "volumes": sorted(v["name"] for v in volumes),
        "sidecar": "native" if settings.native_sidecar else "container",
        "capture": "transparent" if transparent else "proxy",
        "channel": bool(settings.channel_url),
        "image": settings.sidecar_image,
    }, sort_keys=True, separators=(",", ":"))
    return Mutation(pod, tuple(dict.fromkeys(warnings)))
