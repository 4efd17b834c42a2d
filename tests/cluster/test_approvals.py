"""A person's yes, on the real API server with the real operator and real sidecars: a request
a rule sends for approval waits in the sidecar, an ApprovalRequest names it, ``kubectl keyhole
approve`` lets exactly that request through, ``--for`` makes a grant for its twin only, and
``deny`` refuses it. Then the agent's side as an attacker plays it: it cannot decide its own
requests, through RBAC or around it, nor make an object keyhole honours.

Each "pod" is a real Pod the webhook injected and a real sidecar process run here with what
the kubelet would give it (tests/cluster/test_shared_budgets.py, ``Agents``).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from tests.cluster.test_operator import apply_injections, events
from tests.cluster.test_shared_budgets import KEY, Agents
from tests.support.config import injection, ref

CHAT = "/openai/v1/chat/completions"


def held_injection(timeout: str = "30s") -> dict:
    doc = injection("openai", hosts=["api.openai.test"],
                    headers=[{"name": "Authorization", "valueFrom": ref("openai", "key"),
                              "format": "Bearer {value}"}],
                    rules=[{"methods": ["POST"], "paths": ["/v1/chat/completions"],
                            "approval": {"timeout": timeout}},
                           {"methods": ["GET"]}])
    return doc


def chat(sidecar, content: str, timeout: float = 60) -> httpx.Response:
    with httpx.Client(timeout=timeout) as http:
        return http.post(f"{sidecar.url}{CHAT}", json={
            "model": "gpt-4o-mini", "max_tokens": 5,
            "messages": [{"role": "user", "content": content}]})


class Desk:
    """One agent pod and its sidecar, holding requests; what a person sees of them."""

    def __init__(self, agents: Agents, kube, timeout: str = "30s"):
        self.agents, self.kube, self.namespace = agents, kube, agents.namespace
        apply_injections(kube, self.namespace, held_injection(timeout))
        self.pod = agents.pod("agent")
        self.sidecar = agents.sidecar(self.pod, report_seconds=60)
        self.pool = ThreadPoolExecutor(4)

    def send(self, content: str, timeout: float = 60) -> Future:
        return self.pool.submit(chat, self.sidecar, content, timeout)

    def waiting(self, kubeconfig: str | None = None) -> list[dict]:
        return json.loads(self.kube.keyhole("approvals", "-n", self.namespace, "-o", "json"
                                            ).stdout)

    def next_waiting(self, known: set[str] = frozenset()) -> dict:
        """The one ApprovalRequest that waits and is not among ``known``."""
        def fresh() -> dict | None:
            found = [r for r in self.waiting() if r["name"] not in known]
            return found[0] if found else None

        return self.kube.wait_for(fresh, what="an ApprovalRequest waiting")

    def decide(self, verb: str, name: str, *args: str, kubeconfig=None):
        extra = ["--kubeconfig", str(kubeconfig)] if kubeconfig else []
        return self.kube.keyhole(verb, name, "-n", self.namespace, *args, *extra, check=False)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


@pytest.fixture
def desk(kube, operator, namespace, llm_upstream, tmp_path):
    agents = Agents(kube, operator, namespace, llm_upstream, tmp_path)
    found = Desk(agents, kube)
    yield found
    agents.close()
    found.close()


def test_a_held_request_leaves_only_once_approved_and_a_grant_serves_only_its_twin(
        desk, kube, llm_upstream, notifications):
    sent = len(llm_upstream.seen)
    first = desk.send("Paris?")
    row = desk.next_waiting()
    assert (row["pod"], row["injection"], row["state"]) == ("agent", "openai", "Pending")
    assert row["what"] == "POST api.openai.test/v1/chat/completions"
    assert "Paris?" in row["arguments"] and row["expiresIn"]
    assert not first.done() and len(llm_upstream.seen) == sent  # held: nothing went out
    assert f"kubectl keyhole approve {row['name']} -n {desk.namespace}" in events(
        kube, desk.namespace)
    told = kube.wait_for(lambda: notifications.about(row["name"]),
                         what="the notification webhook told, after one refused attempt")
    assert told[0]["approve"] == f"kubectl keyhole approve {row['name']} -n {desk.namespace}"
    assert (told[0]["pod"], told[0]["injection"], told[0]["kind"]) == (
        "agent", "openai", "ApprovalRequested")
    assert "Paris?" in told[0]["arguments"] and KEY not in json.dumps(told)
    assert [b["name"] for b in notifications.refused].count(row["name"]) == 1  # retried

    arrived: list[float] = []
    first.add_done_callback(lambda _: arrived.append(time.monotonic()))
    started = time.monotonic()
    approved = desk.decide("approve", row["name"])
    returned = time.monotonic()
    assert approved.returncode == 0, approved.stderr
    assert f"{row['name']} approved (by " in approved.stdout
    answer = first.result(timeout=30)
    assert answer.status_code == 200, answer.text
    assert len(llm_upstream.seen) == sent + 1
    assert llm_upstream.seen[-1].authorization == [f"Bearer {KEY}"]
    assert llm_upstream.seen[-1].body["messages"][0]["content"] == "Paris?"
    print(f"\n[cluster] kubectl keyhole approve ran {returned - started:.3f}s; the held "
          f"request's answer was back {arrived[0] - started:.3f}s after it started")

    # Approved once: the same request again waits for a person again.
    again = desk.send("Paris?")
    second = desk.next_waiting({row["name"]})
    assert desk.decide("approve", second["name"], "--for", "2m", "--reason",
                       "release day").returncode == 0
    assert again.result(timeout=30).status_code == 200
    # The grant: its twin passes at once, no new ApprovalRequest ...
    assert chat(desk.sidecar, "Paris?").status_code == 200
    assert desk.waiting() == [] and len(llm_upstream.seen) == sent + 3
    granted = desk.sidecar.wait_audit(lambda r: (r.get("approval") or {}).get("decision")
                                      == "granted")
    assert granted["status"] == 200
    # ... and a different request waits again, and is denied.
    other = desk.send("Rome?")
    third = desk.next_waiting({row["name"], second["name"]})
    assert "Rome?" in third["arguments"]
    denied = desk.decide("deny", third["name"], "--reason", "not today")
    assert denied.returncode == 0, denied.stderr
    refused = other.result(timeout=30)
    assert refused.status_code == 403
    assert refused.headers["X-Keyhole-Error"] == "approval_denied"
    body = refused.json()
    assert body["approval"]["name"] == third["name"] and body["approval"]["reason"] == "not today"
    assert "was denied by" in body["message"] and "not today" in body["message"]
    assert len(llm_upstream.seen) == sent + 3  # the denied request never left
    line = desk.sidecar.wait_audit(lambda r: r.get("reason") == "approval_denied")
    assert line["approval"]["name"] == third["name"] and line["approval"]["by"]

    metric = desk.sidecar.metric
    assert metric("keyhole_approvals_total", injection="openai", decision="approved") == 2
    assert metric("keyhole_approvals_total", injection="openai", decision="granted") == 1
    assert metric("keyhole_approvals_total", injection="openai", decision="denied") == 1
    everything = kube.kubectl("get", "approvalrequests", "-n", desk.namespace, "-o", "json"
                              ).stdout + events(kube, desk.namespace)
    assert KEY not in everything
    assert "ApprovalApproved" in everything and "ApprovalDenied" in everything


def test_the_agent_cannot_decide_its_own_requests_nor_make_one_keyhole_honours(
        desk, kube, tmp_path, llm_upstream):
    sent = len(llm_upstream.seen)
    held = desk.send("Delete everything?")
    row = desk.next_waiting()
    name, ns = row["name"], desk.namespace
    agent = kube.service_account_kubeconfig(ns, "default", tmp_path / "agent.kubeconfig")

    # Its ServiceAccount holds no right to decide: RBAC refuses the status write.
    refused = desk.decide("approve", name, kubeconfig=agent)
    assert refused.returncode == 1 and "refused" in refused.stderr, refused.stderr
    # Given every right an approver has, the operator's webhook still refuses its own.
    kube.bind_role(ns, "decide", [
        {"apiGroups": ["keyhole.dev"], "resources": ["approvalrequests"],
         "verbs": ["get", "list", "approve"]},
        {"apiGroups": ["keyhole.dev"], "resources": ["approvalrequests/status"],
         "verbs": ["get", "patch"]}], ("default", "approver"))
    refused = desk.decide("approve", name, kubeconfig=agent)
    assert "never approves its own requests" in refused.stderr, refused.stderr
    # Another account the agent could act as (it may run pods in that account's namespace).
    kube.kubectl("create", "serviceaccount", "approver", "-n", ns)
    kube.bind_role(ns, "run-pods", [{"apiGroups": [""], "resources": ["pods"],
                                     "verbs": ["create"]}])
    approver = kube.service_account_kubeconfig(ns, "approver", tmp_path / "approver.kubeconfig")
    refused = desk.decide("approve", name, kubeconfig=approver)
    assert f"could create pods in namespace {ns}" in refused.stderr, refused.stderr

    # An ApprovalRequest made by hand (a copy of the real one) is never decided.
    original = kube.get("approvalrequest", name, ns)
    copy = {"apiVersion": "keyhole.dev/v1alpha1", "kind": "ApprovalRequest",
            "metadata": {"name": "forged", "labels": original["metadata"]["labels"],
                         "annotations": {"keyhole.dev/seal": "0" * 64}},
            "spec": original["spec"]}
    kube.apply([copy], ns)
    refused = desk.decide("approve", "forged")
    assert "not written by keyhole's operator" in refused.stderr, refused.stderr
    # An edited spec is no longer keyhole's: the held request is refused, never sent.
    kube.kubectl("patch", "approvalrequest", name, "-n", ns, "--type", "merge", "-p",
                 json.dumps({"spec": {"path": "/v1/models"}}))
    answer = held.result(timeout=40)
    assert answer.status_code == 403 and answer.headers["X-Keyhole-Error"] == "approval_denied"
    assert len(llm_upstream.seen) == sent


def test_a_client_that_leaves_withdraws_its_request(desk, kube):
    gone = desk.send("Wait for me?", timeout=3)
    row = desk.next_waiting()
    with pytest.raises(httpx.ReadTimeout):
        gone.result(timeout=30)  # the client gave up and closed its connection
    kube.wait_for(lambda: not kube.kubectl("get", "approvalrequest", row["name"], "-n",
                                           desk.namespace, "--ignore-not-found").stdout,
                  what="the ApprovalRequest withdrawn")
    assert "ApprovalWithdrawn" in events(kube, desk.namespace)
    line = desk.sidecar.wait_audit(lambda r: r.get("reason") == "approval_withdrawn")
    assert line["approval"]["decision"] == "withdrawn"


def test_a_runaway_agent_is_bounded_and_an_approver_deleting_a_request_refuses_it(
        desk, kube, llm_upstream):
    from keyhole_operator.approvals import MAX_PENDING_PER_POD

    sent = len(llm_upstream.seen)
    desk.pool = ThreadPoolExecutor(MAX_PENDING_PER_POD + 1)
    held = [desk.send(f"question {i}?") for i in range(MAX_PENDING_PER_POD)]
    kube.wait_for(lambda: len(desk.waiting()) == MAX_PENDING_PER_POD,
                  what=f"{MAX_PENDING_PER_POD} ApprovalRequests waiting")
    over = chat(desk.sidecar, "one more?")
    assert over.status_code == 429 and over.headers["X-Keyhole-Error"] == "approval_backlog"
    assert f"at most {MAX_PENDING_PER_POD}" in over.json()["message"]
    # Deleting what waits refuses it: nothing is sent for an object nobody decided.
    kube.kubectl("delete", "approvalrequests", "--all", "-n", desk.namespace)
    for future in held:
        answer = future.result(timeout=30)
        assert answer.status_code == 403 and "deleted before anyone decided" in answer.text
    assert len(llm_upstream.seen) == sent


def test_nobody_deciding_in_time_refuses_and_the_object_is_collected_later(
        kube, operator, namespace, llm_upstream, tmp_path):
    from tests.cluster.conftest import APPROVALS_KEEP

    agents = Agents(kube, operator, namespace, llm_upstream, tmp_path)
    desk = Desk(agents, kube, timeout="1s")
    try:
        sent = len(llm_upstream.seen)
        answer = chat(desk.sidecar, "Anyone?")
        assert answer.status_code == 403
        assert answer.headers["X-Keyhole-Error"] == "approval_timeout"
        name = answer.json()["approval"]["name"]
        assert f"nobody approved POST https://api.openai.test/v1/chat/completions within 1s " \
               f"(ApprovalRequest {name})" in answer.json()["message"]
        assert len(llm_upstream.seen) == sent
        late = desk.decide("approve", name)
        assert "waited past its timeout" in late.stderr, late.stderr
        kube.wait_for(lambda: not kube.kubectl("get", "approvalrequest", name, "-n", namespace,
                                               "--ignore-not-found").stdout,
                      timeout=APPROVALS_KEEP + 20, what="the expired ApprovalRequest collected")
        assert "ApprovalRequested" in events(kube, namespace)  # what happened stays
    finally:
        agents.close()
        desk.close()


def test_a_grant_given_to_the_workload_serves_its_other_pods(
        kube, operator, namespace, llm_upstream, tmp_path):
    from tests.cluster.test_operator import pod as plain_pod

    agents = Agents(kube, operator, namespace, llm_upstream, tmp_path)
    try:
        apply_injections(kube, namespace, held_injection())
        owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "agent-5d8f",
                 "uid": "7b0c3f5e-0000-4000-8000-000000000001", "controller": True}
        sidecars = []
        for name in ("agent-a", "agent-b"):
            made = plain_pod(name, {"keyhole.dev/openai": "true"})
            made["metadata"]["ownerReferences"] = [owner]
            kube.apply([made], namespace)
            sidecars.append(agents.sidecar(kube.get("pod", name, namespace),
                                           report_seconds=60))
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(chat, sidecars[0], "Paris?")
            row = kube.wait_for(lambda: json.loads(kube.keyhole(
                "approvals", "-n", namespace, "-o", "json").stdout), what="the ask")[0]
            decided = kube.keyhole("approve", row["name"], "-n", namespace, "--for", "2m",
                                   "--workload")
            assert decided.returncode == 0, decided.stderr
            assert first.result(timeout=30).status_code == 200
        # The other pod of the same ReplicaSet: its identical request passes at once.
        assert chat(sidecars[1], "Paris?").status_code == 200
        line = sidecars[1].wait_audit(lambda r: r.get("approval") is not None)
        assert line["approval"]["decision"] == "approved" and line["approval"]["by"]
        assert json.loads(kube.keyhole("approvals", "-n", namespace, "-o", "json").stdout) == []
    finally:
        agents.close()


def test_a_pods_token_can_neither_wait_on_nor_withdraw_another_pods_approval(
        desk, kube, operator, tmp_path):
    import ssl

    held = desk.send("Mine?")
    row = desk.next_waiting()
    digest = kube.get("approvalrequest", row["name"], desk.namespace)["spec"]["digest"]
    other = desk.agents.pod("other")  # tagged too: injected, its own pod-bound token
    ca_file = tmp_path / "operator-ca.crt"
    ca_file.write_text(desk.agents.channel_ca())
    headers = {"Authorization": f"Bearer {desk.agents.token(other)}"}
    url = f"https://127.0.0.1:{operator.channel_port}"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file))) as http:
        withdrawn = http.post(f"{url}/v1/approvals/withdraw", headers=headers,
                              json={"name": row["name"], "injection": "openai"})
        waited = http.post(f"{url}/v1/approvals", headers=headers, json={
            "injection": "openai", "digest": digest, "timeout": 30, "wait": 0,
            "what": {"kind": "request"}, "name": row["name"]})
    assert withdrawn.status_code == 403 and "is not this pod's" in withdrawn.text
    assert waited.status_code == 200 and waited.json()["state"] == "gone"
    assert kube.get("approvalrequest", row["name"], desk.namespace)  # still there, still A's
    assert desk.decide("deny", row["name"]).returncode == 0
    assert held.result(timeout=30).status_code == 403
