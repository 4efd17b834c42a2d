"""The operator channel: sidecars lease slices of the budgets their pods share.

DESIGN.md, *The operator channel*: HTTPS on a port of its own (not the webhook's); every call
carries a projected ServiceAccount token bound to the sidecar's pod (audience
``keyhole.dev``), which the API server checks (TokenReview); the operator reads that pod and
answers only for injections its signed routes name. The count itself lives in the
injection's ``status.ledger`` (see ``ledger``), written with the object's resourceVersion as
a precondition: every replica serves the channel, all agree on one count, and it outlives
them.

``POST /v1/leases`` — ``{"injection": NAME, "lease": ID, "budgets": [{"name", "window",
"tokens", "usd", "want"}]}`` → ``{"budgets": [{"name", "window", "allowance", "granted",
"left", "expiresIn"}]}``.

``POST /v1/routes`` — → ``{"routes": ANNOTATION}``: the pod's signed routes as they are now in
the API server, so a revocation reaches the sidecar in seconds rather than at the kubelet's
next sync of its downward-API file. The sidecar checks the signature as it does the file's:
the channel can carry only what the operator signed.

``POST /v1/values`` — → ``{"injections": {NAME: {"values": {"SECRET/KEY": BASE64},
"missing": {...}}}, "refused": {NAME: WHY}}``: the Secret values of the pod's cluster
injections, read from the central namespace (``values``), for those that serve it now.

``POST /v1/identity`` — ``{"injection": NAME}`` → ``{"token", "expiresIn", "subject"}``: a token
of a federated injection's own ServiceAccount in keyhole's namespace (``identities``), for a pod
the injection serves now; ``POST /v1/identity/exchanges`` — how the sidecar's last exchange at
the provider went, kept in the injection's ``status.workloadIdentity``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from kubernetes.client.rest import ApiException

from keyhole_common.approvals import (
    ACCESS_PATH,
    APPROVALS_PATH,
    MAX_GRANT_SECONDS,
    WITHDRAW_PATH,
    Ask,
)
from keyhole_common.channel import (
    EXCHANGES_PATH,
    IDENTITY_PATH,
    LEASES_PATH,
    ROUTES_PATH,
    VALUES_PATH,
    Report,
    unverified_claims,
)
from keyhole_common.spec import SignatureError, parse_injection, verify
from keyhole_common.spec.model import Budget, SecretInjection, WorkloadIdentity
from keyhole_operator import identities, ledger, metrics, values
from keyhole_operator.annotations import INJECTIONS
from keyhole_operator.approval_desk import Board, Desk, Refusal
from keyhole_operator.approvals import Pod, owner_of
from keyhole_operator.identity_desk import IdentityDesk
from keyhole_operator.routes import namespace_key

log = logging.getLogger("keyhole.operator.channel")

AUDIENCE = "keyhole.dev"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
MAX_BODY = 64 * 1024
_LEASE_ID = re.compile(r"^[0-9a-f]{16,64}$")
_INJECTION = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SERVICE_ACCOUNT = re.compile(r"^system:serviceaccount:([^:]+):([^:]+)$")
CONFLICT_RETRIES = 8
REVIEW_CACHE_SECONDS = 300.0


class ChannelError(Exception):
    """A refused call: its HTTP status and what to do, for the sidecar's log."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True, slots=True)
class Caller:
    namespace: str
    service_account: str
    pod: str
    uid: str


def caller(review: dict) -> Caller:
    """Who a TokenReview's status says the token belongs to: a pod-bound ServiceAccount token
    meant for keyhole, or ChannelError."""
    if not review.get("authenticated"):
        raise ChannelError(401, "the token was not accepted by the API server (expired, or "
                                "not meant for audience keyhole.dev)")
    if AUDIENCE not in (review.get("audiences") or [AUDIENCE]):
        raise ChannelError(401, "the token is not meant for audience keyhole.dev")
    user = review.get("user") or {}
    found = _SERVICE_ACCOUNT.match(user.get("username") or "")
    extra = user.get("extra") or {}
    pod, uid = (extra.get(POD_NAME) or [None])[0], (extra.get(POD_UID) or [None])[0]
    if not found or not pod or not uid:
        raise ChannelError(403, "the token is not bound to a pod: the channel answers only "
                                "a sidecar's projected ServiceAccount token")
    return Caller(found.group(1), found.group(2), pod, uid)


