"""Budgets all pods of an injection share (``for: injection``): slices leased from the operator.

The count lives in the operator (the sidecar holds no API rights). This sidecar draws one
lease id at start and, per shared budget, holds a *slice*: it may count up to ``allowance``
(tokens or USD, cumulative in the window) until the slice expires. A request is admitted
while the slice has room for what is in flight; when it has not, the sidecar asks the
operator for more (reporting what it counted) before it decides. Every ``report_every``
seconds it reports what it counted, renews the slices it uses, gives back those it does not,
and reports the day's usage of every model API injection (``status.usage``).

When the operator does not answer, the slice in hand keeps serving until it expires (the
operator's ``--channel-lease-seconds``); then the budget's requests are refused (503,
``budget_unavailable``) until the operator answers again: fail closed, and say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from keyhole_common.channel import USAGE, Grant, Report, lease_body, window
from keyhole_common.spec.model import Budget, Llm
from keyhole_sidecar.usage.budgets import Asked, BudgetRefusal, applies
from keyhole_sidecar.usage.meter import Usage

log = logging.getLogger("keyhole.sidecar.budgets")

SLICE_SHARE = 20  # a slice asked for is a twentieth of the budget beyond what requests need
CALL_TIMEOUT = 5.0  # one call to the operator, at most


class ChannelUnavailable(Exception):
    """The operator did not answer, or refused: the message says which and why."""


class Channel(Protocol):
    """The wire to the operator (``keyhole_sidecar.operator_channel``)."""

    async def lease(self, body: dict) -> list[dict]: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class Slice:
    """What this sidecar's lease holds of one shared budget in one window."""

    window: float
    tokens: int = 0  # counted by this lease in the window
    usd: float = 0.0
    allowance: float = 0.0  # may count up to this (tokens or USD)
    expires: float = 0.0  # clock time; 0: never granted
    reserved: float = 0.0  # held by requests in flight (tokens or USD)
    used: bool = False  # a request came since the last report
    dirty: bool = False  # counted something not yet reported
    left: float | None = None  # what the operator said is left across the pods

    def counted(self, budget: Budget | None) -> float:
        return self.usd if budget is not None and budget.spend is not None else float(
            self.tokens)


@dataclass(slots=True)
class SharedTicket:
    entries: list[tuple[Slice, float]] = field(default_factory=list)


def _limit(budget: Budget) -> float:
    return float(budget.tokens if budget.tokens is not None else budget.spend or 0.0)


