"""Approvals' decisions, pure: what a digest binds, what the operator honours, what its webhook
lets a person decide, the sidecar's grant clock, and the plugin's rows and flags. The flow
itself runs on the real API server in tests/cluster/test_approvals.py."""

from __future__ import annotations

import asyncio

import pytest
from keyhole_kubectl import approvals as plugin

from keyhole_common.approvals import (
    APPROVED,
    DENIED,
    EXPIRED,
    PENDING,
    Answer,
    Ask,
    call_digest,
    request_digest,
)
from keyhole_operator import approvals
from keyhole_operator.approvals import Pod, Refused
from keyhole_sidecar.approvals import Approvals, Hold

KEY = b"k" * 32
NOW = 1_800_000_000.0
POD = Pod("agents", "agent-1", "uid-1", "agent")
BASE = ("POST", "api.stripe.test", 443, "/v1/refunds", "", "application/json", "", b'{"a":1}')


def ask(digest: str | None = None, name: str | None = None, timeout: float = 90) -> Ask:
    return Ask("stripe", digest or request_digest(*BASE), timeout, 0.0,
               {"kind": "request", "host": "api.stripe.test", "method": "POST",
                "path": "/v1/refunds", "arguments": '{"a":1}'}, name)


def stored(obj: dict, name: str = "agent-1-abcde", uid: str = "obj-uid") -> dict:
    """As the API server returns what the operator created."""
    return {**obj, "metadata": {**obj["metadata"], "name": name, "uid": uid,
                                "namespace": POD.namespace}}


def decided(obj: dict, verdict: str = "Approved", grant: int = 0, user: str = "alice",
            now: float = NOW) -> dict:
    after = {**obj, "status": {"decision": {"verdict": verdict, "grantSeconds": grant}}}
    return {**obj, "status": {"decision": approvals.check_decision(obj, after, user, KEY,
                                                                    now)}}


def test_a_digest_binds_every_part_of_the_request_it_covers():
    base = request_digest(*BASE)
    assert base == request_digest(*BASE)
    for index, other in enumerate(["GET", "api.other.test", 8443, "/v1/charges", "x=1",
                                   "text/plain", "gzip", b'{"a":2}']):
        changed = list(BASE)
        changed[index] = other
        assert request_digest(*changed) != base, BASE[index]
    # Length-prefixed: moving bytes between parts is another request.
    assert request_digest("POST", "a", 443, "/xy", "", "", "", b"") != \
        request_digest("POST", "a", 443, "/x", "y", "", "", b"")


def test_an_mcp_digest_binds_the_use_and_its_arguments_in_any_key_order():
    one = call_digest("mcp.test", 443, "/mcp", "tool", "merge", {"pr": 1, "into": "main"})
    assert one == call_digest("mcp.test", 443, "/mcp", "tool", "merge", {"into": "main", "pr": 1})
    assert one != call_digest("mcp.test", 443, "/mcp", "tool", "merge", {"pr": 2, "into": "main"})
    assert one != call_digest("mcp.test", 443, "/mcp", "tool", "close", {"pr": 1, "into": "main"})
    assert one != call_digest("other.test", 443, "/mcp", "tool", "merge",
                              {"pr": 1, "into": "main"})


@pytest.mark.parametrize("body, field", [
    ([], "JSON object"), ({"injection": "Bad Name"}, "'injection'"),
    ({"injection": "a", "digest": "md5:x"}, "'digest'"),
    ({"injection": "a", "digest": "sha256:" + "0" * 64, "timeout": 0, "wait": 1}, "'timeout'"),
    ({"injection": "a", "digest": "sha256:" + "0" * 64, "timeout": 9, "wait": 21}, "'wait'"),
    ({"injection": "a", "digest": "sha256:" + "0" * 64, "timeout": 9, "wait": 1,
      "what": {"kind": "shell"}}, "'what.kind'"),
])
def test_a_malformed_ask_names_its_field(body, field):
    with pytest.raises(ValueError, match=field):
        Ask.from_json(body)