def pod_routes(pod: dict | None, who: Caller) -> str:
    """The pod's routes annotation, once the pod is the one the token is bound to; 403 for a
    pod keyhole did not inject (it carries none)."""
    meta = (pod or {}).get("metadata") or {}
    if pod is None or meta.get("uid") != who.uid:
        raise ChannelError(403, f"pod {who.namespace}/{who.pod} the token is bound to no longer "
                                "exists")
    if ((pod.get("spec") or {}).get("serviceAccountName") or "default") != who.service_account:
        raise ChannelError(403, "the token's ServiceAccount is not the pod's")
    routes = (meta.get("annotations") or {}).get(INJECTIONS)
    if not routes:
        raise ChannelError(403, f"pod {who.namespace}/{who.pod} carries no routes signed by "
                                "the operator")
    return routes


def signed_document(pod: dict | None, who: Caller, key: bytes) -> dict:
    """The pod's routes, verified; ChannelError when the pod is not the one the token is bound
    to or carries no routes the operator signed."""
    routes = pod_routes(pod, who)
    try:
        document = json.loads(routes)
        verify(document, key)
    except (ValueError, SignatureError):
        raise ChannelError(403, f"pod {who.namespace}/{who.pod} carries no routes signed by "
                                "the operator") from None
    return document


def signed_item(pod: dict | None, who: Caller, injection: str, key: bytes,
                for_what: str = "it may not spend its budgets") -> SecretInjection:
    """The injection as the pod's signed routes carry it; ChannelError when the pod is not
    the one the token is bound to or its routes do not name ``injection``."""
    document = signed_document(pod, who, key)
    for item in document.get("items") or []:
        if (item.get("metadata") or {}).get("name") == injection:
            spec, _ = parse_injection({**item, "metadata": {"name": injection,
                                                           "namespace": who.namespace}},
                                      f"pod {who.pod}", signed=True)
            if spec is not None:
                return spec
    raise ChannelError(403, f"pod {who.namespace}/{who.pod} is not served by injection "
                            f"{injection!r}: {for_what}")


def token_lifetime(token: str, now: float) -> float:
    """Seconds until the token's ``exp`` (read, not verified: the API server verified it);
    0 when it cannot be read. Only bounds how long a review is remembered."""
    try:
        return max(float(unverified_claims(token)["exp"]) - now, 0.0)
    except (KeyError, TypeError, ValueError):
        return 0.0


def parse_ask(body: object) -> tuple[str, str, list[ledger.Report]]:
    """The injection, lease id and reports of a call's body, or ChannelError (400)."""
    if not isinstance(body, dict):
        raise ChannelError(400, "the body must be a JSON object")
    injection, lease, budgets = body.get("injection"), body.get("lease"), body.get("budgets")
    if not isinstance(injection, str) or not injection:
        raise ChannelError(400, "'injection' must name the injection")
    if not isinstance(lease, str) or not _LEASE_ID.match(lease):
        raise ChannelError(400, "'lease' must be 16 to 64 lowercase hex digits")
    if not isinstance(budgets, list) or not 0 < len(budgets) <= 64:
        raise ChannelError(400, "'budgets' must list 1 to 64 reports")
    try:
        reports = [Report.from_json(entry) for entry in budgets]
    except ValueError as exc:
        raise ChannelError(400, str(exc)) from None
    return injection, lease, reports


def parse_access(body: object) -> tuple[str, int, str | None]:
    """An ask for access: the injection, the seconds asked for, and why; or ChannelError."""
    if not isinstance(body, dict):
        raise ChannelError(400, "the body must be a JSON object")
    injection, seconds, reason = body.get("injection"), body.get("seconds"), body.get("reason")
    if not isinstance(injection, str) or not _INJECTION.match(injection):
        raise ChannelError(400, "'injection' must name an injection")
    if isinstance(seconds, bool) or not isinstance(seconds, int) or \
            not 0 < seconds <= MAX_GRANT_SECONDS:
        raise ChannelError(400, f"'seconds' must be a whole number from 1 to "
                                f"{MAX_GRANT_SECONDS}")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 1000
                               or not reason.isprintable()):
        raise ChannelError(400, "'reason' must be one printable line of at most 1000 "
                                "characters")
    return injection, seconds, reason or None


def shared_budgets(spec: SecretInjection | None) -> dict[str, Budget | None]:
    """What the channel counts for an injection: its shared budgets, and the day's usage."""
    if spec is None or spec.llm is None:
        return {}
    found: dict[str, Budget | None] = {ledger.USAGE: None}
    found.update({b.name: b for b in spec.llm.budgets if b.shared})
    return found


