"""The README's standalone quick start, run as written in a fresh ``git clone`` of this
checkout: its commands are read from README.md, not copied here, so the README cannot drift
from what works — and afterwards ``git status`` in the clone is clean: no key, CA or anything
else the quick start makes lands in a file git would commit.

The only additions are the test's stand-in for api.openai.com (an HTTPS server on
127.0.0.2:443 with a certificate from the test CA, reached with ``--resolve`` and trusted with
``--upstream-ca``), a ``HOME`` of the test's own, and the user's ``OPENAI_API_KEY``: tests
never reach the internet.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.upstream import UpstreamServer

ROOT = Path(__file__).parents[2]
STANDALONE_KEY = "sk-proj-" + "quickstart-standalone-5d1e"  # split: this file is in the clone too


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


def _user_env(home: Path) -> dict[str, str]:
    """A user's shell: their own HOME and key, no proxy or CA variables yet."""
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY",
                                "SSL_CERT_FILE", "CURL_CA_BUNDLE")}
    return {**env, "HOME": str(home), "OPENAI_API_KEY": STANDALONE_KEY}


@pytest.fixture
def clone(tmp_path):
    """A fresh clone of this checkout (its committed state, plus the working tree's README,
    examples and .gitignore, which these tests are about) with the checkout's .venv."""
    folder = tmp_path / "keyhole"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(folder)], check=True,
                   timeout=60)
    for name in ("README.md", ".gitignore"):
        (folder / name).write_text((ROOT / name).read_text())
    subprocess.run(["git", "-C", str(folder), "rm", "-rq", "--cached", "examples"], check=True)
    shutil.rmtree(folder / "examples")
    shutil.copytree(ROOT / "examples", folder / "examples")
    subprocess.run(["git", "-C", str(folder), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-qm", "the working tree", "--allow-empty"], check=True)
    (folder / ".venv").mkdir()  # a folder, as the install makes it (.gitignore: .venv/)
    (folder / ".venv" / "bin").symlink_to(ROOT / ".venv" / "bin")
    (tmp_path / "home").mkdir()
    return folder


@pytest.fixture
def readme_proxy(clone, openai_stand_in):
    """The README's install, keys and run commands, in the clone (so ./ca is created there,
    as for a new user)."""
    install, keys, run, _use = _section_blocks("Quick start standalone (laptop, VM)")
    assert install.strip() == "python3 -m venv .venv && .venv/bin/pip install -e ."
    env = _user_env(clone.parent / "home")
    done = subprocess.run(["bash", "-euc", keys], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    extra = ["--resolve", "api.openai.com:443:127.0.0.2", "--upstream-ca",
             openai_stand_in.ca_file]
    log = clone.parent / "proxy.log"
    with open(log, "w") as out:
        proxy = subprocess.Popen(f"exec {run.strip()} {shlex.join(extra)}", shell=True,
                                 cwd=clone, env=env, stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while "proxying on 127.0.0.1:15080" not in log.read_text():
            assert proxy.poll() is None, f"the README's proxy exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield clone
    finally:
        proxy.terminate()
        proxy.wait(15)


@pytest.mark.parametrize("curl_ca_bundle", [None, "/etc/ssl/certs/ca-certificates.crt"],
                         ids=["CURL_CA_BUNDLE-unset", "CURL_CA_BUNDLE-already-set"])
def test_the_readme_standalone_quick_start_works_as_written(readme_proxy, openai_stand_in,
                                                            curl_ca_bundle):
    *_, use = _section_blocks("Quick start standalone (laptop, VM)")
    env = _user_env(readme_proxy.parent / "home")
    if curl_ca_bundle:
        env["CURL_CA_BUNDLE"] = curl_ca_bundle  # a user's shell that already trusts the system
    done = subprocess.run(["bash", "-euc", use], cwd=readme_proxy, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [request] = [r for r in openai_stand_in.received if r.path == "/v1/models"][-1:]
    assert request.header("Authorization") == [f"Bearer {STANDALONE_KEY}"]
    assert STANDALONE_KEY not in done.stdout + done.stderr
    status = subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=readme_proxy,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", f"the quick start left files git would commit:\n{status}"
    tracked = subprocess.run(["git", "grep", "-l", STANDALONE_KEY], cwd=readme_proxy,
                             capture_output=True, text=True).stdout
    assert tracked == ""
