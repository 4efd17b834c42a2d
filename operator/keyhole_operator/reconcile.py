"""Reconciliation: what a SecretInjection or a ClusterSecretInjection asks of the cluster,
brought about. The decisions are pure (``live``, ``trust``, ``status``, ``selectors``,
``guard``); this module orders the Kubernetes calls around them for ``handlers``, which only
gather what kopf hands over and call here."""

from __future__ import annotations

import datetime as dt
import logging

import kopf
from kubernetes.client.rest import ApiException

from keyhole_common.spec.model import WorkloadIdentity
from keyhole_operator import metrics
from keyhole_operator.annotations import CA_BUNDLE_CONFIGMAP, CA_SECRET, SIGNING_KEY_SECRET
from keyhole_operator.guard import managed_secrets
from keyhole_operator.identities import IDENTITY_SELECTOR
from keyhole_operator.identities import owner_of as owner_of_account
from keyhole_operator.indexes import cluster_injections, injections_of, namespace_labels, plain
from keyhole_operator.kube import Cluster
from keyhole_operator.layout import SIGNING_KEY_FILE
from keyhole_operator.live import PodPlan, plan_pod
from keyhole_operator.privileges import BYPASSES, access_review, service_account_user
from keyhole_operator.routes import Injection
from keyhole_operator.runtime import Runtime
from keyhole_operator.selectors import injections_for_pod, namespace_served, selector_matches
from keyhole_operator.status import (
    cluster_injection_status,
    exchange_condition,
    injection_status,
)
from keyhole_operator.trust import NEXT_CERT, PREVIOUS_KEY, bundle_data, plan_ca
from keyhole_operator.values import secret_problem

log = logging.getLogger("keyhole.operator")


def ensure_namespace(cluster: Cluster, runtime: Runtime, namespace: str) -> list[str]:
    """The CA, its bundle and the signing key of a namespace; returns what changed."""
    changed = []
    existing = cluster.read_secret(namespace, CA_SECRET)
    plan = plan_ca(namespace, existing,
                   promote_after=dt.timedelta(seconds=runtime.settings.ca_promote_after))
    ca_data = plan.data
    if plan.changed:
        cluster.put_secret(namespace, CA_SECRET, ca_data, kind="kubernetes.io/tls",
                           component="ca")
        changed.append(f"CA {plan.reason}")
    trusted = b"".join(ca_data.get(k, b"") for k in ("tls.crt", NEXT_CERT, PREVIOUS_KEY))
    if runtime.bundles_written.get(namespace) != trusted:
        data, binary = bundle_data(ca_data, runtime.settings.java_truststore_password,
                                   runtime.settings.upstream_ca, runtime.settings.channel_ca)
        current = cluster.read_config_map(namespace, CA_BUNDLE_CONFIGMAP)
        if plan.changed or current is None or current.get("data") != data:
            cluster.put_config_map(namespace, CA_BUNDLE_CONFIGMAP, data, binary,
                                   component="ca-bundle")
            changed.append("CA bundle written")
        runtime.bundles_written[namespace] = trusted
    key = runtime.key(namespace)
    if cluster.read_secret(namespace, SIGNING_KEY_SECRET) != {SIGNING_KEY_FILE: key}:
        cluster.put_secret(namespace, SIGNING_KEY_SECRET, {SIGNING_KEY_FILE: key}, kind="Opaque",
                           component="signing-key")
        changed.append("signing key written")
    return changed


def publish_managed_secrets(cluster: Cluster, runtime: Runtime, namespace: str,
                            injections: list[Injection], index: kopf.Index) -> None:
    """Tell the API server's policy which Secrets of ``namespace`` no pod but the sidecar may
    read (one key of the ConfigMap it takes as its parameter). Written on every reconcile, not
    cached: a merge patch that changes nothing writes nothing, and a ConfigMap someone deleted
    (the policy then refuses pods in agent namespaces) is back within a resync — with every
    namespace's key at once, from the index, so none is unprotected until its own reconcile."""
    target = runtime.settings.protected_secrets_configmap
    if not target:
        return
    config_namespace, config_name = target.split("/", 1)
    whole = {ns: ",".join(managed_secrets(list(index.get(ns, [])))) or None for ns in index}
    cluster.set_config_map_key(config_namespace, config_name, namespace,
                               ",".join(managed_secrets(injections)) or None, whole=whole)


