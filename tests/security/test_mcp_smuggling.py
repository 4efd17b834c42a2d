"""The agent controls every byte of an MCP request: no framing, encoding or JSON trick gets a
call past spec.mcp. Each body here is sent through the real sidecar to the real MCP server
(the official SDK's), whose own record of every request it received must hold no call the
policy refuses, read the way that server could read it (the first or the last of duplicate
keys). A hypothesis fuzzer then mixes the tricks."""

from __future__ import annotations

import contextlib
import gzip
import json
import ssl
import zlib

import brotli
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DENIED = "delete_repository"


def permitted(name: object, arguments: object) -> bool:
    """POLICY's tool rules, written out by hand: the oracle the proxy's decisions answer to."""
    if not isinstance(name, str) or "delete" in name:
        return False
    if not (name.startswith("get_") or name.startswith("list_")):
        return False
    if name == "get_file_contents":
        path = arguments.get("path") if isinstance(arguments, dict) else None
        return isinstance(path, str) and not path.startswith(".github/")
    return True


def _readings(body: str) -> list:
    """Every way a lenient server could read ``body``: duplicate keys first-wins and
    last-wins."""
    readings = []
    for pick in (lambda pairs: dict(reversed(pairs)), dict):
        with contextlib.suppress(ValueError, RecursionError):
            readings.append(json.loads(body, object_pairs_hook=pick))
    return readings


def refused_calls_received(server, since: int) -> list:
    """The calls the server received after its ``since``-th request that POLICY refuses."""
    found = []
    for entry in server.received()[since:]:
        text = entry["body"]
        if "elete" in text or "erge" in text:
            found.append(text[:200])  # the raw bytes name it: whatever the reading
        for document in _readings(text):
            for message in document if isinstance(document, list) else [document]:
                if not isinstance(message, dict) or not isinstance(message.get("method"), str):
                    continue
                if message["method"].strip().lower().replace("_", "/") != "tools/call":
                    continue
                params = message.get("params")
                params = params if isinstance(params, dict) else {}
                if not permitted(params.get("name"), params.get("arguments", {})):
                    found.append(message)
    return found


def call(name: str = DENIED, arguments: dict | None = None, ident: int = 1) -> dict:
    return {"jsonrpc": "2.0", "id": ident, "method": "tools/call",
            "params": {"name": name, "arguments": arguments or {"name": "prod"}}}


def raw(text: str) -> bytes:
    return text.encode()


