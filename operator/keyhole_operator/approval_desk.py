"""The channel's approval calls: record what a sidecar holds, wait for a person's decision,
withdraw what a client gave up on. Decisions are ``approvals``'; this is the I/O around them.

``POST /v1/approvals`` — an ``Ask`` → an ``Answer``, after at most ``wait`` seconds: the
object it created (or found: the same request asked again, a grant still alive) and what was
decided. The watch on ApprovalRequests (a kopf event handler) wakes the waiters of a
namespace, so a decision reaches the sidecar as soon as the operator sees it.

``POST /v1/approvals/withdraw`` — ``{"name": N}``: the client left; a pending object of the
caller's pod is deleted (the pod's Events keep what happened).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from keyhole_common.approvals import ACCESS_WAIT, GONE, PENDING, Answer, Ask, access_digest
from keyhole_operator import approvals, metrics
from keyhole_operator.approvals import MAX_PENDING_PER_POD, Pod

log = logging.getLogger("keyhole.operator.approvals")


REREAD = 1.0
"""Seconds between reads (a GET) of a waiting request's object when no watch event wakes it:
a replica that kopf's peering keeps from watching still answers within this."""


class Board:
    """Wakes those waiting on a namespace's ApprovalRequests when one of them changes: the
    watch calls ``changed`` from kopf's thread; the channel's calls wait in their own loop."""

    def __init__(self):
        self._guard = threading.Lock()
        self._versions: dict[str, int] = {}
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def version(self, namespace: str) -> int:
        with self._guard:
            return self._versions.get(namespace, 0)

    def changed(self, namespace: str) -> None:
        with self._guard:
            self._versions[namespace] = self._versions.get(namespace, 0) + 1
            waiters = list(self._waiters.get(namespace, ()))
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, namespace: str, seen: int, timeout: float) -> None:
        """Until the namespace changes after ``seen``, or ``timeout`` seconds."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._guard:
            if self._versions.get(namespace, 0) != seen:
                return
            self._waiters.setdefault(namespace, set()).add(entry)
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await entry[1].wait()
        except TimeoutError:
            pass
        finally:
            with self._guard:
                waiting = self._waiters.get(namespace, set())
                waiting.discard(entry)
                if not waiting:
                    self._waiters.pop(namespace, None)


class Refusal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Desk:
    def __init__(self, cluster, board: Board, clock: Callable[[], float] = time.time,
                 notifier=None):
        self.cluster, self.board, self.clock = cluster, board, clock
        self.notifier = notifier  # keyhole_operator.notify.Notifier: tells someone, or None
        self._creating = threading.Lock()

    async def ask(self, pod: Pod, ask: Ask, key: bytes) -> Answer:
        """The state of ``ask`` for ``pod`` once decided, or after ``ask.wait`` seconds (the
        wait holds no worker thread: the API calls do, one at a time)."""
        deadline = time.monotonic() + ask.wait
        seen = self.board.version(pod.namespace)
        answer = await asyncio.to_thread(self._look_or_create, pod, ask, key)
        while answer.state == PENDING and (left := deadline - time.monotonic()) > 0:
            await self.board.wait(pod.namespace, seen, min(left, REREAD))
            seen = self.board.version(pod.namespace)
            answer = await asyncio.to_thread(self._reread, pod, ask, answer.name, key)
        return answer

    def _reread(self, pod: Pod, ask: Ask, name: str, key: bytes) -> Answer:
        """The named object's state now: one GET, cheap enough to repeat every second."""
        found = self.cluster.read_approval(pod.namespace, name)
        named = Ask(ask.injection, ask.digest, ask.timeout, ask.wait, ask.what, name)
        answer, _ = approvals.look([found] if found else [], pod.uid, named, key, self.clock())
        return answer or Answer(name, GONE)

    def _look_or_create(self, pod: Pod, ask: Ask, key: bytes) -> Answer:
        with self._creating:  # in this replica, one object for a request asked twice at once
            objects = self.cluster.list_approvals(pod.namespace, pod.uid)
            if pod.workload is not None and ask.name is None:  # grants given its workload
                objects += self.cluster.list_approvals(pod.namespace, workload=pod.workload)
            found, waiting = approvals.look(objects, pod.uid, ask, key, self.clock(),
                                            pod.owner)
            if found is not None:
                return found
            if ask.name is not None:  # deleted while the sidecar waited
                return Answer(ask.name, GONE)
            if waiting >= MAX_PENDING_PER_POD:
                raise Refusal(429, f"pod {pod.namespace}/{pod.name} already has "
                                   f"{waiting} requests waiting for approval (at most "
                                   f"{MAX_PENDING_PER_POD}): decide or let them time out")
            created = self.cluster.create_approval(
                pod.namespace, approvals.manifest(pod, ask, key, self.clock()))
        name = created["metadata"]["name"]
        metrics.approvals_asked.inc()
        what = describe(created["spec"])
        message = (f"{what} waits for approval: kubectl keyhole approve {name} -n "
                   f"{pod.namespace} (or deny)")
        self.cluster.post_event(created, "Normal", "ApprovalRequested", message)
        self.cluster.post_event(_pod_ref(pod), "Normal", "ApprovalRequested",
                                f"{message}; ApprovalRequest {name}")
        log.info("approval %s/%s requested: %s", pod.namespace, name, what)
        if self.notifier is not None:
            self.notifier.approval_requested(created, what)
        return Answer(name, PENDING)

    def ask_access(self, pod: Pod, injection: str, seconds: int, reason: str | None,
                   key: bytes) -> dict:
        """An agent asks for an injection it lacks: an ApprovalRequest of kind access (the
        same ask again finds it). Nothing is granted until a person approves it; then the
        operator makes an AccessGrant for the pod (``approval_handlers``)."""
        what = {"kind": "access", "seconds": seconds, "reason": reason}
        ask = Ask(injection, access_digest(injection, seconds), ACCESS_WAIT, 0.0, what)
        answer = self._look_or_create(pod, ask, key)
        return {**answer.as_json(), "approve": f"kubectl keyhole approve {answer.name} -n "
                                               f"{pod.namespace}"}

    def withdraw(self, pod: Pod, name: str, key: bytes) -> dict:
        found = self.cluster.read_approval(pod.namespace, name)
        if found is None:
            return {"withdrawn": False}
        if not approvals.honoured(found, key) or (found["spec"].get("pod") or {}).get(
                "uid") != pod.uid:
            raise Refusal(403, f"ApprovalRequest {name} is not this pod's")
        if approvals.state(found, key, self.clock()).state != PENDING:
            return {"withdrawn": False}
        self.cluster.delete_approval(pod.namespace, name)
        self.cluster.post_event(_pod_ref(pod), "Normal", "ApprovalWithdrawn",
                                f"{describe(found['spec'])}: the client left before a decision; "
                                f"ApprovalRequest {name} withdrawn")
        return {"withdrawn": True}


def describe(spec: dict) -> str:
    """What the request would do, and through which injection: Events and the log."""
    if spec.get("kind") == "access":
        return approvals.what(spec)
    return f"{approvals.what(spec)}, injection {spec.get('injection')}"


def _pod_ref(pod: Pod) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid}}
