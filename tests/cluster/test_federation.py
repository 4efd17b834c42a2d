"""Workload identity federation on the real API server: the operator mints the identity of
each federated injection (a ServiceAccount of keyhole's namespace, TokenRequest) and hands it
only to the sidecars the injection serves; a stand-in for the Claude API verifies that token
against the API server's own OIDC discovery document and JWKS (tests/support/federation.py).
The attacker of docs/security.md, *Workload identity*, tries every way to a token the
provider's rule accepts."""

from __future__ import annotations

import asyncio
import json
import ssl

import httpx
import pytest

from tests.cluster.test_shared_budgets import Agents
from tests.integration.clients import curl
from tests.support import federation
from tests.support.config import injection
from tests.support.federation import AUDIENCES, FederationServer, Trust

HOME = "keyhole-system"
ISSUER = "https://kubernetes.default.svc"  # the test API server's --service-account-issuer


@pytest.fixture(scope="module")
def provider(kube, test_ca):
    """The stand-ins, trusting the API server's issuer: its discovery document and JWKS read
    from the API server itself (as a provider reads them from the issuer's public URL)."""
    async def raw(path: str) -> dict:
        done = await asyncio.to_thread(kube.kubectl, "get", "--raw", path)
        return json.loads(done.stdout)

    server = FederationServer(test_ca[0])
    state = server.start()
    state.trust = Trust(ISSUER, "", lambda: raw("/.well-known/openid-configuration"),
                        lambda url: raw("/" + url.split("/", 3)[3]))
    yield state
    server.stop()


