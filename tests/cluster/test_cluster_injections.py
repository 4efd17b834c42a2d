"""ClusterSecretInjection on the real API server, with the real operator and real sidecars.

One cluster injection serves the tagged pods of the namespaces it selects; its Secret exists
only in keyhole's namespace. Each "pod" is a real Pod the webhook injected and a real sidecar
process run here with what the kubelet would give it (its signed routes, the namespace's
signing key, the channel's CA, a token the API server bound to the pod); the values come from
the operator over the channel. tests/node runs the same with a real kubelet.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import time

import httpx
import pytest

from tests.cluster.test_channel_routes import ask
from tests.cluster.test_operator import pod as plain_pod
from tests.cluster.test_shared_budgets import Agents
from tests.support.config import injection, ref

FLEET_KEY = "sk-fleet-CENTRAL-0123456789abcdef"
ROTATED_KEY = "sk-fleet-ROTATED-fedcba9876543210"
CENTRAL = "keyhole-system"


class Fleet:
    """Three namespaces (two selected), one cluster injection, its Secret in keyhole's."""

    def __init__(self, kube, operator, llm, workdir):
        self.kube, self.operator, self.llm, self.workdir = kube, operator, llm, workdir
        # A label value that is never all digits: "020778" would be read back as an integer
        # by YAML (and refused by the CRD's schema), one run in sixteen.
        self.mark = f"f{secrets.token_hex(3)}"
        self.name = f"fleet-{self.mark}"
        self.tag = f"keyhole.dev/{self.name}"
        self.namespaces = [f"{self.name}-{x}" for x in "abc"]
        for namespace in self.namespaces:
            kube.kubectl("create", "namespace", namespace)
            kube.kubectl("create", "serviceaccount", "default", "-n", namespace)
        for namespace in self.namespaces[:2]:
            self.select(namespace)
        kube.kubectl("create", "secret", "generic", self.name, "-n", CENTRAL,
                     f"--from-literal=api-key={FLEET_KEY}")
        kube.kubectl("label", "secret", self.name, "-n", CENTRAL,
                     "keyhole.dev/cluster-injection=true")
        self.agents = {ns: Agents(kube, operator, ns, llm, workdir / ns, secret=False)
                       for ns in self.namespaces}

    def select(self, namespace: str, on: bool = True) -> None:
        label = "keyhole.dev/fleet=" + self.mark if on else "keyhole.dev/fleet-"
        self.kube.kubectl("label", "namespace", namespace, label, "--overwrite")

    def document(self) -> dict:
        doc = injection(self.name, hosts=["api.openai.test"],
                        headers=[{"name": "Authorization", "valueFrom": ref(self.name, "api-key"),
                                  "format": "Bearer {value}"}])
        doc["kind"] = "ClusterSecretInjection"
        doc["spec"]["podSelector"] = {"matchLabels": {self.tag: "true"}}
        doc["spec"]["namespaceSelector"] = {"matchLabels": {"keyhole.dev/fleet": self.mark}}
        return doc

    def apply(self) -> None:
        self.kube.apply([self.document()])

        def observed() -> bool:
            found = self.status()
            return found.get("observedGeneration") == self.kube.get(
                "clustersecretinjection", self.name, None)["metadata"]["generation"]

        self.kube.wait_for(observed, what="the operator observing the cluster injection")

    def status(self) -> dict:
        return self.kube.get("clustersecretinjection", self.name, None).get("status") or {}

    def pod(self, namespace: str, name: str = "agent", tagged: bool = True) -> dict:
        if tagged:
            return self.agents[namespace].pod(name, self.name)
        self.kube.apply([plain_pod(name)], namespace)
        return self.kube.get("pod", name, namespace)

    def sidecar(self, found: dict, *extra: str):
        return self.agents[found["metadata"]["namespace"]].sidecar(
            found, report_seconds=60, routes_seconds=1.0,
            extra=("--operator-values-seconds", "1", *extra))

    def ask(self, sidecar) -> int:
        return ask(sidecar, self.name)

    def close(self) -> None:
        for agents in self.agents.values():
            agents.close()
        self.kube.kubectl("delete", "clustersecretinjection", self.name, "--ignore-not-found")
        self.kube.kubectl("delete", "secret", self.name, "-n", CENTRAL, "--ignore-not-found")
        for namespace in self.namespaces:
            self.kube.kubectl("delete", "secretinjections", "--all", "-n", namespace,
                              "--wait=false", check=False)
            self.kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture
