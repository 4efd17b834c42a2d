"""Fixtures for the end-to-end tests on a real node (``tests/cluster/node.py``): the control
plane, containerd, the kubelet and kube-proxy in a network namespace of their own, the images
built here from the project's Dockerfiles, the chart installed with them, and an HTTPS
upstream served on the node. Every test here is marked ``node``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
import yaml

from tests.chart.helm import CHART
from tests.cluster.controlplane import build, helm_binary
from tests.cluster.images import all_images
from tests.cluster.kube import Kube
from tests.cluster.node import NODE_IP, Node
from tests.support.cache import cache_root
from tests.support.upstream import TEST_HOSTS, Upstream, UpstreamServer

ROOT = Path(__file__).resolve().parents[2]
RELEASE_NAMESPACE = "keyhole-system"
# What the node's upstream answers for: the test hosts, and api.openai.com for the README's
# quick start (pods reach it through hostAliases; nothing resolves it off the machine).
NODE_UPSTREAM_HOSTS = (*TEST_HOSTS, "api.openai.com")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/node/" in str(item.fspath):
            item.add_marker(pytest.mark.node)


def _log(line: str) -> None:
    print(f"[node] {line}", file=sys.stderr)


@pytest.fixture(scope="session")
def node(request) -> Node:
    binaries = build(log=_log)
    images = all_images(log=_log)
    started = Node(cache_root() / "node" / "keyhole-node", binaries, images)
    try:
        started.start()
    except Exception:
        _keep_logs(started)
        started.stop()
        raise
    _log("ready: " + ", ".join(f"{k} {v:.1f}s" for k, v in started.timings.items()))
    yield started
    if request.session.testsfailed:
        _keep_logs(started)
    started.stop()


def _keep_logs(node: Node) -> None:
    if node.plane is None:
        return
    kept = Path(os.environ.get("KEYHOLE_CLUSTER_LOGS", ROOT / ".cluster-logs")) / "node"
    shutil.copytree(node.logs, kept, dirs_exist_ok=True)
    pod_logs = node.root / "pod-logs"
    if pod_logs.exists():
        shutil.copytree(pod_logs, kept / "pods", dirs_exist_ok=True)
    _log(f"logs kept in {kept}")


@pytest.fixture(scope="session")
def kube(node: Node) -> Kube:
    return node.kube


@pytest.fixture(scope="session")
def node_upstream(node: Node, tmp_path_factory) -> Upstream:
    """The HTTPS upstream on the node (10.254.0.2:443), with a test CA nobody trusts by
    default: the sidecars trust it through the chart's sidecar.upstreamCA, as a private API's."""
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("node-upstream") / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    server = UpstreamServer(ca, str(ca_file), hosts=NODE_UPSTREAM_HOSTS, sock=node.listen(443))
    state = server.start()
    yield state
    server.stop()


@dataclass
class Release:
    kube: Kube
    images: dict

    def wait_until_admitting(self, namespace: str) -> None:
        """Until a tagged pod passes the webhooks through the Service (a server-side dry run).
        After replicas come back, `rollout status` is done before kube-proxy routes the
        Service to them: a test that follows must not meet a webhook that refuses to connect."""
        probe = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "admission-probe", "labels": {"keyhole.dev/probe": "x"}},
                 "spec": {"containers": [{"name": "c", "image": "probe"}]}}

        def admitting() -> bool:
            return self.kube.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-",
                                     input=yaml.safe_dump(probe), check=False).returncode == 0

        self.kube.wait_for(admitting, 60, "the webhooks answering through the Service")

    def operator_pods(self, terminating: bool = False) -> list[dict]:
        """The operator's pods (those being deleted too, if asked)."""
        return [p for p in self.kube.get_all("pods", RELEASE_NAMESPACE)
                if p["metadata"].get("labels", {}).get("keyhole.dev/component") == "operator"
                and (terminating or not p["metadata"].get("deletionTimestamp"))]


def helm(kube: Kube, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(helm_binary()), "--kubeconfig", str(kube.kubeconfig), *args],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args[:2])} failed:\n{done.stdout}\n{done.stderr}")
    return done


def image_values(images: dict) -> list[str]:
    """The chart's image values for the images built here (never pulled)."""
    values = []
    for which in ("operator", "sidecar"):
        repository, tag = images[which].name.rsplit(":", 1)
        # --set-string: a tag is a content hash, and one of only digits (or digits around an
        # "e") is a number to --set, which the chart's schema refuses (found by a clean run).
        values += ["--set-string", f"{which}.image.repository={repository}",
                   "--set-string", f"{which}.image.tag={tag}",
                   "--set", f"{which}.image.pullPolicy=Never"]
    return values


