"""The guard's decisions on a running injected pod: UPDATE, debug containers, port-forward,
forged keyhole parts, and the allowed host paths setting."""

from __future__ import annotations

import copy

import pytest
import yaml

from keyhole_operator.guard import (
    check_allowed_host_paths,
    ephemeral_refusal,
    forged_refusal,
    port_forward_refusal,
    update_refusal,
)
from keyhole_operator.mutation import mutate
from keyhole_operator.routes import Injection
from keyhole_operator.settings import Settings
from tests.operator.test_mutation_golden import TESTDATA

SETTINGS = Settings()
KEY = b"guard-test-namespace-key-0000000"


@pytest.fixture
def injected() -> dict:
    injections = [Injection.from_object(d)
                  for d in yaml.safe_load_all((TESTDATA / "_injections.yaml").read_text()) if d]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "agent", "namespace": "agents",
                        "labels": {"keyhole.dev/openai": "true"}},
           "spec": {"containers": [{"name": "agent", "image": "python:3.12-slim"}]}}
    openai = [i for i in injections if i.name == "openai"]
    return mutate(pod, openai, SETTINGS, KEY).pod


def sidecar_of(pod: dict) -> dict:
    return next(c for c in pod["spec"]["initContainers"] if c["name"] == "keyhole-proxy")


def debug(pod: dict, **container) -> dict:
    changed = copy.deepcopy(pod)
    changed["spec"].setdefault("ephemeralContainers", []).append(
        {"name": "debugger", "image": "busybox", **container})
    return changed


# -- pod UPDATE ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("image", "evil/steal-keys:latest"),
    ("command", ["sh", "-c", "cat /var/run/keyhole/secrets/*/*"]),
    ("args", ["--listen", "0.0.0.0:15080"]),
    ("env", [{"name": "PYTHONPATH", "value": "/tmp/evil"}]),
])
def test_the_sidecar_of_an_injected_pod_cannot_be_changed(injected, field, value):
    changed = copy.deepcopy(injected)
    sidecar_of(changed)[field] = value
    problem = update_refusal(injected, changed)
    assert problem is not None
    assert f"keyhole-proxy container of an injected pod cannot be changed (you changed {field})" \
        in problem
    assert "sidecar.image" in problem  # what to do instead


def test_the_sidecar_cannot_be_removed_or_moved(injected):
    changed = copy.deepcopy(injected)
    changed["spec"]["initContainers"] = [c for c in changed["spec"]["initContainers"]
                                         if c["name"] != "keyhole-proxy"]
    changed["spec"]["containers"].append(sidecar_of(injected))
    assert "cannot be changed" in update_refusal(injected, changed)


def test_keyholes_volumes_cannot_be_changed(injected):
    changed = copy.deepcopy(injected)
    signing = next(v for v in changed["spec"]["volumes"] if v["name"] == "keyhole-signing")
    signing["secret"]["secretName"] = "my-own-key"
    assert "keyhole's volumes of an injected pod cannot be changed" in update_refusal(injected,
                                                                                      changed)


def test_an_agents_image_and_the_pods_labels_may_change(injected):
    changed = copy.deepcopy(injected)
    changed["spec"]["containers"][0]["image"] = "python:3.13-slim"
    changed["metadata"]["labels"]["app"] = "v2"
    assert update_refusal(injected, changed) is None


def test_a_pod_keyhole_did_not_inject_is_not_judged():
    plain = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "keyhole-proxy",
                                                                 "image": "a"}]}}
    changed = copy.deepcopy(plain)
    changed["spec"]["containers"][0]["image"] = "b"
    assert update_refusal(plain, changed) is None


# -- debug containers ------------------------------------------------------------------------------

