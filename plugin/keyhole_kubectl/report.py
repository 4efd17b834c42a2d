"""The plugin's answers, as pure functions of what :mod:`keyhole_kubectl.cluster` read.

Each answer is plain data (what ``-o json|yaml`` prints); :mod:`keyhole_kubectl.cli` turns it
into tables. The operator's own decision code (selectors, the webhook's record on the pod) is
reused, so the plugin and the operator cannot disagree on which injection selects a pod.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from cryptography import x509

from keyhole_kubectl.snapshot import Namespace
from keyhole_operator.annotations import INJECTIONS, RESTART_REQUIRED, SIDECAR_CONTAINER
from keyhole_operator.live import injected
from keyhole_operator.routes import Injection
from keyhole_operator.selectors import opted_out, selector_matches


class NotFound(LookupError):
    """What the user named does not exist; the message says what does."""


# -- reading the objects -----------------------------------------------------------------------

def _meta(obj: dict) -> dict:
    return obj.get("metadata") or {}


def _conditions(injection: dict) -> dict[str, dict]:
    return {c.get("type"): c for c in (injection.get("status") or {}).get("conditions") or []}


def _parsed(injection: dict) -> Injection | None:
    try:
        return Injection.from_object(injection)
    except ValueError:
        return None  # the validating webhook refuses these; shown as not parseable


def routes_of(pod: dict) -> list[str]:
    """The injections the pod's sidecar is told to serve (the signed routes annotation)."""
    raw = (_meta(pod).get("annotations") or {}).get(INJECTIONS)
    try:
        document = json.loads(raw) if raw else {}
    except ValueError:
        return []
    return [(_meta(item).get("name") or "") for item in document.get("items") or []]


def restart_for(pod: dict) -> list[str]:
    raw = (_meta(pod).get("annotations") or {}).get(RESTART_REQUIRED) or ""
    return [name for name in raw.split(",") if name]


def sidecar_state(pod: dict) -> dict:
    """The keyhole-proxy container as the kubelet last reported it."""
    spec = pod.get("spec") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    present = any(c.get("name") == SIDECAR_CONTAINER for c in containers)
    status = pod.get("status") or {}
    statuses = [*(status.get("initContainerStatuses") or []),
                *(status.get("containerStatuses") or [])]
    mine = next((s for s in statuses if s.get("name") == SIDECAR_CONTAINER), None)
    state: dict = {"present": present, "ready": None, "restarts": None, "state": None,
                   "lastTermination": None}
    if mine is not None:
        state["ready"] = bool(mine.get("ready"))
        state["restarts"] = mine.get("restartCount", 0)
        current = mine.get("state") or {}
        state["state"] = next(iter(current), None)
        waiting = current.get("waiting") or {}
        if waiting.get("reason"):
            state["state"] = f"waiting: {waiting['reason']}"
        last = (mine.get("lastState") or {}).get("terminated")
        if last:
            state["lastTermination"] = {"exitCode": last.get("exitCode"),
                                        "reason": last.get("reason"),
                                        "message": (last.get("message") or "").strip() or None}
    return state


def _needs(selector: dict | None) -> str:
    labels = (selector or {}).get("matchLabels") or {}
    shown = ", ".join(f"{k}={v}" for k, v in labels.items())
    if (selector or {}).get("matchExpressions"):
        shown = (shown + " and " if shown else "") + "its matchExpressions"
    return shown or "its podSelector"


# -- explain pod -------------------------------------------------------------------------------

def _rules_summary(parsed: Injection | None) -> str | None:
    if parsed is None or parsed.spec.rules is None:
        return None
    allowed = []
    for rule in parsed.spec.rules:
        methods = ",".join(sorted(rule.methods)) if rule.methods else "any method"
        paths = " ".join(rule.paths) if rule.paths else "any path"
        allowed.append(f"{methods} {paths}")
    return "; ".join(allowed)


@dataclass(frozen=True)
class PodFacts:
    """What a pod says of keyhole, read from it once however many injections ask."""

    pod: dict
    sidecar: dict
    routes: tuple[str, ...]
    restart: tuple[str, ...]


