"""Kubernetes label selectors (``matchLabels`` + ``matchExpressions``), matched in memory, and
which injections serve a pod.

The webhook decides which injections apply to a pod without calling the API server for each
selector, so the selector semantics live here, pure and tested.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from keyhole_common.spec import SecretInjection
from keyhole_common.spec.parse import find_conflicts
from keyhole_operator.annotations import CLUSTER_INJECTIONS_LABEL, INJECT
from keyhole_operator.routes import Injection


def selector_matches(selector: Mapping | None, labels: Mapping[str, str] | None) -> bool:
    """Kubernetes semantics: every matchLabels pair and every expression must hold.

    ``{}`` matches every pod (as in NetworkPolicy); a missing selector matches none.
    """
    if selector is None:
        return False
    labels = labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key"), expression.get("operator")
        values = expression.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False  # unknown operators match nothing: fail closed
    return True


def namespace_served(injection: SecretInjection, namespace_labels: Mapping[str, str] | None
                     ) -> bool:
    """Whether a cluster injection serves a namespace with these labels: its
    namespaceSelector matches and the cluster admin has not excluded the namespace
    (``keyhole.dev/cluster-injections: disabled``). Unknown labels (None) serve nothing."""
    if namespace_labels is None:
        return False
    if namespace_labels.get(CLUSTER_INJECTIONS_LABEL) == "disabled":
        return False
    return injection.cluster and selector_matches(injection.namespace_selector,
                                                  namespace_labels)


@dataclass(frozen=True)
class Shadowed:
    """A cluster injection set aside for a pod because a namespaced one conflicts with it."""

    cluster: str
    namespaced: str
    why: str


def clashes(namespaced: Injection, cluster: Injection) -> str | None:
    """Why a namespace's injection and a cluster one cannot both serve a pod: one name (the
    sidecar's routes and base-URL paths are by name), or one header or parameter for an
    overlapping host. None when they can."""
    if namespaced.name == cluster.name:
        return "both are named " + repr(cluster.name)
    conflicts = find_conflicts([namespaced.spec, cluster.spec])
    return conflicts[0].message if conflicts else None


def choose(candidates: Iterable[Injection], pod: Mapping,
           namespace_labels: Mapping[str, str] | None = None
           ) -> tuple[list[Injection], list[Shadowed]]:
    """The injections that serve ``pod`` (sorted by name) and the cluster ones set aside.

    Namespaced injections serve the pods of their namespace their podSelector selects; cluster
    injections those of the namespaces they serve. Where a namespace's own injection and a
    cluster one clash, the namespace's own wins for its pods: it is the more specific
    statement, made by the people who run the agent (the validating webhooks refuse the clash
    at apply time; this decides what runs when a relabelled namespace creates one later). A
    pod that opted out gets none."""
    if opted_out(pod):
        return [], []
    labels = (pod.get("metadata") or {}).get("labels")
    namespaced, cluster = [], []
    for injection in candidates:
        if not selector_matches(injection.spec.pod_selector, labels):
            continue
        if not injection.spec.cluster:
            namespaced.append(injection)
        elif namespace_served(injection.spec, namespace_labels):
            cluster.append(injection)
    chosen, shadowed = list(namespaced), []
    for candidate in cluster:
        clash = next(((own, why) for own in namespaced if (why := clashes(own, candidate))),
                     None)
        if clash:
            shadowed.append(Shadowed(candidate.name, clash[0].name, clash[1]))
        else:
            chosen.append(candidate)
    return sorted(chosen, key=lambda i: i.name), shadowed


def injections_for_pod(injections: Iterable[Injection], pod: Mapping,
                       namespace_labels: Mapping[str, str] | None = None) -> list[Injection]:
    """The injections that apply to ``pod``, sorted by name (see ``choose``)."""
    return choose(injections, pod, namespace_labels)[0]


def opted_out(pod: Mapping) -> bool:
    """``keyhole.dev/inject: "false"`` on the pod turns injection off."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(INJECT, "")).lower() == "false"
