"""Waiting for a person's yes (docs/approvals.md): the sidecar's side of approvals.

A request that needs approval is held here while the operator records an ApprovalRequest and
a person decides. Fail closed: no operator channel, the operator away, the sidecar restarted
(nothing held survives it), or the time up — the request is refused, never sent. A grant
(approved with ``--for``) is counted down on this sidecar's own monotonic clock from the
seconds the operator said were left, so it ends on time with the operator down and whatever
the two clocks read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from keyhole_common.approvals import (
    APPROVED,
    DENIED,
    EXPIRED,
    GONE,
    MAX_WAIT,
    PENDING,
    Answer,
    Ask,
)
from keyhole_sidecar.operator_channel import ChannelBusy, ChannelRefused
from keyhole_sidecar.usage.shared import ChannelUnavailable

log = logging.getLogger("keyhole.approvals")

MAX_HELD = 64
"""Requests this sidecar holds for approval at once; more are refused (429) at once."""
RETRY_PAUSE = 1.0
"""Seconds between calls while the operator does not answer (the held request waits on)."""


@dataclass(frozen=True, slots=True)
class Hold:
    """What a person must approve before a request is sent: set by the stage that knows (a
    rule with approval, an MCP use with approval) and asked by the approvals stage."""

    injection: str
    digest: str
    timeout: float
    what: dict
    """What a person reads: kind, host, method, path, and subject and arguments (redacted)."""
    answer_as: tuple[object, str] | None = None
    """An MCP use: its JSON-RPC id and method, so a refusal is answered in MCP's terms."""

    def describe(self) -> str:
        what = self.what
        if what.get("subject") is not None:
            return f"the {what['kind']} {what['subject']!r}"
        return f"{what.get('method')} https://{what.get('host')}{what.get('path')}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the wait ended: ``approved`` (now, or by a grant still alive: ``granted``),
    ``denied``, ``timeout``, ``unavailable`` (no operator to ask), ``backlog`` (too many
    held) or ``gone`` (the object was deleted while the request waited)."""

    decision: str
    name: str | None = None
    by: str | None = None
    reason: str | None = None
    waited: float = 0.0
    detail: str = ""


class ApprovalUnavailable(Exception):
    """The operator did not answer, or said no to the call itself."""


class AskRefused(ApprovalUnavailable):
    """The operator said no to an ask for access (no such injection, too many waiting)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ApprovalBacklog(ApprovalUnavailable):
    """The operator refused to record one more: the pod has too many waiting."""