class Federated:
    """One namespace's injection ``claude`` that federates, its pods and their sidecars."""

    def __init__(self, kube, operator, namespace, llm, workdir, provider, test_ca):
        self.kube, self.namespace, self.provider = kube, namespace, provider
        self.agents = Agents(kube, operator, namespace, llm, workdir, secret=False)
        self.ca_file = test_ca[1]
        self.account = f"ns.{namespace}.claude"
        self.subject = f"system:serviceaccount:{HOME}:{self.account}"
        provider.trust.subject = self.subject
        self.host = f"claude.test:{provider.port}"
        kube.apply([injection("claude", hosts=[self.host], workloadIdentity={"claude": {
            "organizationID": federation.ORGANIZATION, "federationRuleID": federation.RULE,
            "tokenURL": f"https://{self.host}/v1/oauth/token"}})], namespace)

    def published(self) -> dict:
        return (self.kube.get("si", "claude", self.namespace).get("status") or {}).get(
            "workloadIdentity") or {}

    def sidecar(self, pod: dict):
        return self.agents.sidecar(pod, extra=("--operator-values-seconds", "1"),
                                   resolve=[f"{h}:{self.provider.port}:127.0.0.1"
                                            for h in federation.HOSTS],
                                   upstream_ca=self.ca_file, secrets={})

    def channel(self, path: str, token: str, body: dict) -> httpx.Response:
        ca = self.agents.workdir / "channel-ca.crt"
        ca.write_text(self.agents.channel_ca())
        url = f"https://127.0.0.1:{self.agents.operator.channel_port}{path}"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as http:
            return http.post(url, json=body, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def federated(kube, operator, namespace, llm_upstream, tmp_path, provider, test_ca):
    found = Federated(kube, operator, namespace, llm_upstream, tmp_path, provider, test_ca)
    yield found
    found.agents.close()


def test_a_pod_with_no_secret_reaches_claude_as_the_identity_only_keyhole_holds(
        federated, kube, provider, operator):
    kube.wait_for(lambda: federated.published().get("issuer") == ISSUER,
                  what="status.workloadIdentity published")
    published = federated.published()
    assert published["subject"] == federated.subject
    assert published["audience"] == AUDIENCES["claude"]
    assert published["serviceAccount"] == f"{HOME}/{federated.account}"
    assert published["jwksURI"].endswith("/openid/v1/jwks")
    account = kube.get("serviceaccount", federated.account, HOME)
    assert account["automountServiceAccountToken"] is False
    # no key anywhere: the namespace holds keyhole's own Secrets and nothing else
    assert all(s["metadata"]["name"].startswith("keyhole-")
               for s in kube.get_all("secrets", federated.namespace))

    explained = kube.keyhole("explain", "si", "claude", "-n", federated.namespace).stdout
    for value in (federated.subject, ISSUER, AUDIENCES["claude"], published["jwksURI"]):
        assert value in explained

    pod = federated.agents.pod("agent", "claude")
    assert all(not v.get("secret") or v["secret"]["secretName"].startswith("keyhole-")
               for v in pod["spec"]["volumes"])  # the pod mounts no key either
    sidecar = federated.sidecar(pod)
    before = provider.count("claude")
    reply = curl(sidecar, f"https://{federated.host}/v1/messages")
    assert reply.status == 200, reply.body  # the stand-in verified the API server's token
    assert reply.json()["you_sent"] == "Bearer [REDACTED]"
    assert provider.count("claude") - before == 1

    kube.wait_for(lambda: (federated.published().get("lastExchange") or {}).get("ok"),
                  what="the sidecar's exchange reported in the status")
    last = federated.published()["lastExchange"]
    assert last["pod"] == "agent" and "expiresAt" in last
    status = kube.keyhole("status", "-n", federated.namespace).stdout
    assert "claude" in status and "exchanged" in status

    # nothing anyone can read holds the identity or what it bought
    seen = "\n".join([json.dumps(kube.get("si", "claude", federated.namespace)),
                      kube.kubectl("get", "events", "-A", "-o", "json").stdout,
                      operator.logs(), sidecar.stderr(), sidecar.admin("/metrics")[1],
                      explained, status, reply.everything()])
    for secret in [e["subject_token"] for e in provider.exchanges] + [
            t.value for t in provider.issued]:
        assert secret not in seen

    # the provider refuses: a 503 naming the injection and its words, and the status says so
    provider.refuse = "no federation rule matches"
    try:
        other = federated.sidecar(federated.agents.pod("agent-2", "claude"))
        refused = curl(other, f"https://{federated.host}/v1/messages")
    finally:
        provider.refuse = None
    assert refused.status == 503
    assert "injection 'claude'" in refused.body and "no federation rule matches" in refused.body

    def exchange_condition() -> dict:
        conditions = (kube.get("si", "claude", federated.namespace).get("status") or {}).get(
            "conditions") or []
        return next((c for c in conditions if c["type"] == "IdentityExchanged"), {})

    kube.wait_for(lambda: exchange_condition().get("status") == "False",
                  what="IdentityExchanged turning False")
    assert "no federation rule matches" in exchange_condition()["message"]
    assert "ExchangeFailed" in kube.kubectl("get", "events", "-n", federated.namespace).stdout

    # the tag removed: the channel gives that pod no identity any more
    token = federated.agents.token(pod)
    kube.kubectl("label", "pod", "agent", "-n", federated.namespace, "keyhole.dev/claude-")
    refused = federated.channel("/v1/identity", token, {"injection": "claude"})
    assert refused.status_code == 403  # its routes lose the injection, or it no longer selects
    assert "is not served by injection 'claude'" in refused.text or \
        "does not select this pod now" in refused.text

    # the injection deleted: its ServiceAccount goes with it
    kube.kubectl("delete", "si", "claude", "-n", federated.namespace)
    kube.wait_for(lambda: kube.kubectl("get", "serviceaccount", federated.account, "-n",
                                       HOME, check=False).returncode != 0,
                  what="the identity's ServiceAccount deleted")


def test_who_may_create_pods_and_service_accounts_cannot_get_a_token_the_provider_accepts(
        federated, kube, provider, tmp_path):
    """The attacker of docs/security.md: creates pods and ServiceAccounts in the agent's
    namespace, mints tokens for its own accounts, reads no Secret."""
    kube.wait_for(lambda: federated.published().get("subject"), what="the identity published")
    namespace = federated.namespace
    kube.kubectl("create", "serviceaccount", "mallory", "-n", namespace)
    kube.bind_role(namespace, "mallory", [
        {"apiGroups": [""], "resources": ["pods", "serviceaccounts"],
         "verbs": ["create", "get", "list", "delete"]},
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}],
        accounts=("mallory",))
    config = kube.service_account_kubeconfig(namespace, "mallory", tmp_path / "mallory")

    def as_mallory(*args: str):
        return kube.kubectl(*args, check=False, kubeconfig=config)

    # 1. a token of an account of its own, with the provider's audience: a subject no rule names
    own = as_mallory("create", "token", "mallory", "-n", namespace, "--audience",
                     AUDIENCES["claude"]).stdout.strip()
    assert own, "mallory may mint tokens for its own accounts"
    exchanged = _exchange(provider, own, federated.ca_file)
    assert exchanged.status_code == 401
    assert f"no rule matches subject 'system:serviceaccount:{namespace}:mallory'" in \
        exchanged.text
    # 2. the injection's own account lives in keyhole's namespace: no token, no pod there
    minted = as_mallory("create", "token", federated.account, "-n", HOME, "--audience",
                        AUDIENCES["claude"])
    assert minted.returncode != 0 and "forbidden" in minted.stderr.lower()
    in_home = as_mallory("run", "grab", "-n", HOME, "--image", "busybox", "--restart=Never",
                         "--overrides", json.dumps({"spec": {
                             "serviceAccountName": federated.account}}))
    assert in_home.returncode != 0 and "forbidden" in in_home.stderr.lower()
    # 3. a ServiceAccount of the same name in its own namespace: another subject
    as_mallory("create", "serviceaccount", federated.account, "-n", namespace)
    lookalike = as_mallory("create", "token", federated.account, "-n", namespace,
                           "--audience", AUDIENCES["claude"]).stdout.strip()
    assert _exchange(provider, lookalike, federated.ca_file).status_code == 401
    # 4. the channel as the sidecar: a pod of its own carries no routes keyhole signed, and a
    #    token bound to no pod is not the sidecar's
    as_mallory("run", "mine", "-n", namespace, "--image", "busybox", "--restart=Never")
    mine = kube.get("pod", "mine", namespace)
    bound = as_mallory("create", "token", "default", "-n", namespace, "--audience",
                       "keyhole.dev", "--bound-object-kind", "Pod", "--bound-object-name",
                       "mine", "--bound-object-uid", mine["metadata"]["uid"]).stdout.strip()
    refused = federated.channel("/v1/identity", bound, {"injection": "claude"})
    assert refused.status_code == 403 and "carries no routes" in refused.text
    unbound = as_mallory("create", "token", "default", "-n", namespace, "--audience",
                         "keyhole.dev").stdout.strip()
    refused = federated.channel("/v1/identity", unbound, {"injection": "claude"})
    assert refused.status_code == 403 and "not bound to a pod" in refused.text
    # 5. a tagged pod whose agent mounts a channel token of its own: refused at admission
    tagged = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "sly", "labels": {"keyhole.dev/claude": "true"}},
        "spec": {"containers": [{"name": "agent", "image": "busybox", "volumeMounts": [
            {"name": "channel", "mountPath": "/t"}]}],
            "volumes": [{"name": "channel", "projected": {"sources": [{"serviceAccountToken": {
                "audience": "keyhole.dev", "path": "token"}}]}}]}}
    denied = kube.apply([tagged], namespace, check=False, kubeconfig=config)
    assert denied.returncode != 0 and "audience 'keyhole.dev'" in denied.stderr


def _exchange(provider, token: str, ca_file: str) -> httpx.Response:
    """What an attacker would send the Claude API's token endpoint with a token of its own."""
    transport = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=ca_file))
    with httpx.Client(transport=transport) as http:
        return http.post(f"https://127.0.0.1:{provider.port}/v1/oauth/token",
                         headers={"Host": f"claude.test:{provider.port}",
                                  "anthropic-beta": "oidc-federation-2026-04-01"},
                         json={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                               "assertion": token, "organization_id": federation.ORGANIZATION,
                               "federation_rule_id": federation.RULE},
                         extensions={"sni_hostname": "claude.test"})
