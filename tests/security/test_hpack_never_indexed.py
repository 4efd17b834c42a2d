"""Injected credentials leave over HTTP/2 as never-indexed literals (RFC 7541 §7.1.3): the
agent shapes the later requests on keyhole's shared upstream connection, and any value in
HPACK's dynamic table is one they are compressed against (a CRIME-style oracle). The upstream
decodes with Node's nghttp2 — not the ``hpack`` library keyhole encodes with — and says which
fields arrived never-indexed."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from tests.support.config import SECRETS, injection, ref
from tests.support.serving import serving_process
from tests.support.sidecar import start_sidecar

HOST = "sensitive.routed.test"
CLIENTS = Path(__file__).resolve().parent.parent / "clients"


@pytest.fixture(scope="module")
def node_h2_upstream(test_ca, tmp_path_factory):
    with serving_process(["node", str(CLIENTS / "h2_sensitive_upstream.mjs")],
                         test_ca[0].issue_cert(HOST, f"q.{HOST}", f"b.{HOST}"),
                         tmp_path_factory.mktemp("node-h2")) as port:
        yield port


@pytest.fixture(scope="module")
def sensitive_sidecar(tmp_path_factory, test_ca, node_h2_upstream):
    port = node_h2_upstream
    sidecar = start_sidecar(
        tmp_path_factory.mktemp("hpack"),
        [injection("header", hosts=[f"{HOST}:{port}"],
                   headers=[{"name": "Authorization", "valueFrom": ref("api-credentials", "token"),
                             "format": "Bearer {value}"},
                            {"name": "X-Api-Key", "valueFrom": ref("rules", "key")}]),
         injection("query", hosts=[f"q.{HOST}:{port}"],
                   queryParams=[{"name": "key", "valueFrom": ref("maps", "api-key")}]),
         injection("basic", hosts=[f"b.{HOST}:{port}"],
                   basicAuth={"usernameFrom": ref("stripe", "secret-key")})],
        SECRETS, upstream_ca=test_ca[1],
        resolve=[f"{HOST}:{port}:127.0.0.1", f"q.{HOST}:{port}:127.0.0.1",
                 f"b.{HOST}:{port}:127.0.0.1"])
    yield sidecar
    sidecar.stop()


def _ask(sidecar, url: str, **headers: str) -> dict:
    with httpx.Client(http1=False, http2=True, proxy=sidecar.url, timeout=10,
                      verify=ssl.create_default_context(cafile=str(sidecar.ca_cert))) as client:
        answers = [client.get(url, headers=headers) for _ in range(2)]  # the 2nd: a warm table
    for answer in answers:
        assert answer.status_code == 200 and answer.http_version == "HTTP/2", answer.text
    return answers[1].json()


def test_injected_headers_are_never_indexed(sensitive_sidecar, node_h2_upstream):
    seen = _ask(sensitive_sidecar, f"https://{HOST}:{node_h2_upstream}/h",
                **{"X-Api-Key": "placeholder", "X-Ordinary": "indexed-as-usual"})
    assert {"authorization", "x-api-key"} <= set(seen["sensitive"])
    assert "x-ordinary" not in seen["sensitive"]  # the rest compresses as before


def test_basic_auth_is_never_indexed(sensitive_sidecar, node_h2_upstream):
    seen = _ask(sensitive_sidecar, f"https://b.{HOST}:{node_h2_upstream}/b")
    assert "authorization" in seen["sensitive"]


def test_a_path_carrying_a_query_secret_is_never_indexed(sensitive_sidecar, node_h2_upstream):
    seen = _ask(sensitive_sidecar, f"https://q.{HOST}:{node_h2_upstream}/q?x=1")
    assert "key=" in seen["path"]
    assert ":path" in seen["sensitive"]