def test_the_operator_honours_only_objects_whose_spec_it_wrote():
    obj = stored(approvals.manifest(POD, ask(), KEY, NOW))
    assert obj["metadata"]["labels"][approvals.POD_UID_LABEL] == "uid-1"
    assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert obj["spec"]["expiresAt"] == approvals.timestamp(NOW + 90)
    assert approvals.honoured(obj, KEY)
    assert not approvals.honoured(obj, b"another namespace's key")
    edited = {**obj, "spec": {**obj["spec"], "path": "/v1/payouts"}}
    assert not approvals.honoured(edited, KEY)
    assert approvals.state(obj, KEY, NOW + 10) == Answer(obj["metadata"]["name"], PENDING)
    assert approvals.state(obj, KEY, NOW + 91).state == EXPIRED


def test_the_webhook_stamps_who_decided_and_seals_it():
    obj = stored(approvals.manifest(POD, ask(), KEY, NOW))
    yes = decided(obj, grant=600)
    decision = yes["status"]["decision"]
    assert decision["decidedBy"] == "alice" and decision["decidedAt"] == approvals.timestamp(NOW)
    answer = approvals.state(yes, KEY, NOW + 100)
    assert (answer.state, answer.by, answer.grant_seconds) == (APPROVED, "alice", 500)
    assert approvals.state(yes, KEY, NOW + 601).state == EXPIRED  # the grant ran out
    # A decision written around the webhook (no seal, or another's) is no decision.
    forged = {**obj, "status": {"decision": {**decision, "decidedBy": "mallory"}}}
    assert approvals.state(forged, KEY, NOW + 1).state == PENDING
    stretched = {**obj, "status": {"decision": {**decision, "grantSeconds": 604800}}}
    assert approvals.state(stretched, KEY, NOW + 1).state == PENDING
    no = decided(obj, "Denied")
    assert approvals.state(no, KEY, NOW + 1).state == DENIED


@pytest.mark.parametrize("change, refused", [
    (lambda o: decided(o), "a decision is final"),
    (lambda o: o, None),
])
def test_a_decision_is_final(change, refused):
    obj = change(stored(approvals.manifest(POD, ask(), KEY, NOW)))
    after = {**obj, "status": {"decision": {"verdict": "Approved", "grantSeconds": 3600}}}
    if refused:
        with pytest.raises(Refused, match=refused):
            approvals.check_decision(obj, after, "bob", KEY, NOW + 1)
    else:
        assert approvals.check_decision(obj, after, "bob", KEY, NOW + 1)["grantSeconds"] == 3600


@pytest.mark.parametrize("decision, user, now, message", [
    ({"verdict": "Approved"}, "system:serviceaccount:agents:agent", NOW,
     "never approves its own"),
    ({"verdict": "Approved"}, "alice", NOW + 91, "waited past its timeout"),
    ({"verdict": "Maybe"}, "alice", NOW, "Approved or Denied"),
    ({"verdict": "Denied", "grantSeconds": 60}, "alice", NOW, "only with Approved"),
    ({"verdict": "Approved", "grantSeconds": 604801}, "alice", NOW, "7 days"),
    ({"verdict": "Approved", "reason": "a\nb"}, "alice", NOW, "one printable line"),
])
def test_the_webhook_refuses_what_a_person_may_not_decide(decision, user, now, message):
    obj = stored(approvals.manifest(POD, ask(), KEY, NOW))
    with pytest.raises(Refused, match=message):
        approvals.check_decision(obj, {**obj, "status": {"decision": decision}}, user, KEY, now)


def test_a_hand_made_object_is_never_decided():
    obj = stored(approvals.manifest(POD, ask(), KEY, NOW))
    obj["metadata"]["annotations"][approvals.SEAL_ANNOTATION] = "0" * 64
    with pytest.raises(Refused, match="not written by keyhole's operator"):
        approvals.check_decision(obj, {**obj, "status": {"decision": {"verdict": "Approved"}}},
                                 "alice", KEY, NOW)


