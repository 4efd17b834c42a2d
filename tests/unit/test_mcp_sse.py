"""Event streams cut into whole events however the bytes arrive, and rewritten only where
the policy changes one."""

from __future__ import annotations

import pytest

from keyhole_sidecar.mcp.sse import EventStream, EventTooLarge, rewrite

STREAM = (b"id: 1\r\nevent: message\r\ndata: {\"a\":1}\r\n\r\n"
          b": keep-alive\n\n"
          b"data: line one\rdata: line two\r\r"
          b"retry: 10\ndata: {\"b\":2}\n\n")
EVENTS = [b"id: 1\r\nevent: message\r\ndata: {\"a\":1}\r\n\r\n", b": keep-alive\n\n",
          b"data: line one\rdata: line two\r\r", b"retry: 10\ndata: {\"b\":2}\n\n"]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_events_come_whole_and_unchanged_whatever_the_cuts(size):
    stream, events = EventStream(1 << 20), []
    for start in range(0, len(STREAM), size):
        events += stream.feed(STREAM[start:start + size])
    assert events + ([rest] if (rest := stream.rest()) else []) == EVENTS


def test_a_cr_at_a_cut_waits_for_its_lf():
    stream = EventStream(1 << 20)
    assert stream.feed(b"data: x\r\n\r") == []
    assert stream.feed(b"\ndata: y\n\n") == [b"data: x\r\n\r\n", b"data: y\n\n"]


def test_an_event_that_never_ends_is_refused_past_the_limit():
    stream = EventStream(1024)
    with pytest.raises(EventTooLarge):
        stream.feed(b"data: " + b"x" * 2000)


def test_rewrite_keeps_the_other_fields_and_replaces_the_data():
    assert rewrite(EVENTS[0], lambda data: data.replace("1", "2")) == \
        b"id: 1\nevent: message\ndata: {\"a\":2}\n\n"
    assert rewrite(EVENTS[0], lambda data: None) is EVENTS[0]
    assert rewrite(EVENTS[1], lambda data: "changed") is EVENTS[1]  # no data: nothing to do
    assert rewrite(EVENTS[2], lambda data: data.upper()) == \
        b"data: LINE ONE\ndata: LINE TWO\n\n"
