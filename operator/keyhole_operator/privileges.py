"""Which permissions let an agent go around keyhole, and how to ask the API server about them."""

from __future__ import annotations

# (verb, resource, subresource, what it lets the agent do)
BYPASSES = (
    ("get", "secrets", "", "read Secrets"),
    ("list", "secrets", "", "list Secrets"),
    ("create", "pods", "", "create pods"),
    ("create", "pods", "exec", "exec into pods"),
    ("patch", "pods", "", "patch pods"),
)


def service_account_user(namespace: str, name: str | None) -> tuple[str, list[str]]:
    """The user and groups the API server sees for a pod's ServiceAccount."""
    account = name or "default"
    return (f"system:serviceaccount:{namespace}:{account}",
            ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
             "system:authenticated"])


def access_review(namespace: str, user: str, groups: list[str], verb: str, resource: str,
                  subresource: str) -> dict:
    """A SubjectAccessReview body."""
    attributes = {"namespace": namespace, "verb": verb, "resource": resource, "group": ""}
    if subresource:
        attributes["subresource"] = subresource
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": groups, "resourceAttributes": attributes}}
