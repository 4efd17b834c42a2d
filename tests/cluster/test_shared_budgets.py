"""Budgets all pods of an injection share (``for: injection``), kept by the real operator in
the injection's status on the real API server.

Each "pod" is a real Pod object the webhook injected, and a real sidecar process run here
with what the kubelet would give it: the pod's signed routes, the namespace's signing key,
the channel's CA from the namespace's trust ConfigMap, and a ServiceAccount token the API
server bound to that pod (``kubectl create token --bound-object-kind Pod``). Only the
kubelet is missing (tests/node runs the same on a real node); the answers come from the
model API stand-in on 127.0.0.3.
"""

from __future__ import annotations

import base64
import json
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.cluster.test_operator import apply_injections, pod
from tests.support.config import injection, ref
from tests.support.llm_upstream import OPENAI_USAGE, LlmServer
from tests.support.sidecar import start_sidecar

KEY = "sk-proj-SHARED-0123456789abcdef"
PER_ANSWER = OPENAI_USAGE["prompt_tokens"] + OPENAI_USAGE["completion_tokens"]  # 53
BUDGET = "injection:tokens/day"


def shared_injection(name: str, tokens: int) -> dict:
    doc = injection(name, hosts=["api.openai.test"],
                    llm={"api": "openai", "budgets": [{"per": "day", "tokens": tokens,
                                                       "for": "injection"}]},
                    headers=[{"name": "Authorization", "valueFrom": ref("openai", "key"),
                              "format": "Bearer {value}"}])
    doc["spec"]["podSelector"] = {"matchLabels": {f"keyhole.dev/{name}": "true"}}
    return doc


class Agents:
    """Tagged pods of one namespace and the sidecars that serve them."""

    def __init__(self, kube, operator, namespace: str, llm, workdir, *, secret: bool = True):
        self.kube, self.operator, self.namespace = kube, operator, namespace
        self.llm, self.workdir = llm, workdir
        self.sidecars: list = []
        if secret:  # a namespaced injection's Secret (a cluster injection's lives elsewhere)
            kube.kubectl("create", "secret", "generic", "openai", "-n", namespace,
                         f"--from-literal=key={KEY}")

    def pod(self, name: str, injection: str = "openai") -> dict:
        self.kube.apply([pod(name, {f"keyhole.dev/{injection}": "true"})], self.namespace)
        return self.kube.get("pod", name, self.namespace)

    def token(self, found: dict | None = None, audience: str = "keyhole.dev") -> str:
        """What the kubelet projects into the sidecar: a token the API server bound to the
        pod (or, without a pod, a token of the ServiceAccount alone)."""
        bound = [] if found is None else [
            "--bound-object-kind", "Pod", "--bound-object-name", found["metadata"]["name"],
            "--bound-object-uid", found["metadata"]["uid"]]
        return self.kube.kubectl("create", "token", "default", "-n", self.namespace,
                                 "--audience", audience, "--duration", "10m", *bound
                                 ).stdout.strip()

    def channel_ca(self) -> str:
        def published() -> str | None:
            data = self.kube.get("configmap", "keyhole-ca-bundle", self.namespace).get("data")
            return (data or {}).get("operator-ca.crt")

        self.kube.wait_for(published, what="the channel's CA in the trust ConfigMap")
        return published()

    def sidecar(self, found: dict, report_seconds: float = 0.5, tag: str = "",
                routes_seconds: float = 1.0, extra: tuple[str, ...] = (),
                resolve: list[str] | None = None, upstream_ca: str | None = None,
                secrets: dict | None = None):
        folder = self.workdir / f"{found['metadata']['name']}{tag}"
        folder.mkdir(parents=True)
        signing = self.kube.get("secret", "keyhole-signing-key", self.namespace)["data"]["key"]
        (folder / "signing.key").write_bytes(base64.b64decode(signing))
        (folder / "operator-ca.crt").write_text(self.channel_ca())
        (folder / "token").write_text(self.token(found))
        proc = start_sidecar(
            folder, found["metadata"]["annotations"]["keyhole.dev/injections"],
            {"openai": {"key": KEY}} if secrets is None else secrets,
            resolve=LlmServer.resolve() if resolve is None else resolve,
            upstream_ca=upstream_ca or self.llm.ca_file,
            args=["--signing-key", str(folder / "signing.key"),
                  "--operator-url", f"https://127.0.0.1:{self.operator.channel_port}",
                  "--operator-ca", str(folder / "operator-ca.crt"),
                  "--operator-token", str(folder / "token"),
                  "--operator-report-seconds", str(report_seconds),
                  "--operator-routes-seconds", str(routes_seconds), *extra])
        self.sidecars.append(proc)
        return proc

    def ledger(self, name: str = "openai") -> dict:
        status = self.kube.get("si", name, self.namespace).get("status") or {}
        return {e["name"]: e for e in status.get("ledger") or []}

    def close(self) -> None:
        for proc in self.sidecars:
            proc.stop()


