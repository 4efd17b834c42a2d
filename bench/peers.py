"""The processes a benchmark round runs: an nginx HTTPS upstream, and the proxies compared.

Every server binds 127.0.0.1. The proxy under test is pinned to CPU 1 (`taskset -c 1`), the
upstream and the load generator to CPU 0, so the proxy's cost is what is measured.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from tests.support.cache import cache_root, go_program

ROOT = Path(__file__).resolve().parent.parent
HOST = "bench.routed.test"
TOKEN = "sk-bench-0123456789abcdefABCDEF"  # noqa: S105 - a made-up benchmark value
BODY_1K = "k" * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def go_binary(name: str) -> Path:
    """The Go program in ``bench/<name>`` (the bench's own tools), built once per version."""
    return go_program(Path(__file__).resolve().parent / name, f"bench-{name}")


def pinned(cpu: int, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *command] if shutil.which("taskset") else command


def wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    extra: dict = field(default_factory=dict)

    def pids(self) -> list[int]:
        """The process and its children (nginx and squid fork workers)."""
        found = [self.popen.pid]
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text().split()
                except OSError:
                    continue
                if int(stat[3]) in found:
                    found.append(int(pid))
        return found

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += int(next(line.split()[1] for line in status.splitlines()
                              if line.startswith("VmRSS")))
        return total / 1024

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)


def spawn(name: str, command: list[str], log: Path, *, quiet_stdout: bool = False) -> Process:
    """Start ``command`` in its own session; its diagnostics go to ``log``."""
    with open(log, "w") as out:
        popen = subprocess.Popen(command, stdout=subprocess.DEVNULL if quiet_stdout else out,
                                 stderr=out, start_new_session=True)
    return Process(name, popen)