def pod_facts(pod: dict) -> PodFacts:
    return PodFacts(pod, sidecar_state(pod), tuple(routes_of(pod)), tuple(restart_for(pod)))


def explain_injection(raw: dict, parsed: Injection | None, facts: PodFacts) -> dict:
    """Does this injection (``parsed`` from ``raw``, None if it does not parse) apply to this
    pod, does the pod have it, and if not, why not."""
    pod, sidecar = facts.pod, facts.sidecar
    name = _meta(raw).get("name", "")
    selector = (raw.get("spec") or {}).get("podSelector")
    selects = not opted_out(pod) and selector_matches(selector, _meta(pod).get("labels"))
    has = name in facts.routes
    restart = name in facts.restart
    resolved = _conditions(raw).get("SecretResolved") or {}
    rules = _rules_summary(parsed)
    if parsed is None:
        verdict, why = "refused", "the injection does not parse; kubectl describe si " + name
    elif not selects and has:
        verdict, why = "revoking", "no longer selected: the operator is removing it"
    elif not selects:
        verdict = "not selected"
        why = ('the pod opted out (keyhole.dev/inject: "false")' if opted_out(pod)
               else f"the pod lacks the label(s) {_needs(selector)}")
    elif has and resolved.get("status") == "False":
        verdict = "refused"
        why = (f"its Secret is missing ({resolved.get('message')}): requests to its hosts are "
               "answered 503 secret_unavailable")
    elif has:
        verdict = "has key"
        why = (f"only {rules} is allowed; other requests get 403 (rule)" if rules
               else "every method and path")
    elif not sidecar["present"]:
        verdict = "no sidecar"
        why = ("the pod has no keyhole sidecar: it was created before the injection was "
               "observed, or the webhook skipped it; recreate it (kubectl rollout restart, or "
               "delete the pod)")
    elif restart:
        verdict = "needs restart"
        why = ("it needs a Secret this pod does not mount (Secrets are mounted at creation); "
               "restart the pod: kubectl rollout restart")
    else:
        verdict = "pending"
        why = "selected but not yet delivered: is the operator running? (kubectl keyhole status)"
    hosts = [str(h) for h in parsed.spec.hosts] if parsed is not None else []
    mcp = parsed.spec.mcp.describe() if parsed is not None and parsed.spec.mcp else None
    if has and mcp:
        why += "; MCP " + "; ".join(mcp)
    return {"injection": name, "hosts": hosts, "selects": selects, "has": has,
            "needsRestart": restart, "verdict": verdict, "why": why, "mcp": mcp}


def explain_pod(space: Namespace, pod_name: str) -> dict:
    pod = next((p for p in space.pods if _meta(p).get("name") == pod_name), None)
    if pod is None:
        raise NotFound(f"pod {pod_name!r} not found in namespace {space.name!r}")
    facts = pod_facts(pod)
    record = injected(pod)
    return {
        "pod": pod_name, "namespace": space.name,
        "serviceAccount": (pod.get("spec") or {}).get("serviceAccountName") or "default",
        "optedOut": opted_out(pod),
        "mountedSecrets": sorted((record or {}).get("secrets") or []),
        "sidecar": facts.sidecar,
        "injections": [explain_injection(raw, _parsed(raw), facts) for raw in
                       sorted(space.injections, key=lambda i: _meta(i).get("name", ""))] + [
            {**explain_injection(raw, _parsed(raw), facts), "kind": "ClusterSecretInjection"}
            for raw in sorted(space.cluster_injections,
                              key=lambda i: _meta(i).get("name", ""))],
    }


# -- who can use -------------------------------------------------------------------------------

def _references(raw: dict) -> set[str]:
    parsed = _parsed(raw)
    return {ref.name for ref in parsed.spec.secret_refs()} if parsed is not None else set()


