"""A real Kubernetes control plane for tests: etcd and kube-apiserver on 127.0.0.1.

Built from the Go module proxy (see go.mod here) into ``~/.cache/keyhole/k8s-<version>/``,
keyed by version and the pins, and reused when present. Started with generated serving
certs and service-account keys, RBAC, and the admission webhook plugins. On its own there is
no kubelet, scheduler or controller-manager: objects are stored and admitted, nothing runs.
``tests/cluster/node.py`` starts one inside a network namespace of its own, with a real node.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.cache import cache_root
from tests.support.ports import free_port
from tests.support.probe import http_status

HERE = Path(__file__).resolve().parent
KUBERNETES_VERSION = "1.34.4"
BINARIES = {  # binary name -> Go package
    "etcd": "go.etcd.io/etcd/server/v3",
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    # the node (tests/cluster/node.py): what runs pods, from the same pinned module
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    "kubelet": "k8s.io/kubernetes/cmd/kubelet",
    "kube-proxy": "k8s.io/kubernetes/cmd/kube-proxy",
}
HELM_MODULE = HERE / "helm"  # its own go.mod: helm's dependencies never move the pins above
HELM_VERSION = "3.19.5"
HELM_LDFLAGS = " ".join([  # what helm's Makefile stamps: its version, and its default cluster
    f"-X helm.sh/helm/v3/internal/version.version=v{HELM_VERSION}",
    "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
    "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1",
    f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={KUBERNETES_VERSION.split('.')[1]}",
    "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1",
    f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={KUBERNETES_VERSION.split('.')[1]}",
])
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_CIDR_FIRST = "10.96.0.1"  # the `kubernetes` Service, which pods reach the API server by


def pins_digest(module: Path = HERE) -> str:
    return hashlib.sha256((module / "go.mod").read_bytes() + (module / "go.sum").read_bytes()
                          ).hexdigest()[:10]


def bin_dir() -> Path:
    return cache_root() / f"k8s-{KUBERNETES_VERSION}-{pins_digest()}" / "bin"


SKAFFOLD_MODULE = "github.com/GoogleContainerTools/skaffold/v2"
SKAFFOLD_VERSION = "2.16.1"  # v2.17 is not served by the module proxy here


def skaffold_binary() -> Path:
    return cache_root() / f"skaffold-{SKAFFOLD_VERSION}" / "bin" / "skaffold"


def build_skaffold(log=print) -> Path:
    """skaffold from its own module, inside its own go.mod: its replace directives apply only
    there (as a dependency of another module they would be ignored and the build breaks)."""
    if skaffold_binary().exists():
        return skaffold_binary()
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    listing = subprocess.run([_go(), "mod", "download", "-json",
                              f"{SKAFFOLD_MODULE}@v{SKAFFOLD_VERSION}"], capture_output=True,
                             text=True, check=True, env=env, cwd=cache_root().parent)
    source = Path(json.loads(listing.stdout)["Dir"])
    stamp = f"-X {SKAFFOLD_MODULE}/pkg/skaffold/version.version=v{SKAFFOLD_VERSION}"
    _go_build(source, "./cmd/skaffold", skaffold_binary(), stamp, log,
              env={**os.environ, "GOFLAGS": "-mod=readonly", "CGO_ENABLED": "0"})
    return skaffold_binary()


def helm_binary() -> Path:
    stamp = hashlib.sha256(HELM_LDFLAGS.encode()).hexdigest()[:6]
    return cache_root() / f"helm-{HELM_VERSION}-{pins_digest(HELM_MODULE)}{stamp}" / "bin" / "helm"


def _go() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists()
                                   else None)
    if not found:
        raise RuntimeError("Go is needed to build the test control plane: install golang-go")
    return found


def _go_build(module: Path, package: str, output: Path, ldflags: str, log,
              env: dict | None = None) -> None:
    # GOTOOLCHAIN stays as the machine has it (auto): an older Go fetches the version go.mod
    # names from the Go module proxy.
    env = env or {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    output.parent.mkdir(parents=True, exist_ok=True)
    log(f"building {output.name} from {package} (first run only; cached in {output.parent})")
    started = time.monotonic()
    subprocess.run([_go(), "build", "-trimpath", "-ldflags", f"-s -w {ldflags}", "-o",
                    str(output.with_suffix(".tmp")), package], cwd=module, env=env, check=True)
    output.with_suffix(".tmp").rename(output)
    log(f"built {output.name} in {time.monotonic() - started:.0f}s")


def build(log=print) -> Path:
    """Build etcd, kube-apiserver, kubectl and helm unless the cache has them.
    Returns the control plane's bin folder."""
    if not helm_binary().exists():
        _go_build(HELM_MODULE, "helm.sh/helm/v3/cmd/helm", helm_binary(), HELM_LDFLAGS, log)
    target = bin_dir()
    missing = [name for name in BINARIES if not (target / name).exists()]
    if not missing:
        return target
    major, minor, _ = KUBERNETES_VERSION.split(".")
    stamp = " ".join([
        f"-X k8s.io/component-base/version.gitVersion=v{KUBERNETES_VERSION}",
        f"-X k8s.io/component-base/version.gitMajor={major}",
        f"-X k8s.io/component-base/version.gitMinor={minor}",
        "-X k8s.io/component-base/version.gitTreeState=clean",
        f"-X k8s.io/client-go/pkg/version.gitVersion=v{KUBERNETES_VERSION}",
    ])
    for name in missing:
        _go_build(HERE, BINARIES[name], target / name, stamp, log)
    return target


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str) -> _Issuer:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=7))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                             False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    def issue(self, common_name: str, *, organization: str | None = None,
              dns: list[str] = (), ips: list[str] = (), server: bool = False
              ) -> tuple[bytes, bytes]:
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization:
            attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder().subject_name(x509.Name(attrs))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=7))
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.SERVER_AUTH if server
                        else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        if dns or ips:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(d) for d in dns]
                + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]), critical=False)
        return _pem_cert(builder.sign(self.key, hashes.SHA256())), _pem_key(key)