class SharedBudgets:
    def __init__(self, channel: Channel | None, clock: Callable[[], float],
                 report_every: float = 10.0,
                 on_refused: Callable[[str, str], None] | None = None):
        self.channel, self.clock, self.report_every = channel, clock, report_every
        self.lease = secrets.token_hex(16)
        self._slices: dict[tuple[str, str], Slice] = {}
        self._specs: dict[str, Llm] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._on_refused = on_refused
        self.last_error: str | None = None

    # -- the request path --------------------------------------------------------------------
    def _slice(self, injection: str, name: str, per: str) -> Slice:
        start, _ = window(self.clock(), per)
        held = self._slices.get((injection, name))
        if held is None or held.window != start:
            held = self._slices[(injection, name)] = Slice(window=start)
        return held

    async def admit(self, injection: str, llm: Llm, asked: Asked, reserve_usd: float,
                    priced: bool = True) -> SharedTicket | BudgetRefusal:
        """Admit a request on every shared budget that applies, reserving what it asked
        (``reserve_usd``: priced at admission; ``priced``: whether its model has a price)."""
        chosen = [b for b in llm.budgets if b.shared and applies(b, asked.model)]
        self._specs[injection] = llm
        ticket = SharedTicket()
        if not chosen:
            return ticket
        unpriced = next((b for b in chosen if b.spend is not None and asked.model is not None
                         and not priced), None)
        if unpriced is not None:  # never silently free
            if self._on_refused:
                self._on_refused(injection, unpriced.name)
            _, end = window(self.clock(), unpriced.per)
            return BudgetRefusal(injection, unpriced.name, end - self.clock(), end,
                                 f"injection {injection!r} has a spend budget ({unpriced.name}) "
                                 f"and model {asked.model!r} has no price: add it to "
                                 "spec.llm.prices")
        need = {b.name: (reserve_usd if b.spend is not None else float(asked.tokens))
                for b in chosen}
        slices = {b.name: self._slice(injection, b.name, b.per) for b in chosen}
        short = [b for b in chosen if self._short(slices[b.name], b, need[b.name])]
        unanswered = False
        if short and self.channel is not None:
            async with self._locks.setdefault(injection, asyncio.Lock()):
                if any(self._short(slices[b.name], b, need[b.name]) for b in short):
                    unanswered = not await self._renew(injection, llm, extra=need)
        now = self.clock()
        for budget in chosen:
            held = slices[budget.name]
            _, end = window(now, budget.per)
            spent = held.counted(budget) + held.reserved >= held.allowance
            refusal, unavailable = None, True
            if self.channel is None:
                refusal = (f"injection {injection!r} has a budget shared by its pods "
                           f"({budget.name}) and this sidecar has no operator channel "
                           "(--operator-url): the operator keeps that count")
            elif held.expires <= now or (spent and unanswered):
                refusal = (f"injection {injection!r}'s shared budget {budget.name} is kept by "
                           f"the operator, which does not answer ({self.last_error}); "
                           "refusing its requests until it does")
            elif spent:
                refusal, unavailable = (f"injection {injection!r} used its {_limit(budget):g} "
                                        f"{'USD' if budget.spend is not None else 'tokens'} "
                                        f"per UTC {budget.per} ({budget.name}) across its "
                                        "pods"), False
            if refusal is not None:
                if self._on_refused:
                    self._on_refused(injection, budget.name)
                return BudgetRefusal(injection, budget.name,
                                     5.0 if unavailable else end - now,
                                     now + 5.0 if unavailable else end, refusal,
                                     unavailable=unavailable)
        for budget in chosen:
            held = slices[budget.name]
            held.reserved += need[budget.name]
            held.used = True
            ticket.entries.append((held, need[budget.name]))
        return ticket

    def _short(self, held: Slice, budget: Budget, need: float) -> bool:
        """The slice cannot take ``need`` more, or it has expired: ask the operator first."""
        return (held.counted(budget) + held.reserved + need > held.allowance
                or held.expires <= self.clock())

    def release(self, ticket: SharedTicket) -> None:
        for held, amount in ticket.entries:
            held.reserved = max(held.reserved - amount, 0.0)
        ticket.entries = []

    def charge(self, injection: str, llm: Llm, usage: Usage, spent: float | None) -> None:
        """Count an answer on the shared budgets it falls under and on the day's meter."""
        if self.channel is None:
            return
        self._specs[injection] = llm
        tokens = usage.input + usage.output
        budgets = [b for b in llm.budgets if b.shared and applies(b, usage.model)]
        for name, per in [(USAGE, "day"), *((b.name, b.per) for b in budgets)]:
            held = self._slice(injection, name, per)
            held.tokens += tokens
            held.usd += spent or 0.0
            held.dirty = True

    def limits(self) -> list[tuple[str, str, float]]:
        """(injection, budget name, its figure) of the shared budgets, for the metrics."""
        return [(injection, b.name, _limit(b)) for injection, llm in self._specs.items()
                for b in llm.budgets if b.shared]

    def remaining(self) -> list[tuple[str, str, float]]:
        """What the operator last said is left of each shared budget, plus what this sidecar's
        slice still holds unspent (tokens or USD)."""
        left = []
        for injection, llm in self._specs.items():
            for budget in (b for b in llm.budgets if b.shared):
                held = self._slices.get((injection, budget.name))
                if held is not None and held.left is not None:
                    left.append((injection, budget.name, held.left + max(
                        held.allowance - held.counted(budget) - held.reserved, 0.0)))
        return left

    # -- the operator ------------------------------------------------------------------------
    async def _renew(self, injection: str, llm: Llm, extra: dict[str, float] | None = None,
                     final: bool = False) -> bool:
        """One call for all of ``injection``'s shared budgets and its meter: report what was
        counted, ask for room (a slice for a budget in use, none for one idle, none at all
        when ``final``). False when the operator did not answer."""
        assert self.channel is not None
        asks = []
        for budget in [b for b in llm.budgets if b.shared]:
            held = self._slice(injection, budget.name, budget.per)
            want = 0.0  # an idle slice is given back
            if not final and (held.used or held.reserved or (extra and budget.name in extra)):
                # What requests in flight hold, what this one needs, and a slice beyond.
                want = (held.reserved + (extra or {}).get(budget.name, 0.0)
                        + _limit(budget) / SLICE_SHARE)
            asks.append((budget.name, held, want))
        meter = self._slice(injection, USAGE, "day")
        if meter.dirty:
            asks.append((USAGE, meter, 0.0))
        if not asks:
            return True
        body = lease_body(injection, self.lease, [
            Report(name, held.window, held.tokens, held.usd, want) for name, held, want in asks])
        sent = {name: (held.tokens, held.usd) for name, held, _ in asks}
        called = self.clock()
        try:
            grants = await self.channel.lease(body)
        except ChannelUnavailable as exc:
            if exc.args[0] != self.last_error:
                log.warning("shared budgets of injection %r: %s", injection, exc.args[0])
            self.last_error = exc.args[0]
            return False
        self.last_error = None
        by_name = {name: held for name, held, _ in asks}
        for entry in grants:
            try:
                grant = Grant.from_json(entry)
            except ValueError as exc:
                log.warning("shared budgets of injection %r: the operator answered %s",
                            injection, exc)
                continue
            held = by_name.get(grant.name)
            if held is None or grant.window != held.window:
                continue  # a window that ended while the call was out
            held.allowance, held.left = grant.allowance, grant.left
            held.expires = called + grant.expires_in
            held.used = False
            held.dirty = (held.tokens, held.usd) != sent[grant.name]
        return True

    async def report_forever(self) -> None:
        """Every ``report_every`` seconds: report, renew the slices in use, return the idle."""
        while True:
            await asyncio.sleep(self.report_every)
            await self.report_once()

    async def report_once(self, final: bool = False) -> None:
        """Report each injection that counted or holds something; ``final``: give back every
        slice (the sidecar stops: an unreturned slice would stay spent until the window ends)."""
        if self.channel is None:
            return
        for injection, llm in list(self._specs.items()):
            # A slice in use is renewed; one that holds room unused is given back.
            busy = any(s is not None and (s.used or s.dirty or s.reserved > 0
                                          or s.allowance > s.counted(b))
                       for b in llm.budgets if b.shared
                       for s in [self._slices.get((injection, b.name))])
            meter = self._slices.get((injection, USAGE))
            if busy or (meter is not None and meter.dirty):
                async with self._locks.setdefault(injection, asyncio.Lock()):
                    await self._renew(injection, llm, final=final)

    async def close(self) -> None:
        """Report what was counted and give every slice back, then close the wire: a stopping
        sidecar's last word (a killed one's slices stay counted as spent)."""
        if self.channel is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.report_once(final=True), CALL_TIMEOUT)
        await self.channel.close()
