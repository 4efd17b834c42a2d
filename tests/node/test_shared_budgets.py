"""A budget three agent pods share (``for: injection``), on the real node: the chart's operator
keeps the count, each pod's sidecar leases slices of it with the token the kubelet projects
for it, and the agents (Python in the agent image, through the injected proxy variables) are
stopped together at the figure, within the stated overshoot.
"""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

from tests.node.conftest import RELEASE_NAMESPACE, SECRET_VALUE, statuses
from tests.support.upstream import CHAT_USAGE

NAMESPACE = "budgets"
LIMIT = 600
PER_ANSWER = CHAT_USAGE["total_tokens"]  # 53, as the node's upstream reports each answer
BUDGET = "injection:tokens/day"
# Asks until refused; prints how many answers it got, then the refusal's status and body.
ASK_UNTIL_REFUSED = """
import json, requests
url = "https://api.openai.com/v1/chat/completions"
body = {"model": "gpt-4o-mini", "max_tokens": 30, "messages": [{"role": "user", "content": "Hi"}]}
answered = 0
while answered < 100:
    r = requests.post(url, json=body)
    if r.status_code != 200:
        break
    answered += 1
print(json.dumps({"answered": answered, "status": r.status_code, "error": r.headers.get(
    "X-Keyhole-Error"), "body": r.json()}))
"""


def shared_injection() -> dict:
    return {
        "apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjection",
        "metadata": {"name": "llm"},
        "spec": {
            "podSelector": {"matchLabels": {"keyhole.dev/llm": "true"}},
            "hosts": ["api.openai.com"],
            "headers": [{"name": "Authorization", "format": "Bearer {value}",
                         "valueFrom": {"secretKeyRef": {"name": "openai-credentials",
                                                        "key": "api-key"}}}],
            "llm": {"api": "openai", "budgets": [{"per": "day", "tokens": LIMIT,
                                                  "for": "injection"}]},
        },
    }


CHANNEL_HOST = "keyhole-webhook.keyhole-system.svc"


def channel_alias(kube) -> dict:
    """The channel's Service name → its ClusterIP (kube-proxy routes it), where a cluster's DNS
    would answer: the test node runs none."""
    ip = kube.get("service", "keyhole-webhook", RELEASE_NAMESPACE)["spec"]["clusterIP"]
    return {"ip": ip, "hostnames": [CHANNEL_HOST]}


class Team:
    """The agents namespace of this module: three tagged Deployments."""

    def __init__(self, agents):
        self.agents, self.kube = agents, agents.kube

    def exec(self, pod: dict, *command: str, container: str = "agent"):
        return self.kube.kubectl("exec", "-n", NAMESPACE, pod["metadata"]["name"], "-c",
                                 container, "--", *command, check=False)

    def pod(self, app: str) -> dict:
        (found,) = [p for p in self.kube.get_all("pods", NAMESPACE)
                    if p["metadata"].get("labels", {}).get("app") == app
                    and not p["metadata"].get("deletionTimestamp")]
        return found

    def ask_until_refused(self, app: str) -> dict:
        done = self.exec(self.pod(app), "python3", "-c", ASK_UNTIL_REFUSED)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def ledger(self) -> dict:
        status = self.kube.get("si", "llm", NAMESPACE).get("status") or {}
        return {e["name"]: e for e in status.get("ledger") or []}


