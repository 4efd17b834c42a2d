"""``spec.llm.budgets`` in this pod's sidecar: tokens and spend per UTC hour, day or month.

A request is admitted while every budget that applies to it has room left, counting what
requests in flight have reserved: the input its body can hold (four bytes a token) and the
output ceiling it states (``max_tokens`` …). Its answer settles the reservation at the
figures the API reported. So parallel requests cannot overshoot a budget by more than one
request each, and an answer is never cut because of money: the overrun is settled. Counts are
kept on disk (``--state-dir``) so a restarted sidecar does not start the month afresh.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keyhole_common.channel import window
from keyhole_common.spec.model import Budget, Llm, Price
from keyhole_sidecar.limits import WindowStore, system_clock
from keyhole_sidecar.usage.meter import CHARS_PER_TOKEN, Usage
from keyhole_sidecar.usage.prices import cost, price_of


def applies(budget: Budget, model: str | None) -> bool:
    """A budget on some models applies to a request whose model is not known (fail closed)."""
    if budget.models is None or model is None:
        return True
    name = model.lower()
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in budget.models)


@dataclass(frozen=True, slots=True)
class Asked:
    """What a request may spend, known before it is sent."""

    model: str | None
    input_tokens: int
    output_ceiling: int | None  # max_tokens & co., when the request states one

    @property
    def tokens(self) -> int:
        return self.input_tokens + (self.output_ceiling or 0)


@dataclass(frozen=True, slots=True)
class BudgetRefusal:
    injection: str
    budget: str  # its name: tokens/day, spend/month[gpt-4*]
    retry_after: float
    resets_at: float
    detail: str
    unavailable: bool = False  # a shared budget whose keeper (the operator) is away


class BudgetTicket:
    """What an admitted request reserved, to settle when its answer is counted."""

    __slots__ = ("entries", "injection", "llm", "price", "reserve_usd")

    def __init__(self, injection: str, llm: Llm, price: Price | None,
                 entries: list[tuple[str, int, float]], reserve_usd: float = 0.0):
        self.injection, self.llm, self.price, self.entries = injection, llm, price, entries
        self.reserve_usd = reserve_usd  # what the request may cost, priced at admission


class BudgetStore(WindowStore):
    what = "budget counts"

    @staticmethod
    def parse(windows: dict) -> dict:
        """budget key → [window start, tokens used, USD spent]."""
        return {k: [float(v[0]), int(v[1]), float(v[2])] for k, v in windows.items()}


class Budgets:
    def __init__(self, state_dir: Path | None = None,
                 clock: Callable[[], float] | None = None,
                 on_refused: Callable[[str, str], None] | None = None):
        self.clock = clock or system_clock()
        self._store = BudgetStore(state_dir / "budgets.json" if state_dir else None)
        self._reserved: dict[str, list] = {}  # key → [tokens, USD] held by requests in flight
        self._known: dict[str, tuple[str, Budget]] = {}  # key → (injection, budget), metrics
        self._on_refused = on_refused

    @staticmethod
    def key(injection: str, budget: Budget) -> str:
        return f"{injection}|{budget.name}"

    def _used(self, key: str, budget: Budget, now: float) -> tuple[int, float]:
        start, _ = window(now, budget.per)
        begun, tokens, spend = self._store.counts.get(key, [start, 0, 0.0])
        return (tokens, spend) if begun == start else (0, 0.0)

    def admit(self, injection: str, llm: Llm, asked: Asked) -> BudgetTicket | BudgetRefusal:
        """Admit the request if every budget that applies has room; reserve what it asked."""
        now = self.clock()
        price = price_of(asked.model, llm.prices)
        reserve_spend = cost(Usage(llm.api, asked.model, asked.input_tokens,
                                   asked.output_ceiling or 0), price) or 0.0
        chosen = [b for b in llm.budgets if not b.shared and applies(b, asked.model)]
        for budget in chosen:
            key = self.key(injection, budget)
            self._known[key] = (injection, budget)
            tokens, spend = self._used(key, budget, now)
            held_tokens, held_spend = self._reserved.get(key, (0, 0.0))
            _, end = window(now, budget.per)
            refusal = None
            if budget.spend is not None and asked.model is not None and price is None:
                refusal = (f"injection {injection!r} has a spend budget ({budget.name}) and "
                           f"model {asked.model!r} has no price: add it to spec.llm.prices")
            elif budget.tokens is not None and tokens + held_tokens >= budget.tokens:
                refusal = (f"injection {injection!r} used its {budget.tokens} tokens per UTC "
                           f"{budget.per} ({budget.name}) in this pod")
            elif budget.spend is not None and spend + held_spend >= budget.spend:
                refusal = (f"injection {injection!r} spent its ${budget.spend:g} per UTC "
                           f"{budget.per} ({budget.name}) in this pod")
            if refusal is not None:
                if self._on_refused:
                    self._on_refused(injection, budget.name)
                return BudgetRefusal(injection, budget.name, end - now, end, refusal)
        entries = []
        for budget in chosen:
            key = self.key(injection, budget)
            held = self._reserved.setdefault(key, [0, 0.0])
            held[0] += asked.tokens
            held[1] += reserve_spend
            entries.append((key, asked.tokens, reserve_spend))
        return BudgetTicket(injection, llm, price, entries, reserve_spend)

    def release(self, ticket: BudgetTicket) -> None:
        """Give back what the request reserved (its answer is counted, or there was none)."""
        for key, tokens, spend in ticket.entries:
            held = self._reserved.get(key)
            if held is None:
                continue
            held[0] -= tokens
            held[1] -= spend
            if held[0] <= 0 and held[1] <= 1e-12:
                self._reserved.pop(key, None)
        ticket.entries = []

    def charge(self, injection: str, llm: Llm, usage: Usage, spent: float | None) -> None:
        """Count an answer's usage against every budget of ``injection`` it falls under."""
        now = self.clock()
        for budget in llm.budgets:
            if budget.shared or not applies(budget, usage.model):
                continue
            key = self.key(injection, budget)
            self._known[key] = (injection, budget)
            tokens, spend = self._used(key, budget, now)
            self._store.counts[key] = [window(now, budget.per)[0],
                                       tokens + usage.input + usage.output,
                                       spend + (spent or 0.0)]
        if any(not b.shared for b in llm.budgets):
            self._store.save_soon()

    def limits(self) -> list[tuple[str, str, float]]:
        """(injection, budget name, its figure: tokens or USD) for the metrics."""
        return [(injection, budget.name, float(budget.tokens if budget.tokens is not None
                                               else budget.spend or 0.0))
                for injection, budget in self._known.values()]

    def used(self) -> list[tuple[str, str, float]]:
        """(injection, budget name, what was used in the current window: tokens or USD) —
        unclamped, so an overshoot past the figure shows (``remaining`` stops at 0)."""
        now = self.clock()
        used = []
        for key, (injection, budget) in self._known.items():
            tokens, spend = self._used(key, budget, now)
            used.append((injection, budget.name, float(tokens if budget.tokens is not None
                                                       else spend)))
        return used

    def remaining(self) -> list[tuple[str, str, float]]:
        """(injection, budget name, what is left: tokens or USD) for the metrics."""
        now = self.clock()
        left = []
        for key, (injection, budget) in self._known.items():
            tokens, spend = self._used(key, budget, now)
            if budget.tokens is not None:
                left.append((injection, budget.name, float(max(budget.tokens - tokens, 0))))
            else:
                left.append((injection, budget.name, max((budget.spend or 0.0) - spend, 0.0)))
        return left


def input_estimate(body_bytes: int) -> int:
    return math.ceil(body_bytes / CHARS_PER_TOKEN)
