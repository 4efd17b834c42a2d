"""skaffold.yaml, checked offline with the real skaffold (built from its Go module): it parses,
and rendering the dev profile wires both images and the operator's live reload into the chart."""

from __future__ import annotations

import os
import subprocess

import yaml

from tests.chart.helm import ROOT
from tests.cluster.controlplane import build, build_skaffold, helm_binary


def skaffold(*args: str) -> subprocess.CompletedProcess:
    binary = build_skaffold()
    if not helm_binary().exists():
        build()
    env = {**os.environ, "SKAFFOLD_UPDATE_CHECK": "false", "SKAFFOLD_DETECT_MINIKUBE": "false",
           "PATH": f"{helm_binary().parent}:{os.environ['PATH']}"}
    done = subprocess.run([str(binary), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_skaffold_parses_the_config():
    config = yaml.safe_load(skaffold("diagnose", "--yaml-only").stdout)
    images = [a["image"] for a in config["build"]["artifacts"]]
    assert images == ["ghcr.io/keyhole-dev/keyhole-operator", "ghcr.io/keyhole-dev/keyhole-sidecar"]
    assert [a["docker"]["dockerfile"] for a in config["build"]["artifacts"]] == [
        "operator/Dockerfile", "sidecar/Dockerfile"]


def test_the_dev_profile_renders_the_chart_with_both_images_and_live_reload():
    rendered = skaffold("render", "--offline=true", "--digest-source=tag", "-p", "dev").stdout
    documents = [d for d in yaml.safe_load_all(rendered) if d]
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    # "git-" + the commit: a tag of digits only would reach helm as a number
    assert container["image"].startswith("ghcr.io/keyhole-dev/keyhole-operator:git-")
    assert "--reload" in container["args"]
    assert any(a.startswith("--sidecar-image=ghcr.io/keyhole-dev/keyhole-sidecar:git-")
               for a in container["args"])
    assert deployment["spec"]["replicas"] == 1
