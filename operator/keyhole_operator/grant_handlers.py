"""kopf's side of just-in-time access: the webhook that stamps who granted an AccessGrant,
and one daemon per grant that applies its labels, waits out its time, and removes them.
The decisions are ``grants``'."""

from __future__ import annotations

import asyncio
import time

import kopf

from keyhole_common.approvals import GROUP, VERSION
from keyhole_operator import approvals, grants, metrics
from keyhole_operator.grants import PLURAL, Refused

STAMP_WEBHOOK = "keyhole-stamp-grant"


def _deny(problem: str) -> None:
    metrics.admissions.labels(STAMP_WEBHOOK, "denied").inc()
    raise kopf.AdmissionError(problem, code=403)


@kopf.on.mutate(GROUP, VERSION, PLURAL, operations=["CREATE"], id=STAMP_WEBHOOK,
                side_effects=False)
async def stamp_grant(body: kopf.Body, userinfo: dict, patch: kopf.Patch, memo, **_) -> None:
    """Who grants, checked (not the target's own ServiceAccount, nobody it could act as) and
    stamped with the time, sealed: the operator honours no grant without it."""
    runtime = memo["runtime"]
    obj = {k: dict(v) if hasattr(v, "items") else v for k, v in dict(body).items()}
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    namespace, name = meta.get("namespace") or "", meta.get("name")
    if not name:
        _deny("an AccessGrant needs a name of its own (kubectl keyhole grant makes one), not "
              "generateName: its seal names it")
    user = str((userinfo or {}).get("username") or "")
    groups = [str(g) for g in (userinfo or {}).get("groups") or []]
    if user == runtime.settings.operator_service_account and grants.honoured(
            obj, runtime.key(namespace)):
        return  # an approved ask for access: the decision's webhook checked who approved it
    target = spec.get("target") or {}
    kind = target.get("kind")
    if kind not in grants.KINDS:
        _deny("spec.target.kind must be Pod, Deployment or StatefulSet")
    found = await asyncio.to_thread(runtime.cluster.read_target, kind, namespace,
                                    str(target.get("name")))
    if found is not None:
        account = grants.service_account(found, kind)
        if user == f"system:serviceaccount:{namespace}:{account}":
            _deny(f"{user} is the ServiceAccount of the target: an agent never grants itself "
                  "access")
        for what, review in approvals.acting_as(namespace, account, user, groups):
            if await asyncio.to_thread(runtime.cluster.allowed, review):
                _deny(f"the target's ServiceAccount {namespace}/{account} could {what}: it "
                      f"could act as {user}, so {user} may not grant it access")
    annotations = grants.stamp(obj, user, time.time(), runtime.key(namespace))
    patch.metadata.setdefault("annotations", {}).update(annotations)
    metrics.admissions.labels(STAMP_WEBHOOK, "allowed").inc()


@kopf.daemon(GROUP, VERSION, PLURAL, id="access-grant", cancellation_timeout=30)
async def keep_grant(body: kopf.Body, namespace: str, name: str, stopped, memo, logger,
                     **_) -> None:
    """Apply the grant's labels, wait until it ends (or is deleted), remove them."""
    runtime = memo["runtime"]
    cluster = runtime.cluster
    obj = {k: dict(v) if hasattr(v, "items") else v for k, v in dict(body).items()}
    target = (obj.get("spec") or {}).get("target") or {}
    kind, target_name = target.get("kind"), str(target.get("name"))
    current = obj.get("status") or {}
    added = dict(current.get("labels") or {})
    if current.get("state") not in ("Active", "Expired", "Refused"):
        try:
            added = await asyncio.to_thread(_apply, runtime, obj, namespace, kind, target_name)
        except Refused as exc:
            await asyncio.to_thread(cluster.grant_status, namespace, name,
                                    grants.status("Refused", obj, str(exc)))
            kopf.event(body, type="Warning", reason="AccessRefused", message=str(exc)[:1000])
            return
        injection = (obj.get("spec") or {}).get("injection")
        message = (f"{kind} {target_name} may use injection {injection} until "
                   f"{grants.status('Active', obj, '').get('expiresAt')}, granted by "
                   f"{grants.status('Active', obj, '').get('grantedBy')}")
        await asyncio.to_thread(cluster.grant_status, namespace, name,
                                grants.status("Active", obj, message, added))
        kopf.event(body, type="Normal", reason="AccessGranted", message=message[:1000])
        logger.info(message)
    elif current.get("state") != "Active":
        return  # over already: nothing applied, nothing to remove
    ends = grants.expires(obj) or time.time()
    if not grants.honoured(obj, runtime.key(namespace)):
        ends = time.time()  # edited since it was stamped (its time stretched?): revoke now
    await stopped.wait(max(ends - time.time(), 0))
    deleted = bool(stopped) and kopf.DaemonStoppingReason.RESOURCE_DELETED in (
        stopped.reason or kopf.DaemonStoppingReason(0))
    if stopped and not deleted:
        return  # the operator stops or pauses: whoever runs next keeps the grant
    await asyncio.to_thread(_revoke, cluster, namespace, kind, target_name, added)
    why = "deleted" if deleted else "time is up"
    await asyncio.to_thread(cluster.grant_status, namespace, name,
                            grants.status("Expired", obj, f"revoked: {why}", added))
    kopf.event(body, type="Normal", reason="AccessExpired",
               message=f"{kind} {target_name}: access through this grant ended ({why})")


def _apply(runtime, obj: dict, namespace: str, kind: str, target_name: str) -> dict:
    """Label the target as the injection's podSelector asks; what was added."""
    cluster = runtime.cluster
    if not grants.honoured(obj, runtime.key(namespace)):
        raise Refused("this AccessGrant was not stamped by keyhole's webhook (or was edited): "
                      "keyhole honours no grant it did not see created")
    if (grants.expires(obj) or 0) <= time.time():
        raise Refused("its time was over before the operator saw it")
    injection = (obj.get("spec") or {}).get("injection")
    found = cluster.read_injection(namespace, injection) or cluster.read_cluster_injection(
        injection)
    wanted = grants.selector_labels(found, injection)
    target = cluster.read_target(kind, namespace, target_name)
    if target is None:
        raise Refused(f"{kind} {namespace}/{target_name} does not exist")
    added = grants.to_add(wanted, grants.target_labels(target, kind))
    if added:
        cluster.label_target(kind, namespace, target_name, grants.label_patch(kind, added))
    return added


def _revoke(cluster, namespace: str, kind: str, target_name: str, added: dict) -> None:
    target = cluster.read_target(kind, namespace, target_name)
    if target is None or not added:
        return
    remove = grants.to_remove(added, grants.target_labels(target, kind))
    if remove:
        cluster.label_target(kind, namespace, target_name, grants.label_patch(kind, remove))
