"""The kopf handlers: thin. Each one gathers what Kubernetes says, calls a pure decision, and
writes the result back. Importing this module registers them with kopf.

- index ``injection_index``: the SecretInjections of each namespace, in memory, for the
  reconciling handlers of the active replica.
- mutating webhook ``keyhole-inject`` (pods, CREATE): inject the sidecar. It lists the pod's
  namespace's SecretInjections from the API server for each review instead of reading the
  index: every replica serves the webhook, but only the active one watches (kopf pauses the
  watch streams of the others), so their indexes would be stale.
- validating webhooks ``keyhole-validate-injection`` (SecretInjections), and for pods (the
  decisions are ``guard``'s): ``keyhole-protect-pod`` (UPDATE: only the operator changes
  keyhole.dev/ annotations, nobody keyhole's containers and volumes), ``keyhole-protect-debug``
  (ephemeral containers) and ``keyhole-protect-port-forward``. exec and attach into keyhole's
  containers are refused by the chart's ValidatingAdmissionPolicy, in the API server.
- ``reconcile`` (SecretInjection create/update/resume, and every ``--resync-seconds``): the namespace's CA,
  bundle and signing key; live routes on its pods; the injection's status and Events.
- ``follow_pod`` (pod events): a relabelled pod gains or loses routes within seconds.
- ClusterSecretInjections: indexed (``cluster_index``) with the namespaces' labels
  (``namespace_index``); ``reconcile_cluster`` keeps the pods of every namespace one serves (and
  served before) in line and writes its status; ``follow_namespace`` re-plans a namespace's
  pods when its labels change, so relabelling a namespace grants and revokes live. Their
  values reach sidecars over the operator channel (``channel``, ``values``), never a mount.

What a reconcile does is ``reconcile``'s; approvals are ``approval_handlers``'.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import kopf
from kubernetes.client.rest import ApiException

from keyhole_common.spec.hosts import host_risk
from keyhole_operator import metrics
from keyhole_operator.annotations import (
    is_keyhole_key,
)
from keyhole_operator.guard import (
    ephemeral_refusal,
    forged_refusal,
    managed_secrets,
    port_forward_refusal,
    update_refusal,
)
from keyhole_operator.identity_desk import IdentityDesk
from keyhole_operator.indexes import (
    CLUSTER,
    cluster_injections,
    injections_of,
    namespace_labels,
    plain,
)
from keyhole_operator.kube import Cluster
from keyhole_operator.live import injected, plan_pod
from keyhole_operator.mutation import Refused, mutate
from keyhole_operator.mutation.sidecar_container import wants_transparent
from keyhole_operator.reconcile import (
    ensure_namespace,
    forget_identity,
    publish_managed_secrets,
    reconcile_cluster_injection,
    reconcile_injection,
    sweep_identities,
    sync_pods,
)
from keyhole_operator.routes import Injection
from keyhole_operator.runtime import Runtime
from keyhole_operator.selectors import (
    clashes,
    injections_for_pod,
    namespace_served,
)

log = logging.getLogger("keyhole.operator")
GROUP, VERSION, PLURAL = "keyhole.dev", "v1alpha1", "secretinjections"
CLUSTER_PLURAL = "clustersecretinjections"


def _runtime(memo) -> Runtime:
    return memo["runtime"]


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo, **_) -> None:
    runtime = _runtime(memo)
    settings.persistence.finalizer = "keyhole.dev/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.keyhole.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.keyhole.dev")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # A refresh timer still running when its injection is deleted holds kopf's finalizer:
    # kopf then checks again only after `cancellation_polling` (60 s by default), and
    # `kubectl delete` hangs that long. Wait briefly for the running pass, then every second.
    settings.background.instant_exit_timeout = 2.0
    settings.background.cancellation_polling = 1.0
    # The CRD is installed before the operator; watching CRDs would need cluster-wide
    # list/watch on them, which least privilege does not grant.
    settings.scanning.disabled = True
    if runtime.webhook_server is not None:
        settings.admission.server = runtime.webhook_server
        settings.admission.managed = "keyhole.dev" if runtime.manage_webhook_configurations else None
    if runtime.cluster is None:
        runtime.cluster = Cluster()
    if runtime.identities is None:
        runtime.identities = IdentityDesk(runtime.cluster, runtime.settings.identity_namespace)
    try:
        for account in await asyncio.to_thread(sweep_identities, runtime):
            log.info("deleted ServiceAccount %s: its injection no longer exists", account)
    except (ApiException, OSError) as exc:  # the next start sweeps again
        log.warning("could not sweep the identities of deleted injections: %s", exc)


@kopf.on.probe(id="api-reachable")
async def api_reachable(memo, **_) -> bool:
    """Fails /healthz (the chart's readiness probe) while this replica cannot read
    SecretInjections: the webhook could not decide, so the Service sends reviews elsewhere."""
    try:
        await asyncio.to_thread(_runtime(memo).cluster.can_list_injections)
    except Exception as exc:  # permanent: answer 500 now, no retries
        raise kopf.PermanentError(f"cannot list SecretInjections: {_reason(exc)}") from None
    return True


def _reason(exc: Exception) -> str:
    """A short cause for an API failure (never the response body)."""
    status = getattr(exc, "status", None)
    return f"HTTP {status}" if status else type(exc).__name__


def valid_injections(objects: list[dict]) -> list[Injection]:
    """The SecretInjections the parser accepts (the validating webhook refuses the others)."""
    found = []
    for obj in objects:
        try:
            found.append(Injection.from_object(obj))
        except ValueError:
            continue
    return found


# -- the index ------------------------------------------------------------------------------------

@kopf.index(GROUP, VERSION, PLURAL)
def injection_index(namespace: str, name: str, body: kopf.Body, **_) -> dict | None:
    try:
        return {namespace: Injection.from_object(dict(body))}
    except ValueError as exc:  # the validating webhook should have refused it
        log.warning("ignoring invalid SecretInjection %s/%s: %s", namespace, name, exc)
        return None


@kopf.index(GROUP, VERSION, CLUSTER_PLURAL)
def cluster_index(name: str, body: kopf.Body, **_) -> dict | None:
    try:
        return {CLUSTER: Injection.from_object(dict(body))}
    except ValueError as exc:  # the validating webhook should have refused it
        log.warning("ignoring invalid ClusterSecretInjection %s: %s", name, exc)
        return None


@kopf.index("v1", "namespaces")
def namespace_index(name: str, labels, **_) -> dict:
    return {name: dict(labels or {})}


# -- webhooks ---------------------------------------------------------------------------------------

# Admission handlers are async on purpose: kopf runs sync handlers in a shared thread pool,
# where reconciliation's blocking API calls would make the API server wait for our answer.
# These are pure and take milliseconds, so they run on the event loop directly.

async def _ask(webhook: str, what: str, call, *args):
    """One API read for a review; fail closed: without it, refuse (retryably) to decide."""
    try:
        return await asyncio.to_thread(call, *args)
    except Exception as exc:
        metrics.admissions.labels(webhook, "unavailable").inc()
        raise kopf.AdmissionError(f"keyhole cannot read {what} ({_reason(exc)}); retry in a "
                                  "few seconds", code=503) from None


def _deny(webhook: str, problem: str | None, code: int = 403) -> None:
    """Refuse with ``problem`` (counted), or let the request through."""
    if problem:
        metrics.admissions.labels(webhook, "denied").inc()
        raise kopf.AdmissionError(problem, code=code)


@kopf.on.mutate("v1", "pods", operations=["CREATE"], id="keyhole-inject", side_effects=False)
async def inject(body: kopf.Body, patch: kopf.Patch, warnings: list[str], memo, **_) -> None:
    runtime = _runtime(memo)
    pod = plain(body)
    namespace = (pod.get("metadata") or {}).get("namespace") or ""
    cluster = runtime.cluster  # both lists at once, from the watch cache (kube.CACHED)
    reads = [_ask("keyhole-inject", f"the SecretInjections of namespace {namespace}",
                  functools.partial(cluster.list_namespace_injections, namespace, cached=True))]
    if runtime.settings.channel_url:
        reads.append(_ask("keyhole-inject", "the ClusterSecretInjections",
                          functools.partial(cluster.list_cluster_injections, cached=True)))
    results = await asyncio.gather(*reads, return_exceptions=True)  # each read waited for
    for result in results:
        if isinstance(result, BaseException):
            raise result
    listed, *cluster_listed = results
    injections = valid_injections(listed)
    candidates, labels = list(injections), None
    if cluster_listed:
        fleet = valid_injections(cluster_listed[0])
        if fleet:
            labels = await _ask("keyhole-inject", f"the labels of namespace {namespace}",
                                cluster.namespace_labels, namespace)
            candidates += fleet
    chosen = injections_for_pod(candidates, pod, labels)
    if not chosen:
        _deny("keyhole-inject", forged_refusal(pod))
        metrics.admissions.labels("keyhole-inject", "skipped").inc()
        return
    level = None
    if wants_transparent(chosen, runtime.settings):  # keyhole-init needs NET_ADMIN and NET_RAW
        level = await _ask("keyhole-inject", f"the Pod Security level of namespace {namespace}",
                           cluster.pod_security_level, namespace)
    try:
        result = mutate(pod, chosen, runtime.settings, runtime.key(namespace), level,
                        managed_secrets(injections))
    except Refused as refusal:
        metrics.admissions.labels("keyhole-inject", "refused").inc()
        raise kopf.AdmissionError(str(refusal), code=403) from None
    metrics.admissions.labels("keyhole-inject", "injected").inc()
    warnings.extend(result.warnings)
    mutated = result.pod

    def become_mutated(raw: dict) -> None:
        raw.clear()
        raw.update(mutated)

    patch.fns.append(become_mutated)


@kopf.on.validate(GROUP, VERSION, PLURAL, operations=["CREATE", "UPDATE"],
                  id="keyhole-validate-injection", side_effects=False)
async def validate_injection(body: kopf.Body, old: kopf.Body | None, warnings: list[str],
                             memo, **_) -> None:
    webhook = "keyhole-validate-injection"
    try:
        injection = Injection.from_object(plain(body))
    except ValueError as exc:
        metrics.admissions.labels(webhook, "denied").inc()
        raise kopf.AdmissionError(f"keyhole refuses this SecretInjection: {exc}", code=422) from None
    cluster = _runtime(memo).cluster
    namespace = (body.get("metadata") or {}).get("namespace") or ""
    if not _spec_changed(old, body):  # metadata and status writes (kopf's finalizer too)
        _admit_warnings(webhook, injection, warnings)
        return
    fleet = valid_injections(await _ask(webhook, "the ClusterSecretInjections",
                                        cluster.list_cluster_injections))
    if fleet:
        labels = await _ask(webhook, f"the labels of namespace {namespace}",
                            cluster.namespace_labels, namespace)
        _deny(webhook, clash_refusal([(namespace, injection)],
                                     [c for c in fleet if namespace_served(c.spec, labels)]), 422)
    _admit_warnings(webhook, injection, warnings)


@kopf.on.validate(GROUP, VERSION, CLUSTER_PLURAL, operations=["CREATE", "UPDATE"],
                  id="keyhole-validate-cluster-injection", side_effects=False)
async def validate_cluster_injection(body: kopf.Body, old: kopf.Body | None,
                                     warnings: list[str], memo, **_) -> None:
    webhook = "keyhole-validate-cluster-injection"
    try:
        injection = Injection.from_object(plain(body))
    except ValueError as exc:
        metrics.admissions.labels(webhook, "denied").inc()
        raise kopf.AdmissionError(f"keyhole refuses this ClusterSecretInjection: {exc}",
                                  code=422) from None
    cluster = _runtime(memo).cluster
    if not _spec_changed(old, body):
        _admit_warnings(webhook, injection, warnings)
        return
    namespaces = await _ask(webhook, "the namespaces", cluster.list_namespaces)
    served = {(n.get("metadata") or {}).get("name") for n in namespaces
              if namespace_served(injection.spec, (n.get("metadata") or {}).get("labels") or {})}
    if served:
        own = [(obj["metadata"]["namespace"], i) for obj, i in _parsed(
            await _ask(webhook, "the SecretInjections", cluster.list_injections))
            if obj["metadata"].get("namespace") in served]
        _deny(webhook, clash_refusal(own, [injection]), 422)
    if not _runtime(memo).settings.channel_url:
        warnings.append("the operator runs without the operator channel (the chart's "
                        "operator.channel), which carries a cluster injection's values to "
                        "sidecars: this injection serves no pod until it is turned on")
    _admit_warnings(webhook, injection, warnings)


def _spec_changed(old, new) -> bool:
    """A clash is judged when a spec is written, never on a metadata or status write: kopf's
    own annotations and finalizer, and removing that finalizer from an object being deleted,
    must pass even where a relabelled namespace has made two injections clash since."""
    return old is None or dict(old).get("spec") != dict(new).get("spec")


def _parsed(objects: list[dict]) -> list[tuple[dict, Injection]]:
    found = []
    for obj in objects:
        try:
            found.append((obj, Injection.from_object(obj)))
        except ValueError:
            continue
    return found


def clash_refusal(namespaced: list[tuple[str, Injection]], fleet: list[Injection]) -> str | None:
    """Refuse what is ambiguous at apply time: a namespace's injection and a cluster one that
    serves the namespace and names the same injection, or sets the same header or parameter
    for an overlapping host. The message names both objects."""
    for namespace, own in namespaced:
        for other in fleet:
            why = clashes(own, other)
            if why:
                return (f"SecretInjection {namespace}/{own.name} and ClusterSecretInjection "
                        f"{other.name} both serve namespace {namespace} and clash: {why}. Rename "
                        "one, change its hosts, or keep the namespace out of the cluster "
                        "injection (its namespaceSelector, or the label "
                        "keyhole.dev/cluster-injections=disabled on the namespace)")
    return None


def _admit_warnings(webhook: str, injection: Injection, warnings: list[str]) -> None:
    metrics.admissions.labels(webhook, "allowed").inc()
    warnings.extend(filter(None, (host_risk(host) for host in injection.spec.hosts)))
    if not _selects_by_tag(injection.spec.pod_selector):
        warnings.append(
            "podSelector uses no keyhole.dev/ label: the webhook is only called for pods with a "
            "keyhole.dev/ label (so an outage never blocks unrelated pods), so pods selected by "
            "other labels alone get no sidecar and are marked restart-required. Tag agents with "
            "a keyhole.dev/ label, e.g. keyhole.dev/openai: \"true\".")


def _selects_by_tag(selector: dict | None) -> bool:
    keys = list((selector or {}).get("matchLabels") or {}) + [
        e.get("key", "") for e in (selector or {}).get("matchExpressions") or []
        if e.get("operator") in ("In", "Exists")]
    return any(is_keyhole_key(k) for k in keys)


@kopf.on.validate("v1", "pods", operations=["UPDATE"], id="keyhole-protect-pod",
                  side_effects=False)
async def protect_pod(old: kopf.Body, new: kopf.Body, userinfo: dict, memo, **_) -> None:
    """Only the operator changes keyhole.dev/ annotations; nobody changes keyhole's containers
    or volumes of an injected pod."""
    old, new = plain(old or {}), plain(new or {})
    before = {k: v for k, v in ((old.get("metadata") or {}).get("annotations") or {}).items()
              if is_keyhole_key(k)}
    after = {k: v for k, v in ((new.get("metadata") or {}).get("annotations") or {}).items()
             if is_keyhole_key(k)}
    user = (userinfo or {}).get("username")
    if before != after and user != _runtime(memo).settings.operator_service_account:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        _deny("keyhole-protect-pod",
              f"only the keyhole operator may change {', '.join(changed)} on a pod (you are "
              f"{user}); to grant or revoke access, change the pod's labels instead")
    _deny("keyhole-protect-pod", update_refusal(old, new))


@kopf.on.validate("v1", "pods", operations=["UPDATE"], subresource="ephemeralcontainers",
                  id="keyhole-protect-debug", side_effects=False)
async def protect_from_debug(old: kopf.Body, new: kopf.Body, memo, **_) -> None:
    """kubectl debug on an injected pod: never into the sidecar, never above the ceiling."""
    _deny("keyhole-protect-debug",
          ephemeral_refusal(plain(old or {}), plain(new or {}), _runtime(memo).settings))


@kopf.on.validate("v1", "pods", operations=["CONNECT"], subresource="portforward",
                  id="keyhole-protect-port-forward", side_effects=False)
async def protect_port_forward(body: kopf.Body, memo, **_) -> None:
    """kubectl port-forward to the proxy ports of an injected pod. The webhook server puts the
    pod's name and namespace into the options' metadata (a CONNECT review names no pod)."""
    runtime = _runtime(memo)
    options = plain(body)
    meta = options.get("metadata") or {}
    pod = await _ask("keyhole-protect-port-forward",
                     f"pod {meta.get('namespace')}/{meta.get('name')}",
                     runtime.cluster.read_pod, meta.get("namespace"), meta.get("name"))
    _deny("keyhole-protect-port-forward", port_forward_refusal(options, pod, runtime.settings))


# -- reconciliation -----------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile")
@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile")
@kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile")
def reconcile(body: kopf.Body, namespace: str, name: str, meta, status, patch: kopf.Patch,
              injection_index: kopf.Index, cluster_index: kopf.Index,
              namespace_index: kopf.Index, memo, **_) -> None:
    runtime = _runtime(memo)
    fleet = (cluster_injections(cluster_index, runtime),
             namespace_labels(namespace_index, namespace))
    try:
        reconcile_injection(body, namespace, name, meta, status, patch, injection_index,
                            runtime, fleet)
    except Exception:
        metrics.reconciles.labels("error").inc()
        raise
    metrics.reconciles.labels("ok").inc()


def register_refresh(interval: float) -> None:
    """Run ``reconcile`` on a timer too (status counts, CA rotation, privilege checks)."""
    kopf.timer(GROUP, VERSION, PLURAL, interval=interval, initial_delay=min(interval, 5),
               id="refresh")(reconcile)


@kopf.on.event(GROUP, VERSION, PLURAL, id="revoke-on-delete")
def revoke_on_delete(type: str, namespace: str, name: str, injection_index: kopf.Index,
                     cluster_index: kopf.Index, namespace_index: kopf.Index, memo, **_) -> None:
    if type != "DELETED":
        return
    runtime = _runtime(memo)
    remaining = injections_of(injection_index, namespace, without=name)
    publish_managed_secrets(runtime.cluster, runtime, namespace, remaining, injection_index)
    sync_pods(runtime.cluster, runtime, namespace, runtime.cluster.list_pods(namespace),
              [*remaining, *cluster_injections(cluster_index, runtime)],
              namespace_labels(namespace_index, namespace))
    forget_identity(runtime, namespace, name)  # after the revocation, which must not wait


@kopf.on.event("v1", "pods", id="follow-pod")
def follow_pod(type: str, body: kopf.Body, namespace: str, name: str,
               injection_index: kopf.Index, cluster_index: kopf.Index,
               namespace_index: kopf.Index, memo, **_) -> None:
    if type not in ("ADDED", "MODIFIED", None):
        return
    pod = plain(body)
    runtime = _runtime(memo)
    injections = [*injections_of(injection_index, namespace),
                  *cluster_injections(cluster_index, runtime)]
    if not injections and injected(pod) is None:
        return
    plan = plan_pod(pod, injections, runtime.key(namespace),
                    namespace_labels(namespace_index, namespace))
    if not plan.annotations:
        return
    runtime.cluster.annotate_pod(namespace, name, plan.annotations)
    metrics.route_updates.inc()
    if plan.restart_for and plan.annotations.get("keyhole.dev/restart-required"):
        metrics.restarts_required.inc()
        kopf.event(body, type="Warning", reason="RestartRequired",
                   message=f"restart this pod to use {', '.join(plan.restart_for)}: it does not "
                           "mount every Secret these injections need")


# -- ClusterSecretInjections -------------------------------------------------------------------

@kopf.on.resume(GROUP, VERSION, CLUSTER_PLURAL, id="reconcile-cluster")
@kopf.on.create(GROUP, VERSION, CLUSTER_PLURAL, id="reconcile-cluster")
@kopf.on.update(GROUP, VERSION, CLUSTER_PLURAL, id="reconcile-cluster")
def reconcile_cluster(body: kopf.Body, name: str, meta, status, patch: kopf.Patch,
                      injection_index: kopf.Index, cluster_index: kopf.Index,
                      namespace_index: kopf.Index, memo, **_) -> None:
    try:
        reconcile_cluster_injection(body, name, meta, status, patch, injection_index,
                                    cluster_index, namespace_index, _runtime(memo))
    except Exception:
        metrics.reconciles.labels("error").inc()
        raise
    metrics.reconciles.labels("ok").inc()


def register_cluster_refresh(interval: float) -> None:
    """Run ``reconcile_cluster`` on a timer too (status counts, CA rotation in its namespaces)."""
    kopf.timer(GROUP, VERSION, CLUSTER_PLURAL, interval=interval,
               initial_delay=min(interval, 5), id="refresh-cluster")(reconcile_cluster)


@kopf.on.event(GROUP, VERSION, CLUSTER_PLURAL, id="revoke-cluster-on-delete")
def revoke_cluster_on_delete(type: str, name: str, body: kopf.Body,
                             injection_index: kopf.Index, cluster_index: kopf.Index,
                             namespace_index: kopf.Index, memo, **_) -> None:
    if type != "DELETED":
        return
    runtime = _runtime(memo)
    remaining = cluster_injections(cluster_index, runtime, without=name)
    served = set((body.get("status") or {}).get("namespaces") or [])
    try:  # and those its spec serves now (the status lists 200 at most)
        spec = Injection.from_object(plain(body)).spec
        served |= {ns for ns in namespace_index
                   if namespace_served(spec, namespace_labels(namespace_index, ns))}
    except ValueError:
        pass
    for namespace in sorted(served):
        sync_pods(runtime.cluster, runtime, namespace, runtime.cluster.list_pods(namespace),
                  [*injections_of(injection_index, namespace), *remaining],
                  namespace_labels(namespace_index, namespace))
    forget_identity(runtime, None, name)  # after the revocation, which must not wait


@kopf.on.event("v1", "namespaces", id="follow-namespace")
def follow_namespace(type: str, name: str, injection_index: kopf.Index,
                     cluster_index: kopf.Index, namespace_index: kopf.Index, memo,
                     **_) -> None:
    """A namespace labelled into or out of a cluster injection gains or loses it live."""
    if type not in ("ADDED", "MODIFIED", None):
        return
    runtime = _runtime(memo)
    fleet = cluster_injections(cluster_index, runtime)
    if not fleet:
        return
    labels = namespace_labels(namespace_index, name)
    if any(namespace_served(i.spec, labels) for i in fleet):
        ensure_namespace(runtime.cluster, runtime, name)
    pods = runtime.cluster.list_pods(name)
    if not any(injected(p) is not None for p in pods):
        return
    sync_pods(runtime.cluster, runtime, name, pods,
              [*injections_of(injection_index, name), *fleet], labels)
