"""Running the helm built from tests/cluster/helm (a real binary from its Go module)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.cluster.controlplane import KUBERNETES_VERSION, build, helm_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "keyhole"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not helm_binary().exists():
        build()
    done = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stderr}")
    return done


def render(values: dict[str, str] | None = None, *extra: str, namespace: str = "keyhole-system",
           release: str = "keyhole") -> list[dict]:
    args = ["template", release, str(CHART), "--namespace", namespace,
            "--kube-version", KUBERNETES_VERSION]
    for key, value in (values or {}).items():
        args += ["--set", f"{key}={value}"]
    return [d for d in yaml.safe_load_all(helm(*args, *extra).stdout) if d]