def fleet(kube, operator, llm_upstream, tmp_path):
    found = Fleet(kube, operator, llm_upstream, tmp_path)
    yield found
    found.close()


def values_call(fleet: Fleet, token: str) -> httpx.Response:
    ca_file = fleet.workdir / "operator-ca.crt"
    ca_file.write_text(fleet.agents[fleet.namespaces[0]].channel_ca())
    url = f"https://127.0.0.1:{fleet.operator.channel_port}/v1/values"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file))) as http:
        return http.post(url, headers={"Authorization": f"Bearer {token}"})


def test_tagged_pods_in_selected_namespaces_get_the_central_key_and_no_one_else(
        fleet, kube, llm_upstream):
    fleet.apply()
    a, b, c = fleet.namespaces
    served = [fleet.pod(a), fleet.pod(b)]
    for found in served:
        routes = json.loads(found["metadata"]["annotations"]["keyhole.dev/injections"])
        assert [(i["kind"], i["metadata"]["name"]) for i in routes["items"]] == [
            ("ClusterSecretInjection", fleet.name)]
        volumes = found["spec"]["volumes"]
        assert not [v for v in volumes if v.get("secret", {}).get("secretName") == fleet.name]
    untagged = fleet.pod(a, "untagged", tagged=False)
    elsewhere = fleet.pod(c)  # tagged, but its namespace is not selected
    for found in (untagged, elsewhere):
        assert "keyhole.dev/injections" not in (found["metadata"].get("annotations") or {})

    for found in served:
        sidecar = fleet.sidecar(found)
        assert fleet.ask(sidecar) == 200
        assert llm_upstream.seen[-1].authorization == [f"Bearer {FLEET_KEY}"]

    # The key is in keyhole's namespace and nowhere else.
    encoded = base64.b64encode(FLEET_KEY.encode()).decode()
    holders = {s["metadata"]["namespace"] for s in json.loads(
        kube.kubectl("get", "secret", "-A", "-o", "json").stdout)["items"]
        if encoded in (s.get("data") or {}).values()}
    assert holders == {CENTRAL}

    def counted() -> dict | None:
        status = fleet.status()
        return status if status.get("matchedPods") == 2 else None

    status = kube.wait_for(counted, what="the cluster injection's status counting its pods")
    assert status["matchedNamespaces"] == 2 and status["namespaces"] == sorted([a, b])
    ready = {x["type"]: x for x in status["conditions"]}["Ready"]
    assert ready["status"] == "True" and "2 pod(s) in 2 namespace(s)" in ready["message"]
    printed = kube.kubectl("get", "clustersi", fleet.name).stdout
    assert "NAMESPACES" in printed and " 2 " in printed
    for where in (kube.kubectl("get", "events", "-A", "-o", "json").stdout, json.dumps(status),
                  fleet.operator.logs()):
        assert FLEET_KEY not in where


def test_a_namespace_labelled_out_is_revoked_live_and_labelled_in_granted_again(
        fleet, kube, llm_upstream):
    fleet.apply()
    a, b, _ = fleet.namespaces
    sidecars = {ns: fleet.sidecar(fleet.pod(ns)) for ns in (a, b)}
    assert all(fleet.ask(s) == 200 for s in sidecars.values())
    started = time.monotonic()
    fleet.select(a, on=False)
    kube.wait_for(lambda: fleet.ask(sidecars[a]) != 200, what="the revocation in namespace a")
    took = time.monotonic() - started
    print(f"\n[cluster] namespace labelled out: revoked {took:.1f}s later")
    assert took < 5, took  # the operator's rewrite + one 1 s poll of routes or values
    assert fleet.ask(sidecars[b]) == 200  # the other namespace is untouched
    assert FLEET_KEY not in (fleet.workdir / a).joinpath("agent", "stderr.log").read_text()

    def announced() -> bool:
        return "no longer serves" in kube.kubectl(
            "get", "events", "-A", "--field-selector",
            f"involvedObject.name={fleet.name}", "-o", "json").stdout

    kube.wait_for(announced, what="an Event saying the namespace left")
    fleet.select(a)
    kube.wait_for(lambda: fleet.ask(sidecars[a]) == 200, what="the grant in namespace a")


