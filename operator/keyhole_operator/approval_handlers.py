"""kopf's side of approvals: the webhook every decision passes, and the watch that wakes the
sidecars waiting for one. The decisions themselves are ``approvals``'."""

from __future__ import annotations

import asyncio
import time

import kopf
from kubernetes.client.rest import ApiException

from keyhole_common.approvals import APPROVED, GROUP, PLURAL, VERSION
from keyhole_operator import approvals, metrics
from keyhole_operator.approval_desk import describe
from keyhole_operator.grants import access_grant

DECIDE_WEBHOOK = "keyhole-decide-approval"


def _plain(body) -> dict:
    return {k: dict(v) if hasattr(v, "items") else v for k, v in dict(body or {}).items()}


def _deny(problem: str) -> None:
    metrics.approval_decisions.labels("refused").inc()
    metrics.admissions.labels(DECIDE_WEBHOOK, "denied").inc()
    raise kopf.AdmissionError(problem, code=403)


@kopf.on.mutate(GROUP, VERSION, PLURAL, operations=["UPDATE"], subresource="status",
                id=DECIDE_WEBHOOK, side_effects=False)
async def decide(old: kopf.Body, new: kopf.Body, userinfo: dict, patch: kopf.Patch, memo,
                 **_) -> None:
    """A person's decision: checked (final, in time, not the agent's own, the ``approve``
    verb, nobody the agent could act as), then stamped with who and when, and sealed."""
    runtime = memo["runtime"]
    before, after = _plain(old), _plain(new)
    namespace = (before.get("metadata") or {}).get("namespace") or ""
    name = (before.get("metadata") or {}).get("name") or ""
    user = str((userinfo or {}).get("username") or "")
    groups = [str(g) for g in (userinfo or {}).get("groups") or []]
    try:
        stamped = approvals.check_decision(before, after, user, runtime.key(namespace),
                                           time.time())
    except approvals.Refused as exc:
        _deny(str(exc))
    if stamped is None:
        return
    cluster = runtime.cluster
    if not await asyncio.to_thread(cluster.allowed, approvals.may_decide(namespace, name, user,
                                                                         groups)):
        _deny(f"{user} may not decide approvals in namespace {namespace}: that takes the "
              f"'{approvals.APPROVE_VERB}' verb on approvalrequests.keyhole.dev (the chart's "
              "keyhole-approver ClusterRole, bound to the groups in approvals.approverGroups)")
    account = ((before.get("spec") or {}).get("pod") or {}).get("serviceAccount") or "default"
    for what, review in approvals.acting_as(namespace, account, user, groups):
        if await asyncio.to_thread(cluster.allowed, review):
            _deny(f"the agent's ServiceAccount {namespace}/{account} could {what}: it could "
                  f"act as {user}, so {user} may not decide its approvals")
    patch.status["decision"] = stamped
    metrics.admissions.labels(DECIDE_WEBHOOK, "allowed").inc()
    metrics.approval_decisions.labels(approvals.VERDICTS[stamped["verdict"]]).inc()


@kopf.on.startup(id="approvals-retention")
async def start_retention(memo, logger, **_) -> None:
    """Delete what has been over for ``--approvals-keep-seconds``, every few minutes (in each
    replica: a delete that lost the race is a 404, ignored)."""
    runtime = memo["runtime"]
    keep = runtime.settings.approvals_keep_seconds

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(min(max(keep / 4, 1.0), 300.0))
            try:
                found = await asyncio.to_thread(runtime.cluster.list_all_approvals)
                now = time.time()
                for obj in found:
                    if approvals.collectable(obj, now, keep):
                        meta = obj["metadata"]
                        await asyncio.to_thread(runtime.cluster.delete_approval,
                                                meta["namespace"], meta["name"])
            except Exception as exc:  # the next sweep tries again
                logger.warning(f"approvals retention: cannot sweep ({type(exc).__name__})")

    memo["approvals_retention"] = asyncio.get_running_loop().create_task(sweep_forever())


@kopf.on.cleanup(id="approvals-retention-stop")
async def stop_retention(memo, **_) -> None:
    task = memo.get("approvals_retention")
    if task is not None:
        task.cancel()


@kopf.on.event(GROUP, VERSION, PLURAL, id="approval-changed")
async def approval_changed(type: str, body: kopf.Body, namespace: str, memo, **_) -> None:
    """Wake the channel's waiters; tell the pod and the object what was decided."""
    memo["runtime"].board.changed(namespace)
    decision = (body.get("status") or {}).get("decision") or {}
    if type != "MODIFIED" or not decision.get("verdict"):
        return
    spec = body.get("spec") or {}
    grant = int(decision.get("grantSeconds") or 0)
    message = (f"{describe(spec)}: {decision['verdict'].lower()} by {decision.get('decidedBy')}"
               + (f" for {grant}s" if grant else "")
               + (f" ({decision['reason']})" if decision.get("reason") else ""))
    reason = "ApprovalApproved" if decision["verdict"] == "Approved" else "ApprovalDenied"
    pod = spec.get("pod") or {}
    kopf.event([body, {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": pod.get("name"), "namespace": namespace, "uid": pod.get("uid")}}],
        type="Normal", reason=reason, message=message[:1000])
    if spec.get("kind") == "access" and decision["verdict"] == "Approved":
        await _grant_access(memo["runtime"], {k: dict(v) if hasattr(v, "items") else v
                                              for k, v in dict(body).items()}, namespace)


async def _grant_access(runtime, obj: dict, namespace: str) -> None:
    """An agent's ask for access, approved: the AccessGrant it asked for, stamped with who
    approved it (the decision's seal vouches for them), for the time they gave."""
    key = runtime.key(namespace)
    if not approvals.honoured(obj, key) or approvals.state(obj, key, time.time()).state != \
            APPROVED:
        return  # not keyhole's, or the decision carries no seal: nothing is granted
    grant = access_grant(obj, key, time.time())
    try:
        await asyncio.to_thread(runtime.cluster.create_grant, namespace, grant)
    except ApiException as exc:
        if exc.status != 409:  # made already (the event seen twice)
            raise