def who_can_use(space: Namespace, target: str) -> dict:
    """``target``: an injection's name, a Secret's name, or ``si/NAME`` / ``secret/NAME``."""
    kind, _, name = target.rpartition("/")
    kind = kind.lower()
    by_name = {_meta(i).get("name"): i for i in space.injections}
    if kind in ("si", "secretinjection", "secretinjections") or (not kind and name in by_name):
        if name not in by_name:
            raise NotFound(f"no SecretInjection {name!r} in namespace {space.name!r} "
                           f"(there are: {', '.join(sorted(by_name)) or 'none'})")
        chosen, what = [by_name[name]], {"kind": "SecretInjection", "name": name}
    elif kind in ("", "secret", "secrets"):
        chosen = [i for i in space.injections if name in _references(i)]
        what = {"kind": "Secret", "name": name}
        if not chosen:
            raise NotFound(f"neither a SecretInjection nor a Secret used by one is named "
                           f"{name!r} in namespace {space.name!r}")
    else:
        raise NotFound(f"{target!r}: name a SecretInjection or a Secret (si/NAME, secret/NAME)")
    pods = []
    every_pod = [pod_facts(pod) for pod in space.pods]
    for raw in chosen:
        parsed = _parsed(raw)
        for facts in every_pod:
            pod = facts.pod
            entry = explain_injection(raw, parsed, facts)
            if entry["selects"] or entry["has"]:
                pods.append({"pod": _meta(pod).get("name"),
                             "serviceAccount": (pod.get("spec") or {}).get(
                                 "serviceAccountName") or "default",
                             "node": (pod.get("spec") or {}).get("nodeName"),
                             "injection": entry["injection"], "access": entry["verdict"],
                             "why": entry["why"]})
    bypass = [dict(item, injection=_meta(raw).get("name"))
              for raw in chosen for item in (raw.get("status") or {}).get("canBypass") or []]
    return {"target": what, "namespace": space.name,
            "pods": sorted(pods, key=lambda p: (p["pod"], p["injection"])),
            "canBypass": bypass}


# -- status ------------------------------------------------------------------------------------

