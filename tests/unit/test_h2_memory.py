"""A kept-alive HTTP/2 connection's memory stays flat however many streams it carries.

h2 remembered how each closed stream ended, 65,536 per connection: ~100 bytes a request, so
the HTTP/2 soak of issue 30 climbed 2.6 MiB a minute. The connections keyhole makes now are
libnghttp2's (``h2peer.configuration``, both sides): it forgets a stream once both ends closed
it. Served here 10,000 streams at a time on one connection, with the process's own RSS read
between rounds; a leak of 100 bytes a stream would be 1 MB a round."""

from __future__ import annotations

import gc

import ngh2

from keyhole_sidecar.proxy.wire.h2peer import configuration

REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"),
           (b":path", b"/")]


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


def _serve(server: ngh2.Connection, client: ngh2.Connection, count: int) -> None:
    for _ in range(count // 50):
        for _ in range(50):
            client.send_request(REQUEST, end_stream=True)
        server.receive_data(client.data_to_send())
        for event in server.events():
            if isinstance(event, ngh2.RequestReceived):
                server.send_response(event.stream_id, [(b":status", b"200")], end_stream=True)
        client.receive_data(server.data_to_send())
        client.events()
        server.receive_data(client.data_to_send())
        server.events()


def test_a_connection_serving_many_streams_does_not_grow():
    server = ngh2.Connection(ngh2.Role.SERVER, configuration(2**16))
    client = ngh2.Connection(ngh2.Role.CLIENT)
    server.initiate_connection({ngh2.Setting.MAX_CONCURRENT_STREAMS: 100})
    client.initiate_connection()
    for _ in range(2):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    _serve(server, client, 10_000)  # warm: the allocator's arenas, HPACK's tables
    gc.collect()
    rounds = []
    for _ in range(3):
        before = _rss_kib()
        _serve(server, client, 10_000)
        gc.collect()
        rounds.append(_rss_kib() - before)
    assert max(rounds) < 512, f"RSS grew by {rounds} KiB over rounds of 10,000 streams"
