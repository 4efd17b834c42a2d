"""The sidecar's side of a shared budget (keyhole_sidecar.usage.shared), its decisions alone.

The operator is stood in for by ``LedgerChannel``: the operator's own ledger arithmetic, called
in-process instead of over HTTPS with a token (the wire, the TokenReview and the API server
are exercised by tests/cluster/test_shared_budgets.py and tests/node/test_shared_budgets.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt

from keyhole_common.spec.model import Budget, Llm
from keyhole_operator import ledger
from keyhole_sidecar.usage.budgets import Asked, BudgetRefusal
from keyhole_sidecar.usage.meter import Usage
from keyhole_sidecar.usage.shared import ChannelUnavailable, SharedBudgets, SharedTicket

NOON = dt.datetime(2026, 12, 6, 12, tzinfo=dt.UTC).timestamp()
SHARED = Budget(per="day", tokens=1000, shared=True)
LLM = Llm("openai", budgets=(SHARED,))


class Clock:
    def __init__(self, now: float = NOON):
        self.now = now

    def __call__(self) -> float:
        return self.now


class LedgerChannel:
    """The operator's decisions, in-process: one entry per budget, like status.ledger."""

    def __init__(self, clock: Clock, pod: str = "a"):
        self.clock, self.pod = clock, pod
        self.entries: dict[str, dict] = {}
        self.calls = 0
        self.away = False

    async def lease(self, body: dict) -> list[dict]:
        self.calls += 1
        await asyncio.sleep(0)  # a call takes a turn of the loop, as a real one does
        if self.away:
            raise ChannelUnavailable("the operator channel did not answer (test)")
        holder = ledger.Holder(self.pod, f"uid-{self.pod}", body["lease"])
        grants = []
        for ask in body["budgets"]:
            budget = None if ask["name"] == ledger.USAGE else SHARED
            entry, grant = ledger.settle(self.entries.get(ask["name"]), ask["name"], budget,
                                         holder, ledger.Report(ask["name"], ask["window"],
                                                               ask["tokens"], ask["usd"],
                                                               ask["want"]), self.clock())
            self.entries[ask["name"]] = entry
            grants.append(grant.as_json())
        return grants

    async def close(self) -> None:
        pass


def answer(tokens: int = 53) -> Usage:
    return Usage("openai", "gpt-4o-mini", 24, tokens - 24)


def one_sidecar() -> tuple[Clock, LedgerChannel, SharedBudgets]:
    """A sidecar's shared budgets over the in-process operator, on a clock the test moves."""
    clock = Clock()
    channel = LedgerChannel(clock)
    return clock, channel, SharedBudgets(channel, clock)


async def spend(shared: SharedBudgets, asked: Asked, usage: Usage | None = None):
    ticket = await shared.admit("api", LLM, asked, 0.0)
    if isinstance(ticket, SharedTicket):
        shared.charge("api", LLM, usage or answer(), 0.0)
        shared.release(ticket)
    return ticket


def test_parallel_requests_share_one_call_and_stop_at_the_figure():
    async def main():
        _clock, channel, shared = one_sidecar()
        asked = Asked("gpt-4o-mini", 20, 30)  # reserves 50
        tickets = await asyncio.gather(*(shared.admit("api", LLM, asked, 0.0)
                                         for _ in range(5)))
        assert all(isinstance(t, SharedTicket) for t in tickets)
        # Waiting requests share a call's slice (a twentieth, 50, beyond what they asked).
        assert channel.calls == 3
        for ticket in tickets:
            shared.charge("api", LLM, answer(50), 0.0)
            shared.release(ticket)
        spent = 250
        while True:
            ticket = await spend(shared, asked, answer(50))
            if isinstance(ticket, BudgetRefusal):
                break
            spent += 50
        assert 1000 <= spent <= 1000 + 50
        assert "used its 1000 tokens per UTC day (injection:tokens/day) across its pods" in \
            ticket.detail and not ticket.unavailable
        await shared.report_once()
        assert channel.entries[SHARED.name]["spent"] == spent
        assert channel.entries[ledger.USAGE]["tokens"] == spent

    asyncio.run(main())


