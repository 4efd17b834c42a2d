"""The shared budgets' arithmetic (keyhole_operator.ledger and channel.apply): pure, so every
case a cluster would take minutes to reach is checked here in milliseconds."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from keyhole_common.spec.model import Budget, Llm, SecretInjection
from keyhole_operator import ledger
from keyhole_operator.channel import ChannelError, apply, caller, parse_ask, signed_item
from keyhole_operator.routes import Injection, namespace_key, signed_routes
from tests.support.config import injection, ref

NOON = dt.datetime(2026, 12, 6, 12, tzinfo=dt.UTC).timestamp()
DAY = ledger.window_start(NOON, "day")
BUDGET = Budget(per="day", tokens=1000, shared=True)
NAME = BUDGET.name


def holder(pod: str = "a", lease: str = "1" * 32) -> ledger.Holder:
    return ledger.Holder(pod, f"uid-{pod}", lease)


def report(tokens: int = 0, want: float = 100, window: float = DAY) -> ledger.Report:
    return ledger.Report(NAME, window, tokens, 0.0, want)


def settle(entry, who, what, now=NOON, budget=BUDGET):
    return ledger.settle(entry, NAME, budget, who, what, now)


def test_the_name_says_the_budget_is_shared():
    assert NAME == "injection:tokens/day"
    assert Budget(per="day", tokens=5).name == "tokens/day"


def test_grants_never_add_up_to_more_than_the_budget():
    entry = None
    granted = []
    for pod in "abcdefghijkl":  # twelve pods asking for 100 each of 1000
        entry, grant = settle(entry, holder(pod), report(want=100))
        granted.append(grant.granted)
    assert granted == [100.0] * 10 + [0.0, 0.0]
    assert entry["held"] == 1000 and entry["left"] == 0 and entry["spent"] == 0


def test_a_report_moves_what_was_held_to_spent_and_a_repeated_report_counts_once():
    entry, first = settle(None, holder(), report(want=300))
    assert first.allowance == 300
    entry, second = settle(entry, holder(), report(tokens=250, want=300))
    assert entry["spent"] == 250 and entry["held"] == 300 and second.allowance == 550
    again, third = settle(entry, holder(), report(tokens=250, want=300))  # the answer lost
    assert again["spent"] == 250 and third.allowance == 550
    stale, _ = settle(again, holder(), report(tokens=100, want=0))  # an older report
    assert stale["spent"] == 250  # counts never go back


def test_the_last_slice_is_what_is_left_and_an_overrun_is_settled_not_forgiven():
    entry, _ = settle(None, holder("a"), report(want=900))
    entry, grant = settle(entry, holder("b"), report(want=300))
    assert grant.granted == 100 and entry["left"] == 0
    entry, grant = settle(entry, holder("a"), report(tokens=950, want=100))  # passed its slice
    assert (entry["spent"], entry["held"], entry["left"], grant.granted) == (950, 100, 0, 0)
    entry, grant = settle(entry, holder("b"), report(tokens=130, want=100))
    assert grant.granted == 0 and entry["spent"] == 1080 and entry["left"] == 0


def test_a_restarted_sidecar_retires_its_old_lease_with_all_it_held():
    entry, _ = settle(None, holder("a", "1" * 32), report(want=300))
    entry, _ = settle(entry, holder("a", "1" * 32), report(tokens=120, want=300))
    entry, grant = settle(entry, holder("a", "2" * 32), report(tokens=0, want=100))
    assert entry["retired"] == {"tokens": 120, "usd": 0.0, "used": 420.0}
    assert [x["lease"] for x in entry["leases"]] == ["2" * 32]
    assert entry["spent"] == 420 and grant.granted == 100 and entry["left"] == 480


def test_a_new_window_starts_from_nothing_and_an_old_report_counts_nothing_in_it():
    entry, _ = settle(None, holder(), report(tokens=0, want=1000))
    entry, _ = settle(entry, holder(), report(tokens=1000, want=100))
    assert entry["left"] == 0
    tomorrow = NOON + 86400
    entry, grant = settle(entry, holder(), report(tokens=1000, want=100), now=tomorrow)
    assert entry["window"] == "2026-12-07T00:00:00Z"
    assert entry["spent"] == 0 and grant.granted == 100 and grant.window == DAY + 86400


def test_an_edited_figure_counts_at_once():
    entry, _ = settle(None, holder(), report(want=800))
    smaller = Budget(per="day", tokens=500, shared=True)
    entry, grant = ledger.settle(entry, NAME, smaller, holder("b"), report(want=100), NOON)
    assert entry["limit"] == 500 and grant.granted == 0


def test_a_spend_budget_counts_dollars():
    spend = Budget(per="month", spend=2.0, shared=True)
    ask = ledger.Report(spend.name, ledger.window_start(NOON, "month"), 5000, 1.25, 1.0)
    entry, grant = ledger.settle(None, spend.name, spend, holder(), ask, NOON)
    assert entry["unit"] == "USD" and entry["spent"] == 1.25 and grant.granted == 0.75
    assert grant.allowance == 2.0 and entry["tokens"] == 5000


def test_the_usage_meter_counts_and_grants_nothing():
    ask = ledger.Report(ledger.USAGE, DAY, 700, 0.5, 0)
    entry, grant = ledger.settle(None, ledger.USAGE, None, holder(), ask, NOON)
    assert grant.granted == 0 and entry["left"] is None
    budget_entry, _ = settle(None, holder(), report(tokens=700, want=50))
    summary = ledger.usage_summary([entry, budget_entry])
    assert summary == {"day": "2026-12-06", "spentToday": "700 tokens, $0.5000",
                       "budgetLeft": f"250 tokens ({NAME})"}
    # A budget removed: its column is cleared, not left as it was (a merge patch keeps an
    # absent key).
    assert ledger.usage_summary([entry]) == {"day": "2026-12-06",
                                             "spentToday": "700 tokens, $0.5000",
                                             "budgetLeft": None}


def test_a_merge_patch_dropping_nulls_does_not_break_the_next_count():
    ask = ledger.Report(ledger.USAGE, DAY, 10, 0.1, 0)
    entry, _ = ledger.settle(None, ledger.USAGE, None, holder(), ask, NOON)
    stored = {k: v for k, v in entry.items() if v is not None}  # as the API server keeps it
    again, _ = ledger.settle(stored, ledger.USAGE, None, holder(),
                             dataclasses.replace(ask, tokens=20), NOON)
    assert again["tokens"] == 20 and ledger.usage_summary([stored])["day"] == "2026-12-06"


# -- the channel's decisions --------------------------------------------------------------

def _shared(name: str = "openai") -> Injection:
    doc = injection(name, hosts=["api.openai.test"],
                    llm={"api": "openai", "budgets": [{"per": "day", "tokens": 1000,
                                                       "for": "injection"}]},
                    headers=[{"name": "Authorization", "valueFrom": ref("s", "k")}])
    doc["metadata"]["namespace"] = "team"
    return Injection.from_object(doc)


def _pod(routes: str, uid: str = "uid-a", account: str = "agent") -> dict:
    return {"metadata": {"name": "a", "uid": uid,
                         "annotations": {"keyhole.dev/injections": routes}},
            "spec": {"serviceAccountName": account}}


REVIEW = {"authenticated": True, "audiences": ["keyhole.dev"],
          "user": {"username": "system:serviceaccount:team:agent",
                   "extra": {"authentication.kubernetes.io/pod-name": ["a"],
                             "authentication.kubernetes.io/pod-uid": ["uid-a"]}}}


def test_the_caller_is_the_pod_its_token_is_bound_to():
    assert caller(REVIEW).pod == "a" and caller(REVIEW).namespace == "team"
    with pytest.raises(ChannelError) as no:
        caller({"authenticated": False})
    assert no.value.status == 401
    unbound = {**REVIEW, "user": {"username": "system:serviceaccount:team:agent"}}
    with pytest.raises(ChannelError, match="not bound to a pod") as bound:
        caller(unbound)
    assert bound.value.status == 403
    person = {**REVIEW, "user": {**REVIEW["user"], "username": "jane@example.com"}}
    with pytest.raises(ChannelError, match="not bound to a pod"):
        caller(person)


def test_only_the_pods_signed_routes_name_what_it_may_spend():
    key = namespace_key(b"m" * 32, "team")
    routes = signed_routes([_shared("openai")], "team", key)
    who = caller(REVIEW)
    assert signed_item(_pod(routes), who, "openai", key).name == "openai"
    with pytest.raises(ChannelError, match="is not served by injection 'other'"):
        signed_item(_pod(routes), who, "other", key)
    forged = routes.replace('"openai"', '"other"')  # a patched annotation: the MAC breaks
    with pytest.raises(ChannelError, match="no routes signed by the operator"):
        signed_item(_pod(forged), who, "other", key)
    other_namespace = signed_routes([_shared("openai")], "team", namespace_key(b"m" * 32, "x"))
    with pytest.raises(ChannelError, match="no routes signed"):
        signed_item(_pod(other_namespace), who, "openai", key)
    with pytest.raises(ChannelError, match="no longer exists"):
        signed_item(_pod(routes, uid="uid-recreated"), who, "openai", key)
    with pytest.raises(ChannelError, match="not the pod's"):
        signed_item(_pod(routes, account="admin"), who, "openai", key)


def test_apply_counts_only_budgets_the_injection_and_the_pods_routes_both_share():
    live: SecretInjection = _shared().spec
    entries, grants = apply([], live, live, holder(), [report(want=100)], NOON, 60)
    assert [e["name"] for e in entries] == [NAME] and grants[0].granted == 100
    with pytest.raises(ChannelError, match="has no budget 'tokens/day' shared") as missing:
        apply(entries, live, live, holder(), [ledger.Report("tokens/day", DAY, 0, 0, 5)],
              NOON, 60)
    assert missing.value.status == 404
    unshared = dataclasses.replace(live, llm=Llm("openai"))  # the budget was edited away
    with pytest.raises(ChannelError, match="has no budget") as gone:
        apply(entries, unshared, live, holder(), [report()], NOON, 60)
    assert gone.value.status == 404
    meter, _ = apply(entries, unshared, live, holder(),
                     [ledger.Report(ledger.USAGE, DAY, 10, 0.0, 0)], NOON, 60)
    assert [e["name"] for e in meter] == [ledger.USAGE]  # the removed budget's count drops


@pytest.mark.parametrize("body, problem", [
    ([], "a JSON object"),
    ({"injection": "", "lease": "a" * 32, "budgets": [{}]}, "'injection'"),
    ({"injection": "x", "lease": "NOT-HEX", "budgets": [{}]}, "'lease'"),
    ({"injection": "x", "lease": "a" * 32, "budgets": []}, "'budgets'"),
    ({"injection": "x", "lease": "a" * 32, "budgets": [{"name": "n"}]}, "each report needs"),
    ({"injection": "x", "lease": "a" * 32, "budgets": [
        {"name": "n", "window": 0, "tokens": -1, "usd": 0, "want": 0}]}, "finite, 0 or more"),
    ({"injection": "x", "lease": "a" * 32, "budgets": [
        {"name": "n", "window": 0, "tokens": 0, "usd": 0, "want": float("nan")}]}, "finite"),
])
def test_a_malformed_call_is_refused_naming_the_field(body, problem):
    with pytest.raises(ChannelError, match=problem) as refused:
        parse_ask(body)
    assert refused.value.status == 400


def test_a_review_is_remembered_no_longer_than_the_token_lives():
    import base64
    import json

    from keyhole_operator.channel import token_lifetime

    def token(claims: dict) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"eyJhbGciOiJSUzI1NiJ9.{body}.signature"

    assert token_lifetime(token({"exp": 1600}), 1000) == 600
    assert token_lifetime(token({"exp": 900}), 1000) == 0  # expired: not remembered
    assert token_lifetime("not-a-jwt", 1000) == 0
    assert token_lifetime(token({"sub": "no exp"}), 1000) == 0
