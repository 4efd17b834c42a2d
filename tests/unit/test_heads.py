"""The heads the proxy writes: whatever the parts, either a refusal (UnsafeHead) or bytes that
llhttp parses back into exactly those parts — never a second header or a second message."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParser, HttpResponseParser
from hypothesis import given, settings
from hypothesis import strategies as st

from keyhole_sidecar.proxy.wire import heads
from keyhole_sidecar.proxy.wire.heads import (
    LAST_CHUNK,
    UnsafeHead,
    chunk,
    h2_fields,
    header_block,
    request_head,
    response_head,
)

names = st.sampled_from(["Authorization", "X-A", "Content-Type", "x-b"]) | st.text(max_size=12)
values = st.text(max_size=30) | st.sampled_from(["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b",
                                                 "ok", "Bearer sk-1"])
# Distinct names, none that frames the message (llhttp rightly refuses a second Content-Type).
fields = st.lists(st.tuples(names, values), max_size=5, unique_by=lambda f: f[0].lower()).filter(
    lambda fs: not {n.lower() for n, _ in fs} & {"host", "content-length", "transfer-encoding"})


def _parse(parser_class, data: bytes):
    loop = asyncio.new_event_loop()
    try:
        parser = parser_class(BaseProtocol(loop), loop, 2**16)
        messages, _upgraded, _tail = parser.feed_data(data)
        return messages
    finally:
        loop.close()


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["GET", "POST", "G T", "GET\r\n"]), st.sampled_from(["/a?b=1", "/a b",
       "/\r\n", "/x"]), fields)
def test_a_request_head_is_refused_or_parses_back_to_its_parts(method, target, headers):
    headers = [("Host", "api.test"), *headers]
    try:
        head = request_head(method, target, headers)
    except UnsafeHead:
        return
    messages = _parse(HttpRequestParser, head)
    assert len(messages) == 1
    message = messages[0][0]
    assert (message.method, message.path) == (method, target)
    assert [(n.lower(), v.strip(" \t")) for n, v in message.headers.items()] == \
        [(n.lower(), v.strip(" \t")) for n, v in headers]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([200, 404, 99, 1000]), st.text(max_size=12), fields)
def test_a_response_head_is_refused_or_parses_back_to_its_parts(status, reason, headers):
    try:
        head = response_head(status, reason, [*headers, ("Content-Length", "0")])
    except UnsafeHead:
        return
    messages = _parse(HttpResponseParser, head)
    assert len(messages) == 1
    message = messages[0][0]
    assert message.code == status
    assert [(n.lower(), v.strip(" \t")) for n, v in message.headers.items()][:-1] == \
        [(n.lower(), v.strip(" \t")) for n, v in headers]


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b"])
def test_a_value_that_would_break_a_line_is_refused_and_named(value):
    with pytest.raises(UnsafeHead, match="X-Api-Key"):
        request_head("GET", "/", [("Host", "a"), ("X-Api-Key", value)])


def test_a_name_that_is_not_a_token_is_refused():
    with pytest.raises(UnsafeHead, match="not a token"):
        response_head(200, "OK", [("X A", "1")])


def test_chunks_frame_their_bytes():
    assert chunk(b"hello") + LAST_CHUNK == b"5\r\nhello\r\n0\r\n\r\n"


# -- HTTP/2 header blocks: refused, or accepted by h2's own checks and decoded back exactly ----
h2_names = st.sampled_from(["authorization", "x-a", "content-type", "X-Upper", "connection",
                            "te", ":path"]) | st.text(max_size=12)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["200", "404", "2 0", "200\r\n"]),
       st.lists(st.tuples(h2_names, values), max_size=5))
def test_a_header_block_is_refused_or_h2_sends_exactly_its_parts(status, headers):
    import h2.config
    import h2.connection
    import h2.events

    try:
        block = header_block("response", [(":status", status)], headers)
    except UnsafeHead:
        return
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "a"),
                            (":path", "/")], end_stream=True)
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    server.send_headers(1, block, end_stream=True)  # h2 validates outbound blocks too
    events = client.receive_data(server.data_to_send())
    [answer] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert answer.headers == block


@pytest.mark.parametrize(("kind", "pseudo", "headers", "named"), [
    ("response", [], [("x-a", "a\r\nx-injected: 1")], "control character"),
    ("response", [], [("X-A", "1")], "lowercase token"),
    ("response", [], [("connection", "close")], "connection-specific"),
    ("response", [], [("te", "gzip")], "connection-specific"),
    ("response", [(":path", "/")], [], "no place"),
    ("trailers", [(":status", "200")], [], "no place"),
    ("request", [(":path", "/a b")], [], "whitespace"),
])
def test_a_header_block_that_would_break_http2_is_refused_and_named(kind, pseudo, headers,
                                                                    named):
    with pytest.raises(UnsafeHead, match=named):
        header_block(kind, pseudo, headers)


def test_fields_crossing_into_http2_leave_the_hops_behind():
    assert h2_fields([("Connection", "close"), ("Keep-Alive", "5"), ("Transfer-Encoding",
                      "chunked"), ("Upgrade", "h2c"), ("Proxy-Connection", "x"),
                      ("TE", "gzip"), ("TE", "trailers"), ("X-Keep", "Yes")]) == [
        ("te", "trailers"), ("x-keep", "Yes")]


async def _collect(body, length):
    return [piece async for piece in heads.within_length(body, length)]


async def _pieces(*parts: bytes):
    for part in parts:
        yield part


def test_a_streamed_body_never_outgrows_the_length_announced():
    with pytest.raises(ValueError, match="outgrew the Content-Length announced"):
        asyncio.run(_collect(_pieces(b"abc", b"defg"), 5))
    with pytest.raises(ValueError, match="ended after 3 of the 5 bytes"):
        asyncio.run(_collect(_pieces(b"abc"), 5))
    assert asyncio.run(_collect(_pieces(b"abc", b"de"), 5)) == [b"abc", b"de"]
    assert asyncio.run(_collect(_pieces(b"abc", b"defg"), None)) == [b"abc", b"defg"]
