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
APPROVALS_KEEP = 3
"""Seconds the test operator keeps a decided or expired ApprovalRequest."""
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
    for kind in ("secretinjection", "clustersecretinjection", "approvalrequest", "accessgrant"):
        kube.kubectl("apply", "-f", str(ROOT / "crds" / f"{kind}.yaml"))
        kube.wait_established(f"{kind}s.keyhole.dev")


class OperatorProcess:
    def __init__(self, command: list[str], env: dict, log: Path, webhook_port: int,
                 health_port: int, channel_port: int | None = None,
                 metrics_port: int | None = None):
        self.command, self.env, self.log = command, env, log
        self.webhook_port, self.health_port, self.channel_port = (
            webhook_port, health_port, channel_port)
        self.metrics_port = metrics_port
        self.process = self._launch()

    def _launch(self) -> subprocess.Popen:
        with open(self.log, "a") as out:
            return subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env)

    def restart(self) -> None:
        """Stop it and start it again, on the same ports, with the same master key."""
        self.stop()
        self.process = self._launch()
        self.wait_ready(manage=False)

    def wait_ready(self, kube: Kube | None = None, manage: bool = False) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("keyhole-operator exited:\n" + self.logs())
            # /healthz answers 200 once the injection index is filled (the readiness probe)
            if http_status(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) != 200:
                time.sleep(0.2)
                continue
            try:
                for port in (self.webhook_port, self.channel_port):
                    if port:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                time.sleep(0.2)
                continue
            if not manage or "keyhole.dev" in kube.kubectl(
                    "get", "mutatingwebhookconfigurations", "-o", "name", check=False).stdout:
                return
            time.sleep(0.2)
        self.stop()
        raise AssertionError("keyhole-operator did not become ready:\n" + self.logs())

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
                   webhook_port: int | None = None, channel: bool = False) -> OperatorProcess:
    """The real keyhole-operator process, acting as its ServiceAccount (on ``webhook_port``
    when given: a restarted operator stays where the webhook configurations point); with
    ``channel``, serving the operator channel too."""
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
               "--resync-seconds", "2", "--approvals-keep-seconds", str(APPROVALS_KEEP),
               "--liveness", f"http://127.0.0.1:{health_port}/healthz",
               "--sidecar-image", "keyhole-sidecar:test", *extra]
    if manage:
        command.append("--manage-webhook-configurations")
    if cert:
        ca, crt, pkey = cert
        command += ["--webhook-ca", str(ca), "--webhook-cert", str(crt), "--webhook-key", str(pkey)]
    channel_port = free_port() if channel else None
    metrics_port = free_port() if channel else None
    if channel_port:  # short slices, so a test sees the operator away without waiting long
        command += ["--channel-listen", f"127.0.0.1:{channel_port}",
                    "--channel-url", f"https://127.0.0.1:{channel_port}",
                    "--channel-lease-seconds", "20",
                    "--metrics-listen", f"127.0.0.1:{metrics_port}"]
    log = workdir / "operator.log"
    log.write_text("")
    operator = OperatorProcess(command, {**os.environ, "KUBECONFIG": str(config)}, log,
                               webhook_port, health_port, channel_port, metrics_port)
    operator.wait_ready(kube, manage)
    return operator


@pytest.fixture(scope="session")
def notifications():
    """Where the operator sends approval notifications (the chart's approvals.notify.url)."""
    from tests.support.receiver import Receiver

    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def operator(kube: Kube, crd, tmp_path_factory, notifications) -> OperatorProcess:
    # The chart's own RBAC (one source), plus the development-only webhook management role.
    from tests.chart.helm import CHART, helm

    kube.kubectl("create", "namespace", "keyhole-system", check=False)
    rbac = helm("template", "keyhole", str(CHART), "--namespace", "keyhole-system",
                "--show-only", "templates/rbac.yaml").stdout
    kube.apply(rbac)
    kube.kubectl("apply", "-f", str(ROOT / "tests" / "cluster" / "manifests" / "manage-webhooks.yaml"))
    from keyhole_operator.webhook_tls import self_signed

    workdir = tmp_path_factory.mktemp("operator")
    # One certificate for the session: a restarted operator serves the same one, as a pod
    # restarted from the chart's Secret does.
    cert = self_signed(workdir / "tls", ["127.0.0.1"])
    proc = start_operator(kube, workdir, "--approvals-notify-url", notifications.url,
                          cert=cert, channel=True)
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
