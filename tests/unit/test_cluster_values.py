"""A cluster injection's values, from the operator's decision (keyhole_operator.values) to the
sidecar's reader (keyhole_sidecar.cluster_values) and route table, their decisions alone.

The operator is stood in for by ``ValuesChannel``: the operator's own ``values.answer``,
called in-process instead of over HTTPS with a token (the wire, the TokenReview, the pod and
namespace reads are exercised against the real API server by
tests/cluster/test_cluster_injections.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from keyhole_common.spec import SecretKeyRef
from keyhole_operator import values
from keyhole_operator.routes import Injection, signed_routes
from keyhole_sidecar.cluster_values import ClusterValues
from keyhole_sidecar.config import LiveConfig, Sources
from keyhole_sidecar.metrics import Metrics
from keyhole_sidecar.operator_channel import ChannelRefused
from keyhole_sidecar.secrets import SecretMissing
from keyhole_sidecar.usage.shared import ChannelUnavailable

KEY = b"unit-test-namespace-key-00000000"
CENTRAL = "keyhole-system"
REF = SecretKeyRef("fleet-openai", "api-key")


def cluster_injection(**spec) -> dict:
    return {"apiVersion": "keyhole.dev/v1alpha1", "kind": "ClusterSecretInjection",
            "metadata": {"name": "fleet"},
            "spec": {"namespaceSelector": {"matchLabels": {"keyhole.dev/agents": "true"}},
                     "podSelector": {"matchLabels": {"keyhole.dev/openai": "true"}},
                     "hosts": ["api.openai.test"],
                     "headers": [{"name": "Authorization", "format": "Bearer {value}",
                                  "valueFrom": {"secretKeyRef": {"name": REF.name,
                                                                 "key": REF.key}}}],
                     **spec}}


POD = {"metadata": {"name": "agent", "namespace": "team-a",
                    "labels": {"keyhole.dev/openai": "true"}}}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ValuesChannel:
    """The operator's decision, in-process: what the API server holds is plain attributes."""

    def __init__(self):
        self.live: dict | None = cluster_injection()
        self.labels: dict | None = {"keyhole.dev/agents": "true"}
        self.pod = json.loads(json.dumps(POD))
        self.secrets: dict[str, dict[str, bytes]] = {REF.name: {REF.key: b"sk-fleet-1\n"}}
        self.unlabelled: set[str] = set()  # Secrets not labelled for cluster injections
        self.away = self.refuse = False
        self.routes = json.loads(signed_routes([Injection.from_object(cluster_injection())],
                                               "team-a", KEY))

    async def values(self) -> dict:
        await asyncio.sleep(0)
        if self.away:
            raise ChannelUnavailable("the operator channel did not answer (test)")
        if self.refuse:
            raise ChannelRefused("the operator refused (403): pod team-a/agent carries no "
                                 "routes signed by the operator")
        return values.answer(self.routes, self.pod, "team-a", self.labels,
                             lambda name: values.live_cluster_injection(self.live),
                             self.read, CENTRAL)

    def read(self, ref: SecretKeyRef):
        if ref.name not in self.secrets:
            return None
        shared = {} if ref.name in self.unlabelled else {"keyhole.dev/cluster-injection": "true"}
        return shared, self.secrets[ref.name]


@pytest.fixture
def operator():
    return ValuesChannel()


@pytest.fixture
def clock():
    return Clock()


def fetch(held: ClusterValues) -> None:
    asyncio.run(held.fetch())


def follower(channel, clock) -> ClusterValues:
    return ClusterValues(channel, every=10.0, keep_for=300.0, clock=clock)


def test_a_served_pod_reads_the_central_value_and_follows_its_rotation(operator, clock):
    held = follower(operator, clock)
    fetch(held)
    assert held.reader("fleet")(REF) == "sk-fleet-1"  # cleaned as a mounted file is
    before = held.state()
    operator.secrets[REF.name][REF.key] = b"sk-fleet-2"
    fetch(held)
    assert held.reader("fleet")(REF) == "sk-fleet-2"
    assert held.state() != before  # the reload sees it


@pytest.mark.parametrize(("change", "words"), [
    (lambda op: setattr(op, "live", None), "no longer exists"),
    (lambda op: setattr(op, "labels", {"keyhole.dev/agents": "false"}),
     "does not serve namespace team-a"),
    (lambda op: setattr(op, "labels", {"keyhole.dev/agents": "true",
                                       "keyhole.dev/cluster-injections": "disabled"}),
     "does not serve namespace team-a"),
    (lambda op: op.pod["metadata"].update(labels={}), "does not select this pod"),
    (lambda op: op.pod["metadata"].update(annotations={"keyhole.dev/inject": "false"}),
     "does not select this pod"),
])
def test_a_revoke_drops_the_value_at_the_next_answer(operator, clock, change, words):
    held = follower(operator, clock)
    fetch(held)
    change(operator)
    fetch(held)
    with pytest.raises(SecretMissing, match=words) as refused:
        held.reader("fleet")(REF)
    assert "sk-fleet" not in str(refused.value) + refused.value.summary


