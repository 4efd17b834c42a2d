"""A kept-alive HTTP/2 connection's memory stays flat however many streams it carries.

h2 remembers how each closed stream ended (to answer a late frame for it), by default 65,536
of them per connection: ~100 bytes a request, so the HTTP/2 soak of issue 30 climbed 2.6 MiB a
minute. keyhole's connections (``h2peer.Connection``, both sides) remember 1,024, ten times
the streams a client may have open at once."""

from __future__ import annotations

import h2.config
import h2.connection

from keyhole_sidecar.proxy.wire.h2peer import Connection


def _serve_streams(count: int) -> Connection:
    server = Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server.initiate_connection()
    client.initiate_connection()
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    for n in range(count):
        stream_id = 1 + 2 * n
        client.send_headers(stream_id, [(":method", "GET"), (":scheme", "https"),
                                        (":authority", "a.test"), (":path", "/")],
                            end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(stream_id, [(":status", "200")], end_stream=True)
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())
    return server


def test_a_connection_remembers_a_bounded_number_of_closed_streams():
    server = _serve_streams(3000)
    assert len(server.streams) <= 1
    assert len(server._closed_streams) == Connection.MAX_CLOSED_STREAMS == 1024