def test_three_pods_share_one_budget_that_outlives_a_killed_sidecar(
        agents, release, node, node_upstream):
    """(That the count outlives an operator restart is shown with the real operator process in
    tests/cluster/test_shared_budgets.py, where it costs no Deployment rollout.)"""
    from tests.node.conftest import agent_deployment

    kube = agents.kube
    kube.kubectl("create", "namespace", NAMESPACE)
    kube.kubectl("create", "secret", "generic", "openai-credentials", "-n", NAMESPACE,
                 f"--from-literal=api-key={SECRET_VALUE}")
    kube.apply([shared_injection()], NAMESPACE)
    kube.wait_for(lambda: "conditions" in (kube.get("si", "llm", NAMESPACE).get("status")
                                           or {}), 60, "the injection observed")
    apps = ["agent-1", "agent-2", "agent-3"]
    deployments = [agent_deployment(app, agents.images["agent"].name, {"keyhole.dev/llm": "true"})
                   for app in apps]
    for deployment in deployments:  # the test node runs no cluster DNS
        deployment["spec"]["template"]["spec"]["hostAliases"].append(channel_alias(kube))
    kube.apply(deployments, NAMESPACE)
    for app in apps:
        kube.kubectl("rollout", "status", f"deployment/{app}", "-n", NAMESPACE,
                     "--timeout=120s")
    team = Team(agents)
    sidecar = next(c for c in team.pod("agent-1")["spec"]["initContainers"]
                   if c["name"] == "keyhole-proxy")
    assert "--operator-url" in sidecar["args"]  # the chart turned the channel on
    before = len([r for r in node_upstream.received if r.path == "/v1/chat/completions"])

    with ThreadPoolExecutor(len(apps)) as pool:
        results = list(pool.map(team.ask_until_refused, apps))
    answered = sum(r["answered"] for r in results)
    sent = len([r for r in node_upstream.received if r.path == "/v1/chat/completions"])
    assert sent - before == answered  # what was refused never left its pod
    for result in results:
        assert result["status"] == 429 and result["error"] == "budget_exhausted", result
        assert result["body"]["error"]["code"] == "insufficient_quota"
        assert "across its pods" in result["body"]["error"]["message"]
    spent = answered * PER_ANSWER
    # The stated bound: each pod may pass the figure by the one request it had in flight.
    assert LIMIT <= spent <= LIMIT + len(apps) * PER_ANSWER, results
    print(f"\n[node] a budget of {LIMIT} tokens shared by {len(apps)} pods: "
          f"{[r['answered'] for r in results]} answers, {spent} tokens counted")
    kube.wait_for(lambda: team.ledger()[BUDGET]["spent"] == spent, 30,
                  f"the ledger counting {spent} tokens")
    assert sorted(x["pod"].rsplit("-", 2)[0] for x in team.ledger()[BUDGET]["leases"]) == apps

    # A sidecar killed mid-lease: its pod's next sidecar draws a new lease; the old one's
    # slice stays spent, and the budget still holds.
    pod = team.pod("agent-2")
    restarts = statuses(pod)["keyhole-proxy"].get("restartCount", 0)
    old_leases = {x["lease"] for x in team.ledger()[BUDGET]["leases"]
                  if x["uid"] == pod["metadata"]["uid"]}
    os.kill(node.container_pid(statuses(pod)["keyhole-proxy"]["containerID"]), signal.SIGKILL)
    kube.wait_for(lambda: statuses(team.pod("agent-2"))["keyhole-proxy"].get(
        "restartCount", 0) == restarts + 1 and statuses(team.pod("agent-2"))[
        "keyhole-proxy"].get("ready") is True, 60, "the sidecar restarted and ready")
    after = team.ask_until_refused("agent-2")
    assert after["answered"] == 0 and after["status"] == 429, after
    entry = team.ledger()[BUDGET]
    mine = [x for x in entry["leases"] if x["uid"] == pod["metadata"]["uid"]]
    assert len(mine) == 1 and mine[0]["lease"] not in old_leases
    assert entry["spent"] >= spent and entry["left"] == 0
    assert SECRET_VALUE not in json.dumps(kube.get("si", "llm", NAMESPACE))

    # A pod's token cannot lease a budget of an injection that does not serve the pod: a
    # token the API server bound to agent-1's pod, as the kubelet projects it, asking for one.
    other = shared_injection()
    other["metadata"]["name"] = "other"
    other["spec"]["podSelector"] = {"matchLabels": {"keyhole.dev/other": "true"}}
    kube.apply([other], NAMESPACE)
    target = team.pod("agent-1")
    token = kube.kubectl("create", "token", "default", "-n", NAMESPACE, "--audience",
                         "keyhole.dev", "--bound-object-kind", "Pod", "--bound-object-name",
                         target["metadata"]["name"], "--bound-object-uid",
                         target["metadata"]["uid"], "--duration", "10m").stdout.strip()
    body = json.dumps({"injection": "other", "lease": "ab" * 16, "budgets": [
        {"name": BUDGET, "window": 0, "tokens": 0, "usd": 0, "want": 100}]})
    refused = team.exec(target, "curl", "-sS", "--noproxy", "*", "-k", "--resolve",
                        f"{CHANNEL_HOST}:9445:{channel_alias(kube)['ip']}",
                        "-H", f"Authorization: Bearer {token}", "-d", body, "-w", "\n%{http_code}",
                        f"https://{CHANNEL_HOST}:9445/v1/leases").stdout
    assert refused.endswith("\n403"), refused
    assert "is not served by injection 'other'" in refused
    assert "ledger" not in (kube.get("si", "other", NAMESPACE).get("status") or {})


def test_an_agent_cannot_reach_the_channel_as_its_sidecar(agents):
    """The agent's own token is not meant for keyhole, and it may not mount one that is."""
    pod = agents.pod("agent")
    ip = channel_alias(agents.kube)["ip"]
    call = ("curl -sS --noproxy '*' -k -o /dev/null -w '%{http_code}' -X POST "
            f"--resolve {CHANNEL_HOST}:9445:{ip} "
            "-H \"Authorization: Bearer $(cat /var/run/secrets/kubernetes.io/serviceaccount/"
            f"token)\" -d '{{}}' https://{CHANNEL_HOST}:9445/v1/leases")
    assert agents.exec(pod, "sh", "-c", call).stdout == "401"
    mounted = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "impostor", "labels": {"keyhole.dev/openai": "true"}},
               "spec": {"containers": [{"name": "agent", "image": agents.images["agent"].name,
                                        "imagePullPolicy": "Never", "command": ["sleep", "60"],
                                        "volumeMounts": [{"name": "t", "mountPath": "/t"}]}],
                        "volumes": [{"name": "t", "projected": {"sources": [
                            {"serviceAccountToken": {"audience": "keyhole.dev",
                                                     "path": "token"}}]}}]}}
    refused = agents.kube.apply([mounted], agents.namespace, check=False)
    assert refused.returncode != 0
    assert "a ServiceAccount token for audience 'keyhole.dev'" in refused.stderr