def test_look_finds_a_grant_or_a_waiting_twin_of_this_pod_and_request_only():
    mine = stored(approvals.manifest(POD, ask(), KEY, NOW), "a")
    other_pod = stored(approvals.manifest(Pod("agents", "agent-2", "uid-2", "agent"), ask(),
                                          KEY, NOW), "b")
    other_request = stored(approvals.manifest(POD, ask("sha256:" + "1" * 64), KEY, NOW), "c")
    found, waiting = approvals.look([other_pod, other_request, mine], "uid-1", ask(), KEY, NOW)
    assert (found.name, found.state, waiting) == ("a", PENDING, 2)
    once = decided(mine)  # approved once, no grant: a new identical request asks again
    assert approvals.look([once], "uid-1", ask(), KEY, NOW + 1)[0] is None
    assert approvals.look([once], "uid-1", ask(name="a"), KEY, NOW + 1)[0].state == APPROVED
    granted = decided(mine, grant=60)
    assert approvals.look([granted], "uid-1", ask(), KEY, NOW + 30)[0].grant_seconds == 30
    assert approvals.look([granted], "uid-2", ask(), KEY, NOW + 30)[0] is None
    assert approvals.look([granted], "uid-1", ask(), KEY, NOW + 61)[0] is None
    assert approvals.look([granted], "uid-1", ask("sha256:" + "1" * 64), KEY, NOW)[0] is None


def test_the_agent_acting_as_the_decider_is_asked_every_way():
    ways = dict(approvals.acting_as("agents", "agent", "system:serviceaccount:ops:approver",
                                    ["system:serviceaccounts", "approvers"]))
    assert set(ways) == {"impersonate system:serviceaccount:ops:approver",
                         "impersonate group system:serviceaccounts", "impersonate group approvers",
                         "impersonate ServiceAccount ops/approver", "mint tokens of ops/approver",
                         "read Secrets of namespace ops", "create pods in namespace ops"}
    review = ways["mint tokens of ops/approver"]["spec"]
    assert review["user"] == "system:serviceaccount:agents:agent"
    assert review["resourceAttributes"] == {"namespace": "ops", "verb": "create",
                                            "resource": "serviceaccounts", "group": "",
                                            "subresource": "token", "name": "approver"}
    assert len(approvals.acting_as("agents", "agent", "alice@example.com", [])) == 1


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_grant_is_counted_down_on_the_sidecars_own_clock():
    clock = Clock()
    held = Approvals(None, clock)
    hold = Hold("stripe", request_digest(*BASE), 90, {"kind": "request"})
    outcome = held._ended(hold, Answer("a", APPROVED, "alice", grant_seconds=120), 3.0)
    assert outcome.decision == "approved" and outcome.by == "alice"
    clock.now += 119
    assert asyncio.run(held.decide(hold)).decision == "granted"
    assert held.granted(Hold("stripe", request_digest(*BASE[:-1], b"{}"), 90, {})) == 0
    clock.now += 2
    assert held.granted(hold) == 0  # over: the next one asks, and with no channel, fails closed
    outcome = asyncio.run(held.decide(hold))
    assert outcome.decision == "unavailable" and "operator channel" in outcome.detail


def test_the_plugin_lists_what_waits_and_writes_a_decision():
    obj = stored(approvals.manifest(POD, ask(), KEY, NOW))
    obj["metadata"]["creationTimestamp"] = approvals.timestamp(NOW)
    rows = plugin.listing([obj, decided(obj)], NOW + 75)
    assert [(r["state"], r["age"], r["expiresIn"], r["what"]) for r in rows] == [
        ("Pending", "1m15s", "15s", "POST api.stripe.test/v1/refunds")]
    assert len(plugin.listing([obj, decided(obj)], NOW + 75, every=True)) == 2
    assert plugin.decision("Approved", "30m", "release") == {"status": {"decision": {
        "verdict": "Approved", "grantSeconds": 1800, "reason": "release"}}}
    for args, message in ((("Denied", "5m", None), "goes with approve"),
                          (("Approved", "8d", None), "up to 168h"),
                          (("Approved", "169h", None), "up to 168h")):
        with pytest.raises(plugin.BadDecision, match=message):
            plugin.decision(*args)


