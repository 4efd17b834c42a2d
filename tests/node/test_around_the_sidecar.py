"""On the real node, with the chart as installed: the ways around the sidecar of a running pod
are refused (image swap, kubectl debug into the sidecar, exec, port-forward to the proxy), and
what users legitimately do next to them still works (debugging and exec'ing the agent,
port-forwarding the admin port). tests/cluster/test_around_the_sidecar.py covers every vector
against the API server; this shows the ones where a running pod is the point."""

from __future__ import annotations

import subprocess
import time

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
    before = {c["name"] for c in agents.pod("agent")["spec"].get("ephemeralContainers") or []}
    done = agents.kube.kubectl(*debug, "--target=agent", "--", "sleep", "1", check=False)
    assert done.returncode == 0, done.stderr
    added = {c["name"] for c in agents.pod("agent")["spec"]["ephemeralContainers"]} - before
    assert len(added) == 1, added
    deadline = time.monotonic() + 60

    def debugger_ran() -> bool:  # this one, not a debug container of an earlier run
        found = agents.pod("agent").get("status", {}).get("ephemeralContainerStatuses") or []
        return any(s["name"] in added and ("terminated" in s.get("state", {})
                                           or "running" in s.get("state", {})) for s in found)

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


def test_port_forward_is_refused_and_the_api_servers_proxy_never_reaches_the_proxy(agents):
    """kubectl names a port-forward's ports only after admission, so keyhole refuses kubectl
    port-forwards into injected pods; the API server's pod proxy (what the refusal suggests)
    reaches the pod's IP: the admin port answers, the proxy port (on loopback) does not."""
    name = agents.pod("agent")["metadata"]["name"]
    for port in (15080, 15090):
        done = subprocess.run(
            [agents.kube.kubectl_binary, "--kubeconfig", str(agents.kube.kubeconfig),
             "port-forward", "-n", agents.namespace, f"pod/{name}", f":{port}"],
            capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert "port-forward into a pod keyhole injects is refused" in done.stderr, done.stderr
    proxied = f"/api/v1/namespaces/{agents.namespace}/pods/{name}"
    assert agents.kube.kubectl("get", "--raw", f"{proxied}:15090/proxy/readyz").stdout == "ready\n"
    proxy = agents.kube.kubectl("get", "--raw", f"{proxied}:15080/proxy/", check=False)
    assert proxy.returncode != 0 and "refused" in proxy.stderr, proxy.stderr
