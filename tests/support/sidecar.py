"""Run the real ``keyhole-sidecar`` process, and the environment a client needs to use it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY",
                   "all_proxy", "NO_PROXY", "no_proxy")
CA_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                "GIT_SSL_CAINFO", "NODE_EXTRA_CA_CERTS", "NODE_USE_ENV_PROXY")
_LISTENING = re.compile(r"proxying on 127\.0\.0\.1:(\d+) .* admin on 127\.0\.0\.1:(\d+)")


def write_secrets(root: Path, secrets: dict[str, dict[str, str]]) -> None:
    """Lay out secrets as Kubernetes mounts them: <name>/<key> files."""
    for name, keys in secrets.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for key, value in keys.items():
            (root / name / key).write_text(value + "\n")


def write_injections(path: Path, injections: list[dict] | str) -> None:
    text = injections if isinstance(injections, str) else yaml.safe_dump_all(injections)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic, like an editor's save or a ConfigMap update


@dataclass
class Sidecar:
    workdir: Path
    process: subprocess.Popen
    proxy_port: int
    admin_port: int
    extra_ca: list[str] = field(default_factory=list)

    @property
    def injections(self) -> Path:
        return self.workdir / "injections.yaml"

    @property
    def secrets_dir(self) -> Path:
        return self.workdir / "secrets"

    @property
    def ca_cert(self) -> Path:
        return self.workdir / "ca" / "tls.crt"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def bundle(self) -> Path:
        """What SSL_CERT_FILE points at: the keyhole CA plus the test upstream's CA
        (the stand-in for public roots, for hosts tunnelled blind)."""
        path = self.workdir / "bundle.pem"
        if not path.exists():  # written whole, then renamed: clients in other threads read it
            parts = [self.ca_cert.read_text()] + [Path(p).read_text() for p in self.extra_ca]
            partial = path.with_name(f"bundle.{threading.get_ident()}.tmp")
            partial.write_text("".join(parts))
            partial.replace(path)
        return path

    def client_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in PROXY_VARIABLES and k not in CA_VARIABLES}
        bundle = str(self.bundle)
        env.update(
            HTTP_PROXY=self.url, HTTPS_PROXY=self.url, http_proxy=self.url, https_proxy=self.url,
            NO_PROXY="localhost,127.0.0.1,::1", no_proxy="localhost,127.0.0.1,::1",
            SSL_CERT_FILE=bundle, REQUESTS_CA_BUNDLE=bundle, CURL_CA_BUNDLE=bundle,
            GIT_SSL_CAINFO=bundle, NODE_EXTRA_CA_CERTS=bundle, NODE_USE_ENV_PROXY="1",
        )
        env.update(extra)
        return env

    def audit(self) -> list[dict]:
        """The audit records written so far (a line still being written is not one yet)."""
        text = (self.workdir / "stdout.log").read_text()
        complete = text[:text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def wait_audit(self, predicate, timeout: float = 5.0) -> dict:
        """The last audit record matching ``predicate``, waiting for it to be written."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.audit() if predicate(r)]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise AssertionError("no such audit record; the audit log has:\n"
                                     + "\n".join(json.dumps(r) for r in self.audit()[-10:]))
            time.sleep(0.05)

    def stderr(self) -> str:
        return (self.workdir / "stderr.log").read_text()

    def admin(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}",
                                        timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:  # closes the connection it holds
                return exc.code, exc.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples on /metrics with these labels (whatever their others are);
        0 when there is none."""
        _, text = self.admin("/metrics")
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            sample, _, value = line.rpartition(" ")
            if sample.split("{")[0] != name:
                continue
            if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                total += float(value)
        return total

    def wait_for_log(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr():
                return
            time.sleep(0.05)
        raise AssertionError(f"sidecar never logged {text!r}; stderr:\n{self.stderr()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def rss_peak_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1))


def check_config(workdir: Path, injections: list[dict] | str,
                 secrets: dict[str, dict[str, str]], *extra: str) -> subprocess.CompletedProcess:
    """``keyhole-sidecar check`` on this configuration, laid out under ``workdir``."""
    write_secrets(workdir / "secrets", secrets)
    write_injections(workdir / "inj.yaml", injections)
    return subprocess.run([sys.executable, "-m", "keyhole_sidecar", "check", "--injections",
                           str(workdir / "inj.yaml"), "--secrets-dir", str(workdir / "secrets"),
                           *extra], capture_output=True, text=True, timeout=30)


def start_sidecar(workdir: Path, injections: list[dict] | str,
                  secrets: dict[str, dict[str, str]], *, resolve: list[str] = (),
                  upstream_ca: str | None = None, args: list[str] = (),
                  expect_failure: bool = False, module: str = "keyhole_sidecar",
                  ) -> Sidecar | subprocess.CompletedProcess:
    """``module``: what runs the sidecar's command line (tests/support/gc_probe.py wraps it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_secrets(workdir / "secrets", secrets)
    write_injections(workdir / "injections.yaml", injections)
    command = [sys.executable, "-m", module, "--injections", str(workdir / "injections.yaml"),
               "--secrets-dir", str(workdir / "secrets"), "--ca-dir", str(workdir / "ca"),
               "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    for item in resolve:
        command += ["--resolve", item]
    if upstream_ca:
        command += ["--upstream-ca", upstream_ca]
    command += list(args)
    if expect_failure:
        return subprocess.run(command, capture_output=True, text=True, timeout=30)
    with open(workdir / "stdout.log", "w") as stdout, open(workdir / "stderr.log", "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = _LISTENING.search((workdir / "stderr.log").read_text())
        if match:
            sidecar = Sidecar(workdir, process, int(match.group(1)), int(match.group(2)),
                              [upstream_ca] if upstream_ca else [])
            if sidecar.admin("/readyz")[0] == 200:
                return sidecar
        if process.poll() is not None:
            raise AssertionError("keyhole-sidecar exited at start:\n"
                                 + (workdir / "stderr.log").read_text())
        time.sleep(0.05)
    process.kill()
    raise AssertionError("keyhole-sidecar did not become ready:\n"
                         + (workdir / "stderr.log").read_text())