def apply(entries: list[dict], live: SecretInjection | None, signed: SecretInjection,
          holder: ledger.Holder, reports: list[ledger.Report], now: float,
          lease_seconds: float) -> tuple[list[dict], list[ledger.Grant]]:
    """Record every report of one call and grant its slices: the new ledger and the grants.
    A budget counts when the injection has it now and the pod's routes carry it too."""
    budgets, carried = shared_budgets(live), shared_budgets(signed)
    by_name = {e["name"]: e for e in entries}
    grants = []
    for report in reports:
        if report.name not in budgets or report.name not in carried:
            raise ChannelError(404, f"injection {signed.name!r} has no budget "
                                    f"{report.name!r} shared by its pods")
        entry, grant = ledger.settle(by_name.get(report.name), report.name,
                                     budgets[report.name], holder, report, now, lease_seconds)
        by_name[report.name] = entry
        grants.append(grant)
    kept = [by_name[name] for name in budgets if name in by_name]  # removed budgets drop out
    return kept, grants


class Channel:
    """The channel's decisions over the Kubernetes calls they need (``Cluster``)."""

    def __init__(self, cluster, master_key: bytes, *, lease_seconds: float = ledger.LEASE_SECONDS,
                 central_namespace: str = "keyhole-system",
                 clock: Callable[[], float] = time.time, board: Board | None = None,
                 notifier=None, home: str | None = None):
        self.cluster, self.master_key = cluster, master_key
        # Federated injections' identities: ServiceAccounts of keyhole's own namespace.
        self.identities = IdentityDesk(cluster, home or central_namespace, clock)
        self.desk = Desk(cluster, board or Board(), clock, notifier)
        self.central_namespace = central_namespace
        self.lease_seconds, self.clock = lease_seconds, clock
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._reviews: dict[str, tuple[float, dict]] = {}
        self._guard = threading.Lock()

    def _review(self, token: str) -> dict:
        """TokenReviews, remembered while the token lives, at most ``REVIEW_CACHE_SECONDS``
        (a sidecar calls every few seconds; its pod is read at every call, so a deleted pod is
        refused at once all the same). A refusal is not remembered."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._guard:
            hit = self._reviews.get(digest)
            if hit and hit[0] > now:
                return hit[1]
        review = self.cluster.review_token(token, AUDIENCE)
        if review.get("authenticated"):
            keep = min(REVIEW_CACHE_SECONDS, token_lifetime(token, time.time()))
            with self._guard:
                if len(self._reviews) > 4096:
                    self._reviews.clear()
                self._reviews[digest] = (now + keep, review)
        return review

    def routes(self, token: str) -> dict:
        """The routes the caller's pod carries now, as the operator signed them: the pod's
        ``keyhole.dev/injections`` annotation read from the API server, not waiting for the
        kubelet to refresh the sidecar's copy of it (on its own schedule)."""
        who = caller(self._review(token))
        pod = self.cluster.read_pod(who.namespace, who.pod)
        return {"routes": pod_routes(pod, who)}

    def values(self, token: str) -> dict:
        """The Secret values of the caller's pod's cluster injections that serve it now: read
        from the central namespace at each call, so a rotation reaches the sidecar at its
        next call. A pod whose signed routes carry no cluster injection learns nothing."""
        who = caller(self._review(token))
        pod = self.cluster.read_pod(who.namespace, who.pod)
        document = signed_document(pod, who, namespace_key(self.master_key, who.namespace))
        if not values.signed_cluster_items(document):
            raise ChannelError(403, f"pod {who.namespace}/{who.pod} is served by no "
                                    "ClusterSecretInjection")
        labels = self.cluster.namespace_labels(who.namespace)
        central = self.central_namespace
        return values.answer(
            document, pod, who.namespace, labels,
            lambda name: values.live_cluster_injection(self.cluster.read_cluster_injection(name)),
            lambda ref: self.cluster.read_labelled_secret(central, ref.name), central)

    def _federated(self, token: str, body: object) -> tuple[Caller, str | None, str,
                                                           WorkloadIdentity]:
        """(the caller, the injection's namespace or None, its name, its workloadIdentity),
        once the caller's pod is served by it now and it federates; ChannelError otherwise."""
        who = caller(self._review(token))
        injection = body.get("injection") if isinstance(body, dict) else None
        if not isinstance(injection, str) or not _INJECTION.match(injection):
            raise ChannelError(400, "'injection' must name an injection")
        pod = self.cluster.read_pod(who.namespace, who.pod)
        document = signed_document(pod, who, namespace_key(self.master_key, who.namespace))

        def live(namespace: str | None, name: str) -> SecretInjection | None:
            if namespace is None:
                return values.live_cluster_injection(self.cluster.read_cluster_injection(name))
            return values.live_injection(self.cluster.read_injection(namespace, name),
                                         namespace, name)

        try:
            owner, spec = identities.identity_for(document, pod, who.namespace,
                                                  self.cluster.namespace_labels(who.namespace),
                                                  injection, live)
        except PermissionError as exc:
            raise ChannelError(403, str(exc)) from None
        return who, owner, injection, spec

    def identity(self, token: str, body: object) -> dict:
        """A token of the injection's own identity, for the sidecar to exchange at its
        provider: only for a pod the injection serves now, and only while it federates."""
        _, owner, injection, spec = self._federated(token, body)
        try:
            value, seconds = self.identities.token(owner, injection, spec.audience)
        except ValueError as exc:
            raise ChannelError(422, str(exc)) from None
        account = identities.account_name(owner, injection)
        return {"token": value, "expiresIn": int(seconds),
                "subject": identities.subject(self.identities.home, account)}

    def exchanges(self, token: str, body: object) -> dict:
        """A sidecar's report of its last exchange, kept in the injection's status."""
        try:
            exchange = identities.Exchange.from_json(body)
        except ValueError as exc:
            caller(self._review(token))  # first: who asks
            raise ChannelError(400, str(exc)) from None
        who, owner, injection, _ = self._federated(token, body)
        written = self.identities.report(owner, injection, who.pod, exchange)
        return {"recorded": written}

    def _asking_pod(self, token: str, injection: object) -> tuple[Pod, bytes]:
        """The caller's pod, once its signed routes name ``injection``, and its key."""
        who = caller(self._review(token))
        pod = self.cluster.read_pod(who.namespace, who.pod)
        key = namespace_key(self.master_key, who.namespace)
        signed_item(pod, who, str(injection), key, "it asks no approvals of it")
        return Pod(who.namespace, who.pod, who.uid, who.service_account, owner_of(pod)), key

    async def approval(self, token: str, body: object) -> dict:
        """Record (or find) the approval a sidecar holds a request for; wait for a decision."""
        try:
            ask = Ask.from_json(body)
        except ValueError as exc:
            await asyncio.to_thread(lambda: caller(self._review(token)))  # first: who asks
            raise ChannelError(400, str(exc)) from None
        pod, key = await asyncio.to_thread(self._asking_pod, token, ask.injection)
        try:
            return (await self.desk.ask(pod, ask, key)).as_json()
        except Refusal as exc:
            raise ChannelError(exc.status, exc.message) from None

    def access(self, token: str, body: object) -> dict:
        """An agent's ask for an injection its pod lacks, recorded for a person to decide."""
        who = caller(self._review(token))
        injection, seconds, reason = parse_access(body)
        pod = self.cluster.read_pod(who.namespace, who.pod)
        key = namespace_key(self.master_key, who.namespace)
        signed_document(pod, who, key)  # a pod keyhole injected, and the token's own
        if self.cluster.read_injection(who.namespace, injection) is None and \
                self.cluster.read_cluster_injection(injection) is None:
            raise ChannelError(404, f"no SecretInjection {injection!r} in namespace "
                                    f"{who.namespace} (nor a ClusterSecretInjection)")
        try:
            return self.desk.ask_access(Pod(who.namespace, who.pod, who.uid,
                                            who.service_account, owner_of(pod)), injection,
                                        seconds, reason, key)
        except Refusal as exc:
            raise ChannelError(exc.status, exc.message) from None

    def withdraw(self, token: str, body: object) -> dict:
        """The client left: its pending approval is deleted."""
        name = body.get("name") if isinstance(body, dict) else None
        injection = body.get("injection") if isinstance(body, dict) else None
        if not isinstance(name, str) or not isinstance(injection, str):
            caller(self._review(token))
            raise ChannelError(400, "'name' and 'injection' must name the ApprovalRequest and "
                                    "its injection")
        pod, key = self._asking_pod(token, injection)
        try:
            return self.desk.withdraw(pod, name, key)
        except Refusal as exc:
            raise ChannelError(exc.status, exc.message) from None

    def lease(self, token: str, body: object) -> dict:
        """One call, answered: the grants, or ChannelError."""
        who = caller(self._review(token))  # nobody unauthenticated learns anything
        injection, lease_id, reports = parse_ask(body)
        pod = self.cluster.read_pod(who.namespace, who.pod)
        signed = signed_item(pod, who, injection, namespace_key(self.master_key,
                                                                 who.namespace))
        holder = ledger.Holder(who.pod, who.uid, lease_id)
        with self._guard:
            lock = self._locks.setdefault((who.namespace, injection), threading.Lock())
        with lock:  # one writer per injection in this replica; resourceVersion across them
            for _ in range(CONFLICT_RETRIES):
                obj = self.cluster.read_injection(who.namespace, injection)
                if obj is None:
                    raise ChannelError(404, f"injection {who.namespace}/{injection} no longer "
                                            "exists")
                live = values.live_injection(obj, who.namespace, injection)
                entries = list(((obj.get("status") or {}).get("ledger")) or [])
                kept, grants = apply(entries, live, signed, holder, reports, self.clock(),
                                     self.lease_seconds)
                status = {"ledger": kept, "usage": ledger.usage_summary(kept)}
                if self.cluster.write_ledger(who.namespace, injection,
                                             obj["metadata"]["resourceVersion"], status):
                    return {"budgets": [g.as_json() for g in grants]}
                metrics.ledger_conflicts.inc()
        raise ChannelError(503, "the injection changed under every attempt to count; call "
                                "again")


