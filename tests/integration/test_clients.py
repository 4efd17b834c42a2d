"""Every client an agent is likely to use, configured only by environment variables, reaches
the upstream with the credential injected, and receives nothing that reveals it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.integration.clients import (
    NODE24,
    PYTHON_LIBRARIES,
    curl,
    go_fetch,
    java_fetch,
    node_fetch,
    python_client,
)
from tests.support.config import ALL_SECRETS, API_TOKEN


def assert_injected(upstream, marker: str) -> None:
    seen = upstream.one(marker)
    assert seen.header("Authorization") == [f"Bearer {API_TOKEN}"]


def assert_no_secret(text: str) -> None:
    for secret in ALL_SECRETS:
        assert secret not in text


@pytest.mark.parametrize("library", PYTHON_LIBRARIES)
def test_python_client_gets_the_header_injected_over_connect(sidecar, upstream, marker, library):
    reply = python_client(sidecar, library, "GET", f"https://api.routed.test/{marker}")
    assert reply.status == 200
    assert_injected(upstream, marker)
    assert "[REDACTED]" in reply.body  # the upstream echoed the header back
    assert_no_secret(reply.everything())


@pytest.mark.parametrize("library", PYTHON_LIBRARIES)
def test_python_client_posts_a_body_through_the_proxy(sidecar, upstream, marker, library):
    reply = python_client(sidecar, library, "POST", f"https://api.routed.test/{marker}",
                          '{"prompt": "hi"}')
    assert reply.status == 200
    assert reply.json()["body_size"] == len('{"prompt": "hi"}')
    assert_injected(upstream, marker)


def test_curl_gets_the_header_injected_over_connect(sidecar, upstream, marker):
    reply = curl(sidecar, f"https://api.routed.test/{marker}")
    assert reply.status == 200
    assert_injected(upstream, marker)
    assert_no_secret(reply.everything())


def test_curl_plain_http_to_a_routed_host_is_sent_upstream_over_https(sidecar, upstream, marker):
    reply = curl(sidecar, f"http://api.routed.test/{marker}")
    assert reply.status == 200
    assert_injected(upstream, marker)
    assert_no_secret(reply.everything())


def test_curl_offering_http2_falls_back_to_http1_cleanly(sidecar, upstream, marker):
    reply = curl(sidecar, "--http2", f"https://api.routed.test/{marker}")
    assert reply.status == 200
    assert_injected(upstream, marker)


def test_node_fetch_gets_the_header_injected(sidecar, upstream, marker):
    reply = node_fetch(sidecar, "GET", f"https://api.routed.test/{marker}")
    assert reply.status == 200
    assert_injected(upstream, marker)
    assert_no_secret(reply.everything())


def test_node24_fetch_reads_the_proxy_variables_natively(sidecar, upstream, marker):
    """What the webhook relies on: NODE_USE_ENV_PROXY=1 and NODE_EXTRA_CA_CERTS, no undici."""
    reply = node_fetch(sidecar, "GET", f"https://api.routed.test/{marker}", node=str(NODE24))
    assert reply.status == 200
    assert_injected(upstream, marker)
    assert_no_secret(reply.everything())


def test_go_client_speaks_h2_to_the_proxy_and_gets_the_header_injected(sidecar, upstream,
                                                                        marker, go_client):
    """Go's transport offers h2 and the leaf takes it; the HTTP/1.1 upstream is served over
    HTTP/1.1 all the same."""
    reply = go_fetch(sidecar, go_client, "GET", f"https://api.routed.test/{marker}")
    assert reply.status == 200
    assert reply.protocol == "HTTP/2.0"
    assert_injected(upstream, marker)
    assert_no_secret(reply.everything())


def test_java_client_speaks_h2_to_the_proxy_and_gets_the_header_injected(sidecar, upstream,
                                                                          marker):
    reply = java_fetch(sidecar, "GET", f"https://api.routed.test/{marker}")
    assert reply.status == 200
    assert reply.protocol == "HTTP_2"  # HttpClient prefers HTTP_2, through the tunnel too
    assert_injected(upstream, marker)
    assert_no_secret(reply.everything())


def test_git_clones_over_https_through_the_proxy(sidecar, upstream, marker, tmp_path):
    """git sends no credentials until challenged; the proxy adds them, so git needs none."""
    destination = tmp_path / "clone"
    done = subprocess.run(
        ["git", "clone", "https://git.routed.test/git/repo.git", str(destination)],
        env=sidecar.client_env(GIT_TERMINAL_PROMPT="0"), capture_output=True, text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (destination / "README.md").read_text() == "cloned through keyhole\n"
    seen = [r for r in upstream.received if r.path.startswith("/git/repo.git/info/refs")]
    assert seen and all(r.header("Authorization") for r in seen)
    assert_no_secret(done.stdout + done.stderr)


@pytest.fixture(scope="module", autouse=True)
def git_repository(upstream, tmp_path_factory):
    """A bare repository served over dumb HTTP by the test upstream."""
    if shutil.which("git") is None:
        pytest.fail("git is required (apt-get install git)")
    work = tmp_path_factory.mktemp("git-work")
    bare = tmp_path_factory.mktemp("git-served") / "repo.git"

    def git(*args, cwd=work):
        subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                       env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                            "HOME": str(work), "PATH": "/usr/bin:/bin"})

    git("init", "-q", "-b", "main")
    (work / "README.md").write_text("cloned through keyhole\n")
    git("add", "README.md")
    git("commit", "-qm", "first")
    git("clone", "-q", "--bare", str(work), str(bare))
    git("update-server-info", cwd=bare)
    upstream.git_root = str(bare.parent)
    yield