@pytest.fixture
def agents(kube, operator, namespace, llm_upstream, tmp_path):
    found = Agents(kube, operator, namespace, llm_upstream, tmp_path)
    yield found
    found.close()


def client(sidecar):
    import openai

    return openai.OpenAI(base_url=f"{sidecar.url}/openai/v1", api_key="placeholder",
                         max_retries=0)


def ask(openai_client):
    return openai_client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=30, messages=[{"role": "user", "content": "Paris?"}])


def until_refused(sidecar) -> tuple[int, Exception]:
    """Ask through ``sidecar`` until a request is refused: (answers, the refusal)."""
    import openai

    answered = 0
    with client(sidecar) as c:
        while True:
            try:
                ask(c)
            except openai.APIStatusError as exc:
                return answered, exc
            answered += 1
            assert answered < 100, "the shared budget never stopped this agent"


def test_three_pods_share_one_budget_and_together_stop_at_its_figure(agents, kube, llm_upstream):
    import openai

    limit = 400
    apply_injections(kube, agents.namespace, shared_injection("openai", limit))
    sidecars = [agents.sidecar(agents.pod(f"agent-{i}")) for i in range(3)]
    sent_before = len(llm_upstream.seen)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(until_refused, sidecars))
    answered = sum(n for n, _ in results)
    assert len(llm_upstream.seen) == sent_before + answered  # no refused request left a pod
    for _, refusal in results:  # every agent's SDK saw its API's quota error
        assert isinstance(refusal, openai.RateLimitError), refusal
        assert refusal.code == "insufficient_quota"
        assert f"used its {limit} tokens per UTC day ({BUDGET}) across its pods" in \
            refusal.message
    spent = answered * PER_ANSWER
    # The stated bound: each pod may pass the figure by the one request it had in flight.
    assert limit <= spent <= limit + len(sidecars) * PER_ANSWER, (answered, spent)
    print(f"\n[cluster] a budget of {limit} tokens shared by {len(sidecars)} sidecars: "
          f"{[n for n, _ in results]} answers, {spent} tokens counted")
    assert all(n > 0 for n, _ in results)  # the budget was shared, not taken by one pod

    def reported() -> dict | None:
        entry = agents.ledger().get(BUDGET)
        return entry if entry and entry["spent"] == spent and entry["held"] == 0 else None

    kube.wait_for(reported, what=f"the ledger counting {spent} tokens with nothing held")
    entry = reported()
    assert entry["limit"] == limit and entry["left"] == 0 and entry["unit"] == "tokens"
    assert sorted(x["pod"] for x in entry["leases"]) == ["agent-0", "agent-1", "agent-2"]
    assert sum(x["tokens"] for x in entry["leases"]) == spent
    usage = kube.get("si", "openai", agents.namespace)["status"]["usage"]
    assert usage["spentToday"].startswith(f"{spent} tokens, $")
    assert usage["budgetLeft"] == f"0 tokens ({BUDGET})"
    table = kube.kubectl("get", "si", "openai", "-n", agents.namespace).stdout
    assert "SPENT TODAY" in table and "BUDGET LEFT" in table
    assert f"{spent} tokens" in table and f"0 tokens ({BUDGET})" in table
    for proc in sidecars:
        assert proc.metric("keyhole_llm_budget_limit", injection="openai",
                           budget=BUDGET) == limit
        assert proc.metric("keyhole_llm_budget_remaining", injection="openai",
                           budget=BUDGET) == 0
    assert KEY not in json.dumps(kube.get("si", "openai", agents.namespace))


def test_a_pods_token_cannot_spend_another_injections_budget(agents, kube, operator, tmp_path):
    apply_injections(kube, agents.namespace, shared_injection("openai", 1000),
                     shared_injection("other", 1000))
    mine = agents.pod("agent-a")
    ca_file = tmp_path / "operator-ca.crt"
    ca_file.write_text(agents.channel_ca())
    url = f"https://127.0.0.1:{operator.channel_port}/v1/leases"

    def lease(token: str | None, name: str) -> httpx.Response:
        body = {"injection": name, "lease": "ab" * 16, "budgets": [
            {"name": BUDGET, "window": 0, "tokens": 0, "usd": 0, "want": 500}]}
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file))) as http:
            return http.post(url, json=body, headers=headers)

    token = agents.token(mine)
    allowed = lease(token, "openai")
    assert allowed.status_code == 200, allowed.text  # what its routes carry: answered
    assert allowed.json()["budgets"][0]["granted"] == 500
    started = time.monotonic()
    for _ in range(20):  # what a lease costs a request that needs one (review remembered)
        assert lease(token, "openai").status_code == 200
    print(f"\n[cluster] a lease call (pod read, injection read, ledger write): "
          f"{(time.monotonic() - started) / 20 * 1000:.1f} ms")
    other = lease(token, "other")
    assert other.status_code == 403
    assert "is not served by injection 'other': it may not spend its budgets" in \
        other.json()["error"]
    assert "ledger" not in (kube.get("si", "other", agents.namespace).get("status") or {})
    unbound = lease(agents.token(None), "openai")  # the ServiceAccount's, bound to no pod
    assert unbound.status_code == 403 and "not bound to a pod" in unbound.json()["error"]
    wrong_audience = lease(agents.token(mine, audience="https://kubernetes.default.svc"),
                           "openai")
    assert wrong_audience.status_code == 401
    assert lease(None, "openai").status_code == 401
    assert lease("not-a-token", "openai").status_code == 401
    calls = operator_metric(operator, "keyhole_operator_channel_calls_total")
    assert calls["403"] >= 2 and calls["401"] >= 3 and calls["200"] >= 1