def test_a_rotated_central_secret_reaches_every_sidecar_within_the_bound(
        fleet, kube, llm_upstream):
    fleet.apply()
    a, b, _ = fleet.namespaces
    sidecars = [fleet.sidecar(fleet.pod(ns)) for ns in (a, b)]
    started = time.monotonic()
    kube.kubectl("patch", "secret", fleet.name, "-n", CENTRAL, "--type=merge", "-p",
                 json.dumps({"data": {"api-key": base64.b64encode(ROTATED_KEY.encode()
                                                                  ).decode()}}))
    for sidecar in sidecars:
        def rotated(sidecar=sidecar) -> bool:
            assert fleet.ask(sidecar) == 200
            return llm_upstream.seen[-1].authorization == [f"Bearer {ROTATED_KEY}"]

        kube.wait_for(rotated, what="the rotated key reaching the sidecar")
    took = time.monotonic() - started
    print(f"\n[cluster] central Secret rotated: both sidecars inject it {took:.1f}s later")
    assert took < 5, took  # one 1 s poll of the values (10 s by default)


def test_an_operator_outage_keeps_the_values_for_the_stated_time_then_fails_closed(
        fleet, kube, operator):
    fleet.apply()
    sidecar = fleet.sidecar(fleet.pod(fleet.namespaces[0]),
                            "--operator-values-keep-seconds", "3")
    assert fleet.ask(sidecar) == 200
    operator.stop()
    try:
        assert fleet.ask(sidecar) == 200  # within the 3 s: the last values serve
        sidecar.wait_for_log("has not answered for over 3 s", timeout=15)
        assert fleet.ask(sidecar) == 503
        assert sidecar.metric("keyhole_channel_up", call="values") == 0
    finally:
        operator.restart()
    kube.wait_for(lambda: fleet.ask(sidecar) == 200, what="injection resuming")


def test_the_channel_gives_a_pod_only_its_own_cluster_injections_values(fleet, kube):
    fleet.apply()
    a, b, c = fleet.namespaces
    served = fleet.pod(a)
    token = fleet.agents[a].token(served)
    answer = values_call(fleet, token)
    assert answer.status_code == 200
    assert base64.b64decode(answer.json()["injections"][fleet.name]["values"][
        f"{fleet.name}/api-key"]).decode() == FLEET_KEY

    # A pod of a namespace the injection does not serve, injected for one of its own:
    # it carries signed routes, but none names a cluster injection.
    own = injection("own", hosts=["api.own.test"],
                    headers=[{"name": "X-Key", "valueFrom": ref("own", "key")}])
    own["spec"]["podSelector"] = {"matchLabels": {"keyhole.dev/own": "true"}}
    kube.kubectl("create", "secret", "generic", "own", "-n", c, "--from-literal=key=x")
    kube.apply([own], c)
    kube.wait_for(lambda: (kube.get("si", "own", c).get("status") or {}).get(
        "observedGeneration") == 1, what="the namespaced injection observed")
    kube.apply([plain_pod("other", {"keyhole.dev/own": "true", fleet.tag: "true"})], c)
    other = kube.get("pod", "other", c)
    assert "keyhole.dev/injections" in other["metadata"]["annotations"]
    refused = values_call(fleet, fleet.agents[c].token(other))
    assert refused.status_code == 403 and "served by no ClusterSecretInjection" in refused.text

    untagged = fleet.pod(b, "untagged", tagged=False)  # keyhole left it alone: no routes
    refused = values_call(fleet, fleet.agents[b].token(untagged))
    assert refused.status_code == 403 and "carries no routes" in refused.text

    unbound = values_call(fleet, fleet.agents[a].token())  # the ServiceAccount's, no pod
    assert unbound.status_code == 403 and "not bound to a pod" in unbound.text
    wrong_audience = values_call(fleet, fleet.agents[a].token(served, audience="other"))
    assert wrong_audience.status_code == 401

    kube.kubectl("delete", "pod", "agent", "-n", a, "--wait=true")
    replayed = values_call(fleet, token)  # the pod is gone; its token with it
    assert replayed.status_code in (401, 403), replayed.text
    for response in (refused, unbound, wrong_audience, replayed):
        assert FLEET_KEY not in response.text
    assert FLEET_KEY not in fleet.operator.logs()