JSON = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
TRICKS = {
    "duplicate name, allowed first": (raw(
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_issue",'
        '"name":"delete_repository","arguments":{}}}'), JSON),
    "duplicate name, allowed last": (raw(
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repository",'
        '"name":"get_issue","arguments":{}}}'), JSON),
    "duplicate params": (raw(
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_issue"},'
        '"params":{"name":"delete_repository"}}'), JSON),
    "duplicate method": (raw(
        '{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call",'
        '"params":{"name":"delete_repository"}}'), JSON),
    "escaped name": (raw(
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\\u0064elete_'
        'repository"}}'), JSON),
    "escaped method": (raw(
        '{"jsonrpc":"2.0","id":1,"method":"tools\\u002fcall","params":{"name":'
        '"\\u0064elete_repository"}}'), JSON),
    "batch hiding a call": (json.dumps([call("get_issue", {"number": 1}, 1), call(ident=2)])
                            .encode(), JSON),
    "gzip": (gzip.compress(json.dumps(call()).encode()), {**JSON, "Content-Encoding": "gzip"}),
    "deflate": (zlib.compress(json.dumps(call()).encode()),
                {**JSON, "Content-Encoding": "deflate"}),
    "br": (brotli.compress(json.dumps(call()).encode()), {**JSON, "Content-Encoding": "br"}),
    "zstd named": (json.dumps(call()).encode(), {**JSON, "Content-Encoding": "zstd"}),
    "identity then gzip": (gzip.compress(json.dumps(call()).encode()),
                           {**JSON, "Content-Encoding": "identity, gzip"}),
    "invalid UTF-8": (raw('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":'
                          '"delete_repository","arguments":{"x":"') + b"\xff\xfe" + b'"}}}',
                      JSON),
    "lone surrogate": (raw('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":'
                           '"delete_repository\\ud800"}}'), JSON),
    "number for a name": (raw('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":'
                              '{"name":12,"arguments":{"delete_repository":1}}}'), JSON),
    "NaN argument": (raw('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":'
                         '"delete_repository","arguments":{"n":NaN}}}'), JSON),
    "BOM": (b"\xef\xbb\xbf" + json.dumps(call()).encode(), JSON),
    "deep nesting": (raw('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":'
                         '"delete_repository","arguments":{"x":' + "[" * 5000 + "]" * 5000
                         + "}}}"), JSON),
    "text/plain": (json.dumps(call()).encode(), {**JSON, "Content-Type": "text/plain"}),
    "no content type": (json.dumps(call()).encode(),
                        {"Accept": "application/json, text/event-stream"}),
    "form": (json.dumps(call()).encode(),
             {**JSON, "Content-Type": "application/x-www-form-urlencoded"}),
    "method odd case": (raw('{"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":'
                            '"delete_repository"}}'), JSON),
    "method with a space": (raw('{"jsonrpc":"2.0","id":1,"method":"tools/call ","params":'
                                '{"name":"delete_repository"}}'), JSON),
    "name with a space": (raw('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":'
                              '"delete_repository "}}'), JSON),
    "name with a NUL": (raw('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":'
                            '"get_issue\\u0000delete_repository"}}'), JSON),
    "huge body": (json.dumps(call(arguments={"pad": "x" * (5 << 20)})).encode(), JSON),
    "trailing second document": (json.dumps(call("get_issue")).encode() + b"\n"
                                 + json.dumps(call()).encode(), JSON),
    "denied under the allowed glob": (json.dumps(call("get_delete_tokens")).encode(), JSON),
    "condition on arguments": (json.dumps(call("get_file_contents", {
        "path": ".github/workflows/release.yml"})).encode(), JSON),
}


@pytest.fixture(scope="module")
def json_server(mcp_upstreams):
    return mcp_upstreams["json"]


@pytest.mark.parametrize("trick", list(TRICKS))
def test_a_smuggled_call_never_reaches_the_server(mcp_proxy, json_server, trick):
    body, headers = TRICKS[trick]
    since = len(json_server.received())
    with httpx.Client(timeout=30) as client:
        reply = client.post(f"{mcp_proxy.url}/mcp-json/mcp", content=body, headers=headers)
    assert refused_calls_received(json_server, since) == []
    assert reply.status_code in (200, 400, 413, 415)
    assert "keyhole" in reply.text


@pytest.mark.parametrize("trick", ["duplicate name, allowed first", "batch hiding a call",
                                   "gzip", "escaped name"])
def test_chunked_and_http2_bodies_are_judged_the_same(mcp_proxy, mcp_upstreams, json_server,
                                                       trick):
    body, headers = TRICKS[trick]
    since = len(json_server.received())

    def pieces():
        for start in range(0, len(body), 7):
            yield body[start:start + 7]

    tls = ssl.create_default_context(cafile=str(mcp_proxy.bundle))
    url = f"https://mcp-json.test:{json_server.port}/mcp"
    with httpx.Client(proxy=mcp_proxy.url, verify=tls, http2=True, timeout=30) as h2, \
            httpx.Client(timeout=30) as h1:
        over_h2 = h2.post(url, content=body, headers=headers)
        chunked = h1.post(f"{mcp_proxy.url}/mcp-json/mcp", content=pieces(), headers=headers)
    assert over_h2.http_version == "HTTP/2"
    assert "keyhole" in over_h2.text and "keyhole" in chunked.text
    assert refused_calls_received(json_server, since) == []