def sync_pods(cluster: Cluster, runtime: Runtime, namespace: str, pods: list[dict],
              injections: list[Injection], labels: dict | None = None) -> list[PodPlan]:
    """Bring every pod's routes in line with the injections selecting it now (``labels``:
    the namespace's, for the cluster injections among them); each pod's plan, in order."""
    plans = []
    for pod in pods:
        plan = plan_pod(pod, injections, runtime.key(namespace), labels)
        plans.append(plan)
        if plan.annotations:
            name = pod["metadata"]["name"]
            cluster.annotate_pod(namespace, name, plan.annotations)
            metrics.route_updates.inc()
            log.info("pod %s/%s: routes now %s%s", namespace, name, list(plan.granted) or "none",
                     f"; restart needed for {', '.join(plan.restart_for)}" if plan.restart_for
                     else "")
    return plans


def _secret_problems(cluster: Cluster, namespace: str, injection: Injection) -> list[str]:
    problems = []
    for ref in injection.spec.secret_refs():
        keys = cluster.secret_keys(namespace, ref.name)
        if keys is None:
            problems.append(f"Secret {ref.name!r} not found")
        elif ref.key not in keys:
            problems.append(f"Secret {ref.name!r} has no key {ref.key!r}")
    return problems


def _over_privileged(cluster: Cluster, namespace: str, pods: list[dict]) -> list[dict]:
    """Each selected pod's ServiceAccount that holds a way around keyhole: its pods and every
    such permission with its reason (``status.canBypass``)."""
    by_account: dict[str, list[str]] = {}
    for pod in pods:
        account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        by_account.setdefault(account, []).append(pod["metadata"]["name"])
    verdicts = []
    for account, names in sorted(by_account.items()):
        user, groups = service_account_user(namespace, account)
        held = [bypass.describe() for bypass in BYPASSES
                if cluster.allowed(access_review(namespace, user, groups, bypass))]
        if held:
            verdicts.append({"serviceAccount": account, "pods": sorted(names),
                             "permissions": held})
    return verdicts


def parse_or_give_up(body) -> Injection:
    """The object parsed, or a Warning Event and a permanent failure (no retries: the
    validating webhook should have refused it; a retry cannot fix a spec)."""
    try:
        return Injection.from_object(plain(body))
    except ValueError as exc:
        kopf.event(body, type="Warning", reason="InvalidSpec", message=str(exc)[:1000])
        raise kopf.PermanentError(f"invalid spec: {exc}") from None


def reconcile_injection(body, namespace: str, name: str, meta, status, patch: kopf.Patch,
                        injection_index: kopf.Index, runtime: Runtime,
                        fleet: tuple[list[Injection], dict | None]) -> None:
    """The namespace's trust material, the routes of its pods, and the injection's status
    and Events."""
    cluster = runtime.cluster
    injection = parse_or_give_up(body)
    for change in ensure_namespace(cluster, runtime, namespace):
        kopf.event(body, type="Normal", reason="NamespaceTrust", message=change)
    others = [i for i in injections_of(injection_index, namespace) if i.name != name]
    injections = [*others, injection]
    publish_managed_secrets(cluster, runtime, namespace, injections, injection_index)
    pods = cluster.list_pods(namespace)
    cluster_injections, labels = fleet
    sync_pods(cluster, runtime, namespace, pods, [*injections, *cluster_injections], labels)

    selected = [p for p in pods if injections_for_pod([injection], p)]
    restart = [p for p in selected
               if name in plan_pod(p, injections, runtime.key(namespace)).restart_for]
    problems = _secret_problems(cluster, namespace, injection)
    risky = _over_privileged(cluster, namespace, selected)
    new_status = injection_status(
        generation=meta.get("generation"), matched=len(selected), restart_required=len(restart),
        secret_problems=problems, over_privileged=risky,
        previous=(status or {}).get("conditions"))
    new_status.update(identity_status(runtime, body, namespace, name, injection, status))
    with_exchange(new_status, status, meta)
    announce(body, status, new_status)
    patch.status.update(new_status)


def identity_status(runtime: Runtime, body, namespace: str | None, name: str,
                    injection: Injection, status) -> dict:
    """``status.workloadIdentity`` of a federated injection (its ServiceAccount made); for one
    that stopped federating, the account deleted and the block removed."""
    spec = injection.spec.credential
    if isinstance(spec, WorkloadIdentity):
        try:
            return {"workloadIdentity": runtime.identities.published(namespace, name,
                                                                     spec.audience)}
        except ValueError as exc:  # a name too long for a ServiceAccount
            kopf.event(body, type="Warning", reason="NoIdentity", message=str(exc))
            return {}
    if (status or {}).get("workloadIdentity"):
        forget_identity(runtime, namespace, name)
        return {"workloadIdentity": None}
    return {}


def with_exchange(new_status: dict, status, meta) -> None:
    """Add the ``IdentityExchanged`` condition from the last exchange the channel wrote."""
    if new_status.get("workloadIdentity") is None:
        return
    last = ((status or {}).get("workloadIdentity") or {}).get("lastExchange")
    found = exchange_condition(last, meta.get("generation"), (status or {}).get("conditions"))
    if found is not None:
        new_status["conditions"].append(found)