def test_the_channel_never_grants_what_the_signed_routes_do_not(operator, clock):
    operator.live = cluster_injection(headers=[
        {"name": "Authorization", "format": "Bearer {value}",
         "valueFrom": {"secretKeyRef": {"name": "other", "key": "api-key"}}}])
    operator.secrets["other"] = {"api-key": b"sk-other"}
    answer = asyncio.run(operator.values())
    served = answer["injections"]["fleet"]
    assert served["values"] == {}  # the signed routes read fleet-openai, the live spec other
    assert "no longer reads Secret 'fleet-openai'" in served["missing"][str(REF)]
    operator.routes = json.loads(signed_routes([], "team-a", KEY))
    assert asyncio.run(operator.values()) == {"injections": {}, "refused": {}}


def test_a_missing_central_secret_or_key_is_named_without_any_value(operator, clock):
    held = follower(operator, clock)
    operator.secrets[REF.name] = {"other-key": b"sk-fleet-1"}
    fetch(held)
    with pytest.raises(SecretMissing, match="Secret keyhole-system/fleet-openai has no key"):
        held.reader("fleet")(REF)
    operator.secrets.clear()
    fetch(held)
    with pytest.raises(SecretMissing, match="Secret keyhole-system/fleet-openai not found"):
        held.reader("fleet")(REF)


def test_an_outage_keeps_the_last_values_for_the_stated_time_then_fails_closed(
        operator, clock):
    held = follower(operator, clock)
    fetch(held)
    operator.away = True
    clock.now += 299
    fetch(held)
    assert held.reader("fleet")(REF) == "sk-fleet-1"
    clock.now += 2
    with pytest.raises(SecretMissing, match="has not answered for over 300 s"):
        held.reader("fleet")(REF)
    operator.away = False
    fetch(held)
    assert held.reader("fleet")(REF) == "sk-fleet-1"


def test_a_refusal_drops_every_value_at_once(operator, clock):
    held = follower(operator, clock)
    fetch(held)
    operator.refuse = True
    fetch(held)
    with pytest.raises(SecretMissing, match="the operator refused"):
        held.reader("fleet")(REF)


def test_a_secret_its_owner_did_not_label_for_cluster_injections_is_never_sent(
        operator, clock):
    """Whoever may create a cluster injection could otherwise name any Secret of keyhole's
    namespace — its master key — and have it sent to a pod of theirs."""
    operator.unlabelled.add(REF.name)
    answer = asyncio.run(operator.values())
    assert answer["injections"]["fleet"]["values"] == {}
    assert "not labelled keyhole.dev/cluster-injection=true" in answer["injections"]["fleet"][
        "missing"][str(REF)]
    held = follower(operator, clock)
    fetch(held)
    with pytest.raises(SecretMissing, match="not labelled"):
        held.reader("fleet")(REF)


def test_before_the_first_answer_nothing_is_injected(operator, clock):
    with pytest.raises(SecretMissing, match="has not sent this cluster injection's values"):
        follower(operator, clock).reader("fleet")(REF)


def test_the_route_table_follows_the_values_without_a_file_changing(
        operator, clock, tmp_path: Path):
    """The reload loop's fingerprint carries the values' state: a revoke over the channel
    makes the route unavailable at the next poll, though no file changed."""
    routes = tmp_path / "injections.json"
    routes.write_text(json.dumps(operator.routes))
    (tmp_path / "key").write_bytes(KEY)
    held = follower(operator, clock)
    config = LiveConfig(Sources(routes, tmp_path / "secrets", tmp_path / "key"), Metrics(),
                        cluster_values=held)
    assert config.wants_cluster_values()  # read from the routes before the first load
    assert config.load()
    assert config.current().by_name("fleet").unavailable is not None  # not sent yet
    fetch(held)
    assert config.changed() and config.load()
    route = config.current().by_name("fleet")
    assert route.unavailable is None
    assert ("Authorization", "Bearer sk-fleet-1") in route.headers
    operator.labels = {}
    fetch(held)
    assert config.changed() and config.load()
    assert "does not serve namespace team-a" in config.current().by_name("fleet").unavailable


def test_outside_kubernetes_a_cluster_injection_reads_its_secret_from_the_folder(tmp_path):
    """A laptop runs the same YAML: without the channel, the namespaceSelector means nothing
    and the Secret is a file, as for a SecretInjection."""
    import yaml

    from keyhole_sidecar.config import load_route_table

    (tmp_path / "injections.yaml").write_text(yaml.safe_dump(cluster_injection()))
    (tmp_path / "secrets" / REF.name).mkdir(parents=True)
    (tmp_path / "secrets" / REF.name / REF.key).write_text("sk-from-file\n")
    table, _ = load_route_table(Sources(tmp_path / "injections.yaml", tmp_path / "secrets"))
    assert ("Authorization", "Bearer sk-from-file") in table.by_name("fleet").headers
