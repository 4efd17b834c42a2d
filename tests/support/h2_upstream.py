"""Real HTTP/2 upstreams over TLS on 127.0.0.1: an echo server framed by ``h2`` and a gRPC
server (grpcio), each recording what it received, each with a certificate from the test CA.

The echo server answers every request with JSON naming what it got (headers included, so a
credential the proxy added is reflected back and must come out redacted) and, to a client that
sent ``te: trailers``, trailers that reflect the Authorization header too. ``/big?n=N``
streams N bytes; ``/hang`` sends headers and then nothing until the client resets;
``/refuse-once`` is refused (RST_STREAM REFUSED_STREAM) the first time it is asked;
``/reset-mid`` starts an answer and then resets the stream (RST_STREAM CANCEL).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trustme


@dataclass
class H2Received:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body_size: int
    reset: bool = False
    body_sha256: str = ""  # of the DATA frames' payload, as received

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


@dataclass
class H2Upstream:
    port: int
    received: list[H2Received] = field(default_factory=list)
    connections: int = 0
    sent: dict[str, int] = field(default_factory=dict)  # body bytes sent, by path
    stalled: set[str] = field(default_factory=set)  # paths waiting for the peer's window
    refused: set[str] = field(default_factory=set)  # /refuse-once paths refused already
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def find(self, marker: str) -> list[H2Received]:
        with self._lock:
            return [r for r in self.received if marker in r.path]

    def wait_stalled(self, marker: str, timeout: float = 20.0) -> int:
        """Wait until the answer to ``marker`` waits for a window; the bytes sent by then."""
        with self._lock:
            if not self._lock.wait_for(lambda: any(marker in p for p in self.stalled), timeout):
                raise AssertionError(f"the answer to {marker} never waited for a window")
            return next(n for p, n in self.sent.items() if marker in p)


class _EchoProtocol(asyncio.Protocol):
    def __init__(self, state: H2Upstream):
        self.state = state
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        self.streams: dict[int, dict] = {}
        self.tasks: set[asyncio.Task] = set()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.state.connections += 1
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data):
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.conn.data_to_send())
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                headers = list(event.headers)
                self.streams[event.stream_id] = {"headers": headers, "size": 0,
                                                 "sha": hashlib.sha256(),
                                                 "window": asyncio.Event()}
            elif isinstance(event, h2.events.DataReceived):
                self.streams[event.stream_id]["size"] += len(event.data)
                self.streams[event.stream_id]["sha"].update(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                task = asyncio.ensure_future(self.answer(event.stream_id))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream["reset"] = True
                    stream["window"].set()
                    self._record(stream, reset=True)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                for stream in self.streams.values():
                    stream["window"].set()
        self.transport.write(self.conn.data_to_send())

    def _record(self, stream: dict, reset: bool = False) -> None:
        pseudo = dict(h for h in stream["headers"] if h[0].startswith(":"))
        with self.state._lock:
            self.state.received.append(H2Received(
                pseudo[":method"], pseudo[":path"],
                [h for h in stream["headers"] if not h[0].startswith(":")], stream["size"],
                reset, stream["sha"].hexdigest()))

    async def answer(self, stream_id: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError):  # the proxy reset it
            await self._answer(stream_id)

    async def _answer(self, stream_id: int) -> None:
        stream = self.streams[stream_id]
        pseudo = dict(h for h in stream["headers"] if h[0].startswith(":"))
        path = pseudo[":path"]
        if "/refuse-once" in path and path not in self.state.refused:
            self.state.refused.add(path)
            self._record(stream, reset=True)
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            self.transport.write(self.conn.data_to_send())
            return
        if "/reset-mid" in path:  # an answer begun, then cancelled by the upstream
            self.conn.send_headers(stream_id, [(":status", "200")])
            self.conn.send_data(stream_id, b"partial answer")
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            self.transport.write(self.conn.data_to_send())
            self._record(stream)
            return
        if "/hang" in path:
            self.conn.send_headers(stream_id, [(":status", "200")])
            self.transport.write(self.conn.data_to_send())
            self._record(stream)
            return  # until the client resets the stream
        self._record(stream)
        fields = dict(stream["headers"])
        if "/big" in path:
            size = int(path.rsplit("n=", 1)[1])
            self.conn.send_headers(stream_id, [(":status", "200"),
                                               ("content-type", "application/octet-stream")])
            await self._send(stream_id, b"x" * size)
            self.conn.end_stream(stream_id)
            self.transport.write(self.conn.data_to_send())
            return
        body = json.dumps({"method": pseudo[":method"], "path": path, "protocol": "h2",
                           "headers": [h for h in stream["headers"]
                                       if not h[0].startswith(":")],
                           "body_size": stream["size"]}).encode()
        self.conn.send_headers(stream_id, [
            (":status", "200"), ("content-type", "application/json"),
            ("x-echo-authorization", fields.get("authorization", ""))])
        await self._send(stream_id, body)
        if fields.get("te") == "trailers":
            self.conn.send_headers(stream_id, [("x-trailer-authorization",
                                                fields.get("authorization", "")),
                                               ("x-trailer", "done")], end_stream=True)
        else:
            self.conn.end_stream(stream_id)
        self.transport.write(self.conn.data_to_send())

    async def _send(self, stream_id: int, data: bytes) -> None:
        stream = self.streams[stream_id]
        path = dict(stream["headers"])[":path"]
        while data:
            if stream.get("reset") or self.transport.is_closing():
                return
            window = min(self.conn.local_flow_control_window(stream_id),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                stream["window"].clear()
                with self.state._lock:
                    self.state.stalled.add(path)
                    self.state._lock.notify_all()
                await stream["window"].wait()
                with self.state._lock:
                    self.state.stalled.discard(path)
                continue
            self.conn.send_data(stream_id, data[:window])
            with self.state._lock:
                self.state.sent[path] = self.state.sent.get(path, 0) + window
            data = data[window:]
            self.transport.write(self.conn.data_to_send())
            await asyncio.sleep(0)

    def connection_lost(self, exc):
        for task in self.tasks:
            task.cancel()


class H2EchoServer:
    """The echo server in a thread of its own."""

    def __init__(self, ca: trustme.CA, hostname: str):
        self._cert = ca.issue_cert(hostname)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._protocols: list[_EchoProtocol] = []

    def start(self) -> H2Upstream:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> H2Upstream:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(context)
        context.set_alpn_protocols(["h2"])
        state = H2Upstream(0)

        def protocol():
            made = _EchoProtocol(state)
            self._protocols.append(made)
            return made

        self._server = await self._loop.create_server(protocol, "127.0.0.1", 0, ssl=context)
        state.port = self._server.sockets[0].getsockname()[1]
        return state

    def stop(self) -> None:
        async def stop():
            self._server.close()
            for made in self._protocols:
                if made.transport is not None:
                    made.transport.abort()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# -- gRPC ----------------------------------------------------------------------------------
@dataclass
class GrpcCall:
    method: str
    metadata: dict[str, str]
    cancelled: threading.Event = field(default_factory=threading.Event)


class GrpcUpstream:
    """A gRPC service of four methods, one per call shape, on raw bytes (no protobuf needed):
    each answers with what it was sent and puts the Authorization it received in its trailing
    metadata (which the proxy must redact)."""

    def __init__(self, ca: trustme.CA, hostname: str, address: str = "127.0.0.1", port: int = 0):
        cert = ca.issue_cert(hostname)
        self.calls: list[GrpcCall] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Chat": grpc.stream_stream_rpc_method_handler(self._chat),
            "Hang": grpc.unary_stream_rpc_method_handler(self._hang),
        }
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("echo.Echo", handlers)])
        credentials = grpc.ssl_server_credentials(
            [(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())])
        self.port = self.server.add_secure_port(f"{address}:{port}", credentials)

    def start(self) -> GrpcUpstream:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None).wait(10)

    def _record(self, method: str, context) -> GrpcCall:
        call = GrpcCall(method, {k: v for k, v in context.invocation_metadata()})
        context.add_callback(call.cancelled.set)
        with self._lock:
            self.calls.append(call)
        context.set_trailing_metadata([("x-echo-authorization",
                                        call.metadata.get("authorization", ""))])
        return call

    def find(self, marker: str) -> list[GrpcCall]:
        with self._lock:
            return [c for c in self.calls if c.metadata.get("x-marker") == marker]

    def _unary(self, request: bytes, context) -> bytes:
        call = self._record("Unary", context)
        if request == b"fail":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"refused; you sent {call.metadata.get('authorization')}")
        return b"unary:" + request

    def _server_stream(self, request: bytes, context):
        self._record("ServerStream", context)
        for i in range(int(request or b"3")):
            yield b"part-%d" % i

    def _client_stream(self, requests, context) -> bytes:
        self._record("ClientStream", context)
        return b"+".join(requests)

    def _chat(self, requests, context):
        self._record("Chat", context)
        for message in requests:
            yield b"echo:" + message

    def _hang(self, request: bytes, context):
        call = self._record("Hang", context)
        yield b"started"
        call.cancelled.wait(30)  # until the call is cancelled (the callback sets it)