@pytest.mark.parametrize(("container", "expected"), [
    ({"targetContainerName": "keyhole-proxy"}, "may not target keyhole-proxy"),
    ({"targetContainerName": "keyhole-init"}, "may not target keyhole-init"),
    ({"volumeMounts": [{"name": "keyhole-signing", "mountPath": "/s"}]},
     "mounts keyhole's volume 'keyhole-signing'"),
    ({"volumeMounts": [{"name": "keyhole-secret-7754021816e1", "mountPath": "/s"}]},
     "mounts keyhole's volume"),
    ({"securityContext": {"runAsUser": 65532}}, "runs as UID 65532"),
    ({"securityContext": {"privileged": True}}, "is privileged"),
    ({"securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}, "adds SYS_ADMIN"),
])
def test_a_debug_container_stays_out_of_the_sidecar(injected, container, expected):
    problem = ephemeral_refusal(injected, debug(injected, **container), SETTINGS)
    assert problem is not None and expected in problem
    assert problem.startswith(("a debug container", "debug container"))


def test_debugging_the_agent_is_allowed(injected):
    assert ephemeral_refusal(injected, debug(injected, targetContainerName="agent",
                                             securityContext={"runAsUser": 0}), SETTINGS) is None


def test_a_debug_container_already_there_is_not_judged_again(injected):
    """The subresource carries every ephemeral container; only the new ones are judged."""
    with_old = debug(injected, targetContainerName="keyhole-proxy")  # e.g. from before keyhole
    again = debug(with_old)
    again["spec"]["ephemeralContainers"][-1]["name"] = "second"
    assert ephemeral_refusal(with_old, again, SETTINGS) is None


# -- port-forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("ports", "expected"), [
    ([15080], "port-forward to port 15080 of an injected pod is refused"),
    ([8080, 15081], "port-forward to port 15081"),
    ([], "names its ports only after admission"),
    (None, "names its ports only after admission"),
])
def test_port_forward_to_the_proxy_of_an_injected_pod_is_refused(injected, ports, expected):
    options = {} if ports is None else {"ports": ports}
    problem = port_forward_refusal(options, injected, SETTINGS)
    assert expected in problem
    assert "kubectl logs -c keyhole-proxy" in problem and "kubectl proxy" in problem


@pytest.mark.parametrize("ports", [[15090], [8080]])
def test_port_forward_to_the_admin_port_or_the_agent_is_allowed(injected, ports):
    assert port_forward_refusal({"ports": ports}, injected, SETTINGS) is None


def test_port_forward_to_a_pod_keyhole_did_not_inject_is_allowed():
    plain = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "x"}]}}
    assert port_forward_refusal({"ports": [15080]}, plain, SETTINGS) is None
    assert port_forward_refusal({}, None, SETTINGS) is None  # the pod is gone meanwhile


# -- forged parts ----------------------------------------------------------------------------------

def test_an_uninjected_pod_may_not_bring_keyholes_container_or_annotations(injected):
    copied = copy.deepcopy(injected)  # e.g. kubectl get pod -o yaml, edited, re-created
    assert "container name 'keyhole-proxy' is keyhole's" in forged_refusal(copied)
    copied["spec"]["initContainers"] = []
    assert "keyhole.dev/injections, keyhole.dev/status is written by keyhole alone" in \
        forged_refusal(copied)
    copied["metadata"]["annotations"] = {"keyhole.dev/inject": "false"}  # the users' opt-out
    assert forged_refusal(copied) is None


# -- the allowed host paths setting ----------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["/", "/var", "/var/lib", "/var/lib/kubelet/pods", "/run",
                                    "/var/run/containerd/", "/proc/1", "/var/lib/../lib/kubelet"])
def test_an_allowed_host_path_may_not_reach_the_nodes_secrets(prefix):
    with pytest.raises(ValueError, match="overlaps"):
        check_allowed_host_paths([prefix])


def test_narrow_folders_may_be_allowed():
    check_allowed_host_paths(["/opt/models", "/srv/datasets", "/var/lib/models"])
    with pytest.raises(ValueError, match="not absolute"):
        check_allowed_host_paths(["opt/models"])
