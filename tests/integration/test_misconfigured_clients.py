"""A client set up the wrong way is told the right fix (issue 30, item 18): a proxy URL that
says https://, and a base-URL request sent through the proxy because NO_PROXY leaves out
127.0.0.1. Both met with the real sidecar and real clients."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.config import SECRETS, injection, ref
from tests.support.sidecar import start_sidecar


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    sidecar = start_sidecar(tmp_path_factory.mktemp("misconfigured"), [injection(
        "openai", hosts=["api.openai.test"], headers=[
            {"name": "Authorization", "valueFrom": ref("api-credentials", "token")}])], SECRETS)
    yield sidecar
    sidecar.stop()


def _curl(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=30)


def test_an_https_proxy_url_is_named_in_the_log_and_audit(proxy):
    done = _curl("https://api.openai.test/v1/models",
                 HTTPS_PROXY=f"https://127.0.0.1:{proxy.proxy_port}")
    assert done.returncode != 0  # curl cannot finish a TLS handshake with the proxy port
    line = proxy.wait_audit(lambda r: r["reason"] == "tls_to_proxy_port")
    assert line["decision"] == "denied"
    proxy.wait_for_log("its proxy URL starts with https://")
    assert "Set HTTPS_PROXY=http://127.0.0.1:15080 (http, not https)" in proxy.stderr()


def test_a_base_url_request_sent_through_the_proxy_says_to_set_no_proxy(proxy):
    done = _curl("-i", f"http://127.0.0.1:{proxy.proxy_port}/openai/v1/models",
                 http_proxy=f"http://127.0.0.1:{proxy.proxy_port}")
    assert done.stdout.startswith("HTTP/1.1 400"), done.stdout
    assert "X-Keyhole-Error: base_url_via_proxy" in done.stdout
    assert "Add 127.0.0.1,localhost to NO_PROXY" in done.stdout
    with_no_proxy = _curl("-i", f"http://127.0.0.1:{proxy.proxy_port}/openai/v1/x",
                          http_proxy=f"http://127.0.0.1:{proxy.proxy_port}",
                          no_proxy="127.0.0.1,localhost")
    assert "base_url_via_proxy" not in with_no_proxy.stdout  # straight to base-URL mode
