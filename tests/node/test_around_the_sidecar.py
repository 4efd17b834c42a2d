"""On the real node, with the chart as installed: the ways around the sidecar of a running pod
are refused (image swap, kubectl debug into the sidecar, exec, port-forward to the proxy), and
what users legitimately do next to them still works (debugging and exec'ing the agent,
port-forwarding the admin port). tests/cluster/test_around_the_sidecar.py covers every vector
against the API server; this shows the ones where a running pod is the point."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request

from tests.node.conftest import statuses


def sidecar_of(pod: dict) -> dict:
    return next(c for c in pod["spec"]["initContainers"] if c["name"] == "keyhole-proxy")


def test_the_sidecars_image_cannot_be_swapped_on_a_running_pod(agents):
    pod = agents.pod("agent")
    name, before = pod["metadata"]["name"], statuses(pod)["keyhole-proxy"]["restartCount"]
    done = agents.kube.kubectl("set", "image", f"pod/{name}", "-n", agents.namespace,
                               "keyhole-proxy=registry.example/steal-keys:1", check=False)
    assert done.returncode != 0
    assert "keyhole-proxy container of an injected pod cannot be changed" in done.stderr
    after = agents.pod("agent")
    assert sidecar_of(after)["image"] == sidecar_of(pod)["image"]
    assert statuses(after)["keyhole-proxy"]["restartCount"] == before


def test_kubectl_debug_reaches_the_agent_but_not_the_sidecar(agents):
    pod = agents.pod("agent")
    name, image = pod["metadata"]["name"], agents.images["agent"].name
    debug = ["debug", name, "-n", agents.namespace, f"--image={image}",
             "--image-pull-policy=Never"]
    done = agents.kube.kubectl(*debug, "--target=keyhole-proxy", "--", "sleep", "1",
                               check=False)
    assert done.returncode != 0
    assert "a debug container may not target keyhole-proxy" in done.stderr
    done = agents.kube.kubectl(*debug, "--target=agent", "--", "sleep", "1", check=False)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 60

    def debugger_ran() -> bool:
        found = agents.pod("agent").get("status", {}).get("ephemeralContainerStatuses") or []
        return any("terminated" in s.get("state", {}) or "running" in s.get("state", {})
                   for s in found)

    while not debugger_ran():
        assert time.monotonic() < deadline, "the debug container of the agent never started"
        time.sleep(0.5)


def test_exec_and_attach_into_the_sidecar_are_refused_and_exec_into_the_agent_works(agents):
    pod = agents.pod("agent")
    name = pod["metadata"]["name"]
    done = agents.kube.kubectl("exec", name, "-n", agents.namespace, "-c", "keyhole-proxy",
                               "--", "cat", "/var/run/keyhole/secrets/openai-credentials/api-key",
                               check=False)
    assert done.returncode != 0 and done.stdout == ""
    assert "kubectl exec into keyhole-proxy is refused" in done.stderr
    done = agents.kube.kubectl("attach", name, "-n", agents.namespace, "-c", "keyhole-proxy",
                               check=False)
    assert "kubectl attach into keyhole-proxy is refused" in done.stderr
    assert agents.exec(pod, "echo", "agent").stdout.strip() == "agent"


def _port_forward(agents, pod: dict, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [agents.kube.kubectl_binary, "--kubeconfig", str(agents.kube.kubeconfig), "port-forward",
         "-n", agents.namespace, f"pod/{pod['metadata']['name']}", f":{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_port_forward_reaches_the_admin_port_but_never_the_proxy(agents):
    pod = agents.pod("agent")
    with _port_forward(agents, pod, 15080) as proxy:
        _, errors = proxy.communicate(timeout=60)
    assert proxy.returncode != 0
    assert "injected pod is refused" in errors or "must name its ports" in errors, errors
    with _port_forward(agents, pod, 15090) as admin:
        try:
            line = admin.stdout.readline()  # Forwarding from 127.0.0.1:NNNNN -> 15090
            local = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert local, line + admin.stderr.read()
            with urllib.request.urlopen(f"http://127.0.0.1:{local.group(1)}/readyz",
                                        timeout=30) as answer:
                assert answer.status == 200
        finally:
            admin.terminate()
            admin.communicate(timeout=30)
