"""The frame guard in front of libnghttp2: what it refuses, and that everything else reaches
libnghttp2 byte for byte however the client's bytes are cut (the wire-level cases are
tests/security/test_h2spec.py and test_http2_attacks.py)."""

from __future__ import annotations

import hpack
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from keyhole_sidecar.proxy.wire.h2guard import (
    FLOW_CONTROL_ERROR,
    PROTOCOL_ERROR,
    STREAM_CLOSED,
    FrameGuard,
    Refusal,
    Window,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_encoder = hpack.Encoder()


def headers(stream_id: int, end_stream: bool = True) -> bytes:
    frame = HeadersFrame(stream_id, _encoder.encode([(":method", "GET"), (":path", "/")]))
    frame.flags.add("END_HEADERS")
    if end_stream:
        frame.flags.add("END_STREAM")
    return frame.serialize()


def feed(guard: FrameGuard, *parts: bytes) -> list:
    return [item for part in parts for item in guard.feed(part)]


def test_a_new_guard_passes_a_whole_connection_unchanged():
    wire = PREFACE + SettingsFrame(0).serialize() + headers(1, end_stream=False) + \
        DataFrame(1, b"x" * 100, flags=["END_STREAM"]).serialize() + PingFrame(0).serialize()
    assert FrameGuard(100).feed(wire) == [wire]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_any_cut_of_the_bytes_reaches_libnghttp2_unchanged(cuts):
    wire = PREFACE + SettingsFrame(0).serialize() + b"".join(
        headers(1 + 2 * n, end_stream=False) + DataFrame(1 + 2 * n, b"body").serialize() +
        WindowUpdateFrame(1 + 2 * n, window_increment=10).serialize() for n in range(3)) + \
        PriorityFrame(7, depends_on=1).serialize()
    guard, parts, at = FrameGuard(100), [], 0
    for cut in cuts:
        parts.append(wire[at:at + cut])
        at += cut
    parts.append(wire[at:])
    out = b""
    for item in feed(guard, *parts):
        assert not isinstance(item, Refusal)
        out += item.frame if isinstance(item, Window) else item
    assert out == wire


def test_data_on_a_stream_the_client_reset_is_a_connection_error():
    guard = FrameGuard(100)
    feed(guard, PREFACE, headers(1, end_stream=False), RstStreamFrame(1).serialize())
    [refusal] = guard.feed(DataFrame(1, b"late").serialize())
    assert refusal.code == STREAM_CLOSED and not refusal.stream_id


def test_frames_on_a_stream_keyhole_reset_are_left_to_libnghttp2_to_ignore():
    guard = FrameGuard(100)
    feed(guard, PREFACE, headers(1, end_stream=False))
    guard.closed(1, by_us=True)
    late = DataFrame(1, b"in flight").serialize()
    assert guard.feed(late) == [late]


def test_a_stream_both_sides_ended_takes_no_more_headers():
    guard = FrameGuard(100)
    feed(guard, PREFACE, headers(1))
    guard.closed(1, by_us=False)
    [refusal] = guard.feed(headers(1))
    assert refusal.code == STREAM_CLOSED


def test_a_lower_stream_after_a_higher_one_and_too_many_streams_are_protocol_errors():
    guard = FrameGuard(100)
    feed(guard, PREFACE, headers(5))
    [refusal] = guard.feed(headers(3))
    assert refusal.code == PROTOCOL_ERROR and "stream 3" in refusal.why
    guard = FrameGuard(2)
    items = feed(guard, PREFACE, headers(1), headers(3), headers(5))
    assert items[-1] == Refusal(PROTOCOL_ERROR, "more than 2 streams at once")


def test_priority_on_stream_zero_or_on_itself_and_a_frame_its_stream_forbids():
    for frame in (PriorityFrame(3, depends_on=3).serialize(),
                  GoAwayFrame(0).serialize()[:5] + b"\x00\x00\x00\x01" +
                  GoAwayFrame(0).serialize()[9:]):  # a GOAWAY on stream 1
        guard = FrameGuard(100)
        passed, refusal = feed(guard, PREFACE, frame)
        assert passed == PREFACE and refusal.code == PROTOCOL_ERROR
    zero = PriorityFrame(1, depends_on=0).serialize()
    zero = zero[:5] + b"\x00\x00\x00\x00" + zero[9:]  # the same frame on stream 0
    passed, refusal = feed(FrameGuard(100), PREFACE, zero)
    assert refusal.code == PROTOCOL_ERROR and "may not be sent on" in refusal.why


def test_a_stream_window_update_is_weighed_by_the_connection():
    guard = FrameGuard(100)
    feed(guard, PREFACE, headers(1, end_stream=False))
    frame = WindowUpdateFrame(1, window_increment=2**31 - 1).serialize()
    [window] = guard.feed(frame)
    assert window.frame == frame and window.stream_id == 1
    assert window.overflows(65_535) and not window.overflows(0) and not window.overflows(None)
    assert FLOW_CONTROL_ERROR == 0x3