class Approvals:
    """The requests held for approval, and the grants alive, of this sidecar."""

    def __init__(self, channel=None, clock: Callable[[], float] = time.monotonic,
                 max_held: int = MAX_HELD):
        self.channel, self.clock, self.max_held = channel, clock, max_held
        self.grants: dict[tuple[str, str], float] = {}
        """(injection, digest) → when the grant ends, on ``clock``."""
        self.held = 0
        self._since: list[float] = []
        self._withdrawing: set[asyncio.Task] = set()

    def oldest_wait(self) -> float:
        """Seconds the longest-held request has waited (0: none): for the alert."""
        return max((self.clock() - t for t in self._since), default=0.0)

    def granted(self, hold: Hold) -> float:
        """Seconds left of a grant for exactly this request, or 0."""
        ends = self.grants.get((hold.injection, hold.digest))
        if ends is None:
            return 0.0
        left = ends - self.clock()
        if left <= 0:
            del self.grants[(hold.injection, hold.digest)]
            return 0.0
        return left

    async def decide(self, hold: Hold) -> Outcome:
        """Hold ``hold``'s request until a person decides, its timeout passes, or the
        client leaves (cancelled: the ApprovalRequest is withdrawn)."""
        if self.granted(hold):
            return Outcome("granted")
        if self.channel is None:
            return Outcome("unavailable", detail="it needs a person's approval, and this "
                           "sidecar runs without the operator channel (--operator-url) that "
                           "asks for it")
        if self.held >= self.max_held:
            return Outcome("backlog", detail=f"this sidecar already holds {self.held} "
                           "requests for approval; decide or let them time out first")
        self.held += 1
        started = self.clock()
        name: str | None = None
        self._since.append(started)
        try:
            deadline = started + hold.timeout
            while True:
                left = deadline - self.clock()
                if left <= 0:
                    return Outcome("timeout", name, waited=self.clock() - started)
                # The first call only records it (its name is what a withdrawal needs);
                # the next ones wait for the decision.
                wait = 0.0 if name is None else min(left, MAX_WAIT)
                try:
                    answer = await self._ask(hold, name, wait)
                except ApprovalBacklog as exc:
                    return Outcome("backlog", detail=str(exc), waited=self.clock() - started)
                except ApprovalUnavailable as exc:
                    if name is None:  # nothing recorded: nobody can approve it
                        return Outcome("unavailable", detail=str(exc),
                                       waited=self.clock() - started)
                    log.warning("approval %s: %s; the request waits on", name, exc)
                    await asyncio.sleep(min(RETRY_PAUSE, max(deadline - self.clock(), 0)))
                    continue
                name = answer.name
                if answer.state != PENDING:
                    return self._ended(hold, answer, self.clock() - started)
        except asyncio.CancelledError:
            if name is not None:
                self._withdraw(hold.injection, name)
            raise
        finally:
            self.held -= 1
            self._since.remove(started)

    def _ended(self, hold: Hold, answer: Answer, waited: float) -> Outcome:
        if answer.state == APPROVED:
            if answer.grant_seconds > 0:
                self.grants[(hold.injection, hold.digest)] = self.clock() + answer.grant_seconds
            return Outcome("approved", answer.name, answer.by, answer.reason, waited)
        if answer.state == DENIED:
            return Outcome("denied", answer.name, answer.by, answer.reason, waited)
        if answer.state == EXPIRED:
            return Outcome("timeout", answer.name, waited=waited)
        if answer.state == GONE:
            return Outcome("gone", answer.name, waited=waited,
                           detail=f"ApprovalRequest {answer.name} was deleted before anyone "
                                  "decided")
        return Outcome("unavailable", answer.name, waited=waited,
                       detail=f"the operator answered {answer.state!r}")

    async def _ask(self, hold: Hold, name: str | None, wait: float) -> Answer:
        ask = Ask(hold.injection, hold.digest, hold.timeout, wait, hold.what, name)
        try:
            return Answer.from_json(await self.channel.approval(ask.as_json()))
        except ValueError as exc:
            raise ApprovalUnavailable(f"the operator's answer was not understood ({exc})") \
                from None
        except ChannelBusy as exc:
            raise ApprovalBacklog(str(exc)) from None
        except ChannelUnavailable as exc:  # and the operator's refusals
            raise ApprovalUnavailable(str(exc)) from None

    async def ask_access(self, injection: str, seconds: int, reason: str | None) -> dict:
        """An agent's ask for access, passed to the operator (``proxy.access``)."""
        if self.channel is None:
            raise ApprovalUnavailable("this sidecar runs without the operator channel")
        try:
            return await self.channel.access({"injection": injection, "seconds": seconds,
                                              "reason": reason})
        except ChannelRefused as exc:
            raise AskRefused(str(exc), exc.status) from None
        except ChannelUnavailable as exc:
            raise ApprovalUnavailable(str(exc)) from None

    def _withdraw(self, injection: str, name: str) -> None:
        """The client left: tell the operator, in the background (this task is ending)."""
        async def withdraw() -> None:
            try:
                await self.channel.withdraw({"injection": injection, "name": name})
            except Exception as exc:
                log.warning("approval %s: the client left, and the operator did not hear "
                            "it (%s); it times out on its own", name, exc)
        task = asyncio.get_running_loop().create_task(withdraw())
        self._withdrawing.add(task)
        task.add_done_callback(self._withdrawing.discard)

    async def close(self) -> None:
        if self._withdrawing:
            await asyncio.wait(self._withdrawing, timeout=5)
        if self.channel is not None:
            await self.channel.close()
