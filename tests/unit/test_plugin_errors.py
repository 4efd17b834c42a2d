"""``kubectl keyhole`` when it cannot ask the API server: one line naming the cause and what
to check, exit code 1, never a traceback (before: a 60-line MaxRetryError, a ScannerError).
The real executable, as kubectl runs it; forbidden (RBAC) is tests/cluster/test_plugin.py's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.tls_server import BlockingTLSServer

PLUGIN = str(Path(sys.executable).parent / "kubectl-keyhole")


def run(kubeconfig: Path | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env["KUBECONFIG"] = str(kubeconfig) if kubeconfig else "/nonexistent/kubeconfig"
    return subprocess.run([PLUGIN, *args], env=env, capture_output=True, text=True, timeout=60)


def kubeconfig(path: Path, server: str, ca_pem: bytes | None = None) -> Path:
    cluster = {"server": server}
    if ca_pem is not None:
        import base64
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return path


def assert_one_clear_line(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
        done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_no_kubeconfig():
    assert_one_clear_line(run(None, "status"), "no usable kubeconfig", "--kubeconfig")


def test_a_kubeconfig_that_is_not_yaml(tmp_path):
    (tmp_path / "config").write_text("clusters: [\n  - {name: c\n\tserver: x")
    assert_one_clear_line(run(tmp_path / "config", "status"), "is not valid YAML",
                          "kubectl config view")


def test_an_unreachable_api_server(tmp_path):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    done = run(kubeconfig(tmp_path / "config", f"https://127.0.0.1:{port}"), "status")
    assert_one_clear_line(done, f"cannot reach the API server at https://127.0.0.1:{port}",
                          "kubectl cluster-info")


class _Silent(BlockingTLSServer):
    def serve(self, raw, *args) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                tls.recv(1)
        except OSError:
            pass


@pytest.fixture
def impostor(test_ca):
    server = _Silent(test_ca[0], "127.0.0.1")
    yield server
    server.close()


def test_an_api_server_whose_certificate_fails(tmp_path, impostor):
    import trustme

    other_ca = trustme.CA()  # the kubeconfig trusts another CA than the server's
    done = run(kubeconfig(tmp_path / "config", f"https://127.0.0.1:{impostor.port}",
                          other_ca.cert_pem.bytes()), "status", "-n", "agents")
    assert_one_clear_line(done, "certificate that failed verification",
                          "certificate-authority-data")
