"""Workload identity federation on the real node: an agent pod with no Secret at all reaches
every provider's stand-in authenticated. The chart's operator mints each injection's identity
(TokenRequest) and hands it to the sidecar over the channel; the stand-ins, on the node,
verify it against the node's API server's own discovery document and JWKS. The agent
container can read no token (files, environment, /proc, the channel), and removing the pod's
tag revokes within the routes follower's period (docs/federation.md).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.node.conftest import RELEASE_NAMESPACE, agent_deployment
from tests.node.test_shared_budgets import CHANNEL_HOST, channel_alias
from tests.support import federation
from tests.support.federation import FederationServer, Trust

NAMESPACE = "federated"
PORT = 8444  # beside the node's upstream on 443
PROVIDERS = {"claude": "claude", "aws": "aws", "gcp": "gcp", "entra": "entra",
             "tokenExchange": "exchange"}  # provider → its injection's name
ROUTES_SECONDS = 10  # the sidecar's default --operator-routes-seconds


@pytest.fixture(scope="module")
def stand_ins(node, kube, node_upstream):
    """Every provider's stand-in on the node (10.254.0.2:8444), trusting the node's issuer
    for each injection's own subject, its certificate from the CA the sidecars trust."""
    async def raw(path: str) -> dict:
        done = await asyncio.to_thread(kube.kubectl, "get", "--raw", path)
        return json.loads(done.stdout)

    server = FederationServer(node_upstream.ca, sock=node.listen(PORT))
    state = server.start()
    issuer = json.loads(kube.kubectl("get", "--raw",
                                     "/.well-known/openid-configuration").stdout)["issuer"]
    state.trust = Trust(issuer, {p: f"system:serviceaccount:{RELEASE_NAMESPACE}:ns.{NAMESPACE}."
                                    f"{name}" for p, name in PROVIDERS.items()},
                        lambda: raw("/.well-known/openid-configuration"),
                        lambda url: raw("/" + url.split("/", 3)[3]))
    yield state
    server.stop()


def test_an_agent_with_no_secret_reaches_every_provider_and_holds_no_token(
        release, kube, node, stand_ins):
    kube.kubectl("create", "namespace", NAMESPACE)
    injections, urls = [], {}
    for provider in PROVIDERS:
        spec, urls[provider] = federation.injection_for(provider, lambda h: f"{h}:{PORT}")
        injections.append(spec)
    kube.apply(injections, NAMESPACE)
    labels = {f"keyhole.dev/{name}": "true" for name in PROVIDERS.values()}
    deployment = agent_deployment("agent", node.images["agent"].name, labels)
    aliases = deployment["spec"]["template"]["spec"]["hostAliases"]
    aliases[0]["hostnames"] += list(federation.HOSTS)
    aliases.append(channel_alias(kube))
    kube.apply([deployment], NAMESPACE)
    kube.kubectl("rollout", "status", "deployment/agent", "-n", NAMESPACE, "--timeout=120s")
    (pod,) = [p for p in kube.get_all("pods", NAMESPACE)
              if not p["metadata"].get("deletionTimestamp")]
    name = pod["metadata"]["name"]

    def agent(*command: str):
        return kube.kubectl("exec", "-n", NAMESPACE, name, "-c", "agent", "--", *command,
                            check=False)

    def status(url: str) -> str:
        return agent("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                     "10", url).stdout.strip()

    mounted = [v["secret"]["secretName"] for v in pod["spec"]["volumes"] if v.get("secret")]
    assert all(s.startswith("keyhole-") for s in mounted), mounted  # no Secret but keyhole's
    for provider, url in urls.items():
        answer = json.loads(agent("curl", "-s", "--max-time", "10", url).stdout)
        assert "[REDACTED]" in answer["you_sent"], (provider, answer)
    assert {e["provider"] for e in stand_ins.exchanges} == set(PROVIDERS)

    # The agent container holds no token: files, environment, its /proc, the channel.
    tokens = [t.value for t in stand_ins.issued]
    tokens += [e["subject_token"].rsplit(".", 1)[-1] for e in stand_ins.exchanges]  # signatures
    patterns = [arg for token in tokens for arg in ("-e", token)]
    search = agent("grep", "-rlsF", "--exclude-dir=proc", "--exclude-dir=sys",
                   "--exclude-dir=dev", *patterns, "/")
    assert search.returncode == 1 and search.stdout == "", search.stdout
    environment = agent("env").stdout
    assert not [t for t in tokens if t in environment]
    processes = agent("sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
    assert "keyhole" not in processes  # the sidecar's processes are not in the agent's view
    own_token = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    refused = agent("sh", "-c", f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 -k "
                                f"-H \"Authorization: Bearer $(cat {own_token} 2>/dev/null)\" "
                                f"-d '{{\"injection\":\"claude\"}}' "
                                f"https://{CHANNEL_HOST}:9445/v1/identity").stdout.strip()
    assert refused == "401", refused  # its own token is not for the channel's audience

    published = kube.get("si", "claude", NAMESPACE)["status"]["workloadIdentity"]
    assert published["subject"] == stand_ins.trust.subject["claude"]
    for where in (json.dumps(kube.get_all("secretinjections", NAMESPACE)),
                  kube.kubectl("get", "events", "-A", "-o", "json").stdout):
        assert not [t for t in tokens if t in where]

    # The tag removed: the route leaves the sidecar, and the credential with it.
    started = time.monotonic()
    kube.kubectl("label", "pod", name, "-n", NAMESPACE, "keyhole.dev/claude-")
    # (unrouted now, the connection is tunnelled to the stand-in, whose certificate the
    # agent's bundle does not trust: curl answers 000, and the stand-in gets no credential)
    kube.wait_for(lambda: status(urls["claude"]) != "200", 3 * ROUTES_SECONDS,
                  "the Claude stand-in no longer receiving the credential")
    print(f"\n[node] tag removed: the federated credential stopped "
          f"{time.monotonic() - started:.1f}s later")
    assert status(urls["entra"]) == "200"  # the pod's other grants stay
    kube.kubectl("delete", "namespace", NAMESPACE, "--wait=false")
