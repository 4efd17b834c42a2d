"""Property-based fuzzing (hypothesis): the spec parser and the request path through a real
socket. Bounded in CI; for a long run:

    KEYHOLE_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/security/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import os
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyhole_common.spec import SpecError, parse_injections
from tests.support.config import ALL_SECRETS, INJECTIONS
from tests.support.raw import open_tunnel, read_all

EXAMPLES = int(os.environ.get("KEYHOLE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12),
                                                                      children, max_size=4),
    max_leaves=20)
spec_keys = st.sampled_from(["hosts", "headers", "basicAuth", "queryParams", "rules", "agentEnv",
                             "podSelector", "surprise"])


@FUZZ
@given(st.dictionaries(spec_keys, json_values, max_size=6), st.sampled_from(INJECTIONS))
def test_the_spec_parser_only_ever_raises_spec_error(random_spec, base):
    document = {**base, "spec": {**base["spec"], **random_spec}}
    try:
        parse_injections([("fuzz", document)])
    except SpecError as exc:
        assert exc.problems  # every refusal names at least one problem


@FUZZ
@given(json_values)
def test_the_parser_survives_any_document_shape(document):
    with contextlib.suppress(SpecError):
        parse_injections([("fuzz", document)])


token = st.text(alphabet="!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                min_size=1, max_size=12)
header_value = st.binary(max_size=40)
request_heads = st.tuples(
    st.sampled_from([b"GET", b"POST", b"PUT", b"CONNECT", b"OPTIONS"]) | st.binary(max_size=8),
    st.sampled_from([b"http://api.routed.test/x", b"/api/v1/x", b"https://query.routed.test/?key=1",
                     b"api.routed.test:443", b"*"]) | st.binary(max_size=30),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]) | st.binary(max_size=10),
    st.lists(st.tuples(token.map(str.encode), header_value), max_size=6),
    st.binary(max_size=200),
)


def _request(method, target, version, headers, body) -> bytes:
    lines = [method + b" " + target + b" " + version]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _assert_clean(answer: bytes) -> None:
    assert answer == b"" or answer.startswith(b"HTTP/1."), answer[:80]
    text = answer.decode("latin-1")
    assert not [s for s in ALL_SECRETS if s in text]


@FUZZ
@given(request_heads)
def test_random_requests_on_the_proxy_port_get_an_answer_or_a_clean_close(sidecar, head):
    with socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=5) as sock:
        sock.sendall(_request(*head))
        sock.shutdown(socket.SHUT_WR)
        _assert_clean(read_all(sock, timeout=5))
    assert sidecar.process.poll() is None


@FUZZ
@given(request_heads)
def test_random_requests_inside_a_tunnel_get_an_answer_or_a_clean_close(sidecar, head):
    method, _, version, headers, body = head
    with open_tunnel(sidecar.proxy_port, "api.routed.test:443", str(sidecar.ca_cert)) as tls:
        tls.sendall(_request(method, b"/fuzz", version, headers, body))
        _assert_clean(read_all(tls, timeout=3))
    assert sidecar.process.poll() is None


def test_nothing_the_fuzzers_sent_put_a_secret_in_the_logs(sidecar):
    logs = sidecar.stderr() + (sidecar.workdir / "stdout.log").read_text()
    assert not [s for s in ALL_SECRETS if s in logs]
