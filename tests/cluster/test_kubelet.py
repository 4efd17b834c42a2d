"""Play the kubelet: from a pod the real webhook mutated, materialise its volumes, start the
sidecar exactly as its container spec says, and run a real client with the agent container's
environment. Then revoke by label and refresh the annotation file as the kubelet would.

Test-only differences from a real pod, each forced by running without a container runtime:
mount paths are mapped into a temp folder; the proxy and admin ports are mapped to free ports;
and the sidecar gets ``--resolve``/``--upstream-ca`` so api.routed.test reaches the local test
upstream instead of the internet; and the agent's bundle gets the test upstream's CA, which
stands in for the public roots.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from keyhole_operator.mutation import layout
from tests.cluster.kubelet import Kubelet, map_paths
from tests.cluster.test_operator import (
    SECRET_VALUE,
    apply_injections,
    openai_injection,
    pod,
    secret,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_mutated_pod_really_works_and_revocation_needs_no_restart(kube, operator, namespace,
                                                                     upstream, tmp_path):
    secret(kube, namespace)
    apply_injections(kube, namespace, openai_injection())
    kube.apply([pod("agent", {"keyhole.dev/openai": "true"})], namespace)
    kube.wait_for(lambda: kube.kubectl("get", "configmap", "keyhole-ca-bundle", "-n", namespace,
                                       check=False).returncode == 0, what="the CA bundle")
    mutated = kube.get("pod", "agent", namespace)
    sidecar = next(c for c in mutated["spec"]["initContainers"] if c["name"] == "keyhole-proxy")
    agent = next(c for c in mutated["spec"]["containers"] if c["name"] == "agent")

    kubelet = Kubelet(kube, tmp_path / "root")
    kubelet.mount(mutated, sidecar)
    kubelet.mount(mutated, agent)
    proxy_port, admin_port = _free_port(), _free_port()
    args = [map_paths(a, kubelet, layout.ROOT) for a in sidecar["args"]]
    args = [a.replace("127.0.0.1:15080", f"127.0.0.1:{proxy_port}")
             .replace("0.0.0.0:15090", f"127.0.0.1:{admin_port}") for a in args]
    args += ["--resolve", "api.routed.test:443:127.0.0.1", "--upstream-ca", upstream.ca_file]
    log = tmp_path / "sidecar.log"
    with open(log, "w") as out:
        proxy = subprocess.Popen([sys.executable, "-m", "sidecar", *args], stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1):
                    break
            except OSError:
                assert proxy.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)

        env = {e["name"]: map_paths(e["value"], kubelet, layout.ROOT).replace(
                   ":15080", f":{proxy_port}")
               for e in agent["env"] if "value" in e}
        env["PATH"] = "/usr/bin:/bin"
        # The test upstream's CA plays the public roots that the real bundle carries, so that
        # unrouted (revoked) traffic can reach "the real host" through a blind tunnel.
        public = tmp_path / "bundle-with-test-roots.pem"
        public.write_text(Path(env["CURL_CA_BUNDLE"]).read_text() + Path(upstream.ca_file).read_text())
        env["CURL_CA_BUNDLE"] = str(public)

        def call(marker: str) -> subprocess.CompletedProcess:
            return subprocess.run(["curl", "-sS", f"https://api.routed.test/{marker}"], env=env,
                                  capture_output=True, text=True, timeout=30)

        granted = call(f"{namespace}-granted")
        assert granted.returncode == 0, granted.stderr + log.read_text()
        seen = upstream.one(f"{namespace}-granted")
        assert seen.header("Authorization") == [f"Bearer {SECRET_VALUE}"]
        assert SECRET_VALUE not in granted.stdout

        kube.kubectl("label", "pod", "agent", "-n", namespace, "keyhole.dev/openai-")
        kube.wait_for(lambda: json.loads(kube.get("pod", "agent", namespace)["metadata"][
            "annotations"]["keyhole.dev/injections"])["items"] == [], what="routes emptied")
        kubelet.refresh(mutated, "keyhole-routes")

        def revoked() -> bool:
            marker = f"{namespace}-revoked-{time.monotonic_ns()}"
            call(marker)
            return upstream.one(marker).header("Authorization") == []

        kube.wait_for(revoked, timeout=10, what="the sidecar dropping the route")
        assert proxy.poll() is None, "the sidecar restarted; revocation must apply live"
    finally:
        proxy.terminate()
        proxy.wait(10)