@dataclass
class ControlPlane:
    """One running etcd + kube-apiserver pair, with its files under ``root``."""

    root: Path
    port: int = 0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    address: str = "127.0.0.1"  # where kube-apiserver listens and what it advertises
    wrap: list[str] = field(default_factory=list)  # command prefix, e.g. to enter a netns
    extra_args: list[str] = field(default_factory=list)
    authorization: str = "RBAC"
    admission_plugins: str = "MutatingAdmissionWebhook,ValidatingAdmissionWebhook"
    endpoint_reconciler: str = "none"  # no kubelet reaches it: the `kubernetes` Service is unused
    ca: _Issuer | None = None

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.port}"

    def _write_pki(self) -> None:
        pki = self.root / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        ca = self.ca = _Issuer.create("keyhole test cluster CA")
        (pki / "ca.crt").write_bytes(_pem_cert(ca.cert))
        (pki / "ca.key").write_bytes(_pem_key(ca.key))
        cert, key = ca.issue("kube-apiserver", dns=["localhost", "kubernetes",
                                                    "kubernetes.default",
                                                    "kubernetes.default.svc"],
                             ips=sorted({"127.0.0.1", self.address, SERVICE_CIDR_FIRST}),
                             server=True)
        (pki / "apiserver.crt").write_bytes(cert)
        (pki / "apiserver.key").write_bytes(key)
        for name, common_name in (("admin", "keyhole-test-admin"),
                                  ("apiserver-kubelet-client", "kube-apiserver-kubelet-client")):
            cert, key = ca.issue(common_name, organization="system:masters")
            (pki / f"{name}.crt").write_bytes(cert)
            (pki / f"{name}.key").write_bytes(key)
        sa_key = ec.generate_private_key(ec.SECP256R1())
        (pki / "sa.key").write_bytes(_pem_key(sa_key))
        (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def _write_kubeconfig(self) -> None:
        pki = self.root / "pki"
        self.write_kubeconfig(self.kubeconfig, pki / "admin.crt", pki / "admin.key")

    def write_kubeconfig(self, path: Path, cert: Path, key: Path) -> Path:
        """A kubeconfig for this API server that authenticates with a client certificate."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "keyhole-test",
            "clusters": [{"name": "keyhole-test", "cluster": {
                "server": self.url, "certificate-authority": str(self.root / "pki" / "ca.crt")}}],
            "users": [{"name": "user", "user": {
                "client-certificate": str(cert), "client-key": str(key)}}],
            "contexts": [{"name": "keyhole-test", "context": {
                "cluster": "keyhole-test", "user": "user"}}],
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    def client_credentials(self, name: str, common_name: str, organization: str | None = None
                           ) -> Path:
        """A client certificate from the cluster CA and a kubeconfig using it; returns the
        kubeconfig (components of the node authenticate as themselves with these)."""
        pki = self.root / "pki"
        cert, key = self.ca.issue(common_name, organization=organization)
        (pki / f"{name}.crt").write_bytes(cert)
        (pki / f"{name}.key").write_bytes(key)
        return self.write_kubeconfig(self.root / f"{name}.kubeconfig", pki / f"{name}.crt",
                                     pki / f"{name}.key")

    def start(self, binaries: Path, timeout: float = 60) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_pki()
        pki = self.root / "pki"
        etcd_client, etcd_peer = free_port(), free_port()
        self.port = self.port or free_port()
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        self.spawn("etcd", [
            str(binaries / "etcd"), "--data-dir", str(self.root / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ])
        self.spawn("kube-apiserver", [
            str(binaries / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{etcd_client}",
            "--bind-address", self.address, "--advertise-address", self.address,
            "--secure-port", str(self.port),
            "--tls-cert-file", str(pki / "apiserver.crt"),
            "--tls-private-key-file", str(pki / "apiserver.key"),
            "--client-ca-file", str(pki / "ca.crt"),
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--authorization-mode", self.authorization,
            "--enable-admission-plugins", self.admission_plugins,
            "--endpoint-reconciler-type", self.endpoint_reconciler,
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
            *self.extra_args,
        ])
        self._write_kubeconfig()
        self._wait_ready(timeout)

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        """Start a component beside this plane (same wrap), its log in ``logs/<name>.log``."""
        log = open(self.root / "logs" / f"{name}.log", "w")  # noqa: SIM115 - owned by the child
        self.processes[name] = subprocess.Popen([*self.wrap, *command], stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self.processes[name]

    def _wait_ready(self, timeout: float) -> None:
        pki = self.root / "pki"
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited at start; its log:\n"
                                       + self.log_tail(name))
            last = http_status(f"{self.url}/readyz", context=context)
            if last == 200:
                return
            time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready after {timeout}s ({last}); its log:\n"
                           + self.log_tail("kube-apiserver"))

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.root / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) \
            if path.exists() else "(no log)"

    def stop(self) -> None:
        """Stop every component, the last started first (etcd goes last)."""
        for name in reversed(list(self.processes)):
            process = self.processes.get(name)
            if process and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
