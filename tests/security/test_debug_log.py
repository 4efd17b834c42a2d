"""No form of any secret reaches any output stream, at ``--log-level debug``, whatever passes.

One sidecar at debug level carries every kind of traffic at once — HTTP/1.1 through CONNECT,
absolute-form and base-URL; HTTP/2 on both sides; gRPC; WebSocket; SSE; compressed answers; a
refusal and a malformed request — to upstreams that echo the key back in headers, bodies,
trailers and error messages. Then every byte of its stdout (the audit log) and stderr (the
diagnostics) is searched for every form of every secret: raw, as injected, base64 at each
alignment, URL-encoded, the basic-auth pair. (Before issue 30, ``hpack`` logged every header
it encoded at DEBUG: ``Adding b'authorization'=b'Bearer …'``.)
"""

from __future__ import annotations

import base64
import logging
import ssl

import grpc
import httpx
import pytest

from keyhole_sidecar import logformat
from keyhole_sidecar.redact import Redactor, secret_forms
from tests.integration.clients import curl, websocket
from tests.support.config import (
    GRPC_KEY,
    H2_KEY,
    INJECTIONS,
    SECRETS,
    injection,
    ref,
    resolve_all,
)
from tests.support.raw import exchange
from tests.support.sidecar import start_sidecar


def every_form() -> list[bytes]:
    values = [value for keys in SECRETS.values() for value in keys.values()] + [H2_KEY, GRPC_KEY]
    values += [f"Bearer {v}" for v in values]
    pairs = [f"{SECRETS['stripe']['secret-key']}:",
             f"{SECRETS['git']['user']}:{SECRETS['git']['token']}"]
    values += pairs + [f"Basic {base64.b64encode(p.encode()).decode()}" for p in pairs]
    return sorted(secret_forms(values), key=len)


@pytest.fixture(scope="module")
def debug_sidecar(tmp_path_factory, upstream, h2_upstream, grpc_upstream):
    injections = [*INJECTIONS,
                  injection("h2", hosts=[f"h2.routed.test:{h2_upstream.port}"],
                            headers=[{"name": "Authorization", "valueFrom": ref("h2", "key"),
                                      "format": "Bearer {value}"}]),
                  injection("grpc", hosts=[f"grpc.routed.test:{grpc_upstream.port}"],
                            headers=[{"name": "Authorization", "valueFrom": ref("grpc", "key"),
                                      "format": "Bearer {value}"}])]
    sidecar = start_sidecar(
        tmp_path_factory.mktemp("debug-log"), injections,
        {**SECRETS, "h2": {"key": H2_KEY}, "grpc": {"key": GRPC_KEY}},
        resolve=[*resolve_all(upstream.port), f"h2.routed.test:{h2_upstream.port}:127.0.0.1",
                 f"grpc.routed.test:{grpc_upstream.port}:127.0.0.1"],
        upstream_ca=upstream.ca_file, args=["--log-level", "debug"])
    yield sidecar
    sidecar.stop()


def _grpc(sidecar, grpc_upstream) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=sidecar.ca_cert.read_bytes())
    with grpc.secure_channel(f"grpc.routed.test:{grpc_upstream.port}", credentials,
                             options=[("grpc.http_proxy", sidecar.url),
                                      ("grpc.enable_retries", 0)]) as channel:
        unary = channel.unary_unary("/echo.Echo/Unary", request_serializer=None,
                                    response_deserializer=None)
        assert unary(b"hello", timeout=20) == b"unary:hello"
        with pytest.raises(grpc.RpcError) as failed:  # its message quotes the key
            unary(b"fail", timeout=20)
        assert GRPC_KEY not in failed.value.details()


def test_no_output_stream_holds_any_form_of_any_secret_at_debug_level(
        debug_sidecar, upstream, h2_upstream, grpc_upstream, marker):
    sidecar = debug_sidecar
    for form in ("raw", "b64", "b64-offset", "url"):
        for host in ("api", "basic", "query", "git"):
            curl(sidecar, f"https://{host}.routed.test/reflect?form={form}&m={marker}")
    for where in ("header", "cookie", "www-auth", "error", "location"):
        curl(sidecar, f"https://api.routed.test/reflect?where={where}&m={marker}")
    for enc in ("gzip", "br", "deflate"):
        curl(sidecar, f"https://api.routed.test/reflect?enc={enc}&split=3&m={marker}")
    curl(sidecar, "-x", sidecar.url, f"http://api.routed.test/reflect?m={marker}")  # absolute
    curl(sidecar, f"{sidecar.url}/api/reflect?m={marker}")  # base-URL
    curl(sidecar, f"https://api.routed.test/sse?m={marker}")
    curl(sidecar, f"https://api.routed.test/reflect?m={marker}", http2=True)  # h2 → http/1.1
    curl(sidecar, f"https://h2.routed.test:{h2_upstream.port}/{marker}", http2=True)
    with httpx.Client(http2=True, proxy=sidecar.url, trust_env=False,
                      verify=ssl.create_default_context(cafile=str(sidecar.ca_cert))) as client:
        answer = client.post(f"https://h2.routed.test:{h2_upstream.port}/{marker}",
                             content=b"x" * 1000, headers={"te": "trailers"})
        assert answer.status_code == 200
    _grpc(sidecar, grpc_upstream)
    websocket(sidecar, f"wss://api.routed.test/ws?m={marker}", send="ping")
    curl(sidecar, "-X", "DELETE", f"https://rules.routed.test/v1/models/x?m={marker}")  # refused
    exchange(sidecar.proxy_port, b"GET http://api.routed.test/ HTTP/1.1\r\nX: a\0b\r\n\r\n")
    assert len(upstream.find(marker)) > 20 and h2_upstream.find(marker)

    sidecar.stop()  # everything flushed
    output = {"stdout (audit)": (sidecar.workdir / "stdout.log").read_bytes(),
              "stderr (diagnostics)": (sidecar.workdir / "stderr.log").read_bytes()}
    assert output["stdout (audit)"].count(b"\n") > 20  # the audit saw the traffic
    for stream, data in output.items():
        found = [form for form in every_form() if form in data]
        assert not found, f"{stream} holds {len(found)} form(s) of a secret, e.g. " \
                          f"{found[-1][:6]!r}… (length {len(found[-1])})"


