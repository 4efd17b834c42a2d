"""The README's standalone quick start, run as written: its commands are read from README.md,
not copied here, so the README cannot drift from what works.

The only additions are the test's stand-in for api.openai.com (an HTTPS server on
127.0.0.2:443 with a certificate from the test CA, reached with ``--resolve`` and trusted with
``--upstream-ca``): tests never reach the internet.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.upstream import UpstreamServer

ROOT = Path(__file__).parents[2]
STANDALONE_KEY = (ROOT / "examples/standalone/secrets/openai-credentials/api-key").read_text().strip()


def _section_blocks(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


@pytest.fixture
def openai_stand_in(test_ca):
    ca, ca_file = test_ca
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.2", 443))
    server = UpstreamServer(ca, ca_file, port=443, hosts=("api.openai.com",), sock=sock)
    state = server.start()
    yield state
    server.stop()


@pytest.fixture
def readme_proxy(tmp_path, openai_stand_in):
    """The README's second command, in a fresh folder holding the checkout's .venv and
    examples (so ./ca is created there, as for a new user)."""
    install, run, _use = _section_blocks("Quick start standalone (laptop, VM)")
    assert install.strip() == "python3 -m venv .venv && .venv/bin/pip install -e ."
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    extra = ["--resolve", "api.openai.com:443:127.0.0.2", "--upstream-ca",
             openai_stand_in.ca_file]
    log = tmp_path / "proxy.log"
    with open(log, "w") as out:
        proxy = subprocess.Popen(f"exec {run.strip()} {shlex.join(extra)}", shell=True,
                                 cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while "proxying on 127.0.0.1:15080" not in log.read_text():
            assert proxy.poll() is None, f"the README's proxy exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield tmp_path
    finally:
        proxy.terminate()
        proxy.wait(15)


@pytest.mark.parametrize("curl_ca_bundle", [None, "/etc/ssl/certs/ca-certificates.crt"],
                         ids=["CURL_CA_BUNDLE-unset", "CURL_CA_BUNDLE-already-set"])
def test_the_readme_standalone_quick_start_works_as_written(readme_proxy, openai_stand_in,
                                                            curl_ca_bundle):
    *_, use = _section_blocks("Quick start standalone (laptop, VM)")
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY",
                                "SSL_CERT_FILE", "CURL_CA_BUNDLE")}
    if curl_ca_bundle:
        env["CURL_CA_BUNDLE"] = curl_ca_bundle  # a user's shell that already trusts the system
    done = subprocess.run(["bash", "-euc", use], cwd=readme_proxy, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [request] = [r for r in openai_stand_in.received if r.path == "/v1/models"][-1:]
    assert request.header("Authorization") == [f"Bearer {STANDALONE_KEY}"]
    assert STANDALONE_KEY not in done.stdout + done.stderr