def test_an_idle_slice_is_given_back_at_the_next_report():
    async def main():
        _clock, channel, shared = one_sidecar()
        await spend(shared, Asked("gpt-4o-mini", 20, 30))
        await shared.report_once()  # used since the last call: renewed
        held = channel.entries[SHARED.name]["held"]
        assert held > 0
        await shared.report_once()  # idle since: given back
        assert channel.entries[SHARED.name]["held"] == 0
        calls = channel.calls
        await shared.report_once()  # nothing held, nothing counted: no call
        assert channel.calls == calls

    asyncio.run(main())


def test_with_the_operator_away_the_slice_in_hand_serves_then_requests_fail_closed():
    async def main():
        _clock, channel, shared = one_sidecar()
        assert isinstance(await spend(shared, Asked("gpt-4o-mini", 20, 30)), SharedTicket)
        await shared.report_once()  # a slice of 50 beyond the 53 counted
        channel.away = True
        assert isinstance(await spend(shared, Asked("gpt-4o-mini", 5, 5)), SharedTicket)
        refused = None
        for _ in range(5):
            refused = await spend(shared, Asked("gpt-4o-mini", 20, 30))
            if isinstance(refused, BudgetRefusal):
                break
        assert isinstance(refused, BudgetRefusal) and refused.unavailable
        assert "does not answer (the operator channel did not answer (test))" in refused.detail
        channel.away = False
        assert isinstance(await spend(shared, Asked("gpt-4o-mini", 20, 30)), SharedTicket)

    asyncio.run(main())


def test_an_expired_slice_is_not_spent_even_with_room_left():
    async def main():
        clock, channel, shared = one_sidecar()
        await spend(shared, Asked("gpt-4o-mini", 20, 30))
        channel.away = True
        clock.now += ledger.LEASE_SECONDS + 1
        refused = await spend(shared, Asked("gpt-4o-mini", 1, 1))
        assert isinstance(refused, BudgetRefusal) and refused.unavailable

    asyncio.run(main())


def test_without_a_channel_a_shared_budget_refuses_and_says_why():
    async def main():
        shared = SharedBudgets(None, Clock())
        refused = await shared.admit("api", LLM, Asked("gpt-4o-mini", 1, 1), 0.0)
        assert isinstance(refused, BudgetRefusal) and refused.unavailable
        assert "no operator channel (--operator-url)" in refused.detail
        # A budget for each pod alone needs no channel: nothing shared to admit.
        alone = Llm("openai", budgets=(Budget(per="day", tokens=5),))
        assert isinstance(await shared.admit("api", alone, Asked(None, 1, 1), 0.0),
                          SharedTicket)

    asyncio.run(main())


def test_a_new_window_starts_a_new_slice():
    async def main():
        clock, channel, shared = one_sidecar()
        while isinstance(await spend(shared, Asked("gpt-4o-mini", 20, 30)), SharedTicket):
            pass
        clock.now += 86400
        assert isinstance(await spend(shared, Asked("gpt-4o-mini", 20, 30)), SharedTicket)
        assert channel.entries[SHARED.name]["window"] == "2026-12-07T00:00:00Z"

    asyncio.run(main())


def test_a_stopping_sidecar_reports_and_gives_every_slice_back():
    async def main():
        _clock, channel, shared = one_sidecar()
        ticket = await shared.admit("api", LLM, Asked("gpt-4o-mini", 20, 30), 0.0)
        shared.charge("api", LLM, answer(), 0.0)
        shared.release(ticket)  # used just now: a plain report would renew the slice
        assert channel.entries[SHARED.name]["held"] > 0
        await shared.close()
        entry = channel.entries[SHARED.name]
        assert entry["held"] == 0 and entry["spent"] == 53 and entry["left"] == 1000 - 53

    asyncio.run(main())


def test_a_shared_spend_budget_refuses_a_model_with_no_price():
    async def main():
        spend = Llm("openai", budgets=(Budget(per="month", spend=5.0, shared=True),))
        shared = SharedBudgets(LedgerChannel(Clock()), Clock())
        refused = await shared.admit("api", spend, Asked("my-own-model", 1, 1), 0.0,
                                     priced=False)
        assert isinstance(refused, BudgetRefusal) and not refused.unavailable
        assert "model 'my-own-model' has no price: add it to spec.llm.prices" in refused.detail

    asyncio.run(main())