def test_federation_leaves_no_identity_or_credential_in_any_output_stream(
        tmp_path, test_ca, marker):
    """Workload identity at debug level: the subject tokens, what each provider issued (AWS's
    session keys too) and what their APIs echo, exchanged through CONNECT (HTTP/1.1 and
    HTTP/2) and base-URL, one refused."""
    from moto.sts.models import sts_backends

    from tests.integration.test_federation import SUBJECT, _spec
    from tests.support import federation

    server = federation.FederationServer(test_ca[0], federation.Issuer())
    fed = server.start()
    try:
        fed.trust = server.trust_issuer(SUBJECT)
        fed.server = server
        sidecars = []
        for provider in ("claude", "aws", "gcp", "entra", "tokenExchange"):
            spec, url = _spec(fed, provider)
            token = tmp_path / f"{provider}.jwt"
            token.write_text(server.issuer.mint(SUBJECT, federation.AUDIENCES[provider]))
            sidecar = start_sidecar(
                tmp_path / provider, [spec], {}, upstream_ca=test_ca[1],
                resolve=[f"{h}:{fed.port}:127.0.0.1" for h in federation.HOSTS],
                args=["--log-level", "debug", "--identity-token", str(token)])
            sidecars.append(sidecar)
            assert curl(sidecar, f"{url}?m={marker}").status == 200
            assert curl(sidecar, f"{url}?m={marker}", http2=True).status == 200
            name = spec["metadata"]["name"]
            assert curl(sidecar, f"{sidecar.url}/{name}/{url.split('/', 3)[3]}").status == 200
        fed.refuse = f"rule mismatch {marker}"
        refused = start_sidecar(
            tmp_path / "refused", [_spec(fed, "entra")[0]], {}, upstream_ca=test_ca[1],
            resolve=[f"{h}:{fed.port}:127.0.0.1" for h in federation.HOSTS],
            args=["--log-level", "debug", "--identity-token", str(tmp_path / "entra.jwt")])
        sidecars.append(refused)
        assert curl(refused, _spec(fed, "entra")[1]).status == 503
        for sidecar in sidecars:
            sidecar.stop()
        values = [t.value for t in fed.issued] + [e["subject_token"] for e in fed.exchanges]
        for backend in sts_backends["123456789012"].values():
            values += [v for r in backend.assumed_roles
                       for v in (r.secret_access_key, r.session_token)]
        assert len(values) > 10
        forms = sorted(secret_forms([*values, *(f"Bearer {v}" for v in values)]), key=len)
        for sidecar in sidecars:
            for stream in ("stdout.log", "stderr.log"):
                data = (sidecar.workdir / stream).read_bytes()
                found = [form for form in forms if form in data]
                assert not found, f"{sidecar.workdir.name} {stream} holds a form of a secret"
    finally:
        server.stop()


def test_a_secret_any_logger_writes_is_masked_on_its_way_out(caplog):
    """Defence in depth: whatever a library writes (a message, its arguments, a traceback),
    the forms of the secrets being served leave as [REDACTED]."""
    secret = "sk-live-LOGGED-0123456789"
    scrubber = logformat.SecretScrubber()
    scrubber.source = lambda: Redactor(secret_forms([secret, f"Bearer {secret}"]))
    logger = logging.getLogger("some.library")
    caplog.handler.addFilter(scrubber)
    try:
        with caplog.at_level(logging.DEBUG, logger="some.library"):
            logger.debug("Adding %r to the header table", (b"authorization", f"Bearer {secret}"))
            logger.info("base64: %s", base64.b64encode(secret.encode()).decode())
            try:
                raise ValueError(f"refused {secret}")
            except ValueError:
                logger.exception("failed")
    finally:
        caplog.handler.removeFilter(scrubber)
    text = caplog.text
    assert secret not in text and base64.b64encode(secret.encode()).decode() not in text
    assert text.count("[REDACTED]") >= 3
    assert "Adding (b'authorization', '[REDACTED]') to the header table" in text
