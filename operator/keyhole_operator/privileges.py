"""Which permissions let an agent go around keyhole, and how to ask the API server about them.

keyhole's admission checks stop most of these at the door (docs/security.md), but an agent
whose ServiceAccount holds them is one mistake away from the key, and some (reading Secrets,
minting another account's token, binding roles) no admission check can stop. The operator
asks the API server (SubjectAccessReview) for each, per ServiceAccount of the selected pods,
and reports them with their reasons on the injection's status and in an Event.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bypass:
    group: str
    verb: str
    resource: str
    subresource: str
    what: str
    """What the permission lets the agent do, as the report names it."""
    why: str
    """One line: how that reaches around keyhole."""

    def describe(self) -> str:
        return f"{self.what} ({self.why})"


_WORKLOAD = "its pods run with whatever mounts and rights it gives them"

BYPASSES = (
    Bypass("", "get", "secrets", "", "read Secrets", "the key itself, without the proxy"),
    Bypass("", "list", "secrets", "", "list Secrets", "every key of the namespace at once"),
    Bypass("", "create", "pods", "", "create pods",
           "a pod of its own, outside any SecretInjection's rules"),
    Bypass("", "patch", "pods", "", "patch pods", "relabel pods to grant itself injections"),
    Bypass("", "create", "pods", "exec", "exec into pods",
           "run commands in other agents' containers"),
    Bypass("", "create", "pods", "attach", "attach to pods", "drive other agents' processes"),
    Bypass("", "create", "pods", "portforward", "port-forward to pods",
           "reach other pods' ports from outside"),
    Bypass("", "update", "pods", "ephemeralcontainers", "add debug containers",
           "run a container inside another agent's pod"),
    Bypass("", "create", "serviceaccounts", "token", "mint ServiceAccount tokens",
           "act as any account of the namespace, one that reads Secrets included"),
    Bypass("apps", "create", "deployments", "", "create Deployments", _WORKLOAD),
    Bypass("apps", "create", "replicasets", "", "create ReplicaSets", _WORKLOAD),
    Bypass("apps", "create", "statefulsets", "", "create StatefulSets", _WORKLOAD),
    Bypass("apps", "create", "daemonsets", "", "create DaemonSets", _WORKLOAD),
    Bypass("batch", "create", "jobs", "", "create Jobs", _WORKLOAD),
    Bypass("batch", "create", "cronjobs", "", "create CronJobs", _WORKLOAD),
    Bypass("rbac.authorization.k8s.io", "create", "rolebindings", "", "bind roles",
           "grant itself any permission above"),
    Bypass("rbac.authorization.k8s.io", "escalate", "roles", "", "escalate roles",
           "write roles with permissions it does not hold"),
)


def service_account_user(namespace: str, name: str | None) -> tuple[str, list[str]]:
    """The user and groups the API server sees for a pod's ServiceAccount."""
    account = name or "default"
    return (f"system:serviceaccount:{namespace}:{account}",
            ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
             "system:authenticated"])


def access_review(namespace: str, user: str, groups: list[str], bypass: Bypass) -> dict:
    """A SubjectAccessReview body asking whether ``user`` holds ``bypass``."""
    attributes = {"namespace": namespace, "verb": bypass.verb, "resource": bypass.resource,
                  "group": bypass.group}
    if bypass.subresource:
        attributes["subresource"] = bypass.subresource
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": groups, "resourceAttributes": attributes}}
