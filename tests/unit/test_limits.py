"""The limits' decisions as pure functions of a clock: exact counts, computed waits, windows
that start at UTC boundaries and survive a new process, and the parser's named errors."""

from __future__ import annotations

import copy

import pytest

from keyhole_common.spec import Limits, parse_injection
from keyhole_sidecar.limits import Limiter, Refusal, Ticket, describe, period_start, retry_after_header

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_gives_its_burst_then_one_per_interval():
    clock = Clock()
    limiter = Limiter(clock=clock)
    wanted = (("api", "spec", Limits(requests_per_minute=6, burst=2)),)
    assert [isinstance(limiter.admit(wanted, 0), Ticket) for _ in range(3)] == [True, True, False]
    refusal = limiter.admit(wanted, 0)
    assert isinstance(refusal, Refusal) and refusal.limit == "requestsPerMinute"
    assert refusal.retry_after == pytest.approx(10.0) and retry_after_header(refusal) == "10"
    clock.now += 10
    assert isinstance(limiter.admit(wanted, 0), Ticket)


def test_a_refusal_takes_nothing_from_the_other_limits():
    clock = Clock()
    limiter = Limiter(clock=clock)
    rate = ("a", "spec", Limits(requests_per_minute=60, burst=1))
    tight = ("b", "spec", Limits(concurrent_requests=1))
    first = limiter.admit((rate, tight), 0)
    assert isinstance(limiter.admit((rate, tight), 0), Refusal)
    limiter.release(first)
    clock.now += 1
    assert isinstance(limiter.admit((rate, tight), 0), Ticket)


def test_requests_in_flight_are_counted_until_released():
    limiter = Limiter(clock=Clock())
    wanted = (("api", "spec", Limits(concurrent_requests=2)),)
    tickets = [limiter.admit(wanted, 0) for _ in range(2)]
    refusal = limiter.admit(wanted, 0)
    assert isinstance(refusal, Refusal) and retry_after_header(refusal) == "1"
    limiter.release(tickets[0])
    assert isinstance(limiter.admit(wanted, 0), Ticket)


def test_a_body_over_the_limit_is_refused_with_413_and_no_retry_after():
    limiter = Limiter(clock=Clock())
    refusal = limiter.admit((("api", "spec", Limits(request_body_bytes=10)),), 11)
    assert (refusal.status, refusal.limit, retry_after_header(refusal)) == (413, "requestBodyBytes",
                                                                             None)
    assert isinstance(limiter.admit((("api", "spec", Limits(request_body_bytes=10)),), 10), Ticket)


def test_windows_start_at_utc_boundaries_and_persist_in_the_state_dir(tmp_path):
    clock = Clock()
    clock.now = T0 + 3599  # 08:59:59 UTC
    wanted = (("api", "spec", Limits(window=(("perHour", 2),))),)
    first = Limiter(tmp_path, clock=clock)
    first.admit(wanted, 0)
    assert first.windows_left() == [("api", "perHour", 1)]
    again = Limiter(tmp_path, clock=clock)  # a new process, the same emptyDir
    again.admit(wanted, 0)
    refusal = again.admit(wanted, 0)
    assert refusal.limit == "window.perHour" and retry_after_header(refusal) == "1"
    clock.now = T0 + 3600
    assert isinstance(again.admit(wanted, 0), Ticket)
    assert again.windows_left() == [("api", "perHour", 1)]  # the new hour: one counted
    assert period_start(T0 + 3600, "perDay") == T0 - 8 * 3600  # that day's midnight UTC


def test_an_unreadable_state_file_counts_from_zero(tmp_path):
    (tmp_path / "limits.json").write_text("{not json")
    limiter = Limiter(tmp_path, clock=Clock())
    assert isinstance(limiter.admit((("api", "spec", Limits(window=(("perDay", 1),))),), 0), Ticket)


def test_a_smaller_burst_after_a_reload_clamps_the_bucket_and_keeps_it():
    clock = Clock()
    limiter = Limiter(clock=clock)
    limiter.admit((("api", "spec", Limits(requests_per_minute=60, burst=10)),), 0)
    smaller = (("api", "spec", Limits(requests_per_minute=60, burst=2)),)
    assert [isinstance(limiter.admit(smaller, 0), Ticket) for _ in range(3)] == [True, True, False]


def test_describe_reads_as_a_sentence():
    assert describe(Limits(requests_per_minute=60, burst=5, concurrent_requests=2,
                           request_body_bytes=100, window=(("perDay", 9),))) == \
        "60/min (burst 5), 2 in flight, body ≤ 100 B, 9/perDay"
    assert describe(Limits()) == "unlimited"


BASE = {"apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjection", "metadata": {"name": "x"},
        "spec": {"hosts": ["api.test"], "headers": [
            {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}}


@pytest.mark.parametrize(("limits", "expected"), [
    ({"burst": 3}, "spec.limits.burst: a burst sizes the requestsPerMinute bucket"),
    ({"requestsPerMinute": 0}, "spec.limits.requestsPerMinute: must be a whole number from 1"),
    ({"requestsPerMinute": 1.5}, "got 1.5"),
    ({"concurrentRequests": True}, "got a boolean"),
    ({"window": {}}, "spec.limits.window: give at least one of perHour, perDay"),
    ({"window": {"perWeek": 1}}, "spec.limits.window.perWeek: unknown field"),
    ({"rpm": 1}, "spec.limits.rpm: unknown field"),
])
def test_each_mistake_in_limits_is_named(limits, expected):
    document = copy.deepcopy(BASE)
    document["spec"]["limits"] = limits
    spec, problems = parse_injection(document, "t")
    assert spec is None and any(expected in str(p) for p in problems), problems


def test_a_rule_may_carry_its_own_limits_but_not_only_limits():
    document = copy.deepcopy(BASE)
    document["spec"]["rules"] = [{"methods": ["POST"], "limits": {"requestsPerMinute": 3}},
                                 {"methods": ["GET"], "limits": {}}]
    spec, _ = parse_injection(document, "t")
    assert spec.rules[0].limits == Limits(requests_per_minute=3) and spec.rules[1].limits == Limits()
    document["spec"]["rules"] = [{"limits": {"requestsPerMinute": 3}}]
    spec, problems = parse_injection(document, "t")
    assert spec is None and "an empty rule allows everything" in str(problems[0])