def _ca(bundle: dict[str, str] | None, now: dt.datetime) -> dict | None:
    """The CA signing now: the newest certificate of the bundle's ``ca.crt`` (current and
    previous CAs)."""
    if not bundle or not bundle.get("ca.crt"):
        return None
    try:
        certs = x509.load_pem_x509_certificates(bundle["ca.crt"].encode())
    except ValueError:
        return None
    current = max(certs, key=lambda c: c.not_valid_before_utc)
    return {"subject": current.subject.rfc4514_string(),
            "ageDays": round((now - current.not_valid_before_utc).total_seconds() / 86400, 1),
            "expires": current.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")}


def status(spaces: list[Namespace], now: dt.datetime | None = None) -> dict:
    now = now or dt.datetime.now(dt.UTC)
    injections = []
    for space in spaces:
        routes = [routes_of(p) for p in space.pods]
        for raw in sorted(space.injections, key=lambda i: _meta(i).get("name", "")):
            injections.append(_status_row(space, raw, routes))
        for raw in sorted(space.cluster_injections, key=lambda i: _meta(i).get("name", "")):
            injections.append(_cluster_status_row(space, raw, routes))
    return {"injections": injections,
            "grants": [row for s in spaces for row in live_grants(s.grants, now.timestamp())],
            "namespaces": [{"namespace": s.name, "ca": _ca(s.ca_bundle, now),
                            "pods": len(s.pods),
                            "podsWithSidecar": sum(sidecar_state(p)["present"]
                                                   for p in s.pods)} for s in spaces]}


def live_grants(items: list[dict], now: float) -> list[dict]:
    """The AccessGrants in force: what, for whom, who gave it and the time left."""
    from keyhole_operator.approvals import seconds

    rows = []
    for item in items:
        state = item.get("status") or {}
        ends = seconds(state.get("expiresAt"))
        if state.get("state") != "Active" or ends is None or ends <= now:
            continue
        target = (item.get("spec") or {}).get("target") or {}
        rows.append({"namespace": _meta(item).get("namespace"), "name": _meta(item).get("name"),
                     "target": f"{str(target.get('kind', '')).lower()}/{target.get('name')}",
                     "injection": (item.get("spec") or {}).get("injection"),
                     "grantedBy": state.get("grantedBy"), "secondsLeft": int(ends - now),
                     "reason": (item.get("spec") or {}).get("reason")})
    return sorted(rows, key=lambda r: r["secondsLeft"])


def _cluster_status_row(space: Namespace, raw: dict, routes: list[list[str]]) -> dict:
    """A cluster injection as it serves one namespace: its pods there, its status overall."""
    name = _meta(raw).get("name", "")
    ready = (_conditions(raw).get("Ready") or {})
    parsed = _parsed(raw)
    selected = [p for p in space.pods if parsed is not None and not opted_out(p)
                and selector_matches(parsed.spec.pod_selector, _meta(p).get("labels"))]
    return {"kind": "ClusterSecretInjection", "namespace": space.name, "name": name,
            "hosts": [str(h) for h in parsed.spec.hosts] if parsed else [],
            "ready": ready.get("status", "Unknown"), "readyMessage": ready.get("message"),
            "selectedPods": len(selected),
            "withKey": sum(name in served for served in routes),
            "restartRequired": sum(name in restart_for(p) for p in selected),
            "canBypass": [], "spentToday": None, "budgetLeft": None,
            "exchange": last_exchange(raw)}


def _status_row(space: Namespace, raw: dict, routes: list[list[str]]) -> dict:
    """A namespaced injection: its status, and its pods' routes."""
    name = _meta(raw).get("name", "")
    state = raw.get("status") or {}
    ready = (_conditions(raw).get("Ready") or {})
    parsed = _parsed(raw)
    return {
        "kind": "SecretInjection", "namespace": space.name, "name": name,
        "hosts": [str(h) for h in parsed.spec.hosts] if parsed else [],
        "ready": ready.get("status", "Unknown"),
        "readyMessage": ready.get("message"),
        "selectedPods": state.get("matchedPods", 0),
        "withKey": sum(name in served for served in routes),
        "restartRequired": state.get("restartRequired", 0),
        "canBypass": [b["serviceAccount"] for b in state.get("canBypass") or []],
        # What its pods reported spending today and the tightest shared budget's room
        # (spec.llm; the operator keeps them in status.usage).
        "spentToday": (state.get("usage") or {}).get("spentToday"),
        "budgetLeft": (state.get("usage") or {}).get("budgetLeft"),
        "exchange": last_exchange(raw),
    }


def last_exchange(raw: dict) -> str | None:
    """A federated injection's last exchange in a few words (never a token); None for one
    that does not federate."""
    if "workloadIdentity" not in (raw.get("spec") or {}):
        return None
    last = ((raw.get("status") or {}).get("workloadIdentity") or {}).get("lastExchange")
    if not last:
        return "none yet"
    if last.get("ok"):
        return f"exchanged {last.get('at')} by {last.get('pod')}, expires {last.get('expiresAt')}"
    return f"failed {last.get('at')} in {last.get('pod')}: {last.get('error')}"


def explain_identity(space: Namespace, name: str, cluster: bool) -> dict:
    """What a provider's trust rule must name for a federated injection, and how its last
    exchange went: the operator's ``status.workloadIdentity``."""
    found = space.cluster_injections if cluster else space.injections
    raw = next((i for i in found if _meta(i).get("name") == name), None)
    kind = "ClusterSecretInjection" if cluster else "SecretInjection"
    if raw is None:
        names = ", ".join(sorted(_meta(i).get("name", "") for i in found)) or "none"
        raise NotFound(f"no {kind} {name!r} serves namespace {space.name} (there: {names})")
    spec = raw.get("spec") or {}
    federation = spec.get("workloadIdentity")
    provider = next((k for k in (federation or {}) if k != "audience"), None)
    published = (raw.get("status") or {}).get("workloadIdentity") or {}
    return {"kind": kind, "namespace": space.name, "name": name,
            "hosts": list(spec.get("hosts") or []), "provider": provider,
            "issuer": published.get("issuer"), "jwksURI": published.get("jwksURI"),
            "subject": published.get("subject"), "audience": published.get("audience"),
            "serviceAccount": published.get("serviceAccount"),
            "lastExchange": last_exchange(raw) if federation else None}