def test_a_central_secret_not_labelled_for_cluster_injections_is_never_sent(fleet, kube):
    """Whoever may create a cluster injection must not be able to have any Secret of
    keyhole's namespace (its master key among them) sent to a pod of theirs."""
    kube.kubectl("label", "secret", fleet.name, "-n", CENTRAL, "keyhole.dev/cluster-injection-")
    fleet.apply()
    kube.wait_for(lambda: "not labelled keyhole.dev/cluster-injection=true" in json.dumps(
        fleet.status()), what="the status naming the unlabelled Secret")
    served = fleet.pod(fleet.namespaces[0])
    answer = values_call(fleet, fleet.agents[fleet.namespaces[0]].token(served))
    assert answer.status_code == 200
    entry = answer.json()["injections"][fleet.name]
    assert entry["values"] == {} and "not labelled" in entry["missing"][f"{fleet.name}/api-key"]
    assert FLEET_KEY not in answer.text


def test_a_namespace_injection_that_clashes_with_a_cluster_one_is_refused_naming_both(
        fleet, kube):
    fleet.apply()
    a = fleet.namespaces[0]
    clash = injection("mine", hosts=["api.openai.test"],
                      headers=[{"name": "Authorization", "valueFrom": ref("mine", "key"),
                                "format": "Bearer {value}"}])
    done = kube.apply([clash], a, check=False)
    assert done.returncode != 0
    assert f"SecretInjection {a}/mine and ClusterSecretInjection {fleet.name}" in done.stderr
    assert "authorization" in done.stderr.lower()
    # In a namespace the cluster injection does not serve, the same injection is fine.
    kube.apply([clash], fleet.namespaces[2])
    # And a cluster injection that would clash with it there is refused in turn.
    fleet.select(fleet.namespaces[2])
    wider = fleet.document()
    wider["spec"]["hosts"] = ["api.openai.test", "api.other.test"]
    done = kube.apply([wider], check=False)
    assert done.returncode != 0
    assert f"SecretInjection {fleet.namespaces[2]}/mine and ClusterSecretInjection" in done.stderr
    # That clash arose by relabelling: the namespace's own injection wins for its pods, the
    # cluster injection says so, and deleting it is not blocked (kopf's finalizer patch is a
    # metadata write, which the clash check leaves alone).
    tagged = {"keyhole.dev/mine": "true", fleet.tag: "true"}
    mine = injection("mine", hosts=["api.openai.test"],
                     headers=[{"name": "Authorization", "valueFrom": ref("mine", "key"),
                               "format": "Bearer {value}"}])
    mine["spec"]["podSelector"] = {"matchLabels": {"keyhole.dev/mine": "true"}}
    kube.kubectl("create", "secret", "generic", "mine", "-n", fleet.namespaces[2],
                 "--from-literal=key=x")
    kube.apply([mine], fleet.namespaces[2])
    kube.apply([plain_pod("both", tagged)], fleet.namespaces[2])
    routes = json.loads(kube.get("pod", "both", fleet.namespaces[2])["metadata"]["annotations"][
        "keyhole.dev/injections"])
    assert [i["metadata"]["name"] for i in routes["items"]] == ["mine"]

    def shadowed() -> str | None:
        found = {c["type"]: c for c in fleet.status().get("conditions") or []}
        return (found.get("Shadowed") or {}).get("status") == "True" and found["Shadowed"][
            "message"]

    said = kube.wait_for(shadowed, what="the Shadowed condition")
    assert f"namespace {fleet.namespaces[2]}: SecretInjection mine" in said
    kube.kubectl("delete", "clustersecretinjection", fleet.name, "--timeout=20s")
