"""Shared fixtures: the test CA, the HTTPS upstream on 127.0.0.1:443 and the real sidecar."""

from __future__ import annotations

import errno
import gc
import hashlib
import itertools
import os
import subprocess
from pathlib import Path

import pytest
import trustme

from tests.support.cache import cache_root, go_program
from tests.support.config import GRPC_KEY, H2_KEY, INJECTIONS, SECRETS, injection, ref, resolve_all
from tests.support.h2_upstream import GrpcUpstream, H2EchoServer
from tests.support.mcp import mcp_proxy, mcp_upstreams  # noqa: F401 (fixtures: MCP tests)
from tests.support.serving import serving_process
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.upstream import Upstream, UpstreamServer

_counter = itertools.count()


def pytest_collection_finish(session):
    """What collection imported (the product, the test clients, the SDKs, hypothesis) lives
    for the whole run: frozen into the collector's permanent generation, so the collection at
    each test's teardown below walks what the tests made, not every imported module again (that
    walk was half the run's time). A leak is still found: what a test leaves is not frozen."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True, scope="module")
def _collect_garbage_after_each_module():
    """Module-scoped fixtures (a sidecar, an upstream) are torn down with the module's last
    test: collect then, so what they leak is charged to that module (see below)."""
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test():
    """A socket or transport left open is found by the garbage collector, which warns; with
    ``filterwarnings = error`` pytest turns that into a failure of whichever test is running
    when the collector happens to run. Collecting at every test's teardown charges the leak to
    the test that made it. Hunt its origin with ``PYTHONTRACEMALLOC=25``: the failure then
    shows where the leaked object was allocated."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory) -> tuple[trustme.CA, str]:
    ca = trustme.CA(organization_name="keyhole tests")
    path = tmp_path_factory.mktemp("test-ca") / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, str(path)


@pytest.fixture(scope="session")
def upstream(test_ca) -> Upstream:
    """The real hosts' stand-in: HTTPS on 127.0.0.1:443, reached through --resolve so that
    host entries without a port (the common case) are tested as users write them."""
    ca, ca_file = test_ca
    server = UpstreamServer(ca, ca_file, port=443)
    try:
        state = server.start()
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            pytest.fail("the test upstream binds 127.0.0.1:443: run the tests as root or allow "
                        "it with sysctl net.ipv4.ip_unprivileged_port_start=443")
        raise
    yield state
    server.stop()


@pytest.fixture(scope="session")
def llm_upstream(test_ca):
    """A stand-in of the OpenAI, Anthropic and Gemini APIs on 127.0.0.3:443."""
    from tests.support.llm_upstream import LlmServer

    ca, ca_file = test_ca
    server = LlmServer(ca, ca_file)
    state = server.start()
    yield state
    server.stop()


@pytest.fixture(scope="session")
def plain_upstream(test_ca) -> Upstream:
    """A plain-HTTP twin of the upstream on a free port, for forwarding unrouted http://."""
    ca, ca_file = test_ca
    server = UpstreamServer(ca, ca_file, port=0, tls=False)
    state = server.start()
    yield state
    server.stop()


@pytest.fixture
def marker() -> str:
    """A unique path segment, to find this test's requests among the upstream's records."""
    return f"t{next(_counter)}x{id(object()) % 100000}"


def _start(tmp_path_factory, upstream: Upstream, plain: Upstream, injections=INJECTIONS,
           secrets=SECRETS, args=()) -> Sidecar:
    resolve = [*resolve_all(upstream.port), f"plain.unrouted.test:{plain.port}:127.0.0.1"]
    return start_sidecar(tmp_path_factory.mktemp("sidecar"), injections, secrets,
                         resolve=resolve, upstream_ca=upstream.ca_file, args=list(args))


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, upstream, plain_upstream) -> Sidecar:
    """The standard configuration, unmatched hosts passed through."""
    proc = _start(tmp_path_factory, upstream, plain_upstream)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def deny_sidecar(tmp_path_factory, upstream, plain_upstream) -> Sidecar:
    proc = _start(tmp_path_factory, upstream, plain_upstream, args=["--unmatched", "deny"])
    yield proc
    proc.stop()


@pytest.fixture
def make_sidecar(tmp_path_factory, upstream, plain_upstream):
    """Start a sidecar with a configuration of the test's own; stopped after the test."""
    started: list[Sidecar] = []

    def make(injections=INJECTIONS, secrets=SECRETS, args=()) -> Sidecar:
        proc = _start(tmp_path_factory, upstream, plain_upstream, injections, secrets, args)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def go_client(tmp_path_factory):
    """The Go client, built once per source version into the user's cache."""
    source = Path(__file__).resolve().parent / "clients" / "fetch.go"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = cache_root() / f"fetch-go-{digest}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["go", "build", "-o", str(binary), str(source)], check=True,
                       capture_output=True, env={**os.environ, "GOFLAGS": "-mod=mod",
                                                 "GO111MODULE": "off"}, timeout=600)
    return binary


