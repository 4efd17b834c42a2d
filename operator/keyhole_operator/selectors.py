"""Kubernetes label selectors (``matchLabels`` + ``matchExpressions``), matched in memory.

The webhook decides which injections apply to a pod without calling the API server, so the
selector semantics live here, pure and tested.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from keyhole_operator.annotations import INJECT
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


def injections_for_pod(injections: Iterable[Injection], pod: Mapping) -> list[Injection]:
    """The injections that apply to ``pod``: those whose podSelector selects its labels, none
    when it opted out; sorted by name."""
    if opted_out(pod):
        return []
    labels = (pod.get("metadata") or {}).get("labels")
    return sorted((i for i in injections if selector_matches(i.spec.pod_selector, labels)),
                  key=lambda i: i.name)


def opted_out(pod: Mapping) -> bool:
    """``keyhole.dev/inject: "false"`` on the pod turns injection off."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(INJECT, "")).lower() == "false"
