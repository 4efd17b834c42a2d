"""The container images, as far as this machine can check them without a Docker engine:
the Dockerfiles lint clean, and their install steps (lock file, then the project without
dependencies) produce a folder from which both programs start under a bare interpreter."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_dockerfiles_lint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, "--failure-threshold", "warning", "sidecar/Dockerfile",
                           "operator/Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("image", "module"), [("sidecar", "keyhole_sidecar"),
                                                ("operator", "keyhole_operator.cli")])
def test_the_image_install_steps_give_a_working_program(tmp_path, image, module):
    app = tmp_path / "app"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--no-deps",
           "--target", str(app)]
    subprocess.run([*pip, "--requirement", str(ROOT / image / "requirements.lock")], check=True,
                   timeout=600)
    subprocess.run([*pip, str(ROOT)], check=True, timeout=600, capture_output=True)
    # As the Dockerfiles do: each image drops the other side's package.
    shutil.rmtree(app / ("keyhole_operator" if image == "sidecar" else "keyhole_sidecar"))
    # -I: no site-packages, no user paths; only /app, like the distroless image.
    done = subprocess.run([sys.executable, "-I", "-c",
                           f"import sys; sys.path.insert(0, {str(app)!r}); import runpy; "
                           f"sys.argv = ['x', '--help']; runpy.run_module({module!r}, run_name='__main__')"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    # --help returns before the program imports its parts: import them all, and compile a
    # spec.mcp condition, as the running image will (its CEL engine without the package's CLI).
    # -S: not even this interpreter's site-packages (-I alone keeps the venv's).
    deep = "keyhole_sidecar.app" if image == "sidecar" else "keyhole_operator.handlers"
    done = subprocess.run([sys.executable, "-I", "-S", "-c",
                           f"import sys; sys.path.insert(0, {str(app)!r}); import {deep}; "
                           "from keyhole_common.spec.expressions import compile_expression; "
                           "print(compile_expression('arguments.n + 1 == 3')"
                           ".execute({'arguments': {'n': 2}}))"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