@pytest.fixture(scope="session")
def grpc_go_client():
    """The Go gRPC client (grpc-go from the Go module proxy)."""
    return _go_binary("grpcgo")


def _go_binary(name: str) -> Path:
    """A Go program under tests/clients/``name``, built once per source version."""
    return go_program(Path(__file__).resolve().parent / "clients" / name, name)


@pytest.fixture(scope="session")
def dual_upstream(test_ca, tmp_path_factory):
    """A Go server (net/http) speaking HTTP/2 and HTTP/1.1, as most public APIs do; its port."""
    with serving_process([str(_go_binary("dual"))], test_ca[0].issue_cert("dual.routed.test"),
                         tmp_path_factory.mktemp("dual")) as port:
        yield port


# -- HTTP/2 and gRPC upstreams, and a sidecar routing to them --------------------------------
@pytest.fixture(scope="module")
def h2_upstream(test_ca):
    server = H2EchoServer(test_ca[0], "h2.routed.test")
    state = server.start()
    yield state
    server.stop()


@pytest.fixture(scope="module")
def grpc_upstream(test_ca):
    server = GrpcUpstream(test_ca[0], "grpc.routed.test").start()
    yield server
    server.stop()


def _start_h2_sidecar(tmp_path_factory, test_ca, h2_upstream, grpc_upstream,
                      dual: int, grpc_limits: dict | None = None) -> Sidecar:
    grpc_methods = [f"/echo.Echo/{m}" for m in ("Unary", "ServerStream", "ClientStream", "Chat",
                                                  "Hang")]
    extra = {"limits": grpc_limits} if grpc_limits else {}
    injections = [
        injection("h2", hosts=[f"h2.routed.test:{h2_upstream.port}"],
                  headers=[{"name": "Authorization", "valueFrom": ref("h2", "key"),
                            "format": "Bearer {value}"}]),
        injection("grpc", hosts=[f"grpc.routed.test:{grpc_upstream.port}"],
                  headers=[{"name": "Authorization", "valueFrom": ref("grpc", "key"),
                            "format": "Bearer {value}"}],
                  rules=[{"methods": ["POST"], "paths": grpc_methods}], **extra),
        injection("dual", hosts=[f"dual.routed.test:{dual}"],
                  headers=[{"name": "Authorization", "valueFrom": ref("h2", "key"),
                            "format": "Bearer {value}"}]),
    ]
    return start_sidecar(
        tmp_path_factory.mktemp("h2-sidecar"), injections,
        {"h2": {"key": H2_KEY}, "grpc": {"key": GRPC_KEY}},
        resolve=[f"h2.routed.test:{h2_upstream.port}:127.0.0.1",
                 f"grpc.routed.test:{grpc_upstream.port}:127.0.0.1",
                 f"dual.routed.test:{dual}:127.0.0.1"],
        upstream_ca=test_ca[1])


@pytest.fixture(scope="module")
def h2_sidecar(tmp_path_factory, test_ca, h2_upstream, grpc_upstream, dual_upstream):
    """A sidecar routing h2.routed.test, grpc.routed.test (its methods by rules) and
    dual.routed.test."""
    sidecar = _start_h2_sidecar(tmp_path_factory, test_ca, h2_upstream, grpc_upstream,
                                dual_upstream)
    yield sidecar
    sidecar.stop()


@pytest.fixture
def fresh_h2_sidecar(tmp_path_factory, test_ca, h2_upstream, grpc_upstream, dual_upstream):
    """The same, started for one test: no upstream connection is open yet."""
    sidecar = _start_h2_sidecar(tmp_path_factory, test_ca, h2_upstream, grpc_upstream,
                                dual_upstream)
    yield sidecar
    sidecar.stop()


@pytest.fixture
def limited_h2_sidecar(tmp_path_factory, test_ca, h2_upstream, grpc_upstream, dual_upstream):
    """The same, with one gRPC call at a time (spec.limits.concurrentRequests: 1)."""
    sidecar = _start_h2_sidecar(tmp_path_factory, test_ca, h2_upstream, grpc_upstream,
                                dual_upstream, grpc_limits={"concurrentRequests": 1})
    yield sidecar
    sidecar.stop()
