"""Fixtures for tests against a real kube-apiserver.

By default a control plane is built from the Go module proxy (once, cached) and started on
127.0.0.1 for the session. With KEYHOLE_TEST_KUBECONFIG set, the same tests run against that
cluster instead (kind, a cloud cluster). Every test here is marked ``cluster``.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.controlplane import ControlPlane, bin_dir, build
from tests.cluster.kube import Kube, kubectl_binary
from tests.support.ports import free_port
from tests.support.probe import http_status

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_USER = "system:serviceaccount:keyhole-system:keyhole-operator"
_names = itertools.count()


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def kube(tmp_path_factory, request) -> Kube:
    external = os.environ.get("KEYHOLE_TEST_KUBECONFIG")
    if external:
        yield Kube(Path(external), kubectl_binary(None))
        return
    started = time.monotonic()
    binaries = build(log=lambda line: print(f"[cluster] {line}", file=sys.stderr))
    root = tmp_path_factory.mktemp("control-plane")
    plane = ControlPlane(root)
    plane.start(binaries)
    print(f"[cluster] control plane ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
    yield Kube(plane.kubeconfig, kubectl_binary(bin_dir()))
    plane.stop()
    if request.session.testsfailed:
        kept = Path(os.environ.get("KEYHOLE_CLUSTER_LOGS", ROOT / ".cluster-logs"))
        shutil.copytree(root / "logs", kept, dirs_exist_ok=True)
        print(f"[cluster] logs kept in {kept}", file=sys.stderr)


@pytest.fixture(scope="session")
def crd(kube: Kube) -> None:
    kube.kubectl("apply", "-f", str(ROOT / "crds" / "secretinjection.yaml"))
    kube.wait_established("secretinjections.keyhole.dev")


class OperatorProcess:
    def __init__(self, process: subprocess.Popen, log: Path, webhook_port: int, health_port: int):
        self.process, self.log, self.webhook_port, self.health_port = (
            process, log, webhook_port, health_port)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_operator(kube: Kube, workdir: Path, *extra: str, manage: bool = True,
                   cert: tuple[Path, Path, Path] | None = None,
                   webhook_port: int | None = None) -> OperatorProcess:
    """The real keyhole-operator process, acting as its ServiceAccount (on ``webhook_port``
    when given: a restarted operator stays where the webhook configurations point)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = kube.service_account_kubeconfig("keyhole-system", "keyhole-operator",
                                             workdir / "kubeconfig")
    key = workdir / "master.key"
    if not key.exists():
        key.write_text(secrets.token_urlsafe(48))
    webhook_port, health_port = webhook_port or free_port(), free_port()
    command = [sys.executable, "-m", "keyhole_operator.cli", "--master-key-file", str(key),
               "--standalone", "--webhook-listen", f"127.0.0.1:{webhook_port}",
               "--webhook-host", "127.0.0.1", "--operator-service-account", OPERATOR_USER,
               "--resync-seconds", "2", "--liveness", f"http://127.0.0.1:{health_port}/healthz",
               "--sidecar-image", "keyhole-sidecar:test", *extra]
    if manage:
        command.append("--manage-webhook-configurations")
    if cert:
        ca, crt, pkey = cert
        command += ["--webhook-ca", str(ca), "--webhook-cert", str(crt), "--webhook-key", str(pkey)]
    log = workdir / "operator.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "KUBECONFIG": str(config)})
    operator = OperatorProcess(process, log, webhook_port, health_port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("keyhole-operator exited:\n" + operator.logs())
        # /healthz answers 200 once the injection index is filled (the readiness probe)
        if http_status(f"http://127.0.0.1:{health_port}/healthz", timeout=1) != 200:
            time.sleep(0.2)
            continue
        try:
            socket.create_connection(("127.0.0.1", webhook_port), timeout=1).close()
        except OSError:
            time.sleep(0.2)
            continue
        if not manage or "keyhole.dev" in kube.kubectl(
                "get", "mutatingwebhookconfigurations", "-o", "name", check=False).stdout:
            return operator
        time.sleep(0.2)
    operator.stop()
    raise AssertionError("keyhole-operator did not become ready:\n" + operator.logs())


@pytest.fixture(scope="session")
def operator(kube: Kube, crd, tmp_path_factory) -> OperatorProcess:
    # The chart's own RBAC (one source), plus the development-only webhook management role.
    from tests.chart.helm import CHART, helm

    kube.kubectl("create", "namespace", "keyhole-system", check=False)
    rbac = helm("template", "keyhole", str(CHART), "--namespace", "keyhole-system",
                "--show-only", "templates/rbac.yaml").stdout
    kube.apply(rbac)
    kube.kubectl("apply", "-f", str(ROOT / "tests" / "cluster" / "manifests" / "manage-webhooks.yaml"))
    proc = start_operator(kube, tmp_path_factory.mktemp("operator"))
    yield proc
    proc.stop()
    kube.kubectl("delete", "mutatingwebhookconfiguration,validatingwebhookconfiguration",
                 "keyhole.dev", "--ignore-not-found", check=False)


@pytest.fixture
def namespace(kube: Kube) -> str:
    """A fresh namespace with its default ServiceAccount (no controller-manager makes it)."""
    name = f"t{next(_names)}-{secrets.token_hex(3)}"
    kube.kubectl("create", "namespace", name)
    kube.kubectl("create", "serviceaccount", "default", "-n", name)
    yield name
    # Without a controller-manager a deleted namespace keeps its objects (it stays
    # Terminating), so remove the injections first: nothing keeps reconciling them.
    kube.kubectl("delete", "secretinjections", "--all", "-n", name, "--wait=false", check=False)
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)
