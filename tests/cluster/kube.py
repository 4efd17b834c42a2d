"""Test access to a cluster: kubectl with a kubeconfig, and kubeconfigs for ServiceAccounts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class Kube:
    kubeconfig: Path
    kubectl_binary: str

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run([self.kubectl_binary, "--kubeconfig",
                               str(kubeconfig or self.kubeconfig), *args],
                              input=input, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{done.stderr}")
        return done

    def keyhole(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``kubectl keyhole ...``: kubectl itself finds the plugin (``kubectl-keyhole``, in
        this interpreter's bin folder) on PATH, as a user's kubectl would."""
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "KUBECONFIG": str(self.kubeconfig)}  # kubectl takes no flag before a plugin
        done = subprocess.run([self.kubectl_binary, "keyhole", *args], env=env,
                              capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl keyhole {' '.join(args)} failed:\n{done.stderr}")
        return done

    def apply(self, documents: list[dict] | str, namespace: str | None = None,
              check: bool = True, kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        text = documents if isinstance(documents, str) else yaml.safe_dump_all(documents)
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        return self.kubectl(*args, input=text, check=check, kubeconfig=kubeconfig)

    def get(self, kind: str, name: str, namespace: str | None) -> dict:
        args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
        return json.loads(self.kubectl(*args).stdout)

    def get_all(self, kind: str, namespace: str) -> list[dict]:
        return json.loads(self.kubectl("get", kind, "-n", namespace, "-o", "json").stdout)["items"]

    def wait_for(self, check, timeout: float = 20.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = check()
                if last:
                    return last
            except AssertionError as exc:
                last = exc
            time.sleep(0.25)
        raise AssertionError(f"{what} not reached in {timeout}s (last: {last})")

    def wait_established(self, crd: str, timeout: float = 60.0) -> None:
        """Wait for a CRD to be served. Not `kubectl wait --for=condition=Established`: until
        the API server has written the CRD's first status, kubectl answers with an error
        (``.status.conditions accessor error: <nil>``) instead of waiting."""
        def established() -> bool:
            conditions = self.get("crd", crd, None).get("status", {}).get("conditions") or []
            return any(c.get("type") == "Established" and c.get("status") == "True"
                       for c in conditions)
        self.wait_for(established, timeout, what=f"CRD {crd} Established")

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """A kubeconfig that acts as ``namespace/name`` with a TokenRequest token."""
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration", "2h"
                             ).stdout.strip()
        config = yaml.safe_load(self.kubectl("config", "view", "--raw", "--minify",
                                             "--flatten").stdout)
        config["users"] = [{"name": name, "user": {"token": token}}]
        config["contexts"][0]["context"]["user"] = name
        path.write_text(yaml.safe_dump(config))
        return path

    def bind_role(self, namespace: str, name: str, rules: list[dict],
                  accounts: tuple[str, ...] = ("default",)) -> None:
        """A Role of ``rules`` in ``namespace``, bound to its ServiceAccounts ``accounts``."""
        self.apply([{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                     "metadata": {"name": name}, "rules": rules},
                    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                     "metadata": {"name": name},
                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                 "name": name},
                     "subjects": [{"kind": "ServiceAccount", "name": account,
                                   "namespace": namespace} for account in accounts]}],
                   namespace)

    def can_i(self, verb: str, resource: str, namespace: str | None, as_user: str) -> bool:
        args = ["auth", "can-i", verb, resource, "--as", as_user]
        args += ["-n", namespace] if namespace else ["--all-namespaces"]
        return self.kubectl(*args, check=False).stdout.strip() == "yes"


def kubectl_binary(bin_dir: Path | None) -> str:
    if bin_dir is not None and (bin_dir / "kubectl").exists():
        return str(bin_dir / "kubectl")
    found = shutil.which("kubectl")
    if not found:
        raise AssertionError("kubectl is needed: tests/cluster/provision build, or apt-get install kubectl")
    return found
