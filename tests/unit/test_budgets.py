"""spec.llm budgets as pure decisions on a clock the test holds."""

from __future__ import annotations

import datetime as dt

import pytest

from keyhole_common.channel import window
from keyhole_common.spec.model import Budget, Llm, Price
from keyhole_sidecar.usage.budgets import Asked, BudgetRefusal, Budgets
from keyhole_sidecar.usage.meter import Usage
from keyhole_sidecar.usage.prices import cost, price_of

T0 = dt.datetime(2026, 12, 31, 23, 59, 0, tzinfo=dt.UTC).timestamp()


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_windows_are_utc_hours_days_and_calendar_months():
    assert window(T0, "hour") == (T0 - 59 * 60, T0 + 60)
    assert window(T0, "day") == (T0 - (23 * 60 + 59) * 60, T0 + 60)
    start, end = window(T0, "month")
    assert dt.datetime.fromtimestamp(start, dt.UTC) == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    assert dt.datetime.fromtimestamp(end, dt.UTC) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    feb = dt.datetime(2028, 2, 29, 12, tzinfo=dt.UTC).timestamp()
    assert dt.datetime.fromtimestamp(window(feb, "month")[1], dt.UTC).month == 3


def test_parallel_requests_reserve_their_ceilings_so_none_overshoots_by_more_than_itself():
    llm = Llm("openai", budgets=(Budget("day", tokens=1000),))
    budgets = Budgets(clock=Clock(T0))
    first = budgets.admit("a", llm, Asked("gpt-4o", 100, 800))  # reserves 900
    second = budgets.admit("a", llm, Asked("gpt-4o", 50, 10))   # 900 < 1000: reserves 60
    third = budgets.admit("a", llm, Asked("gpt-4o", 50, 10))    # 960 reserved + 0 used: room
    fourth = budgets.admit("a", llm, Asked("gpt-4o", 50, 10))   # 1020 held: none
    assert not isinstance(first, BudgetRefusal) and not isinstance(third, BudgetRefusal)
    assert isinstance(fourth, BudgetRefusal) and fourth.budget == "tokens/day"
    for ticket, used in ((first, 300), (second, 60), (third, 60)):
        budgets.release(ticket)
        budgets.charge("a", llm, Usage("openai", "gpt-4o", used - 10, 10), None)
    assert budgets.remaining() == [("a", "tokens/day", 580.0)]
    assert not isinstance(budgets.admit("a", llm, Asked("gpt-4o", 1, None)), BudgetRefusal)


def test_a_new_window_starts_from_zero_and_the_refusal_says_when():
    clock = Clock(T0)
    llm = Llm("openai", budgets=(Budget("day", tokens=10),))
    budgets = Budgets(clock=clock)
    budgets.charge("a", llm, Usage("openai", "gpt-4o", 5, 5), None)
    refusal = budgets.admit("a", llm, Asked("gpt-4o", 1, None))
    assert isinstance(refusal, BudgetRefusal) and refusal.retry_after == pytest.approx(60)
    clock.now = T0 + 61  # 2027-01-01
    assert not isinstance(budgets.admit("a", llm, Asked("gpt-4o", 1, None)), BudgetRefusal)


def test_a_model_budget_applies_to_requests_of_unknown_model():
    llm = Llm("openai", budgets=(Budget("hour", tokens=1, models=("gpt-4*",)),))
    budgets = Budgets(clock=Clock(T0))
    budgets.charge("a", llm, Usage("openai", "gpt-4o", 1, 0), None)
    assert isinstance(budgets.admit("a", llm, Asked(None, 1, None)), BudgetRefusal)
    assert not isinstance(budgets.admit("a", llm, Asked("o3", 1, None)), BudgetRefusal)


def test_prices_the_injections_own_first_then_the_shipped_table():
    own = (Price("gpt-4o*", 1.0, 2.0),)
    assert price_of("gpt-4o-2024-08-06", own).input == 1.0
    assert price_of("gpt-4o-mini", ()).input == 0.15  # the specific name before its family
    assert price_of("GPT-4O", ()).input == 2.50
    assert price_of("no-such-model", ()) is None
    usage = Usage("anthropic", "claude-sonnet-4-5", input=1000, output=100, cached_input=600,
                  cache_write=300)
    assert cost(usage, price_of(usage.model, ())) == pytest.approx(
        (100 * 3.00 + 600 * 0.30 + 300 * 3.75 + 100 * 15.00) / 1e6)