NAMES = st.sampled_from(["get_issue", "list_issues", "get_file_contents", DENIED,
                         "merge_pull_request", "get_delete_x"])
PATHS = st.sampled_from(["src/a.py", ".github/ci.yml", 7, None])


@st.composite
def bodies(draw) -> tuple[bytes, dict]:
    """A JSON-RPC body the agent might craft: calls (a batch or one), their names escaped or
    repeated, keys duplicated, methods re-cased, arguments of any type; sent as it is or
    compressed, under one Content-Type or another."""
    messages = []
    for ident in range(draw(st.integers(1, 3))):
        name, path = draw(NAMES), draw(PATHS)
        name_text = json.dumps(name)
        if draw(st.booleans()):  # escape one letter
            i = draw(st.integers(0, len(name) - 1))
            name_text = json.dumps(name[:i]) [:-1] + f"\\u{ord(name[i]):04x}" + \
                json.dumps(name[i + 1:])[1:]
        fields = [f'"name":{name_text}']
        if draw(st.booleans()):  # a second name
            fields.insert(draw(st.integers(0, 1)), f'"name":{json.dumps(draw(NAMES))}')
        arguments = {} if path is None else {"path": path}
        fields.append(f'"arguments":{json.dumps(arguments)}')
        method = draw(st.sampled_from(["tools/call", "tools/call", "Tools/call", "tools/call\t",
                                       "tools\\/call"]))
        messages.append(f'{{"jsonrpc":"2.0","id":{ident},"method":"{method}",'
                        f'"params":{{{",".join(fields)}}}}}')
    text = messages[0] if len(messages) == 1 and draw(st.booleans()) else \
        "[" + ",".join(messages) + "]"
    body = text.encode()
    headers = dict(JSON)
    encoding = draw(st.sampled_from([None, None, "gzip", "identity"]))
    if encoding == "gzip":
        body = gzip.compress(body)
    if encoding:
        headers["Content-Encoding"] = encoding
    headers["Content-Type"] = draw(st.sampled_from(["application/json",
                                                    "application/json; charset=utf-8",
                                                    "text/plain"]))
    return body, headers


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attempt=bodies(), framing=st.sampled_from(["length", "chunked", "h2"]),
       piece=st.integers(1, 64))
def test_fuzzed_bodies_only_ever_deliver_allowed_calls(mcp_proxy, json_server, attempt,
                                                       framing, piece):
    """Bodies and framings mixed: announced length, chunked in pieces of ``piece`` bytes
    (HTTP/1.1 at the base URL), or DATA frames over HTTP/2 through CONNECT."""
    body, headers = attempt
    since = len(json_server.received())

    def pieces():
        for start in range(0, len(body), piece):
            yield body[start:start + piece]

    if framing == "h2":
        tls = ssl.create_default_context(cafile=str(mcp_proxy.bundle))
        with httpx.Client(proxy=mcp_proxy.url, verify=tls, http2=True, timeout=30) as client:
            client.post(f"https://mcp-json.test:{json_server.port}/mcp", content=body,
                        headers=headers)
    else:
        with httpx.Client(timeout=30) as client:
            client.post(f"{mcp_proxy.url}/mcp-json/mcp", headers=headers,
                        content=body if framing == "length" else pieces())
    assert refused_calls_received(json_server, since) == []


@pytest.mark.parametrize("method", ["PUT", "PATCH", "GET", "DELETE"])
def test_a_call_in_the_body_of_another_method_is_refused(mcp_proxy, json_server, method):
    since = len(json_server.received())
    with httpx.Client(timeout=30) as client:
        reply = client.request(method, f"{mcp_proxy.url}/mcp-json/mcp",
                               content=json.dumps(call()).encode(), headers=JSON)
    assert reply.status_code == 400 and "only a POST carries a body" in reply.text
    assert json_server.received()[since:] == []