def _answer(status: int, body: dict) -> web.Response:
    metrics.channel_calls.labels(str(status)).inc()
    return web.json_response(body, status=status)


def build_app(channel: Channel) -> web.Application:
    """Every call of the channel: its path, who answers it, and whether it carries a body."""
    calls = {LEASES_PATH: (channel.lease, True), ROUTES_PATH: (channel.routes, False),
             VALUES_PATH: (channel.values, False), APPROVALS_PATH: (channel.approval, True),
             WITHDRAW_PATH: (channel.withdraw, True), ACCESS_PATH: (channel.access, True),
             IDENTITY_PATH: (channel.identity, True), EXCHANGES_PATH: (channel.exchanges, True)}
    app = web.Application(client_max_size=MAX_BODY)
    for path, (answer_with, with_body) in calls.items():
        app.router.add_post(path, _handler(answer_with, with_body))
    return app


def _handler(answer_with, with_body: bool):
    async def handle(request: web.Request) -> web.Response:
        return await _call(request, answer_with, with_body=with_body)
    return handle


async def _call(request: web.Request, answer_with, *, with_body: bool) -> web.Response:
    """Check the call's shape, answer it in a worker thread (the Kubernetes client blocks),
    and turn every failure into a JSON answer that says what to do."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _answer(401, {"error": "send the pod's projected token as "
                                      "'Authorization: Bearer ...'"})
    if (request.content_length or 0) > MAX_BODY:
        return _answer(413, {"error": f"the body is over {MAX_BODY} bytes"})
    args: tuple = (token.strip(),)
    if with_body:
        try:
            args += (json.loads(await request.content.read(MAX_BODY + 1)),)
        except ValueError:
            return _answer(400, {"error": "the body is not JSON"})
    try:
        if asyncio.iscoroutinefunction(answer_with):  # it waits in this loop, not a thread
            answer = await answer_with(*args)
        else:
            answer = await asyncio.to_thread(answer_with, *args)
    except ChannelError as exc:
        log.info("channel: refused (%s): %s", exc.status, exc.message)
        return _answer(exc.status, {"error": exc.message})
    except (ApiException, OSError) as exc:
        log.warning("channel: the API server did not answer: %s", _what(exc))
        return _answer(503, {"error": "the operator cannot reach the Kubernetes API now; "
                                      "call again"})
    except Exception:  # a bug: said in the log, and a JSON answer the sidecar can read
        log.exception("channel: cannot answer %s", request.path)
        return _answer(500, {"error": "the operator failed to answer (its log says why)"})
    return _answer(200, answer)


def _what(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    return f"HTTP {status}" if status else type(exc).__name__


def serve(channel: Channel, host: str, port: int, certfile: str, keyfile: str) -> None:
    """Serve the channel over TLS from a thread of its own (kopf owns the main loop)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    started = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(build_app(channel), access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, host, port, ssl_context=context).start())
        log.info("operator channel on %s:%d", host, port)
        started.set()
        loop.run_forever()

    threading.Thread(target=run, name="channel", daemon=True).start()
    started.wait(10)