def test_a_notification_in_slack_shape_carries_the_command_and_no_more():
    from keyhole_operator.notify import payload

    obj = stored(approvals.manifest(POD, ask(), KEY, NOW))
    slack = payload(obj, "POST https://api.stripe.test/v1/refunds", "slack")
    assert set(slack) == {"text", "blocks"}
    assert "kubectl keyhole approve agent-1-abcde -n agents" in slack["text"]
    assert slack["blocks"] == [{"type": "section", "text": {"type": "mrkdwn",
                                                            "text": slack["text"]}}]
    plain = payload(obj, "POST https://api.stripe.test/v1/refunds", "json")
    assert plain["deny"] == "kubectl keyhole deny agent-1-abcde -n agents"
    assert plain["expiresAt"] == approvals.timestamp(NOW + 90)


def test_what_is_over_is_collected_after_the_time_kept():
    obj = stored(approvals.manifest(POD, ask(timeout=60), KEY, NOW))
    assert not approvals.collectable(obj, NOW + 60 + 99, keep=100)
    assert approvals.collectable(obj, NOW + 60 + 100, keep=100)  # expired, undecided
    granted = decided(obj, grant=3600)
    assert not approvals.collectable(granted, NOW + 3600 + 99, keep=100)  # the grant lives on
    assert approvals.collectable(granted, NOW + 3600 + 100, keep=100)
    assert approvals.collectable(decided(obj, "Denied"), NOW + 100, keep=100)


def test_a_grant_is_honoured_only_as_the_webhook_stamped_it():
    from keyhole_operator import grants

    obj = {"metadata": {"name": "agent-stripe-a1b2c3", "namespace": "agents"},
           "spec": {"target": {"kind": "Pod", "name": "agent"}, "injection": "stripe",
                    "seconds": 7200}}
    obj["metadata"]["annotations"] = grants.stamp(obj, "alice", NOW, KEY)
    assert grants.honoured(obj, KEY)
    assert grants.expires(obj) == NOW + 7200
    assert grants.status("Active", obj, "ok")["expiresAt"] == approvals.timestamp(NOW + 7200)
    for changed in ({**obj, "spec": {**obj["spec"], "seconds": 604800}},
                    {**obj, "spec": {**obj["spec"], "injection": "github"}},
                    {**obj, "metadata": {**obj["metadata"], "name": "another"}},
                    {**obj, "metadata": {**obj["metadata"], "annotations": {
                        **obj["metadata"]["annotations"], grants.GRANTED_BY: "mallory"}}}):
        assert not grants.honoured(changed, KEY)
    assert not grants.honoured(obj, b"another namespace's key")


def test_a_grant_adds_the_injections_labels_and_takes_back_only_what_it_added():
    from keyhole_operator import grants

    injection = {"spec": {"podSelector": {"matchLabels": {"keyhole.dev/stripe": "true",
                                                          "team": "pay"}}}}
    wanted = grants.selector_labels(injection, "stripe")
    added = grants.to_add(wanted, {"team": "pay", "app": "agent"})
    assert added == {"keyhole.dev/stripe": "true"}  # team=pay was there already
    assert grants.to_remove(added, {"keyhole.dev/stripe": "true", "team": "pay"}) == {
        "keyhole.dev/stripe": None}
    assert grants.to_remove(added, {"keyhole.dev/stripe": "other"}) == {}  # changed since
    assert grants.label_patch("Pod", {"a": "b"}) == {"metadata": {"labels": {"a": "b"}}}
    assert grants.label_patch("Deployment", {"a": None}) == {
        "spec": {"template": {"metadata": {"labels": {"a": None}}}}}
    with pytest.raises(grants.Refused, match="not plain matchLabels"):
        grants.selector_labels({"spec": {"podSelector": {"matchExpressions": [
            {"key": "a", "operator": "Exists"}]}}}, "x")
    with pytest.raises(grants.Refused, match="no SecretInjection"):
        grants.selector_labels(None, "missing")


def test_the_plugin_names_a_grant_and_refuses_what_it_cannot_make():
    body = plugin.access_grant("deploy/agent", "stripe", "2h", "refunds", "a1b2c3")
    assert body["metadata"]["name"] == "agent-stripe-a1b2c3"
    assert body["spec"] == {"target": {"kind": "Deployment", "name": "agent"},
                            "injection": "stripe", "seconds": 7200, "reason": "refunds"}
    for args, message in ((("job/x", "s", "1h", None), "pod/NAME"),
                          (("pod/x", "s", "9d", None), "up to 168h")):
        with pytest.raises(plugin.BadDecision, match=message):
            plugin.access_grant(*args, "a1b2c3")


