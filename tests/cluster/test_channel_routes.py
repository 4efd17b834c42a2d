"""Revocation through the operator channel: the sidecar asks the operator for its pod's
signed routes every few seconds, so a removed tag stops injection in seconds — here with the
routes file never updated at all (no kubelet runs in these tests: the file keeps granting),
which proves the channel is what revoked."""

from __future__ import annotations

import time

import openai
import pytest

from tests.cluster.test_operator import apply_injections
from tests.cluster.test_shared_budgets import client, shared_injection


@pytest.fixture
def agents(kube, operator, namespace, llm_upstream, tmp_path):
    from tests.cluster.test_shared_budgets import Agents

    found = Agents(kube, operator, namespace, llm_upstream, tmp_path)
    yield found
    found.close()


def ask(sidecar, injection: str = "openai") -> int:
    """One chat completion through the sidecar (base-URL mode of ``injection``): its status."""
    with client(sidecar) as c:
        c.base_url = f"{sidecar.url}/{injection}/v1"
        try:
            c.chat.completions.create(model="gpt-4o-mini", max_tokens=5,
                                      messages=[{"role": "user", "content": "Hi"}])
        except openai.APIStatusError as exc:
            return exc.status_code
    return 200


def test_a_removed_tag_revokes_through_the_channel_while_the_file_still_grants(
        agents, kube, operator, llm_upstream):
    apply_injections(kube, agents.namespace, shared_injection("openai", 100000))
    pod = agents.pod("agent-a")
    sidecar = agents.sidecar(pod, report_seconds=60)  # routes asked every second
    assert ask(sidecar) == 200
    sidecar.wait_for_log("reloaded configuration from the operator channel", timeout=10)
    started = time.monotonic()
    kube.kubectl("label", "pod", "agent-a", "-n", agents.namespace, "keyhole.dev/openai-")
    kube.wait_for(lambda: ask(sidecar) != 200, what="the revocation reaching the sidecar")
    took = time.monotonic() - started
    assert took < 5, f"revoked after {took:.1f}s"  # the operator's rewrite + one 1 s poll
    print(f"\n[cluster] revoked through the channel {took:.1f}s after the tag was removed")
    seen = len(llm_upstream.seen)
    assert ask(sidecar) == 404  # base-URL mode: no injection of that name any more
    assert len(llm_upstream.seen) == seen  # nothing left the pod
    last = sidecar.audit()[-1]
    assert last["reason"] == "not_found" and last["decision"] == "denied"
    assert "openai" in (agents.workdir / "agent-a" / "injections.yaml").read_text()  # the file

    # Tagged again: granted again, through the channel as well.
    kube.kubectl("label", "pod", "agent-a", "-n", agents.namespace, "keyhole.dev/openai=true")
    kube.wait_for(lambda: ask(sidecar) == 200, what="the grant reaching the sidecar")


def test_with_the_operator_away_the_last_routes_it_sent_keep_serving(agents, kube, operator):
    apply_injections(kube, agents.namespace, shared_injection("openai", 100000))
    pod = agents.pod("agent-a")
    sidecar = agents.sidecar(pod, report_seconds=60)
    sidecar.wait_for_log("reloaded configuration from the operator channel", timeout=10)
    assert sidecar.metric("keyhole_channel_up", call="routes") == 1
    kube.kubectl("label", "pod", "agent-a", "-n", agents.namespace, "keyhole.dev/openai-")
    kube.wait_for(lambda: ask(sidecar) != 200, what="the revocation reaching the sidecar")
    operator.stop()
    try:
        sidecar.wait_for_log("routes from the operator channel: the operator channel",
                             timeout=10)
        assert sidecar.metric("keyhole_channel_up", call="routes") == 0
        # The file still grants (nothing updated it); the newer routes — the channel's last,
        # revoked — keep serving: an outage never brings a revoked injection back.
        assert ask(sidecar) != 200
    finally:
        operator.restart()


def test_the_channel_answers_no_pod_keyhole_did_not_inject_nor_a_deleted_one(
        agents, kube, operator, tmp_path):
    import ssl

    import httpx

    from tests.cluster.test_operator import pod as plain_pod

    ca_file = tmp_path / "operator-ca.crt"
    apply_injections(kube, agents.namespace, shared_injection("openai", 100000))
    ca_file.write_text(agents.channel_ca())
    url = f"https://127.0.0.1:{operator.channel_port}/v1/routes"

    def routes(token: str) -> httpx.Response:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file))) as http:
            return http.post(url, headers={"Authorization": f"Bearer {token}"})

    kube.apply([plain_pod("untagged")], agents.namespace)  # no tag: keyhole left it alone
    untagged = routes(agents.token(kube.get("pod", "untagged", agents.namespace)))
    assert untagged.status_code == 403 and "carries no routes" in untagged.json()["error"]

    tagged = agents.pod("agent-a")
    token = agents.token(tagged)
    answered = routes(token)
    assert answered.status_code == 200
    assert answered.json()["routes"] == tagged["metadata"]["annotations"][
        "keyhole.dev/injections"]
    kube.kubectl("delete", "pod", "agent-a", "-n", agents.namespace, "--wait=true")
    # The token outlives its pod on paper (10 min), but the API server no longer accepts it
    # (its bound object is gone), and the operator reads the pod at every call anyway.
    replayed = routes(token)
    assert replayed.status_code in (401, 403), replayed.text
