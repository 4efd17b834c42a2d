"""The relay leans on parts of aiohttp that are not its public API: the C parsers (llhttp) and
their constructor keywords, the base protocol's write flow control, StreamReader and
EMPTY_PAYLOAD, helpers.set_exception. pyproject.toml pins aiohttp below its next minor version;
when an upgrade moves one of these parts, this test names it, instead of the relay hanging or
buffering under load."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from aiohttp import base_protocol, helpers, http_parser, streams


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_the_parsers_are_aiohttps_c_ones_on_llhttp():
    assert http_parser.HttpRequestParser is http_parser.HttpRequestParserC
    assert http_parser.HttpResponseParser is http_parser.HttpResponseParserC


def test_the_base_protocols_write_flow_control_is_where_the_relay_reads_it(loop):
    protocol = base_protocol.BaseProtocol(loop)
    assert protocol._paused is False
    protocol.pause_writing()
    assert protocol._paused is True
    assert inspect.iscoroutinefunction(protocol._drain_helper)
    protocol.resume_writing()
    assert protocol._paused is False


def test_the_request_parser_takes_the_relays_arguments_and_answers_as_it_reads(loop):
    parser = http_parser.HttpRequestParser(
        base_protocol.BaseProtocol(loop), loop, 2**16, max_line_size=8190, max_field_size=8190,
        max_headers=100, max_msg_queue_size=16)  # as wire/http1.py and wire/frontdoor.py build it
    messages, upgraded, tail = parser.feed_data(
        b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 2\r\n\r\nok")
    assert (upgraded, tail) == (False, b"")
    (get, get_body), (post, post_body) = messages
    assert (get.method, get.path, get.version, get.should_close, get.upgrade, get.chunked) == (
        "GET", "/a?b=1", (1, 1), False, False, False)
    assert get.raw_headers == ((b"Host", b"x"),)
    assert get_body is streams.EMPTY_PAYLOAD
    assert post.method == "POST" and post.headers["Content-Length"] == "2"
    assert isinstance(post_body, streams.StreamReader) and post_body.is_eof()


def test_the_response_parser_takes_the_relays_arguments_and_set_exception_ends_a_body(loop):
    protocol = base_protocol.BaseProtocol(loop)
    parser = http_parser.HttpResponseParser(
        protocol, loop, 2**16, max_line_size=8190, max_field_size=8190, max_headers=100,
        response_with_body=True, read_until_eof=True, auto_decompress=False)  # as pool.py
    messages, _, _ = parser.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    (head, body), = messages
    assert (head.code, head.reason, head.version) == (200, "OK", (1, 1))
    assert not body.is_eof()
    failure = ConnectionResetError("gone")
    helpers.set_exception(body, failure)
    with pytest.raises(ConnectionResetError):
        loop.run_until_complete(body.read())