@dataclass
class Workspace:
    root: Path
    ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in (self.root.parent, self.root):  # nginx workers run as an unprivileged user
            folder.chmod(0o755)
        self.ca.cert_pem.write_to_path(str(self.root / "upstream-ca.pem"))
        cert = self.ca.issue_cert(HOST, "127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.root / "upstream.pem"))
        # The same name, signed by a CA no peer trusts: each peer must refuse it.
        impostor = trustme.CA().issue_cert(HOST, "127.0.0.1")
        impostor.private_key_and_cert_chain_pem.write_to_path(str(self.root / "impostor.pem"))
        (self.root / "www").mkdir(exist_ok=True)
        (self.root / "www" / "1k").write_text(BODY_1K)
        with open(self.root / "www" / "big", "wb") as fh:
            fh.truncate(1024 * 1024 * 1024)  # 1 GiB, sparse: the disk is not the bottleneck


def nginx(ws: Workspace, name: str, servers: str, cpu: int) -> Process:
    """One nginx (a single worker, files under the workspace) running ``servers``."""
    state = ws.root / name
    state.mkdir(exist_ok=True)
    conf = ws.root / f"{name}.conf"
    conf.write_text(f"""
daemon off; worker_processes 1; pid {state}/pid; error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; sendfile on; keepalive_requests 1000000;
  client_body_temp_path {state}/body; proxy_temp_path {state}/proxy;
  fastcgi_temp_path {state}/fcgi; uwsgi_temp_path {state}/uwsgi; scgi_temp_path {state}/scgi;
{servers}
}}
""")
    return spawn(name, pinned(cpu, ["nginx", "-c", str(conf)]), ws.root / f"{name}.log")


def dynamic_source(ws: Workspace) -> Process:
    """What nginx proxies to for /events and /upload (see bench/source.py)."""
    port = free_port()
    process = spawn("source", pinned(0, [sys.executable, "-m", "bench.source", "serve", str(port)]),
                    ws.root / "source.log")
    wait_for_port(port)
    process.extra["port"] = port
    return process


def nginx_upstream(ws: Workspace, source_port: int) -> Process:
    """HTTPS on 127.0.0.1: /1k (1 KiB), /big (1 GiB), and from ``source_port``, unbuffered:
    /upload (reads a body whole, then answers) and /events (Server-Sent Events). On a second
    port (``extra["impostor_port"]``), /1k behind a certificate from an untrusted CA."""
    port, impostor = free_port(), free_port()
    process = nginx(ws, "nginx-upstream", f"""
  server {{
    listen 127.0.0.1:{port} ssl; ssl_certificate {ws.root}/upstream.pem;
    ssl_certificate_key {ws.root}/upstream.pem; root {ws.root}/www;
    location = /1k {{ default_type text/plain; add_header X-Seen-Authorization $http_authorization; }}
    location = /big {{ default_type application/octet-stream; }}
    location ~ ^/(upload|events|v1/chat/completions)$ {{
      proxy_pass http://127.0.0.1:{source_port}; proxy_buffering off;
      proxy_request_buffering off; client_max_body_size 0;
    }}
  }}
  server {{
    listen 127.0.0.1:{impostor} ssl; ssl_certificate {ws.root}/impostor.pem;
    ssl_certificate_key {ws.root}/impostor.pem; root {ws.root}/www;
    location = /1k {{ default_type text/plain; }}
  }}""", cpu=0)
    wait_for_port(port)
    process.extra.update(port=port, impostor_port=impostor)
    return process


# --limits: every kind of spec.limits on, too high to refuse anything, so the figures show
# what checking and counting them costs (the window is counted on disk, in --state-dir).
LIMITS = """
  limits:
    requestsPerMinute: 1000000000
    burst: 1000000000
    concurrentRequests: 100000
    requestBodyBytes: 2147483648
    window: {perHour: 1000000000, perDay: 1000000000}"""


# --budgets: spec.llm with a token budget too high to refuse anything, so (f) shows what reading
# every streamed event's usage and holding the budget cost.
BUDGETS = """
  llm:
    api: openai
    budgets: [{per: day, tokens: 1000000000000}]"""


def keyhole(ws: Workspace, upstream_port: int, impostor_port: int, *,
            limits: bool = False, budgets: bool = False) -> Process:
    """The real keyhole-sidecar, every security feature on; the impostor is routed too, so
    keyhole itself is what must refuse its certificate."""
    (ws.root / "secrets" / "bench").mkdir(parents=True, exist_ok=True)
    (ws.root / "secrets" / "bench" / "token").write_text(TOKEN + "\n")
    (ws.root / "injections.yaml").write_text(f"""
apiVersion: keyhole.dev/v1alpha1
kind: SecretInjection
metadata: {{name: bench}}
spec:
  hosts: ["{HOST}:{upstream_port}", "{HOST}:{impostor_port}"]
  headers:
    - name: Authorization
      valueFrom: {{secretKeyRef: {{name: bench, key: token}}}}
      format: "Bearer {{value}}"{LIMITS if limits else ""}{BUDGETS if budgets else ""}
""")
    port, admin = free_port(), free_port()
    started = time.monotonic()
    process = spawn("keyhole", pinned(1, [
        sys.executable, "-m", "keyhole_sidecar", "--injections", str(ws.root / "injections.yaml"),
        "--secrets-dir", str(ws.root / "secrets"), "--ca-dir", str(ws.root / "keyhole-ca"),
        "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
        "--resolve", f"{HOST}:{upstream_port}:127.0.0.1",
        "--resolve", f"{HOST}:{impostor_port}:127.0.0.1",
        "--upstream-ca", str(ws.root / "upstream-ca.pem"), "--log-level", "warning",
        "--state-dir", str(ws.root / "keyhole-state"),
    ]), ws.root / "keyhole.log", quiet_stdout=True)  # the audit log: one line per request
    wait_ready(admin, ws.root / "keyhole.log")
    process.extra.update(port=port, admin=admin, ready_s=time.monotonic() - started)
    return process


def wait_ready(admin: int, log: Path, timeout: float = 20) -> None:
    """Until keyhole's /readyz answers (its log is the error when it never does)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.01)


def nginx_reverse(ws: Workspace, upstream_port: int, impostor_port: int) -> Process:
    """nginx as a reverse proxy adding the header: the peer of keyhole's base-URL mode.
    ``/impostor/`` is the same, to the impostor."""
    port = free_port()
    process = nginx(ws, "nginx-reverse", f"""
  upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location /bench/ {{
      proxy_pass https://up/; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host {HOST}; proxy_set_header Authorization "Bearer {TOKEN}";
      proxy_ssl_verify on; proxy_ssl_trusted_certificate {ws.root}/upstream-ca.pem;
      proxy_ssl_name {HOST}; proxy_ssl_server_name on; proxy_ssl_session_reuse on;
      proxy_buffering off; proxy_request_buffering off; client_max_body_size 0;
    }}
    location /impostor/ {{
      proxy_pass https://127.0.0.1:{impostor_port}/; proxy_set_header Host {HOST};
      proxy_ssl_verify on; proxy_ssl_trusted_certificate {ws.root}/upstream-ca.pem;
      proxy_ssl_name {HOST}; proxy_ssl_server_name on;
    }}
  }}""", cpu=1)
    wait_for_port(port)
    process.extra["port"] = port
    return process


def aiohttp_floor(ws: Workspace, upstream_port: int) -> Process:
    """aiohttp forwarding and adding the header, nothing else (see bench/floor.py)."""
    port = free_port()
    process = spawn("aiohttp-floor", pinned(1, [
        sys.executable, "-m", "bench.floor", str(port), str(upstream_port),
        str(ws.root / "upstream-ca.pem")]), ws.root / "aiohttp-floor.log")
    wait_for_port(port)
    process.extra["port"] = port
    return process


def squid(ws: Workspace, upstream_port: int) -> Process:
    """squid-openssl bumping every CONNECT and adding the header: what an ops team picks today."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    state = ws.root / "squid"
    state.mkdir(exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "squid bench CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (state / "ca.pem").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()))
    (state / "hosts").write_text(f"127.0.0.1 {HOST}\n")
    subprocess.run(["/usr/lib/squid/security_file_certgen", "-c", "-s", str(state / "ssl_db"),
                    "-M", "4MB"], check=True, capture_output=True)
    subprocess.run(["chown", "-R", "proxy:proxy", str(state)], check=True)
    port = free_port()
    conf = state / "squid.conf"
    listen = (f"127.0.0.1:{port} ssl-bump generate-host-certificates=on "
              f"dynamic_cert_mem_cache_size=4MB tls-cert={state}/ca.pem")
    conf.write_text(f"""
http_port {listen}
sslcrtd_program /usr/lib/squid/security_file_certgen -s {state}/ssl_db -M 4MB
sslcrtd_children 2
# Bump at the CONNECT (client-first), not after peeking at the SNI: hey's Go client sends the
# Host header, port and all, as its SNI, which squid then takes as the origin's name (a 503).
ssl_bump bump all
tls_outgoing_options cafile={ws.root}/upstream-ca.pem
request_header_add Authorization "Bearer {TOKEN}" all
hosts_file {state}/hosts
# Never send a packet off this machine: no DNS server but loopback, no ICMP pinger.
dns_nameservers 127.0.0.1
pinger_enable off
http_access allow all
cache deny all
access_log stdio:{state}/access.log
cache_log {state}/cache.log
pid_filename {state}/squid.pid
coredump_dir {state}
shutdown_lifetime 1 seconds
workers 1
""")
    process = spawn("squid", pinned(1, ["squid", "-N", "-f", str(conf)]), state / "stdout.log")
    wait_for_port(port, timeout=30)
    process.extra["port"] = port
    return process


MITM_VENV = cache_root() / "mitmproxy-venv"
MITM_VERSION = "11.0.2"  # the newest that runs on Python 3.11


def ensure_mitmproxy() -> None:
    if (MITM_VENV / "bin" / "mitmdump").exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(MITM_VENV)], check=True)
    subprocess.run([str(MITM_VENV / "bin" / "pip"), "install", "-q", f"mitmproxy=={MITM_VERSION}"],
                   check=True)


def mitmproxy(ws: Workspace, upstream_port: int) -> Process:
    """mitmproxy (in a venv of its own: it pins older cryptography) with a header addon."""
    ensure_mitmproxy()
    addon = ws.root / "mitm_addon.py"
    addon.write_text(f'''
class AddHeader:
    def request(self, flow):
        if flow.request.pretty_host == "{HOST}":
            flow.request.headers["Authorization"] = "Bearer {TOKEN}"
            flow.request.host = "127.0.0.1"  # bench.routed.test has no DNS; the Host header stays


addons = [AddHeader()]
''')
    port = free_port()
    process = spawn("mitmproxy", pinned(1, [
        str(MITM_VENV / "bin" / "mitmdump"), "--listen-host", "127.0.0.1", "-p", str(port),
        "-q", "-s", str(addon), "--set", f"confdir={ws.root}/mitm",
        "--set", "connection_strategy=lazy",
        "--set", f"ssl_verify_upstream_trusted_ca={ws.root}/upstream-ca.pem",
    ]), ws.root / "mitmproxy.log")
    wait_for_port(port, timeout=30)
    process.extra["port"] = port
    return process