def forget_identity(runtime: Runtime, namespace: str | None, name: str) -> None:
    """The injection is gone or no longer federates: its ServiceAccount goes (the tokens
    already handed out expire within minutes; no sidecar is given another). A failure is
    logged, never raised: it must not stop the revocation around it (the startup sweep
    deletes what is left)."""
    try:
        runtime.identities.forget(namespace, name)
    except ValueError:  # a name no ServiceAccount could have: none was made
        pass
    except (ApiException, OSError) as exc:
        log.warning("could not delete the identity of injection %s: %s", name, exc)


def sweep_identities(runtime: Runtime) -> list[str]:
    """Delete the ServiceAccounts of federated injections deleted while no operator watched;
    the names deleted."""
    identities_ = runtime.identities
    cluster = runtime.cluster
    gone = []
    for account in cluster.list_service_accounts(identities_.home, IDENTITY_SELECTOR):
        owner = owner_of_account(account)
        if owner is None:
            continue
        namespace, name = owner
        exists = (cluster.read_cluster_injection(name) if namespace is None
                  else cluster.read_injection(namespace, name))
        if exists is None:
            forget_identity(runtime, namespace, name)
            gone.append(account["metadata"]["name"])
    return gone


def announce(body, old_status, new_status) -> None:
    """An Event when a condition turns bad (not every minute while it stays bad)."""
    before = {c["type"]: c["status"] for c in (old_status or {}).get("conditions") or []}
    for cond in new_status["conditions"]:
        bad = (cond["type"] == "AgentsOverPrivileged") == (cond["status"] == "True")
        if bad and before.get(cond["type"]) != cond["status"]:
            kopf.event(body, type="Warning", reason=cond["reason"], message=cond["message"][:1000])


def reconcile_cluster_injection(body, name: str, meta, status, patch: kopf.Patch,
                                injection_index: kopf.Index, cluster_index: kopf.Index,
                                namespace_index: kopf.Index, runtime: Runtime) -> None:
    """The pods of every namespace the injection serves now, or served at the last reconcile
    (a namespace it left is revoked here too), in line; its status and Events."""
    cluster = runtime.cluster
    injection = parse_or_give_up(body)
    channel = bool(runtime.settings.channel_url)
    fleet = [*cluster_injections(cluster_index, runtime, without=name),
             *([injection] if channel else [])]
    served = sorted(ns for ns in namespace_index
                    if namespace_served(injection.spec, namespace_labels(namespace_index, ns)))
    before = set((status or {}).get("namespaces") or [])
    matched, restart, shadowed = 0, 0, []
    for namespace in sorted(before | set(served)):
        labels = namespace_labels(namespace_index, namespace)
        if namespace in served and channel:
            for change in ensure_namespace(cluster, runtime, namespace):
                log.info("namespace %s: %s", namespace, change)
        pods = cluster.list_pods(namespace)
        injections = [*injections_of(injection_index, namespace), *fleet]
        plans = sync_pods(cluster, runtime, namespace, pods, injections, labels)
        for pod, plan in zip(pods, plans, strict=True):
            if namespace not in served or not selector_matches(
                    injection.spec.pod_selector, (pod.get("metadata") or {}).get("labels")):
                continue
            set_aside = [s for s in plan.shadowed if s.cluster == name]
            shadowed += [f"namespace {namespace}: SecretInjection {s.namespaced} ({s.why})"
                         for s in set_aside]
            if not set_aside and name in plan.granted + plan.restart_for:  # it serves the pod
                matched += 1
                restart += name in plan.restart_for
    central = runtime.settings.cluster_secrets_namespace
    problems = [why for ref in injection.spec.secret_refs()
                if (why := secret_problem(cluster.read_labelled_secret(central, ref.name), ref,
                                          central))]
    new_status = cluster_injection_status(
        generation=meta.get("generation"), namespaces=served, matched=matched,
        restart_required=restart, secret_problems=problems,
        shadowed=sorted(set(shadowed)), channel=channel,
        previous=(status or {}).get("conditions"))
    new_status.update(identity_status(runtime, body, None, name, injection, status))
    with_exchange(new_status, status, meta)
    gained, lost = sorted(set(served) - before), sorted(before - set(served))
    if gained or lost:
        said = [f"now serves namespace(s) {', '.join(gained)}" if gained else "",
                f"no longer serves {', '.join(lost)} (revoked)" if lost else ""]
        kopf.event(body, type="Normal", reason="NamespacesChanged",
                   message="; ".join(filter(None, said))[:1000])
    announce(body, status, new_status)
    patch.status.update(new_status)
