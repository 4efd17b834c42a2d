"""A network namespace that stands for an agent's pod, with transparent capture in it.

- ``kh-capture``: one veth pair to the host (agent 10.253.0.2; host 10.253.0.1, .3, .4, .5)
  and nothing else, so nothing in it reaches past this machine. ``ip netns exec`` gives its
  processes ``/etc/netns/kh-capture/hosts``: the test names resolve to the host's addresses.
- On the host: the HTTPS upstream on 10.253.0.1:443 (and plain HTTP on :80), and on
  10.253.0.3:443 "the agent's own server", which records every connection it gets; on
  10.253.0.4:443 a gRPC service (grpc.routed.test); on 10.253.0.5:443 an MCP server (the
  official Python SDK's, mcp.routed.test), governed by spec.mcp.
- In the namespace: the real ``keyhole-sidecar`` as root (UID 0, exempt from capture) with
  ``--transparent-listen 127.0.0.1:15081``, and the real ``keyhole-init``'s rules. Clients run
  as UID 1000 with no proxy variable at all, only a CA variable.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import federation, netns
from tests.support.config import injection, ref
from tests.support.h2_upstream import GrpcUpstream
from tests.support.serving import serving_process
from tests.support.sidecar import write_injections, write_secrets
from tests.support.upstream import TEST_HOSTS, Upstream, UpstreamServer

NS = "kh-capture"
HOST_LINK, AGENT_LINK = "khc-host", "khc-agent"
HOST_IP, AGENT_IP, OWN_SERVER_IP = "10.253.0.1", "10.253.0.2", "10.253.0.3"
GRPC_IP = "10.253.0.4"  # a gRPC service on 443, as Google's APIs are
MCP_IP = "10.253.0.5"  # an MCP server on 443
FED_IP = "10.253.0.6"  # the workload identity stand-ins on 443 (tests/support/federation.py)
MCP_SECRET = "mcp-transparent-SECRET-4f1a7c"
MCP_POLICY = {"tools": {"allow": ["get_*", "list_*"], "deny": ["*delete*"]}}
HOST_IP6, AGENT_IP6 = "fd00:253::1", "fd00:253::2"
AGENT_UID = 1000
SECRET = "sk-transparent-SECRET-6c2d91"
FEDERATED_SUBJECT = "system:serviceaccount:keyhole-system:ns.agents.transparent"
GRPC_SECRET = "grpc-transparent-SECRET-83ba0e"
ROOT = Path(__file__).resolve().parents[2]
HOSTS_FILE = Path("/etc/netns") / NS / "hosts"


def _ip(*args: str) -> None:
    netns.ip(*args)


def _make_namespace() -> None:
    _remove_namespace()
    _ip("netns", "add", NS)
    _ip("link", "add", HOST_LINK, "type", "veth", "peer", "name", AGENT_LINK, "netns", NS)
    for address in (f"{HOST_IP}/29", f"{OWN_SERVER_IP}/29", f"{GRPC_IP}/29", f"{MCP_IP}/29",
                    f"{FED_IP}/29"):
        _ip("addr", "add", address, "dev", HOST_LINK)
    _ip("-6", "addr", "add", f"{HOST_IP6}/64", "dev", HOST_LINK, "nodad")
    _ip("link", "set", HOST_LINK, "up")
    for args in (["link", "set", "lo", "up"], ["addr", "add", f"{AGENT_IP}/29", "dev", AGENT_LINK],
                 ["-6", "addr", "add", f"{AGENT_IP6}/64", "dev", AGENT_LINK, "nodad"],
                 ["link", "set", AGENT_LINK, "up"]):
        netns.ip(*args, netns=NS)
    HOSTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    HOSTS_FILE.write_text("127.0.0.1 localhost\n::1 localhost\n"
                          f"{HOST_IP} {' '.join(TEST_HOSTS)}\n{GRPC_IP} grpc.routed.test\n"
                          f"{MCP_IP} mcp.routed.test\n"
                          f"{FED_IP} {' '.join(federation.HOSTS)}\n"
                          f"{OWN_SERVER_IP} own.agent.test\n")


def _remove_namespace() -> None:
    netns.delete(NS)
    netns.ip("link", "delete", HOST_LINK, check=False)
    shutil.rmtree(HOSTS_FILE.parent, ignore_errors=True)


def in_namespace(*command: str) -> list[str]:
    return ["ip", "netns", "exec", NS, *command]


def as_agent(*command: str) -> list[str]:
    return in_namespace("setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}",
                        "--clear-groups", "--", *command)


class OwnServer:
    """The agent's own server: accepts TCP on 10.253.0.3:443 and records what it got."""

    def __init__(self):
        self.sock = socket.create_server((OWN_SERVER_IP, 443))
        self.connections: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.connections.append(conn.recv(65536))
            except OSError:
                self.connections.append(b"")
            conn.close()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Capture:
    workdir: Path
    shared: Path  # world-readable: the bundle, the trust store, client binaries
    upstream: Upstream
    own_server: OwnServer
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    grpc: GrpcUpstream | None = None  # a gRPC service on the host, routed with GRPC_SECRET
    mcp_record: Path | None = None  # every request the MCP server received (tests/support/mcp)
    federation: object = None  # the workload identity stand-ins' state
    identity_token: Path | None = None

    def start_sidecar(self, *extra: str) -> None:
        self.stop_sidecar()
        command = in_namespace(
            sys.executable, "-m", "keyhole_sidecar", "--injections", str(self.workdir / "injections.yaml"),
            "--secrets-dir", str(self.workdir / "secrets"), "--ca-dir", str(self.workdir / "ca"),
            "--listen", "127.0.0.1:15080", "--admin-listen", "127.0.0.1:15090",
            "--transparent-listen", "127.0.0.1:15081", "--upstream-ca", self.upstream.ca_file,
            "--identity-token", str(self.identity_token), *extra)
        with (self.workdir / "sidecar.out").open("a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready = subprocess.run(in_namespace("curl", "-s", "-o", "/dev/null", "-w",
                                                "%{http_code}", "http://127.0.0.1:15090/readyz"),
                                   capture_output=True, text=True)
            if ready.stdout == "200":
                self._write_trust()
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError("keyhole-sidecar did not start:\n" + self.output())

    def _write_trust(self) -> None:
        bundle = self.shared / "bundle.pem"
        bundle.write_bytes((self.workdir / "ca" / "tls.crt").read_bytes()
                           + Path(self.upstream.ca_file).read_bytes())
        store = self.shared / "truststore.p12"
        store.unlink(missing_ok=True)
        for alias, pem in (("keyhole", self.workdir / "ca" / "tls.crt"),
                           ("upstream", Path(self.upstream.ca_file))):
            subprocess.run(["keytool", "-importcert", "-noprompt", "-alias", alias, "-file",
                            str(pem), "-keystore", str(store), "-storetype", "PKCS12",
                            "-storepass", "changeit"], check=True, capture_output=True)
        for path in (bundle, store):
            path.chmod(0o644)
        # No proxy variable at all: only where to find the CA, as the webhook sets them.
        self.env = {"PATH": os.environ["PATH"], "HOME": str(self.shared),
                    "SSL_CERT_FILE": str(bundle), "REQUESTS_CA_BUNDLE": str(bundle),
                    "CURL_CA_BUNDLE": str(bundle), "GIT_SSL_CAINFO": str(bundle),
                    "NODE_EXTRA_CA_CERTS": str(bundle),
                    "JAVA_TOOL_OPTIONS": f"-Djavax.net.ssl.trustStore={store} "
                                         "-Djavax.net.ssl.trustStorePassword=changeit "
                                         "-Djavax.net.ssl.trustStoreType=PKCS12"}

    def output(self) -> str:
        return (self.workdir / "sidecar.out").read_text(errors="replace")

    def audit(self) -> list[dict]:
        import json

        return [json.loads(line) for line in self.output().splitlines() if line.startswith("{")]

    def wait_audit(self, predicate, timeout: float = 5.0) -> dict:
        """The first audit line matching ``predicate``; a blind tunnel's is written only when
        the tunnel closes, a moment after the client is done."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            found = next((a for a in self.audit() if predicate(a)), None)
            if found is not None:
                return found
            assert time.monotonic() < deadline, "no matching audit line"
            time.sleep(0.05)

    def stop_sidecar(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def agent(self, *command: str, input: str | None = None, timeout: float = 60,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
        """A client in the namespace as UID 1000, with only the CA variables."""
        return subprocess.run(as_agent(*command), env=self.env, capture_output=True, text=True,
                              input=input, timeout=timeout, cwd=cwd or self.shared)


@pytest.fixture(scope="session")
def capture(test_ca):
    ca, ca_file = test_ca
    _make_namespace()
    shared = Path(tempfile.mkdtemp(prefix="keyhole-capture-"))
    shared.chmod(0o755)
    upstream_ca = shared / "upstream-ca.pem"
    shutil.copy(ca_file, upstream_ca)
    upstream_ca.chmod(0o644)
    https = socket.create_server((HOST_IP, 443))
    plain = socket.create_server((HOST_IP, 80))
    server = UpstreamServer(ca, str(upstream_ca), sock=https)
    plain_server = UpstreamServer(ca, str(upstream_ca), tls=False, sock=plain)
    upstream = server.start()
    plain_upstream = plain_server.start()
    upstream.plain = plain_upstream
    own = OwnServer()
    grpc_upstream = GrpcUpstream(ca, "grpc.routed.test", address=GRPC_IP, port=443).start()
    workdir = Path(tempfile.mkdtemp(prefix="keyhole-capture-sidecar-"))
    # Workload identity: every provider's stand-in on FED_IP:443, one identity token whose
    # aud names them all (standalone, --identity-token)
    fed_server = federation.FederationServer(ca, federation.Issuer(),
                                             sock=socket.create_server((FED_IP, 443)))
    fed = fed_server.start()
    fed.trust = fed_server.trust_issuer(FEDERATED_SUBJECT)
    identity_token = workdir / "identity.jwt"
    identity_token.write_text(fed_server.issuer.mint_for(  # for the session: an hour
        FEDERATED_SUBJECT, list(federation.AUDIENCES.values()), lifetime=3600))
    federated = [federation.injection_for(p, lambda host: host)[0]
                 for p in federation.AUDIENCES]
    write_secrets(workdir / "secrets", {"openai": {"api-key": SECRET},
                                        "grpc": {"key": GRPC_SECRET},
                                        "mcp": {"token": MCP_SECRET}})
    write_injections(workdir / "injections.yaml", [
        injection("openai", hosts=["api.routed.test"],
                  headers=[{"name": "Authorization", "valueFrom": ref("openai", "api-key"),
                            "format": "Bearer {value}"}]),
        injection("grpc", hosts=["grpc.routed.test"],
                  headers=[{"name": "Authorization", "valueFrom": ref("grpc", "key"),
                            "format": "Bearer {value}"}]),
        injection("mcp", hosts=["mcp.routed.test"], mcp=MCP_POLICY,
                  headers=[{"name": "Authorization", "valueFrom": ref("mcp", "token"),
                            "format": "Bearer {value}"}]), *federated])
    mcp_folder = Path(tempfile.mkdtemp(prefix="keyhole-capture-mcp-"))
    mcp = serving_process([sys.executable, "-m", "tests.support.mcp_server", "sse",
                           str(mcp_folder / "received.jsonl")],
                          ca.issue_cert("mcp.routed.test"), mcp_folder,
                          env={**os.environ, "MCP_LISTEN": f"{MCP_IP}:443"})
    mcp.__enter__()
    found = Capture(workdir, shared, upstream, own, identity_token=identity_token)
    found.federation = fed
    found.grpc = grpc_upstream
    found.mcp_record = mcp_folder / "received.jsonl"
    try:
        found.start_sidecar()
        init = subprocess.run(in_namespace(str(Path(sys.executable).with_name("keyhole-init")),
                                           "--uid-owner-exempt", "0"),
                              capture_output=True, text=True)
        assert init.returncode == 0, init.stderr
        found.init_output = init.stdout
        yield found
    finally:
        found.stop_sidecar()
        own.close()
        mcp.__exit__(None, None, None)
        shutil.rmtree(mcp_folder, ignore_errors=True)
        grpc_upstream.stop()
        fed_server.stop()
        server.stop()
        plain_server.stop()
        _remove_namespace()
        shutil.rmtree(shared, ignore_errors=True)
        if not os.environ.get("KEYHOLE_KEEP_CAPTURE"):
            shutil.rmtree(workdir, ignore_errors=True)


def world_readable_copy(source: Path, shared: Path) -> Path:
    target = shared / source.name
    shutil.copy(source, target)
    target.chmod(target.stat().st_mode | stat.S_IROTH | stat.S_IXOTH | stat.S_IRGRP)
    return target