@pytest.mark.parametrize("body, message", [
    (b"not json", "send a JSON object"), (b'{"for": "1h"}', "'injection' must name"),
    (b'{"injection": "x", "for": "8d"}', "'for' must be a duration"),
    (b'{"injection": "x", "reason": "a\\nb"}', "one printable line"),
])
def test_an_agents_ask_for_access_is_read_strictly(body, message):
    from keyhole_sidecar.proxy.access import ask_of

    with pytest.raises(ValueError, match=message):
        ask_of(body)
    assert ask_of(b'{"injection": "stripe"}') == ("stripe", 3600, None)


def test_an_approved_ask_for_access_becomes_a_grant_stamped_with_who_approved():
    from keyhole_common.approvals import access_digest
    from keyhole_operator import grants

    asked = Ask("stripe", access_digest("stripe", 1800), 3600, 0.0,
                {"kind": "access", "seconds": 1800, "reason": "refunds"})
    obj = stored(approvals.manifest(POD, asked, KEY, NOW))
    assert obj["spec"]["accessSeconds"] == 1800 and obj["spec"]["reason"] == "refunds"
    grant = grants.access_grant(decided(obj, grant=600, user="alice"), KEY, NOW + 5)
    assert grant["spec"] == {"target": {"kind": "Pod", "name": "agent-1"}, "injection": "stripe",
                             "seconds": 600, "reason": "asked by the agent: refunds"}
    assert grant["metadata"]["name"] == obj["metadata"]["name"]
    assert grants.honoured(grant, KEY) and grant["metadata"]["annotations"][
        grants.GRANTED_BY] == "alice"
    assert grants.access_grant(decided(obj), KEY, NOW)["spec"]["seconds"] == 1800


def test_a_grant_for_the_workload_serves_its_other_pods_and_no_one_else():
    owner = ("ReplicaSet", "agent-5d8f")
    mine = Pod("agents", "agent-1", "uid-1", "agent", owner)
    asked = stored(approvals.manifest(mine, ask(), KEY, NOW), "a")
    assert asked["metadata"]["labels"][approvals.WORKLOAD_LABEL] == mine.workload
    after = {**asked, "status": {"decision": {"verdict": "Approved", "grantSeconds": 600,
                                              "scope": "workload"}}}
    widened = {**asked, "status": {"decision": approvals.check_decision(
        asked, after, "alice", KEY, NOW)}}
    found, _ = approvals.look([widened], "uid-2", ask(), KEY, NOW + 10, owner)
    assert (found.state, found.grant_seconds) == (APPROVED, 590)  # a sibling pod: served
    assert approvals.look([widened], "uid-3", ask(), KEY, NOW + 10,
                          ("ReplicaSet", "other-7f"))[0] is None  # another workload: not
    assert approvals.look([widened], "uid-2", ask("sha256:" + "1" * 64), KEY, NOW + 10,
                          owner)[0] is None  # another request: not
    narrow = decided(asked, grant=600)  # a grant for the pod alone
    assert approvals.look([narrow], "uid-2", ask(), KEY, NOW + 10, owner)[0] is None
    pending = stored(approvals.manifest(mine, ask(), KEY, NOW), "b")  # a sibling's wait
    assert approvals.look([pending], "uid-2", ask(), KEY, NOW + 10, owner)[0] is None
    # A stretched scope is no decision: the seal covers it.
    forged = {**narrow, "status": {"decision": {**narrow["status"]["decision"],
                                                "scope": "workload"}}}
    assert approvals.look([forged], "uid-2", ask(), KEY, NOW + 10, owner)[0] is None
    bare = stored(approvals.manifest(POD, ask(), KEY, NOW))
    with pytest.raises(Refused, match="belongs to no workload"):
        approvals.check_decision(bare, {**bare, "status": {"decision": {
            "verdict": "Approved", "grantSeconds": 60, "scope": "workload"}}}, "al", KEY, NOW)
    with pytest.raises(plugin.BadDecision, match="give --for too"):
        plugin.decision("Approved", None, None, workload=True)