@pytest.fixture(scope="session")
def node_notifications(node: Node):
    """Where the release's operator sends approval notifications: a receiver on the node's
    address, as a chat tool's incoming webhook would be."""
    from tests.support.receiver import Receiver

    receiver = Receiver(node.listen(8089))
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def release(node: Node, kube: Kube, node_upstream: Upstream, node_notifications) -> Release:
    """``helm install`` of charts/keyhole, as the README's quick start, with the local images."""
    started = time.monotonic()
    helm(kube, "install", "keyhole", str(CHART), "--namespace", RELEASE_NAMESPACE,
         "--create-namespace", *image_values(node.images),
         "--set-file", f"sidecar.upstreamCA={node_upstream.ca_file}",
         "--set", "operator.resyncSeconds=3",
         "--set", "clusterInjections.keepValuesSeconds=10",  # (default 300)
         "--set", "operator.extraArgs={--ca-promote-after=15}",  # (default 600)
         "--set", f"approvals.notify.url={node_notifications.url}",
         "--wait", "--timeout", "4m")
    _log(f"helm install --wait: {time.monotonic() - started:.1f}s")
    installed = Release(kube, node.images)
    installed.wait_until_admitting("default")
    yield installed
    helm(kube, "uninstall", "keyhole", "--namespace", RELEASE_NAMESPACE, "--wait")


# -- agents --------------------------------------------------------------------------------------

SECRET_VALUE = "sk-node-SECRET-4f1b9a2c7d"


def agent_deployment(name: str, image: str, labels: dict[str, str],
                     pod_security: dict | None = None) -> dict:
    """An agent with real clients (curl, Python requests, Node) that records, as it starts,
    whether the sidecar already answered ready — the proof of the start order."""
    start = ("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:15090/readyz "
             "> /tmp/sidecar-ready-at-start; exec sleep infinity")
    spec = {
        "hostAliases": [{"ip": NODE_IP, "hostnames": list(NODE_UPSTREAM_HOSTS)}],
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "agent", "image": image, "imagePullPolicy": "Never",
                        "command": ["sh", "-c", start]}],
    }
    if pod_security:
        spec["securityContext"] = pod_security
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name, **labels}}, "spec": spec}},
    }


def openai_injection() -> dict:
    return {
        "apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjection",
        "metadata": {"name": "openai"},
        "spec": {
            "podSelector": {"matchLabels": {"keyhole.dev/openai": "true"}},
            "hosts": ["api.routed.test"],
            "headers": [{"name": "Authorization", "format": "Bearer {value}",
                         "valueFrom": {"secretKeyRef": {"name": "openai-credentials",
                                                        "key": "api-key"}}}],
            "agentEnv": [{"name": "OPENAI_API_KEY", "placeholder": True},
                         {"name": "OPENAI_BASE_URL", "baseURL": "/v1"}],
        },
    }


class Agents:
    """One namespace with the OpenAI-style injection and a tagged agent Deployment."""

    namespace = "agents"

    def __init__(self, kube: Kube, images: dict):
        self.kube, self.images = kube, images

    def setup(self) -> None:
        kube = self.kube
        kube.kubectl("create", "namespace", self.namespace)
        kube.kubectl("create", "secret", "generic", "openai-credentials", "-n", self.namespace,
                     f"--from-literal=api-key={SECRET_VALUE}")
        kube.apply([openai_injection()], self.namespace)
        kube.wait_for(lambda: self.injection_ready("openai"), 60, "SecretInjection Ready")
        self.deploy("agent", {"keyhole.dev/openai": "true"})

    def injection_ready(self, name: str) -> bool:
        status = self.kube.get("secretinjection", name, self.namespace).get("status") or {}
        return any(c["type"] == "Ready" and c["status"] == "True"
                   for c in status.get("conditions") or [])

    def deploy(self, name: str, labels: dict[str, str], pod_security: dict | None = None) -> dict:
        self.kube.apply([agent_deployment(name, self.images["agent"].name, labels, pod_security)],
                        self.namespace)
        self.kube.kubectl("rollout", "status", f"deployment/{name}", "-n", self.namespace,
                          "--timeout=120s")
        return self.pod(name)

    def pod(self, app: str) -> dict:
        pods = [p for p in self.kube.get_all("pods", self.namespace)
                if p["metadata"].get("labels", {}).get("app") == app
                and not p["metadata"].get("deletionTimestamp")]
        evicted = [f"{p['metadata']['name']}: {p['status'].get('message')}" for p in pods
                   if p.get("status", {}).get("reason") == "Evicted"]
        assert not evicted, f"the kubelet evicted {app} pods: {evicted}"
        assert len(pods) == 1, f"expected one {app} pod, found {[p['metadata']['name'] for p in pods]}"
        return pods[0]

    def exec(self, pod: dict, *command: str, container: str = "agent", check: bool = True
             ) -> subprocess.CompletedProcess:
        done = self.kube.kubectl("exec", "-n", self.namespace, pod["metadata"]["name"], "-c",
                                 container, "--", *command, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} in {container} failed "
                                 f"({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done


@pytest.fixture(scope="session")
def agents(release: Release, kube: Kube, node: Node) -> Agents:
    found = Agents(kube, node.images)
    found.setup()
    return found


def statuses(pod: dict) -> dict[str, dict]:
    """Container name → its status, init containers (the native sidecar) included."""
    status = pod.get("status") or {}
    return {c["name"]: c for c in (status.get("initContainerStatuses") or [])
            + (status.get("containerStatuses") or [])}


def dump(documents) -> str:
    return yaml.safe_dump_all(documents)