def test_the_count_survives_an_operator_restart_and_a_sidecar_killed_mid_lease(
        agents, kube, operator, llm_upstream):
    """Slices are a twentieth of 4000 tokens beyond what requests reserve (200: three answers
    and a bit)."""
    import openai

    apply_injections(kube, agents.namespace, shared_injection("openai", 4000))
    first = agents.sidecar(agents.pod("agent-a"))
    with client(first) as c:
        ask(c)
        ask(c)
    kube.wait_for(lambda: agents.ledger()[BUDGET]["spent"] == 2 * PER_ANSWER,
                  what="the first two answers reported")
    operator.restart()
    assert agents.ledger()[BUDGET]["spent"] == 2 * PER_ANSWER
    with client(first) as c:
        ask(c)
    kube.wait_for(lambda: agents.ledger()[BUDGET]["spent"] == 3 * PER_ANSWER,
                  what="the restarted operator counting on from the stored figure")

    # A sidecar that reports only when it needs room: what it holds is all it may spend.
    found = agents.pod("agent-b")
    second = agents.sidecar(found, report_seconds=600)
    with client(second) as c:
        ask(c)  # leases a slice: its request's reservation and 200 tokens beyond
    (slice_,) = [x for x in agents.ledger()[BUDGET]["leases"] if x["pod"] == "agent-b"]
    allowance = slice_["tokens"] + slice_["held"]
    operator.stop()
    served, away = until_refused(second)  # from the slice in hand, the operator away
    assert isinstance(away, openai.InternalServerError) and away.status_code == 503
    assert away.response.headers["X-Keyhole-Error"] == "budget_unavailable"
    assert "is kept by the operator, which does not answer" in away.message
    assert "x-should-retry" not in away.response.headers  # a retry later may pass
    counted = (1 + served) * PER_ANSWER
    assert served >= 3 and allowance <= counted <= allowance + PER_ANSWER  # one overshoot
    operator.restart()
    with client(second) as c:
        ask(c)  # reports what it counted away, gets a slice
    before = agents.ledger()[BUDGET]
    (held,) = [x for x in before["leases"] if x["pod"] == "agent-b"]
    assert held["tokens"] == counted and held["held"] > 0

    second.process.send_signal(signal.SIGKILL)  # mid-lease: its last answer never reported
    second.process.wait()
    answered = 3 + 1 + served + 1  # agent-a's, agent-b's
    reborn = agents.sidecar(found, report_seconds=0.5, tag="-restarted")
    with client(reborn) as c:
        ask(c)
    answered += 1

    def retired() -> dict | None:
        entry = agents.ledger()[BUDGET]
        leases = [x for x in entry["leases"] if x["pod"] == "agent-b"]
        return entry if len(leases) == 1 and leases[0]["lease"] != held["lease"] and \
            leases[0]["tokens"] == PER_ANSWER else None

    entry = kube.wait_for(retired, what="the killed sidecar's lease retired")
    # What the killed lease counted and all it held stay spent: a crash never frees budget.
    assert entry["retired"]["used"] == held["tokens"] + held["held"]
    assert entry["spent"] >= answered * PER_ANSWER
    assert entry["spent"] + entry["held"] + entry["left"] == 4000


def test_a_ledger_written_from_a_stale_read_is_refused(agents, kube, operator):
    """Replicas agree because a write carries the resourceVersion it read: the second of two
    writers from the same read is told to read again."""
    from keyhole_operator.kube import Cluster

    apply_injections(kube, agents.namespace, shared_injection("openai", 1000))
    cluster = Cluster(_admin_client(kube))
    read = cluster.read_injection(agents.namespace, "openai")
    version = read["metadata"]["resourceVersion"]
    first = {"ledger": [{"name": BUDGET, "window": "2026-12-06T00:00:00Z"}]}
    assert cluster.write_ledger(agents.namespace, "openai", version, first)
    assert not cluster.write_ledger(agents.namespace, "openai", version, {"ledger": []})
    assert list(agents.ledger()) == [BUDGET]


def _admin_client(kube):
    import kubernetes

    return kubernetes.config.new_client_from_config(str(kube.kubeconfig))


def operator_metric(operator, name: str) -> dict[str, float]:
    """The operator's counter ``name`` by its one label's value, from its /metrics."""
    with httpx.Client() as http:
        text = http.get(f"http://127.0.0.1:{operator.metrics_port}/metrics").text
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            found[labels.split('"')[1]] = float(value)
    return found
