"""A webhook receiver on 127.0.0.1: what a chat tool's incoming webhook would be, recording
each JSON POST. It answers 503 the first time it sees a notification of an object, then 200,
so the sender's retry is part of every test that uses it."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    def __init__(self, sock: socket.socket | None = None):
        """On 127.0.0.1, or on ``sock`` (a listening socket bound elsewhere: the test node's
        address, where the operator's pod reaches it)."""
        self.received: list[dict] = []
        self.refused: list[dict] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver._lock:
                    first = body not in receiver.refused
                    (receiver.refused if first else receiver.received).append(body)
                self.send_response(503 if first else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                return None

        if sock is None:
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        else:
            self._server = ThreadingHTTPServer(sock.getsockname(), Handler,
                                               bind_and_activate=False)
            self._server.socket.close()
            self._server.socket = sock
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}/hooks/approvals"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def about(self, name: str) -> list[dict]:
        with self._lock:
            return [b for b in self.received if b.get("name") == name]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
