"""A SecretInjection's status: conditions in the metav1.Condition shape, computed purely."""

from __future__ import annotations

import datetime as dt


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, ok: bool, reason: str, message: str, generation: int | None,
              previous: list[dict] | None) -> dict:
    """A condition; ``lastTransitionTime`` moves only when the status does."""
    status = "True" if ok else "False"
    before = next((c for c in previous or [] if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status else _now()
    return {"type": kind, "status": status, "reason": reason, "message": message[:32000],
            "observedGeneration": generation, "lastTransitionTime": since}


def injection_status(*, generation: int | None, matched: int, restart_required: int,
                     secret_problems: list[str], over_privileged: list[dict],
                     # [{serviceAccount, pods, permissions}]: the ways around keyhole held
                     previous: list[dict] | None) -> dict:
    """The whole ``status`` of one SecretInjection."""
    resolved = not secret_problems
    conditions = [
        condition("SecretResolved", resolved, "Found" if resolved else "Missing",
                  "every referenced Secret key exists" if resolved else "; ".join(secret_problems),
                  generation, previous),
        condition("Ready", resolved, "Ready" if resolved else "SecretMissing",
                  f"serving {matched} pod(s)" if resolved
                  else "selected pods cannot use this injection until the Secret exists",
                  generation, previous),
    ]
    if over_privileged:
        detail = "; ".join(f"ServiceAccount {v['serviceAccount']} (pods {', '.join(v['pods'])}): "
                           f"{', '.join(v['permissions'])}" for v in over_privileged)
        conditions.append(condition(
            "AgentsOverPrivileged", True, "CanBypassKeyhole",
            f"these agents' ServiceAccounts can go around keyhole: {detail}. Remove those "
            "permissions from the agents' ServiceAccounts.", generation, previous))
    else:
        conditions.append(condition("AgentsOverPrivileged", False, "LeastPrivilege",
                                    "no selected pod's ServiceAccount can read Secrets, create "
                                    "pods or workloads, exec, attach, port-forward, debug, "
                                    "mint tokens or bind roles in this namespace",
                                    generation, previous))
    return {"observedGeneration": generation, "matchedPods": matched,
            "restartRequired": restart_required, "canBypass": over_privileged,
            "conditions": conditions}


def cluster_injection_status(*, generation: int | None, namespaces: list[str], matched: int,
                             restart_required: int, secret_problems: list[str],
                             shadowed: list[str], channel: bool,
                             previous: list[dict] | None) -> dict:
    """The whole ``status`` of one ClusterSecretInjection. ``shadowed``: where a namespace's
    own injection wins over it (pods it selects but does not serve)."""
    resolved = not secret_problems
    if not channel:
        ready, reason, message = False, "ChannelOff", (
            "the operator runs without the operator channel (--channel-url), which carries "
            "a cluster injection's values to sidecars: it serves no pod until it is turned on")
    elif not resolved:
        ready, reason, message = False, "SecretMissing", (
            "selected pods cannot use this injection until the Secret exists")
    else:
        ready, reason, message = True, "Ready", (
            f"serving {matched} pod(s) in {len(namespaces)} namespace(s)")
    conditions = [
        condition("SecretResolved", resolved, "Found" if resolved else "Missing",
                  "every referenced Secret key exists in the central namespace" if resolved
                  else "; ".join(secret_problems), generation, previous),
        condition("Ready", ready, reason, message, generation, previous),
        condition("Shadowed", bool(shadowed), "NamespaceInjectionWins" if shadowed else "None",
                  ("a namespace's own SecretInjection wins over this one for its pods: "
                   + "; ".join(shadowed)) if shadowed
                  else "no namespace's own injection clashes with this one",
                  generation, previous),
    ]
    return {"observedGeneration": generation, "matchedNamespaces": len(namespaces),
            "namespaces": sorted(namespaces)[:200], "matchedPods": matched,
            "restartRequired": restart_required, "conditions": conditions}


def exchange_condition(last: dict | None, generation: int | None,
                       previous: list[dict] | None) -> dict | None:
    """``IdentityExchanged`` of a federated injection, from the last exchange a sidecar
    reported (``status.workloadIdentity.lastExchange``); None before any was."""
    if not last:
        return None
    if last.get("ok"):
        return condition("IdentityExchanged", True, "Exchanged",
                         f"pod {last.get('pod')} exchanged its identity at {last.get('at')}; "
                         f"the credential expires at {last.get('expiresAt')}",
                         generation, previous)
    return condition("IdentityExchanged", False, "ExchangeFailed",
                     f"pod {last.get('pod')}'s exchange at {last.get('at')} failed: "
                     f"{last.get('error')}. Requests to the injection's hosts are answered 503 "
                     "until an exchange succeeds; kubectl keyhole explain si shows what the "
                     "provider's trust rule must name", generation, previous)
